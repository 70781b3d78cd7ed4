"""The hook context manager: interventions installed on a pipeline's text encoder(s), always removed.

    with Steering(pipe, [Add(sae=hooked, latents=[17], strength=4)]):
        images = generate(pipe, ["a red circle"] * 8, seed=0)

Forward hooks on the hook modules (diffusers' own pipeline runs unchanged, no
fork): a pre-hook on each text encoder records the token ids of the batch it
is running, and a forward hook on each steered module adds the interventions'
changes to its output, in the order given (a later one sees the earlier ones'
result). Which pass a row belongs to is read from its ids: a row that is the
empty prompt, tokenised as the pipeline tokenises it, is the unconditional
pass of classifier-free guidance (what SD 1.x/2.x encode for a missing
negative prompt). SDXL with ``force_zeros_for_empty_prompt`` never encodes an
unconditional prompt (its negative embeddings are zeros), so there the
unconditional part of ``cfg`` has nothing to edit.

The hooks are removed on exit whatever happened inside, an exception
included, and an intervention at strength 0 leaves the module's output
untouched, so steered generation at strength 0 is plain generation bit for bit.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.generation import generate
from steering.interventions import Intervention, edit_mask
from steering.points import resolve_point, text_adapter


def _ids_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    ids = args[0] if args else kwargs.get("input_ids")
    return ids if isinstance(ids, Tensor) else None


class Steering:
    """Installs ``interventions`` on ``pipe``'s text encoder(s) for the duration of a ``with`` block.

    ``pipe``: a diffusers Stable Diffusion / SDXL pipeline (or its
    :class:`~multimodal.adapters.diffusers_text.DiffusersTextAdapter`).
    ``calls`` counts the rows steered per pass (``cond``, ``uncond``), so a
    caller can check the edit reached both passes.
    """

    def __init__(self, pipe: Any, interventions: Sequence[Intervention]):
        self.adapter = text_adapter(pipe)
        self.interventions = list(interventions)
        for intervention in self.interventions:
            intervention.check()
            resolve_point(self.adapter, intervention.point)
        self.calls: dict[str, int] = {"cond": 0, "uncond": 0}
        self._handles: list[Any] = []
        self._ids: dict[str, Tensor | None] = {}
        self._empty: dict[tuple[str, int], Tensor] = {}

    # -- installing -----------------------------------------------------------
    def __enter__(self) -> "Steering":
        if self._handles:
            raise VlsaeError("this Steering context is already active; create a new one to nest")
        by_point: dict[str, list[Intervention]] = defaultdict(list)
        for intervention in self.interventions:
            by_point[intervention.point].append(intervention)
        try:
            for name in sorted({point.split(".", 1)[0] for point in by_point}):
                model = self.adapter.encoders[name].model
                self._handles.append(model.register_forward_pre_hook(self._recorder(name), with_kwargs=True))
            for point, group in by_point.items():
                module = self.adapter.hook_module(point)
                # prepend: run before transformers' own output-recording hooks, so hidden_states (SDXL reads
                # the penultimate one) hold the steered states
                self._handles.append(module.register_forward_hook(self._editor(point.split(".", 1)[0], group),
                                                                  prepend=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this context installed (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._ids.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # -- the hooks ------------------------------------------------------------
    def _recorder(self, name: str) -> Any:
        def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._ids[name] = _ids_of(args, kwargs)
        return record

    def _unconditional(self, name: str, ids: Tensor) -> Tensor:
        """(rows,) bool: which rows are the empty prompt as the pipeline tokenises it (padded to ids' length)."""
        key = (name, int(ids.shape[1]))
        if key not in self._empty:
            tokenizer = self.adapter.encoders[name].tokenizer
            empty = tokenizer([""], padding="max_length", max_length=int(ids.shape[1]), truncation=True,
                              return_tensors="pt").input_ids[0]
            self._empty[key] = empty
        empty = self._empty[key].to(ids.device)
        return (ids == empty).all(dim=1)

    def _editor(self, name: str, group: list[Intervention]) -> Any:
        def edit(_module: Any, _inputs: Any, output: Any) -> Any:
            live = [i for i in group if not i.is_identity()]
            if not live:
                return None
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            ids = self._ids.get(name)
            if ids is None or tuple(ids.shape) != tuple(hidden.shape[:2]):
                raise VlsaeError(f"steering hook on {name} ran without the token ids of its batch "
                                 f"(the encoder was called in a way the hooks do not know)")
            uncond = self._unconditional(name, ids)
            self.calls["uncond"] += int(uncond.sum())
            self.calls["cond"] += int((~uncond).sum())
            for intervention in live:
                sign = torch.ones(hidden.shape[0], device=hidden.device, dtype=hidden.dtype)
                passes = getattr(intervention, "passes")
                if passes == "cond":
                    sign = torch.where(uncond, torch.zeros_like(sign), sign)
                elif passes == "cfg":
                    sign = torch.where(uncond, -torch.ones_like(sign), sign)
                if not bool((sign != 0).any()):
                    continue
                change = intervention.change(hidden, edit_mask(intervention, ids))
                steered = hidden + sign.view(-1, 1, 1) * change
                hidden = torch.where((sign != 0).view(-1, 1, 1), steered, hidden)
            if isinstance(output, tuple):
                return (hidden,) + tuple(output[1:])
            if isinstance(output, list):
                return [hidden] + list(output[1:])
            return hidden
        return edit


@torch.no_grad()
def steered_generate(pipe: Any, prompts: Sequence[str], interventions: Sequence[Intervention], seed: int = 0,
                     steps: int = 20, guidance_scale: float = 4.0, batch_size: int = 256) -> Tensor:
    """uint8 images (n, 3, H, W) of ``prompts`` generated with ``interventions`` installed.

    Seeded as :func:`multimodal.generation.generate` (image i's noise depends on
    ``seed`` and its place in the batch), so with the same prompts and seed an
    image and its unsteered counterpart start from the same noise.
    """
    with Steering(pipe, interventions):
        return generate(pipe, list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale,
                        batch_size=batch_size)


__all__ = ["Steering", "steered_generate"]
