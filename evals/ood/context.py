"""What the OOD scores are computed from: reference statistics of the fit set and per-set features.

Every score is a small function of (:class:`Reference`, :class:`Features`), and
both compute what they hold lazily and once (``functools.cached_property``):
the SAE codes of a set, its reconstruction error, its zero-shot logits and
predicted classes are computed the first time a score asks and shared by every
score after it, so the baselines and the SAE scores make one pass over the
cached activations. The reference statistics (the KNN banks, class means, the
shared covariance, the class activation profiles) come from the ``fit`` rows:
in-distribution training data, never the rows being scored.

Class labels of the class-conditional scores are the zero-shot head's
predictions (the ``attribute`` the head classifies, e.g. ShapesWorld's shape),
on the fit rows and on the scored rows alike, never a label of the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from evals.zeroshot.concept import ConceptMatcher, check_sae, dense_codes
from evals.zeroshot.head import ZeroShotHead
from vlsae.errors import VlsaeError
from vlsae.kernels import scatter_rows
from vlsae.sparse import SparseCode

CHUNK = 4096  # rows per SAE encode / similarity block: bounds memory for wide SAEs and large sets


@dataclass
class ScoreSettings:
    """The knobs of the scores (the ``ood`` task's config passes them through)."""

    k: int = 10                  # neighbours: KNN on embeddings and on codes use the k-th nearest fit row
    lam: float = 0.5             # concept-MCM's weight on the concept similarity (0: plain MCM)
    temperature: float = 1.0     # MCM's softmax temperature on cosines (Ming et al.: 1)
    attribute: str | None = None  # the head attribute whose predicted class conditions the scores (None: its first)
    shrinkage: float = 1e-3      # ridge added to the shared covariance's diagonal, relative to its mean variance


def _image_modality(sae) -> str | None:
    """The modality to encode images with: ``image`` for a multimodal SAE, None for a single-stream one."""
    modalities = tuple(getattr(sae, "modalities", ()))
    if not modalities:
        return None
    if "image" not in modalities:
        raise VlsaeError(f"the SAE reads {', '.join(modalities)}, not images; OOD detection scores image embeddings")
    return "image"


def _csr(code: SparseCode, normalise: bool = False) -> Tensor:
    """The (rows, n_latents) sparse matrix of a code (rows L2-normalised if asked)."""
    values = code.values.float()
    if normalise:
        values = values / values.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows, width = code.indices.shape
    crow = torch.arange(0, rows * width + 1, width)
    return torch.sparse_csr_tensor(crow, code.indices.reshape(-1), values.reshape(-1), (rows, code.n_latents),
                                   check_invariants=False)


def _cat_codes(codes: list[SparseCode], n_latents: int) -> SparseCode:
    return SparseCode(torch.cat([c.values for c in codes]), torch.cat([c.indices for c in codes]), n_latents)


class Reference:
    """The SAE, the zero-shot head and the fit rows' statistics, shared by every scored set.

    sae: a trained SAE (any architecture; multimodal ones encode images with modality ``image``);
    fit: (n_fit, d) raw image embeddings of in-distribution training rows;
    head: the zero-shot head (None: the class-conditional and zero-shot scores are unavailable).
    """

    def __init__(self, sae, fit: Tensor, head: ZeroShotHead | None = None, settings: ScoreSettings | None = None):
        self.sae = sae
        self.fit_x = fit.float()
        self.head = head
        self.settings = settings or ScoreSettings()
        self.modality = _image_modality(sae)
        check_sae(sae, self.fit_x.shape[1], "the model")
        if head is not None:
            head.check_width(self.fit_x.shape[1])
            self.attribute = self.settings.attribute or head.attributes[0]
            if self.attribute not in head.attributes:
                raise VlsaeError(f"the zero-shot head has no attribute '{self.attribute}'; it has {', '.join(head.attributes)}")
        else:
            self.attribute = None
        if not 1 <= self.settings.k <= self.fit_x.shape[0]:
            raise VlsaeError(f"k must be between 1 and the {self.fit_x.shape[0]} fit rows, got {self.settings.k}")
        if not 0 <= self.settings.lam <= 1:
            raise VlsaeError(f"lam must be in [0, 1], got {self.settings.lam}")
        if self.settings.temperature <= 0:
            raise VlsaeError(f"temperature must be positive, got {self.settings.temperature}")

    @property
    def n_latents(self) -> int:
        return int(self.sae.n_latents)

    @property
    def n_classes(self) -> int:
        return len(self.head.classes[self.attribute]) if self.head is not None else 0

    def features(self, x: Tensor) -> "Features":
        """The lazily computed features of a set of (n, d) raw image embeddings."""
        return Features(self, x)

    # -- fit statistics ---------------------------------------------------------
    @cached_property
    def fit(self) -> "Features":
        return self.features(self.fit_x)

    @cached_property
    def embedding_bank(self) -> Tensor:
        """(n_fit, d) unit fit embeddings: the KNN bank of Sun et al. 2022."""
        return self.fit.unit

    @cached_property
    def code_bank(self) -> Tensor:
        """(n_fit, n_latents) sparse CSR of the unit-normalised fit codes."""
        return _csr(self.fit.code, normalise=True)

    @cached_property
    def fit_classes(self) -> Tensor:
        """(n_fit,) the head's predicted class of every fit row."""
        return self.fit.predicted

    @cached_property
    def class_counts(self) -> Tensor:
        return torch.bincount(self.fit_classes, minlength=self.n_classes)

    @cached_property
    def class_means(self) -> Tensor:
        """(n_present, d) means of the unit fit embeddings per predicted class (classes with fit rows only)."""
        present = self.class_counts > 0
        sums = torch.zeros(self.n_classes, self.fit_x.shape[1]).index_add_(0, self.fit_classes, self.fit.unit)
        return (sums / self.class_counts.clamp_min(1)[:, None])[present]

    def _precision(self, centred: Tensor) -> Tensor:
        """The inverse of the covariance of ``centred`` rows with a small ridge (shared by all classes)."""
        centred = centred.double()
        cov = centred.T @ centred / max(centred.shape[0] - 1, 1)
        ridge = self.settings.shrinkage * float(cov.diagonal().mean().clamp_min(1e-12))
        return torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype)).float()

    @cached_property
    def class_precision(self) -> Tensor:
        """(d, d) inverse of the covariance shared by the classes (fit rows minus their class mean)."""
        present = torch.nonzero(self.class_counts > 0).squeeze(1)
        position = torch.full((self.n_classes,), -1, dtype=torch.long)
        position[present] = torch.arange(present.numel())
        return self._precision(self.fit.unit - self.class_means[position[self.fit_classes]])

    @cached_property
    def global_mean(self) -> Tensor:
        return self.fit.unit.mean(0)

    @cached_property
    def global_precision(self) -> Tensor:
        return self._precision(self.fit.unit - self.global_mean)

    @cached_property
    def profiles(self) -> Tensor:
        """(n_classes, n_latents) class activation profiles: mean code of the fit rows per predicted class;
        a class no fit row was predicted as gets the mean code of all fit rows."""
        onehot = F.one_hot(self.fit_classes, self.n_classes).float()
        code = self.fit.code
        sums = scatter_rows(code.indices, code.values.float(), onehot, self.n_latents).T  # (classes, n_latents)
        overall = sums.sum(0) / self.fit_x.shape[0]
        counts = self.class_counts[:, None].float()
        return torch.where(counts > 0, sums / counts.clamp_min(1), overall.expand_as(sums))

    @cached_property
    def matcher(self) -> ConceptMatcher:
        """The SAE codes of the head's prompts (raw text embeddings, modality text), computed once."""
        if self.head is None:
            raise VlsaeError("concept-MCM needs the zero-shot head (class prompts)")
        return ConceptMatcher.build(self.sae, self.head)


