"""Downstream fidelity (zero-shot with reconstructions spliced in): the metric, vlsae info, the concept
report's section, and the demo's zero-shot pass, on a tiny real-class CLIP and ShapesWorld shards."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from evals.concepts import concepts_report
from evals.zeroshot.demo import demo_zeroshot
from evals.zeroshot.fidelity import fidelity_of_run, mean_recovered, spliced_accuracy, spliced_modalities
from evals.zeroshot.head import ZeroShotHead
from multimodal.extract import ExtractConfig, extract
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.multimodal.tiny import tiny_clip_config
from vlsae import create_sae
from vlsae.checkpoint import save_sae
from vlsae.cli import main

D = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run faster on one thread, and much faster on a machine whose cores are shared
    (measured: 0.8 s vs 11.6 s for 2,560 prompts through the tiny CLIP with other jobs running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exact_topk(d: int = D):
    """A TopK SAE that reconstructs exactly: latents are x and -x, k = d keeps every positive part."""
    sae = create_sae("topk", d_in=d, n_latents=2 * d, k=d).eval()
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _head() -> ZeroShotHead:
    raw = torch.randn(12, D, generator=torch.Generator().manual_seed(2)) * 2
    return ZeroShotHead(attributes=["a"], classes={"a": ["x", "y", "z"]}, text=F.normalize(raw, dim=-1),
                        prompt_class={"a": torch.arange(12) % 3}, logit_scale=20.0, raw=raw)


def test_an_exact_reconstruction_recovers_everything_and_a_random_sae_does_not():
    head = _head()
    image = torch.randn(300, D)
    labels = {"a": head.predict(image, "a")}  # plain is right by construction: accuracy 1
    exact = spliced_accuracy(head, _exact_topk(), image, labels, ("image", "text"))["a"]
    assert exact["plain"] == 1.0 and exact["image"] == exact["text"] == exact["both"] == 1.0
    assert exact["recovered_both"] == 1.0
    floor = float((labels["a"] == head.predict(torch.zeros(1, D), "a")).float().mean())
    assert exact["floor"] == pytest.approx(floor)  # one constant prediction
    rough = create_sae("vl", d_in=D, n_latents=8, k=1).eval()
    result = spliced_accuracy(head, rough, image, labels, ("image",))
    assert result["a"]["text"] is None and result["a"]["both"] is None
    assert result["a"]["recovered_image"] < 0.9
    assert mean_recovered(result, "image") == result["a"]["recovered_image"]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A miniature of what vlsae demo leaves behind: world/, acts/, vl/, topk-image/ (on the tiny CLIP)."""
    root = tmp_path_factory.mktemp("demo")
    spec = f"open_clip:{tiny_clip_config(root)}:random"
    write_world(ShapesWorldConfig(seed=3, image_size=32, max_objects=1), root / "world", n=60, shard_size=30,
                progress=False)
    extract(ExtractConfig(model=spec, data=str(root / "world"), out=str(root / "acts"), progress=False))
    save_sae(create_sae("vl", d_in=D, n_latents=16, k=4), root / "vl", metadata={"data": {"acts": "acts"}})
    save_sae(_exact_topk(), root / "topk-image", metadata={"data": {"acts": "acts", "modality": "image"}})
    return root, spec


def test_spliced_modalities_follow_the_run(demo_folder):
    root, _ = demo_folder
    assert spliced_modalities(create_sae("vl", d_in=D, n_latents=8, k=2)) == ("image", "text")
    assert spliced_modalities(_exact_topk(), root / "topk-image") == ("image",)


def test_fidelity_of_a_run_and_vlsae_info(demo_folder, capsys):
    root, spec = demo_folder
    result = fidelity_of_run(root / "topk-image", spec, str(root / "world"), acts=str(root / "acts"))
    assert result["records"] == 60 and result["spliced"] == ["image"]
    assert result["mean_recovered"] == pytest.approx(1.0)  # the exact SAE loses nothing
    code = main(["info", str(root / "vl"), "--zeroshot", str(root / "world"), "--model", spec, "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["zero_shot_fidelity"]["attributes"]) == {"shape", "colour", "size", "position"}
    assert info["zero_shot_fidelity"]["spliced"] == ["image", "text"]


def test_concept_report_shows_the_fidelity_beside_fvu(demo_folder):
    root, spec = demo_folder
    result = concepts_report(root / "vl", str(root / "world"), spec, root / "report", limit=60, progress=False)
    fidelity = result["zero_shot_fidelity"]
    assert fidelity["records"] == 60 and 0 <= fidelity["attributes"]["shape"]["plain"] <= 1
    html = (root / "report" / "index.html").read_text()
    assert "Downstream fidelity" in html and "zero_shot_spliced.png" in html
    assert (root / "report" / "zero_shot_spliced.png").exists()


def test_demo_zeroshot_on_the_demo_artifacts(demo_folder):
    root, spec = demo_folder
    result = demo_zeroshot(root, root / "zeroshot", model=spec, resamples=100)
    assert result["records"] == 60 and set(result["plain_test"]) == {"shape", "colour", "size", "position"}
    assert (root / "zeroshot" / "index.html").is_file() and result["index"].endswith("index.html")
    fidelity = json.loads((root / "zeroshot" / "fidelity.json").read_text())
    assert set(fidelity) == {"vl", "topk-image"} and fidelity["topk-image"]["spliced"] == ["image"]
    assert result["fidelity_recovered"]["topk-image"] == pytest.approx(1.0)
