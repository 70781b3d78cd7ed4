"""Interventions on a text encoder's hidden states: one type per operation, composable.

Each intervention edits the output ``h`` (rows, context, width) of one hook
point and returns the *change* it makes, so the hook adds it and the SAE's
error term stays in place (h <- h - x_hat + x_hat_edited = h + the change):

- :class:`Add` (sdxl-unbox's feature addition): ``+ strength * scale_f * d_f``
  for each latent f, on the chosen token positions;
- :class:`Clamp` (SAeUron's replacement): latent f's activation set to
  ``value * scale_f`` where the SAE reads it, ``(value * scale_f - z_f) d_f``;
- :class:`Ablate`: ``- strength * z_f d_f`` (strength 1 removes the latent,
  more pushes past zero, as SAeUron's negative multipliers);
- :class:`Concept` (Concept Steerers, exact): the concept prompt's dense code
  through the decoder, ``strength * z_c W_dec`` (no bias), added position by
  position to the conditional pass and subtracted from the unconditional one;
- :class:`Delta`: any fixed position-aligned vector, e.g. the raw difference
  of two prompts' states (the no-SAE baseline of the steering benchmark).

``passes`` says where an edit goes under classifier-free guidance: ``cond``
(the prompt's pass only), ``both`` (the same edit on the unconditional pass)
or ``cfg`` (+ on the conditional, - on the unconditional: guidance then
amplifies the edit). ``scale_f`` puts strengths in units of a latent's usual
activation (:func:`steering.discovery.typical_activation`), so strength 1 of
a colour latent is "as strongly as the word itself makes it fire".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from steering.points import POSITION_MODES, HookedSAE, point_states, position_mask

PASSES = ("cond", "both", "cfg")


@dataclass
class Intervention:
    """Base: an edit of one hook point's output on some token positions and passes."""

    kind: ClassVar[str] = ""
    #: passes an operation may use (clamping an unconditional pass "negatively" means nothing)
    allowed_passes: ClassVar[tuple[str, ...]] = PASSES

    def check(self) -> None:
        """One-line errors for settings that cannot work (called by the hooks before installing)."""
        passes = getattr(self, "passes")
        if passes not in self.allowed_passes:
            raise VlsaeError(f"{self.kind} takes passes {' | '.join(self.allowed_passes)}, got '{passes}'")
        positions = getattr(self, "positions")
        if isinstance(positions, str) and positions not in POSITION_MODES:
            raise VlsaeError(f"unknown positions '{positions}'; use one of {', '.join(POSITION_MODES)} or token indices")

    @property
    def point(self) -> str:
        raise NotImplementedError

    @property
    def eos_id(self) -> int | None:
        return None

    def is_identity(self) -> bool:
        """True when the edit changes nothing (strength 0): the hook then leaves the output untouched, bit for bit."""
        return False

    def change(self, h: Tensor, mask: Tensor) -> Tensor:
        """The edit of a conditional pass: (rows, context, width) to add to ``h``, zero outside ``mask``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "point": self.point, "passes": getattr(self, "passes"),
                "positions": getattr(self, "positions")}


def _scales(latents: Sequence[int], scale: Sequence[float] | None) -> Tensor:
    if scale is None:
        return torch.ones(len(latents))
    if len(scale) != len(latents):
        raise VlsaeError(f"{len(scale)} scales for {len(latents)} latents; give one per latent")
    return torch.tensor([float(s) for s in scale])


def _latent_values(code_values: Tensor, code_indices: Tensor, latents: Tensor) -> Tensor:
    """(rows, n_latents_chosen) activations of ``latents`` in a sparse code (0 where not active)."""
    hits = code_indices.unsqueeze(-1) == latents.view(1, 1, -1)  # (rows, K, chosen)
    return (code_values.unsqueeze(-1) * hits).sum(dim=1)


@dataclass
class _LatentEdit(Intervention):
    """Shared fields of the edits of SAE latents."""

    sae: HookedSAE = field(repr=False, default=None)  # type: ignore[assignment]
    latents: Sequence[int] = ()
    scale: Sequence[float] | None = None
    passes: str = "cond"
    positions: str | Sequence[int] = "all"

    def __post_init__(self) -> None:
        if self.sae is None:
            raise VlsaeError(f"{self.kind} needs the SAE (a HookedSAE from steering.bind_sae)")
        self.latents = self.sae.check_latents(self.latents)
        self._scale = _scales(self.latents, self.scale)

    @property
    def point(self) -> str:
        return self.sae.point

    @property
    def eos_id(self) -> int | None:
        return self.sae.eos_id

    def _rows_directions(self) -> Tensor:
        return self.sae.directions()[self.latents]  # (chosen, width)

    def _edit_read_latents(self, h: Tensor, mask: Tensor, delta: Callable[[Tensor], Tensor]) -> Tensor:
        """The edit that moves the chosen latents by ``delta(current)`` (rows, chosen) on the selected tokens,
        written through their decoder directions; zero elsewhere. ``current``: what the SAE reads there."""
        out = torch.zeros_like(h)
        rows = h[mask]  # (m, width)
        if rows.shape[0] == 0:
            return out
        code = self.sae.encode(rows)
        latents = torch.tensor(self.latents, device=code.indices.device)
        current = _latent_values(code.values, code.indices, latents).float()  # (m, chosen)
        out[mask] = (delta(current) @ self._rows_directions().to(current.device)).to(h.dtype)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "latents": list(self.latents), "scale": [round(float(s), 4) for s in self._scale]}


@dataclass
class Add(_LatentEdit):
    """``+ strength * scale_f * d_f`` on every selected token, for each latent f."""

    kind: ClassVar[str] = "add"
    strength: float = 1.0

    def is_identity(self) -> bool:
        return float(self.strength) == 0.0

    def change(self, h: Tensor, mask: Tensor) -> Tensor:
        weights = (float(self.strength) * self._scale).to(h.device)
        vector = weights @ self._rows_directions().to(h.device)  # (width,)
        return mask.unsqueeze(-1).to(h.dtype) * vector.to(h.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "strength": float(self.strength)}


@dataclass
class Clamp(_LatentEdit):
    """Latent f's activation set to ``value * scale_f`` on the selected tokens (the rest of h kept)."""

    kind: ClassVar[str] = "clamp"
    allowed_passes: ClassVar[tuple[str, ...]] = ("cond", "both")
    value: float = 1.0

    def change(self, h: Tensor, mask: Tensor) -> Tensor:
        def to_target(current: Tensor) -> Tensor:
            return (float(self.value) * self._scale).to(current.device).expand_as(current) - current
        return self._edit_read_latents(h, mask, to_target)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "value": float(self.value)}


