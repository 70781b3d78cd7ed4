"""shapes-diffusion's name, files, training settings and training world.

Kept apart from the parts and the recipe so that both (and the evaluation)
read one definition of what the model is trained on and with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor

from vlsae.config import option

from multimodal.shapesworld import ShapesWorldConfig, render_tensors
from multimodal.zoo import training_world

NAME = "shapes-diffusion"
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


def world_config(overrides: dict[str, Any]) -> ShapesWorldConfig:
    """The ShapesWorldConfig of ``overrides`` (a training config's ``world``; a bad key names this model)."""
    return training_world(overrides, NAME)


def render(world: ShapesWorldConfig, indices: Sequence[int]) -> tuple[Tensor, list[str], list[dict]]:
    """uint8 images (n, 3, H, W), captions and metadata of ShapesWorld records ``indices``."""
    return render_tensors(world, indices)
