"""open_clip CLIP models: image and text activations.

Spec: ``open_clip:ARCH[:WEIGHTS]``

- ARCH: a config name open_clip knows (built-in, or added with
  ``open_clip.add_model_config``), a path to such a config ``.json`` (it is
  registered under its file stem), a folder holding ``open_clip_config.json``
  and weights, or ``local-dir:PATH`` / ``hf-hub:ORG/REPO`` (open_clip's schemas).
- WEIGHTS: a pretrained tag (``laion2b_s34b_b79k``; read from the Hugging Face
  cache, offline when ``HF_HUB_OFFLINE=1``), a weights file (``.safetensors``
  preferred), or ``random``. Left out: random weights, with a warning.

Hook points (batch-first token tensors of the towers' residual blocks):

- ``final``: ``encode_image`` and ``encode_text`` (the joint embedding space;
  both modalities), ``visual.final`` / ``text.final`` for one of them;
- ``visual.blocks.N``: output of vision block N, tokens = class token + patches;
  for a ResNet tower (``RN50``, ``RN101``, ``RN50x4``...: open_clip's
  ModifiedResNet) block N is the N-th bottleneck block counted over the four
  stages (RN50: 0-2 layer1, 3-6 layer2, 7-12 layer3, 13-15 layer4), tokens =
  the positions of its feature map (no class token: use ``mean``, ``patch``
  or ``all``); for a timm CNN or hierarchical trunk (open_clip's ``convnext_*``
  models) block N is the N-th feature stage timm lists (ConvNeXt
  ``stages.N``, Swin ``layers.N``), tokens again its feature map's positions;
- ``text.blocks.N``: output of text block N, before ``ln_final``. The text
  tower is causal, so its ``cls`` row is the token open_clip pools: the
  end-of-text token for CLIP's ``argmax`` pooling (the first end-of-text token
  for ``eos`` pooling, the first/last position for ``first``/``last``).
  For a Hugging Face text tower (``text_cfg.hf_model_name``, e.g. BERT or
  RoBERTa, as in ``shapes-clip-minilm``) block N is encoder layer N; ``cls`` is
  the first token (``[CLS]``/``<s>``), ``all`` the non-padding tokens and
  ``patch`` those without the first and the end token.

Token modes are in :mod:`multimodal.adapters.base`. Hooks for two modalities
combine with a comma: ``visual.blocks.5,text.blocks.3``.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.adapters import register_adapter
from multimodal.adapters.base import Adapter, BlockCapture, Extracted, Prepared, pair_fields, select_tokens, stack_images
from multimodal.quiet import quiet_root_logging
from multimodal.zoo import load_model

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
_WEIGHT_SUFFIXES = {".safetensors", ".npz", ".npy"} | _PICKLE_SUFFIXES


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or Path(value).suffix in _WEIGHT_SUFFIXES


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def parse_open_clip_spec(rest: str) -> tuple[str, str | None]:
    """``ARCH[:WEIGHTS]`` -> (arch, weights or None); open_clip schemas keep their colon."""
    rest = rest.strip()
    if not rest:
        raise VlsaeError("open_clip spec needs an architecture: open_clip:ARCH[:WEIGHTS], e.g. open_clip:ViT-B-32:laion2b_s34b_b79k")
    for schema in ("local-dir:", "hf-hub:"):
        if rest.startswith(schema):
            return rest, None
    arch, sep, weights = rest.partition(":")
    return arch, (weights if sep and weights else None)


def load_open_clip(arch: str, weights: str | None, device: torch.device | str = "cpu", warn_random: bool = True):
    """(model in eval mode, image transform, tokenizer, resolved arch) for an open_clip spec.

    Every way loading can fail for a user reason becomes a one-line VlsaeError.
    """
    import open_clip

    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise VlsaeError(f"open_clip config file not found: {arch}")
        open_clip.add_model_config(path)
        arch = path.stem
    elif not arch.startswith(("local-dir:", "hf-hub:")) and Path(arch).is_dir():
        if not (Path(arch) / "open_clip_config.json").is_file():
            raise VlsaeError(f"{arch} is a folder without open_clip_config.json; pass open_clip:ARCH:{arch}/WEIGHTS_FILE instead")
        arch = f"local-dir:{arch}"
    if arch.startswith("local-dir:"):
        folder = Path(arch[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise VlsaeError(f"open_clip folder {folder} has no open_clip_config.json")
    elif not arch.startswith("hf-hub:") and open_clip.get_model_config(arch) is None:
        match = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(match)}? " if match else ""
        raise VlsaeError(f"open_clip has no architecture '{arch}': {hint}pass a built-in name, a config .json path, or local-dir:FOLDER")

    pretrained: str | None = None
    if weights is None or weights == "random":
        if weights is None and not arch.startswith(("local-dir:", "hf-hub:")) and warn_random:
            print(f"vlsae: open_clip:{arch} has no weights in its spec; using random weights "
                  f"(add ':random' to silence this, or ':TAG' / ':FILE' for real ones)", file=sys.stderr)
    elif _looks_like_path(weights) or Path(weights).exists():
        if not Path(weights).is_file():
            raise VlsaeError(f"open_clip weights file not found: {weights}")
        pretrained = weights
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if weights not in tags:
            raise VlsaeError(f"open_clip {arch} has no pretrained tag '{weights}'"
                             + (f"; known tags: {', '.join(tags)}" if tags else "; pass a weights file path instead"))
        pretrained = weights

    # open_clip logs a warning for random weights and errors for missing ones; ours say it in one line
    try:
        with quiet_root_logging(logging.ERROR):
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, OSError, ValueError) as exc:
        message = _first_line(exc)
        if pretrained is not None and pretrained == weights and not _looks_like_path(weights):
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            raise VlsaeError(
                f"weights '{weights}' for open_clip {arch} not found locally"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download them once where the hub is reachable, "
                f"or pass a file: open_clip:{arch}:/path/to/open_clip_model.safetensors") from None
        if pretrained is not None:
            raise VlsaeError(f"could not load {pretrained} into open_clip {arch}: {message}") from None
        raise VlsaeError(f"could not build open_clip {arch}: {message}") from None
    model.eval()
    return model, preprocess, tokenizer, arch


def _tower_parts(model: Any) -> dict[str, Any]:
    """Where the blocks of each tower are and how their tokens are laid out."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import TextTransformer, VisionTransformer

    parts: dict[str, Any] = {"image_blocks": [], "text_blocks": []}
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        parts.update(image_blocks=list(visual.transformer.resblocks), image_seq_first=not visual.transformer.batch_first,
                     image_prefix=1, image_has_cls=True)
    elif isinstance(visual, ModifiedResNet):  # CLIP RN50-style: every bottleneck block of the four stages
        blocks = [block for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4) for block in stage]
        parts.update(image_blocks=blocks, image_seq_first=False, image_prefix=0, image_has_cls=False)
    elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):  # timm vision tower
        trunk = visual.trunk
        parts.update(image_blocks=list(trunk.blocks), image_seq_first=False,
                     image_prefix=int(getattr(trunk, "num_prefix_tokens", 0)),
                     image_has_cls=getattr(trunk, "cls_token", None) is not None)
    elif hasattr(visual, "trunk") and getattr(visual.trunk, "feature_info", None):  # timm CNN / hierarchical trunk
        trunk = visual.trunk  # ConvNeXt (stages.N), Swin (layers.N, channels-last): the feature stages timm lists
        parts.update(image_blocks=[trunk.get_submodule(info["module"]) for info in trunk.feature_info],
                     image_seq_first=False, image_prefix=0, image_has_cls=False,
                     image_channels_last=getattr(trunk, "output_fmt", "NCHW") == "NHWC")
    text = getattr(model, "text", None)
    if text is None and hasattr(model, "transformer"):  # plain CLIP keeps the text tower on the model
        parts.update(text_blocks=list(model.transformer.resblocks), text_seq_first=not model.transformer.batch_first,
                     text_pool=model.text_pool_type, text_eos=getattr(model, "text_eos_id", None), text_cls_emb=False)
    elif isinstance(text, TextTransformer):
        parts.update(text_blocks=list(text.transformer.resblocks), text_seq_first=not text.transformer.batch_first,
                     text_pool=text.pool_type, text_eos=getattr(text, "eos_id", None),
                     text_cls_emb=getattr(text, "cls_emb", None) is not None)
    elif (hf_layers := _hf_layers(text)) is not None:  # open_clip's HFTextEncoder: a transformers encoder
        parts.update(text_blocks=hf_layers, text_seq_first=False, text_pool="hf",
                     text_pad=int(text.config.pad_token_id), text_cls_emb=False)
    return parts


