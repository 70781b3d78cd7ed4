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
with the UNet instead).

Training, seeded, on single-object ShapesWorld scenes rendered in memory:
one large object in the centre of a plain 32x32 image (positions and sizes
would take far longer to learn; ``world`` changes that):

1. the autoencoder, briefly (L1 with object pixels weighted up, since an object
   covers a few percent of the image, plus a tiny KL term); the latent scale is
   then set so the training latents have unit variance, as Stable Diffusion does;
2. the latents of every training image (posterior means) and the text-encoder
   states of every distinct caption are computed once;
3. the UNet with the DDPM noise-prediction loss (min-SNR weighted), 10% of
   prompts replaced by the empty prompt for classifier-free guidance; the saved
   weights are a moving average.

Evaluation (:func:`evaluate_pipeline`): ``eval_seeds`` images for every "a COLOUR
SHAPE" prompt (10 colours x 10 shapes), read by three judges: the ``shapes-clip``
zoo model (zero-shot over every single-object description, at its 64x64 input),
a small CNN trained on real renders (an independent reader of shape), and a
pixel colour check. Each judge's rate on real renders is its ceiling.

For steering, :func:`encode_prompts` returns the pipeline's ``prompt_embeds``
and :func:`generate` takes either prompts or ``prompt_embeds``;
``DiffusersTextAdapter.from_pipeline(pipe)`` gives the hook modules.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsae.config import from_dict, option, to_dict
from vlsae.errors import VlsaeError

from multimodal.zoo import REPORT, ZooModel, register_zoo_model, training_bar, training_world

NAME = "shapes-diffusion"
EVAL_OFFSET = 10_000_000  # real reference renders are ShapesWorld indices from here on
# One large object in the centre of a plain 32x32 image ("holdout_only" forces the first object to match the
# rule): minutes of CPU learn its shape and colour; positions and sizes would take far longer to learn.
TRAIN_WORLD = {"image_size": 32, "min_objects": 1, "max_objects": 1, "textures": ["plain"],
               "holdout": ["size=large+position=center"], "holdout_only": True, "mention_shape": 1.0,
               "mention_colour": 1.0, "mention_position": 0.0, "mention_texture": 0.0}
# what a finished folder holds (save_pretrained's layout)
FILES = ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json")


