"""timm image models: image activations only.

Spec: ``timm:NAME[:WEIGHTS_FILE|random]``

- NAME: any ``timm.create_model`` name, with or without a pretrained tag
  (``vit_small_patch16_224.augreg_in21k``).
- Left out, the weights are timm's pretrained ones for NAME, read from the
  Hugging Face cache (offline when ``HF_HUB_OFFLINE=1``); a file path loads that
  file; ``random`` builds the model with random weights.
- ``create_adapter(spec, model_kwargs={"img_size": 64})`` passes extra keyword
  arguments to ``timm.create_model``.

Hook points:

- ``final``: the pooled feature before the classifier (``forward_head(..., pre_logits=True)``);
- ``features``: the output of ``forward_features`` (ViTs: normed tokens; CNNs: the last feature map);
- every module timm lists in ``feature_info``: ``blocks.N`` for ViTs,
  ``layer1``..``layer4`` for ResNets, ``stages.N`` for ConvNeXt, ...

Token modes: ViT token outputs have a class token (``cls``) and patches after
``num_prefix_tokens`` prefix tokens; CNN feature maps are read as one token per
spatial position with no class token (use ``mean``, ``patch`` or ``all``).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.adapters import register_adapter
from multimodal.adapters.base import Adapter, BlockCapture, Extracted, Prepared, pair_fields, select_tokens, stack_images


def load_timm(name: str, weights: str | None, model_kwargs: dict[str, Any] | None = None):
    """(model in eval mode, eval transform) with one-line errors for unknown names and missing weights."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    kwargs = dict(model_kwargs or {})
    if not timm.is_model(name):
        base = name.split(".")[0]
        match = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(match)}? " if match else ""
        raise VlsaeError(f"timm has no model '{name}': {hint}see timm.list_models()")
    try:
        if weights == "random":
            model = timm.create_model(name, pretrained=False, **kwargs)
        elif weights:
            if not Path(weights).is_file():
                raise VlsaeError(f"timm weights file not found: {weights}")
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
        else:
            model = timm.create_model(name, pretrained=True, **kwargs)
    except VlsaeError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        if weights in (None, ""):
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            raise VlsaeError(
                f"pretrained weights for timm model '{name}' not found locally"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; pass a file: timm:{name}:/path/to/model.safetensors "
                f"(or timm:{name}:random for random weights)") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VlsaeError(f"could not build timm model '{name}' with weights {weights}: {first}") from None
    model.eval()
    config = resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # resolve_model_data_config still reports the pretrained size
        config["input_size"] = (3, *tuple(img_size))
    elif "img_size" in kwargs:
        size = kwargs["img_size"]
        config["input_size"] = (3, *(tuple(size) if isinstance(size, (tuple, list)) else (size, size)))
    transform = create_transform(**config, is_training=False)
    return model, transform, config


@register_adapter("timm")
class TimmAdapter(Adapter):
    usage = "timm:NAME[:WEIGHTS_FILE|random]"
    summary = "a timm image model: pooled feature or any block's tokens (image only)"
    modalities = ("image",)

    def __init__(self, model: Any, transform: Any, data_config: dict[str, Any], device: torch.device,
                 dtype: torch.dtype, name: str = "", weights: str | None = None):
        super().__init__(device, dtype)
        self.model = model.to(device).eval()
        self.transform = transform
        self.data_config = data_config
        self.name = name
        self.weights = weights
        self._modules = [info["module"] for info in getattr(model, "feature_info", [])]
        self._widths: dict[str, dict[str, int]] = {}

    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, model_kwargs: dict[str, Any] | None = None,
                  **options: Any) -> "TimmAdapter":
        if options:
            raise VlsaeError(f"timm adapter options are model_kwargs only, got {', '.join(options)}")
        name, sep, weights = rest.strip().partition(":")
        if not name:
            raise VlsaeError("timm spec needs a model name: timm:NAME[:WEIGHTS_FILE|random], e.g. timm:vit_small_patch16_224")
        model, transform, config = load_timm(name, weights or None, model_kwargs)
        return cls(model, transform, config, device, dtype, name=name, weights=weights or None)

    def hook_points(self) -> list[str]:
        return ["final", "features", *self._modules]

    def hook_modalities(self, point: str) -> tuple[str, ...]:
        return ("image",)

    def widths(self, hook: str) -> dict[str, int]:
        if hook not in self._widths:
            self.parse_hook(hook)
            from PIL import Image

            _, height, width = self.data_config["input_size"]
            probe = [{"key": "probe", "image": Image.new("RGB", (width, height)), "caption": None}]
            out = self.forward(self.prepare(probe), hook, "mean" if hook != "final" else "cls")
            self._widths[hook] = {"image": int(out["image"].shape[1])}
        return dict(self._widths[hook])

    def prepare(self, pairs: Sequence[Any], modalities: Sequence[str] | None = None) -> Prepared:
        fields = [pair_fields(p) for p in pairs]
        return Prepared(keys=[str(k) for k, _, _ in fields],
                        inputs={"image": stack_images((img for _, img, _ in fields), self.transform)})

    def forward(self, prepared: Prepared, hook: str, tokens: str) -> Extracted:
        tokens = self.check_tokens(tokens)
        point = self.parse_hook(hook)["image"]
        x = prepared.inputs["image"].to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            if point == "final":
                if tokens != "cls":
                    raise VlsaeError("hook 'final' gives one pooled feature per image; use --tokens cls")
                out = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                rows, index = out, torch.arange(out.shape[0])
            else:
                if point == "features":
                    hidden = self.model.forward_features(x)
                else:
                    module = self.model.get_submodule(point)
                    with BlockCapture({0: module}) as capture:
                        capture.run(lambda: self.model.forward_features(x))
                    hidden = capture.outputs[0]
                rows, index = self._select(hidden, tokens)
        return self._finish(prepared.keys, {"image": rows}, {"image": index})

    def _select(self, hidden: Tensor, tokens: str) -> tuple[Tensor, Tensor]:
        if hidden.ndim == 4:  # a feature map: one token per position, no class token
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                hidden = hidden.flatten(1, 2)
            else:
                hidden = hidden.flatten(2).transpose(1, 2)
            prefix, has_cls = 0, False
        elif hidden.ndim == 3:
            prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            has_cls = getattr(self.model, "cls_token", None) is not None
        else:
            raise VlsaeError(f"hook output of shape {tuple(hidden.shape)} is not a token sequence or feature map; use hook 'final'")
        batch, seq, _ = hidden.shape
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        patch_mask = positions >= prefix
        cls_pos = torch.zeros(batch, dtype=torch.long, device=hidden.device) if has_cls else None
        return select_tokens(hidden, tokens, cls_pos, patch_mask, torch.ones_like(patch_mask))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "name": self.name, "weights": self.weights}