def _hf_layers(text: Any) -> list[Any] | None:
    """The layers of a Hugging Face text tower (``text.transformer.encoder.layer`` for BERT-like models)."""
    encoder = getattr(getattr(text, "transformer", None), "encoder", None)
    layers = getattr(encoder, "layer", None) if encoder is not None else None
    return list(layers) if layers is not None and hasattr(text, "config") else None


def pooled_text_position(ids: Tensor, pool: str, eos_id: int | None, seq_len: int) -> Tensor:
    """(batch,) position of the token open_clip pools for each caption (see ``text_global_pool``)."""
    batch = ids.shape[0]
    if pool == "argmax":
        return ids.argmax(dim=-1)
    if pool == "eos" and eos_id is not None:
        return (ids == eos_id).int().argmax(dim=-1)
    if pool == "first":
        return torch.zeros(batch, dtype=torch.long, device=ids.device)
    return torch.full((batch,), seq_len - 1, dtype=torch.long, device=ids.device)


@register_adapter("open_clip")
class OpenClipAdapter(Adapter):
    usage = "open_clip:ARCH[:PRETRAINED_TAG|WEIGHTS_FILE|random]"
    summary = "an open_clip CLIP: image and text embeddings or any tower block's tokens"
    modalities = ("image", "text")

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 arch: str = "", weights: str | None = None):
        super().__init__(device, dtype)
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.arch = arch
        self.weights = weights
        self._parts = _tower_parts(model)
        self._widths: dict[str, dict[str, int]] = {}

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "OpenClipAdapter":
        if options:
            raise VlsaeError(f"open_clip adapter takes no options, got {', '.join(options)}")
        arch, weights = parse_open_clip_spec(rest)
        model, preprocess, tokenizer, arch = load_open_clip(arch, weights, device=device)
        return cls(model, preprocess, tokenizer, device, dtype, arch=arch, weights=weights)

    # -- hook points ----------------------------------------------------------
    def hook_points(self) -> list[str]:
        points = ["final", "visual.final", "text.final"]
        points += [f"visual.blocks.{i}" for i in range(len(self._parts["image_blocks"]))]
        points += [f"text.blocks.{i}" for i in range(len(self._parts["text_blocks"]))]
        return points

    def hook_modalities(self, point: str) -> tuple[str, ...]:
        if point == "final":
            return ("image", "text")
        return ("image",) if point.startswith("visual.") else ("text",)

    def widths(self, hook: str) -> dict[str, int]:
        if hook not in self._widths:
            points = self.parse_hook(hook)
            from PIL import Image

            size = self._image_size()
            probe = [{"key": "probe", "image": Image.new("RGB", (size, size)), "caption": "a"}]
            widths = {}
            for point in dict.fromkeys(points.values()):  # "all": a ResNet tower's blocks have no class token
                out = self.forward(self.prepare(probe, modalities=self.hook_modalities(point)), point,
                                   "cls" if point.endswith("final") else "all")
                widths.update({m: int(t.shape[1]) for m, t in out.acts.items()})
            self._widths[hook] = widths
        return dict(self._widths[hook])

    def _image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    # -- running --------------------------------------------------------------
    def prepare(self, pairs: Sequence[Any], modalities: Sequence[str] | None = None) -> Prepared:
        wanted = set(modalities or self.modalities)
        fields = [pair_fields(p) for p in pairs]
        keys = [str(k) for k, _, _ in fields]
        inputs: dict[str, Tensor] = {}
        if "image" in wanted:
            inputs["image"] = stack_images((img for _, img, _ in fields), self.preprocess)
        if "text" in wanted:
            captions = [c for _, _, c in fields]
            if any(c is None for c in captions):
                raise VlsaeError("a pair has no caption; text activations need the txt field of every record")
            inputs["text"] = self.tokenizer([str(c) for c in captions])
        return Prepared(keys=keys, inputs=inputs)

    def forward(self, prepared: Prepared, hook: str, tokens: str) -> Extracted:
        return self.forward_hooks(prepared, [hook], tokens)[hook]

    def forward_hooks(self, prepared: Prepared, hooks: Sequence[str], tokens: str) -> dict[str, Extracted]:
        """Every hook's activations from one pass per tower: the blocks of all hooks captured together,
        the tower run to its end only where a hook wants its final embedding."""
        tokens = self.check_tokens(tokens)
        wanted = {hook: self.parse_hook(hook) for hook in hooks}
        hidden: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}  # (modality, point) -> (rows, pair index)
        with torch.no_grad(), self.autocast():
            for modality in ("image", "text"):
                points = {p[modality] for p in wanted.values() if modality in p}
                if not points:
                    continue
                if modality not in prepared.inputs:
                    raise VlsaeError(f"batch was prepared without {modality} inputs for hook '{', '.join(hooks)}'")
                x = prepared.inputs[modality].to(self.device, non_blocking=True)
                if tokens != "cls" and any(p.endswith("final") for p in points):
                    raise VlsaeError(f"hook '{modality}.final' gives one embedding per input; use --tokens cls "
                                     "(token modes apply to block hooks such as visual.blocks.N)")
                hidden.update(self._tower(modality, x, points, tokens))
        return {hook: self._finish(prepared.keys, {m: hidden[m, p][0] for m, p in points.items()},
                                   {m: hidden[m, p][1] for m, p in points.items()})
                for hook, points in wanted.items()}

    def _tower(self, modality: str, x: Tensor, points: set[str], tokens: str) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
        """One pass of a tower capturing the blocks of ``points``; to its end if one of them is its final."""
        parts = self._parts
        kind = "image" if modality == "image" else "text"
        numbers = {p: int(p.rsplit(".", 1)[1]) for p in points if not p.endswith("final")}
        final = next((p for p in points if p.endswith("final")), None)
        blocks = {n: parts[f"{kind}_blocks"][n] for n in numbers.values()}
        encode = (lambda: self.model.encode_image(x)) if modality == "image" else (lambda: self.model.encode_text(x))
        if modality == "image" and final is None:
            encode = lambda: self.model.visual(x)  # noqa: E731 - the tower alone: no projection needed
        with BlockCapture(blocks, seq_first=parts[f"{kind}_seq_first"], stop=final is None) as capture:
            out = capture.run(encode)
        found: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        if final is not None:
            found[modality, final] = (out, torch.arange(out.shape[0]))
        for point, n in numbers.items():
            select = self._image_tokens if modality == "image" else self._text_tokens
            found[modality, point] = select(capture.outputs[n], x, tokens)
        return found

    def _image_tokens(self, hidden: Tensor, _x: Tensor, tokens: str) -> tuple[Tensor, Tensor]:
        parts = self._parts
        if hidden.ndim == 4:  # a CNN feature map (batch, channels, h, w): one token per position
            hidden = hidden.flatten(1, 2) if parts.get("image_channels_last") else hidden.flatten(2).transpose(1, 2)
        batch, seq, _ = hidden.shape
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        patch_mask = positions >= parts["image_prefix"]
        all_mask = torch.ones_like(patch_mask)
        cls_pos = torch.zeros(batch, dtype=torch.long, device=hidden.device) if parts["image_has_cls"] else None
        return select_tokens(hidden, tokens, cls_pos, patch_mask, all_mask)

    def _text_tokens(self, hidden: Tensor, ids: Tensor, tokens: str) -> tuple[Tensor, Tensor]:
        parts = self._parts
        batch, seq, _ = hidden.shape
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        pool = parts["text_pool"]
        if pool == "hf":  # bidirectional encoder: first token = [CLS], the last real one = [SEP]
            all_mask = ids != parts["text_pad"]
            last = all_mask.long().sum(dim=1, keepdim=True) - 1
            cls_pos = torch.zeros(batch, dtype=torch.long, device=hidden.device)
            patch_mask = all_mask & (positions != 0) & (positions != last)
            return select_tokens(hidden, tokens, cls_pos, patch_mask, all_mask)
        cls_pos = pooled_text_position(ids, pool, parts["text_eos"], seq)
        if pool in ("argmax", "eos"):
            all_mask = positions <= cls_pos.unsqueeze(1)
        else:
            real = ids != 0
            if seq > ids.shape[1]:  # a class embedding appended after the text tokens
                real = torch.cat([real, torch.ones(batch, seq - ids.shape[1], dtype=torch.bool, device=ids.device)], 1)
            all_mask = real
        patch_mask = all_mask & (positions != 0) & (positions != cls_pos.unsqueeze(1))
        if parts.get("text_cls_emb"):
            patch_mask &= positions < ids.shape[1]
        return select_tokens(hidden, tokens, cls_pos, patch_mask, all_mask)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "arch": self.arch, "weights": self.weights}


@register_adapter("shapes-clip")
class ShapesClipAdapter(OpenClipAdapter):
    usage = "shapes-clip"
    summary = "the embedded small CLIP trained on ShapesWorld (trained on first use, then cached)"
    zoo_name = "shapes-clip"

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "ShapesClipAdapter":
        if rest:
            raise VlsaeError(f"{cls.zoo_name} takes no arguments; for another checkpoint use open_clip:{cls.zoo_name}:FILE")

        loaded = load_model(cls.zoo_name, device=device, **options)
        return cls(loaded.model, loaded.preprocess, loaded.tokenizer, device, dtype, arch=cls.zoo_name,
                   weights=str(loaded.weights))


@register_adapter("shapes-clip-minilm")
class ShapesClipMiniLMAdapter(ShapesClipAdapter):
    usage = "shapes-clip-minilm"
    summary = "the embedded CLIP whose text tower is the real pretrained all-MiniLM-L6-v2 (trained on first use)"
    zoo_name = "shapes-clip-minilm"
