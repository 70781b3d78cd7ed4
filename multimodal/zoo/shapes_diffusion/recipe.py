"""shapes-diffusion's training recipe: autoencoder, then the UNet on cached latents and text states.

Seeded, on single-object ShapesWorld scenes rendered in memory:

1. the autoencoder, briefly (L1 with object pixels weighted up, since an object
   covers a few percent of the image, plus a tiny KL term); the latent scale is
   then set so the training latents have unit variance, as Stable Diffusion does;
2. the latents of every training image (posterior means) and the text-encoder
   states of every distinct caption are computed once;
3. the UNet with the DDPM noise-prediction loss (min-SNR weighted), 10% of
   prompts replaced by the empty prompt for classifier-free guidance; the saved
   weights are a moving average.

Only ``vlsae zoo train shapes-diffusion`` runs this. Generating and judging
(:mod:`multimodal.generation`, :mod:`multimodal.judges`) sit outside this
package, so steering and evaluation code imports none of it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlsae.config import to_dict
from vlsae.errors import VlsaeError

from multimodal.generation import tokenize
from multimodal.zoo import cosine_lr, training_bar
from multimodal.zoo.shapes_diffusion.build import assemble, build_parts, quiet_loading, shapes_clip_text_encoder
from multimodal.zoo.shapes_diffusion.config import ShapesDiffusionConfig, render, world_config
from multimodal.zoo.shapes_diffusion.evaluation import evaluate_pipeline


def object_mask(x: Tensor, threshold: float = 0.1) -> Tensor:
    """(n, 1, H, W) 1.0 where a pixel differs from its image's top-left corner (the plain background).

    An object covers a few percent of a 32x32 image: with a plain pixel MSE the
    autoencoder first learns the background and blurs the shapes, which are all
    the prompts are about.
    """
    return ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > threshold).float()


def train_autoencoder(vae: Any, pixels: Tensor, cfg: ShapesDiffusionConfig, generator: torch.Generator,
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
            group["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr, warmup=min(20, cfg.vae_steps // 10))
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
def encode_latents(vae: Any, pixels: Tensor, batch_size: int = 256) -> Tensor:
    """Posterior means of ``pixels`` ((n, 3, H, W) in [-1, 1]), unscaled: (n, C, h, w)."""
    return torch.cat([vae.encode(pixels[i: i + batch_size]).latent_dist.mean
                      for i in range(0, pixels.shape[0], batch_size)])


def min_snr_weights(scheduler: Any, timesteps: Tensor, gamma: float) -> Tensor:
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
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
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
