"""``shapes-diffusion``: a small diffusers text-to-image pipeline trained on ShapesWorld.

The model is a real ``diffusers.StableDiffusionPipeline``: an ``AutoencoderKL``
(32x32 RGB <-> 16x16x4 latents), a ``UNet2DConditionModel`` that cross-attends
to the prompt, a transformers ``CLIPTextModel`` and a ``CLIPTokenizer`` built
offline from open_clip's BPE vocabulary (its ids equal open_clip's), and a
``DDIMScheduler``. It is saved with ``save_pretrained`` and loads with
``StableDiffusionPipeline.from_pretrained(folder)``, so diffusers' own tools
and the ``diffusers-text:FOLDER`` adapter work on it.

As Stable Diffusion uses CLIP's text tower, frozen, shapes-diffusion uses the
text tower of the ``shapes-clip`` zoo model, converted to a ``CLIPTextModel``
(:func:`text_encoder_from_open_clip`, exact) and frozen: the UNet then learns
from words whose embeddings already separate colours and shapes, which is
what makes minutes of CPU enough (``text_encoder=scratch`` trains a new one
with the UNet instead). Training is on one large object in the centre of a
plain 32x32 image (positions and sizes would take far longer to learn;
``world`` changes that).

The package, by job:

- :mod:`.config`: the name, files, training settings and training world;
- :mod:`.build`: the parts, the pipeline, loading (the shipped copy too);
- :mod:`.recipe`: training (only ``vlsae zoo train`` needs it);
- :mod:`.evaluation`: the "a COLOUR SHAPE" prompts and the judges' rates;
- here: the registered zoo entry.

Generating and judging are not the zoo's: :func:`multimodal.generation.encode_prompts`
returns the pipeline's ``prompt_embeds`` and :func:`multimodal.generation.generate`
takes either prompts or ``prompt_embeds``; the judges are in
:mod:`multimodal.judges`; ``DiffusersTextAdapter.from_pipeline(pipe)`` gives the
hook modules. ``encode_prompts`` and ``generate`` are importable from here
too, where the README's steering notes name them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlsae.config import from_dict
from vlsae.errors import VlsaeError

from multimodal.generation import encode_prompts, generate
from multimodal.zoo import REPORT, ZooModel, register_zoo_model
from multimodal.zoo.shapes_diffusion.build import (SHIPPED_TEXT_ENCODER, clip_tokenizer, load_pipeline,
                                                   load_shipped_pipeline, quiet_loading, shapes_clip_text_encoder,
                                                   text_encoder_fingerprint, text_encoder_from_open_clip)
from multimodal.zoo.shapes_diffusion.config import FILES, NAME, TRAIN_WORLD, ShapesDiffusionConfig, world_config
from multimodal.zoo.shapes_diffusion.evaluation import eval_prompts, evaluate_pipeline
from multimodal.zoo.shapes_diffusion.recipe import train_shapes_diffusion


@register_zoo_model(NAME)
class ShapesDiffusion(ZooModel):
    """The zoo entry: trains with :mod:`.recipe`, loads with :mod:`.build`, evaluates with :mod:`.evaluation`."""

    summary = ("small diffusers StableDiffusionPipeline (32x32; shapes-clip's text tower, frozen) "
               "trained on ShapesWorld prompts")
    files = FILES
    config_class = ShapesDiffusionConfig
    ship_exclude = ("text_encoder", "tokenizer")  # shapes-clip's text tower, shipped already with shapes-clip

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(cls.config_class, overrides, where="shapes-diffusion training config")
        return train_shapes_diffusion(out_dir, cfg, progress=progress)

    @classmethod
    def ship_extras(cls, source: Path) -> dict[str, str]:
        """The fingerprint of the left-out text encoder, so that loading the shipped copy can tell
        whether the shapes-clip it rebuilds the tower from is the one the UNet was trained with."""
        from transformers import CLIPTextModel

        report = json.loads((Path(source) / REPORT).read_text())
        if report.get("config", {}).get("text_encoder", "shapes-clip") != "shapes-clip":
            raise VlsaeError(f"only a {NAME} on shapes-clip's frozen text tower can be shipped without its text encoder")
        with quiet_loading():
            encoder = CLIPTextModel.from_pretrained(Path(source) / "text_encoder", use_safetensors=True)
        return {SHIPPED_TEXT_ENCODER: json.dumps({"source": "shapes-clip", "fingerprint": text_encoder_fingerprint(encoder)})}

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu") -> Any:
        """The trained ``StableDiffusionPipeline`` (its ``text_encoder``/``tokenizer`` are what the adapter reads)."""
        if (Path(folder) / SHIPPED_TEXT_ENCODER).is_file() and not (Path(folder) / "text_encoder").is_dir():
            return load_shipped_pipeline(cls.require_files(folder, shipped=True), device=device)
        folder = cls.require_files(folder)
        return load_pipeline(folder, device=device)

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
        """The evaluation of training, rerun on ``folder`` with the settings its report recorded."""
        pipe = cls.load(folder, device=device)
        report = json.loads((Path(folder) / REPORT).read_text()) if (Path(folder) / REPORT).is_file() else {}
        cfg = from_dict(cls.config_class, report.get("config", {}), where="shapes-diffusion training config")
        return evaluate_pipeline(pipe, world_config(cfg.world), cfg)

    @classmethod
    def describe_report(cls, report: dict[str, Any]) -> str:
        metrics = report.get("metrics", {})
        lines = [f"generated images matching their prompt ({metrics.get('n', '?')} images, "
                 f"{metrics.get('sample_steps', '?')} DDIM steps, guidance {metrics.get('guidance_scale', '?')}):"]
        for key, judge in (("clip", "shapes-clip"), ("cnn", "a CNN")):
            for attribute, r in metrics.get(key, {}).items():
                through = (f", autoencoded {r['real_autoencoded']:.1%}" if "real_autoencoded" in r else "")
                lines.append(f"  {attribute:<7} {r['match']:6.1%}   by {judge} (real renders {r['real']:.1%}"
                             f"{through}; chance {r['chance']:.1%})")
        if "pixel_colour" in metrics:
            r = metrics["pixel_colour"]
            lines.append(f"  colour  {r['match']:6.1%}   by pixel colour (real renders {r['real']:.1%})")
        if "final_loss" in metrics:
            lines.append(f"noise-prediction loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}; "
                         f"autoencoder MSE {metrics['vae_mse']:.4f}")
        timing = report.get("timing", {})
        if timing:
            lines.append(f"time: render {timing.get('render_s')} s, autoencoder {timing.get('vae_s')} s, "
                         f"diffusion {timing.get('diffusion_s')} s, evaluation {timing.get('eval_s')} s "
                         f"({timing.get('threads')} threads)")
        return "\n".join(lines)


__all__ = ["NAME", "FILES", "TRAIN_WORLD", "ShapesDiffusionConfig", "ShapesDiffusion", "world_config",
           "clip_tokenizer", "text_encoder_from_open_clip", "shapes_clip_text_encoder", "load_pipeline",
           "load_shipped_pipeline", "train_shapes_diffusion", "eval_prompts", "evaluate_pipeline", "encode_prompts",
           "generate"]
