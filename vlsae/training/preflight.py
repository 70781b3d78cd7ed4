"""Checks the trainer makes before any work: data, run folder, readout.

Kept apart from the training loop so that what can go wrong before a run starts
(and the one-line message for it) reads in one place; ``vlsae train`` and
``run_training`` call :func:`check_out_dir` before reading any data.
"""
from __future__ import annotations

from pathlib import Path

from vlsae.checkpoint import CONFIG, WEIGHTS
from vlsae.errors import VlsaeError
from vlsae.files import check_writable_dir
from vlsae.saes.base import SAE
from vlsae.training.data import ActivationSource

CHECKPOINT_DIR = "checkpoint"
TRAINING_JSON = "training.json"


def check_compatible(sae: SAE, source: ActivationSource, what: str = "the data") -> None:
    """One-line errors when the data cannot feed this SAE."""
    if len(source) == 0:
        raise VlsaeError(f"the dataset is empty: {what} has no rows to train on")
    widths = source.d_in
    if isinstance(widths, dict):
        if not sae.modalities:
            raise VlsaeError(f"{what} is paired ({', '.join(widths)}) but '{sae.arch}' is a single-stream SAE; "
                             "use a multimodal architecture (vl, vl-split, vl-shared) or select one modality")
        for m, w in widths.items():
            if m not in sae.modalities:
                raise VlsaeError(f"{what} has modality '{m}' but the SAE has {list(sae.modalities)}")
            if w != sae.d_in:
                raise VlsaeError(f"modality '{m}' of {what} has width {w} but the SAE expects d_in={sae.d_in}")
    else:
        if sae.modalities:
            raise VlsaeError(f"'{sae.arch}' trains on paired data (modalities {list(sae.modalities)}), "
                             f"but {what} is a single tensor; give paired data (e.g. an activation cache with image and text)")
        if widths != sae.d_in:
            raise VlsaeError(f"{what} has width {widths} but the SAE expects d_in={sae.d_in}; build the SAE with d_in={widths}")


def check_out_dir(out_dir: str | Path | None, resume: bool) -> None:
    """Refuse to overwrite a run or checkpoint; refuse to resume without a checkpoint."""
    if out_dir is None:
        if resume:
            raise VlsaeError("--resume needs --out pointing at the interrupted run")
        return
    out = check_writable_dir(out_dir)
    if out.exists() and not out.is_dir():
        raise VlsaeError(f"--out {out} is a file; give a folder for the run")
    recover_checkpoint(out)
    finished = (out / TRAINING_JSON).exists()
    checkpoint = (out / CHECKPOINT_DIR).is_dir()
    if resume:
        if finished:
            raise VlsaeError(f"the run in {out} already finished; nothing to resume (start another with a new --out)")
        if not checkpoint:
            raise VlsaeError(f"no checkpoint to resume in {out}; start the run without --resume (or check the --out path)")
        return
    if finished:
        raise VlsaeError(f"{out} already holds a finished run; choose another --out "
                         "(vlsae never overwrites a run; --resume only continues interrupted ones)")
    if checkpoint:
        raise VlsaeError(f"{out} holds an interrupted run; pass --resume to continue it or choose another --out")
    if (out / WEIGHTS).exists() or (out / CONFIG).exists():
        raise VlsaeError(f"{out} already holds an SAE checkpoint; choose another --out (vlsae never overwrites one)")


def recover_checkpoint(out: Path) -> None:
    """replace_dir renames the old checkpoint aside, then the new one into place; a
    kill between the two renames leaves only ``.checkpoint.old``, a complete
    checkpoint, which goes back into place here."""
    old = out / f".{CHECKPOINT_DIR}.old"
    if old.is_dir() and not (out / CHECKPOINT_DIR).exists() and not (out / TRAINING_JSON).exists():
        try:
            old.rename(out / CHECKPOINT_DIR)
        except FileNotFoundError:  # another process of a data-parallel run put it back first
            pass


def check_readout(sae: SAE | type[SAE], has_readout: bool, paired: bool = False) -> None:
    """A g-SAE needs a readout (its choice uses the downstream gradient); an SAE built without
    gradients (ITDA) cannot use one; a readout reads one stream, not paired data. Takes the SAE or
    its class, so run configs are checked before any data or model is loaded."""
    if getattr(sae, "uses_downstream_grad", False) and not has_readout:
        raise VlsaeError(f"'{sae.arch}' selects latents by activation x downstream gradient and needs a readout: "
                         "pass readout= to train() (a module or a function of the activations) or give the run config "
                         "a readout section, e.g. readout: {kind: linear, path: w.safetensors}")
    if not has_readout:
        return
    if not getattr(sae, "trains_by_gradient", True):
        raise VlsaeError(f"'{sae.arch}' is built in one pass without gradients, so a readout (a downstream gradient) "
                         "does not apply; drop the readout")
    if paired:
        raise VlsaeError("a readout reads one stream of activations, but the data is paired; "
                         "train on one modality (--modality image) to use a readout")
