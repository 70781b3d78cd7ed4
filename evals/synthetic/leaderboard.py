"""Leaderboard: train several SAE architectures on one planted-feature suite at
equal width and equal L0 target, score each against the ground truth, print a
table and write the rows as JSON.

Equal L0: architectures with a ``k`` (TopK, BatchTopK, AbsTopK, Matryoshka,
MP, VL...) get ``k``; architectures steered by a sparsity penalty (ReLU + L1,
JumpReLU + L0) get a coefficient calibrated by full-length runs (log-log secant
on coefficient vs achieved test L0, starting from the arch's default; at most
``calibration_tries`` runs, stopping within 10% of the target) and the run
closest to the target is the one scored. Architectures with neither (``gba``:
target firing frequencies; ``topafa``: a per-input k from the code norm) choose
their own L0, and their row says what it came to. Short calibration runs were tried
first and mislead: JumpReLU's thresholds keep climbing long after a short run
ends, so its L0 at a third of the steps says little about the full run. Every
row reports the achieved test L0 and the calibration history, so the equality
(or how far it is off) is visible.

Multimodal suite: a single-stream SAE in the ``shared`` setting trains on the
union of image and text rows and is scored with its one decoder for both; in
the ``separate`` setting one single-stream SAE per modality is trained and
their same-index agreement should sit near chance. An SAE whose
``config.modalities`` is non-empty trains on paired dict batches and is scored
through ``encode(x, modality=)`` / ``decode(code, modality=)``.

Readout (``readout={"feature": J, "scale": c}``): every arch of the run gets the
linear readout y = <v_J, x> along planted feature J (the downstream "loss" of
g-SAE's synthetic test; its gradient is v_J), and feature J's codes are first
multiplied by ``c`` in the train and test data (the activations change by
exactly (c - 1) h_J v_J), so c < 1 plants a small-norm feature that drives the
readout. Rows then add ``readout_cos`` (feature J's best decoder cosine) and
the readout fidelity on the test rows. An arch that needs a readout (``gsae``)
gets feature 0 at its own norm when none is given.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from evals.synthetic.generators import PlantedData, generate, list_presets
from evals.synthetic.readout import needs_readout, plant_readout, readout_plan, readout_scores
from evals.synthetic.score import encode_decode, score_pair, score_sae
from vlsae.config import from_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_text
from vlsae.saes import create_sae, get_sae_class, is_multimodal_arch, list_archs
from vlsae.training import TensorSource, TrainConfig, init_seed, train
from vlsae.training.readout import Readout

# Per suite: sizes that finish the default architecture list in about a minute
# (hierarchical) to three (independent) on two CPU cores. The width defaults to
# default_width(data) unless a preset sets n_latents.
SUITE_DEFAULTS: dict[str, dict[str, Any]] = {
    "independent": dict(k=5, steps=1500, n_train=20_000, n_test=5_000, batch_size=512),
    "hierarchical": dict(k=2, steps=1500, n_train=20_000, n_test=5_000, batch_size=512),
    "bidirectional": dict(k=6, steps=1500, n_train=20_000, n_test=5_000, batch_size=512),
    "multimodal": dict(k=6, steps=1500, n_train=20_000, n_test=5_000, batch_size=512),
}
# Per suite and preset: overrides of the above.
PRESET_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("independent", "gba"): dict(k=12),
    ("hierarchical", "B"): dict(k=3),  # expected L0 2.44
}
# Main metric of each suite: (key, higher is better). The leaderboard sorts by it, then by MCC.
MAIN_METRIC: dict[str, tuple[str, bool]] = {
    "independent": ("frr_0.9", True),
    "hierarchical": ("mcc", True),
    "bidirectional": ("mcc", True),
    "multimodal": ("frr_0.9", True),
}
# Config fields that act as a sparsity penalty coefficient, by priority; the
# calibration starts from the arch's default value of that field.
PENALTY_FIELDS = ("l1_coef", "sparsity_coef", "l0_coef", "l1_coefficient", "l0_coefficient", "sparsity_coefficient")
# Config values the synthetic runs give an arch unless the caller overrides them.
# JumpReLU's thresholds climb from init_threshold by about lr per step (see its
# docstring), too slowly for runs of a few thousand steps from the default 0.01;
# inputs are scaled to E||x|| = sqrt(d_in), so planted activations are O(1).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"jumprelu": {"init_threshold": 0.5}}
# GBA adapts its biases every ``interval`` steps (50 in the paper, whose runs are far
# longer); a 1,500-step run would adapt 30 times, too few for the biases to settle.
ARCH_DEFAULTS.update({"gba": {"interval": 10}})

TABLE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "common": [("l0", "L0"), ("fvu", "FVU"), ("dead_fraction", "dead"), ("mmcs", "MMCS"),
               ("mmcs_reverse", "MMCS rev"), ("frr_0.8", "FRR.8"), ("frr_0.9", "FRR.9"), ("mcc", "MCC")],
    "independent": [("freq_match_error", "|log p/f|")],
    "hierarchical": [("frr_0.9_offset", "FRR.9 offs"), ("absorption_cos", "absorb cos"), ("absorption_rate", "absorb rate"),
                     ("parent_silent_rate", "parent silent"), ("hier_mse", "hier MSE"), ("flat_mse", "flat MSE")],
    "bidirectional": [("axis_recovery", "axes rec"), ("split_rate", "split"), ("latents_per_axis", "lat/axis"),
                      ("sign_accuracy", "sign acc"), ("readout_sign_accuracy", "readout sign"),
                      ("frr_0.9_unipolar", "FRR.9 uni")],
    "multimodal": [("frr_0.9_image", "FRR.9 img"), ("frr_0.9_text", "FRR.9 txt"),
                   ("same_index_agreement", "same idx"), ("multimodal_fraction", "multimodal")],
}
# Columns shown when the run has a readout (see the module docstring).
READOUT_COLUMNS = [("readout_cos", "readout cos"), ("readout_fvu", "readout FVU")]


# ------------------------------------------------------------------ archs
def _config_field_defaults(arch: str) -> dict[str, Any]:
    cls = get_sae_class(arch).config_class
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def penalty_field(arch: str) -> str | None:
    """The arch's sparsity-penalty coefficient field, or None when it has a ``k``."""
    fields = _config_field_defaults(arch)
    if "k" in fields:
        return None
    for name in PENALTY_FIELDS:
        if name in fields:
            return name
    return None


