"""vlsae concepts end to end on a tiny real-class CLIP and ShapesWorld shards."""
import json

import pytest
import torch

from evals.concepts_report import collect_pair_activations, planted_labels
from multimodal.adapters import create_adapter
from multimodal.pairs import iter_pairs
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae import create_sae
from vlsae.checkpoint import save_sae
from vlsae.cli import main
from vlsae.training import TensorSource, TrainConfig, train

from tests.multimodal.tiny import tiny_clip_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    write_world(ShapesWorldConfig(image_size=32), root / "world", n=48, shard_size=24, progress=False)
    spec = f"open_clip:{tiny_clip_config(root)}:random"
    adapter = create_adapter(spec, device="cpu")
    pairs = collect_pair_activations(adapter, iter_pairs(root / "world"), limit=48, progress=False)
    sae = create_sae("vl", d_in=pairs.acts["image"].shape[1], n_latents=32, k=4)
    train(sae, TensorSource(pairs.acts), TrainConfig(steps=30, batch_size=16, progress=False, tensorboard=False),
          out_dir=root / "sae")
    return root, spec, pairs


def test_planted_labels_follow_the_json(setup):
    _, _, pairs = setup
    image, text = planted_labels(pairs.metas)
    assert "shape=circle" in image or "shape=square" in image
    for name in image:
        assert image[name].shape == (48,)
        assert not (text[name] & ~image[name]).any()  # a caption can only mention what is planted


def test_concepts_cli_writes_a_report(setup, capsys):
    root, spec, _ = setup
    out = root / "report"
    assert main(["concepts", "--sae", str(root / "sae"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(out), "--limit", "40", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 40 and set(summary["fvu"]) == {"image", "text"}
    assert summary["planted"]["values"] > 10
    html = (out / "index.html").read_text()
    assert "Concept cards" in html and "modality_score.png" in html and "planted_matrix.png" in html
    assert "probe ceiling" in html and "encodable_values" in summary["planted"]
    assert all({"ceiling_image", "ceiling_text"} <= set(m) for m in summary["planted_matches"])
    assert (out / "modality_score.png").exists() and any((out / "img").iterdir())
    assert "report:" in capsys.readouterr().out
    # refuses to overwrite, and a width mismatch is one line
    assert main(["concepts", "--sae", str(root / "sae"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(out), "--quiet"]) == 2
    other = create_sae("vl", d_in=7, n_latents=8, k=2)
    save_sae(other, root / "wrong")
    assert main(["concepts", "--sae", str(root / "wrong"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(root / "r2"), "--quiet"]) == 2
    assert "width" in capsys.readouterr().err


def test_two_fold_probe_ceiling_separates_linear_labels_only():
    import numpy as np
    import torch

    from evals.concepts_report import two_fold_probe_ceiling

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g)
    labels = {"colour=red": (x[:, 3] > 0.5).numpy(), "shape=star": np.random.default_rng(0).random(1000) < 0.3}
    ceiling = two_fold_probe_ceiling(x, labels)
    assert ceiling["colour=red"] > 0.97 and 0.4 < ceiling["shape=star"] < 0.6
    assert two_fold_probe_ceiling(x[:4], labels) == {}
    capped = two_fold_probe_ceiling(x, labels, max_pairs=400)  # a subsample still fits the linear label
    assert capped["colour=red"] > 0.95
