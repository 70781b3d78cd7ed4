"""The hook context manager on tiny random SD 1.x and SDXL pipelines: every mode changes the image, strength 0
is exact, hooks go away after an exception, passes, positions, and both SDXL encoders taking an SAE."""
from __future__ import annotations

import pytest
import torch

from multimodal.generation import encode_prompts, generate
from steering import Ablate, Add, Clamp, Concept, Delta, Steering, bind_sae, steered_generate, text_adapter

from tests.steering.pipes import random_sae, tiny_sd, tiny_sdxl

PROMPTS = ["a red circle", "a big blue square"]
GEN = {"seed": 3, "steps": 2, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd()
    hooked = bind_sae(text_adapter(pipe), random_sae(32, "text_encoder.blocks.1"))
    return pipe, hooked, generate(pipe, PROMPTS, **GEN)


@pytest.fixture(scope="module")
def sdxl():
    pipe = tiny_sdxl()
    adapter = text_adapter(pipe)
    first = bind_sae(adapter, random_sae(32, "text_encoder.blocks.0", seed=1))
    second = bind_sae(adapter, random_sae(48, "text_encoder_2.blocks.1", seed=2))
    return pipe, first, second, generate(pipe, PROMPTS, **GEN)


def _hook_count(pipe) -> int:
    modules = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in modules for m in model.modules())


def _modes(hooked):
    return {"add": Add(sae=hooked, latents=[3, 5], strength=4.0),
            "clamp": Clamp(sae=hooked, latents=[3], value=6.0),
            "ablate": Ablate(sae=hooked, latents=list(range(hooked.n_latents)), strength=2.0),
            "concept": Concept(sae=hooked, prompt="green", strength=3.0)}


@pytest.mark.parametrize("mode", ["add", "clamp", "ablate", "concept"])
def test_every_mode_changes_the_image(sd, mode):
    pipe, hooked, plain = sd
    steered = steered_generate(pipe, PROMPTS, [_modes(hooked)[mode]], **GEN)
    assert steered.shape == plain.shape and steered.dtype == torch.uint8
    assert (steered.float() - plain.float()).abs().mean() > 0.5


def test_strength_zero_is_plain_generation_bit_for_bit(sd, sdxl):
    pipe, hooked, plain = sd
    zero = [Add(sae=hooked, latents=[3], strength=0.0), Ablate(sae=hooked, latents=[1, 2], strength=0.0),
            Concept(sae=hooked, prompt="green", strength=0.0)]
    assert torch.equal(steered_generate(pipe, PROMPTS, zero, **GEN), plain)
    pipe_xl, first, second, plain_xl = sdxl
    zero_xl = [Add(sae=first, latents=[0], strength=0.0), Add(sae=second, latents=[0], strength=0.0)]
    assert torch.equal(steered_generate(pipe_xl, PROMPTS, zero_xl, **GEN), plain_xl)


def test_hooks_are_removed_after_an_exception(sd):
    pipe, hooked, plain = sd
    before = _hook_count(pipe)
    with pytest.raises(RuntimeError, match="inside"):
        with Steering(pipe, [Add(sae=hooked, latents=[3], strength=4.0)]) as steering:
            assert steering.active and _hook_count(pipe) == before + 2
            raise RuntimeError("inside the block")
    assert _hook_count(pipe) == before and not steering.active

    class Broken(Add):
        def change(self, h, mask):
            raise ValueError("broken intervention")

    with pytest.raises(ValueError, match="broken"):
        steered_generate(pipe, PROMPTS, [Broken(sae=hooked, latents=[3], strength=1.0)], **GEN)
    assert _hook_count(pipe) == before
    assert torch.equal(generate(pipe, PROMPTS, **GEN), plain)


