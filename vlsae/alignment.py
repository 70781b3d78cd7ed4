"""The alignment stage: a contrastive projector for modalities that are not aligned.

CLIP's image and text embeddings are aligned by construction and go into a
VL-SAE as they are. LLaVA hidden states at image and text positions, or a
diffusion text encoder's states paired with image features, are not: their
cosine geometry says nothing about which caption goes with which image, so a
direction-only encoder would learn one concept set per modality. VL-SAE first
trains, per modality m, a linear map ``P_m`` into a shared space and a linear
map ``Q_m`` back, with

    loss = symmetric InfoNCE(cos(P_image v_i, P_text t_j) / temperature) + sum_m MSE(Q_m P_m x_m, x_m)

(temperature 0.07, diagonal pairs positive). The released code uses raw dot
products in the logits although the paper describes cosine; cosine is our
default and ``similarity="dot"`` reproduces the release. The VL-SAE then trains
on ``P_m x_m``; :class:`AlignedSAE` applies ``P_m`` before encoding and ``Q_m``
after decoding, so users keep feeding raw activations and get raw-space
reconstructions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlsae.config import from_dict, option, to_dict
from vlsae.errors import VlsaeError
from vlsae.parts import reads_part_batches
from vlsae.files import atomic_save_tensors, atomic_write_text, read_safetensors
from vlsae.sparse import SparseCode

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"


@dataclass
class ProjectorConfig:
    """Shape of the projector (what a checkpoint needs)."""

    widths: dict = option(factory=dict, help="modality -> input width, e.g. {image: 4096, text: 4096}")
    d_shared: int = option(0, help="width of the shared space; 0 means the largest input width")
    similarity: str = option("cosine", help="'cosine' (default) or 'dot' (the released code's raw dot products)")
    temperature: float = option(0.07, help="InfoNCE temperature")

    def __post_init__(self) -> None:
        if len(self.widths) != 2:
            raise VlsaeError(f"the alignment stage pairs exactly two modalities, got {sorted(self.widths)}")
        if self.similarity not in ("cosine", "dot"):
            raise VlsaeError(f"similarity must be 'cosine' or 'dot', got '{self.similarity}'")
        if not self.d_shared:
            self.d_shared = max(int(w) for w in self.widths.values())


@dataclass
class ProjectorTrainConfig:
    steps: int = option(2000, help="optimizer steps")
    batch_size: int = option(512, help="pairs per batch (in-batch negatives)")
    lr: float = option(1e-3, help="AdamW learning rate (cosine decay after 5% warm-up)")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    recon_coef: float = option(1.0, help="weight of the reconstruction terms")
    seed: int = option(0, help="random seed")
    device: str = option("auto", help="'auto', 'cpu' or 'cuda'")
    progress: bool = option(True, help="show a progress bar")


class ContrastiveProjector(nn.Module):
    """Per modality: ``project[m]`` (d_m -> d_shared) and ``back[m]`` (d_shared -> d_m)."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.modalities = tuple(config.widths)
        self.project = nn.ModuleDict({m: nn.Linear(int(w), config.d_shared) for m, w in config.widths.items()})
        self.back = nn.ModuleDict({m: nn.Linear(config.d_shared, int(w)) for m, w in config.widths.items()})

    def _check(self, x: torch.Tensor, modality: str) -> None:
        if modality not in self.config.widths:
            raise VlsaeError(f"unknown modality '{modality}'; the projector has {list(self.modalities)}")
        width = int(self.config.widths[modality])
        if x.ndim != 2 or x.shape[1] != width:
            raise VlsaeError(f"{modality} inputs must have shape (batch, {width}), got {tuple(x.shape)}")

    def to_shared(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        self._check(x, modality)
        return self.project[modality](x)

    def from_shared(self, h: torch.Tensor, modality: str) -> torch.Tensor:
        return self.back[modality](h)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.config.similarity == "cosine":
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return a @ b.t() / self.config.temperature

    def loss(self, batch: dict[str, torch.Tensor], recon_coef: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Symmetric InfoNCE on the pair diagonal + reconstruction; metrics include retrieval accuracy."""
        first, second = self.modalities
        shared = {m: self.to_shared(batch[m], m) for m in self.modalities}
        logits = self.logits(shared[first], shared[second])
        target = torch.arange(logits.shape[0], device=logits.device)
        contrastive = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        recon = sum(F.mse_loss(self.from_shared(shared[m], m), batch[m]) for m in self.modalities)
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        total = contrastive + recon_coef * recon
        return total, {"contrastive": float(contrastive.detach()), "recon": float(recon.detach()),
                       "retrieval_acc": float(accuracy)}

    @torch.no_grad()
    def retrieval_accuracy(self, batch: dict[str, torch.Tensor]) -> float:
        """In-batch first->second modality retrieval accuracy (argmax of each row is its pair)."""
        first, second = self.modalities
        logits = self.logits(self.to_shared(batch[first], first), self.to_shared(batch[second], second))
        return float((logits.argmax(dim=1) == torch.arange(logits.shape[0], device=logits.device)).float().mean())

    # ------------------------------------------------------------ save/load
    def save(self, path: str | Path) -> None:
        path = Path(path)
        atomic_save_tensors({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path / PROJECTOR_WEIGHTS)
        atomic_write_text(path / PROJECTOR_CONFIG, json.dumps(to_dict(self.config), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ContrastiveProjector":
        path = Path(path)
        try:
            record = json.loads((path / PROJECTOR_CONFIG).read_text())
        except FileNotFoundError:
            raise VlsaeError(f"{path} has no {PROJECTOR_CONFIG}; train the alignment stage first") from None
        except json.JSONDecodeError as exc:
            raise VlsaeError(f"{path / PROJECTOR_CONFIG} is not valid JSON ({exc.msg})") from None
        projector = cls(from_dict(ProjectorConfig, record, where="projector config"))
        tensors = read_safetensors(path / PROJECTOR_WEIGHTS, what="projector weights")
        try:
            projector.load_state_dict(tensors)
        except RuntimeError as exc:
            raise VlsaeError(f"{path / PROJECTOR_WEIGHTS} does not match {PROJECTOR_CONFIG}: {str(exc).splitlines()[0]}") from None
        return projector


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_projector(source: Any, config: ProjectorTrainConfig | None = None, *, d_shared: int = 0,
                    similarity: str = "cosine", temperature: float = 0.07) -> tuple[ContrastiveProjector, dict[str, float]]:
    """Train the alignment stage on a paired ActivationSource (dict batches of two modalities).

    Returns the projector (in eval mode, on the CPU) and a summary with the final
    in-batch retrieval accuracy before and after alignment on held-out batches.
    """
    config = config or ProjectorTrainConfig()
    if not isinstance(source.d_in, dict) or len(source.d_in) != 2:
        raise VlsaeError("the alignment stage needs paired data of two modalities (e.g. image and text activations)")
    torch.manual_seed(config.seed)
    device = _device(config.device)
    projector = ContrastiveProjector(ProjectorConfig(widths=dict(source.d_in), d_shared=d_shared,
                                                     similarity=similarity, temperature=temperature)).to(device)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, config.steps) / config.steps)).item()))
    held_out = source.sample(min(config.batch_size, len(source)), seed=config.seed + 1)
    held_out = {m: t.to(device).float() for m, t in held_out.items()}
    before = _identity_retrieval(held_out)
    batches: Iterator = source.batches(config.batch_size, seed=config.seed)
    metrics: dict[str, float] = {}
    bar = _progress(config.steps, config.progress)
    for step in range(config.steps):
        batch = {m: t.to(device).float() for m, t in next(batches).items()}
        for m, t in batch.items():
            if not torch.isfinite(t).all():
                raise VlsaeError(f"{m} activations contain NaN or inf (alignment step {step}); clean the data")
        loss, metrics = projector.loss(batch, config.recon_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(acc=f"{metrics['retrieval_acc']:.2f}", nce=f"{metrics['contrastive']:.3f}")
    if bar is not None:
        bar.close()
    projector.eval()
    summary = {"retrieval_acc_before": before, "retrieval_acc_after": projector.retrieval_accuracy(held_out),
               "contrastive": metrics.get("contrastive", float("nan")), "recon": metrics.get("recon", float("nan"))}
    return projector.cpu(), summary


def _identity_retrieval(batch: dict[str, torch.Tensor]) -> float:
    """Retrieval accuracy by raw cosine, when both modalities share a width (else chance, NaN)."""
    a, b = batch.values()
    if a.shape[1] != b.shape[1]:
        return float("nan")
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    return float((logits.argmax(dim=1) == torch.arange(a.shape[0], device=a.device)).float().mean())


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="align", unit="step", leave=False)


class ProjectedSource:
    """An ActivationSource that maps every modality into the projector's shared space."""

    def __init__(self, source: Any, projector: ContrastiveProjector):
        self.source = source
        self.projector = projector
        self.d_in = {m: projector.config.d_shared for m in projector.modalities}

    def __len__(self) -> int:
        return len(self.source)

    @torch.no_grad()
    def _map(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.projector.to_shared(t.float().cpu(), m) for m, t in batch.items()}

    def batches(self, batch_size: int, seed: int, start: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
        """The source's batches mapped into the shared space; ``part`` as the source takes it (a rank's slice)."""
        for batch in reads_part_batches(self.source, batch_size, seed, start, part):
            yield self._map(batch)

    def sample(self, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        return self._map(self.source.sample(n, seed=seed))


class AlignedSAE(nn.Module):
    """A multimodal SAE behind its alignment stage: raw activations in, raw-space reconstructions out."""

    def __init__(self, sae: nn.Module, projector: ContrastiveProjector):
        super().__init__()
        self.sae = sae
        self.projector = projector
        self.arch = getattr(sae, "arch", "")
        self.config = sae.config

    @property
    def n_latents(self) -> int:
        return self.sae.n_latents

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.sae.modalities

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        modality = self.sae.resolve_modality(modality)
        return self.sae.encode(self.projector.to_shared(x, modality), modality)

    def decode(self, code: SparseCode, modality: str | None = None) -> torch.Tensor:
        modality = self.sae.resolve_modality(modality)
        return self.projector.from_shared(self.sae.decode(code, modality), modality)

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, modality), modality)
