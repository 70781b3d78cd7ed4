"""Tiny random Stable Diffusion pipelines (SD 1.x-style and SDXL-style), built offline, and random SAEs on their
hook points: what the steering tests run on (seconds each, no hub)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlsae import create_sae

from multimodal.zoo.shapes_diffusion.build import clip_tokenizer

CONTEXT = 24


def _text_config(width: int, layers: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=CONTEXT, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **extra)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=16)


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _unet(cross: int, xl: bool) -> Any:
    from diffusers import UNet2DConditionModel

    extra = ({"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
              "projection_class_embeddings_input_dim": 12 + 6 * 4} if xl else {})
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=8, **extra)


def tiny_sd() -> Any:
    """A random StableDiffusionPipeline: one 32-wide, 3-block CLIP text encoder, 16x16 images."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32, 3)),
                                   tokenizer=clip_tokenizer(CONTEXT), unet=_unet(32, xl=False),
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl() -> Any:
    """A random StableDiffusionXLPipeline: a 32-wide CLIPTextModel and a 48-wide CLIPTextModelWithProjection."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    tokenizer_2 = clip_tokenizer(CONTEXT)
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), not the end token
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32, 2)),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(48, 3, projection_dim=12)),
                                     tokenizer=clip_tokenizer(CONTEXT), tokenizer_2=tokenizer_2,
                                     unet=_unet(32 + 48, xl=True), scheduler=_scheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(pipe: Any, folder: Path) -> Path:
    pipe.save_pretrained(str(folder))
    return folder


def random_sae(width: int, hook: str, n_latents: int = 64, k: int = 8, arch: str = "topk", seed: int = 0) -> Any:
    """A random SAE recorded as trained on ``hook`` (``SOURCE HOOK TOKENS``), large enough to move the states."""
    torch.manual_seed(seed)
    extra = {"modalities": ("text",)} if arch.startswith("vl") else {}
    sae = create_sae(arch, d_in=width, n_latents=n_latents, k=k, hook=f"diffusers-text:tiny {hook} all", **extra)
    return sae.eval()