def default_archs(suite: str, preset: str) -> list[str]:
    """Every registered arch that fits the suite: single-stream archs everywhere;
    multimodal archs only on the multimodal suite's shared setting (one width);
    archs that need a readout everywhere but the (paired) multimodal suite."""
    out = []
    for arch in list_archs():
        if is_multimodal_arch(arch) and not (suite == "multimodal" and preset == "shared"):
            continue
        if suite == "multimodal" and needs_readout(arch):
            continue
        out.append(arch)
    return out


# --------------------------------------------------------------- training
def _train_one(arch: str, d_in: int, n_latents: int, source: Any, sae_kw: dict[str, Any],
               steps: int, batch_size: int, seed: int, lr: float | None, device: str,
               train_options: dict[str, Any], readout: Readout | None = None) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(init_seed(seed))
    sae = create_sae(arch, d_in=d_in, n_latents=n_latents, **sae_kw)
    tc: dict[str, Any] = dict(progress=False, tensorboard=False, eval_rows=2048)
    tc.update(train_options)
    tc.update(steps=steps, batch_size=batch_size, seed=seed, device=device)
    if lr is not None:
        tc["lr"] = lr
    use = readout if readout is not None and getattr(sae, "trains_by_gradient", True) else None  # ITDA takes none
    result = train(sae, source, from_dict(TrainConfig, tc, where="train options"), readout=use)
    result.sae.to("cpu")
    return result.sae, dict(result.summary)


def _test_l0(sae: Any, x: torch.Tensor | dict[str, torch.Tensor]) -> float:
    if isinstance(x, dict):
        vals = [float((encode_decode(sae, v, m)[0] != 0).sum(1).float().mean()) for m, v in x.items()]
        return sum(vals) / len(vals)
    return float((encode_decode(sae, x)[0] != 0).sum(1).float().mean())


def calibrate_penalty(fit: Callable[[float], tuple[Any, float]], target: float, start: float,
                      tries: int = 4, tolerance: float = 0.1) -> tuple[float, Any, list[tuple[float, float]]]:
    """Find a penalty coefficient whose achieved L0 is near ``target``.

    fit(coef) -> (model, achieved L0). Log-log secant steps (L0 falls as the
    coefficient grows); the first step assumes L0 ~ coef^-1/2. Stops within
    ``tolerance`` (relative) or after ``tries`` fits. Returns the best
    coefficient, its model and the (coef, L0) history.
    """
    history: list[tuple[float, float]] = []
    models: list[Any] = []
    coef = start
    for _ in range(tries):
        model, l0 = fit(coef)
        history.append((coef, l0))
        models.append(model)
        if l0 > 0 and abs(l0 - target) / target <= tolerance:
            break
        if len(history) >= 2 and all(h[1] > 0 for h in history[-2:]) and history[-1][1] != history[-2][1] \
                and history[-1][0] != history[-2][0]:
            (c0, l0a), (c1, l0b) = history[-2], history[-1]
            slope = (math.log(l0b) - math.log(l0a)) / (math.log(c1) - math.log(c0))
            slope = min(slope, -0.2)  # L0 must fall with the coefficient; cap wild steps
            step = (math.log(target) - math.log(l0b)) / slope
        elif l0 <= 0:
            step = -math.log(10.0)  # nothing fires: much smaller penalty
        else:
            step = 2.0 * math.log(l0 / target)  # first guess: L0 ~ coef^-1/2
        step = max(min(step, math.log(30.0)), -math.log(30.0))
        coef = coef * math.exp(step)
    best = min(range(len(history)), key=lambda i: abs(math.log(max(history[i][1], 1e-3) / target)))
    return history[best][0], models[best], history