class Features:
    """The per-set quantities the scores read, each computed on first use.

    x: (n, d) raw image embeddings of the set.
    """

    def __init__(self, reference: Reference, x: Tensor):
        self.ref = reference
        self.x = x.float()
        if self.x.ndim != 2 or self.x.shape[1] != reference.fit_x.shape[1]:
            raise VlsaeError(f"image embeddings of width {reference.fit_x.shape[1]} expected, got shape {tuple(self.x.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self) -> list[slice]:
        return [slice(i, min(i + CHUNK, len(self))) for i in range(0, len(self), CHUNK)]

    @cached_property
    def unit(self) -> Tensor:
        """(n, d) L2-normalised embeddings."""
        return F.normalize(self.x, dim=1)

    @cached_property
    def code(self) -> SparseCode:
        """The SAE code of every row (values and indices, (n, K))."""
        sae, modality = self.ref.sae, self.ref.modality
        with torch.no_grad():
            return _cat_codes([sae.encode(self.x[s], modality) for s in self.chunks()], self.ref.n_latents)

    @cached_property
    def recon_error(self) -> Tensor:
        """(n,) normalised reconstruction error ||x - x_hat||^2 / ||x||^2."""
        sae, modality, code = self.ref.sae, self.ref.modality, self.code
        out = []
        with torch.no_grad():
            for s in self.chunks():
                part = SparseCode(code.values[s], code.indices[s], code.n_latents)
                recon = sae.decode(part, modality).float()
                out.append((self.x[s] - recon).pow(2).sum(1) / self.x[s].pow(2).sum(1).clamp_min(1e-12))
        return torch.cat(out)

    @cached_property
    def cosines(self) -> Tensor:
        """(n, n_prompts) cosine of every row with every prompt of the head."""
        head = self._head()
        return self.unit @ head.text.T

    @property
    def prompt_logits(self) -> Tensor:
        """(n, n_prompts) the head's logits: logit_scale * cosine (not kept: one (n, n_prompts) copy is enough)."""
        return self._head().logit_scale * self.cosines

    @cached_property
    def class_log_probs(self) -> Tensor:
        """(n, n_classes) the zero-shot classifier's log probabilities of the conditioning attribute."""
        return self._head().class_log_probs(None, self.ref.attribute, prompt_logits=self.prompt_logits)

    @cached_property
    def predicted(self) -> Tensor:
        """(n,) the zero-shot predicted class of every row."""
        return self.class_log_probs.argmax(dim=1)

    @cached_property
    def unit_dense_code(self) -> Tensor:
        """(n, n_latents) the codes as dense unit vectors (what concept matching compares)."""
        return dense_codes(self.ref.sae, self.x, "image", batch_size=CHUNK)

    def _head(self) -> ZeroShotHead:
        if self.ref.head is None:
            raise VlsaeError("this score needs the zero-shot head (class prompts); run with a CLIP-style model")
        return self.ref.head


def kth_nearest_similarity(query: Tensor, bank: Tensor, k: int) -> Tensor:
    """(n,) the k-th largest cosine of every unit query row (n, d) with the unit bank rows (n_bank, d),
    in blocks of :data:`CHUNK` queries (memory CHUNK x n_bank)."""
    return torch.cat([(query[i:i + CHUNK] @ bank.T).topk(k, dim=1).values[:, -1] for i in range(0, query.shape[0], CHUNK)])


def kth_nearest_code_similarity(code: SparseCode, bank: Tensor, k: int) -> Tensor:
    """(n,) the k-th largest cosine of every code with the rows of a sparse CSR bank of unit codes
    (n_bank, n_latents); the codes are made dense one block of :data:`CHUNK` rows at a time."""
    out = []
    for i in range(0, len(code), CHUNK):
        block = SparseCode(code.values[i:i + CHUNK].float(), code.indices[i:i + CHUNK], code.n_latents).to_dense()
        block = F.normalize(block, dim=1)
        out.append((bank @ block.T).T.topk(k, dim=1).values[:, -1])
    return torch.cat(out)
