"""``shapes-clip``: a small open_clip CLIP trained contrastively on ShapesWorld.

The model is a real ``open_clip.CLIP`` built from a custom config registered
with ``open_clip.add_model_config`` (a small ViT for 64x64 images and a small
causal text transformer with open_clip's own offline BPE tokenizer). It is
trained from scratch with a symmetric InfoNCE loss in which pairs with the same
caption in a batch count as positives of each other (ShapesWorld captions
repeat), on pairs rendered in memory from a seeded ShapesWorld. The folder it
is saved in loads with open_clip's own path,
``create_model_and_transforms("shapes-clip", pretrained=".../open_clip_model.safetensors")``,
and also as ``open_clip:local-dir:FOLDER``.

Evaluation (:func:`zero_shot_accuracy`): zero-shot classification of every
planted attribute (shape, colour, size, position) on held-out single-object
scenes (ShapesWorld indices the training never saw). The prompts are every
single-object description the ShapesWorld vocabulary can say; the probability
of an attribute value is CLIP's softmax probability summed over the
descriptions that name it (the other attributes are marginalised out).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from vlsae.config import from_dict, option, to_dict
from vlsae.errors import VlsaeError

from multimodal.quiet import quiet_root_logging
from multimodal.shapesworld import POSITION_PHRASES, SYNONYMS, ShapesWorldConfig, render_tensors, vocabulary
from multimodal.zoo import REPORT, ZooModel, cosine_lr, register_zoo_model, training_bar, training_world

ARCH = "shapes-clip"
WEIGHTS = "open_clip_model.safetensors"
CONFIG_FILE = f"{ARCH}.json"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults: the model's preprocess uses them
STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_OFFSET = 10_000_000  # held-out pairs are ShapesWorld indices from here on
SINGLE_OFFSET = 5_000_000  # the single-object training pairs (hard-negative groups) start here
# Captions that always name size and position: with ShapesWorld's default mention rates (0.6, 0.5) a
# contrastive batch is told apart by colour and shape alone and position is barely learnt.
TRAIN_WORLD = {"mention_size": 1.0, "mention_position": 1.0}
ZERO_SHOT_ATTRIBUTES = ("shape", "colour", "size", "position")
VISION_TOWERS = ("vit", "resnet")
RESNET_HEAD_WIDTH = 64  # open_clip's default head width: the attention pool gets 32 * resnet_width / 64 heads


@dataclass
class ContrastiveTrainingConfig:
    """What every contrastive zoo CLIP trains with (its data, batches, optimiser and vision tower)."""

    seed: int = option(0, help="seed of the model init and the batch order (the pairs' seed is world.seed)")
    steps: int = option(1500, help="optimizer steps (shapes-clip: 600 gave zero-shot shape 50 %, 1500 gives 86 %)")
    batch_size: int = option(256, help="pairs per contrastive batch")
    lr: float = option(2e-3, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    warmup: int = option(100, help="warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay on matrices")
    n_train: int = option(20_000, help="distinct ShapesWorld pairs (1-3 objects) rendered for training")
    n_single: int = option(20_000, help="distinct single-object pairs rendered for the hard-negative groups")
    hard_fraction: float = option(0.5, help="fraction of each batch made of hard-negative groups: single-object "
                                            "pairs that agree on every attribute but one")
    group_size: int = option(8, help="pairs per hard-negative group")
    swapped_negatives: float = option(0.0, help="fraction of each batch's 1-3-object pairs whose caption with one fact "
                                                "swapped joins the batch as an extra negative caption")
    n_eval: int = option(1_000, help="held-out single-object pairs for the zero-shot evaluation (0: no evaluation)")
    embed_dim: int = option(128, help="joint embedding width")
    vision_tower: str = option("vit", help="'vit': a ViT (patch_size, vision_width, vision_layers); 'resnet': open_clip's "
                                          "ModifiedResNet, the tower of CLIP RN50 (resnet_width, resnet_blocks)")
    patch_size: int = option(16, help="ViT patch size (64x64 images)")
    vision_width: int = option(128, help="vision transformer width")
    vision_layers: int = option(4, help="vision transformer blocks")
    resnet_width: int = option(16, help="ModifiedResNet stem width (its feature width is 32x this)")
    resnet_blocks: int = option(1, help="ModifiedResNet bottleneck blocks in each of its four stages")
    heads: int = option(4, help="attention heads (vision tower, and shapes-clip's text tower)")
    context_length: int = option(48, help="text tokens per caption (longer ones are truncated)")
    world: dict = option(None, factory=lambda: dict(TRAIN_WORLD),
                         help="ShapesWorldConfig overrides for the training pairs (default: captions name every size and position)")
    threads: int = option(0, help="torch CPU threads while training (0: leave torch's setting)")

    def __post_init__(self) -> None:
        for name in ("hard_fraction", "swapped_negatives"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise VlsaeError(f"{name} is a fraction of the batch: give a value from 0 to 1, not {getattr(self, name)}")
        if self.vision_tower not in VISION_TOWERS:
            raise VlsaeError(f"vision_tower must be one of {', '.join(VISION_TOWERS)}, not {self.vision_tower!r}")


@dataclass
class ShapesClipConfig(ContrastiveTrainingConfig):
    """Training settings of shapes-clip (``vlsae zoo train shapes-clip --set key=value``)."""

    text_width: int = option(128, help="text transformer width")
    text_layers: int = option(3, help="text transformer blocks")


def vision_config(cfg: ContrastiveTrainingConfig, image_size: int) -> dict[str, Any]:
    """open_clip's ``vision_cfg`` for the chosen tower (a list of stage depths is what makes open_clip build
    its ModifiedResNet, as for RN50's ``[3, 4, 6, 3]``)."""
    if cfg.vision_tower == "resnet":
        if image_size % 32:
            raise VlsaeError(f"the ResNet tower downsamples 32x: the image size ({image_size}) must be a multiple of 32")
        if cfg.resnet_width * 32 % RESNET_HEAD_WIDTH:
            raise VlsaeError(f"resnet_width must be a multiple of {RESNET_HEAD_WIDTH // 32} (attention-pool heads)")
        return {"image_size": image_size, "layers": [cfg.resnet_blocks] * 4, "width": cfg.resnet_width,
                "head_width": RESNET_HEAD_WIDTH}
    return {"image_size": image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
            "patch_size": cfg.patch_size, "head_width": cfg.vision_width // cfg.heads}


def model_config(cfg: ShapesClipConfig, image_size: int) -> dict[str, Any]:
    """The open_clip model config (what ``add_model_config`` registers)."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision_config(cfg, image_size),
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.text_width,
                     "heads": cfg.heads, "layers": cfg.text_layers},
    }


def register_config(folder: Path) -> None:
    """Register ``folder/shapes-clip.json`` with open_clip under the name ``shapes-clip``."""
    import open_clip

    open_clip.add_model_config(Path(folder) / CONFIG_FILE)


# -- data ---------------------------------------------------------------------------

def _render(world, indices, swapped: bool = False) -> tuple[Tensor, list[str], list[dict]]:
    """uint8 images (n, 3, H, W), captions and metadata of ShapesWorld pairs."""

    return render_tensors(world, indices, swapped=swapped)


def normalise(images: Tensor) -> Tensor:
    """uint8 (n, 3, H, W) -> the float tensor open_clip's preprocess gives for same-size images."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def single_world(world):
    """The training world restricted to single-object scenes (for hard-negative groups)."""

    return ShapesWorldConfig(**{**to_dict(world), "min_objects": 1, "max_objects": 1})


def hard_negative_groups(metas: list[dict], offset: int = 0, min_size: int = 2) -> list[list[Tensor]]:
    """For each attribute, groups of single-object pairs that agree on the other attributes.

    Returns one list per attribute (shape, colour, size, position) of index
    tensors (indices + ``offset``). A batch built from such groups can only be
    solved by reading the attribute that varies, which random batches of
    ShapesWorld, told apart by colour alone, rarely demand.
    """
    out: list[list[Tensor]] = []
    for varying in ZERO_SHOT_ATTRIBUTES:
        buckets: dict[tuple, list[int]] = {}
        for i, meta in enumerate(metas):
            obj = meta["objects"][0]
            buckets.setdefault(tuple(obj[a] for a in ZERO_SHOT_ATTRIBUTES if a != varying), []).append(i + offset)
        out.append([torch.tensor(v) for v in buckets.values() if len(v) >= min_size])
    return out


def sample_groups(groups: list[list[Tensor]], n_groups: int, size: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n_groups`` hard-negative groups (attribute, then group, then members drawn at random)."""
    picked = []
    for _ in range(n_groups):
        by_attribute = groups[int(torch.randint(len(groups), (1,), generator=generator))]
        group = by_attribute[int(torch.randint(len(by_attribute), (1,), generator=generator))]
        picked.append(group[torch.randperm(group.numel(), generator=generator)[:size]])
    return torch.cat(picked)


# -- training -----------------------------------------------------------------------

def contrastive_loss(image: Tensor, text: Tensor, ids: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE; rows with identical token ids are positives of each other.

    image: (batch, dim) and text: (batch + extra, dim) normalised embeddings;
    ids: (batch + extra, context) token ids. Text row i < batch is image i's
    caption; the extra rows are negative captions, which enter only the
    image-to-text direction (a swapped caption equal to another pair's
    caption counts as that pair's positive).
    """
    n = image.shape[0]
    logits = logit_scale.exp() * image @ text.T
    same = (ids[:n].unsqueeze(1) == ids.unsqueeze(0)).all(dim=-1).float()
    image_to_text = F.cross_entropy(logits, same / same.sum(dim=1, keepdim=True))
    text_to_image = F.cross_entropy(logits[:, :n].T, same[:, :n] / same[:, :n].sum(dim=1, keepdim=True))
    return 0.5 * (image_to_text + text_to_image)


@dataclass
class TrainingPairs:
    """What a contrastive zoo model trains on: rendered pairs and the hard-negative groups among them."""

    images: Tensor          # uint8 (n_train + n_single, 3, H, W)
    captions: list[str]
    n_train: int            # the first n_train pairs are the 1-3-object ones batches are drawn from
    groups: list[list[Tensor]]
    n_hard: int             # pairs per batch taken from hard-negative groups
    seconds: float
    swapped: Tensor | None = None  # (n_train,) index into captions of pair i's swapped caption, -1 when none


def training_pairs(world, cfg) -> TrainingPairs:
    """Render the training pairs of ``cfg`` (n_train, n_single, batch_size, hard_fraction, group_size)."""
    started = time.perf_counter()
    images, captions, metas = _render(world, range(cfg.n_train), swapped=bool(cfg.swapped_negatives))
    n_hard = int(round(cfg.batch_size * cfg.hard_fraction)) // cfg.group_size * cfg.group_size
    groups: list[list[Tensor]] = []
    if n_hard:
        single, single_captions, single_metas = _render(single_world(world), range(SINGLE_OFFSET, SINGLE_OFFSET + cfg.n_single))
        images, captions = torch.cat([images, single]), captions + single_captions
        groups = hard_negative_groups(single_metas, offset=cfg.n_train, min_size=2)
    swapped = None
    if cfg.swapped_negatives:
        swapped = torch.full((cfg.n_train,), -1, dtype=torch.long)
        for i, meta in enumerate(metas):
            if meta["swapped_caption"] is not None:
                swapped[i] = len(captions)
                captions.append(meta["swapped_caption"])
    return TrainingPairs(images, captions, cfg.n_train, groups, n_hard, time.perf_counter() - started, swapped)


def contrastive_steps(model, pairs: TrainingPairs, ids: Tensor, text_embeddings, cfg, desc: str,
                      progress: bool = True) -> list[float]:
    """Train ``model``'s parameters that require grad for ``cfg.steps`` steps; returns the losses.

    Each batch is ``batch_size - n_hard`` random 1-3-object pairs plus
    ``n_hard`` pairs from hard-negative groups, and (``swapped_negatives``)
    the swapped captions of some of the random pairs as extra negative
    captions, which have no image. ``text_embeddings(indices)``
    gives the normalised text embeddings of those pairs (the text tower, or a
    projection of precomputed features when the text tower is frozen).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    bar = training_bar(cfg.steps, desc, progress)
    order = torch.randperm(pairs.n_train, generator=generator)
    cursor = 0
    n_random = cfg.batch_size - pairs.n_hard
    for step in range(cfg.steps):
        if cursor + n_random > pairs.n_train:
            order, cursor = torch.randperm(pairs.n_train, generator=generator), 0
        batch = order[cursor: cursor + n_random]
        cursor += n_random
        negatives = batch[:0]
        if pairs.swapped is not None:
            swapped = pairs.swapped[batch]
            negatives = swapped[(swapped >= 0) & (torch.rand(swapped.shape, generator=generator) < cfg.swapped_negatives)]
        if pairs.n_hard:
            batch = torch.cat([batch, sample_groups(pairs.groups, pairs.n_hard // cfg.group_size, cfg.group_size, generator)])
        captions = torch.cat([batch, negatives])
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        image_emb = model.encode_image(normalise(pairs.images[batch]), normalize=True)
        loss = contrastive_loss(image_emb, text_embeddings(captions), ids[captions], model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    return losses


def write_folder(out_dir: Path, arch_name: str, arch: dict[str, Any], image_size: int) -> None:
    """The config files open_clip reads from a model folder (``NAME.json`` and ``open_clip_config.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{arch_name}.json").write_text(json.dumps(arch, indent=1))
    preprocess_cfg = {"size": image_size, "mean": list(MEAN), "std": list(STD)}
    (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": preprocess_cfg}, indent=1))


def save_and_report(out_dir: Path, model, tokenizer, arch_name: str, cfg, world, arch: dict[str, Any],
                    losses: list[float], timing: dict[str, Any], truncated: int, **extra: Any) -> dict[str, Any]:
    """Save the weights as an open_clip checkpoint, evaluate zero-shot (unless ``n_eval`` is 0), build the report."""
    import open_clip

    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"arch": arch_name, "format": "open_clip"})
    accuracy = (zero_shot_accuracy(model, tokenizer, world, range(EVAL_OFFSET, EVAL_OFFSET + cfg.n_eval))
                if cfg.n_eval else {})
    window = max(1, cfg.steps // 20)
    return {
        "config": to_dict(cfg),
        "world": to_dict(world),
        "model_config": arch,
        **extra,
        "metrics": {"zero_shot": accuracy, "final_loss": sum(losses[-window:]) / window,
                    "first_loss": sum(losses[:window]) / window, "truncated_captions": truncated},
        "loss_curve": [round(sum(losses[i: i + window]) / len(losses[i: i + window]), 4)
                       for i in range(0, len(losses), window)],
        "timing": {**timing, "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }


def create_untrained(arch: str):
    """``open_clip.create_model(arch)`` without its root-logger warning that no pretrained weights were
    loaded (training from scratch is the point here)."""
    import logging

    import open_clip


    with quiet_root_logging(logging.WARNING):
        return open_clip.create_model(arch)


def train_shapes_clip(out_dir: Path, cfg: ShapesClipConfig, progress: bool = True) -> dict[str, Any]:
    """Train into ``out_dir``; returns the report (settings, loss curve, zero-shot accuracy)."""
    import open_clip

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = training_world(cfg.world, ARCH)
    pairs = training_pairs(world, cfg)
    image_size = int(pairs.images.shape[-1])
    arch = model_config(cfg, image_size)
    write_folder(out_dir, ARCH, arch, image_size)
    register_config(out_dir)

    torch.manual_seed(cfg.seed)
    model = create_untrained(ARCH)
    tokenizer = open_clip.get_tokenizer(ARCH)
    ids = tokenizer(pairs.captions)
    truncated = int((ids[:, -1] != 0).sum())  # open_clip truncates long captions, keeping the end token
    model.train()
    started = time.perf_counter()
    losses = contrastive_steps(model, pairs, ids, lambda batch: model.encode_text(ids[batch], normalize=True), cfg,
                               "train shapes-clip", progress)
    timing = {"render_s": round(pairs.seconds, 1), "train_s": round(time.perf_counter() - started, 1)}
    return save_and_report(out_dir, model, tokenizer, ARCH, cfg, world, arch, losses, timing, truncated)


# -- zero-shot evaluation -----------------------------------------------------------

def object_descriptions() -> list[tuple[dict[str, str], str]]:
    """Every single-object caption the vocabulary can say with all four attributes named
    (each synonym and position phrase), with the attribute values it names."""

    vocab = vocabulary()
    out = []
    for shape, colour, size, position in itertools.product(vocab["shape"], vocab["colour"], vocab["size"], vocab["position"]):
        for size_word, shape_word, where in itertools.product(SYNONYMS.get(size, (size,)), SYNONYMS.get(shape, (shape,)),
                                                              POSITION_PHRASES[position]):
            text = f"{size_word} {colour} {shape_word} {where}"
            article = "an" if text[0] in "aeiou" else "a"
            out.append(({"shape": shape, "colour": colour, "size": size, "position": position}, f"{article} {text}"))
    return out


_TOKENS: dict[tuple[str, int], Tensor] = {}


def _description_tokens(tokenizer) -> Tensor:
    """Token ids of :func:`object_descriptions` (tokenising ~9k texts takes seconds: done once per process)."""
    key = (type(tokenizer).__name__, int(getattr(tokenizer, "context_length", 0)))
    if key not in _TOKENS:
        _TOKENS[key] = tokenizer([text for _, text in object_descriptions()])
    return _TOKENS[key]


def eval_world(world):
    """The held-out split: single-object scenes (one label per attribute), no caption noise."""

    return ShapesWorldConfig(**{**to_dict(world), "min_objects": 1, "max_objects": 1, "noise": 0.0,
                                "holdout_only": False, "holdout": ()})


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, world, indices, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """attribute -> {accuracy, chance, classes, n}: zero-shot classification of each attribute
    of single-object held-out scenes (``eval_world(world)``, records ``indices``).

    The prompts are every full single-object description the ShapesWorld
    vocabulary can say (:func:`object_descriptions`: all shapes, colours, sizes,
    positions, synonyms and position phrases). CLIP's softmax over them, at the
    model's own logit scale, gives a probability per description; the
    probability of an attribute value is the sum over the descriptions naming
    it (the other attributes are marginalised out), and the prediction is the
    most probable value. ``chance`` is the majority-class rate.
    """

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images, _, metas = _render(eval_world(world), indices)
    image_emb = torch.cat([model.encode_image(normalise(images[i: i + batch_size]).to(device), normalize=True)
                           for i in range(0, images.shape[0], batch_size)])
    described = object_descriptions()
    ids = _description_tokens(tokenizer)
    text_emb = torch.cat([model.encode_text(ids[i: i + batch_size].to(device), normalize=True)
                          for i in range(0, ids.shape[0], batch_size)])
    log_probs = torch.log_softmax(model.logit_scale.exp() * image_emb @ text_emb.T, dim=1).cpu()
    vocab = vocabulary()
    results: dict[str, dict[str, float]] = {}
    for attribute in ZERO_SHOT_ATTRIBUTES:
        values = list(vocab[attribute])
        labels = torch.tensor([values.index(values_of[attribute]) for values_of, _ in described])
        scores = torch.stack([torch.logsumexp(log_probs[:, labels == v], dim=1) for v in range(len(values))], dim=1)
        predicted = scores.argmax(dim=1)
        truth = torch.tensor([values.index(meta["objects"][0][attribute]) for meta in metas])
        counts = torch.bincount(truth, minlength=len(values))
        results[attribute] = {"accuracy": float((predicted == truth).float().mean()),
                              "chance": float(counts.max()) / len(truth), "classes": len(values), "n": len(truth)}
    model.train(was_training)
    return results


# -- the zoo entry --------------------------------------------------------------------

@dataclass
class LoadedClip:
    """A trained shapes-clip: the open_clip model, its image transform and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    weights: Path
    report: dict[str, Any] = field(default_factory=dict)


@register_zoo_model(ARCH)
class ShapesClip(ZooModel):
    summary = "small open_clip CLIP (ViT 64x64 + text transformer) trained contrastively on ShapesWorld"
    files = (WEIGHTS, CONFIG_FILE, "open_clip_config.json")
    #: the training settings (read back from the report to evaluate with the same world)
    config_class: ClassVar[type] = ShapesClipConfig

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(cls.config_class, overrides, where=f"{cls.name} training config")
        return train_shapes_clip(out_dir, cfg, progress=progress)

    @classmethod
    def register(cls, folder: Path) -> None:
        """Make the folder's model config known to open_clip under the model's name."""
        register_config(folder)

    @classmethod
    def loading(cls) -> contextlib.AbstractContextManager:
        """Context the open_clip model is built in (subclasses quiet their libraries' load reports)."""
        return contextlib.nullcontext()

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu") -> LoadedClip:
        import open_clip

        folder = cls.require_files(folder)
        cls.register(folder)
        with cls.loading():
            model, _, preprocess = open_clip.create_model_and_transforms(cls.name, pretrained=str(folder / WEIGHTS),
                                                                         device=device)
        model.eval()
        report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).is_file() else {}
        return LoadedClip(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(cls.name),
                          weights=folder / WEIGHTS, report=report)

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
        loaded = cls.load(folder, device=device)
        cfg = from_dict(cls.config_class, loaded.report.get("config", {}), where=f"{cls.name} training config")
        world = training_world(cfg.world, cls.name)
        return {"zero_shot": zero_shot_accuracy(loaded.model, loaded.tokenizer, world,
                                                range(EVAL_OFFSET, EVAL_OFFSET + cfg.n_eval))}

    @classmethod
    def describe_report(cls, report: dict[str, Any]) -> str:
        metrics = report.get("metrics", {})
        lines = ["zero-shot attribute accuracy on held-out ShapesWorld pairs:"]
        for attribute, r in metrics.get("zero_shot", {}).items():
            lines.append(f"  {attribute:<10} {r['accuracy']:6.1%}   (chance {r['chance']:.1%}, {r['classes']} classes, n={r['n']})")
        if "final_loss" in metrics:
            lines.append(f"contrastive loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}")
        return "\n".join(lines)
