"""``vlsae concepts``: what a trained SAE's latents mean, as a static HTML report.

Pipeline: pair shards -> model adapter -> activations per modality -> the SAE's
sparse codes -> :func:`vlsae.concepts.summarize_concepts` (top rows, modality
score, agreement, pair overlap) -> concept cards with image thumbnails and
captions side by side, the modality-score histogram, per-modality
reconstruction and sparsity, and, when the records carry ShapesWorld metadata,
the planted-attribute <-> latent AUROC matrix. The report is a folder
(index.html, PNG figures and thumbnails, summary.json) that opens offline.
"""
from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.planted import auroc_matrix, match_values, summarize_matches
from vlsae.checkpoint import load_sae
from vlsae.files import atomic_write_text
from vlsae.concepts import ConceptSummary, latent_activations, summarize_concepts
from vlsae.errors import VlsaeError


@dataclass
class PairActivations:
    keys: list[str]
    captions: list[str]
    images: list[Any]  # PIL images (kept for thumbnails)
    metas: list[dict[str, Any]]
    acts: dict[str, torch.Tensor]  # modality -> (n_pairs, d)


def collect_pair_activations(adapter, records, hook: str = "final", tokens: str = "cls", batch_size: int = 64,
                             limit: int = 2000, progress: bool = True) -> PairActivations:
    """Run the adapter over up to ``limit`` records; one row per pair and modality."""
    if tokens not in ("cls", "mean"):
        raise VlsaeError("concept reports need one row per pair and modality: use --tokens cls or mean")
    keys, captions, images, metas = [], [], [], []
    chunks: dict[str, list[torch.Tensor]] = {}
    batch: list[Any] = []
    from tqdm.auto import tqdm
    bar = tqdm(total=limit, desc="encode pairs", unit="pair", disable=not progress)

    def flush() -> None:
        extracted = adapter.extract(batch, hook=hook, tokens=tokens)
        for m in extracted.modalities:
            chunks.setdefault(m, []).append(extracted[m].float().cpu())
        bar.update(len(batch))

    for record in records:
        keys.append(record.key)
        captions.append(record.caption)
        images.append(record.image)
        metas.append(getattr(record, "meta", {}) or {})
        batch.append(record)
        if len(batch) == batch_size:
            flush()
            batch = []
        if len(keys) >= limit:
            break
    if batch:
        flush()
    bar.close()
    if not keys:
        raise VlsaeError("no pairs to analyse; check --data")
    return PairActivations(keys, captions, images, metas, {m: torch.cat(c) for m, c in chunks.items()})