@dataclass
class Ablate(_LatentEdit):
    """Latent f's activation times ``1 - strength`` where the SAE reads it (1: removed; 0: untouched)."""

    kind: ClassVar[str] = "ablate"
    allowed_passes: ClassVar[tuple[str, ...]] = ("cond", "both")
    strength: float = 1.0

    def is_identity(self) -> bool:
        return float(self.strength) == 0.0

    def change(self, h: Tensor, mask: Tensor) -> Tensor:
        return self._edit_read_latents(h, mask, lambda current: -float(self.strength) * current)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "strength": float(self.strength)}


@dataclass
class _Dense(Intervention):
    """A fixed (context, width) edit, aligned with the token positions of the prompt it came from."""

    strength: float = 1.0
    passes: str = "cfg"
    positions: str | Sequence[int] = "all"

    def is_identity(self) -> bool:
        return float(self.strength) == 0.0

    @property
    def vector(self) -> Tensor:
        raise NotImplementedError

    def change(self, h: Tensor, mask: Tensor) -> Tensor:
        vector = self.vector.to(h.device, h.dtype)
        if vector.ndim == 1:
            vector = vector.expand(h.shape[1], -1)
        if vector.ndim == 2:
            vector = vector.unsqueeze(0)
        elif vector.shape[0] != h.shape[0]:
            raise VlsaeError(f"a per-row steering vector has {vector.shape[0]} rows but the batch has {h.shape[0]}; "
                             f"generate in one batch of that many prompts")
        rows, context = h.shape[:2]
        aligned = torch.zeros(vector.shape[0], context, h.shape[2], dtype=h.dtype, device=h.device)
        aligned[:, : min(context, vector.shape[1])] = vector[:, :context]
        return float(self.strength) * mask.unsqueeze(-1).to(h.dtype) * aligned

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "strength": float(self.strength)}


