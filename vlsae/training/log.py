"""Run logs: one JSON line per logged step, TensorBoard scalars, the summary table."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vlsae.files import atomic_write_text

METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends to ``out/metrics.jsonl`` and TensorBoard; a no-op without ``out``.

    On resume, lines past the checkpoint's step (logged before the crash but not
    covered by the checkpoint) are dropped, so the log has each step once.
    """

    def __init__(self, out: Path | None, start_step: int = 0, tensorboard: bool = True):
        self.handle = None
        self.writer = None
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / METRICS_JSONL
        if start_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= start_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self.handle = open(path, "a")
        if tensorboard:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=start_step or None)
            except Exception as exc:  # TensorBoard is optional; the JSONL log is the record
                print(f"vlsae: TensorBoard logging off ({exc.__class__.__name__}: {exc})")

    def write(self, record: dict[str, float]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line: drop it


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return str(value)


def print_summary(summary: dict[str, Any], title: str = "training summary") -> None:
    """A two-column table of the end-of-run figures."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, format_value(value))
    Console().print(table)
