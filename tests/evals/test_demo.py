"""The demo end to end at a small size: world, shipped shapes-clip, extraction, two SAEs, concept report."""
import json
import re

import pytest

from evals.tasks.demo import run_demo


def test_small_demo_runs_every_stage_and_reuses_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))  # shapes-clip comes from the shipped copy
    out = tmp_path / "demo"
    results = run_demo(out, pairs=300, steps=40, synth=False, progress=False, applications=False)
    saved = json.loads((out / "demo.json").read_text())
    assert set(saved["seconds"]) == {"world", "shapes-clip", "extract", "train", "concepts"}
    assert 0 < results["topk"]["fvu"] < 1 and results["topk"]["l0"] > 0
    assert 0 < results["vl"]["fvu_image"] < 1 and 0 < results["vl"]["fvu_text"] < 1
    assert (out / "concepts" / "index.html").is_file()
    assert results["concepts"]["planted"]["values"] > 20  # every ShapesWorld attribute value scored
    config = json.loads((out / "vl" / "config.json").read_text())
    assert config["config"]["n_latents"] == 40 and config["config"]["k"] == 20
    assert config["config"]["hook"] == "shapes-clip final cls"  # the cache's origin is recorded with the SAE
    again = run_demo(out, pairs=300, steps=40, synth=False, progress=False, applications=False)  # finished parts are reused
    assert again["vl"]["fvu_image"] == results["vl"]["fvu_image"]


def test_demo_index_links_every_result(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    run_demo(out, pairs=200, steps=20, synth=False, progress=False, applications=False)
    page = (out / "index.html").read_text()
    links = re.findall(r'href="([^"]+)"', page)
    assert {"concepts/index.html", "vl/training.json", "topk-image/training.json", "acts/manifest.json"} <= set(links)
    for link in links:
        assert (out / link).is_file(), link


@pytest.mark.slow
def test_demo_applications_join_the_index(tmp_path, monkeypatch):
    """The applications run on the demo's own world and SAEs and the index links each one's page."""
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    results = run_demo(out, pairs=300, steps=40, synth=False, progress=False)
    assert {"ood", "zeroshot", "filter", "steer"} <= set(results["seconds"])
    links = set(re.findall(r'href="([^"]+)"', (out / "index.html").read_text()))
    assert {"ood/index.html", "zeroshot/index.html", "filter/index.html"} <= links
    assert any(link.startswith("steer/") for link in links)
    for link in links:
        assert (out / link).is_file(), link