def planted_labels(metas: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per attribute value, (image labels: planted anywhere; caption labels: mentioned)."""
    image: dict[str, list[bool]] = {}
    text: dict[str, list[bool]] = {}
    values: set[str] = set()
    for meta in metas:
        for obj in meta.get("objects", []):
            for attr in ("shape", "colour", "size", "position"):
                values.add(f"{attr}={obj[attr]}")
    for name in sorted(values):
        attr, value = name.split("=", 1)
        image[name] = [any(o[attr] == value for o in m.get("objects", [])) for m in metas]
        text[name] = [any(o[attr] == value and attr in o.get("mentioned", []) for o in m.get("objects", []))
                      and not m.get("corrupted", False) for m in metas]
    return ({k: np.array(v) for k, v in image.items()}, {k: np.array(v) for k, v in text.items()})


def planted_probe(sae, pairs: PairActivations, image_modality: str = "image", text_modality: str = "text",
                  ceiling: bool = False) -> dict[str, Any]:
    """Best latent per planted value on images and on captions, and how often they coincide;
    with ``ceiling``, also each value's probe ceiling (:func:`two_fold_probe_ceiling`) and the encodable counts."""
    image_labels, text_labels = planted_labels(pairs.metas)
    if not image_labels:
        return {}
    img = latent_activations(sae, pairs.acts[image_modality], image_modality)
    txt = latent_activations(sae, pairs.acts[text_modality], text_modality)
    image_auroc = auroc_matrix(img, image_labels)
    text_auroc = auroc_matrix(txt, text_labels)
    matches = match_values(image_auroc, text_auroc)
    probe = {"matches": matches, "summary": summarize_matches(matches), "image_auroc": image_auroc, "text_auroc": text_auroc}
    if ceiling:
        ceilings = {"image": two_fold_probe_ceiling(pairs.acts[image_modality], image_labels),
                    "text": two_fold_probe_ceiling(pairs.acts[text_modality], text_labels)}
        encodable = [m for m in matches if min(ceilings["image"].get(m.value, 0.0), ceilings["text"].get(m.value, 0.0)) >= 0.9]
        probe["summary"]["encodable_values"] = len(encodable)
        probe["summary"]["encodable_same_and_both_ge_0.9"] = sum(m.shared_and_separated for m in encodable)
        probe["ceiling"] = ceilings
    return probe


def two_fold_probe_ceiling(acts: torch.Tensor, labels: dict[str, np.ndarray], max_pairs: int = 8000) -> dict[str, float]:
    """Per value, the held-out AUROC of a logistic probe on the activations themselves (fit on even
    pairs, scored on odd ones): what no single latent can beat. A value under 0.9 here is one the
    *model* does not hold well, whatever the SAE does. At most ``max_pairs`` evenly spaced pairs are
    used, so a large report does not spend minutes on its reference."""
    from evals.planted import linear_probe_auroc

    n = acts.shape[0]
    if n < 8:
        return {}
    used = torch.linspace(0, n - 1, min(n, max_pairs)).round().long().unique()
    even, odd = used[0::2], used[1::2]
    return linear_probe_auroc(acts[even], {k: v[even.numpy()] for k, v in labels.items()},
                              acts[odd], {k: v[odd.numpy()] for k, v in labels.items()})


def write_report(out: str | Path, sae, summary: ConceptSummary, pairs: PairActivations, probe: dict[str, Any],
                 title: str, n_cards: int = 24, overwrite: bool = False) -> Path:
    """Write the report folder atomically (built aside, then moved into place)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VlsaeError(f"{out} is not empty; choose another --out or pass --overwrite")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "img").mkdir(parents=True)
    figures = _figures(tmp, summary, probe)
    cards = _cards(tmp, summary, pairs, probe, n_cards)
    data = {
        "title": title, "pairs": len(pairs.keys), "n_latents": summary.n_latents,
        "fvu": summary.fvu, "l0": summary.l0,
        "alive_fraction": float(summary.alive().float().mean()),
        "multimodal_fraction": float(((summary.modality_score >= 0.2) & (summary.modality_score <= 0.8)).float().mean()),
        "mean_pair_overlap": float(np.nanmean(summary.pair_overlap.numpy())) if summary.pair_overlap.numel() else float("nan"),
        "planted": probe.get("summary", {}),
        "planted_matches": [{**m.__dict__, "ceiling_image": probe.get("ceiling", {}).get("image", {}).get(m.value),
                             "ceiling_text": probe.get("ceiling", {}).get("text", {}).get(m.value)}
                            for m in probe.get("matches", [])],
    }
    atomic_write_text(tmp / "summary.json", json.dumps(data, indent=2))
    atomic_write_text(tmp / "index.html", _html(data, figures, cards))
    from vlsae.files import replace_dir
    replace_dir(tmp, out)
    return out / "index.html"


def _figures(folder: Path, summary: ConceptSummary, probe: dict[str, Any]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    scores = summary.modality_score.numpy()
    scores = scores[~np.isnan(scores)]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(scores, bins=20, range=(0, 1), color="#4c72b0")
    first, second = summary.modalities[:2] if len(summary.modalities) >= 2 else ("-", "-")
    ax.set_xlabel(f"modality score (0 = {second} only, 1 = {first} only)")
    ax.set_ylabel("latents")
    ax.set_title("modality score of the living latents")
    fig.tight_layout()
    fig.savefig(folder / "modality_score.png", dpi=110)
    plt.close(fig)
    names.append("modality_score.png")
    if probe.get("matches"):
        matches = probe["matches"]
        latents = sorted({m.image_latent for m in matches} | {m.text_latent for m in matches})
        fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.28 * len(latents) * 2 + 3), 0.25 * len(matches) + 2), sharey=True)
        for ax, key, label in ((axes[0], "image_auroc", "images"), (axes[1], "text_auroc", "captions")):
            matrix = np.array([probe[key][m.value][latents] for m in matches])
            im = ax.imshow(matrix, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(latents)), [str(i) for i in latents], rotation=90, fontsize=6)
            ax.set_title(f"AUROC on {label}")
        axes[0].set_yticks(range(len(matches)), [m.value for m in matches], fontsize=7)
        fig.colorbar(im, ax=axes, shrink=0.6)
        fig.savefig(folder / "planted_matrix.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append("planted_matrix.png")
    return names


def _cards(folder: Path, summary: ConceptSummary, pairs: PairActivations, probe: dict[str, Any], n_cards: int) -> list[dict[str, Any]]:
    mods = summary.modalities
    first = mods[0]
    second = mods[1] if len(mods) > 1 else mods[0]
    value_of: dict[int, str] = {}
    for m in probe.get("matches", []):
        value_of.setdefault(m.image_latent, m.value)
    rate = sum(summary.fire_rate[m] for m in mods)
    order = [int(i) for i in torch.argsort(rate, descending=True) if rate[i] > 0]
    planted_first = [i for i in order if i in value_of]
    chosen = (planted_first + [i for i in order if i not in value_of])[:n_cards]
    cards = []
    for latent in chosen:
        images = []
        for row in summary.top_rows[first][latent].tolist():
            if row < 0:
                continue
            name = f"img/{row}.png"
            if not (folder / name).exists():
                pairs.images[row].resize((64, 64)).save(folder / name)
            images.append(name)
        captions = [pairs.captions[row] for row in summary.top_rows[second][latent].tolist() if row >= 0]
        score = float(summary.modality_score[latent])
        cards.append({"latent": latent, "images": images[:8], "captions": captions[:6],
                      "modality_score": score, "agreement": float(summary.agreement[latent]),
                      "fire_rate": {m: float(summary.fire_rate[m][latent]) for m in mods},
                      "planted": value_of.get(latent, "")})
    return cards


def _html(data: dict[str, Any], figures: list[str], cards: list[dict[str, Any]]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(m)}</td><td>{data['fvu'][m]:.4f}</td><td>{data['l0'][m]:.2f}</td></tr>" for m in data["fvu"])
    planted = data.get("planted") or {}
    planted_html = ""
    if planted:
        def num(value: float | None) -> str:
            return "–" if value is None else f"{value:.3f}"

        encodable = ""
        if "encodable_values" in planted:
            encodable = (f" {planted['encodable_values']} values are encodable (a logistic probe on the activations, "
                         f"fit on half the pairs, reaches AUROC &ge; 0.9 on the other half, on both sides); "
                         f"{planted['encodable_same_and_both_ge_0.9']} of them have the same latent with AUROC &ge; 0.9 "
                         f"on both sides.")
        planted_html = (f"<h2>Planted concepts</h2><p>{planted['values']} attribute values; the best latent on images and on "
                        f"captions is the same index for <b>{planted['same_index_rate']:.0%}</b> of them; mean AUROC "
                        f"{planted['image_auroc']:.3f} (images), {planted['text_auroc']:.3f} (captions).{encodable}</p>"
                        "<table><tr><th>value</th><th>image latent</th><th>AUROC</th><th>probe ceiling</th>"
                        "<th>caption latent</th><th>AUROC</th><th>probe ceiling</th></tr>" +
                        "".join(f"<tr class='{'same' if m['image_latent'] == m['text_latent'] else 'diff'}'><td>{esc(m['value'])}</td>"
                                f"<td>{m['image_latent']}</td><td>{m['image_auroc']:.3f}</td><td>{num(m.get('ceiling_image'))}</td>"
                                f"<td>{m['text_latent']}</td><td>{m['text_auroc']:.3f}</td><td>{num(m.get('ceiling_text'))}</td></tr>"
                                for m in data["planted_matches"]) + "</table>")
    figs = "".join(f"<img class='fig' src='{esc(f)}'>" for f in figures)
    card_html = []
    for c in cards:
        imgs = "".join(f"<img src='{esc(i)}'>" for i in c["images"])
        caps = "".join(f"<li>{esc(t)}</li>" for t in c["captions"])
        label = f" &middot; planted: <b>{esc(c['planted'])}</b>" if c["planted"] else ""
        rates = ", ".join(f"{esc(m)} {r:.1%}" for m, r in c["fire_rate"].items())
        card_html.append(f"<div class='card'><h3>latent {c['latent']}{label}</h3><p>modality score {c['modality_score']:.2f}"
                         f" &middot; agreement {c['agreement']:.2f} &middot; fires on {rates}</p><div class='imgs'>{imgs}</div>"
                         f"<ul>{caps}</ul></div>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(data['title'])}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}} tr.same td{{background:#e8f5e9}} tr.diff td{{background:#fff3e0}}
.card{{border:1px solid #ddd;border-radius:6px;padding:8px;margin:8px 0}} .imgs img{{width:64px;height:64px;margin:2px;image-rendering:pixelated}}
.fig{{max-width:100%;margin:8px}} h3{{margin:0}}</style></head><body>
<h1>{esc(data['title'])}</h1>
<p>{data['pairs']} pairs &middot; {data['n_latents']} latents &middot; {data['alive_fraction']:.0%} alive &middot;
{data['multimodal_fraction']:.0%} multimodal (modality score in [0.2, 0.8]) &middot; mean image-caption concept overlap {data['mean_pair_overlap']:.3f}</p>
<h2>Reconstruction and sparsity</h2><table><tr><th>modality</th><th>FVU</th><th>L0</th></tr>{rows}</table>
{planted_html}<h2>Figures</h2>{figs}<h2>Concept cards</h2>{''.join(card_html)}</body></html>"""


def concepts_report(sae_path: str | Path, data: str, model: str, out: str | Path, hook: str = "final", tokens: str = "cls",
                    limit: int = 2000, batch_size: int = 64, device: str = "auto", n_cards: int = 24,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """The whole ``vlsae concepts`` job; returns the report's summary."""
    from multimodal.adapters import create_adapter
    from multimodal.pairs import iter_pairs
    sae = load_sae(sae_path)
    adapter = create_adapter(model, device=device)
    pairs = collect_pair_activations(adapter, iter_pairs(data), hook=hook, tokens=tokens, batch_size=batch_size,
                                     limit=limit, progress=progress)
    width = int(sae.config.d_in) if not hasattr(sae, "projector") else None
    for m, t in pairs.acts.items():
        if width is not None and t.shape[1] != width:
            raise VlsaeError(f"the SAE takes width {width} but {model} at hook '{hook}' gives {m} rows of width {t.shape[1]}; "
                             "use the model and hook the SAE was trained on")
    summary = summarize_concepts(sae, pairs.acts)
    probe = planted_probe(sae, pairs, ceiling=True) if {"image", "text"} <= set(pairs.acts) else {}
    index = write_report(out, sae, summary, pairs, probe, title=f"Concepts of {Path(sae_path).name} ({sae.arch}) on {model}",
                         n_cards=n_cards, overwrite=overwrite)
    result = json.loads((Path(out) / "summary.json").read_text())
    result["index"] = str(index)
    return result