def _captured(pipe, hooked, interventions, guidance_scale=4.0):
    """The hooked module's (steered) outputs of each text-encoder call while encoding PROMPTS."""
    seen = []

    def keep(_m, _i, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handle = hooked.module.register_forward_hook(keep)  # runs after the steering hook (that one is prepended)
    try:
        with Steering(pipe, interventions) as steering:
            encode_prompts(pipe, PROMPTS, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    return seen, steering.calls


def test_passes_cond_both_cfg_edit_the_right_rows(sd):
    pipe, hooked, _ = sd
    cond, _ = hooked.hidden_states(PROMPTS)
    uncond, _ = hooked.hidden_states([""] * len(PROMPTS))
    vector = 5.0 * hooked.directions()[3]
    for passes, sign in (("cond", 0.0), ("both", 1.0), ("cfg", -1.0)):
        (on_cond, on_uncond), calls = _captured(pipe, hooked, [Add(sae=hooked, latents=[3], strength=5.0,
                                                                   passes=passes)])
        assert calls == {"cond": 2, "uncond": 2}
        torch.testing.assert_close(on_cond, cond + vector, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(on_uncond, uncond + sign * vector, atol=1e-5, rtol=1e-5)


def test_positions_limit_the_edit(sd):
    pipe, hooked, _ = sd
    states, ids = hooked.hidden_states(PROMPTS)
    (steered,), _ = _captured(pipe, hooked, [Add(sae=hooked, latents=[3], strength=5.0, positions="words")],
                              guidance_scale=1.0)
    changed = (steered - states).abs().amax(dim=-1) > 1e-5  # (rows, context)
    end = (ids == hooked.eos_id).int().argmax(dim=1)
    for row in range(len(PROMPTS)):
        assert changed[row, 1: int(end[row])].all() and not changed[row, 0] and not changed[row, int(end[row]):].any()


def test_change_keeps_the_error_term(sd):
    """clamp/ablate change h by exactly sum_f (z'_f - z_f) d_f: the SAE's reconstruction error stays in h."""
    _, hooked, _ = sd
    states, _ = hooked.hidden_states(PROMPTS)
    flat = states.reshape(-1, states.shape[-1])
    code = hooked.encode(flat)
    dense = code.to_dense()
    active = int(torch.mode(code.indices[:, 0]).values)  # a latent that fires on many tokens
    mask = torch.ones(states.shape[:2], dtype=torch.bool)
    ablate = Ablate(sae=hooked, latents=[active], strength=1.0).change(states, mask).reshape(flat.shape)
    torch.testing.assert_close(ablate, -dense[:, active:active + 1] * hooked.directions()[active], atol=1e-5, rtol=1e-5)
    clamp = Clamp(sae=hooked, latents=[active], value=2.5, scale=[2.0]).change(states, mask).reshape(flat.shape)
    torch.testing.assert_close(clamp, (5.0 - dense[:, active:active + 1]) * hooked.directions()[active], atol=1e-5,
                               rtol=1e-5)


def test_concept_vector_is_the_dense_code_through_the_decoder(sd):
    _, hooked, _ = sd
    concept = Concept(sae=hooked, prompt="a green star", strength=1.0)
    states, _ = hooked.hidden_states(["a green star"])
    dense = torch.relu(hooked.sae.pre_activations(states[0]))
    assert (dense > 0).sum(dim=1).float().mean() > hooked.sae.config.k  # no TopK at steering time
    torch.testing.assert_close(concept.vector, dense @ hooked.sae.W_dec, atol=1e-5, rtol=1e-5)


def test_raw_difference_at_strength_one_is_prompt_editing(sd):
    pipe, hooked, _ = sd
    delta = Delta.prompt_difference(text_adapter(pipe), hooked.point, "a big blue square", "a red circle")
    edited, _ = encode_prompts(pipe, ["a big blue square"], guidance_scale=1.0)
    with Steering(pipe, [delta]):
        steered, _ = encode_prompts(pipe, ["a red circle"], guidance_scale=1.0)
    torch.testing.assert_close(steered, edited, atol=1e-4, rtol=1e-4)


def test_sdxl_each_encoder_takes_an_sae(sdxl):
    pipe, first, second, plain = sdxl
    base, _ = encode_prompts(pipe, PROMPTS)
    width = first.sae.config.d_in
    shifts = []
    for interventions in ([Add(sae=first, latents=[1], strength=4.0)], [Add(sae=second, latents=[1], strength=4.0)],
                          [Add(sae=first, latents=[1], strength=4.0), Add(sae=second, latents=[1], strength=4.0)]):
        with Steering(pipe, interventions):
            embeds, _ = encode_prompts(pipe, PROMPTS)
        shift = (embeds - base).abs()
        shifts.append((float(shift[..., :width].max()), float(shift[..., width:].max())))
    assert shifts[0][0] > 1e-3 and shifts[0][1] == 0.0
    assert shifts[1][0] == 0.0 and shifts[1][1] > 1e-3
    assert min(shifts[2]) > 1e-3
    both = steered_generate(pipe, PROMPTS, [Add(sae=first, latents=[1], strength=4.0),
                                            Clamp(sae=second, latents=[2], value=8.0)], **GEN)
    assert (both.float() - plain.float()).abs().mean() > 0.5
