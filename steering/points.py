"""An SAE bound to one hook point of a diffusion pipeline's text encoder, and the tensors steering needs.

Steering edits the output of one module of a text encoder (the adapter's
``ENC.embeddings``, ``ENC.blocks.N`` or ``ENC.final``) with an SAE trained on
activations of that same point. :func:`bind_sae` checks the two belong
together before any image is generated: the SAE's width must be the point's,
and the hook point recorded in the SAE (``vlsae train --acts`` stores the
cache's ``SOURCE HOOK TOKENS`` as ``sae.config.hook``) must be the one asked
for, so an SAE of another layer is a one-line error, not noise in the images.

Which layer: Concept Steerers (Kim et al. 2025) steer SD 1.4 at the output of
``text_model.encoder.layers.9`` of its 12 blocks, late enough that a prompt's
words have been mixed into every later token (the end token and the padding
the UNet also cross-attends to), early enough that three blocks remain to turn
the edit into well-formed prompt embeddings. shapes-diffusion's text encoder
(shapes-clip's tower) has 3 blocks; :data:`DEFAULT_POINTS` takes the
second-to-last block by the same reasoning (``text_encoder.blocks.1``).

The tensors: :meth:`HookedSAE.directions` are the decoder's latent directions
``decode(e_f) - decode(0)`` (the decoder bias cancels, as the SAE's error
term is kept: h <- h - x_hat + x_hat_edited = h + sum_f (z'_f - z_f) d_f);
:meth:`HookedSAE.dense_code` is Concept Steerers' dense code, the ReLU of the
encoder's pre-activations without TopK.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.checkpoint import load_sae
from vlsae.errors import VlsaeError
from vlsae.sparse import SparseCode

from multimodal.adapters.base import BlockCapture
from multimodal.adapters.diffusers_text import ENCODERS, DiffusersTextAdapter, end_positions
from multimodal.generation import tokenize

#: the token modes ``vlsae extract --tokens`` records last in an SAE's hook string
TOKEN_MODES = ("cls", "patch", "all", "mean")
#: position selections of an intervention: every token, the prompt (start to end token), its words, the end token
#: and the padding after it; or explicit positions
POSITION_MODES = ("all", "prompt", "words", "end")


def text_adapter(pipe: Any) -> DiffusersTextAdapter:
    """The adapter on ``pipe``'s own text encoder(s): its hook modules are the modules the pipeline runs."""
    if isinstance(pipe, DiffusersTextAdapter):
        return pipe
    return DiffusersTextAdapter.from_pipeline(pipe)


def recorded_point(hook: str) -> str:
    """The hook point in an SAE's recorded ``SOURCE HOOK TOKENS`` string ('' when none is recorded)."""
    words = hook.split()
    if words and words[-1] in TOKEN_MODES:
        words = words[:-1]
    return words[-1] if len(words) >= 2 else ""


def resolve_point(adapter: DiffusersTextAdapter, point: str) -> str:
    """``point`` as one module's output: ``final`` of a one-encoder pipeline is ``text_encoder.final``."""
    if point == "final" and not adapter.penultimate_prompt:
        return "text_encoder.final"
    valid = [p for p in adapter.hook_points() if not p.endswith(".projection") and p != "final"]
    if point not in valid:
        raise VlsaeError(f"hook point '{point}' cannot be steered here; this pipeline's steerable points: "
                         f"{', '.join(valid)}")
    adapter.hook_module(point)  # one-line error for ``final`` of SDXL and ``projection``
    return point


def default_point(adapter: DiffusersTextAdapter, encoder: str = "text_encoder") -> str:
    """The second-to-last block of ``encoder`` (the Concept Steerers choice scaled to its depth)."""
    layers = adapter.encoders[encoder].layers
    return f"{encoder}.blocks.{max(0, len(layers) - 2)}"


