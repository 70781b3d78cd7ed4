"""``vlsae steer``: steer a diffusion pipeline through text-encoder SAE latents, or discover an attribute's latents.

    vlsae steer --pipeline shapes-diffusion --sae RUN --prompt "a large red circle" --feature colour=blue \\
        --mode clamp --strength 0,1,2,4 --seeds 8 --out DIR
    vlsae steer --discover colour --pipeline shapes-diffusion --sae RUN --out DIR
    vlsae steer --prompt-shards prompts.txt --out shards      # caption-only shards for vlsae extract

The work is the ``steer`` task (:mod:`evals.tasks.steer`); this module turns
the flags into its config, and ``--prompt-shards`` into
:func:`steering.prompts.write_prompt_shards`.
"""
from __future__ import annotations

import argparse
import dataclasses

from vlsae.config import field_help
from vlsae.errors import VlsaeError

from steering.prompts import read_prompts, write_prompt_shards

from evals.tasks import run_task
from evals.tasks.steer import SteerConfig, SteerTask

HELP = "steer image generation through text-encoder SAE latents (grid, flip rates), or --discover attribute latents"


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise VlsaeError(f"--strength must be comma-separated numbers like 0,1,2,4 (negative: --strength=-1,-2); got '{text}'")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helps = field_help(SteerConfig)
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for f in dataclasses.fields(SteerConfig)}

    def add(name: str, shown: str | None = None, **kw: object) -> None:
        text = shown if shown is not None else str(defaults[name])
        parser.add_argument("--" + name.replace("_", "-"), default=defaults[name],
                            help=f"{helps[name]} (default: {text})".replace("%", "%%"), **kw)

    add("sae", shown="none, required")
    add("out", shown="none, required")
    add("pipeline")
    add("prompt")
    add("feature", shown="none; this or --discover")
    add("mode", choices=["add", "clamp", "ablate", "concept"])
    parser.add_argument("--strength", default="0,1,2,4",
                        help="comma-separated strengths, in units of each latent's usual activation (concept: "
                             "lambda); negative ones as --strength=-1,-2 (default: 0,1,2,4)")
    add("seeds", type=int)
    add("discover", shown="none; this or --feature", choices=["colour", "color", "shape", "size"])
    add("hook", shown="the SAE's own")
    add("prompts", shown="ShapesWorld prompts")
    add("per_value", type=int)
    add("passes", shown="cfg for add and concept, cond for clamp and ablate", choices=["cond", "both", "cfg"])
    add("positions")
    add("concept", shown="the feature's value")
    parser.add_argument("--judges", default="clip,cnn,pixel",
                        help="comma-separated judges of the images: clip, cnn, pixel; 'none' for no judging "
                             "(default: clip,cnn,pixel)")
    add("judge", choices=["clip", "cnn", "pixel"])
    parser.add_argument("--values", default="", help="discovery: comma-separated values of the attribute to "
                                                      "discover, e.g. red,blue (default: all)")
    add("candidates", type=int)
    add("neutral", type=int)
    add("flip_strength", type=float)
    add("flip_seeds", type=int)
    add("steps", type=int)
    add("guidance_scale", type=float)
    add("seed", type=int)
    add("device")
    add("overwrite", shown="off", action="store_true")
    parser.add_argument("--prompt-shards", metavar="PROMPTS.txt", default="",
                        help="instead: write the prompt file (one prompt a line) as caption-only shards into --out, "
                             "for vlsae extract --model diffusers-text:... (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (default: off)")


def run(args: argparse.Namespace) -> int:
    if args.prompt_shards:
        if not args.out:
            raise VlsaeError("--prompt-shards needs --out, the folder to write the shards into")
        written = write_prompt_shards(read_prompts(args.prompt_shards), args.out, overwrite=args.overwrite)
        print(f"wrote {written['prompts']} prompts as {written['shards']} caption-only shard(s): {written['pattern']}")
        return 0
    judges = [] if args.judges.strip() == "none" else [j.strip() for j in args.judges.split(",") if j.strip()]
    config = SteerConfig(pipeline=args.pipeline, sae=args.sae, out=args.out, prompt=args.prompt, feature=args.feature,
                         mode=args.mode, strength=_floats(args.strength), seeds=args.seeds, discover=args.discover,
                         hook=args.hook, prompts=args.prompts, per_value=args.per_value, passes=args.passes,
                         positions=args.positions, concept=args.concept, judges=judges, judge=args.judge,
                         values=[v.strip() for v in args.values.split(",") if v.strip()],
                         candidates=args.candidates, neutral=args.neutral, flip_strength=args.flip_strength,
                         flip_seeds=args.flip_seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                         seed=args.seed, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    for line in SteerTask.describe(run_task("steer", config)):
        print(line)
    return 0
