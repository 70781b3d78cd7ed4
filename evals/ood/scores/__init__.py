"""The OOD score registry: every score is one small registered function, "higher = more in-distribution".

    @register_score("recon", kind="sae", summary="negative normalised reconstruction error")
    def recon(ref: Reference, feats: Features) -> Tensor: ...

A score takes the shared :class:`~evals.ood.context.Reference` (the SAE, the
zero-shot head, the fit statistics) and one set's
:class:`~evals.ood.context.Features` and returns an (n,) tensor. ``kind`` is
``sae`` (the score reads the SAE) or ``baseline`` (raw embedding only);
``needs`` says what else it reads (``head``: the zero-shot prompts), so a run
skips, and says it skipped, a score its inputs cannot give. The SAE scores live in :mod:`evals.ood.scores.sae`, the
baselines in :mod:`evals.ood.scores.baselines`; adding one is one decorated
function in either.
"""
from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor

from vlsae.registry import Registry

from evals.ood.context import Features, Reference

KINDS = ("sae", "baseline")


class Score(Protocol):
    """A registered score function with its registry attributes."""

    name: str
    kind: str
    summary: str
    needs: tuple[str, ...]

    def __call__(self, ref: Reference, feats: Features) -> Tensor: ...


SCORES: Registry[Score] = Registry("OOD score", packages=[__name__])


def register_score(name: str, kind: str, summary: str, needs: tuple[str, ...] = ()) -> Callable[[Callable], Score]:
    """Decorator: register an OOD score function under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"score kind must be one of {KINDS}, got {kind!r}")
    return SCORES.register(name, kind=kind, summary=summary, needs=tuple(needs))


def list_scores() -> list[str]:
    """Every registered score name, the SAE scores first, each group sorted by name."""
    items = SCORES.items()
    return [name for kind in KINDS for name, fn in items if fn.kind == kind]


def get_score(name: str) -> Score:
    return SCORES.get(name)


def missing_inputs(score: Score, ref: Reference) -> str | None:
    """Why ``score`` cannot run on ``ref`` ('' / None when it can)."""
    if "head" in score.needs and ref.head is None:
        return "needs the zero-shot head"
    return None


__all__ = ["SCORES", "KINDS", "Score", "register_score", "list_scores", "get_score", "missing_inputs"]
