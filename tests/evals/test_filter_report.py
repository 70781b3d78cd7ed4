"""The filter task's report page, the detection metrics, the demo step and the verb's help."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.filtering import detection, keep_top
from evals.filtering.demo import filter_demo
from evals.tasks import run_task
from evals.tasks.filter import FilterTask
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.checkpoint import save_sae
from vlsae.cli import main
from vlsae.saes import create_sae


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "noisy"
    write_world(ShapesWorldConfig(seed=5, noise=0.4), out, n=48, shard_size=16, progress=False)
    return out


def test_detection_metrics_on_hand_made_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.1])
    clean = np.array([True, True, False, True, False])
    found = detection(scores, clean, keep_top(scores, 0.6))
    # pairs (clean, corrupted) ordered right: 0.9 and 0.8 beat both; 0.7 (clean) ties 0.7 and beats 0.1
    assert found["auroc"] == pytest.approx((2 + 2 + 1.5) / 6)
    assert found["kept"] == 3 and found["precision"] == pytest.approx(2 / 3) and found["recall"] == pytest.approx(2 / 3)
    assert keep_top(scores, 0.6).tolist() == [True, True, True, False, False]  # the tie goes to the first
    assert detection(scores, np.ones(5, dtype=bool))["auroc"] is None


def test_report_page_shows_cuts_cards_and_ground_truth(world, tmp_path):
    out = tmp_path / "out"
    result = run_task("filter", {"scorer": "clipscore", "model": "shapes-clip", "data": str(world), "keep": 0.5,
                                 "out": str(out), "extremes": 4, "progress": False})
    page = (out / "index.html").read_text()
    assert result["index"] == str(out / "index.html") and (out / "scores.png").is_file()
    assert page.count("class='card kept") == 4 and page.count("class='card dropped") == 4
    for name in re.findall(r"<img src='(img/[^']+)'", page):
        assert (out / name).is_file()
    assert "Detection AUROC" in page and result["detection"]["auroc"] > 0.6
    assert json.loads((out / "report.json").read_text())["detection"] == result["detection"]
    lines = FilterTask.describe(result)
    assert any("AUROC" in line for line in lines) and lines[-1].endswith("index.html")


def test_the_demo_step_filters_with_the_vl_sae_and_clipscore(tmp_path):
    torch.manual_seed(0)
    save_sae(create_sae("vl", d_in=128, n_latents=40, k=20, modalities=["image", "text"]), tmp_path / "demo" / "vl")
    figures = filter_demo(tmp_path / "demo", pairs=40)
    assert set(figures["auroc"]) == {"vl-overlap", "clipscore"}
    assert Path(figures["index"]).is_file() and (tmp_path / "demo" / "filter" / "clipscore" / "index.html").is_file()
    assert figures["auroc"]["clipscore"] > 0.6  # the shipped shapes-clip knows the captions; the random VL-SAE may not


def test_filter_help_lists_every_scorer(capsys):
    with pytest.raises(SystemExit):
        main(["filter", "--help"])
    text = capsys.readouterr().out
    for scorer in ("saev", "vl-overlap", "vl-jaccard", "l0", "cooc-l0", "clipscore", "random"):
        assert scorer in text
