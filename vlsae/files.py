"""Files the way vlsae writes and reads them: atomically, safely, with one-line errors.

Every artifact vlsae writes (checkpoints, manifests, reports, shards) goes
through the helpers here, so a crash never leaves half a file where a reader
could find it: each write goes to a temporary sibling that is renamed into
place. :func:`check_writable_dir` is the check every verb runs on its ``--out``
before any long work starts, so an unwritable folder costs a second, not a
minute of training.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlsae.errors import VlsaeError

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".ckpt"}


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """``with atomic_output(path) as tmp:`` write ``tmp`` (a temporary sibling); on a clean exit it is
    renamed to ``path``, on an exception removed, so ``path`` is either the old file or the whole new one.
    For writers that stream into a file (tar shards, tensors) rather than hand over bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it into place."""
    with atomic_output(path) as tmp:
        write(str(tmp))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes via a temp file + fsync + rename, so readers never see half of it."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    _atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temp file + fsync + rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    """``json.dumps(data)`` written atomically (paths and other objects as strings)."""
    atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file via a temp file + rename: an old file stays intact until the new one is complete."""
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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


def looks_like_pickle(path: str | Path) -> bool:
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
    if path.suffix in PICKLE_SUFFIXES or looks_like_pickle(path):
        raise VlsaeError(f"{path} is a pickle/torch.save file; vlsae only loads safetensors (convert it with safetensors.torch.save_file)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise VlsaeError(f"{what} file {path} is corrupt or truncated ({str(exc).splitlines()[0]}); re-create it or restore a copy") from None


def _creatable_in(path: Path) -> tuple[Path, str | None]:
    """(first existing ancestor of ``path``, why nothing can be created there or None)."""
    probe_dir = path
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return probe_dir, "a file is in the way"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".vlsae-write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return probe_dir, exc.strerror or type(exc).__name__
    return probe_dir, None


def check_writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Fail now, in one line, if ``path`` cannot become a folder vlsae writes into.

    Creates nothing: finds the first existing ancestor and checks that this
    process may create entries in it (for an existing ``path``, in ``path``
    itself). The probe is a real temporary file, because permission bits lie on
    read-only mounts and in /proc.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VlsaeError(f"{flag} {path} is a file; give a folder")
    where, reason = _creatable_in(path)
    if reason:
        raise VlsaeError(f"{flag} {path} is not writable ({where}: {reason}); pick a folder you can write to")
    return path


def check_writable_file(path: str | Path, flag: str = "--out") -> Path:
    """As :func:`check_writable_dir`, for an output file: not a folder, and its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise VlsaeError(f"{flag} {path} is a folder; give a file name")
    where, reason = _creatable_in(path.parent)
    if reason:
        raise VlsaeError(f"{flag} {path} is not writable ({where}: {reason}); pick a folder you can write to")
    return path