@dataclass
class HookedSAE:
    """An SAE checked against one hook point of a pipeline's text encoder.

    ``sae`` is any vlsae SAE (``topk``, ``vl``, ...; for a multimodal one the
    ``text`` decoder is used); ``point`` the hook point (``ENC.blocks.N`` ...);
    ``adapter`` the text adapter of the pipeline it steers.
    """

    sae: Any
    point: str
    adapter: DiffusersTextAdapter
    modality: str | None = None
    _directions: Tensor | None = field(default=None, repr=False)

    @property
    def encoder(self) -> str:
        """The text encoder the point belongs to (``text_encoder`` or ``text_encoder_2``)."""
        return self.point.split(".", 1)[0]

    @property
    def n_latents(self) -> int:
        return int(self.sae.n_latents)

    @property
    def module(self) -> Any:
        return self.adapter.hook_module(self.point)

    @property
    def eos_id(self) -> int | None:
        return self.adapter.encoders[self.encoder].tokenizer.eos_token_id

    def check_latents(self, latents: Sequence[int]) -> list[int]:
        """``latents`` as ints, each in range (one-line error naming the SAE's size otherwise)."""
        out = [int(f) for f in latents]
        bad = [f for f in out if not 0 <= f < self.n_latents]
        if bad:
            raise VlsaeError(f"latent {bad[0]} is out of range: this SAE has {self.n_latents} latents (0..{self.n_latents - 1})")
        if not out:
            raise VlsaeError("an intervention needs at least one latent")
        return out

    @torch.no_grad()
    def directions(self) -> Tensor:
        """(n_latents, d_in): row f is ``decode(e_f) - decode(0)``, latent f's contribution per unit activation."""
        if self._directions is None:
            n = self.n_latents
            ones = SparseCode(torch.ones(n, 1), torch.arange(n).view(n, 1), n)
            zeros = SparseCode(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), n)
            device = next(self.sae.parameters()).device
            ones = SparseCode(ones.values.to(device), ones.indices.to(device), n)
            zeros = SparseCode(zeros.values.to(device), zeros.indices.to(device), n)
            self._directions = (self.sae.decode(ones, self.modality) - self.sae.decode(zeros, self.modality)).float()
        return self._directions

    @torch.no_grad()
    def encode(self, h: Tensor) -> SparseCode:
        """The SAE's sparse code of rows ``h`` (rows, d_in)."""
        return self.sae.encode(h.to(self.directions().dtype), self.modality)

    @torch.no_grad()
    def dense_code(self, h: Tensor) -> Tensor:
        """(rows, n_latents): Concept Steerers' code, ReLU(pre-activations) with no TopK, for SAEs with a
        linear encoder; the sparse code made dense for the others (``vl``, ``mp``)."""
        h = h.to(self.directions().dtype)
        if hasattr(self.sae, "pre_activations"):
            return torch.relu(self.sae.pre_activations(h))
        return self.encode(h).to_dense()

    def hidden_states(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(states (n, context, d_in), ids (n, context)) of ``prompts`` at this SAE's point (:func:`point_states`)."""
        return point_states(self.adapter, self.point, prompts)


@torch.no_grad()
def point_states(adapter: DiffusersTextAdapter, point: str, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(states (n, context, width), ids (n, context)): ``point``'s output for ``prompts`` tokenised as the
    pipeline does (padded to the tokenizer's length), float32. Run it outside a :class:`~steering.hooks.Steering`
    context: inside one, the states would be the steered ones."""
    encoder = adapter.encoders[point.split(".", 1)[0]]
    ids = tokenize(encoder.tokenizer, list(prompts)).to(adapter.device)
    with BlockCapture({0: adapter.hook_module(point)}) as capture:
        capture.run(lambda: encoder.model(ids))
    return capture.outputs[0].float(), ids


def bind_sae(adapter: DiffusersTextAdapter, sae: Any, point: str | None = None) -> HookedSAE:
    """``sae`` (a loaded SAE or a run/checkpoint folder) at ``point`` of ``adapter``'s text encoder(s).

    ``point`` defaults to the hook point the SAE was trained on. One-line
    errors: a point the pipeline lacks, an SAE recorded for another point, a
    width that is not the point's, an SAE without a text side.
    """
    if isinstance(sae, (str, bytes)) or hasattr(sae, "__fspath__"):
        sae = load_sae(sae)
    recorded = recorded_point(str(getattr(sae.config, "hook", "") or ""))
    if point is None or point == "":
        if not recorded:
            raise VlsaeError("the SAE records no hook point; name the one it was trained on (--hook ENC.blocks.N)")
        point = recorded
    point = resolve_point(adapter, point)
    if recorded and resolve_point_name(adapter, recorded) != point:
        raise VlsaeError(f"the SAE was trained on hook '{recorded}', not '{point}'; steer at --hook {recorded} "
                         f"or train an SAE on {point} (vlsae extract --hook {point})")
    width = adapter.widths(point)["text"]
    if int(sae.config.d_in) != width:
        raise VlsaeError(f"the SAE reads {sae.config.d_in}-wide activations but {point} is {width} wide; "
                         f"use an SAE trained on this pipeline's {point}")
    modalities = tuple(getattr(sae, "modalities", ()) or ())
    modality = None
    if modalities:
        if "text" not in modalities:
            raise VlsaeError(f"the SAE has no text side (modalities {list(modalities)}); steering a text "
                             f"encoder needs a single-stream SAE or one with a text decoder")
        modality = "text"
    sae.eval()
    return HookedSAE(sae=sae, point=point, adapter=adapter, modality=modality)


def resolve_point_name(adapter: DiffusersTextAdapter, point: str) -> str:
    """``point`` with ``final`` read as ``text_encoder.final`` on one-encoder pipelines (no module check)."""
    return "text_encoder.final" if point == "final" and not adapter.penultimate_prompt else point


def position_mask(ids: Tensor, eos_id: int | None, positions: str | Sequence[int]) -> Tensor:
    """(rows, context) bool: the token positions an intervention edits, per row of ``ids``."""
    rows, context = ids.shape
    index = torch.arange(context, device=ids.device).expand(rows, context)
    if not isinstance(positions, str):
        mask = torch.zeros(rows, context, dtype=torch.bool, device=ids.device)
        chosen = [int(p) for p in positions if 0 <= int(p) < context]
        if chosen:
            mask[:, chosen] = True
        return mask
    if positions == "all":
        return torch.ones(rows, context, dtype=torch.bool, device=ids.device)
    end = end_positions(ids, eos_id).unsqueeze(1)
    if positions == "prompt":
        return index <= end
    if positions == "words":
        return (index > 0) & (index < end)
    if positions == "end":
        return index >= end
    raise VlsaeError(f"unknown positions '{positions}'; use one of {', '.join(POSITION_MODES)} or token indices")


def parse_positions(text: str) -> str | tuple[int, ...]:
    """``all`` | ``prompt`` | ``words`` | ``end`` | comma-separated token indices, as a CLI gives it."""
    text = text.strip()
    if text in POSITION_MODES:
        return text
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise VlsaeError(f"--positions must be one of {', '.join(POSITION_MODES)} or token indices like 2,3; got '{text}'")
    return values


__all__ = ["ENCODERS", "TOKEN_MODES", "POSITION_MODES", "HookedSAE", "bind_sae", "text_adapter", "recorded_point",
           "resolve_point", "default_point", "point_states", "position_mask", "parse_positions"]
