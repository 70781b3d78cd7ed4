"""diffusers-text adapter on tiny random SD-1.x-style and SDXL-style pipelines, and the shapes-diffusion zoo model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlsae.cli import main
from vlsae.errors import VlsaeError

from multimodal import zoo
from multimodal.adapters import create_adapter
from multimodal.generation import encode_pooled_prompts, encode_prompts, generate, tokenize
from multimodal.judges import EVAL_OFFSET, pixel_colours, train_cnn_judge
from multimodal.zoo.shapes_diffusion import ShapesDiffusion
from multimodal.zoo.shapes_diffusion.build import clip_tokenizer, shapes_clip_text_encoder
from multimodal.zoo.shapes_diffusion.config import TRAIN_WORLD, render, world_config
from multimodal.zoo.shapes_diffusion.evaluation import eval_prompts
from multimodal.zoo.shapes_diffusion.recipe import object_mask

CAPTIONS = ["a red circle", "a photo of a big blue square in the top left", "a green plus sign"]
TINY = {"n_train": 64, "vae_steps": 2, "vae_batch_size": 8, "steps": 3, "batch_size": 8, "warmup": 1,
        "vae_channels": [8, 16], "unet_channels": [16, 32], "unet_attention": [False, True], "head_dim": 8,
        "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 16, "eval_seeds": 1, "sample_steps": 2,
        "eval_clip": False, "cnn_steps": 0, "text_encoder": "scratch"}
TINY_CLIP = {"steps": 1, "batch_size": 8, "n_train": 16, "n_single": 16, "n_eval": 4, "embed_dim": 16,
             "vision_width": 16, "vision_layers": 1, "text_width": 16, "text_layers": 1, "heads": 2,
             "patch_size": 16, "warmup": 1}


def _text_config(width: int, layers: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=24, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **extra)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=16)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionPipeline saved with save_pretrained."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32, 3)),
                                   tokenizer=clip_tokenizer(24), unet=unet, scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("pipes") / "sd"
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection of different widths."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32 + 48, attention_head_dim=8, norm_num_groups=8,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=12 + 6 * 4)
    tokenizer_2 = clip_tokenizer(24)
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), not the end token
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32, 2)),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(48, 3, projection_dim=12)),
                                     tokenizer=clip_tokenizer(24), tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=_scheduler(), add_watermarker=False)
    folder = tmp_path_factory.mktemp("pipes") / "sdxl"
    pipe.save_pretrained(str(folder))
    return folder


def _pairs(captions=CAPTIONS):
    return [{"key": f"k{i}", "image": None, "caption": c} for i, c in enumerate(captions)]


def test_sd_hook_points_widths_and_token_modes(sd_folder):
    adapter = create_adapter(f"diffusers-text:{sd_folder}", device="cpu")
    points = adapter.hook_points()
    assert points[0] == "final" and "text_encoder.blocks.2" in points and "text_encoder.embeddings" in points
    assert "text_encoder.blocks.3" not in points and not any(p.startswith("text_encoder_2") for p in points)
    assert adapter.modalities == ("text",) and adapter.widths("text_encoder.blocks.1") == {"text": 32}
    ids = [adapter.encoders["text_encoder"].tokenizer(c).input_ids for c in CAPTIONS]
    words = [len(i) - 2 for i in ids]
    for tokens, rows in (("cls", 3), ("mean", 3), ("patch", sum(words)), ("all", sum(words) + 6)):
        out = adapter.extract(_pairs(), hook="text_encoder.blocks.1", tokens=tokens)
        assert out["text"].shape == (rows, 32), tokens
        assert out.pair_index["text"].tolist() == sorted(out.pair_index["text"].tolist())
    patch = adapter.extract(_pairs(), hook="text_encoder.blocks.1", tokens="patch")
    mean = adapter.extract(_pairs(), hook="text_encoder.blocks.1", tokens="mean")
    first = patch["text"][patch.pair_index["text"] == 0]
    torch.testing.assert_close(mean["text"][0], first.mean(0))
    with pytest.raises(VlsaeError, match="unknown hook point"):
        adapter.extract(_pairs(), hook="text_encoder.blocks.9")


def test_sd_final_equals_the_pipelines_prompt_embeds(sd_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    embeds, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)  # (3, 24, 32), padded to model_max_length
    adapter = create_adapter(f"diffusers-text:{sd_folder}", device="cpu")
    out = adapter.extract(_pairs(), hook="final", tokens="all")
    for i in range(len(CAPTIONS)):
        rows = out["text"][out.pair_index["text"] == i]
        torch.testing.assert_close(rows, embeds[i, : rows.shape[0]], atol=1e-5, rtol=1e-5)
    cls = adapter.extract(_pairs(), hook="text_encoder.final", tokens="cls")
    pooled = pipe.text_encoder(pipe.tokenizer(CAPTIONS, padding="max_length", max_length=24,
                                              return_tensors="pt").input_ids).pooler_output
    torch.testing.assert_close(cls["text"], pooled, atol=1e-5, rtol=1e-5)


def test_block_hook_is_the_blocks_output(sd_folder):
    """blocks.N must be layer N's output: the input of layer N+1, and the hidden_states[N+1] of the model."""
    adapter = create_adapter(f"diffusers-text:{sd_folder}", device="cpu")
    encoder = adapter.encoders["text_encoder"]
    inputs = encoder.tokenize(CAPTIONS[:1])
    states = encoder.model(inputs["input_ids"], output_hidden_states=True).hidden_states
    out = adapter.extract(_pairs(CAPTIONS[:1]), hook="text_encoder.blocks.0", tokens="all")
    torch.testing.assert_close(out["text"], states[1][0], atol=1e-6, rtol=1e-6)
    embedded = adapter.extract(_pairs(CAPTIONS[:1]), hook="text_encoder.embeddings", tokens="all")
    torch.testing.assert_close(embedded["text"], states[0][0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out["text"], embedded["text"])


def test_sdxl_two_encoders_prefixed_and_prompt_embeds(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    adapter = create_adapter(f"diffusers-text:{sdxl_folder}", device="cpu")
    points = adapter.hook_points()
    assert {"text_encoder.blocks.1", "text_encoder_2.blocks.2", "text_encoder_2.projection", "final"} <= set(points)
    assert "text_encoder.projection" not in points
    assert adapter.widths("final") == {"text": 80} and adapter.widths("text_encoder_2.blocks.0") == {"text": 48}
    assert adapter.widths("text_encoder_2.projection") == {"text": 12}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    out = adapter.extract(_pairs(), hook="final", tokens="all")
    for i in range(len(CAPTIONS)):
        rows = out["text"][out.pair_index["text"] == i]
        torch.testing.assert_close(rows, embeds[i, : rows.shape[0]], atol=1e-5, rtol=1e-5)
    projected = adapter.extract(_pairs(), hook="text_encoder_2.projection", tokens="cls")
    torch.testing.assert_close(projected["text"], pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(VlsaeError, match="use --tokens cls"):
        adapter.extract(_pairs(), hook="text_encoder_2.projection", tokens="mean")
    with pytest.raises(VlsaeError, match="two points for the text modality"):
        adapter.parse_hook("text_encoder.blocks.0,text_encoder_2.blocks.0")


def test_generation_helpers_work_on_an_sdxl_pipeline(sdxl_folder, sd_folder):
    """encode_prompts calls encode_prompt by keyword (SDXL's second positional argument is prompt_2), and an
    SDXL pipeline generates from edited embeddings only with the pooled ones beside them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    positive, negative = encode_prompts(pipe, CAPTIONS[:2])
    pooled, negative_pooled = encode_pooled_prompts(pipe, CAPTIONS[:2])
    assert positive.shape == (2, 24, 80) and negative.shape == positive.shape and pooled.shape == (2, 12)
    a = generate(pipe, CAPTIONS[:2], seed=1, steps=2)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 16, 16)
    b = generate(pipe, prompt_embeds=positive, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                 negative_pooled_prompt_embeds=negative_pooled, seed=1, steps=2)
    torch.testing.assert_close(b.float(), a.float(), atol=1, rtol=0)
    with pytest.raises(VlsaeError, match="needs pooled_prompt_embeds"):
        generate(pipe, prompt_embeds=positive, negative_prompt_embeds=negative)
    unguided, none = encode_prompts(pipe, CAPTIONS[:1], guidance_scale=1.0)
    assert none is None and unguided.shape == (1, 24, 80)
    sd = StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    with pytest.raises(VlsaeError, match="no pooled prompt embeddings"):
        encode_pooled_prompts(sd, CAPTIONS[:1])


def test_from_pipeline_hooks_the_pipelines_own_modules(sd_folder):
    from diffusers import StableDiffusionPipeline

    from multimodal.adapters.diffusers_text import DiffusersTextAdapter

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    adapter = DiffusersTextAdapter.from_pipeline(pipe)
    assert adapter.hook_module("text_encoder.blocks.1") is pipe.text_encoder.encoder.layers[1]
    with pytest.raises(VlsaeError, match="not one module's output"):
        adapter.hook_module("final")


def test_missing_and_bad_pipelines_are_one_line_errors(tmp_path, sd_folder, monkeypatch):
    import huggingface_hub

    with pytest.raises(VlsaeError, match="folder not found"):
        create_adapter(f"diffusers-text:{tmp_path / 'nope'}", device="cpu")
    with pytest.raises(VlsaeError, match="no model_index.json"):
        create_adapter(f"diffusers-text:{tmp_path}", device="cpu")
    with pytest.raises(VlsaeError, match="needs a pipeline"):
        create_adapter("diffusers-text:", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    expected = r"not found locally \(HF_HUB_OFFLINE is set\).*diffusers-text:/path/to/pipeline"
    with pytest.raises(VlsaeError, match=expected) as err:
        create_adapter("diffusers-text:someone/not-cached-sd", device="cpu")
    assert "\n" not in str(err.value)
    unsupported = tmp_path / "t5"
    unsupported.mkdir()
    index = json.loads((sd_folder / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (unsupported / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(VlsaeError, match="reads CLIP text encoders"):
        create_adapter(f"diffusers-text:{unsupported}", device="cpu")


def test_repo_id_resolves_from_the_hf_cache_offline(tmp_path, sd_folder, monkeypatch):
    """A repo id in the local HF cache (snapshot layout) loads with HF_HUB_OFFLINE=1."""
    import shutil

    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--sd"
    shutil.copytree(sd_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = create_adapter("diffusers-text:tiny/sd", device="cpu")
    local = create_adapter(f"diffusers-text:{sd_folder}", device="cpu")
    torch.testing.assert_close(adapter.extract(_pairs())["text"], local.extract(_pairs())["text"])


def test_extract_cli_on_text_only_model(tmp_path, sd_folder, capsys):
    from multimodal.shapesworld import ShapesWorldConfig, write_world

    write_world(ShapesWorldConfig(image_size=16, supersample=1), tmp_path / "world", n=10, shard_size=5, progress=False)
    spec = f"diffusers-text:{sd_folder}"
    assert main(["extract", "--model", spec, "--list-hooks"]) == 0
    assert "text_encoder.blocks.2" in capsys.readouterr().out
    assert main(["extract", "--model", spec, "--data", str(tmp_path / "world"), "--hook", "text_encoder.blocks.1",
                 "--tokens", "mean", "--out", str(tmp_path / "acts"), "--batch-size", "4", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["modalities"] == ["text"] and manifest["rows"] == {"text": 10}
    assert main(["extract", "--model", spec, "--data", str(tmp_path / "world"), "--hook", "visual.blocks.1",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2


def test_extract_reads_caption_only_shards_for_text_hooks(tmp_path, sd_folder, capsys):
    """Prompt lists have no images: a text-only hook reads them; an image hook still refuses them."""
    import webdataset as wds

    from multimodal.pairs import iter_pairs

    (tmp_path / "prompts").mkdir()
    with wds.TarWriter(str(tmp_path / "prompts" / "000000.tar")) as writer:
        for i, caption in enumerate(CAPTIONS * 2):
            writer.write({"__key__": f"p{i:03d}", "txt": caption})
    spec = f"diffusers-text:{sd_folder}"
    assert main(["extract", "--model", spec, "--data", str(tmp_path / "prompts"), "--hook", "final",
                 "--tokens", "patch", "--out", str(tmp_path / "acts"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["n_pairs"] == 6 and manifest["rows"]["text"] > 6
    with pytest.raises(VlsaeError, match="no readable image-caption pairs"):
        list(iter_pairs(tmp_path / "prompts"))
    capsys.readouterr()


# -- shapes-diffusion -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "shapes-diffusion"
    return zoo.train_model("shapes-diffusion", TINY, out=out, progress=False)


def test_tiny_training_saves_a_loadable_pipeline(trained):
    from diffusers import StableDiffusionPipeline

    report = trained.report
    assert report["name"] == "shapes-diffusion" and report["config"]["steps"] == 3
    metrics = report["metrics"]
    assert 0 <= metrics["pixel_colour"]["match"] <= 1 and metrics["pixel_colour"]["real"] >= 0.9
    assert metrics["n"] == 100 and all(x == x for x in report["loss_curve"])
    pipe = StableDiffusionPipeline.from_pretrained(str(trained.path), local_files_only=True)
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # open_clip's ids
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["latent_scale"])


def test_zoo_cli_trains_into_the_cache_and_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    overrides = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY.items()), [])
    assert main(["zoo", "train", "shapes-diffusion", "--no-progress", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "by pixel colour" in printed and "noise-prediction loss" in printed
    assert (tmp_path / "cache" / "zoo" / "shapes-diffusion" / "unet" / "config.json").is_file()
    assert main(["zoo", "eval", "shapes-diffusion"]) == 0
    assert "by pixel colour" in capsys.readouterr().out
    assert main(["zoo", "train", "shapes-diffusion", "--set", "text_encoder=t5"]) == 2
    assert "shapes-clip or scratch" in capsys.readouterr().err


def test_generation_is_seeded_and_follows_prompt_embeds(trained):
    pipe = zoo.load_model("shapes-diffusion", folder=trained.path)
    a = generate(pipe, ["a red circle", "a blue star"], seed=3, steps=2)
    b = generate(pipe, ["a red circle", "a blue star"], seed=3, steps=2)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    positive, negative = encode_prompts(pipe, ["a red circle", "a blue star"])
    torch.testing.assert_close(generate(pipe, prompt_embeds=positive, negative_prompt_embeds=negative, seed=3, steps=2)
                               .float(), a.float(), atol=1, rtol=0)
    edited = generate(pipe, prompt_embeds=positive + 5 * torch.randn_like(positive), negative_prompt_embeds=negative,
                      seed=3, steps=2)
    assert not torch.equal(edited, a)
    with pytest.raises(VlsaeError, match="one of the two"):
        generate(pipe)


def test_training_is_seeded(trained, tmp_path):
    again = zoo.train_model("shapes-diffusion", TINY, out=tmp_path / "again", progress=False)
    a = zoo.load_model("shapes-diffusion", folder=trained.path)
    b = zoo.load_model("shapes-diffusion", folder=again.path)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return zoo.train_model("shapes-clip", TINY_CLIP, out=tmp_path_factory.mktemp("zoo") / "shapes-clip", progress=False)


def test_shapes_clip_text_tower_converts_exactly(tiny_clip):
    """The converted CLIPTextModel is open_clip's text tower: same pooled embedding after the projection."""
    loaded = zoo.load_model("shapes-clip", folder=tiny_clip.path)
    encoder, tokenizer, source = shapes_clip_text_encoder(str(tiny_clip.path))
    assert source == str(tiny_clip.path) and tokenizer.model_max_length == 48
    with torch.no_grad():
        expected = loaded.model.encode_text(loaded.tokenizer(CAPTIONS))
        got = encoder(tokenize(tokenizer, CAPTIONS)).pooler_output @ loaded.model.text_projection
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_training_on_the_frozen_shapes_clip_text_encoder(tiny_clip, tmp_path):
    overrides = {**TINY, "text_encoder": "shapes-clip", "clip_folder": str(tiny_clip.path)}
    result = zoo.train_model("shapes-diffusion", overrides, out=tmp_path / "sd", progress=False)
    assert result.report["text_encoder"]["frozen"]
    pipe = zoo.load_model("shapes-diffusion", folder=result.path)
    assert pipe.unet.config.cross_attention_dim == 16 and pipe.tokenizer.model_max_length == 48
    encoder, _, _ = shapes_clip_text_encoder(str(tiny_clip.path))
    saved = pipe.text_encoder.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in encoder.state_dict().items())  # frozen: not trained


def test_shipped_copy_leaves_out_and_rebuilds_the_shapes_clip_text_tower(tiny_clip, tmp_path):
    """Shipping drops the text encoder (a copy of shapes-clip's text tower), stores fp16 weights and a
    fingerprint; loading rebuilds the tower from shapes-clip and generates what the trained pipeline does."""
    overrides = {**TINY, "text_encoder": "shapes-clip", "clip_folder": str(tiny_clip.path)}
    trained = zoo.train_model("shapes-diffusion", overrides, out=tmp_path / "sd", progress=False)
    shipped = zoo.ship_model("shapes-diffusion", source=trained.path, dest=tmp_path / "shipped")
    assert not (shipped / "text_encoder").exists() and not (shipped / "tokenizer").exists()
    assert (shipped / "text_encoder.json").is_file()
    cls = zoo.get_zoo_class("shapes-diffusion")
    assert all((shipped / f).is_file() for f in cls.shipped_files())
    original = zoo.load_model("shapes-diffusion", folder=trained.path)
    rebuilt = zoo.load_model("shapes-diffusion", folder=shipped)
    a = generate(original, CAPTIONS[:2], seed=0, steps=2).float()
    b = generate(rebuilt, CAPTIONS[:2], seed=0, steps=2).float()
    assert (a - b).abs().max() <= 2  # fp16 rounding of the shipped weights, in 0-255 pixel levels
    record = json.loads((shipped / "text_encoder.json").read_text())
    (shipped / "text_encoder.json").write_text(json.dumps({**record, "fingerprint": "0" * 64}))
    with pytest.raises(VlsaeError, match="another shapes-clip text tower"):
        zoo.load_model("shapes-diffusion", folder=shipped)


def test_judges_with_a_tiny_shapes_clip_and_cnn(trained, tiny_clip):
    clip = tiny_clip
    report = json.loads((trained.path / "training.json").read_text())
    report["config"].update(eval_clip=True, clip_folder=str(clip.path), cnn_steps=3, cnn_train=32)
    (trained.path / "training.json").write_text(json.dumps(report))
    metrics = ShapesDiffusion.evaluate(trained.path)
    for judge in ("clip", "cnn"):
        for attribute in ("colour", "shape"):
            r = metrics[judge][attribute]
            assert 0 <= r["match"] <= 1 and 0 <= r["real"] <= 1 and r["chance"] == pytest.approx(0.1)
            assert len(r["per_value"]) == 10 and 0 <= r["real_autoencoded"] <= 1
    described = ShapesDiffusion.describe_report({"metrics": metrics})
    assert "by shapes-clip" in described and "by a CNN" in described


def test_shapes_diffusion_adapter_uses_the_pipelines_text_encoder(trained):
    adapter = create_adapter("shapes-diffusion", device="cpu", folder=str(trained.path))
    assert adapter.hook_points() == ["final", "text_encoder.embeddings", "text_encoder.blocks.0", "text_encoder.final"]
    out = adapter.extract(_pairs(), hook="text_encoder.blocks.0", tokens="cls")
    assert out["text"].shape == (3, 16)
    assert adapter.hook_module("text_encoder.final") is adapter.pipe.text_encoder.final_layer_norm


def test_cnn_judge_learns_colour_from_real_renders():
    """The second judge must read real renders well above chance after a few seconds of training."""
    world = world_config(TRAIN_WORLD)
    judge = train_cnn_judge(world, seed=0, n=600, steps=60)
    images, _, metas = render(world, range(EVAL_OFFSET, EVAL_OFFSET + 100))
    predicted = judge.classify(images)
    colour = sum(p == m["objects"][0]["colour"] for p, m in zip(predicted["colour"], metas)) / 100
    assert colour >= 0.6, colour


def test_pixel_colour_check_and_object_mask():
    from multimodal.shapesworld import RGB

    images = torch.full((3, 3, 8, 8), 140, dtype=torch.uint8)
    images[0, :, 2:5, 2:5] = torch.tensor(RGB["red"], dtype=torch.uint8).view(3, 1, 1)
    images[1, :, 1:3, 1:3] = torch.tensor(RGB["cyan"], dtype=torch.uint8).view(3, 1, 1)
    assert pixel_colours(images) == ["red", "cyan", None]
    mask = object_mask(images.float() / 127.5 - 1)
    assert mask.shape == (3, 1, 8, 8) and mask[0].sum() == 9 and mask[2].sum() == 0
    prompts, asked = eval_prompts(2)
    assert len(prompts) == 200 and prompts[0] == "a red circle" and "an orange ellipse" in prompts
    assert asked[1] == {"colour": "red", "shape": "ellipse"}
