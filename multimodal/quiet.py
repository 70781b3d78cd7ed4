"""Quiet loading: keep third-party libraries' log lines and progress bars out of vlsae's output.

open_clip logs through the root logger and transformers draws a progress bar
per file; vlsae reports loading in its own words, so adapters and the zoo's
models load inside these context managers. Both restore the previous state.
"""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_root_logging(level: int):
    """Mute root-logger records at ``level`` and below (open_clip logs through the root logger: a
    warning for random weights, errors for missing ones, which vlsae reports in its own words)."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def quiet_transformers():
    """No per-file progress bars from transformers' loading and saving (one line of output per call
    would interleave with vlsae's own); restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
