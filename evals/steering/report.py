"""The steering pages: ``index.html`` of a steering run (the grid and the judges' rates per strength) and
of an attribute discovery (value -> latents, with selectivity, flip rate and top prompts).

Static pages that open offline: the PNGs lie beside them; every user string is escaped.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
         "th{background:#f3f3f3}img.grid{image-rendering:pixelated;max-width:100%}code{background:#f5f5f5}")


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.0f}%"


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "</body></html>\n")


def _rates_table(rows: Sequence[dict[str, Any]], judges: Sequence[str], target: str) -> str:
    head = "<tr><th>strength</th><th>change vs unsteered</th>"
    for judge in judges:
        head += f"<th>{html.escape(judge)}: {html.escape(target) if target else 'target'}</th>"
        head += f"<th>{html.escape(judge)}: kept (unsteered)</th>"
    lines = [head + "</tr>"]
    for row in rows:
        cells = f"<td>{row['strength']:g}</td><td>{row['change']:.3f}</td>"
        for judge in judges:
            rates = row["judges"].get(judge, {})
            kept = ", ".join(f"{a} {_pct(v)} ({_pct(rates.get('preserve_unsteered', {}).get(a))})"
                             for a, v in rates.get("preserve", {}).items())
            cells += f"<td>{_pct(rates.get('flip'))}</td><td>{kept}</td>"
        lines.append(f"<tr>{cells}</tr>")
    return "<table>" + "\n".join(lines) + "</table>"


def steer_page(result: dict[str, Any], grid: str) -> str:
    """The page of one steering run (``result`` as ``results.json`` holds it)."""
    target = result.get("target") or ""
    judges = result.get("judges", [])
    body = [f"<p>Prompt <code>{html.escape(result['prompt'])}</code>, feature <code>{html.escape(result['feature'])}</code>, "
            f"mode <b>{html.escape(result['mode'])}</b>, {result['seeds']} seeds, SAE <code>{html.escape(result['sae'])}</code> "
            f"at <code>{html.escape(result['hook'])}</code> of <code>{html.escape(result['pipeline'])}</code>.</p>",
            f"<p><img class='grid' src='{html.escape(grid)}' alt='steering grid'></p>",
            "<p>Columns: unsteered, then each strength; rows: seeds (the same noise across a row). "
            "Per-image PNGs are in <code>images/</code>.</p>",
            "<h2>Judges</h2>"
            f"<p>Target: how often a judge reads <code>{html.escape(target or 'the target')}</code>; kept: how often it "
            "still reads the prompt's other attributes (unsteered rate in brackets); change: mean absolute pixel "
            "difference to the unsteered image of the same seed.</p>",
            _rates_table(result["strengths"], judges, target)]
    latents = result.get("latents") or []
    if latents:
        rows = "".join(f"<tr><td>{d['latent']}</td><td>{d['scale']:.3f}</td><td>{d['selectivity']:.4f}</td>"
                       f"<td>{html.escape(' | '.join(d.get('top_prompts', [])))}</td></tr>" for d in latents)
        body.append("<h2>Latents</h2><table><tr><th>latent</th><th>usual activation</th><th>selectivity</th>"
                    f"<th>top prompts</th></tr>{rows}</table>")
    timing = result.get("seconds", {})
    if timing:
        body.append("<p>Time: " + ", ".join(f"{html.escape(k)} {v} s" for k, v in timing.items()) + "</p>")
    return _page("Steering: " + result["feature"], body)


def discovery_page(result: dict[str, Any]) -> str:
    """The page of an attribute discovery: one row per (value, latent)."""
    lines = ["<tr><th>value</th><th>latent</th><th>flip rate (gain over unsteered)</th><th>selectivity</th>"
             "<th>usual activation</th><th>top prompts (its name)</th></tr>"]
    for entry in result["table"]:
        for i, latent in enumerate(entry["latents"]):
            value = html.escape(entry["value"]) if i == 0 else ""
            lines.append(f"<tr><td>{value}</td><td>{latent['latent']}</td><td>{_pct(latent['flip_rate'])}</td>"
                         f"<td>{latent['selectivity']:.4f}</td><td>{latent['scale']:.3f}</td>"
                         f"<td>{html.escape(' | '.join(latent['top_prompts']))}</td></tr>")
    judge = result.get("judge") or "none"
    settings = result.get("flip_settings", {})
    body = [f"<p>Attribute <b>{html.escape(result['attribute'])}</b>, SAE <code>{html.escape(result['sae'])}</code> at "
            f"<code>{html.escape(result['hook'])}</code> of <code>{html.escape(result['pipeline'])}</code>, "
            f"{result['prompts']} prompts. Flip rate: judge <b>{html.escape(judge)}</b>, each candidate added at strength "
            f"{settings.get('strength', '')} ({html.escape(str(settings.get('passes', '')))}) to neutral prompts "
            f"({settings.get('seeds', '')} seeds each), less the unsteered rate. Selectivity: SAeUron's normalised "
            "mean activation on prompts naming the value minus on the rest.</p>",
            "<table>" + "\n".join(lines) + "</table>"]
    return _page(f"Attribute discovery: {result['attribute']}", body)


__all__ = ["steer_page", "discovery_page"]
