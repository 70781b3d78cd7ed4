"""The training config: how to train, kept apart from what the SAE is (its SAEConfig).

Defaults follow Gao et al. ("Scaling and evaluating sparse autoencoders", 2024)
and Anthropic's April 2024 training update ("Circuits Updates - April 2024")
where they agree: Adam (0.9, 0.999) with eps 6.25e-10, lr
2e-4 / sqrt(n_latents / 2^14) unless set, linear warm-up, linear decay to 0 over
the last 20%, gradient-norm clipping at 1, inputs scaled to E||x|| = sqrt(d_in),
b_dec at the geometric median of a sample.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlsae.config import option
from vlsae.errors import VlsaeError


# Fields a resumed run must share with the checkpoint (they change the numbers);
# the rest (device, logging, progress) may differ between the two halves of a run.
SELECTION_DTYPES = ("auto", "fp32", "bf16")
RESUME_KEYS = ("steps", "batch_size", "lr", "betas", "adam_eps", "warmup_steps", "decay_fraction", "grad_clip",
               "seed", "b_dec_init", "init_rows", "normalize_input", "dead_tokens")


@dataclass
class TrainConfig:
    """How to train (the ``train:`` section of a run config)."""

    steps: int = option(2000, help="optimizer steps (one batch each)")
    batch_size: int = option(1024, help="rows per batch (pairs per batch for paired data)")
    lr: float | None = option(None, help="peak learning rate; null means 2e-4 / sqrt(n_latents / 2^14) (Gao et al. scaling)")
    betas: tuple[float, float] = option((0.9, 0.999), help="Adam betas")
    adam_eps: float = option(6.25e-10, help="Adam epsilon (Gao et al.)")
    warmup_steps: int | None = option(None, help="linear warm-up steps; null means min(1000, steps // 20)")
    decay_fraction: float = option(0.2, help="fraction of training at the end over which the lr decays linearly to 0")
    grad_clip: float = option(1.0, help="clip the global gradient norm to this value (0 turns it off)")
    seed: int = option(0, help="seed for initialisation, batch order and every random choice")
    b_dec_init: str = option("geometric_median", help="decoder-bias initialisation: geometric_median, mean or zeros")
    init_rows: int = option(8192, help="rows sampled to initialise b_dec and estimate the input scale")
    normalize_input: bool = option(True, help="train on c*x with E||c*x|| = sqrt(d_in); c is folded into the saved weights")
    dead_tokens: int | None = option(None, help="a latent is dead after this many tokens (rows; pairs for paired data) without firing; null means min(10M, steps * batch_size / 5), at least one batch")
    checkpoint_every: int = option(500, help="write a resumable checkpoint every N steps (0: only at the end)")
    log_every: int = option(50, help="log metrics every N steps")
    eval_rows: int = option(8192, help="rows (held-out when the data has a held-out part) for the end-of-run metrics")
    device: str = option("auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    autocast_bf16: bool = option(True, help="bf16 autocast on CUDA (ignored on the CPU)")
    selection_dtype: str = option("auto", help="precision of the no-grad matmul that only chooses the active latents on the "
                                               "CPU: fp32, bf16, or auto (bf16 where the CPU has bf16 matrix units, AMX or "
                                               "AVX512-BF16); values, loss and gradients stay fp32 either way")
    tensorboard: bool = option(True, help="write TensorBoard logs next to metrics.jsonl")
    progress: bool = option(True, help="show a progress bar with live FVU / L0 / dead fraction")

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise VlsaeError(f"train.steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise VlsaeError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise VlsaeError(f"train.lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise VlsaeError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.dead_tokens is not None and self.dead_tokens <= 0:
            raise VlsaeError(f"train.dead_tokens must be positive, got {self.dead_tokens}")
        if self.selection_dtype not in SELECTION_DTYPES:
            raise VlsaeError(f"train.selection_dtype must be one of {', '.join(SELECTION_DTYPES)}, got '{self.selection_dtype}'")
        if self.init_rows <= 0 or self.eval_rows <= 0:
            raise VlsaeError("train.init_rows and train.eval_rows must be positive")
        if self.log_every <= 0:
            raise VlsaeError(f"train.log_every must be positive, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise VlsaeError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise VlsaeError(f"train.b_dec_init must be geometric_median, mean or zeros, got '{self.b_dec_init}'")
        if not 0 <= self.decay_fraction <= 1:
            raise VlsaeError(f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def resolved_lr(self, n_latents: int) -> float:
        """The peak learning rate: ``lr``, or 2e-4 / sqrt(n_latents / 2^14) when unset."""
        return self.lr if self.lr is not None else 2e-4 / (n_latents / 2 ** 14) ** 0.5

    def resolved_warmup(self) -> int:
        """Warm-up steps: ``warmup_steps``, or min(1000, steps // 20) when unset."""
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 20)

    def resolved_dead_tokens(self) -> int:
        """Tokens without firing after which a latent counts as dead. Gao et al. use
        10M; a short run never sees 10M tokens, so the default is also capped at a
        fifth of the run (at least one batch), which lets AuxK revive latents."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(10_000_000, self.steps * self.batch_size // 5))

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at ``step`` (0-based): (step + 1) / warmup during the
        warm-up, then 1, then (steps - step) / decay_steps over the last ``decay_fraction``
        of the run (so the last step uses 1 / decay_steps and the rate reaches 0 at the end);
        where the two overlap (very short runs) the smaller factor wins."""
        factor = 1.0
        warmup = self.resolved_warmup()
        if warmup and step < warmup:
            factor = (step + 1) / warmup
        decay_steps = int(self.steps * self.decay_fraction)
        if decay_steps and step >= self.steps - decay_steps:
            factor = min(factor, max(0.0, (self.steps - step) / decay_steps))
        return factor


# An SAE's initial weights get a seed of their own, derived from the run's. The
# planted suites draw their directions from torch.Generator().manual_seed(seed), and
# torch's global generator seeded with the same number yields the same normals: an
# SAE built right after torch.manual_seed(seed) started with the planted directions
# as its first decoder rows (measured: MMCS 1.000 before any training step on the
# independent suite, whose directions are the first (n_features, d) normals).
INIT_SEED_OFFSET = 1_000_003


def init_seed(seed: int) -> int:
    """The seed of an SAE's initial weights in a run (or a suite) whose seed is ``seed``."""
    return seed + INIT_SEED_OFFSET
