"""``vlsae zeroshot``: zero-shot accuracy plain vs with the VL-SAE's concept-level alignment.

The work is the ``zeroshot`` task (:mod:`evals.tasks.zeroshot`, around
:func:`evals.zeroshot.run.run_zeroshot`), which checks ``--out`` before loading
anything; this module parses the flags and prints the table.
"""
from __future__ import annotations

import argparse

from evals.tasks import run_task
from evals.tasks.zeroshot import ZeroShotConfig, ZeroShotTask
from evals.zeroshot.protocol import DEFAULT_LAMBDAS
from multimodal.pairs import DEFAULT_MAX_SKIPPED

HELP = "zero-shot classification plain vs with VL-SAE concept alignment (validation-chosen λ, test gain, HTML report)"


def _lambdas(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lambdas takes comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", required=True, help="trained SAE run folder, e.g. a vl SAE on the model's final "
                                                     "embeddings (required)")
    parser.add_argument("--model", required=True, help="CLIP-style adapter spec the SAE was trained on: shapes-clip, "
                                                       "shapes-clip-minilm, open_clip:ARCH:WEIGHTS (required)")
    parser.add_argument("--data", required=True, help="labelled pair shards, e.g. 'DIR/{000000..000009}.tar' or a folder; "
                                                      "ShapesWorld labels come from the json, --classes labels from the "
                                                      "json or a cls member (required)")
    parser.add_argument("--out", required=True, help="report folder: results.json, predictions.csv, index.html; must be "
                                                     "writable and empty unless --overwrite (required)")
    parser.add_argument("--attribute", default="all", help="ShapesWorld attribute(s): shape, colour, size, position, "
                                                           "comma-separated, or all (default: all)")
    parser.add_argument("--classes", default="", metavar="FILE",
                        help="JSON/YAML file {classes: [...], templates: ['a photo of a {}.'], attribute: class} for real "
                             "data: template-ensembled class prompts instead of ShapesWorld's descriptions (default: none)")
    parser.add_argument("--acts", default="", help="activation cache of --model's final embeddings of --data: scoring "
                                                   "skips the image forward passes (default: none, images are extracted)")
    parser.add_argument("--lambdas", type=_lambdas, default=list(DEFAULT_LAMBDAS),
                        help=f"weights of the concept term to try, comma-separated, must include 0 "
                             f"(default: {','.join(f'{v:g}' for v in DEFAULT_LAMBDAS)})")
    parser.add_argument("--variant", default="both", choices=["concept", "decoder", "both"],
                        help="concept: cosine of the sparse codes; decoder: the prompt decoded as an image embedding; "
                             "both: chosen on validation (default: both)")
    parser.add_argument("--val-fraction", type=float, default=0.5,
                        help="fraction of the labelled records λ is chosen on; the rest is the test split (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the bootstrap (default: 0)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples of the gain's 95 %% interval (default: 1000)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N labelled records (default: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass when extracting (default: 128)")
    parser.add_argument("--device", default="auto", help="device for the model: auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--max-skipped", type=float, default=DEFAULT_MAX_SKIPPED, metavar="FRACTION",
                        help=f"largest fraction of the pairs damaged shards may lose before the run fails "
                             f"(default: {DEFAULT_MAX_SKIPPED})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (default: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off, bars shown)")


def run(args: argparse.Namespace) -> int:
    config = ZeroShotConfig(sae=args.sae, model=args.model, data=args.data, out=args.out, attribute=args.attribute,
                            classes=args.classes, acts=args.acts, lambdas=args.lambdas, variant=args.variant,
                            val_fraction=args.val_fraction, seed=args.seed, resamples=args.resamples, limit=args.limit,
                            batch_size=args.batch_size, device=args.device, max_skipped=args.max_skipped,
                            overwrite=args.overwrite, progress=not args.quiet)
    for line in ZeroShotTask.describe(run_task("zeroshot", config)):
        print(line)
    return 0
