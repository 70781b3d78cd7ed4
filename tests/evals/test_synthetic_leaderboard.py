"""The leaderboard runner and ``vlsae synth``: tiny end-to-end runs."""
import json
import math

import pytest

from evals.synthetic.leaderboard import calibrate_penalty, default_archs, run_suite
from vlsae.cli import main
from vlsae.saes import list_archs

TINY = dict(steps=30, n_train=1_000, n_test=300, batch_size=128, show=False)


def test_calibrate_penalty_hits_target():
    # a power law L0 = 40 * coef^-0.7: the secant finds coef with L0 within 10% of the target
    calls = []

    def fit(coef):
        calls.append(coef)
        return None, 40.0 * coef ** -0.7

    coef, _, history = calibrate_penalty(fit, target=5.0, start=1.0, tries=5)
    assert abs(40.0 * coef ** -0.7 - 5.0) / 5.0 <= 0.1
    assert len(history) == len(calls) <= 5


def test_calibrate_penalty_recovers_from_silence():
    def fit(coef):  # nothing fires above coef 1
        return None, 0.0 if coef > 1 else 3.0 / coef

    coef, _, history = calibrate_penalty(fit, target=3.0, start=100.0, tries=6)
    assert history[0][1] == 0.0
    assert abs(3.0 / coef - 3.0) / 3.0 < 0.5


def test_default_archs_fit_the_suite():
    archs = default_archs("hierarchical", "A")
    assert "topk" in archs
    multimodal = [a for a in list_archs() if a.startswith("vl")]
    assert not set(multimodal) & set(archs)
    assert set(multimodal) <= set(default_archs("multimodal", "shared"))
    assert not set(multimodal) & set(default_archs("multimodal", "separate"))


def test_run_suite_topk_rows_and_json(tmp_path):
    out = tmp_path / "res.json"
    rows = run_suite("hierarchical", ["topk"], k=2, out=out, **TINY)
    assert len(rows) == 1
    row = rows[0]
    assert row["arch"] == "topk" and row["n_latents"] == 20 and row["rank"] == 1
    assert row["l0"] <= 2.0 + 1e-6
    for key in ("fvu", "mmcs", "frr_0.9", "mcc", "absorption_cos", "absorption_rate", "dead_fraction"):
        assert key in row
    saved = json.loads(out.read_text())
    assert saved["settings"]["suite"] == "hierarchical" and saved["rows"][0]["arch"] == "topk"
    # an existing result file is not replaced silently
    from vlsae.errors import VlsaeError
    with pytest.raises(VlsaeError, match="exists"):
        run_suite("hierarchical", ["topk"], out=out, **TINY)
    run_suite("hierarchical", ["topk"], out=out, overwrite=True, **TINY)


def test_run_suite_multimodal_settings():
    shared = run_suite("multimodal", ["topk"], preset="shared", n_latents=64, k=4, **TINY)[0]
    assert shared["mode"] == "one SAE on image+text rows"
    assert "multimodal_fraction" in shared and "frr_0.9_text" in shared
    separate = run_suite("multimodal", ["topk"], preset="separate", n_latents=64, k=4, **TINY)[0]
    assert separate["mode"] == "one SAE per modality"
    assert set(separate["train"]) == {"image", "text"}
    # two independently trained SAEs share indices only by chance
    assert separate["same_index_agreement"] <= 0.2


@pytest.mark.skipif("vl" not in list_archs(), reason="no multimodal SAE registered")
def test_run_suite_accepts_paired_multimodal_sae():
    row = run_suite("multimodal", ["vl"], preset="shared", n_latents=64, k=4, **TINY)[0]
    assert row["mode"] == "paired multimodal SAE"
    assert 0.0 <= row["same_index_agreement"] <= 1.0 and math.isfinite(row["fvu"])


def test_run_suite_user_errors():
    from vlsae.errors import VlsaeError
    with pytest.raises(VlsaeError, match="unknown SAE architecture"):
        run_suite("hierarchical", ["nope"], **TINY)
    with pytest.raises(VlsaeError, match="at least k"):
        run_suite("hierarchical", ["topk"], n_latents=2, k=3, **TINY)
    if "vl" in list_archs():
        with pytest.raises(VlsaeError, match="multimodal suite"):
            run_suite("hierarchical", ["vl"], **TINY)


