"""SAE checkpoints: a folder with ``sae.safetensors`` and ``config.json``.

The folder is self-describing and loads without any trainer state:
``config.json`` holds ``{"arch": name, "config": {...}, "format": 1}`` plus any
metadata the caller adds; tensors keep their module names (``W_enc``, ``b_enc``,
``W_dec``, ``b_dec`` and architecture extras such as ``threshold``). Writes go to
a temporary sibling folder that is renamed into place, so a crash never leaves
a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlsae.config import to_dict
from vlsae.errors import VlsaeError
from vlsae.saes import SAE, create_sae, get_sae_class

WEIGHTS = "sae.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temp file + rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing an older one.

    The old folder is renamed aside first and removed only after the new one is
    in place, so at every instant one complete copy exists on disk.
    """
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """save_file via a temp file + rename: the old file stays intact until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sae(sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to the folder ``path`` atomically; returns the path.

    Other files already in ``path`` (logs, a training summary) are kept.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    atomic_save_tensors(tensors, path / WEIGHTS, metadata={"arch": sae.arch})
    record = {"format": FORMAT_VERSION, "arch": sae.arch, "config": to_dict(sae.config)}
    if metadata:
        record["metadata"] = metadata
    atomic_write_text(path / CONFIG, json.dumps(record, indent=2))
    return path


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip ('PK') or a raw pickle (0x80 protocol byte); a
    safetensors file starts with an 8-byte header length followed by '{'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:1] == b"\x80" or head[:2] == b"PK"


def read_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a safetensors file with one-line errors for missing, pickled or truncated files."""
    path = Path(path)
    if not path.is_file():
        raise VlsaeError(f"{what} file not found: {path}")
    if path.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"} or _looks_like_pickle(path):
        raise VlsaeError(f"{path} is a pickle/torch.save file; vlsae only loads safetensors (convert it with safetensors.torch.save_file)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise VlsaeError(f"{what} file {path} is corrupt or truncated ({str(exc).splitlines()[0]}); re-create it or restore a copy") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise VlsaeError(f"checkpoint not found: {path}")
    if path.is_file():
        raise VlsaeError(f"{path} is a file; a checkpoint is a folder with {WEIGHTS} and {CONFIG}")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise VlsaeError(f"{path} has no {CONFIG}; is it a vlsae checkpoint folder?")
    try:
        record = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise VlsaeError(f"{cfg_path} is not valid JSON ({exc.msg}); the checkpoint is damaged") from None
    if not isinstance(record, dict) or "arch" not in record or "config" not in record:
        raise VlsaeError(f"{cfg_path} lacks 'arch' or 'config'; not a vlsae SAE checkpoint")
    return record


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild an SAE from a checkpoint folder written by :func:`save_sae`.

    When the folder also holds an alignment stage (``projector.safetensors``),
    the SAE comes back wrapped in :class:`vlsae.alignment.AlignedSAE`, which
    projects raw activations in and maps reconstructions back out.
    """
    path = Path(path)
    record = read_config(path)
    get_sae_class(record["arch"])  # unknown arch -> one-line error listing the registry
    sae = create_sae(record["arch"], record["config"])
    tensors = read_safetensors(path / WEIGHTS, what="SAE weights")
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise VlsaeError(f"{path / WEIGHTS} does not match its config (missing {missing}, unexpected {unexpected})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VlsaeError(f"{path / WEIGHTS}: tensor '{name}' has shape {tuple(tensor.shape)}, config says {tuple(expected[name].shape)}")
    sae.load_state_dict(tensors)
    sae = sae.to(device)
    from vlsae.alignment import PROJECTOR_WEIGHTS, AlignedSAE, ContrastiveProjector
    if (path / PROJECTOR_WEIGHTS).exists():
        return AlignedSAE(sae, ContrastiveProjector.load(path).to(device))  # type: ignore[return-value]
    return sae
