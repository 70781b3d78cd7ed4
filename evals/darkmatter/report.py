"""The dark-matter report: results.json, PNG figures and an offline index.html.

Figures: the linear-predictability bars (error R^2 and norm R^2 of every SAE
and modality) beside the FVU before and after adding the linear prediction;
for each SAE, the held-out squared error norms against their linear
prediction from x; for each pair of sizes, the two SAEs' per-row squared error
norms against each other (on the same rows: points near a line mean both fail
on the same inputs).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from vlsae.files import atomic_write_json, atomic_write_text

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} th:first-child,td:first-child{text-align:left}
.fig{max-width:100%} p.note{color:#444;max-width:60em}"""


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported only when a report is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any]) -> str:
    name = Path(row["sae"]).name
    return f"{name} ({row['arch']}, {row['n_latents']})" + (f" {row['modality']}" if row.get("modality") else "")


def bars_figure(folder: Path, results: list[dict[str, Any]], name: str = "predictability.png") -> str:
    plt = _pyplot()
    labels = [_label(r) for r in results]
    pos = np.arange(len(results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(results) + 2.2))
    left.barh(pos - 0.2, [r["error_r2"] for r in results], 0.4, label="error R² (vector)", color="#4c72b0")
    left.barh(pos + 0.2, [r["norm_r2"] for r in results], 0.4, label="‖error‖² R²", color="#dd8452")
    left.set_yticks(pos, labels)
    left.set_xlim(min(0.0, *(r["error_r2"] for r in results), *(r["norm_r2"] for r in results)), 1)
    left.set_xlabel("fraction predicted linearly from x (held-out)")
    left.legend(loc="lower right", fontsize=8)
    right.barh(pos - 0.2, [r["fvu"] for r in results], 0.4, label="SAE FVU", color="#937860")
    right.barh(pos + 0.2, [r["nonlinear_fvu"] for r in results], 0.4, label="nonlinear FVU", color="#55a868")
    right.set_yticks(pos, [""] * len(results))
    right.set_xlabel("FVU (held-out)")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def _scatter(ax: Any, a: np.ndarray, b: np.ndarray, xlabel: str, ylabel: str, title: str) -> None:
    ax.scatter(a, b, s=3, alpha=0.35, color="#4c72b0", rasterized=True)
    hi = float(max(np.quantile(a, 0.995), np.quantile(b, 0.995), 1e-12))
    ax.plot([0, hi], [0, hi], color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, hi)
    ax.set_ylim(min(0.0, float(np.quantile(b, 0.005))), hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def norms_figure(folder: Path, results: list[dict[str, Any]], name: str = "norms.png") -> str:
    plt = _pyplot()
    n = len(results)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.4 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        norms = r["norms"]
        _scatter(ax, norms["actual"], norms["predicted"], "‖x − x̂‖² (held-out rows)", "linear prediction from x",
                 f"{_label(r)}\nnorm R² {r['norm_r2']:.3f}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def sizes_figure(folder: Path, agreement: list[dict[str, Any]], name: str = "sizes.png") -> str:
    plt = _pyplot()
    n = len(agreement)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.4), squeeze=False)
    for ax, a in zip(axes.flat, agreement):
        small, large = a["n_latents"]
        _scatter(ax, a["_norms"]["small"], a["_norms"]["large"], f"‖error‖², {small} latents",
                 f"‖error‖², {large} latents",
                 f"{a['modality'] or ''} Pearson {a['pearson']:.3f}, Spearman {a['spearman']:.3f}".strip())
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def _plain(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("norms", "_norms")} for r in results]


def _table(results: list[dict[str, Any]]) -> str:
    head = ("SAE", "L0", "FVU", "error R²", "error R² pooled", "‖error‖² R²", "nonlinear FVU", "rows fit / test")
    body = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            html.escape(_label(r)), f"{r['l0']:.1f}", f"{r['fvu']:.4f}", f"{r['error_r2']:.3f}",
            f"{r['error_r2_pooled']:.3f}", f"{r['norm_r2']:.3f}", f"{r['nonlinear_fvu']:.4f}",
            f"{r['rows_fit']} / {r['rows_test']}")) + "</tr>" for r in results)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + body + "</table>"


def _agreement_table(agreement: list[dict[str, Any]]) -> str:
    if not agreement:
        return "<p>One SAE per modality: give two or more sizes to --sae to compare which rows they fail on.</p>"
    body = "".join(f"<tr><td>{html.escape(a['modality'] or '')} {a['n_latents'][0]} → {a['n_latents'][1]} latents</td>"
                   f"<td>{a['pearson']:.3f}</td><td>{a['spearman']:.3f}</td><td>{a['r2']:.3f}</td></tr>" for a in agreement)
    return ("<table><tr><th>sizes</th><th>Pearson</th><th>Spearman</th><th>R² (large from small)</th></tr>"
            + body + "</table>")


def write_report(folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the figures, results.json and index.html into ``folder``; returns the JSON-safe results."""
    folder.mkdir(parents=True, exist_ok=True)
    results, agreement = summary["results"], summary["agreement"]
    figures = [bars_figure(folder, results), norms_figure(folder, results)]
    if agreement:
        figures.append(sizes_figure(folder, agreement))
    plain = {**summary, "results": _plain(results), "agreement": _plain(agreement),
             "index": str(folder / "index.html"), "figures": figures}
    atomic_write_json(folder / "results.json", plain)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SAE dark matter</title>
<style>{STYLE}</style></head><body>
<h1>Dark matter of the SAE error</h1>
<p class="note">Data: {html.escape(str(summary['data']))}; rows per modality {html.escape(str(summary['rows']))};
ridge fits of the error e = x − x̂ on x, fitted on {1 - summary['held_out']:.0%} of the rows and scored on the
other {summary['held_out']:.0%}. A large error R² means much of what the SAE misses is a linear function of its
input (for example the shrinkage of an L1 penalty), which a larger dictionary of the same kind will not remove;
white noise gives about 0. Nonlinear FVU is the FVU left after adding the linear prediction back.</p>
{_table(results)}
<p><img class="fig" src="{figures[0]}" alt="linear predictability of the error"></p>
<h2>Per-row squared error norm and its linear prediction</h2>
<p><img class="fig" src="{figures[1]}" alt="error norms against their prediction"></p>
<h2>Across SAE sizes: do they fail on the same rows?</h2>
{_agreement_table(agreement)}
{f'<p><img class="fig" src="{figures[2]}" alt="error norms of two sizes"></p>' if agreement else ''}
</body></html>
"""
    atomic_write_text(folder / "index.html", page)
    return plain
