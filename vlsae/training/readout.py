"""Readouts: a downstream function of the activations, for SAEs and figures that need a downstream loss.

An SAE is judged by what its reconstruction does downstream, not only by its
FVU, and one architecture (g-SAE) even *selects* latents by their effect on a
downstream loss. vlsae has no downstream model of its own, so the caller
supplies one: a readout maps raw activations ``(batch, d_in)`` to outputs,
either ``values`` (``(batch,)`` or ``(batch, n_out)``: a linear probe, a scalar
score) or ``logits`` (``(batch, n_classes)``: CLIP's zero-shot class logits).
From it come

- the downstream loss per row ``l(x)``: for values, the sum of the outputs
  (one output: the value itself, so its gradient is the readout direction, "how
  much this activation moves the quantity downstream"); for logits, the
  cross-entropy against the class the readout predicts at ``x`` itself, the
  label-free analogue of a language model's next-token loss (a trainer sees
  activations, never labels);
- its gradient ``g = d l / d x`` per row (rows are independent), which the
  trainer hands to SAEs that ask for it (``uses_downstream_grad``);
- fidelity figures of a reconstruction: the readout FVU for values; the
  cross-entropy increase, KL divergence and argmax agreement for logits.

Any ``nn.Module`` or function of the activations becomes one with
:func:`as_readout`. Run configs name a registered readout
(``readout: {kind: linear, path: w.safetensors}``): this module registers
``linear`` (weights from a file); packages above vlsae register the readouts
that need their data (``planted``: a planted suite's feature direction;
``zeroshot``: a CLIP model's class prompts) through the ``vlsae.readouts``
entry point, so vlsae never imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsae.errors import VlsaeError
from vlsae.files import read_safetensors
from vlsae.registry import Registry
from vlsae.training.sources import DataSpec

ENTRY_POINT_GROUP = "vlsae.readouts"
OUTPUT_KINDS = ("auto", "values", "logits")


@dataclass
class Readout:
    """fn: raw activations (batch, d_in) -> (batch,) or (batch, n_out) outputs (a module or a function);
    outputs: 'values', 'logits', or 'auto' (one output column: values; more: logits);
    info: a JSON-safe description recorded in training.json."""

    fn: Callable[[Tensor], Tensor]
    outputs: str = "auto"
    name: str = "readout"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outputs not in OUTPUT_KINDS:
            raise VlsaeError(f"readout outputs must be one of {', '.join(OUTPUT_KINDS)}, got '{self.outputs}'")

    def __call__(self, x: Tensor) -> Tensor:
        """(batch, d_in) -> (batch, n_out) float outputs (a 1-D output becomes one column)."""
        y = self.fn(x)
        if not isinstance(y, Tensor):
            raise VlsaeError(f"the readout returned {type(y).__name__}, not a tensor; it must map (batch, d_in) "
                             "activations to (batch,) or (batch, n_out) outputs")
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise VlsaeError(f"the readout maps {tuple(x.shape)} activations to shape {tuple(y.shape)}; "
                             f"it must return ({x.shape[0]},) or ({x.shape[0]}, n_out)")
        return y.float()

    def kind_of(self, y: Tensor) -> str:
        if self.outputs != "auto":
            return self.outputs
        return "values" if y.shape[1] == 1 else "logits"

    def to(self, device: torch.device | str) -> "Readout":
        """Move a module readout's parameters and buffers (a plain function is left as it is)."""
        if isinstance(self.fn, nn.Module):
            self.fn.to(device)
        return self

    # ------------------------------------------------------------ the loss
    def loss(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(batch,) downstream loss per row (see the module docstring); ``labels``: the classes
        the logits are scored against (default: the readout's own argmax at ``x``)."""
        y = self(x)
        if self.kind_of(y) == "values":
            return y.sum(dim=1)
        if labels is None:
            labels = y.detach().argmax(dim=1)
        return F.cross_entropy(y, labels, reduction="none")

    def input_gradient(self, x: Tensor) -> Tensor:
        """(batch, d_in): d loss / d x for every row, without touching the readout's own gradients."""
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            total = self.loss(xg).sum()
            (grad,) = torch.autograd.grad(total, xg, allow_unused=True)
        return torch.zeros_like(xg) if grad is None else grad.detach()

    # ------------------------------------------------------------ checks and figures
    def check(self, x: Tensor) -> None:
        """One-line errors, before training, for a readout that cannot serve these activations."""
        try:
            with torch.no_grad():
                y = self(x)
        except VlsaeError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise VlsaeError(f"the readout fails on activations of width {x.shape[1]} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                             "give a readout that takes this SAE's input width") from None
        if not bool(torch.isfinite(y).all()):
            raise VlsaeError("the readout gives NaN or inf outputs on the training activations; check its weights")

    @torch.no_grad()
    def fidelity(self, x: Tensor, recon: Tensor, batch_size: int = 4096) -> dict[str, float]:
        """How well ``recon`` (batch, d_in) stands in for ``x`` downstream.

        values: ``readout_fvu`` = sum (f(x_hat) - f(x))^2 / sum (f(x) - mean f(x))^2;
        logits: ``readout_ce_increase`` (mean cross-entropy against the readout's class at x, on x_hat
        minus on x), ``readout_kl`` (mean KL(p(x) || p(x_hat))) and ``readout_agreement`` (fraction of
        rows whose argmax class is unchanged).
        """
        ys, yh = [], []
        for start in range(0, x.shape[0], batch_size):
            ys.append(self(x[start:start + batch_size].float()))
            yh.append(self(recon[start:start + batch_size].float()))
        y, y_hat = torch.cat(ys), torch.cat(yh)
        if self.kind_of(y) == "values":
            var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
            return {"readout_fvu": float((y_hat - y).pow(2).sum() / var)}
        labels = y.argmax(dim=1)
        log_p, log_q = F.log_softmax(y, dim=1), F.log_softmax(y_hat, dim=1)
        ce_x = F.nll_loss(log_p, labels)
        ce_hat = F.nll_loss(log_q, labels)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
        return {"readout_ce_increase": float(ce_hat - ce_x), "readout_kl": float(kl),
                "readout_agreement": float((y_hat.argmax(dim=1) == labels).float().mean())}


ReadoutLike = Union[Readout, nn.Module, Callable[[Tensor], Tensor]]


class LinearReadout(nn.Module):
    """y = x W^T + b: weight (n_out, d_in), bias (n_out,); a linear probe or a planted readout direction."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        if weight.ndim == 1:
            weight = weight[None, :]
        if weight.ndim != 2:
            raise VlsaeError(f"a linear readout's weight must be (d_in,) or (n_out, d_in), got shape {tuple(weight.shape)}")
        self.register_buffer("weight", weight.clone())
        b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float().reshape(-1)
        if b.shape[0] != weight.shape[0]:
            raise VlsaeError(f"a linear readout's bias has {b.shape[0]} entries for {weight.shape[0]} outputs")
        self.register_buffer("bias", b.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.float() @ self.weight.t() + self.bias


def as_readout(obj: ReadoutLike | None) -> Readout | None:
    """A :class:`Readout` from a readout, a module or a function of the activations (None stays None)."""
    if obj is None or isinstance(obj, Readout):
        return obj
    if not callable(obj):
        raise VlsaeError(f"a readout must be a module or a function of the activations, got {type(obj).__name__}")
    name = type(obj).__name__ if isinstance(obj, nn.Module) else getattr(obj, "__name__", "function")
    return Readout(obj, name=name, info={"kind": "python", "name": name})


# --------------------------------------------------------------------- registry
ReadoutBuilder = Callable[[dict, DataSpec, int], Readout]
READOUTS: Registry[ReadoutBuilder] = Registry("readout", entry_point_group=ENTRY_POINT_GROUP, name_attr="readout_kind")


def register_readout(kind: str) -> Callable[[ReadoutBuilder], ReadoutBuilder]:
    """Decorator: ``fn(options, data_spec, d_in) -> Readout`` builds the readout ``readout: {kind: KIND}`` names."""
    return READOUTS.register(kind)


def list_readouts() -> list[str]:
    return READOUTS.names()


def check_options(options: dict[str, Any], allowed: dict[str, str], kind: str) -> None:
    """One-line error for an option key a readout kind does not take (with the valid ones and their meaning)."""
    for key in options:
        if key not in allowed:
            valid = "; ".join(f"{k}: {v}" for k, v in allowed.items())
            raise VlsaeError(f"readout '{kind}' has no option '{key}' (options: {valid})")


def build_readout(section: dict[str, Any] | None, data: DataSpec, d_in: int) -> Readout | None:
    """The readout a run config's ``readout:`` section names (None when the section is empty)."""
    if not section:
        return None
    if not isinstance(section, dict):
        raise VlsaeError("'readout' in the run config must be a mapping like {kind: linear, path: w.safetensors}")
    options = dict(section)
    kind = options.pop("kind", None)
    if not kind:
        raise VlsaeError(f"the readout section needs a kind: one of {READOUTS.listing()} "
                         "(e.g. readout: {kind: linear, path: w.safetensors})")
    readout = READOUTS.get(str(kind))(options, data, d_in)
    readout.info = {"kind": str(kind), **options, **readout.info}
    return readout


@register_readout("linear")
def linear_readout(options: dict[str, Any], data: DataSpec, d_in: int) -> Readout:
    """``{kind: linear, path: FILE.safetensors, outputs: auto}``: tensors ``weight`` ((d_in,) or (n_out, d_in))
    and optionally ``bias``, in the raw activation space."""
    allowed = {"path": "safetensors file with 'weight' (d_in,) or (n_out, d_in) and optional 'bias' (required)",
               "outputs": "values, logits or auto (default auto)"}
    check_options(options, allowed, "linear")
    if not options.get("path"):
        raise VlsaeError("readout 'linear' needs path: a safetensors file with a 'weight' tensor of shape (n_out, d_in)")
    path = Path(str(options["path"]))
    if not path.is_file():
        raise VlsaeError(f"readout weights not found: {path}")
    tensors = read_safetensors(path, what="readout weights")
    if "weight" not in tensors:
        raise VlsaeError(f"{path} has no tensor 'weight' (it has {', '.join(sorted(tensors)) or 'none'})")
    module = LinearReadout(tensors["weight"], tensors.get("bias"))
    if module.weight.shape[1] != d_in:
        raise VlsaeError(f"readout weight {path} has input width {module.weight.shape[1]}, but the data has width {d_in}")
    return Readout(module, outputs=str(options.get("outputs", "auto")), name="linear")
