"""Task ``synth``: the planted-feature leaderboard (``vlsae synth``, ``vlsae eval synth``).

Trains each architecture on one synthetic suite with known ground truth (equal
width, equal L0 target) and scores recovery, absorption, splitting and
cross-modal agreement; the work is :func:`evals.synthetic.leaderboard.run_suite`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlsae.config import option

from evals.synthetic.leaderboard import run_suite
from evals.tasks import register_task
from evals.tasks.base import Task


@dataclass
class SynthConfig:
    suite: str = option("hierarchical", help="planted-feature suite: independent, hierarchical, bidirectional, multimodal")
    preset: str | None = option(None, help="suite preset (default: the suite's first)")
    archs: list[str] | None = option(None, help="architectures (default: every registered one that fits the suite)")
    latents: int | None = option(None, help="dictionary width for every arch (default: the number of planted features)")
    k: int | None = option(None, help="L0 target: k of TopK-family archs, calibration target of penalty archs (default: per suite)")
    steps: int | None = option(None, help="training steps per SAE (default 1500)")
    batch_size: int | None = option(None, help="training batch size (default 512)")
    lr: float | None = option(None, help="learning rate (default: the trainer's)")
    seed: int = option(0, help="seed of the data and of every SAE")
    seeds: int = option(1, help="repeat for seeds seed..seed+N-1 and report mean and sd")
    noise: float = option(0.0, help="noise sigma added to the activations")
    n_train: int | None = option(None, help="training rows to draw (default 20000)")
    n_test: int | None = option(None, help="test rows to draw (default 5000)")
    options: dict = option(factory=dict, help="suite options, e.g. {correlation: 0.3}")
    sae_options: dict = option(factory=dict, help="SAE config values per arch, e.g. {mp: {residual_threshold: 0.05}}")
    train_options: dict = option(factory=dict, help="trainer settings, e.g. {b_dec_init: zeros}")
    readout: dict | None = option(None, help="planted linear readout {feature: J, scale: c} every arch gets (g-SAE needs one; "
                                             "default: none, feature 0 at scale 1 when an arch needs it)")
    device: str = option("auto", help="training device: auto, cpu or cuda")
    out: str | None = option(None, help="write the leaderboard rows to this JSON file")
    overwrite: bool = option(False, help="replace an existing out file")
    progress: bool = option(True, help="print the leaderboard table")


@register_task("synth")
class SynthTask(Task):
    summary = "train SAEs on a planted-feature suite and score recovery, absorption, splitting (leaderboard)"
    config_class = SynthConfig
    output_fields = ()
    output_file_fields = ("out",)

    @classmethod
    def run(cls, config: SynthConfig) -> dict[str, Any]:
        rows = run_suite(config.suite, config.archs, n_latents=config.latents, k=config.k, steps=config.steps,
                         seed=config.seed, seeds=config.seeds, preset=config.preset, n_train=config.n_train,
                         n_test=config.n_test, noise=config.noise, batch_size=config.batch_size, lr=config.lr,
                         device=config.device, options=config.options, arch_options=config.sae_options,
                         train_options=config.train_options, readout=config.readout, out=config.out, overwrite=config.overwrite,
                         show=config.progress)
        return {"suite": config.suite, "rows": rows, "out": config.out}

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        return [f"wrote {result['out']}"] if result.get("out") else []
