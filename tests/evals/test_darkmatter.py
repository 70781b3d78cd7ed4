"""The dark-matter analysis of SAE errors (evals/darkmatter, vlsae darkmatter)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from evals.darkmatter import dark_matter, error_norm_agreement, run_darkmatter
from evals.synthetic import generate
from vlsae.cli import main
from vlsae.errors import VlsaeError
from vlsae.saes import create_sae
from vlsae.training import TensorSource, TrainConfig, train

QUIET = dict(progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def planted():
    return generate("independent", seed=0, n_train=6000, n_test=6000, preset="light", noise=0.1)


def test_white_noise_around_a_perfect_dictionary_is_not_linearly_predictable(planted):
    clean = planted.codes_test @ planted.directions  # the true dictionary with the true codes
    scores = dark_matter(planted.test, clean)
    assert abs(scores["error_r2"]) < 0.02 and abs(scores["norm_r2"]) < 0.02
    assert scores["nonlinear_fvu"] >= scores["fvu"] * 0.99  # nothing linear to add back


def test_shrinkage_is_linearly_predictable(planted):
    x = planted.test
    scores = dark_matter(x, 0.7 * x + 0.02 * torch.randn_like(x))  # an L1-like uniform shrinkage plus noise
    assert scores["error_r2"] > 0.9 and scores["nonlinear_fvu"] < 0.5 * scores["fvu"]
    assert scores["rows_fit"] == scores["rows_test"] == 3000


@pytest.mark.slow  # two trainings: about 20 s on an idle core
def test_relu_l1_sae_error_is_more_predictable_than_topk(planted):
    x = TensorSource(planted.train)
    cfg = TrainConfig(steps=300, batch_size=512, **QUIET)
    relu = train(create_sae("relu", d_in=64, n_latents=512, l1_coef=5.0), x, cfg).sae
    topk = train(create_sae("topk", d_in=64, n_latents=512, k=5), x, cfg).sae
    with torch.no_grad():
        r_relu = dark_matter(planted.test, relu(planted.test))
        r_topk = dark_matter(planted.test, topk(planted.test))
    assert r_relu["error_r2"] > 0.3 and r_relu["error_r2"] > r_topk["error_r2"] + 0.1


def test_error_norm_agreement():
    x = torch.randn(400, 8)
    small = x * 0.5
    same = error_norm_agreement(x, small, x * 0.75)  # errors 0.5 x and 0.25 x: the same rows fail
    assert same["pearson"] > 0.999 and same["spearman"] > 0.999 and same["r2"] > 0.99
    unrelated = error_norm_agreement(x, small, x + torch.randn(400, 8))
    assert abs(unrelated["spearman"]) < 0.2


def test_run_darkmatter_report_and_cli(tmp_path, planted, capsys):
    data = tmp_path / "acts.safetensors"
    save_file({"x": planted.test[:3000].contiguous()}, str(data))
    runs = []
    for n in (128, 512):
        sae = create_sae("topk", d_in=64, n_latents=n, k=5)
        runs.append(str(train(sae, TensorSource(planted.train), TrainConfig(steps=10, batch_size=512, **QUIET),
                              out_dir=tmp_path / f"topk{n}").out_dir))
    result = run_darkmatter(runs, str(data), str(tmp_path / "report"), max_rows=2000)
    assert len(result["results"]) == 2 and len(result["agreement"]) == 1
    assert result["agreement"][0]["n_latents"] == [128, 512]
    for name in ("index.html", "results.json", "predictability.png", "norms.png", "sizes.png"):
        assert (tmp_path / "report" / name).is_file(), name
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["results"][0]["rows_test"] == 1000 and "norms" not in saved["results"][0]
    assert main(["darkmatter", "--sae", runs[0], "--data", str(data), "--out", str(tmp_path / "r2")]) == 0
    assert "error R²" in capsys.readouterr().out
    # bad inputs: one line, exit 2, nothing written
    assert main(["darkmatter", "--sae", runs[0], "--data", str(data), "--out", str(tmp_path / "report")]) == 2
    assert "not empty" in capsys.readouterr().err
    wide = tmp_path / "wide.safetensors"
    save_file({"x": torch.randn(100, 32)}, str(wide))
    assert main(["darkmatter", "--sae", runs[0], "--data", str(wide), "--out", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err
    assert "width 64" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r3").exists()


def test_paired_data_needs_the_modality_of_a_single_stream_sae(tmp_path, planted):
    data = tmp_path / "pairs.safetensors"
    save_file({"image": planted.test[:500].contiguous(), "text": planted.test[500:1000].contiguous()}, str(data))
    sae = create_sae("topk", d_in=64, n_latents=64, k=4)
    run = train(sae, TensorSource(planted.train), TrainConfig(steps=5, batch_size=256, **QUIET), out_dir=tmp_path / "t")
    with pytest.raises(VlsaeError, match="--modality"):
        run_darkmatter([str(run.out_dir)], str(data), str(tmp_path / "out"))
    result = run_darkmatter([str(run.out_dir)], str(data), str(tmp_path / "out"), modality="text")
    assert result["results"][0]["modality"] == "text"