@dataclass
class ShapesDiffusionConfig:
    """Training settings of shapes-diffusion (``vlsae zoo train shapes-diffusion --set key=value``)."""

    seed: int = option(0, help="seed of the model init, the batch order and the noise (the pairs' seed is world.seed)")
    n_train: int = option(8_000, help="distinct single-object ShapesWorld pairs rendered for training")
    world: dict = option(None, factory=lambda: dict(TRAIN_WORLD),
                         help="ShapesWorldConfig overrides of the training pairs (default: 32x32, one large "
                              "object in the centre, plain background, captions name colour and shape)")
    # autoencoder
    vae_steps: int = option(1500, help="autoencoder optimizer steps")
    vae_batch_size: int = option(16, help="images per autoencoder batch")
    vae_lr: float = option(2e-3, help="autoencoder AdamW learning rate (cosine decay)")
    vae_channels: list[int] = option(None, factory=lambda: [32, 64],
                                     help="autoencoder block widths; n blocks downsample by 2^(n-1) (16, 32 blurs "
                                          "shapes: the 600-step shapes-clip read 45-50 percent of autoencoded renders right, 63 at 32, 64)")
    latent_channels: int = option(4, help="latent channels")
    kl_weight: float = option(1e-6, help="weight of the autoencoder's KL term")
    vae_loss: str = option("l1", help="autoencoder reconstruction loss: l1 (sharper edges) | mse")
    object_weight: float = option(10.0, help="autoencoder loss weight of object pixels (pixels unlike the image's "
                                             "corner, i.e. not background) relative to background pixels")
    # denoiser and text encoder
    steps: int = option(1600, help="UNet (+ scratch text encoder) optimizer steps")
    batch_size: int = option(32, help="pairs per diffusion batch")
    lr: float = option(2e-3, help="peak AdamW learning rate of the UNet (and scratch text encoder; linear warm-up, "
                                  "cosine decay)")
    warmup: int = option(50, help="warm-up steps")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    unet_channels: list[int] = option(None, factory=lambda: [32, 64, 64],
                                      help="UNet block widths; each block but the last halves the resolution")
    unet_attention: list[bool] = option(None, factory=lambda: [False, True, True],
                                        help="per UNet block: cross-attend to the prompt (the mid block always does)")
    layers_per_block: int = option(1, help="resnet layers per UNet block")
    head_dim: int = option(16, help="attention head width in the UNet")
    text_encoder: str = option("shapes-clip", help="shapes-clip: the text tower of the shapes-clip zoo model, "
                                                   "converted to a CLIPTextModel and frozen (as SD uses CLIP's); "
                                                   "scratch: a new CLIPTextModel trained with the UNet")
    text_width: int = option(64, help="scratch text encoder: width (= the UNet's cross-attention width)")
    text_layers: int = option(2, help="scratch text encoder: blocks")
    text_heads: int = option(4, help="scratch text encoder: attention heads")
    context_length: int = option(32, help="scratch text encoder: prompt tokens (the tokenizer's model_max_length)")
    cond_drop: float = option(0.1, help="fraction of training prompts replaced by the empty prompt (for guidance)")
    snr_gamma: float = option(5.0, help="min-SNR loss weighting gamma (0: plain noise-prediction MSE)")
    ema: float = option(0.995, help="decay of the moving average of the UNet weights that is saved (0: last weights)")
    # evaluation
    sample_steps: int = option(20, help="DDIM steps when generating for the evaluation")
    guidance_scale: float = option(4.0, help="classifier-free guidance scale for the evaluation")
    eval_seeds: int = option(2, help="images per prompt in the evaluation (100 prompts: every colour x shape)")
    eval_clip: bool = option(True, help="judge generated images with the shapes-clip zoo model (trained on first use)")
    clip_folder: str = option("", help="a trained shapes-clip folder for the text encoder and the judge "
                                       "(default: the zoo's: cached, else shipped, else trained)")
    cnn_steps: int = option(300, help="steps of the second judge, a small CNN trained on real renders (0: none)")
    cnn_train: int = option(4000, help="real renders the CNN judge is trained on")
    threads: int = option(0, help="torch CPU threads while training (0: leave torch's setting)")


# -- the parts -----------------------------------------------------------------------

def clip_tokenizer(context_length: int = 77):
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


def text_encoder_from_open_clip(model: Any):
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


def shapes_clip_text_encoder(folder: str = ""):
    """(text encoder, tokenizer, source folder) from the shapes-clip zoo model (cache, shipped copy or trained)."""
    from multimodal.zoo import load_model, resolve_model_dir

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


def assemble(parts: dict[str, Any]):
    """The StableDiffusionPipeline of ``parts`` (no safety checker: ShapesWorld is shapes)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def quiet_loading():
    """No diffusers / transformers progress bars while saving or loading a few-megabyte pipeline."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    previous = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in previous:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in previous:
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


def load_shipped_pipeline(folder: str | Path, device: Any = "cpu"):
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


def load_pipeline(folder: str | Path, device: Any = "cpu"):
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


# -- data ---------------------------------------------------------------------------

def world_config(overrides: dict[str, Any]):
    return training_world(overrides, NAME)


def render(world, indices: Sequence[int]) -> tuple[Tensor, list[str], list[dict]]:
    """uint8 images (n, 3, H, W), captions and metadata of ShapesWorld records ``indices``."""
    from multimodal.shapesworld import render_tensors

    return render_tensors(world, indices)


