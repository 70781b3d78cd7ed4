"""Judges that read the colour and shape of a generated ShapesWorld image, and their match rates.

A generator (the ``shapes-diffusion`` zoo model, or one steered by an
intervention) is scored by how often an independent reader finds the asked
attributes in its images. Three readers, each weak in its own way, so they are
reported side by side:

- :func:`pixel_colours`: the ShapesWorld colour most pixels are near; exact on
  renders, blind to shape;
- :class:`ClipJudge`: the ``shapes-clip`` zoo model, zero-shot over every
  single-object description, as its own evaluation reads images;
- :class:`CnnJudge`: a small CNN trained in seconds on real renders
  (:func:`train_cnn_judge`), a reader of shape that shares nothing with the
  generator's text encoder.

:func:`judge_rates` gives one judge's rates on generated images next to its
rates on real renders (its ceiling) and on autoencoded renders. This module is
outside the zoo's shapes-diffusion package so that evaluations and steering
experiments use the judges without importing a training recipe.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal.shapesworld import RGB, ShapesWorldConfig, render_tensors, vocabulary
from multimodal.zoo import cosine_lr, load_model
from multimodal.zoo.shapes_clip import normalise, object_descriptions

#: ShapesWorld indices from here on are the real reference renders judged beside generated images;
#: the CNN judge trains on indices from twice this on, so it never sees a reference render
EVAL_OFFSET = 10_000_000
ATTRIBUTES = ("colour", "shape")


class Judge(Protocol):
    """Anything that reads attributes of uint8 images (n, 3, H, W): attribute -> value per image."""

    def classify(self, images: Tensor) -> dict[str, list[str]]: ...


def pixel_colours(images: Tensor, radius: float = 60.0) -> list[str | None]:
    """The ShapesWorld colour with the most pixels within ``radius`` (RGB distance, 0-255) of its value,
    per image ((n, 3, H, W) uint8); None when no pixel is near any colour. The backgrounds are greys
    (120-165) more than 100 away from every object colour, so only object pixels vote."""
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
        """``loaded``: the shapes-clip zoo model as :func:`multimodal.zoo.load_model` returns it."""
        self.model = loaded.model.eval()
        described = object_descriptions()
        self.values = [d for d, _ in described]
        ids = loaded.tokenizer([text for _, text in described])
        with torch.no_grad():
            self.text = torch.cat([self.model.encode_text(ids[i: i + 512], normalize=True)
                                   for i in range(0, ids.shape[0], 512)])
        size = getattr(self.model.visual, "image_size", 64)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @classmethod
    def from_zoo(cls, folder: str | None = None, device: Any = "cpu") -> ClipJudge:
        """The judge on the zoo's shapes-clip (``folder``, else cached, else shipped, else trained)."""
        return cls(load_model("shapes-clip", device=device, folder=folder or None))

    @torch.no_grad()
    def classify(self, images: Tensor, attributes: Sequence[str] = ("shape", "colour")) -> dict[str, list[str]]:
        """attribute -> predicted value per image; images: (n, 3, H, W) uint8, resized to the model's input."""
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
        """attribute -> predicted value per image ((n, 3, H, W) uint8)."""
        vocab = vocabulary()
        logits = self(images)
        return {a: [vocab[a][int(k)] for k in out.argmax(dim=1)] for a, out in logits.items()}


def _blur(images: Tensor, generator: torch.Generator) -> Tensor:
    """Half the images box-blurred (3x3): generated images are softer than renders."""
    blurred = F.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(images.shape[0], generator=generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(pick, blurred, images.float()).round().to(torch.uint8)


def train_cnn_judge(world: ShapesWorldConfig, seed: int, n: int = 4000, steps: int = 300,
                    batch_size: int = 64) -> CnnJudge:
    """A :class:`CnnJudge` trained on ``n`` single-object renders of ``world`` (indices from
    2 * :data:`EVAL_OFFSET` on: never the reference renders it is checked on)."""
    vocab = vocabulary()
    images, _, metas = render_tensors(world, range(2 * EVAL_OFFSET, 2 * EVAL_OFFSET + n))
    labels = {a: torch.tensor([vocab[a].index(m["objects"][0][a]) for m in metas]) for a in ("shape", "colour")}
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        judge = CnnJudge({a: len(vocab[a]) for a in labels})
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 3e-3, warmup=10)
        batch = torch.randint(n, (batch_size,), generator=generator)
        logits = judge(_blur(images[batch], generator))
        loss = sum(F.cross_entropy(logits[a], labels[a][batch]) for a in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return judge.eval()


def match_rate(predicted: Sequence[Any], truth: Sequence[str]) -> float:
    """Fraction of ``predicted`` equal to ``truth`` position by position (0 for no images)."""
    return sum(p == t for p, t in zip(predicted, truth)) / max(1, len(truth))


def judge_rates(judge: Judge, generated: Tensor, asked: list[dict[str, str]], real: Tensor,
                real_truth: list[dict[str, str]], roundtrip: Tensor | None = None) -> dict[str, Any]:
    """attribute -> {match, real, real_autoencoded, chance, per_value} for one judge.

    ``match``: how often the judge reads in ``generated`` the attribute ``asked``
    of it; ``real``: its rate on the renders ``real`` of truth ``real_truth``
    (what a perfect generator would score); ``real_autoencoded``: on
    ``roundtrip``, those renders through the autoencoder (when given);
    ``per_value``: ``match`` per asked value.
    """
    vocab = vocabulary()
    on_generated, on_real = judge.classify(generated), judge.classify(real)
    on_roundtrip = judge.classify(roundtrip) if roundtrip is not None else None
    out: dict[str, Any] = {}
    for attribute in ATTRIBUTES:
        truth = [a[attribute] for a in asked]
        real_values = [o[attribute] for o in real_truth]
        out[attribute] = {"match": match_rate(on_generated[attribute], truth),
                          "real": match_rate(on_real[attribute], real_values),
                          "chance": 1 / len(vocab[attribute]),
                          "per_value": {v: match_rate([p for p, t in zip(on_generated[attribute], truth) if t == v],
                                                      [v] * truth.count(v)) for v in vocab[attribute]}}
        if on_roundtrip is not None:
            out[attribute]["real_autoencoded"] = match_rate(on_roundtrip[attribute], real_values)
    return out


def pixel_colour_rates(generated: Tensor, asked: list[dict[str, str]], real: Tensor,
                       real_truth: list[dict[str, str]]) -> dict[str, float]:
    """{match, real, chance} of the pixel colour check (it reads colour only)."""
    return {"match": match_rate(pixel_colours(generated), [a["colour"] for a in asked]),
            "real": match_rate(pixel_colours(real), [o["colour"] for o in real_truth]),
            "chance": 1 / len(vocabulary()["colour"])}


__all__ = ["EVAL_OFFSET", "ATTRIBUTES", "Judge", "cosine_lr", "pixel_colours", "ClipJudge", "CnnJudge",
           "train_cnn_judge", "match_rate", "judge_rates", "pixel_colour_rates"]
