"""Attribute discovery, feature parsing, SAE binding and prompt sets, on a tiny random SD pipeline."""
from __future__ import annotations

import pytest
import torch

from vlsae import create_sae
from vlsae.errors import VlsaeError

from steering import (Clamp, Feature, FlipSettings, bind_sae, build_interventions, discover, latent_stats,
                      parse_feature, selectivity, shapes_prompts, text_adapter, typical_activation, value_latents)
from steering.points import parse_positions, position_mask, recorded_point
from steering.prompts import names_value, prompt_attributes

from tests.steering.pipes import random_sae, tiny_sd, tiny_sdxl


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd()
    hooked = bind_sae(text_adapter(pipe), random_sae(32, "text_encoder.blocks.1", n_latents=48, k=6))
    prompts = shapes_prompts()[0]
    return pipe, hooked, latent_stats(hooked, prompts)


def test_stats_and_selectivity_invariants(sd):
    _, hooked, stats = sd
    assert stats.mean.shape == (100, 48) and (stats.mean >= 0).all()
    assert torch.all(stats.active_count <= 24)  # at most every token of the 24-token context
    named = stats.named("blue")
    assert int(named.sum()) == 10
    score = selectivity(stats, named)
    assert abs(float(score.sum())) < 1e-5  # a difference of two distributions over latents
    assert float(score.max()) <= 1.0 and float(score.min()) >= -1.0
    best = int(score.argmax())
    assert stats.mean[named, best].mean() > stats.mean[~named, best].mean()
    scale = typical_activation(stats, [best], named)[0]
    fired = stats.active_count[named, best].sum()
    assert scale == pytest.approx(float(stats.active_sum[named, best].sum() / fired))
    with pytest.raises(VlsaeError, match="name the value and prompts that do not"):
        selectivity(stats, torch.ones(100, dtype=torch.bool))


def test_value_latents_and_discovery_by_a_judge(sd):
    pipe, hooked, stats = sd
    found = value_latents(stats, "colour", "blue", n=3)
    assert len(found.latents) == 3 and found.selectivity == sorted(found.selectivity, reverse=True)
    assert all(found.names) and all(s > 0 for s in found.scale)
    calls = []

    def judge(images):  # a judge that reads "blue" when the image's mean blue channel is high
        calls.append(images.shape[0])
        return ["blue" if float(im[2].float().mean()) > float(im[0].float().mean()) else "red" for im in images]

    table = discover(pipe, hooked, stats, "colour", judge, candidates=2, neutral=2,
                     settings=FlipSettings(strength=3.0, seeds=1, steps=2), values=["blue", "red"])
    assert [t.value for t in table] == ["blue", "red"]
    for entry in table:
        assert len(entry.latents) == 2 and all(r is not None and -1.0 <= r <= 1.0 for r in entry.flip_rate)
        assert entry.flip_rate == sorted(entry.flip_rate, reverse=True)
    assert set(calls) == {2} and len(calls) == 2 * 3  # per value: unsteered + one run per candidate


def test_features_and_their_interventions(sd):
    _, hooked, stats = sd
    assert parse_feature("color=blue") == Feature("colour", "blue")
    assert parse_feature("3, 7") == Feature(latents=(3, 7))
    for bad, message in (("colour=mauve", "not a colour value"), ("taste=sweet", "unknown attribute"),
                         ("blue", "ATTRIBUTE=VALUE")):
        with pytest.raises(VlsaeError, match=message):
            parse_feature(bad)
    clamp = build_interventions(hooked, stats, Feature("colour", "blue"), "clamp", 2.0)
    assert len(clamp) == 2 and all(isinstance(c, Clamp) for c in clamp)
    assert clamp[1].value == 0.0 and not set(clamp[0].latents) & set(clamp[1].latents)
    with pytest.raises(VlsaeError, match="out of range"):
        build_interventions(hooked, stats, Feature(latents=(48,)), "add", 1.0)
    with pytest.raises(VlsaeError, match="concept prompt"):
        build_interventions(hooked, stats, Feature(latents=(4,)), "concept", 1.0)
    with pytest.raises(VlsaeError, match="passes cond | both"):
        build_interventions(hooked, stats, Feature("colour", "red"), "ablate", 1.0, passes="cfg")[0].check()


def test_binding_checks_hook_width_and_point():
    pipe = tiny_sdxl()
    adapter = text_adapter(pipe)
    with pytest.raises(VlsaeError, match="32-wide activations but text_encoder_2.blocks.1 is 48 wide"):
        bind_sae(adapter, random_sae(32, "text_encoder_2.blocks.1"))
    with pytest.raises(VlsaeError, match="trained on hook 'text_encoder.blocks.0', not 'text_encoder.blocks.1'"):
        bind_sae(adapter, random_sae(32, "text_encoder.blocks.0"), "text_encoder.blocks.1")
    with pytest.raises(VlsaeError, match="cannot be steered"):
        bind_sae(adapter, random_sae(80, "final"))
    with pytest.raises(VlsaeError, match="no text side"):
        bind_sae(adapter, create_sae("vl", d_in=32, n_latents=16, k=4, modalities=("image",),
                                     hook="x text_encoder.blocks.0 all"))
    vl = bind_sae(adapter, random_sae(32, "text_encoder.blocks.0", arch="vl", n_latents=16, k=4))
    assert vl.modality == "text" and vl.directions().shape == (16, 32)
    assert recorded_point("shapes-diffusion text_encoder.blocks.1 all") == "text_encoder.blocks.1"
    assert recorded_point("") == ""


def test_prompts_positions_and_naming():
    assert names_value("a big red plus sign", "cross") and names_value("a big red circle", "large")
    assert not names_value("a reddish circle", "red") and not names_value("a starfish", "star")
    assert prompt_attributes("a large red circle") == {"colour": "red", "shape": "circle", "size": "large"}
    ids = torch.tensor([[49406, 10, 11, 49407, 49407, 49407]])
    assert position_mask(ids, 49407, "words").tolist() == [[False, True, True, False, False, False]]
    assert position_mask(ids, 49407, "prompt").tolist() == [[True, True, True, True, False, False]]
    assert position_mask(ids, 49407, "end").tolist() == [[False, False, False, True, True, True]]
    assert position_mask(ids, 49407, (1, 9)).tolist() == [[False, True, False, False, False, False]]
    assert parse_positions("2,3") == (2, 3) and parse_positions("words") == "words"
    with pytest.raises(VlsaeError, match="--positions"):
        parse_positions("middle")