@dataclass
class Concept(_Dense):
    """Concept Steerers: ``strength * ReLU(W_enc (H_c - b) + b_enc) W_dec`` of the concept prompt's states
    H_c, position-aligned; by default + on the conditional pass and - on the unconditional one."""

    kind: ClassVar[str] = "concept"
    sae: HookedSAE = field(repr=False, default=None)  # type: ignore[assignment]
    prompt: str = ""

    def __post_init__(self) -> None:
        if self.sae is None:
            raise VlsaeError("concept needs the SAE (a HookedSAE from steering.bind_sae)")
        if not self.prompt.strip():
            raise VlsaeError("concept steering needs a concept prompt, e.g. 'blue'")
        states, _ = self.sae.hidden_states([self.prompt])
        code = self.sae.dense_code(states[0])  # (context, n_latents), no TopK
        self._vector = code @ self.sae.directions()

    @property
    def point(self) -> str:
        return self.sae.point

    @property
    def eos_id(self) -> int | None:
        return self.sae.eos_id

    @property
    def vector(self) -> Tensor:
        return self._vector

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prompt": self.prompt}


@dataclass
class Delta(_Dense):
    """A fixed edit ``strength * vector`` at ``hook``: (context, width) position-aligned, (width,) on every
    token, or (rows, context, width) one per batch row; :meth:`prompt_difference` makes the raw, SAE-free
    steering vector of two prompts."""

    kind: ClassVar[str] = "delta"
    hook: str = ""
    delta: Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    end_id: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.delta is None or not self.hook:
            raise VlsaeError("a delta intervention needs a hook point and a vector")

    @property
    def point(self) -> str:
        return self.hook

    @property
    def eos_id(self) -> int | None:
        return self.end_id

    @property
    def vector(self) -> Tensor:
        return self.delta

    @classmethod
    def prompt_difference(cls, adapter: Any, point: str, target: str | Sequence[str], source: str | Sequence[str],
                          strength: float = 1.0, passes: str = "cond",
                          positions: str | Sequence[int] = "all") -> "Delta":
        """``H(target) - H(source)`` at ``point``: at strength 1 on the conditional pass it turns the source
        prompt's states into the target's from that layer on (prompt editing, done in the layer). Lists of
        prompts give one vector per batch row (rows of a batch steered each toward its own target)."""
        many = not isinstance(target, str)
        targets, sources = ([target], [source]) if not many else (list(target), list(source))
        if len(targets) != len(sources):
            raise VlsaeError(f"{len(targets)} target prompts for {len(sources)} source prompts")
        states, _ = point_states(adapter, point, targets + sources)
        delta = states[: len(targets)] - states[len(targets):]
        encoder = adapter.encoders[point.split(".", 1)[0]]
        label = f"{targets[0]!r} - {sources[0]!r}" + (f" (+{len(targets) - 1} rows)" if many else "")
        return cls(hook=point, delta=delta if many else delta[0], strength=strength, passes=passes,
                   positions=positions, end_id=encoder.tokenizer.eos_token_id, label=label)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "vector": self.label or f"{tuple(self.delta.shape)} tensor"}


def edit_mask(intervention: Intervention, ids: Tensor) -> Tensor:
    """(rows, context) positions ``intervention`` edits in a batch of token ids."""
    return position_mask(ids, intervention.eos_id, getattr(intervention, "positions"))


__all__ = ["PASSES", "Intervention", "Add", "Clamp", "Ablate", "Concept", "Delta", "edit_mask"]