def tokenize(tokenizer, texts: Sequence[str]) -> Tensor:
    """(n, model_max_length) ids, padded and truncated exactly as the pipeline's ``encode_prompt`` does."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# -- training -----------------------------------------------------------------------

def _cosine(step: int, total: int, peak: float, warmup: int = 0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def object_mask(x: Tensor, threshold: float = 0.1) -> Tensor:
    """(n, 1, H, W) 1.0 where a pixel differs from its image's top-left corner (the plain background).

    An object covers a few percent of a 32x32 image: with a plain pixel MSE the
    autoencoder first learns the background and blurs the shapes, which are all
    the prompts are about.
    """
    return ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > threshold).float()


def train_autoencoder(vae, pixels: Tensor, cfg: ShapesDiffusionConfig, generator: torch.Generator,
                      progress: bool = True) -> list[float]:
    """Fit ``vae`` to ``pixels`` ((n, 3, H, W) in [-1, 1]); returns the reconstruction MSE per step."""
    vae.train()
    with torch.no_grad():  # start nearly deterministic: posterior std e^-4, not 1, so latents are not drowned in noise
        vae.encoder.conv_out.bias[cfg.latent_channels:] = 0.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    bar = training_bar(cfg.vae_steps, "train shapes-diffusion autoencoder", progress)
    for step in range(cfg.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, cfg.vae_steps, cfg.vae_lr, warmup=min(20, cfg.vae_steps // 10))
        x = pixels[torch.randint(pixels.shape[0], (cfg.vae_batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        diff = vae.decode(z).sample - x
        error = diff.abs() if cfg.vae_loss == "l1" else diff.pow(2)
        weights = 1 + (cfg.object_weight - 1) * object_mask(x)
        mse = diff.pow(2).mean()
        loss = (weights * error).sum() / (weights.sum() * 3) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(mse.item())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, pixels: Tensor, batch_size: int = 256) -> Tensor:
    """Posterior means of ``pixels`` ((n, 3, H, W) in [-1, 1]), unscaled: (n, C, h, w)."""
    return torch.cat([vae.encode(pixels[i: i + batch_size]).latent_dist.mean
                      for i in range(0, pixels.shape[0], batch_size)])


def min_snr_weights(scheduler, timesteps: Tensor, gamma: float) -> Tensor:
    """min(SNR, gamma) / SNR per timestep: the min-SNR weighting of the noise-prediction loss
    (Hang et al. 2023), which keeps the easy low-noise steps from dominating training."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def train_shapes_diffusion(out_dir: Path, cfg: ShapesDiffusionConfig, progress: bool = True) -> dict[str, Any]:
    """Train into ``out_dir`` (save_pretrained layout); returns the report (settings, losses, evaluation)."""
    import diffusers
    import transformers

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not 0 <= cfg.cond_drop < 1:
        raise VlsaeError(f"cond_drop must be a fraction in [0, 1), got {cfg.cond_drop}")
    if cfg.text_encoder not in ("shapes-clip", "scratch"):
        raise VlsaeError(f"text_encoder must be shapes-clip or scratch, got '{cfg.text_encoder}'")
    if cfg.vae_loss not in ("l1", "mse"):
        raise VlsaeError(f"vae_loss must be l1 or mse, got '{cfg.vae_loss}'")
    world = world_config(cfg.world)
    started = time.perf_counter()
    images, captions, _ = render(world, range(cfg.n_train))
    render_seconds = time.perf_counter() - started
    pixels = images.float() / 127.5 - 1

    frozen = cfg.text_encoder == "shapes-clip"
    encoder = encoder_tokenizer = None
    text_source = ""
    if frozen:
        encoder, encoder_tokenizer, text_source = shapes_clip_text_encoder(cfg.clip_folder)
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg, int(images.shape[-1]), encoder, encoder_tokenizer)
    vae, unet, text_encoder, tokenizer = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    generator = torch.Generator().manual_seed(cfg.seed + 1)

    tick = time.perf_counter()
    vae_losses = train_autoencoder(vae, pixels, cfg, generator, progress)
    latents = encode_latents(vae, pixels)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    vae_seconds = time.perf_counter() - tick

    # captions repeat: tokenise (and, for a frozen encoder, encode) each distinct one once
    distinct = sorted(set(captions))
    where = {caption: i for i, caption in enumerate(distinct)}
    caption_index = torch.tensor([where[c] for c in captions])
    ids = tokenize(tokenizer, distinct)
    empty = tokenize(tokenizer, [""])
    truncated = int((ids[:, -1] != tokenizer.pad_token_id).sum())
    if frozen:
        text_encoder.requires_grad_(False)
        with torch.no_grad():
            encoded = torch.cat([text_encoder(ids[i: i + 256]).last_hidden_state for i in range(0, len(distinct), 256)])
            encoded_empty = text_encoder(empty).last_hidden_state
    noise_scheduler = diffusers.DDPMScheduler.from_config(parts["scheduler"].config)
    params = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    unet.train()
    text_encoder.train(not frozen)
    # the saved UNet is a moving average of its weights: smoother samples than the last noisy step's
    averaged = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    ema = [p.detach().clone() for p in averaged] if cfg.ema > 0 else []
    losses: list[float] = []
    bar = training_bar(cfg.steps, "train shapes-diffusion", progress)
    tick = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        batch = torch.randint(cfg.n_train, (cfg.batch_size,), generator=generator)
        x0 = latents[batch]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.cond_drop
        if frozen:
            hidden = torch.where(dropped.view(-1, 1, 1), encoded_empty, encoded[caption_index[batch]])
        else:
            prompt = ids[caption_index[batch]]
            prompt[dropped] = empty[0]
            hidden = text_encoder(prompt).last_hidden_state
        predicted = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        per_sample = (predicted - noise).pow(2).mean(dim=(1, 2, 3))
        weights = (min_snr_weights(noise_scheduler, t, cfg.snr_gamma) if cfg.snr_gamma > 0
                   else torch.ones_like(per_sample))
        loss = (weights * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema:
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in averaged], 1 - decay)
        losses.append(per_sample.mean().item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    diffusion_seconds = time.perf_counter() - tick
    with torch.no_grad():
        for p, average in zip(averaged if ema else [], ema):
            p.copy_(average)
    unet.eval()
    text_encoder.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = assemble(parts)
    with quiet_loading():
        pipe.save_pretrained(str(out_dir), safe_serialization=True)

    tick = time.perf_counter()
    evaluation = evaluate_pipeline(pipe, world, cfg, progress=progress)
    window = max(1, cfg.steps // 20)
    return {
        "config": to_dict(cfg),
        "world": to_dict(world),
        "metrics": {**evaluation, "vae_mse": sum(vae_losses[-20:]) / max(1, len(vae_losses[-20:])),
                    "latent_scale": scale, "first_loss": sum(losses[:window]) / window,
                    "final_loss": sum(losses[-window:]) / window, "truncated_captions": truncated},
        "loss_curve": [round(sum(losses[i: i + window]) / len(losses[i: i + window]), 4)
                       for i in range(0, len(losses), window)],
        "parameters": {name: sum(p.numel() for p in parts[name].parameters())
                       for name in ("vae", "unet", "text_encoder")},
        "text_encoder": {"source": cfg.text_encoder, "folder": text_source, "frozen": frozen,
                         "distinct_captions": len(distinct)},
        "timing": {"render_s": round(render_seconds, 1), "vae_s": round(vae_seconds, 1),
                   "diffusion_s": round(diffusion_seconds, 1), "eval_s": round(time.perf_counter() - tick, 1),
                   "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


# -- generating ---------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], guidance_scale: float = 4.0) -> tuple[Tensor, Tensor | None]:
    """(prompt_embeds, negative_prompt_embeds) as the pipeline computes them: (n, context, width) each;
    the negative ones (the empty prompt) are None without guidance. Edit them and pass them to :func:`generate`."""
    positive, negative = pipe.encode_prompt(list(prompts), pipe.device, 1, guidance_scale > 1.0, negative_prompt=None)
    return positive, negative


@torch.no_grad()
def generate(pipe, prompts: Sequence[str] | None = None, seed: int = 0, steps: int = 20, guidance_scale: float = 4.0,
             prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
             batch_size: int = 256) -> Tensor:
    """uint8 images (n, 3, H, W) for ``prompts`` or for ``prompt_embeds`` ((n, context, width)).

    Seeded: image i depends on ``seed`` and its position in the batch of
    ``batch_size`` it falls in, so the same call gives the same images.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise VlsaeError("generate needs prompts or prompt_embeds (one of the two)")
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
            if negative_prompt_embeds is not None:
                kwargs["negative_prompt_embeds"] = negative_prompt_embeds[start:stop]
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        images = pipe(**kwargs, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt").images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


# -- evaluation ---------------------------------------------------------------------

def eval_prompts(seeds: int) -> tuple[list[str], list[dict[str, str]]]:
    """"a COLOUR SHAPE" for every colour and shape, ``seeds`` times each, with the asked attributes."""
    from multimodal.shapesworld import vocabulary

    vocab = vocabulary()
    prompts, asked = [], []
    for _ in range(seeds):
        for colour in vocab["colour"]:
            for shape in vocab["shape"]:
                text = f"{colour} {shape}"
                prompts.append(("an " if text[0] in "aeiou" else "a ") + text)
                asked.append({"colour": colour, "shape": shape})
    return prompts, asked


def pixel_colours(images: Tensor, radius: float = 60.0) -> list[str | None]:
    """The ShapesWorld colour with the most pixels within ``radius`` (RGB distance, 0-255) of its value,
    per image ((n, 3, H, W) uint8); None when no pixel is near any colour. The backgrounds are greys
    (120-165) more than 100 away from every object colour, so only object pixels vote."""
    from multimodal.shapesworld import RGB

    names = list(RGB)
    reference = torch.tensor([RGB[c] for c in names], dtype=torch.float32)  # (10, 3)
    flat = images.float().permute(0, 2, 3, 1).reshape(images.shape[0], -1, 1, 3)
    near = (flat - reference).norm(dim=-1) < radius  # (n, pixels, 10)
    counts = near.sum(dim=1)
    best = counts.argmax(dim=1)
    return [names[int(b)] if int(c.max()) > 0 else None for b, c in zip(best, counts)]


class ClipJudge:
    """Zero-shot shape and colour of images with a trained shapes-clip, as its own evaluation does:
    softmax over every single-object description, summed per attribute value."""

    def __init__(self, loaded: Any):
        from multimodal.zoo.shapes_clip import object_descriptions

        self.model = loaded.model.eval()
        described = object_descriptions()
        self.values = [d for d, _ in described]
        ids = loaded.tokenizer([text for _, text in described])
        with torch.no_grad():
            self.text = torch.cat([self.model.encode_text(ids[i: i + 512], normalize=True)
                                   for i in range(0, ids.shape[0], 512)])
        size = getattr(self.model.visual, "image_size", 64)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @torch.no_grad()
    def classify(self, images: Tensor, attributes: Sequence[str] = ("shape", "colour")) -> dict[str, list[str]]:
        """attribute -> predicted value per image; images: (n, 3, H, W) uint8, resized to the model's input."""
        from multimodal.shapesworld import vocabulary
        from multimodal.zoo.shapes_clip import normalise

        x = images.float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 255)
        embedded = torch.cat([self.model.encode_image(normalise(x[i: i + 256]), normalize=True)
                              for i in range(0, x.shape[0], 256)])
        log_probs = torch.log_softmax(self.model.logit_scale.exp() * embedded @ self.text.T, dim=1)
        vocab = vocabulary()
        out = {}
        for attribute in attributes:
            values = list(vocab[attribute])
            labels = torch.tensor([values.index(v[attribute]) for v in self.values])
            scores = torch.stack([torch.logsumexp(log_probs[:, labels == k], dim=1) for k in range(len(values))], dim=1)
            out[attribute] = [values[int(k)] for k in scores.argmax(dim=1)]
        return out


class CnnJudge(torch.nn.Module):
    """A small CNN that reads the shape and colour of single-object renders: a second judge.

    shapes-clip's zero-shot shape reading is below its colour reading (86 vs
    100 percent on held-out single-object renders; 50 percent for the first,
    600-step model), so a low shape score by it alone says little about the
    generator. This classifier is trained (seeded, seconds) on
    real renders of the training world, with random blur so that a soft but
    recognisable shape still counts; its accuracy on held-out real renders is
    reported next to its verdict on generated images.
    """

    def __init__(self, classes: dict[str, int], width: int = 16):
        super().__init__()
        self.classes = dict(classes)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(4 * width, n) for a, n in classes.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images: (n, 3, H, W) uint8 -> attribute -> (n, classes) logits."""
        x = self.features(images.float() / 127.5 - 1)
        return {a: head(x) for a, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images: Tensor) -> dict[str, list[str]]:
        from multimodal.shapesworld import vocabulary

        vocab = vocabulary()
        logits = self(images)
        return {a: [vocab[a][int(k)] for k in out.argmax(dim=1)] for a, out in logits.items()}


def _blur(images: Tensor, generator: torch.Generator) -> Tensor:
    """Half the images box-blurred (3x3): generated images are softer than renders."""
    blurred = F.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(images.shape[0], generator=generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(pick, blurred, images.float()).round().to(torch.uint8)


def train_cnn_judge(world, seed: int, n: int = 4000, steps: int = 300, batch_size: int = 64) -> CnnJudge:
    """A :class:`CnnJudge` trained on ``n`` renders of ``world`` (indices 20,000,000 on: not the test renders)."""
    from multimodal.shapesworld import vocabulary

    vocab = vocabulary()
    images, _, metas = render(world, range(2 * EVAL_OFFSET, 2 * EVAL_OFFSET + n))
    labels = {a: torch.tensor([vocab[a].index(m["objects"][0][a]) for m in metas]) for a in ("shape", "colour")}
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        judge = CnnJudge({a: len(vocab[a]) for a in labels})
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, steps, 3e-3, warmup=10)
        batch = torch.randint(n, (batch_size,), generator=generator)
        logits = judge(_blur(images[batch], generator))
        loss = sum(F.cross_entropy(logits[a], labels[a][batch]) for a in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return judge.eval()


def _rate(predicted: Sequence[Any], truth: Sequence[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth)) / max(1, len(truth))


@torch.no_grad()
def autoencode(vae, images: Tensor, batch_size: int = 256) -> Tensor:
    """uint8 images (n, 3, H, W) through the autoencoder and back (posterior mean): what the
    generator's output could at best look like."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size].to(vae.device, vae.dtype) / 127.5 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def _judge_rates(judge: Any, generated: Tensor, asked: list[dict[str, str]], real: Tensor,
                 real_truth: list[dict[str, str]], roundtrip: Tensor | None = None) -> dict[str, Any]:
    """attribute -> {match, real, real_autoencoded, chance, per_value} for one judge (anything with ``classify``)."""
    from multimodal.shapesworld import vocabulary

    vocab = vocabulary()
    on_generated, on_real = judge.classify(generated), judge.classify(real)
    on_roundtrip = judge.classify(roundtrip) if roundtrip is not None else None
    out: dict[str, Any] = {}
    for attribute in ("colour", "shape"):
        truth = [a[attribute] for a in asked]
        real_values = [o[attribute] for o in real_truth]
        out[attribute] = {"match": _rate(on_generated[attribute], truth),
                          "real": _rate(on_real[attribute], real_values),
                          "chance": 1 / len(vocab[attribute]),
                          "per_value": {v: _rate([p for p, t in zip(on_generated[attribute], truth) if t == v],
                                                 [v] * truth.count(v)) for v in vocab[attribute]}}
        if on_roundtrip is not None:
            out[attribute]["real_autoencoded"] = _rate(on_roundtrip[attribute], real_values)
    return out


def evaluate_pipeline(pipe, world, cfg: ShapesDiffusionConfig, progress: bool = False,
                      judge: ClipJudge | None = None) -> dict[str, Any]:
    """Colour and shape match rates of generated images against their prompts.

    Judges: ``clip``, shapes-clip's zero-shot reading (when ``cfg.eval_clip``);
    ``cnn``, a small classifier trained on real renders (when ``cfg.cnn_steps``);
    ``pixel_colour``, the pixel colour check. Each comes with the same judge's
    rate on real renders of the training world (``real``): what a perfect
    generator would score, and on those renders passed through the autoencoder
    (``real_autoencoded``): what a generator limited only by the autoencoder's
    blur would score. ``chance`` is 1 / classes.
    """
    from multimodal.shapesworld import vocabulary

    prompts, asked = eval_prompts(cfg.eval_seeds)
    generated = generate(pipe, prompts, seed=cfg.seed, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    real, _, metas = render(world, range(EVAL_OFFSET, EVAL_OFFSET + len(prompts)))
    real_truth = [m["objects"][0] for m in metas]
    roundtrip = autoencode(pipe.vae, real)
    colours = [a["colour"] for a in asked]
    result: dict[str, Any] = {"n": len(prompts), "sample_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale,
                              "pixel_colour": {"match": _rate(pixel_colours(generated), colours),
                                               "real": _rate(pixel_colours(real), [o["colour"] for o in real_truth]),
                                               "chance": 1 / len(vocabulary()["colour"])}}
    if cfg.eval_clip:
        if judge is None:
            from multimodal.zoo import load_model

            judge = ClipJudge(load_model("shapes-clip", folder=cfg.clip_folder or None))
        result["clip"] = _judge_rates(judge, generated, asked, real, real_truth, roundtrip)
    if cfg.cnn_steps > 0:
        cnn = train_cnn_judge(world, cfg.seed, n=cfg.cnn_train, steps=cfg.cnn_steps)
        result["cnn"] = _judge_rates(cnn, generated, asked, real, real_truth, roundtrip)
    return result


# -- the zoo entry --------------------------------------------------------------------

@register_zoo_model(NAME)
class ShapesDiffusion(ZooModel):
    summary = ("small diffusers StableDiffusionPipeline (32x32; shapes-clip's text tower, frozen) "
               "trained on ShapesWorld prompts")
    files = FILES
    config_class = ShapesDiffusionConfig

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(cls.config_class, overrides, where="shapes-diffusion training config")
        return train_shapes_diffusion(out_dir, cfg, progress=progress)

    ship_exclude = ("text_encoder", "tokenizer")  # shapes-clip's text tower, shipped already with shapes-clip

    @classmethod
    def ship_extras(cls, source: Path) -> dict[str, str]:
        from transformers import CLIPTextModel

        report = json.loads((Path(source) / REPORT).read_text())
        if report.get("config", {}).get("text_encoder", "shapes-clip") != "shapes-clip":
            raise VlsaeError(f"only a {NAME} on shapes-clip's frozen text tower can be shipped without its text encoder")
        with quiet_loading():
            encoder = CLIPTextModel.from_pretrained(Path(source) / "text_encoder", use_safetensors=True)
        return {SHIPPED_TEXT_ENCODER: json.dumps({"source": "shapes-clip", "fingerprint": text_encoder_fingerprint(encoder)})}

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu"):
        """The trained ``StableDiffusionPipeline`` (its ``text_encoder``/``tokenizer`` are what the adapter reads)."""
        if (Path(folder) / SHIPPED_TEXT_ENCODER).is_file() and not (Path(folder) / "text_encoder").is_dir():
            return load_shipped_pipeline(cls.require_files(folder, shipped=True), device=device)
        folder = cls.require_files(folder)
        return load_pipeline(folder, device=device)

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
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
