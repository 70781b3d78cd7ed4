"""The concept report's page: concept cards (thumbnails, captions, the planted value a latent stands
for) and the index.html that holds them, the headline figures and the planted-value table.

Everything is escaped here, since captions and titles are user data; the page
is self-contained apart from the PNG files beside it.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from evals.concepts.pairs import PairActivations
from evals.planted import LatentRole
from vlsae.concepts import ConceptSummary

THUMBNAIL = 64
CARD_IMAGES = 8
CARD_CAPTIONS = 6


def _card_modalities(summary: ConceptSummary) -> tuple[str, str]:
    """(the modality whose top rows give a card's images, the one whose top rows give its captions)."""
    mods = summary.modalities
    return mods[0], mods[1] if len(mods) > 1 else mods[0]


def choose_card_latents(summary: ConceptSummary, roles: dict[int, LatentRole], n_cards: int) -> list[int]:
    """Up to ``n_cards`` living latents, most often firing first, those some planted value picked
    ahead of the rest (they are the ones the planted table refers to)."""
    rate = sum(summary.fire_rate[m] for m in summary.modalities)
    order = [int(i) for i in torch.argsort(rate, descending=True) if rate[i] > 0]
    planted = [i for i in order if i in roles]
    return (planted + [i for i in order if i not in roles])[:max(0, n_cards)]


def card_image_rows(summary: ConceptSummary, latents: list[int]) -> list[int]:
    """The pair rows whose images the cards of ``latents`` show (to read just those from the shards)."""
    first, _ = _card_modalities(summary)
    rows = {r for latent in latents for r in summary.top_rows[first][latent].tolist()[:CARD_IMAGES] if r >= 0}
    return sorted(rows)


def build_cards(folder: Path, summary: ConceptSummary, pairs: PairActivations, roles: dict[int, LatentRole],
                latents: list[int], images: dict[str, Image.Image]) -> list[dict[str, Any]]:
    """One card per latent; thumbnails go to ``folder``/img. ``images`` maps pair keys to images
    (a pair whose image is missing is left off its card)."""
    first, second = _card_modalities(summary)
    cards = []
    for latent in latents:
        thumbnails = []
        for row in summary.top_rows[first][latent].tolist()[:CARD_IMAGES]:
            image = images.get(pairs.keys[row]) if row >= 0 else None
            if image is None:
                continue
            name = f"img/{row}.png"
            if not (folder / name).exists():
                image.resize((THUMBNAIL, THUMBNAIL)).save(folder / name)
            thumbnails.append(name)
        captions = [pairs.captions[row] for row in summary.top_rows[second][latent].tolist() if row >= 0]
        role = roles.get(latent)
        cards.append({"latent": latent, "images": thumbnails, "captions": captions[:CARD_CAPTIONS],
                      "modality_score": float(summary.modality_score[latent]),
                      "agreement": float(summary.agreement[latent]),
                      "fire_rate": {m: float(summary.fire_rate[m][latent]) for m in summary.modalities},
                      "planted": role.label() if role else "", "catch_all": bool(role and role.catch_all)})
    return cards


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _planted_section(data: dict[str, Any]) -> str:
    """Headline (same-index rate beside the exclusive rate) and one table row per planted value."""
    planted = data.get("planted") or {}
    if not planted:
        return ""
    esc = html.escape
    encodable = ""
    if "encodable_values" in planted:
        encodable = (f" {planted['encodable_values']} values are encodable (a logistic probe on the activations, "
                     f"fit on half the pairs, reaches AUROC &ge; 0.9 on the other half, on both sides); "
                     f"{planted['encodable_same_and_both_ge_0.9']} of them have the same latent with AUROC &ge; 0.9 "
                     f"on both sides.")
    headline = (f"<p>{planted['values']} attribute values. The best latent on images and on captions is the same "
                f"index for <b>{planted['same_index_rate']:.0%}</b> of them; <b>"
                f"{planted['exclusive_same_index_rate']:.0%}</b> exclusively, counting a value only when no value "
                f"with a higher AUROC has the same best latent ({planted['catch_all_latents']} latents are the best "
                f"latent of several values). Mean AUROC {planted['image_auroc']:.3f} (images), "
                f"{planted['text_auroc']:.3f} (captions).{encodable}</p>")
    rows = []
    for m in data["planted_matches"]:
        kind = "same" if m["exclusive_same"] else "shared" if m["image_latent"] == m["text_latent"] else "diff"
        rows.append(f"<tr class='{kind}'><td>{esc(m['value'])}</td>"
                    f"<td>{m['image_latent']}</td><td>{m['image_auroc']:.3f}</td><td>{_number(m.get('ceiling_image'))}</td>"
                    f"<td>{m['text_latent']}</td><td>{m['text_auroc']:.3f}</td><td>{_number(m.get('ceiling_text'))}</td>"
                    f"<td>{'yes' if m['exclusive_same'] else 'no'}</td></tr>")
    return ("<h2>Planted concepts</h2>" + headline +
            "<table><tr><th>value</th><th>image latent</th><th>AUROC</th><th>probe ceiling</th>"
            "<th>caption latent</th><th>AUROC</th><th>probe ceiling</th><th>exclusive same latent</th></tr>" +
            "".join(rows) + "</table>")


def _fidelity_section(data: dict[str, Any]) -> str:
    """Zero-shot accuracy with the SAE's reconstructions spliced in, beside FVU (CLIP sources only)."""
    fidelity = data.get("zero_shot_fidelity")
    if not fidelity:
        return ""

    def pct(value: float | None) -> str:
        return "&ndash;" if value is None else f"{100 * value:.1f}"

    rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{pct(r['plain'])}</td><td>{pct(r['image'])}</td><td>{pct(r['text'])}"
                   f"</td><td>{pct(r['both'])}</td><td>{pct(r['floor'])}</td></tr>"
                   for a, r in fidelity["attributes"].items())
    recovered = fidelity.get("mean_recovered")
    headline = "" if recovered is None else f" Mean fraction of the accuracy recovered: <b>{recovered:.3f}</b>."
    return ("<h2>Downstream fidelity: zero-shot with the reconstruction spliced in</h2>"
            f"<p>Zero-shot accuracy (%) on the {fidelity['records']} single-object pairs, plain and with the image "
            "embeddings, the prompt embeddings, or both replaced by their reconstructions (zero-ablated: an all-zero "
            f"image embedding).{headline}</p><table><tr><th>attribute</th><th>plain</th><th>image spliced</th>"
            f"<th>text spliced</th><th>both</th><th>zero-ablated</th></tr>{rows}</table>")


