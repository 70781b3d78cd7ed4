"""What ``vlsae zeroshot`` writes: predictions.csv, results.json, and an offline page with the
accuracy-vs-λ curves (PNG beside index.html)."""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from vlsae.files import atomic_write_text

from evals.zeroshot.protocol import AttributeResult


def predictions_csv(keys: list[str], splits: list[str], attribute: str, classes: list[str], truth: Tensor,
                    plain: Tensor, enhanced: Tensor, buffer: io.StringIO | None = None) -> io.StringIO:
    """Rows ``key, split, attribute, true, plain, enhanced`` (class names) appended to ``buffer``."""
    buffer = buffer or io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if buffer.tell() == 0:
        writer.writerow(["key", "split", "attribute", "true", "plain", "enhanced"])
    for i, key in enumerate(keys):
        writer.writerow([key, splits[i], attribute, classes[int(truth[i])], classes[int(plain[i])],
                         classes[int(enhanced[i])]])
    return buffer


def curve_figure(folder: Path, results: list[AttributeResult], lambdas: list[float], name: str = "accuracy_vs_lambda.png") -> str:
    """One panel per attribute: validation (dashed) and test (solid) accuracy of each variant against λ,
    the plain accuracy (λ = 0) as a grey line and the validation-chosen λ marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.2), squeeze=False)
    colours = {"concept": "#4c72b0", "decoder": "#dd8452"}
    for ax, result in zip(axes[0], results):
        for variant, curve in result.curves.items():
            colour = colours.get(variant, "#55a868")
            ax.plot(lambdas, [100 * v for v in curve["test"]], "-o", ms=3, color=colour, label=f"{variant} test")
            ax.plot(lambdas, [100 * v for v in curve["val"]], "--", color=colour, alpha=0.6, label=f"{variant} val")
        ax.axhline(100 * result.plain_test, color="grey", lw=1, label="plain test")
        ax.axvline(result.lam, color="black", lw=0.8, ls=":", label=f"chosen λ {result.lam:g}")
        ax.set_title(f"{result.attribute} ({result.classes} classes)")
        ax.set_xlabel("λ (weight of the concept term)")
        ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def render_page(data: dict[str, Any], figure: str) -> str:
    """index.html from results.json's content."""
    esc = html.escape
    rows = []
    for r in data["attributes"]:
        rows.append(f"<tr><td>{esc(r['attribute'])}</td><td>{r['classes']}</td><td>{r['n_val']} / {r['n_test']}</td>"
                    f"<td>{_pct(r['plain_test'])}</td><td>{_pct(r['enhanced_test'])}</td>"
                    f"<td><b>{100 * r['gain']:+.2f}</b> [{100 * r['gain_low']:+.2f}, {100 * r['gain_high']:+.2f}]</td>"
                    f"<td>{esc(r['variant'])}</td><td>{r['lam']:g}</td></tr>")
    settings = "".join(f"<li>{esc(k)}: {esc(str(v))}</li>" for k, v in data["settings"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>zero-shot with concept alignment</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}} img{{max-width:100%}}</style></head><body>
<h1>Zero-shot classification with concept-level alignment</h1>
<p>Plain: {esc(data['protocol'])}. Enhanced: the same, with each prompt's logit mixed with the SAE term,
(1 &minus; &lambda;)&middot;cos(image, text) + &lambda;&middot;term, before marginalising; the variant and &lambda; are
chosen on the validation split, the accuracies below are on the test split. Gain interval: paired bootstrap,
95 %.</p>
<table><tr><th>attribute</th><th>classes</th><th>val / test</th><th>plain (%)</th><th>enhanced (%)</th>
<th>gain (points) [95 % CI]</th><th>variant</th><th>&lambda;</th></tr>{''.join(rows)}</table>
<p>Mean gain over attributes: <b>{100 * data['mean_gain']:+.2f}</b> points.</p>
<img src="{esc(figure)}" alt="accuracy against lambda">
<h2>Settings</h2><ul>{settings}</ul>
<p>Files: <a href="results.json">results.json</a>, <a href="predictions.csv">predictions.csv</a>.</p>
</body></html>
"""


def write_outputs(folder: Path, results: dict[str, Any], attribute_results: list[AttributeResult],
                  lambdas: list[float], predictions: str) -> None:
    """results.json, predictions.csv, the figure and index.html into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "predictions.csv", predictions)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2))
    figure = curve_figure(folder, attribute_results, lambdas)
    atomic_write_text(folder / "index.html", render_page(results, figure))


def fidelity_figure(folder: Path, fidelity: dict[str, Any], name: str = "zero_shot_spliced.png") -> str:
    """Grouped bars per attribute: plain zero-shot accuracy, with the image / text / both reconstructions
    spliced in, and the zero-ablated floor (the concept report's downstream-fidelity figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attributes = list(fidelity["attributes"])
    bars = [("plain", "#4c72b0"), ("image", "#dd8452"), ("text", "#55a868"), ("both", "#c44e52"), ("floor", "#999999")]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(attributes), 3.2))
    x = np.arange(len(attributes))
    for i, (key, colour) in enumerate(bars):
        values = [fidelity["attributes"][a][key] for a in attributes]
        heights = [100 * v if v is not None else 0.0 for v in values]
        label = "zero-ablated" if key == "floor" else ("plain" if key == "plain" else f"{key} spliced")
        ax.bar(x + (i - 2) * width, heights, width, color=colour, label=label)
    ax.set_xticks(x, attributes)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"zero-shot with the SAE's reconstructions ({fidelity['records']} single-object pairs)")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name
