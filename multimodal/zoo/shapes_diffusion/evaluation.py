"""shapes-diffusion's evaluation: does a generated image show the colour and shape its prompt asks for?

``eval_seeds`` images for every "a COLOUR SHAPE" prompt (10 colours x 10
shapes), read by the judges of :mod:`multimodal.judges`: shapes-clip
zero-shot, a small CNN trained on real renders, and the pixel colour check.
Each judge also reads real renders of the training world (its ceiling) and
those renders through the pipeline's autoencoder (the ceiling the
autoencoder's blur leaves). Its own module because two callers need it: the
recipe, right after training, and the zoo entry (``vlsae zoo eval``).
"""
from __future__ import annotations

from typing import Any

from multimodal.generation import autoencode, generate
from multimodal.judges import EVAL_OFFSET, ClipJudge, judge_rates, pixel_colour_rates, train_cnn_judge
from multimodal.shapesworld import ShapesWorldConfig, vocabulary
from multimodal.zoo.shapes_diffusion.config import ShapesDiffusionConfig, render


def eval_prompts(seeds: int) -> tuple[list[str], list[dict[str, str]]]:
    """"a COLOUR SHAPE" for every colour and shape, ``seeds`` times each, with the asked attributes."""
    vocab = vocabulary()
    prompts, asked = [], []
    for _ in range(seeds):
        for colour in vocab["colour"]:
            for shape in vocab["shape"]:
                text = f"{colour} {shape}"
                prompts.append(("an " if text[0] in "aeiou" else "a ") + text)
                asked.append({"colour": colour, "shape": shape})
    return prompts, asked


def evaluate_pipeline(pipe: Any, world: ShapesWorldConfig, cfg: ShapesDiffusionConfig, progress: bool = False,
                      judge: ClipJudge | None = None) -> dict[str, Any]:
    """Colour and shape match rates of generated images against their prompts.

    Judges: ``clip``, shapes-clip's zero-shot reading (when ``cfg.eval_clip``;
    ``judge`` saves loading it again); ``cnn``, a small classifier trained on
    real renders (when ``cfg.cnn_steps``); ``pixel_colour``, the pixel colour
    check. Each comes with the same judge's rate on real renders of the
    training world (``real``): what a perfect generator would score, and on
    those renders passed through the autoencoder (``real_autoencoded``): what
    a generator limited only by the autoencoder's blur would score. ``chance``
    is 1 / classes.
    """
    prompts, asked = eval_prompts(cfg.eval_seeds)
    generated = generate(pipe, prompts, seed=cfg.seed, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    real, _, metas = render(world, range(EVAL_OFFSET, EVAL_OFFSET + len(prompts)))
    real_truth = [m["objects"][0] for m in metas]
    roundtrip = autoencode(pipe.vae, real)
    result: dict[str, Any] = {"n": len(prompts), "sample_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale,
                              "pixel_colour": pixel_colour_rates(generated, asked, real, real_truth)}
    if cfg.eval_clip:
        if judge is None:
            judge = ClipJudge.from_zoo(cfg.clip_folder or None)
        result["clip"] = judge_rates(judge, generated, asked, real, real_truth, roundtrip)
    if cfg.cnn_steps > 0:
        cnn = train_cnn_judge(world, cfg.seed, n=cfg.cnn_train, steps=cfg.cnn_steps)
        result["cnn"] = judge_rates(cnn, generated, asked, real, real_truth, roundtrip)
    return result
