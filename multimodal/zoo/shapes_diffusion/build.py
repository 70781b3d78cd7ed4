"""shapes-diffusion's parts, assembled into a diffusers ``StableDiffusionPipeline``, and loading it back.

The parts: a ``CLIPTokenizer`` built offline from open_clip's BPE vocabulary
(its ids equal open_clip's), a ``CLIPTextModel`` (shapes-clip's text tower
converted exactly, or a new one), an ``AutoencoderKL``, a
``UNet2DConditionModel`` that cross-attends to the prompt, and Stable
Diffusion's ``DDIMScheduler``. A trained folder is ``save_pretrained``'s
layout; a shipped copy leaves out the text encoder and tokenizer (a duplicate
of shapes-clip's text tower) and :func:`load_shipped_pipeline` rebuilds them.
Nothing here trains: the recipe builds its untrained parts from these, and
the zoo entry loads a trained folder with them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from vlsae.errors import VlsaeError

from multimodal.zoo import REPORT, load_model, resolve_model_dir
from multimodal.zoo.shapes_diffusion.config import NAME, ShapesDiffusionConfig


def clip_tokenizer(context_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from open_clip's BPE vocabulary.

    Its ids equal open_clip's (49,408 tokens, start 49406, end 49407), padding
    is the end token, as in Stable Diffusion 1.x. (``CLIPTokenizer(vocab_file=...,
    merges_file=...)`` silently ignores the files in transformers 5: the
    vocabulary and merges are passed in memory instead.)
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def text_encoder_from_open_clip(model: Any) -> Any:
    """A transformers ``CLIPTextModel`` holding the text tower of an open_clip ``CLIP``.

    The two are the same network (causal pre-norm transformer, GELU MLP, final
    layer norm): open_clip's fused attention input projection is split into
    q/k/v, everything else maps one to one. This is how Stable Diffusion 2
    carries OpenCLIP's text tower. The projection to the joint space is not
    part of a ``CLIPTextModel`` and is left out.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    if not hasattr(model, "transformer") or getattr(model, "text_pool_type", "argmax") != "argmax":
        raise VlsaeError("the open_clip model has no plain CLIP text tower (argmax pooling) to convert")
    blocks = model.transformer.resblocks
    width = int(model.token_embedding.weight.shape[1])
    act = type(blocks[0].mlp.gelu).__name__
    config = CLIPTextConfig(
        vocab_size=int(model.token_embedding.weight.shape[0]), hidden_size=width,
        intermediate_size=int(blocks[0].mlp.c_fc.weight.shape[0]), num_hidden_layers=len(blocks),
        num_attention_heads=int(blocks[0].attn.num_heads),
        max_position_embeddings=int(model.positional_embedding.shape[0]),
        hidden_act="quick_gelu" if act == "QuickGELU" else "gelu", layer_norm_eps=float(model.ln_final.eps),
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    state = {"embeddings.token_embedding.weight": model.token_embedding.weight,
             "embeddings.position_embedding.weight": model.positional_embedding,
             "final_layer_norm.weight": model.ln_final.weight, "final_layer_norm.bias": model.ln_final.bias}
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}."
        for name, tensor in zip("qkv", block.attn.in_proj_weight.chunk(3)):
            state[f"{prefix}self_attn.{name}_proj.weight"] = tensor
        for name, tensor in zip("qkv", block.attn.in_proj_bias.chunk(3)):
            state[f"{prefix}self_attn.{name}_proj.bias"] = tensor
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = module.weight, module.bias
    encoder = CLIPTextModel(config)
    state = {k: v.detach().float().clone() for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise VlsaeError(f"open_clip text tower does not map onto CLIPTextModel (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return encoder.eval()


def shapes_clip_text_encoder(folder: str = "") -> tuple[Any, Any, str]:
    """(text encoder, tokenizer, source folder) from the shapes-clip zoo model (cache, shipped copy or trained)."""
    loaded = load_model("shapes-clip", folder=folder or None)
    encoder = text_encoder_from_open_clip(loaded.model)
    source = folder or str(resolve_model_dir("shapes-clip") or "")
    return encoder, clip_tokenizer(int(encoder.config.max_position_embeddings)), source


def build_parts(cfg: ShapesDiffusionConfig, image_size: int, text_encoder: Any = None,
                tokenizer: Any = None) -> dict[str, Any]:
    """Randomly initialised vae and unet (and text encoder, unless given) with tokenizer and scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    factor = 2 ** (len(cfg.vae_channels) - 1)
    if image_size % (factor * 2 ** (len(cfg.unet_channels) - 1)):
        raise VlsaeError(f"image_size {image_size} is not divisible by the autoencoder and UNet downsampling; "
                         f"change world.image_size, vae_channels or unet_channels")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
                        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
                        latent_channels=cfg.latent_channels, norm_num_groups=min(8, cfg.vae_channels[0]),
                        sample_size=image_size, mid_block_add_attention=False)
    if text_encoder is None:
        tokenizer = clip_tokenizer(cfg.context_length)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.context_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    if len(cfg.unet_attention) != len(cfg.unet_channels):
        raise VlsaeError(f"unet_attention needs one entry per UNet block ({len(cfg.unet_channels)}), "
                         f"got {len(cfg.unet_attention)}")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention))
    unet = UNet2DConditionModel(
        sample_size=image_size // factor, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels), down_block_types=down,
        up_block_types=up, layers_per_block=cfg.layers_per_block,
        cross_attention_dim=int(text_encoder.config.hidden_size), attention_head_dim=cfg.head_dim,
        norm_num_groups=min(32, cfg.unet_channels[0] // 4))

    # Stable Diffusion's noise schedule; DDIM as SD ships it (steps_offset=1, no clipping in latent space)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def assemble(parts: dict[str, Any]) -> Any:
    """The StableDiffusionPipeline of ``parts`` (no safety checker: ShapesWorld is shapes)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No diffusers / transformers progress bars or notices while saving or loading a few-megabyte pipeline
    (diffusers warns that ``accelerate`` is missing on every model it builds: advice for multi-GB loads)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    previous = [(m, m.is_progress_bar_enabled(), m.get_verbosity()) for m in modules]
    for module in modules:
        module.disable_progress_bar()
        module.set_verbosity_error()
    try:
        yield
    finally:
        for module, enabled, verbosity in previous:
            module.set_verbosity(verbosity)
            if enabled:
                module.enable_progress_bar()


SHIPPED_TEXT_ENCODER = "text_encoder.json"  # in a shipped copy: which shapes-clip text tower to rebuild


def text_encoder_fingerprint(encoder: Any) -> str:
    """sha256 of a text encoder's floating-point weights rounded to fp16 (what a shipped copy stores),
    so a text tower rebuilt from shapes-clip can be checked against the one the UNet was trained with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if tensor.is_floating_point():
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float16).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_shipped_pipeline(folder: str | Path, device: Any = "cpu") -> Any:
    """A shipped copy: autoencoder, UNet and scheduler from ``folder``; the frozen text encoder and
    tokenizer rebuilt from shapes-clip (the shipped copy leaves out that duplicate) and checked
    against the fingerprint recorded when it was shipped."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = Path(folder)
    recorded = json.loads((folder / SHIPPED_TEXT_ENCODER).read_text())
    report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).is_file() else {}
    encoder, tokenizer, _ = shapes_clip_text_encoder(report.get("config", {}).get("clip_folder", ""))
    if text_encoder_fingerprint(encoder) != recorded.get("fingerprint"):
        raise VlsaeError(f"the shipped {NAME} was trained with another shapes-clip text tower than the one found now "
                         f"(a retrained shapes-clip in the cache?); run vlsae zoo train {NAME}")
    with quiet_loading():
        parts = {"vae": AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32, use_safetensors=True),
                 "unet": UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32, use_safetensors=True),
                 "scheduler": DDIMScheduler.from_pretrained(folder / "scheduler"),
                 "text_encoder": encoder.eval(), "tokenizer": tokenizer}
    return assemble(parts).to(device)


def load_pipeline(folder: str | Path, device: Any = "cpu") -> Any:
    """``StableDiffusionPipeline.from_pretrained(folder)`` offline, safetensors only, in eval mode."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise VlsaeError(f"{folder} is not a diffusers pipeline folder (model_index.json missing)")
    # float32 whatever the files hold (a shipped copy stores fp16)
    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                       dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

