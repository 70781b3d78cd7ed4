"""What every pair scorer shares: the batch it scores and the base class.

A scorer maps each image-text pair to one number, **higher = keep** (the
convention of DataComp's filters and of SAE-V's rankers). It sees a
:class:`PairBatch`: the model's activations of a batch of pairs at one hook
point (one or many rows per pair and modality, rows tied to their pair by
``pair_index``), and, for SAE scorers, the SAE's sparse codes of those rows.
Codes are pooled per pair the way SAE-V pools token activations: a latent's
value for a pair's image is its **largest** value over the image's rows, and
likewise for the caption, so a latent "fires on the image" when that maximum
exceeds the threshold θ. With one row per pair (CLIP embeddings) the pooled
code is the row's code itself.

A scorer never reads the records' metadata: ground-truth flags (ShapesWorld's
``corrupted``) are for evaluating a filter, not for running one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from vlsae.sparse import SparseCode

MODALITIES = ("image", "text")


@dataclass
class PairBatch:
    """One batch of pairs as a scorer sees it.

    keys:       one key per pair, in batch order.
    acts:       modality -> (rows, width) activations at the scorer's hook (empty for model-free scorers).
    pair_index: modality -> (rows,) int64 position in ``keys`` of each row's pair.
    sae:        the SAE whose codes SAE scorers read (None for the others).
    theta:      a latent is active on a row when its value exceeds theta.
    """

    keys: list[str]
    acts: dict[str, Tensor] = field(default_factory=dict)
    pair_index: dict[str, Tensor] = field(default_factory=dict)
    sae: Any = None
    theta: float = 0.0
    _codes: dict[str, SparseCode] = field(default_factory=dict, repr=False)
    _pooled: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def code(self, modality: str) -> SparseCode:
        """The SAE's code of the modality's rows, (rows, K) (computed once per batch).

        A multimodal SAE encodes each modality with its own name; a single-stream
        SAE (SAE-V's, trained on image and text tokens together) ignores it.
        """
        if modality not in self._codes:
            rows = self.acts[modality]
            with torch.no_grad():
                self._codes[modality] = self.sae.encode(rows, modality if self.sae.modalities else None)
        return self._codes[modality]

    def pooled(self, modality: str) -> Tensor:
        """(pairs, n_latents) float: each latent's largest value over the pair's rows of ``modality``
        (0 where it never fires; built by a scatter from the sparse code, never a dense row matrix)."""
        if modality not in self._pooled:
            code = self.code(modality)
            n_latents = code.n_latents
            values = code.values.float().clamp_min(0)  # a signed code's negative values do not fire
            flat = (self.pair_index[modality].to(code.indices.device).unsqueeze(1) * n_latents + code.indices).reshape(-1)
            pooled = torch.zeros(len(self.keys) * n_latents, dtype=torch.float32, device=values.device)
            pooled.scatter_reduce_(0, flat, values.reshape(-1), reduce="amax", include_self=True)
            self._pooled[modality] = pooled.view(len(self.keys), n_latents)
        return self._pooled[modality]

    def active(self, modality: str) -> Tensor:
        """(pairs, n_latents) bool: latents whose pooled value exceeds theta on the pair's ``modality``."""
        return self.pooled(modality) > self.theta

    def co_active(self) -> Tensor:
        """(pairs, n_latents) bool: SAE-V's co-occurring set C(s), latents active on both the image and the caption."""
        return self.active("image") & self.active("text")

    def rows_per_pair(self, modality: str) -> Tensor:
        """(pairs,) number of rows each pair has in ``modality``."""
        return torch.bincount(self.pair_index[modality], minlength=len(self.keys))


ProbeBatches = Callable[[], Iterator[PairBatch]]


class Scorer:
    """Base of the registered scorers (:func:`multimodal.filtering.scorers.register_scorer`).

    Class attributes say what a scorer needs, so the filter checks its inputs
    before any work: ``needs_sae`` (a trained SAE run, ``--sae``), ``needs_model``
    (a model forward pass; the random baseline has none), ``one_row_per_pair``
    (one embedding per pair and modality: CLIPScore), ``needs_probe`` (a pass
    over probe pairs before scoring: SAE-V's cross-modal weights).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_sae: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True
    one_row_per_pair: ClassVar[bool] = False
    needs_probe: ClassVar[bool] = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, probe: ProbeBatches, sae: Any) -> dict[str, Any]:
        """Learn what the scorer needs from probe batches of ``sae``'s codes (default: nothing); returns a
        JSON-safe summary."""
        return {}

    def state(self) -> dict[str, Tensor]:
        """Tensors that :meth:`fit` learnt, saved so a resumed run scores with the same ones."""
        return {}

    def load_state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """Restore :meth:`state`; returns the same summary :meth:`fit` did."""
        return {}

    def score(self, batch: PairBatch) -> Tensor:
        """(pairs,) float64 scores of the batch, higher = keep."""
        raise NotImplementedError
