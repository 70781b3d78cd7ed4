"""The sparse code type shared by every SAE.

A code stores, per row, the active latents' indices and values. Rows with
fewer active latents than the width ``K`` pad with value 0 (any index); a zero
value never contributes to a decode, so padding is harmless everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseCode:
    """values, indices: (batch, K); n_latents: size of the dictionary."""

    values: torch.Tensor
    indices: torch.Tensor
    n_latents: int

    def to_dense(self) -> torch.Tensor:
        """(batch, n_latents) dense latents; for analysis, not the hot path."""
        dense = self.values.new_zeros(self.values.shape[0], self.n_latents)
        return dense.scatter_add_(1, self.indices, self.values)

    @classmethod
    def from_dense(cls, z: torch.Tensor, k: int | None = None) -> "SparseCode":
        """Keep the ``k`` largest-magnitude entries per row (default: the most
        non-zeros any row has), so a dense activation becomes a code exactly."""
        if k is None:
            k = int((z != 0).sum(dim=1).max().item()) if z.numel() else 0
            k = max(k, 1)
        k = min(k, z.shape[1])
        _, indices = z.abs().topk(k, dim=1, sorted=False)
        return cls(values=z.gather(1, indices), indices=indices, n_latents=z.shape[1])

    def l0(self) -> torch.Tensor:
        """(batch,) number of non-zero latents per row."""
        return (self.values != 0).sum(dim=1)

    def active_mask(self) -> torch.Tensor:
        """(n_latents,) bool: which latents fire anywhere in this batch."""
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=self.values.device)
        fired[self.indices[self.values != 0]] = True
        return fired

    def __len__(self) -> int:
        return self.values.shape[0]

    def detach(self) -> "SparseCode":
        return SparseCode(self.values.detach(), self.indices, self.n_latents)
