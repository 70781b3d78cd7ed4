"""The planted readout: a linear readout along one planted feature, for g-SAE and readout fidelity.

g-SAE chooses latents by activation x downstream gradient, so on a planted
suite it needs a downstream quantity that ground truth explains: the linear
readout y = <v_J, x> along planted feature J (its gradient is v_J
everywhere). Shrinking feature J's codes by a factor c < 1 plants a
small-norm feature that drives the readout, g-SAE's synthetic test: TopK at a
tight k never keeps its latent, g-SAE should (research note §7 (d)).

Used twice: the leaderboard's ``readout={"feature": J, "scale": c}``
(:func:`readout_plan`, :func:`plant_readout`, :func:`readout_scores`) and the
run-config readout ``{kind: planted, feature: J}`` for ``vlsae train
--synthetic SUITE`` (registered through the ``vlsae.readouts`` entry point).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from evals.synthetic.generators import PlantedData, generate
from evals.synthetic.score import decoder_directions, encode_decode
from vlsae.errors import VlsaeError
from vlsae.saes import get_sae_class
from vlsae.training.readout import LinearReadout, Readout, check_options, register_readout
from vlsae.training.sources import DataSpec

DEFAULT_READOUT = {"feature": 0, "scale": 1.0}


def needs_readout(arch: str) -> bool:
    """True for archs that select latents by a downstream gradient (``gsae``)."""
    return bool(getattr(get_sae_class(arch), "uses_downstream_grad", False))


def readout_plan(readout: dict[str, Any] | None, archs: list[str], data: PlantedData) -> dict[str, Any] | None:
    """The run's planted readout {feature, scale}: the one given, the default when an arch needs one,
    else None. One-line errors for a paired suite, a bad key or a feature out of range."""
    if readout is None:
        if not any(needs_readout(a) for a in archs):
            return None
        readout = {}
    unknown = sorted(set(readout) - set(DEFAULT_READOUT))
    if unknown:
        raise VlsaeError(f"readout has no key '{unknown[0]}'; it takes feature (planted feature index) and scale "
                         f"(factor on that feature's codes)")
    plan = {**DEFAULT_READOUT, **readout}
    if data.modalities:
        raise VlsaeError(f"the {data.suite} suite is paired: a planted readout reads one stream "
                         f"(drop {', '.join(a for a in archs if needs_readout(a)) or 'the readout'})")
    n = data.directions.shape[0]  # type: ignore[union-attr]
    if not isinstance(plan["feature"], int) or not 0 <= plan["feature"] < n:
        raise VlsaeError(f"readout feature must be a planted feature index in 0..{n - 1}, got {plan['feature']!r}")
    if not isinstance(plan["scale"], (int, float)) or not plan["scale"] > 0:
        raise VlsaeError(f"readout scale must be a positive number, got {plan['scale']!r}")
    plan["scale"] = float(plan["scale"])
    return plan


def plant_readout(data: PlantedData, feature: int, scale: float) -> tuple[PlantedData, Readout]:
    """(data with feature ``feature``'s codes times ``scale``, the linear readout along its direction).

    The suites are linear in their codes (x = h V + noise), so scaling one feature's codes moves the
    activations by exactly (scale - 1) h_J v_J; codes and activations stay consistent."""
    v = data.directions[feature]  # type: ignore[index]

    def rescale(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = codes[:, feature:feature + 1]
        codes = codes.clone()
        codes[:, feature] *= scale
        return x + (scale - 1.0) * h * v, codes

    if scale != 1.0:
        x_tr, z_tr = rescale(data.train, data.codes_train)  # type: ignore[arg-type]
        x_te, z_te = rescale(data.test, data.codes_test)  # type: ignore[arg-type]
        data = dataclasses.replace(data, train=x_tr, test=x_te, codes_train=z_tr, codes_test=z_te,
                                   meta={**data.meta, "readout_feature": feature, "readout_scale": scale})
    return data, Readout(LinearReadout(v), outputs="values", name=f"planted feature {feature}",
                         info={"kind": "planted", "feature": feature, "scale": scale})


def readout_scores(sae: Any, data: PlantedData, feature: int, readout: Readout) -> dict[str, float]:
    """readout_cos: the readout feature's best |cosine| with any decoder direction (as MMCS counts);
    readout_cos_live: the same over latents that fire on the test rows under the SAE's own inference
    encoder (g-SAE infers by plain TopK, so a learned driver latent may stay silent there);
    and the readout fidelity of the SAE's test reconstructions."""
    codes, recon = encode_decode(sae, data.test)  # type: ignore[arg-type]
    live = (codes != 0).any(dim=0)
    D = decoder_directions(sae)
    v = data.directions[feature]  # type: ignore[index]
    cos = ((D @ v) / D.norm(dim=1).clamp_min(1e-12)).abs()
    out = {"readout_cos": float(cos.max()), "readout_cos_live": float(cos[live].max()) if bool(live.any()) else 0.0}
    out.update(readout.fidelity(data.test, recon))  # type: ignore[arg-type]
    return out


def planted_direction(data: DataSpec, feature: int) -> torch.Tensor:
    """(d,) the unit direction of planted feature ``feature`` of the suite a data section names. The
    suite is redrawn from the section (seeded; every generator draws its dictionary before any sample,
    so one row suffices)."""
    if not data.synthetic:
        raise VlsaeError("readout 'planted' reads a planted suite's feature direction: use it with data.synthetic "
                         "(--synthetic SUITE), or give a linear readout with weights (kind: linear, path: FILE)")
    suite = generate(data.synthetic, seed=data.seed, n_train=1, n_test=1, preset=data.preset, noise=data.noise,
                     **data.options)
    if isinstance(suite.directions, dict):
        raise VlsaeError(f"suite '{data.synthetic}' is paired; a readout reads one stream")
    n = suite.directions.shape[0]
    if not 0 <= feature < n:
        raise VlsaeError(f"readout 'planted' feature must be in 0..{n - 1} for suite '{data.synthetic}', got {feature}")
    return suite.directions[feature]


@register_readout("planted")
def planted_readout(options: dict[str, Any], data: DataSpec, d_in: int) -> Readout:
    """``{kind: planted, feature: J}``: y = <v_J, x> on the run's planted suite."""
    check_options(options, {"feature": "index of the planted feature whose direction is read (default 0)"}, "planted")
    feature = options.get("feature", 0)
    if not isinstance(feature, int) or isinstance(feature, bool):
        raise VlsaeError(f"readout 'planted' feature must be an integer, got {feature!r}")
    return Readout(LinearReadout(planted_direction(data, feature)), outputs="values", name=f"planted feature {feature}")