def test_cli_synth_end_to_end(tmp_path, capsys):
    out = tmp_path / "synth.json"
    code = main(["synth", "--suite", "bidirectional", "--archs", "topk", "--steps", "20", "--n-train", "1000",
                 "--n-test", "300", "--latents", "64", "--k", "4", "--batch-size", "128",
                 "--option", "p_plus=0.8", "--out", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    row = saved["rows"][0]
    assert row["arch"] == "topk" and 0.0 <= row["split_rate"] <= 1.0
    assert saved["settings"]["options"] == {"p_plus": 0.8}
    assert "topk" in capsys.readouterr().out


def test_cli_synth_readout_flag_plants_the_readout(tmp_path, capsys):
    out = tmp_path / "synth.json"
    assert main(["synth", "--suite", "independent", "--archs", "topk,gsae", "--steps", "20", "--n-train", "1000",
                 "--n-test", "300", "--latents", "32", "--k", "3", "--option", "n_features=32", "--option", "d=16",
                 "--readout", "feature=2", "--readout", "scale=0.5", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["settings"]["readout"] == {"feature": 2, "scale": 0.5}
    assert all(0.0 <= r["readout_cos"] <= 1.0 for r in saved["rows"])
    assert "readout cos" in capsys.readouterr().out
    assert main(["synth", "--suite", "independent", "--archs", "topk", "--readout", "feature=99", "--steps", "5",
                 "--option", "n_features=32"]) == 2
    assert "readout feature must be a planted feature index in 0..31" in capsys.readouterr().err


def test_cli_synth_errors(tmp_path, capsys):
    assert main(["synth", "--suite", "hierarchical", "--archs", "nope", "--steps", "5"]) == 2
    assert "unknown SAE architecture" in capsys.readouterr().err
    assert main(["synth", "--suite", "hierarchical", "--archs", "topk", "--option", "colour=3", "--steps", "5"]) == 2
    assert "no option 'colour'" in capsys.readouterr().err
    assert main(["synth", "--suite", "hierarchical", "--archs", "topk", "--sae-option", "relu.l1_coef=1", "--steps", "5"]) == 2
    assert "not among the archs" in capsys.readouterr().err
    assert main(["synth", "--suite", "hierarchical", "--archs", "topk", "--sae-option", "topk.kk=1", "--steps", "5"]) == 2
    assert "unknown key 'kk'" in capsys.readouterr().err
    assert main(["synth", "--suite", "hierarchical", "--archs", "topk", "--train-option", "betaz=1", "--steps", "5"]) == 2
    assert "unknown key 'betaz'" in capsys.readouterr().err


def test_options_reach_the_sae_and_trainer():
    row = run_suite("hierarchical", ["relu"], arch_options={"relu": {"l1_coef": 0.5}},
                    train_options={"b_dec_init": "zeros"}, **TINY)[0]
    assert row["config"]["l1_coef"] == 0.5 and "penalty" not in row  # a given coefficient is not calibrated


def test_run_suite_seeds_aggregate():
    rows = run_suite("hierarchical", ["topk"], k=2, seeds=2, **TINY)
    row = rows[0]
    assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2
    per = [r["mcc"] for r in row["per_seed"]]
    assert row["mcc"] == pytest.approx(sum(per) / 2)
    assert row["std"]["mcc"] == pytest.approx(abs(per[0] - per[1]) / math.sqrt(2))
    # each seed drew its own dictionary
    assert row["per_seed"][0]["mmcs"] != row["per_seed"][1]["mmcs"]


@pytest.mark.slow
def test_abstopk_keeps_axes_whole_topk_splits():
    """AbsTopK's claim on the bidirectional suite at default sizes (measured: split 0.0
    vs 0.63, latents per axis 1.0 vs 1.63 over seeds 0-2, sd < 0.01)."""
    rows = {r["arch"]: r for r in run_suite("bidirectional", ["topk", "abstopk"], show=False)}
    abs_, topk = rows["abstopk"], rows["topk"]
    assert abs_["axis_recovery"] > 0.95 and abs_["split_rate"] < 0.05
    assert abs(abs_["latents_per_axis"] - 1.0) < 0.1 and abs_["sign_accuracy_fired"] > 0.95
    assert topk["split_rate"] > 0.3 and topk["latents_per_axis"] > 1.3
    assert abs_["sign_accuracy"] > topk["sign_accuracy"] + 0.2
