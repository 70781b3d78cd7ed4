"""vlsae ood end to end on a tiny real-class CLIP: shards and caches in, scores.csv / results.json / index.html out."""
import csv
import io
import json
import tarfile

import pytest

from multimodal.adapters import create_adapter
from multimodal.cache import ActivationCache
from multimodal.extract import ExtractConfig, extract
from multimodal.ood_data import write_ood_set
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.multimodal.tiny import tiny_clip_config
from vlsae import create_sae
from vlsae.checkpoint import save_sae
from vlsae.cli import main
from vlsae.training import TensorSource, TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    spec = f"open_clip:{tiny_clip_config(root, 'vlsae-test-ood-clip')}:random"
    write_world(ShapesWorldConfig(seed=0, image_size=32), root / "fit", n=96, shard_size=48, progress=False)
    write_world(ShapesWorldConfig(seed=1, image_size=32), root / "id", n=40, shard_size=40, progress=False)
    write_ood_set("noise", root / "noise", n=30, image_size=32)
    write_ood_set("texture", root / "texture", n=30, image_size=32)
    adapter = create_adapter(spec, device="cpu")
    extract(ExtractConfig(model=spec, data=str(root / "fit"), out=str(root / "fit-acts"), hook="final", progress=False),
            adapter=adapter)
    fit = ActivationCache(root / "fit-acts").read_all()
    sae = create_sae("vl", d_in=fit["image"].shape[1], n_latents=16, k=4)
    train(sae, TensorSource(fit), TrainConfig(steps=30, batch_size=32, progress=False, tensorboard=False),
          out_dir=root / "sae")
    classes = root / "shapes.json"
    classes.write_text(json.dumps({"classes": ["circle", "square", "triangle", "star"], "attribute": "shape",
                                   "templates": ["a {}", "a photo of a {}"]}))
    return root, spec, classes


def _args(root, spec, classes, out, *extra):
    return ["ood", "--sae", str(root / "sae"), "--model", spec, "--fit", str(root / "fit-acts"), "--id", str(root / "id"),
            "--ood", f"noise={root / 'noise'}", "--ood", f"texture={root / 'texture'}", "--out", str(out),
            "--classes", str(classes), "--bootstrap", "50", "--quiet", *extra]


def test_ood_cli_writes_scores_results_and_page(setup, capsys):
    root, spec, classes = setup
    out = root / "report"
    assert main(_args(root, spec, classes, out)) == 0
    printed = capsys.readouterr().out
    assert "noise:" in printed and "texture:" in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"noise", "texture"}
    assert {"recon", "concept-energy", "code-knn", "cap", "concept-mcm", "msp", "mcm", "knn", "mahalanobis"} <= set(results["scores"])
    assert results["scores"]["recon"]["kind"] == "sae" and results["scores"]["knn"]["kind"] == "baseline"
    entry = results["metrics"]["noise"]["recon"]
    assert 0 <= entry["auroc"] <= 1 and len(entry["auroc_ci"]) == 2 and {"fpr95", "fpr95_ood", "aupr_in", "aupr_out"} <= set(entry)
    assert results["best"]["noise"]["verdict"] in {"sae", "baseline", "tie"}
    assert results["attribute"] == "shape" and results["sets"]["fit"]["rows"] == 96
    rows = list(csv.reader(io.StringIO((out / "scores.csv").read_text())))
    assert rows[0][:2] == ["key", "set"] and set(results["scores"]) == set(rows[0][2:])
    assert [r[1] for r in rows[1:]].count("id") == 40 and [r[1] for r in rows[1:]].count("noise") == 30
    page = (out / "index.html").read_text()
    assert "roc_noise.png" in page and "hist_texture.png" in page and (out / "roc_noise.png").stat().st_size > 1000
    # a second run refuses the finished report, and with --overwrite reuses the caches it extracted
    assert main(_args(root, spec, classes, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    manifest = out / "acts" / "noise" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert main(_args(root, spec, classes, out, "--overwrite", "--scores", "recon,knn", "--no-figures")) == 0
    assert manifest.stat().st_mtime_ns == written
    assert set(json.loads((out / "results.json").read_text())["scores"]) == {"recon", "knn"}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vlsae ood: error:")
    return err


def test_bad_inputs_are_one_line_errors_before_any_extraction(setup, capsys):
    root, spec, classes = setup
    out = root / "bad"
    broken = root / "broken"
    broken.mkdir()
    with tarfile.open(broken / "000000.tar", "w") as tar:  # records without images: nothing readable
        for i in range(3):
            data = b"a caption"
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(_args(root, spec, classes, out)[:-1] + ["--ood", f"broken={broken}", "--quiet"]) == 2
    assert "--ood broken" in _one_line_error(capsys)
    wrong = root / "wrong-sae"
    save_sae(create_sae("topk", d_in=7, n_latents=8, k=2), wrong)
    args = _args(root, spec, classes, out)
    args[args.index("--sae") + 1] = str(wrong)
    assert main(args) == 2
    assert "width" in _one_line_error(capsys)
    args = _args(root, spec, classes, out)
    args[args.index("--id") + 1] = str(root / "fit-acts")
    assert main(args) == 2
    assert "same data as --fit" in _one_line_error(capsys)
    args = _args(root, spec, classes, out)
    args[args.index("--model") + 1] = "shapes-clip"  # the --fit cache holds the tiny CLIP's embeddings
    assert main(args) == 2
    assert "not of --model shapes-clip" in _one_line_error(capsys)
    assert main(_args(root, spec, classes, out, "--scores", "recn")) == 2
    assert "did you mean 'recon'" in _one_line_error(capsys)
    assert main(_args(root, spec, classes, out)[:-1] + ["--ood", "id=x", "--quiet"]) == 2
    _one_line_error(capsys)
    assert not out.exists()  # every one of them stopped before writing anything


def test_id_rows_that_are_fit_rows_are_refused(setup, capsys):
    root, spec, classes = setup
    args = _args(root, spec, classes, root / "overlap")
    args[args.index("--id") + 1] = str(root / "fit")  # the shards the fit cache was extracted from
    assert main(args) == 2
    assert "also in --fit" in _one_line_error(capsys)