def _card_html(card: dict[str, Any]) -> str:
    esc = html.escape
    images = "".join(f"<img src='{esc(i)}'>" for i in card["images"])
    captions = "".join(f"<li>{esc(t)}</li>" for t in card["captions"])
    label = f" &middot; planted: <b>{esc(card['planted'])}</b>" if card["planted"] else ""
    rates = ", ".join(f"{esc(m)} {r:.1%}" for m, r in card["fire_rate"].items())
    kind = "card catch-all" if card["catch_all"] else "card"
    return (f"<div class='{kind}'><h3>latent {card['latent']}{label}</h3><p>modality score {card['modality_score']:.2f}"
            f" &middot; agreement {card['agreement']:.2f} &middot; fires on {rates}</p><div class='imgs'>{images}</div>"
            f"<ul>{captions}</ul></div>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px} tr.same td{background:#e8f5e9} tr.shared td{background:#fffde7}
tr.diff td{background:#fff3e0} .card{border:1px solid #ddd;border-radius:6px;padding:8px;margin:8px 0}
.card.catch-all{border-color:#e0a000} .imgs img{width:64px;height:64px;margin:2px;image-rendering:pixelated}
.fig{max-width:100%;margin:8px} h3{margin:0}"""


def render_page(data: dict[str, Any], figures: list[str], cards: list[dict[str, Any]]) -> str:
    """index.html from the report's summary (``data``, as in summary.json), its figures and cards."""
    esc = html.escape
    zf = data.get("zf") or {}
    rows = "".join(f"<tr><td>{esc(m)}</td><td>{data['fvu'][m]:.4f}</td><td>{data['l0'][m]:.2f}</td>"
                   + (f"<td>{zf[m]['median_eps_lbo']:.3g}</td><td>{zf[m]['over_activated']:.0%}</td>"
                      f"<td>{zf[m]['under_activated']:.0%}</td>" if m in zf else "<td></td><td></td><td></td>")
                   + "</tr>" for m in data["fvu"])
    figs = "".join(f"<img class='fig' src='{esc(f)}'>" for f in figures)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{esc(data['title'])}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{esc(data['title'])}</h1>\n"
            f"<p>{data['pairs']} pairs &middot; {data['n_latents']} latents &middot; {data['alive_fraction']:.0%} alive "
            f"&middot; {data['multimodal_fraction']:.0%} multimodal (modality score in [0.2, 0.8]) &middot; mean "
            f"image-caption concept overlap {data['mean_pair_overlap']:.3f}</p>\n"
            f"<h2>Reconstruction and sparsity</h2><table><tr><th>modality</th><th>FVU</th><th>L0</th>"
            f"<th title='median epsilon_LBO of the ZF plot (top-AFA): 0 = code norm equals input norm'>median &epsilon;<sub>LBO</sub></th>"
            f"<th>over-activated</th><th>under-activated</th></tr>{rows}</table>\n"
            f"{_fidelity_section(data)}{_planted_section(data)}<h2>Figures</h2>{figs}<h2>Concept cards</h2>"
            f"{''.join(_card_html(c) for c in cards)}</body></html>")