# ------------------------------------------------------------------ runner
def _defaults(suite: str, preset: str) -> dict[str, Any]:
    out = dict(SUITE_DEFAULTS[suite])
    out.update(PRESET_DEFAULTS.get((suite, preset), {}))
    return out


def default_width(data: PlantedData) -> int:
    """Default dictionary width: the number of planted features (the union of both
    modalities' concepts for the multimodal suite); for the bidirectional suite
    2 * n_axes + n_unipolar, so a non-negative SAE has room to split every axis
    into two latents and the comparison asks whether it does."""
    m = data.meta
    if data.suite == "multimodal":
        return m["n_shared"] + sum(m["n_private"].values())
    if data.suite == "bidirectional":
        return 2 * m["n_axes"] + m["n_unipolar"]
    return data.directions.shape[0]


def run_suite(suite: str, archs: list[str] | None = None, *, n_latents: int | None = None, k: int | None = None,
              steps: int | None = None, seed: int = 0, preset: str | None = None, n_train: int | None = None,
              n_test: int | None = None, noise: float = 0.0, batch_size: int | None = None, lr: float | None = None,
              device: str = "auto", options: dict[str, Any] | None = None,
              arch_options: dict[str, dict[str, Any]] | None = None, train_options: dict[str, Any] | None = None,
              calibration_tries: int = 5, readout: dict[str, Any] | None = None,
              seeds: int = 1, out: str | Path | None = None, overwrite: bool = False,
              show: bool = True) -> list[dict[str, Any]]:
    """Train and score each architecture on one suite; return one row per arch.

    suite/preset/noise/options: the data (:func:`evals.synthetic.generate`);
    archs: registry names (default: every registered arch that fits the suite);
    n_latents: width for every arch (default: :func:`default_width`); k: the L0
    target (TopK-family ``k``; penalty archs are calibrated to it);
    arch_options: extra config values per arch; train_options: extra
    :class:`vlsae.training.TrainConfig` fields (betas, b_dec_init, ...); readout: ``{"feature": J,
    "scale": c}``, the planted linear readout every arch gets (module docstring; default: feature 0
    at scale 1 when an arch needs one, else none); seeds: repeat the whole run for
    seeds seed..seed+seeds-1 (data and SAEs) and report means, with standard
    deviations under ``std`` and each seed's row under ``per_seed``;
    out: JSON path written atomically
    (an existing file is an error unless ``overwrite``); show: print the table.
    """
    presets = list_presets(suite)
    preset = presets[0] if preset is None else preset
    if preset not in presets:
        raise VlsaeError(f"unknown preset '{preset}' for suite '{suite}'; choose one of: {', '.join(presets)}")
    if out is not None and Path(out).exists() and not overwrite:
        raise VlsaeError(f"{out} exists; pass another --out or --overwrite to replace it")
    d = _defaults(suite, preset)
    steps = int(steps if steps is not None else d["steps"])
    k = int(k if k is not None else d["k"])
    batch_size = int(batch_size if batch_size is not None else d["batch_size"])
    n_train = int(n_train if n_train is not None else d["n_train"])
    n_test = int(n_test if n_test is not None else d["n_test"])
    if steps < 1 or k < 1 or batch_size < 1:
        raise VlsaeError(f"steps, k and batch_size must be positive, got {steps}, {k}, {batch_size}")
    data = generate(suite, seed=seed, n_train=n_train, n_test=n_test, preset=preset, noise=noise, **(options or {}))
    width = int(n_latents if n_latents is not None else d.get("n_latents") or default_width(data))
    if width < k:
        raise VlsaeError(f"n_latents ({width}) must be at least k ({k})")
    archs = list(archs) if archs else default_archs(suite, preset)
    for arch in archs:
        get_sae_class(arch)  # unknown names fail before any training
        if is_multimodal_arch(arch) and suite != "multimodal":
            raise VlsaeError(f"'{arch}' is a multimodal SAE; it needs the multimodal suite")
        if is_multimodal_arch(arch) and preset == "separate":
            raise VlsaeError(f"'{arch}' has one input width; the separate setting has two (use --preset shared)")

    if seeds < 1:
        raise VlsaeError(f"seeds must be >= 1, got {seeds}")
    plan = readout_plan(readout, archs, data)
    if plan is not None:
        data, planted_readout = plant_readout(data, plan["feature"], plan["scale"])
    stray = sorted(set(arch_options or {}) - set(archs))
    if stray:
        raise VlsaeError(f"SAE options given for '{stray[0]}', which is not among the archs run ({', '.join(archs)})")
    from_dict(TrainConfig, {**(train_options or {}), "steps": steps}, where="train options")  # fail before training
    settings = dict(suite=suite, preset=preset, seed=seed, seeds=seeds, n_latents=width, k=k, steps=steps,
                    batch_size=batch_size, lr=lr, n_train=n_train, n_test=n_test, noise=noise, options=options or {},
                    arch_options=arch_options or {}, train_options=train_options or {}, readout=plan)
    per_arch: dict[str, list[dict[str, Any]]] = {arch: [] for arch in archs}
    for s in range(seed, seed + seeds):
        if s != seed:  # a fresh dictionary and fresh samples per seed
            data = generate(suite, seed=s, n_train=n_train, n_test=n_test, preset=preset, noise=noise, **(options or {}))
            if plan is not None:
                data, planted_readout = plant_readout(data, plan["feature"], plan["scale"])
        for arch in archs:
            start = time.perf_counter()
            row = _run_arch(arch, data, width, k, steps, batch_size, s, lr, device,
                            (arch_options or {}).get(arch, {}), calibration_tries, train_options or {},
                            readout=(plan["feature"], planted_readout) if plan is not None else None)
            row["seconds"] = round(time.perf_counter() - start, 2)
            row["seed"] = s
            per_arch[arch].append(row)
            if show:
                _print_progress(row)
    rows = [runs[0] if seeds == 1 else aggregate_seeds(runs) for runs in per_arch.values()]
    key, higher = MAIN_METRIC[suite]
    rows.sort(key=lambda r: (_sort_value(r.get(key), higher), _sort_value(r.get("mcc"), True)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    if show:
        print_leaderboard(rows, suite, settings)
    if out is not None:
        write_results(out, settings, rows)
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _nanstd(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if len(vals) < 2:
        return float("nan")
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def aggregate_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several seeds' rows of one arch: the mean of every numeric metric
    (NaNs left out), its sample standard deviation under ``std``, the seeds' own rows
    under ``per_seed``. Non-numeric fields come from the first seed."""
    first = runs[0]
    row: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key, value in first.items():
        if key in ("train", "penalty", "config", "seed"):
            continue
        if _is_number(value):
            vals = [float(r[key]) for r in runs if _is_number(r.get(key))]
            row[key], std[key] = _nanmean(vals), _nanstd(vals)
        elif isinstance(value, dict) and all(_is_number(v) for v in value.values()):
            row[key] = {sub: _nanmean([float(r[key][sub]) for r in runs if sub in r.get(key, {})]) for sub in value}
        else:
            row[key] = value
    row["seeds"] = [r["seed"] for r in runs]
    row["std"] = std
    row["per_seed"] = runs
    return row


def _sort_value(value: Any, higher: bool) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    return -value if higher else value


def _run_arch(arch: str, data: PlantedData, width: int, k: int, steps: int, batch_size: int, seed: int,
              lr: float | None, device: str, extra: dict[str, Any], tries: int,
              train_options: dict[str, Any], readout: tuple[int, Readout] | None = None) -> dict[str, Any]:
    multimodal_sae = is_multimodal_arch(arch)
    row: dict[str, Any] = {"arch": arch, "n_latents": width, "l0_target": k}
    fields = _config_field_defaults(arch)
    kw = {key: v for key, v in ARCH_DEFAULTS.get(arch, {}).items() if key in fields}
    kw.update(extra)
    if multimodal_sae:
        kw.setdefault("modalities", list(data.modalities))
    if "k" in fields:
        kw.setdefault("k", k)
    penalty = penalty_field(arch)
    calibrate = penalty is not None and penalty not in kw
    separate = bool(data.modalities) and not multimodal_sae and data.meta["setting"] == "separate"

    def fit_all(kw_run: dict[str, Any]) -> tuple[Any, Any]:
        if separate:
            saes, summaries = {}, {}
            for m in data.modalities:
                saes[m], summaries[m] = _train_one(arch, data.train[m].shape[1], width, TensorSource(data.train[m]),
                                                   kw_run, steps, batch_size, seed, lr, device, train_options)
            return saes, summaries
        d_in, source = _source(data, multimodal_sae)
        return _train_one(arch, d_in, width, source, kw_run, steps, batch_size, seed, lr, device, train_options,
                          readout=readout[1] if readout is not None else None)

    def l0_of(models: Any) -> float:
        if separate:
            vals = [_test_l0(models[m], data.test[m]) for m in data.modalities]
            return sum(vals) / len(vals)
        return _test_l0(models, data.test)

    if calibrate:
        assert penalty is not None
        start = fields.get(penalty) or 1.0

        def fit(coef: float) -> tuple[Any, float]:
            trained = fit_all({**kw, penalty: coef})
            return trained, l0_of(trained[0])

        coef, (model, summary), history = calibrate_penalty(fit, float(k), float(start), tries=tries)
        row["penalty"] = {"field": penalty, "coef": coef, "history": [{"coef": c, "l0": v} for c, v in history]}
    else:
        model, summary = fit_all(kw)
    row["config"] = {key: v for key, v in kw.items() if key != "modalities"}
    if penalty is not None:
        row["config"][penalty] = row["penalty"]["coef"] if calibrate else kw[penalty]
    row["train"] = summary
    if separate:
        row["mode"] = "one SAE per modality"
        row.update(score_pair(model, data))
        return row
    if data.modalities:
        row["mode"] = "paired multimodal SAE" if multimodal_sae else "one SAE on image+text rows"
    row.update(score_sae(model, data))
    if readout is not None:
        row.update(readout_scores(model, data, *readout))
    return row


def _source(data: PlantedData, multimodal_sae: bool) -> tuple[int, Any]:
    if not data.modalities:
        return data.train.shape[1], TensorSource(data.train)
    widths = set(data.d_in.values())  # type: ignore[union-attr]
    if len(widths) != 1:
        raise VlsaeError("a single SAE on both modalities needs equal widths (the shared setting)")
    if multimodal_sae:
        return widths.pop(), TensorSource(dict(data.train))
    return widths.pop(), TensorSource(torch.cat([data.train[m] for m in data.modalities]))


# ------------------------------------------------------------------ output
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _print_progress(row: dict[str, Any]) -> None:
    from rich.console import Console
    Console(stderr=True).print(f"[dim]{row['arch']}: L0 {_fmt(row.get('l0'))}, FVU {_fmt(row.get('fvu'))}, "
                               f"{row['seconds']:.1f} s[/dim]")


def _seed_text(settings: dict[str, Any]) -> str:
    n, s = settings.get("seeds", 1) or 1, settings.get("seed")
    return f"seed={s}" if n == 1 else f"mean±sd over seeds {s}..{s + n - 1}"


def print_leaderboard(rows: list[dict[str, Any]], suite: str, settings: dict[str, Any] | None = None) -> None:
    """A rich table of the rows, in their order, with the suite's columns."""
    from rich.console import Console
    from rich.table import Table

    settings = settings or {}
    key, higher = MAIN_METRIC[suite]
    title = (f"{suite} ({settings.get('preset', '')}): n_latents={settings.get('n_latents')}, "
             f"L0 target={settings.get('k')}, steps={settings.get('steps')}, " + _seed_text(settings) + "; "
             f"sorted by {key} ({'higher' if higher else 'lower'} is better)")
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("arch")
    columns = TABLE_COLUMNS["common"] + TABLE_COLUMNS[suite]
    columns += [c for c in READOUT_COLUMNS if any(c[0] in r for r in rows)]
    for _, label in columns:
        table.add_column(label, justify="right")
    table.add_column("s", justify="right")
    for row in rows:
        std = row.get("std", {})
        cells = [_fmt(row.get(k)) + (f"±{std[k]:.2f}" if _is_number(std.get(k)) and not math.isnan(std[k]) else "")
                 for k, _ in columns]
        table.add_row(str(row.get("rank", "")), row["arch"], *cells, _fmt(row.get("seconds")))
    console = Console()
    if not console.is_terminal:  # a file or a pipe: do not squeeze the columns into 80 characters
        console = Console(width=220)
    console.print(table)


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(path: str | Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write {"settings", "rows"} as strict JSON (NaN -> null), atomically."""
    payload = {"settings": _plain(settings), "rows": _plain(rows)}
    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
