"""The filter's report page: what was kept, what was dropped, and why, as an offline index.html.

The page shows the run (scorer, model, SAE, counts, threshold, lost pairs),
the score histogram with the cut (split into clean and corrupted pairs when
the data carries ShapesWorld's flags, with the detection AUROC and the kept
set's precision and recall), and the highest- and lowest-scoring pairs as
image + caption cards, so a user sees what the filter drops. The images are
the records' own bytes, written beside the page; every text is escaped.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from multimodal.filtering import FilterResult
from vlsae.files import atomic_write_json, atomic_write_text

from evals.filtering.metrics import detection

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} .cards{display:flex;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;margin:4px;width:220px}
.card img{width:96px;height:96px;image-rendering:pixelated;display:block} .kept{border-color:#4caf50}
.dropped{border-color:#e57373} .tag{font-size:80%;padding:0 4px;border-radius:3px;background:#eee}
.fig{max-width:100%}"""


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported only when a report is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram_figure(folder: Path, result: FilterResult, name: str = "scores.png") -> str:
    """The score histogram with the keep threshold; clean and corrupted pairs stacked when known."""
    plt = _pyplot()
    stats = result.stats
    edges = np.asarray(stats.edges)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if result.truth is not None:
        scores, clean, _ = result.truth
        clipped = np.clip(scores, edges[0], edges[-1])
        ax.hist([clipped[clean], clipped[~clean]], bins=edges, stacked=True, color=["#4c72b0", "#dd8452"],
                label=["clean", "corrupted"])
        ax.legend()
    else:
        ax.stairs(stats.histogram, edges, fill=True, color="#4c72b0")
    ax.axvline(result.summary["threshold"], color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"{result.summary['scorer']} score (kept: right of the dashed line)")
    ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def _card(folder: Path, card: dict[str, Any], index: int) -> str:
    esc = html.escape
    image = ""
    if card.get("image") is not None:
        name = f"img/{card['kind']}-{index}.{card['ext']}"
        (folder / "img").mkdir(exist_ok=True)
        (folder / name).write_bytes(card["image"])
        image = f"<img src='{esc(name)}' alt='{esc(card['key'])}'>"
    state = "kept" if card["kept"] else "dropped"
    label = ""
    if card.get("clean") is not None:  # ground truth, shown to the reader; the scorer never saw it
        label = f" <span class='tag'>{'clean' if card['clean'] else 'corrupted'}</span>"
    return (f"<div class='card {state}'>{image}<div>{esc(card['caption'])}</div><div><b>{card['score']:.4g}</b> "
            f"&middot; {state}{label}</div><div class='tag'>{esc(card['key'])}</div></div>")


def _run_table(summary: dict[str, Any]) -> str:
    esc = html.escape
    sae = summary.get("sae") or {}
    counts = summary["counts"]
    lost = summary.get("lost") or {}
    rows = [("scorer", summary["scorer"]), ("model", summary.get("model") or "–"),
            ("hook / tokens", f"{summary.get('hook') or '–'} / {summary.get('tokens') or '–'}"),
            ("SAE", f"{sae.get('path')} ({sae.get('arch')}, {sae.get('n_latents')} latents)" if sae else "–"),
            ("pairs scored", counts["pairs_scored"]), ("kept", f"{counts['kept']} ({counts['kept_fraction']:.1%})"),
            ("dropped", counts["dropped"]),
            ("rule", f"keep {summary['keep']:g} of the pairs" if summary.get("keep") is not None
             else f"score >= {summary.get('threshold_given')}"),
            ("threshold score", f"{summary['threshold']:.6g}"),
            ("lost to damaged shards", f"{lost.get('pairs', 0)} ({lost.get('fraction', 0):.2%})"),
            ("scoring", f"{summary['timing'].get('pairs_per_second') or '–'} pairs/s over "
                        f"{summary['timing'].get('pairs', 0)} pairs scored in this run")]
    return "<table>" + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows) + "</table>"


def write_filter_report(folder: Path, result: FilterResult) -> dict[str, Any]:
    """Write ``folder/index.html`` (+ scores.png, img/, report.json); returns the detection figures (or {})."""
    folder = Path(folder)
    esc = html.escape
    figure = histogram_figure(folder, result)
    found: dict[str, Any] = {}
    section = ""
    if result.truth is not None:
        scores, clean, kept = result.truth
        found = detection(scores, clean, kept)
        auroc = "–" if found["auroc"] is None else f"{found['auroc']:.3f}"
        precision = "–" if found.get("precision") is None else f"{found['precision']:.1%}"
        recall = "–" if found.get("recall") is None else f"{found['recall']:.1%}"
        section = (f"<h2>Ground truth</h2><p>{found['n']} pairs carry ShapesWorld's <code>corrupted</code> flag "
                   f"({found['clean_fraction']:.1%} clean; the scorer never read it). Detection AUROC (clean vs "
                   f"corrupted) <b>{auroc}</b>; of the kept pairs {precision} are clean (precision), and {recall} of the "
                   f"clean pairs were kept (recall).</p>")
    cards: dict[str, list[str]] = {"highest": [], "lowest": []}
    for index, card in enumerate(result.cards):
        cards[card["kind"]].append(_card(folder, card, index))
    body = (f"<h1>Filter: {esc(result.summary['scorer'])}</h1>{_run_table(result.summary)}{section}"
            f"<h2>Scores</h2><img class='fig' src='{figure}'>"
            f"<h2>Highest-scoring pairs (kept first)</h2><div class='cards'>{''.join(cards['highest'])}</div>"
            f"<h2>Lowest-scoring pairs (dropped first)</h2><div class='cards'>{''.join(cards['lowest'])}</div>"
            f"<p>Files: <a href='filter.json'>filter.json</a>, <a href='scores.csv'>scores.csv</a> "
            f"(key, score, kept), kept shards <code>NNNNNN.tar</code>.</p>")
    atomic_write_text(folder / "index.html", f"<!doctype html><html><head><meta charset='utf-8'><title>filter "
                                             f"{esc(result.summary['scorer'])}</title><style>{STYLE}</style></head>"
                                             f"<body>{body}</body></html>")
    atomic_write_json(folder / "report.json", {"detection": found})
    return found

