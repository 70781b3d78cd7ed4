"""Training: the trainer, its config, activation sources and the trainer's own metrics.

    from vlsae.training import TrainConfig, TensorSource, train
    result = train(sae, TensorSource(x), TrainConfig(steps=2000), out_dir="runs/a")
    result.sae        # input scale folded in: takes raw activations
    result.summary    # fvu, l0, dead_fraction, shrinkage, steps, tokens, seconds, tokens_per_s, ...

Modules: ``config`` (TrainConfig), ``data`` (ActivationSource, TensorSource,
open_tensor_file), ``trainer`` (train), ``state`` (pickle-free resumable state),
``metrics`` (FVU, L0, shrinkage, geometric median), ``log`` (JSONL, TensorBoard,
summary table), ``run`` (YAML run configs behind ``vlsae train``/``vlsae info``).
"""
from vlsae.training.config import TrainConfig, init_seed
from vlsae.training.data import ActivationSource, TensorSource, open_tensor_file
from vlsae.training.metrics import evaluate, fvu, geometric_median, shrinkage
from vlsae.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "init_seed", "ActivationSource", "TensorSource", "open_tensor_file", "evaluate", "fvu",
           "geometric_median", "shrinkage", "TrainResult", "train"]
