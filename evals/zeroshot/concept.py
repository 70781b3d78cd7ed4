"""Concept-level matching: VL-SAE's zero-shot alignment enhancement, on top of any zero-shot head.

For an image x and a prompt c the plain score is CLIP's ``s·cos(f_v(x), f_t(c))``
(``s`` the logit scale). The enhanced score mixes in a term computed through
the SAE (Shen et al. 2025, §1.8 of the research notes; the exact formula is
not in their release, this is the one their wrapper's hooks make natural):

- ``concept`` (variant A): ``cos(z(f_v(x)), z(f_t(c)))``, the cosine of the two
  sparse codes as dense latent vectors (zero outside each active set): do the
  image and the prompt activate the same concepts?
- ``decoder`` (variant B): ``cos(f_v(x), D_image z(f_t(c)) + b_image)``: the
  prompt's concepts decoded as an *image* embedding, compared with the image.
  It crosses the modality gap through the SAE's shared concept set.

    logit_λ(x, c) = (1 - λ)·s·cos(f_v(x), f_t(c)) + λ·s·term(x, c)

The mix is made per prompt, before the head marginalises prompts into classes,
so on ShapesWorld the concept term sits on top of the strongest plain protocol
(every description, softmax mass summed per value). With λ = 0 the mixed
logits are the plain ones bit for bit (``1.0·a + 0.0·b == a`` for finite b), so
the predictions are the plain head's.

The SAE reads raw embeddings (``head.raw`` for the prompts, the cache's rows for
the images), as it was trained; a single-stream SAE (``sae.modalities`` empty)
encodes both with its one encoder and decodes with its one decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsae.alignment import AlignedSAE
from vlsae.errors import VlsaeError

from evals.zeroshot.head import ZeroShotHead

VARIANTS = ("concept", "decoder")


def sae_width(sae: Any) -> dict[str, int]:
    """modality -> the input width the SAE takes (``image`` and ``text``; one width for a single-stream SAE)."""
    if isinstance(sae, AlignedSAE):
        widths = dict(sae.projector.config.widths)
        return {"image": int(widths.get("image", 0)), "text": int(widths.get("text", 0))}
    d = int(sae.d_in)
    return {"image": d, "text": d}


def check_sae(sae: Any, width: int, model: str = "the model") -> None:
    """One line when the SAE cannot read the model's final embeddings (an SAE of the wrong width or
    trained at another hook), checked before any scoring."""
    for modality, expected in sae_width(sae).items():
        if expected and expected != width:
            raise VlsaeError(f"the SAE takes {modality} rows of width {expected} but {model}'s final embeddings have width "
                             f"{width}; use an SAE trained on this model's final embeddings (vlsae extract --hook final)")


def _modality(sae: Any, modality: str) -> str | None:
    """The modality argument for ``sae``: its own name for a multimodal SAE, None for a single-stream one."""
    modalities = tuple(getattr(sae, "modalities", ()) or ())
    if not modalities:
        return None
    if modality not in modalities:
        raise VlsaeError(f"the SAE's modalities are {', '.join(modalities)}; concept matching needs {modality}")
    return modality


@torch.no_grad()
def dense_codes(sae: Any, x: Tensor, modality: str, batch_size: int = 4096) -> Tensor:
    """(n, n_latents) L2-normalised dense codes of raw rows ``x`` (zero rows stay zero)."""
    m = _modality(sae, modality)
    out = [F.normalize(sae.encode(x[i: i + batch_size].float(), m).to_dense(), dim=-1)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0, int(sae.n_latents))


@torch.no_grad()
def reconstruct(sae: Any, x: Tensor, modality: str, as_modality: str | None = None, batch_size: int = 4096) -> Tensor:
    """(n, d) the SAE's reconstruction of raw rows ``x`` of ``modality``, decoded as ``as_modality``
    (default: the same modality; ``image`` for a prompt is variant B's text-as-image)."""
    m_in = _modality(sae, modality)
    m_out = _modality(sae, as_modality or modality)
    out = [sae.decode(sae.encode(x[i: i + batch_size].float(), m_in), m_out) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0, x.shape[1])


@dataclass
class ConceptMatcher:
    """The SAE views of a head's prompts, computed once: what every image is then compared with.

    text_code:     (n_prompts, n_latents) normalised dense codes of the prompts.
    text_as_image: (n_prompts, d) normalised ``D_image z(f_t(c)) + b_image`` (variant B).
    """

    head: ZeroShotHead
    sae: Any
    text_code: Tensor
    text_as_image: Tensor

    @classmethod
    def build(cls, sae: Any, head: ZeroShotHead) -> "ConceptMatcher":
        if head.raw is None:
            raise VlsaeError("the zero-shot head keeps no raw text embeddings; build it with shapesworld_head or classes_head")
        check_sae(sae, head.d)
        raw = head.raw.float()
        return cls(head=head, sae=sae, text_code=dense_codes(sae, raw, "text"),
                   text_as_image=F.normalize(reconstruct(sae, raw, "text", "image"), dim=-1))

    def term_logits(self, image: Tensor, variant: str, image_code: Tensor | None = None) -> Tensor:
        """(n, n_prompts) ``logit_scale * term`` for raw image rows (``image_code``: their dense codes, if known)."""
        scale = self.head.logit_scale
        if variant == "concept":
            code = dense_codes(self.sae, image, "image") if image_code is None else image_code
            return scale * code @ self.text_code.T
        if variant == "decoder":
            return scale * F.normalize(image.float(), dim=-1) @ self.text_as_image.T
        raise VlsaeError(f"unknown concept variant {variant!r}; use one of {', '.join(VARIANTS)}")


def check_lambda(lam: float) -> float:
    if not 0.0 <= lam <= 1.0:
        raise VlsaeError(f"λ must be in [0, 1], got {lam}")
    return float(lam)


def mix(plain: Tensor, term: Tensor, lam: float) -> Tensor:
    """``(1 - λ)·plain + λ·term``; exactly ``plain`` at λ = 0 (for finite ``term``)."""
    lam = check_lambda(lam)
    return (1.0 - lam) * plain + lam * term


@torch.no_grad()
def sweep_predictions(matcher: ConceptMatcher, image: Tensor, attributes: list[str], lambdas: list[float],
                      variants: tuple[str, ...] = VARIANTS, chunk: int = 512) -> dict[str, Any]:
    """Predictions of every (variant, λ) for every attribute, in one pass over the images.

    Returns ``{"plain": {attribute: (n,) long}, variant: {attribute: (len(lambdas), n) long}}``. The
    images go in chunks of ``chunk`` rows, so memory is ``chunk x n_prompts`` whatever n is (512 rows x
    9,240 prompts stay in a CPU's cache better than bigger chunks); the plain logits and each term are
    computed once per chunk, and each λ is ``plain + λ·(term - plain)``, :func:`mix`'s value up to
    rounding and ``plain`` itself, bit for bit, at λ = 0.
    """
    head = matcher.head
    n = image.shape[0]
    out: dict[str, Any] = {"plain": {a: torch.empty(n, dtype=torch.long) for a in attributes}}
    for variant in variants:
        out[variant] = {a: torch.empty(len(lambdas), n, dtype=torch.long) for a in attributes}
    for start in range(0, n, chunk):
        rows = image[start: start + chunk].float()
        stop = start + rows.shape[0]
        plain = head.prompt_logits(rows)
        for a, predicted in head.predict_all(plain, attributes).items():
            out["plain"][a][start:stop] = predicted
        for variant in variants:
            step = matcher.term_logits(rows, variant).sub_(plain)  # term - plain: each λ is then one fused add
            for j, lam in enumerate(lambdas):
                mixed = torch.add(plain, step, alpha=check_lambda(lam))  # plain + 0·step is plain exactly
                for a, predicted in head.predict_all(mixed, attributes).items():
                    out[variant][a][j, start:stop] = predicted
    return out
