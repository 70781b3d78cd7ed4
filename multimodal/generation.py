"""Prompt embeddings and seeded images from any diffusers Stable Diffusion pipeline.

These helpers work on a ``StableDiffusionPipeline`` (SD 1.x / 2.x, and the
``shapes-diffusion`` zoo model) and on a ``StableDiffusionXLPipeline``. They
live outside the zoo so that steering code can embed prompts, edit the
embeddings and generate from them without importing any zoo model's training
recipe (multimodal/ is the layer below steering/ and evals/, and imports
neither).

The steering loop they serve::

    positive, negative = encode_prompts(pipe, prompts)          # what the UNet cross-attends to
    images = generate(pipe, prompt_embeds=edit(positive), negative_prompt_embeds=negative, seed=0)

An SDXL pipeline also conditions on pooled embeddings: pass
:func:`encode_pooled_prompts` to :func:`generate` beside the token embeddings.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError


def is_xl(pipe: Any) -> bool:
    """Whether ``pipe`` is an SDXL-style pipeline (two text encoders, pooled conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


def _encode(pipe: Any, prompts: Sequence[str], guidance_scale: float) -> tuple[Any, ...]:
    """The pipeline's own ``encode_prompt`` output for ``prompts`` (one image per prompt, the empty
    negative prompt when guidance is on): (embeds, negative) for SD, plus (pooled, negative pooled) for SDXL.

    Keyword arguments, because the two pipelines' positional orders differ (SDXL's second one is ``prompt_2``).
    """
    return pipe.encode_prompt(prompt=list(prompts), device=pipe.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=guidance_scale > 1.0, negative_prompt=None)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], guidance_scale: float = 4.0) -> tuple[Tensor, Tensor | None]:
    """(prompt_embeds, negative_prompt_embeds) as the pipeline computes them: (n, context, width) each.

    These are the token states the UNet cross-attends to (SDXL: both encoders'
    penultimate states, concatenated), i.e. what a steering intervention edits
    before passing them to :func:`generate`. The negative ones (the empty
    prompt's) are None without guidance (``guidance_scale`` <= 1).
    """
    encoded = _encode(pipe, prompts, guidance_scale)
    return encoded[0], encoded[1]


@torch.no_grad()
def encode_pooled_prompts(pipe: Any, prompts: Sequence[str],
                          guidance_scale: float = 4.0) -> tuple[Tensor, Tensor | None]:
    """SDXL only: (pooled_prompt_embeds, negative_pooled_prompt_embeds), (n, projection) each.

    An SDXL UNet also conditions on the second encoder's projected pooled
    output, so generating from edited token embeddings needs these beside them
    (diffusers refuses ``prompt_embeds`` without them).
    """
    if not is_xl(pipe):
        raise VlsaeError(f"{type(pipe).__name__} has no pooled prompt embeddings (an SDXL pipeline has)")
    encoded = _encode(pipe, prompts, guidance_scale)
    return encoded[2], encoded[3]


def _rows(tensor: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if tensor is None else tensor[start:stop]


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str] | None = None, seed: int = 0, steps: int = 20,
             guidance_scale: float = 4.0, prompt_embeds: Tensor | None = None,
             negative_prompt_embeds: Tensor | None = None, batch_size: int = 256,
             pooled_prompt_embeds: Tensor | None = None,
             negative_pooled_prompt_embeds: Tensor | None = None) -> Tensor:
    """uint8 images (n, 3, H, W) for ``prompts`` or for ``prompt_embeds`` ((n, context, width)).

    Seeded: image i depends on ``seed`` and its position in the batch of
    ``batch_size`` it falls in (batch b draws from ``seed + b * batch_size``),
    so the same call gives the same images, and images from prompts match
    (to a pixel level) images from the :func:`encode_prompts` of the same
    prompts. H = W = the UNet's sample size times the autoencoder's
    downsampling: the size the pipeline was trained at. SDXL with ``prompt_embeds`` also needs
    ``pooled_prompt_embeds`` (and the negative ones under guidance), from
    :func:`encode_pooled_prompts`.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise VlsaeError("generate needs prompts or prompt_embeds (one of the two)")
    if prompt_embeds is not None and is_xl(pipe) and pooled_prompt_embeds is None:
        raise VlsaeError("an SDXL pipeline needs pooled_prompt_embeds with prompt_embeds (see encode_pooled_prompts)")
    n = len(prompts) if prompts is not None else int(prompt_embeds.shape[0])
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    out = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        kwargs: dict[str, Any] = {}
        if prompts is not None:
            kwargs["prompt"] = list(prompts[start:stop])
        else:
            kwargs["prompt_embeds"] = prompt_embeds[start:stop]
            optional = {"negative_prompt_embeds": negative_prompt_embeds,
                        "pooled_prompt_embeds": pooled_prompt_embeds,
                        "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}
            kwargs.update({k: _rows(v, start, stop) for k, v in optional.items() if v is not None})
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        images = pipe(**kwargs, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt").images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def tokenize(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """(n, model_max_length) ids, padded and truncated exactly as the pipeline's ``encode_prompt`` does,
    so text states computed from them (e.g. once per distinct caption when training) are the ones
    the pipeline would compute."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def autoencode(vae: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """uint8 images (n, 3, H, W) through a pipeline's ``AutoencoderKL`` and back (posterior mean).

    What the generator's output could at best look like: a judge's rate on
    these is the ceiling the autoencoder's blur leaves a perfect UNet.
    """
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size].to(vae.device, vae.dtype) / 127.5 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


__all__ = ["is_xl", "encode_prompts", "encode_pooled_prompts", "generate", "tokenize", "autoencode"]
