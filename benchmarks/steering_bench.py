"""Steering benchmark on shapes-diffusion: flip tables for colour and shape, removal, baselines, cost.

    python benchmarks/steering_bench.py --sae runs/sd-text --seeds 8 --out steering-bench.json

For every (source -> target) pair of colours (and of shapes), "a SOURCE X" x
seeds images per arm and strength, read by shapes-clip, the CNN judge and the
pixel colour check (see :mod:`evals.steering.benchmark`). Prints markdown
tables: every arm and strength, then each arm at its best strength whose shape
(colour, for shape steering) rate stays within 10 points of the unsteered one
by the CNN judge, then the removal table and the cost of steered generation.

Not named ``steering.py``: a script in ``benchmarks/`` has this folder first on
``sys.path``, where a ``steering.py`` would shadow the ``steering`` package for
every other benchmark script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evals.steering.benchmark import (best_strength, generation_cost, pair_groups, raw_arm, removal_concept_arm,  # noqa: E402
                                      removal_groups, run_benchmark, sae_arm)
from evals.steering.judging import JudgePanel  # noqa: E402
from evals.steering.run import prepare  # noqa: E402
from steering.features import Feature, build_interventions  # noqa: E402
from steering.prompts import attribute_values  # noqa: E402


def _cell(judges: dict, judge: str, key: str) -> str:
    entry = judges.get(judge, {}).get(key)
    if not entry:
        return "-"
    low, high = entry["ci"]
    return f"{100 * entry['rate']:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def table(results, attribute: str, key: str) -> list[str]:
    other = "shape" if attribute == "colour" else "colour"
    judges = [j for j in ("clip", "cnn", "pixel") if any(j in r.judges and key in r.judges[j] for r in results)]
    kept_judges = [j for j in ("clip", "cnn") if any("kept" in r.judges.get(j, {}) for r in results)]
    head = (["arm", "strength"] + [f"{key} {j} %" for j in judges] + [f"{other} kept {j} %" for j in kept_judges]
            + [f"pairs ≥{80 if key == 'flip' else 90} % (cnn/clip)", "change", "background change", "s"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        share = "/".join(f"{100 * r.judges.get(j, {}).get(key, {}).get('pairs_at_bar', 0):.0f}"
                         for j in ("cnn", "clip") if key in r.judges.get(j, {}))
        cells = ([r.arm, f"{r.strength:g}"] + [_cell(r.judges, j, key) for j in judges]
                 + [_cell(r.judges, j, "kept") for j in kept_judges]
                 + [share or "-", f"{r.change:.3f}", f"{r.background_change:.4f}", f"{r.seconds:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True, help="text-encoder SAE run folder of shapes-diffusion (required)")
    parser.add_argument("--pipeline", default="shapes-diffusion", help="pipeline spec (default: shapes-diffusion)")
    parser.add_argument("--seeds", type=int, default=8, help="images per pair (default: 8)")
    parser.add_argument("--attributes", default="colour,shape,removal", help="what to run (default: colour,shape,removal)")
    parser.add_argument("--values", default="", help="comma-separated subset of values (default: all ten)")
    parser.add_argument("--add", default="2,4", help="strengths of sae add (default: 2,4)")
    parser.add_argument("--clamp", default="1,2", help="strengths of sae clamp (default: 1,2)")
    parser.add_argument("--concept", default="1,2", help="strengths of sae concept (default: 1,2)")
    parser.add_argument("--raw", default="0.5,1", help="strengths of the raw difference (default: 0.5,1)")
    parser.add_argument("--ablate", default="1,2", help="removal: strengths of sae ablate (default: 1,2)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="", help="write every result as JSON here (default: none)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    floats = lambda text: [float(v) for v in text.split(",") if v.strip()]  # noqa: E731
    chosen = [v.strip() for v in args.values.split(",") if v.strip()]

    def values_of(attribute: str) -> list[str] | None:
        """The chosen values of ``attribute`` (None: all); --values may mix colours and shapes."""
        mine = [v for v in chosen if v in attribute_values(attribute)]
        return mine or None
    start = time.perf_counter()
    setup = prepare(args.pipeline, args.sae)
    panel = JudgePanel.load()
    hooked, stats = setup.hooked, setup.stats
    print(f"# steering benchmark: {args.pipeline}, SAE {args.sae} at {hooked.point} ({hooked.n_latents} latents), "
          f"{args.seeds} seeds, {args.steps} steps; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} at start\n", flush=True)
    report: dict = {"sae": args.sae, "hook": hooked.point, "seeds": args.seeds}
    log = lambda line: print(f"  .. {line}", file=sys.stderr, flush=True)  # noqa: E731
    for attribute in [a for a in args.attributes.split(",") if a in ("colour", "shape")]:
        arms = [sae_arm(hooked, stats, attribute, "add", floats(args.add)),
                sae_arm(hooked, stats, attribute, "clamp", floats(args.clamp)),
                sae_arm(hooked, stats, attribute, "concept", floats(args.concept)),
                raw_arm(hooked, floats(args.raw))]
        groups = pair_groups(attribute, args.seeds, values_of(attribute))
        results = run_benchmark(setup.pipe, attribute, groups, arms, panel, steps=args.steps, progress=log)
        print(f"## {attribute}: {sum(len(g.rows) for g in groups)} images per row\n")
        print("\n".join(table(results, attribute, "flip")) + "\n")
        best = best_strength(results)
        print(f"best strength per arm ({'shape' if attribute == 'colour' else 'colour'} kept within 10 points of "
              f"unsteered by the CNN judge):\n")
        print("\n".join(table(list(best.values()), attribute, "flip")) + "\n", flush=True)
        report[attribute] = [vars(r) for r in results]
    if "removal" in args.attributes:
        arms = [sae_arm(hooked, stats, "colour", "ablate", floats(args.ablate)),
                removal_concept_arm(hooked, floats(args.concept)), raw_arm(hooked, floats(args.raw))]
        groups = removal_groups(args.seeds, values=values_of("colour"))
        results = run_benchmark(setup.pipe, "colour", groups, arms, panel, steps=args.steps, removal=True,
                                progress=log)
        print(f"## removal of the named colour: {sum(len(g.rows) for g in groups)} images per row\n")
        print("\n".join(table(results, "colour", "gone")) + "\n", flush=True)
        report["removal"] = [vars(r) for r in results]
    prompts = [f"a red {s}" for s in ("circle", "square", "star", "heart")] * 16
    clamp = build_interventions(hooked, stats, Feature("colour", "blue"), "clamp", 2.0)
    cost = generation_cost(setup.pipe, prompts, clamp, steps=args.steps)
    print("## cost of steered generation (clamp colour=blue: SAE encode on every text-encoder call)\n")
    print("| images | plain s | steered s | ratio |\n| --- | --- | --- | --- |")
    print(f"| {cost['images']} | {cost['plain_s']:.2f} | {cost['steered_s']:.2f} | {cost['ratio']:.3f} |\n")
    report["cost"] = cost
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"total {report['seconds']} s, load average {os.getloadavg()[0]:.1f} at the end")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
