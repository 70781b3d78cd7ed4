"""What an OOD run writes: ``scores.csv`` (one row per sample), figures and ``index.html``.

``results.json`` is written by :func:`evals.ood.run.run_ood` after these, so
its presence means a finished report. The page is self-contained apart from the
PNG files beside it, and escapes everything that comes from the user (set names,
paths).
"""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import Any

import torch

from vlsae.files import atomic_write_text

from evals.ood.data import EmbeddingSet
from evals.ood.figures import histogram_figure, roc_figure
from evals.ood.metrics import LOWER_IS_BETTER

TABLES = (("auroc", "AUROC (higher is better)"),
          ("fpr95", "FPR@95 %TPR, classic: OOD accepted when 95 % of ID is kept (lower is better)"),
          ("fpr95_ood", "FPR@95 %TPR, OpenOOD v1.5: ID flagged when 95 % of OOD is caught (lower is better)"),
          ("aupr_in", "AUPR-In, ID positive (higher is better)"),
          ("aupr_out", "AUPR-Out, OOD positive (higher is better)"))


def scores_csv(sets: dict[str, EmbeddingSet], scores: dict[str, dict[str, torch.Tensor]]) -> str:
    """key, set, one column per score; the ID rows first, then each OOD set."""
    names = list(scores["id"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "set", *names])
    for set_name, by_score in scores.items():
        columns = [by_score[n].tolist() for n in names]
        for row, key in enumerate(sets[set_name].keys):
            writer.writerow([key, set_name, *(f"{column[row]:.7g}" for column in columns)])
    return buffer.getvalue()


def _cell(entry: dict[str, Any], metric: str, is_best: bool) -> str:
    value = f"{entry[metric]:.3f}"
    ci = entry.get(f"{metric}_ci")
    interval = f' <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>' if ci else ""
    return f"<td><b>{value}</b>{interval} ★</td>" if is_best else f"<td>{value}{interval}</td>"


def metric_table(results: dict[str, Any], metric: str) -> str:
    """Rows: scores (SAE first); columns: OOD sets; the best of each column marked."""
    metrics = results["metrics"]
    sets = list(metrics)
    names = list(results["scores"])
    pick = min if metric in LOWER_IS_BETTER else max
    best = {s: pick(metrics[s][n][metric] for n in names) for s in sets}
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sets)
    rows = []
    for name in names:
        kind = results["scores"][name]["kind"]
        cells = "".join(_cell(metrics[s][name], metric, metrics[s][name][metric] == best[s]) for s in sets)
        rows.append(f'<tr class="{kind}"><td title="{html.escape(results["scores"][name]["summary"])}">'
                    f"{html.escape(name)}</td><td>{kind}</td>{cells}</tr>")
    return f"<table><tr><th>score</th><th>kind</th>{head}</tr>{''.join(rows)}</table>"


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """Per OOD set: the best SAE score against the best baseline, with the paired AUROC-difference interval."""
    lines = []
    for set_name, entry in results["best"].items():
        if "verdict" not in entry:
            lines.append(f"{set_name}: best score {entry['score']} (AUROC {entry['auroc']:.3f})")
            continue
        ci = entry["sae_minus_baseline_ci"]
        interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        word = {"sae": "SAE ahead", "baseline": "baseline ahead", "tie": "tie (interval holds 0)"}[entry["verdict"]]
        lines.append(f"{set_name}: best SAE score {entry['best_sae']} {entry['best_sae_auroc']:.3f} vs best baseline "
                     f"{entry['best_baseline']} {entry['best_baseline_auroc']:.3f}: difference "
                     f"{entry['sae_minus_baseline']:+.3f}{interval}, {word}")
    return lines


def index_page(results: dict[str, Any], figures: dict[str, list[str]]) -> str:
    sets = results["sets"]
    described = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(str(s['source']))}, {s['rows']} rows</li>"
                        for name, s in sets.items())
    skipped = "".join(f"<li>{html.escape(n)}: {html.escape(w)}</li>" for n, w in results["skipped"].items())
    skipped = f"<p>Scores not computed:</p><ul>{skipped}</ul>" if skipped else ""
    verdicts = "".join(f"<li>{html.escape(line)}</li>" for line in verdict_lines(results))
    tables = "".join(f"<h3>{html.escape(title)}</h3>{metric_table(results, metric)}" for metric, title in TABLES)
    images = "".join(f'<h3>id vs {html.escape(s)}</h3>' + "".join(f'<img src="{html.escape(f)}" alt="{html.escape(f)}">'
                                                                   for f in names)
                     for s, names in figures.items())
    cpu = results.get("cpu_seconds", {})
    seconds = ", ".join(f"{k} {v:.1f} s (CPU {cpu.get(k, 0):.1f} s)" for k, v in results.get("seconds", {}).items())
    conventions = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in results["conventions"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vlsae ood</title>
<style>body{{font-family:sans-serif;max-width:80em;margin:2em auto}}td,th{{padding:.25em .7em;border-bottom:1px solid #ddd;
text-align:left}}tr.sae td:first-child{{color:#1b5e20}}.ci{{color:#777;font-size:85%}}img{{max-width:100%;margin:.5em 0}}</style>
</head><body>
<h1>OOD detection from SAE concepts</h1>
<p>SAE <code>{html.escape(results['sae'])}</code> ({html.escape(str(results['arch']))}, {results['n_latents']} latents)
on <code>{html.escape(results['model'])}</code> final image embeddings; class-conditional scores use the zero-shot
predicted <b>{html.escape(str(results['attribute']))}</b> ({results['head']['prompts']} prompts), never a data label.</p>
<ul>{described}</ul>
<h2>Best SAE score against the best raw-embedding baseline</h2><ul>{verdicts}</ul>
{skipped}
<h2>Metrics</h2><p>Every score is "higher = more in-distribution"; ★ marks the best of each column;
brackets are 95 % bootstrap intervals. Green rows read the SAE.</p>
{tables}
<h2>Figures</h2>{images}
<h2>Conventions</h2><ul>{conventions}</ul>
<p>Time: {html.escape(seconds)}. Per-sample scores: <a href="scores.csv">scores.csv</a>; all figures:
<a href="results.json">results.json</a>.</p>
</body></html>
"""


def write_report(out: Path, results: dict[str, Any], sets: dict[str, EmbeddingSet],
                 scores: dict[str, dict[str, torch.Tensor]], figures: bool = True) -> None:
    """scores.csv, the figures (when asked) and index.html, each written atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.csv", scores_csv(sets, scores))
    drawn: dict[str, list[str]] = {}
    if figures:
        kinds = {name: entry["kind"] for name, entry in results["scores"].items()}
        id_scores = {name: values.numpy() for name, values in scores["id"].items()}
        for set_name in results["metrics"]:
            ood_scores = {name: values.numpy() for name, values in scores[set_name].items()}
            aurocs = {name: entry["auroc"] for name, entry in results["metrics"][set_name].items()}
            drawn[set_name] = [roc_figure(out, set_name, id_scores, ood_scores, kinds, aurocs),
                               histogram_figure(out, set_name, id_scores, ood_scores, kinds, aurocs)]
    atomic_write_text(out / "index.html", index_page(results, drawn))
