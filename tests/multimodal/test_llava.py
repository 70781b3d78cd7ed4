"""The LLaVA adapter on a tiny random LlavaForConditionalGeneration, and the shapes-llava zoo model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlsae.cli import main
from vlsae.errors import VlsaeError

from multimodal import zoo
from multimodal.adapters import create_adapter
from multimodal.zoo.shapes_llava import ShapesLlava
from multimodal.zoo.shapes_llava.build import build_model, build_processor, build_tokenizer, normalise
from multimodal.zoo.shapes_llava.config import BOS, EOS, IMAGE, TRAIN_WORLD, UNK, ShapesLlavaConfig
from multimodal.zoo.shapes_llava.data import batch_sequences, make_question, parse_objects, reading_order_caption
from multimodal.zoo.shapes_llava.recipe import attribute_word_ids, patch_targets, scene_words

from .tiny import synthetic_pairs

SIZE, PATCH = 32, 8  # 16 patches + the class token: 17 image tokens
TINY_MODEL = {"patch_size": PATCH, "vision_width": 32, "vision_layers": 2, "text_width": 32, "text_layers": 2,
              "heads": 2, "mlp_ratio": 2}
TINY_TRAIN = {"steps": 4, "describe_batch": 4, "question_batch": 4, "n_train": 24, "n_eval": 6, "warmup": 1,
              "vision_steps": 3, "vision_batch": 4,
              "max_new_tokens": 8, "vision_width": 32, "vision_layers": 1, "text_width": 32, "text_layers": 2,
              "heads": 2, "patch_size": 16}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random LLaVA saved with save_pretrained (model + processor), as any checkpoint folder is."""
    out = tmp_path_factory.mktemp("llava") / "tiny-llava"
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(ShapesLlavaConfig(**TINY_MODEL), len(tokenizer), SIZE)
    model.save_pretrained(out)
    build_processor(tokenizer, SIZE, PATCH).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava(folder):
    return create_adapter(f"llava:{folder}", device="cpu")


PAIRS = synthetic_pairs(5, size=SIZE)


def _reference(adapter, pairs):
    """hidden_states of transformers' own forward, and the token positions of each caption
    found without the adapter: with the default prompt '{image}\\n{caption}' and a word tokenizer
    the caption is the last len(words) tokens of each row."""
    prepared = adapter.prepare(pairs)
    inputs = prepared.inputs
    with torch.no_grad():
        out = adapter.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"], output_hidden_states=True)
    lengths = inputs["attention_mask"].sum(dim=1)
    words = [len(adapter.tokenizer(p["caption"], add_special_tokens=False)["input_ids"]) for p in pairs]
    positions = [list(range(int(n) - w, int(n))) for n, w in zip(lengths, words)]
    return out, positions, inputs


def test_hook_points_widths_and_parsing(llava):
    points = llava.hook_points()
    assert points == ["layers.0", "layers.1", "final", "projector", "vision.layers.0", "vision.layers.1"]
    assert llava.widths("layers.1") == {"image": 32, "text": 32}
    assert llava.widths("vision.layers.0,layers.1") == {"image": 32, "text": 32}
    assert llava.parse_hook("layers.0") == {"image": "layers.0", "text": "layers.0"}
    assert llava.parse_hook("vision.layers.1,layers.0") == {"image": "vision.layers.1", "text": "layers.0"}
    assert llava.parse_hook("projector") == {"image": "projector"}
    with pytest.raises(VlsaeError, match="valid hook points"):
        llava.parse_hook("layers.2")
    with pytest.raises(VlsaeError, match="two points for the image"):
        llava.parse_hook("layers.0,layers.1")
    with pytest.raises(VlsaeError, match="two points for the image"):
        llava.parse_hook("projector,vision.layers.0")
    assert llava.describe()["image_tokens"] == 17 and llava.prompt == "{image}\n{caption}"


def test_decoder_layer_rows_are_transformers_hidden_states(llava):
    out, positions, inputs = _reference(llava, PAIRS)
    got = llava.extract(PAIRS, "layers.0", "patch")
    hidden = out.hidden_states[1]  # [0] is the embeddings, [-1] the final norm's output
    is_image = inputs["input_ids"] == IMAGE
    torch.testing.assert_close(got["image"], hidden[is_image])
    expected_text = torch.cat([hidden[i, p] for i, p in enumerate(positions)])
    torch.testing.assert_close(got["text"], expected_text)
    assert got.pair_index["image"].tolist() == sum(([i] * 17 for i in range(5)), [])
    assert got.pair_index["text"].tolist() == sum(([i] * len(p) for i, p in enumerate(positions)), [])
    assert got.keys == [p["key"] for p in PAIRS]
    final = llava.extract(PAIRS, "final", "all")
    torch.testing.assert_close(final["image"], out.hidden_states[-1][is_image])


def test_mean_and_cls_summarise_the_per_token_rows(llava):
    tokens = llava.extract(PAIRS, "layers.0", "patch")
    mean = llava.extract(PAIRS, "layers.0", "mean")
    cls = llava.extract(PAIRS, "layers.0", "cls")
    for modality in ("image", "text"):
        assert mean[modality].shape == (5, 32) and mean.pair_index[modality].tolist() == list(range(5))
        rows, index = tokens[modality], tokens.pair_index[modality]
        expected = torch.stack([rows[index == i].mean(dim=0) for i in range(5)])
        torch.testing.assert_close(mean[modality], expected)
        last = torch.stack([rows[index == i][-1] for i in range(5)])
        torch.testing.assert_close(cls[modality], last)
    every = llava.extract(PAIRS, "layers.0", "all")
    assert torch.equal(every["image"], tokens["image"])
    # all text = start token + the caption (the default prompt's newline is no token of a word tokenizer)
    assert every["text"].shape[0] == tokens["text"].shape[0] + 5


def test_final_projector_and_vision_points(llava):
    inputs = llava.prepare(PAIRS).inputs
    final = llava.extract(PAIRS, "final", "patch")
    last = llava.extract(PAIRS, "layers.1", "patch")
    with torch.no_grad():
        torch.testing.assert_close(final["image"], llava.model.model.language_model.norm(last["image"]))
        torch.testing.assert_close(final["text"], llava.model.model.language_model.norm(last["text"]))
        features = llava.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        vision = llava.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    features = torch.stack(list(features))  # (pairs, class token + patches, width): the "full" strategy
    torch.testing.assert_close(llava.extract(PAIRS, "projector", "all")["image"], features.flatten(0, 1))
    torch.testing.assert_close(llava.extract(PAIRS, "projector", "patch")["image"], features[:, 1:].flatten(0, 1))
    torch.testing.assert_close(llava.extract(PAIRS, "projector", "mean")["image"], features[:, 1:].mean(1))
    torch.testing.assert_close(llava.extract(PAIRS, "projector", "cls")["image"], features[:, 0])
    torch.testing.assert_close(llava.extract(PAIRS, "vision.layers.1", "cls")["image"], vision[2][:, 0])
    torch.testing.assert_close(llava.extract(PAIRS, "vision.layers.0", "patch")["image"], vision[1][:, 1:].reshape(-1, 32))


def test_right_padding_and_batch_company_do_not_change_a_pair(llava):
    alone = llava.extract(PAIRS[:1], "layers.1", "patch")
    batch = llava.extract(PAIRS, "layers.1", "patch")  # pair 0 padded to the longest caption
    for modality in ("image", "text"):
        torch.testing.assert_close(batch[modality][batch.pair_index[modality] == 0], alone[modality], atol=1e-5, rtol=1e-4)


def test_prompt_option_moves_the_caption_and_text_rows_follow_it(folder):
    adapter = create_adapter(f"llava:{folder}", device="cpu", prompt="{image} describe : {caption}")
    prepared = adapter.prepare(PAIRS[:2])
    ids, mask = prepared.inputs["input_ids"][0], prepared.inputs["caption_mask"][0]
    words = adapter.tokenizer(PAIRS[0]["caption"], add_special_tokens=False)["input_ids"]
    assert ids[mask].tolist() == words
    assert ids[1 + 17: 1 + 17 + 2].tolist() == adapter.tokenizer("describe :", add_special_tokens=False)["input_ids"]
    with pytest.raises(VlsaeError, match=r"\{image\} and \{caption\}"):
        create_adapter(f"llava:{folder}", device="cpu", prompt="describe : {caption}")
    with pytest.raises(VlsaeError, match="no caption"):
        adapter.extract([{"key": "k", "image": PAIRS[0]["image"], "caption": None}], "layers.0", "mean")


def test_missing_or_wrong_checkpoints_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VlsaeError, match="LLaVA folder not found: .*pass llava:/path/to/folder"):
        create_adapter(f"llava:{tmp_path / 'nothing'}", device="cpu")
    with pytest.raises(VlsaeError, match=r"not found locally \(HF_HUB_OFFLINE is set\); pass llava:"):
        create_adapter("llava:nobody/no-such-llava", device="cpu")
    with pytest.raises(VlsaeError, match="no config.json"):
        create_adapter(f"llava:{tmp_path}", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VlsaeError, match="'bert' checkpoint, not a LLaVA"):
        create_adapter(f"llava:{tmp_path}", device="cpu")
    with pytest.raises(VlsaeError, match="needs a checkpoint"):
        create_adapter("llava:", device="cpu")


def test_cli_lists_hooks_and_extracts_a_decoder_layer(folder, tmp_path, capsys):
    from multimodal.shapesworld import ShapesWorldConfig, write_world

    write_world(ShapesWorldConfig(image_size=SIZE), tmp_path / "world", n=12, shard_size=12, progress=False)
    assert main(["extract", "--model", f"llava:{folder}", "--list-hooks", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out
    assert "layers.1" in listed and "vision.layers.0" in listed
    code = main(["extract", "--model", f"llava:{folder}", "--data", str(tmp_path / "world"), "--out",
                 str(tmp_path / "acts"), "--hook", "layers.1", "--tokens", "mean", "--batch-size", "5",
                 "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["n_pairs"] == 12 and manifest["rows"] == {"image": 12, "text": 12}
    assert manifest["width"] == {"image": 32, "text": 32}


# -- shapes-llava ----------------------------------------------------------------------------

def test_vocabulary_covers_shapesworld_captions_and_questions():
    from multimodal.shapesworld import ShapesWorldConfig, render_sample

    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    world = ShapesWorldConfig(noise=0.3, mention_texture=1.0)
    for i in range(200):
        sample = render_sample(world, i)
        question = make_question(sample.meta["objects"], rng)
        ids = tokenizer(sample.caption + " " + question.text + " " + question.reply)["input_ids"]
        assert ids[0] == BOS and UNK not in ids, sample.caption
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE and tokenizer.eos_token_id == EOS


def test_processor_pixels_equal_the_training_normalisation():
    from PIL import Image

    processor = build_processor(build_tokenizer(), 64, 16)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    out = processor(images=images, text=["<image> describe :"] * 2, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], normalise(pixels), atol=1e-5, rtol=1e-5)
    assert int((out["input_ids"][0] == IMAGE).sum()) == 17  # the processor expands the image token as the model needs


def test_questions_are_balanced_and_true_to_the_scene():
    from multimodal.shapesworld import ShapesWorldConfig, render_sample, vocabulary

    colours, shapes = set(vocabulary()["colour"]), set(vocabulary()["shape"])
    rng = np.random.default_rng(1)
    answers, kinds = [], []
    for i in range(400):
        objects = render_sample(ShapesWorldConfig(), i).meta["objects"]
        question, answer, kind, reply = make_question(objects, rng)
        words = question.split()
        assert reply == (" ".join(words[-len(kind.split("_")):]) if answer else "no")
        asked = {"colour": next((w for w in words if w in colours), None),
                 "shape": next((w for w in words if w in shapes), None)}
        assert words[-1] in colours | shapes  # the answer follows an asked value
        matches = any(all(o[a] == v for a, v in asked.items() if v is not None) for o in objects)
        assert matches == answer, (question, objects)
        assert kind == "_".join(a for a in ("colour", "shape") if asked[a])
        answers.append(answer)
        kinds.append(kind)
    assert 0.42 < np.mean(answers) < 0.58
    assert min(kinds.count(k) for k in ("colour_shape", "shape", "colour")) > 60


def test_parse_objects_reads_attributes_synonyms_and_positions():
    objects = parse_objects("there are two shapes : a big red plus sign at the upper left , a medium - sized blue shape")
    assert objects == [{"shape": "cross", "colour": "red", "size": "large", "position": "top left"},
                       {"shape": None, "colour": "blue", "size": "medium", "position": None}]
    assert parse_objects("a tiny ring at the top")[0]["position"] == "top"
    assert parse_objects("yes") == []


def test_stage_one_targets_point_at_the_right_patches_and_words():
    centre = {"objects": [{"shape": "star", "colour": "red", "size": "small", "position": "center"}]}
    corner = {"objects": [{"shape": "ring", "colour": "blue", "size": "large", "position": "top left"},
                          {"shape": "cross", "colour": "red", "size": "small", "position": "bottom right"}]}
    targets = patch_targets([centre, corner], image_size=64, patch_size=16)  # a 4x4 grid, row-major
    sees = (targets[..., 0] > 0).int().view(2, 4, 4)
    assert sees[0].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert sees[1, 0, 0] == 1 and sees[1, 3, 3] == 1 and sees[1, 0, 3] == 0 and sees[1, 3, 0] == 0
    from multimodal.shapesworld import vocabulary

    vocab = vocabulary()
    assert targets[0, 5].tolist() == [1 + vocab["colour"].index("red"), 1 + vocab["shape"].index("star"),
                                      1 + vocab["size"].index("small")]
    tokenizer = build_tokenizer()
    word_ids = attribute_word_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(word_ids[1].tolist()) == vocab["shape"]
    present = scene_words([corner], word_ids)[0]
    assert int(present.sum()) == 6 and present[vocab["colour"].index("blue")] == 1


def test_reading_order_captions_keep_the_style_and_sort_the_objects():
    from multimodal.shapesworld import POSITIONS, ShapesWorldConfig, render_sample

    world = ShapesWorldConfig(**TRAIN_WORLD)
    order = list(POSITIONS)
    for i in range(30):
        sample = render_sample(world, i)
        caption = reading_order_caption(world, sample.meta, i)
        named = [o["position"] for o in parse_objects(caption)]
        assert named == sorted((o["position"] for o in sample.meta["objects"]), key=order.index)
        assert caption == reading_order_caption(world, sample.meta, i)  # seeded by the record


def test_batch_sequences_learn_only_the_answer():
    ids, mask, labels = batch_sequences([[7, 8], [9]], [[5, EOS], [6]], n_image=3)
    assert ids.tolist() == [[BOS, IMAGE, IMAGE, IMAGE, 7, 8, 5, EOS], [BOS, IMAGE, IMAGE, IMAGE, 9, 6, 0, 0]]
    assert mask.sum(dim=1).tolist() == [8, 6]
    assert labels.tolist() == [[-100] * 6 + [5, EOS], [-100] * 5 + [6, -100, -100]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return zoo.train_model("shapes-llava", TINY_TRAIN, out=tmp_path_factory.mktemp("zoo") / "shapes-llava", progress=False)


def test_tiny_training_report_and_reload(trained):
    report = trained.report
    assert report["name"] == "shapes-llava" and report["config"]["steps"] == 4
    metrics = report["metrics"]
    assert set(metrics["caption"]) == {"shape", "colour", "size", "position"}
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 6 for r in metrics["caption"].values())
    assert 0 <= metrics["yes_no"]["accuracy"] <= 1 and metrics["yes_no"]["n"] == 6
    assert metrics["unknown_caption_tokens"] == 0
    assert all(np.isfinite(v).all() for v in report["loss_curve"].values())
    loaded = zoo.load_model("shapes-llava", folder=trained.path)
    assert loaded.prompt == "{image} describe : {caption}"
    described = zoo.get_zoo_class("shapes-llava").describe_report(report)
    assert "caption attribute accuracy" in described and "yes/no accuracy" in described


def test_training_is_seeded(trained, tmp_path):
    again = zoo.train_model("shapes-llava", TINY_TRAIN, out=tmp_path / "again", progress=False)
    a = zoo.load_model("shapes-llava", folder=trained.path).model.state_dict()
    b = zoo.load_model("shapes-llava", folder=again.path).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.report["metrics"]["caption"] == trained.report["metrics"]["caption"]


def test_zoo_folder_loads_as_llava_with_its_prompt(trained):
    adapter = create_adapter(f"llava:{trained.path}", device="cpu")
    assert adapter.prompt == "{image} describe : {caption}"
    pairs = synthetic_pairs(3, size=64)
    out = adapter.extract(pairs, "layers.1", "mean")
    assert out["image"].shape == (3, 32) and out["text"].shape == (3, 32)


def test_shapes_llava_spec_trains_on_first_use_into_the_cache(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    calls = []
    original = ShapesLlava.train.__func__

    def tiny_train(cls, out_dir, overrides, progress=True):
        calls.append(out_dir)
        return original(cls, out_dir, {**TINY_TRAIN, **overrides}, progress)

    monkeypatch.setattr(ShapesLlava, "train", classmethod(tiny_train))
    monkeypatch.setattr(zoo, "shipped_dir", lambda name: tmp_path / "no-shipped-copy")
    adapter = create_adapter("shapes-llava", device="cpu")
    create_adapter("shapes-llava", device="cpu")
    assert len(calls) == 1 and zoo.is_trained("shapes-llava")
    assert adapter.hook_points()[:2] == ["layers.0", "layers.1"]
    with pytest.raises(VlsaeError, match="takes no arguments"):
        create_adapter("shapes-llava:x", device="cpu")


def test_a_checkpoint_without_the_class_token_among_its_image_tokens(tmp_path):
    """LLaVA's 'default' strategy drops the class token: 16 image tokens, no projector 'cls'."""
    tokenizer = build_tokenizer()
    model = build_model(ShapesLlavaConfig(**TINY_MODEL), len(tokenizer), SIZE)
    model.config.vision_feature_select_strategy = "default"
    model.save_pretrained(tmp_path)
    build_processor(tokenizer, SIZE, PATCH).save_pretrained(tmp_path)
    adapter = create_adapter(f"llava:{tmp_path}", device="cpu")
    out = adapter.extract(PAIRS[:2], "layers.0", "patch")
    assert adapter.describe()["image_tokens"] == 16 and out["image"].shape == (32, 32)
    assert adapter.extract(PAIRS[:2], "projector", "all")["image"].shape == (32, 32)
    with pytest.raises(VlsaeError, match="no class token"):
        adapter.extract(PAIRS[:2], "projector", "cls")


def test_an_fp16_shipped_copy_loads_in_fp32(trained, tmp_path):
    shipped = zoo.ship_model("shapes-llava", source=trained.path, dest=tmp_path / "shipped")
    loaded = zoo.load_model("shapes-llava", folder=shipped)
    reference = zoo.load_model("shapes-llava", folder=trained.path).model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference[key], atol=2e-3, rtol=1e-3)


def test_several_hooks_come_from_one_forward_of_the_model(llava):
    """forward_hooks: one model forward for every decoder/vision layer asked, each equal to its own forward."""
    prepared = llava.prepare(PAIRS)
    calls = []
    handle = llava.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        together = llava.forward_hooks(prepared, ["layers.0", "layers.1", "vision.layers.1"], "all")
    finally:
        handle.remove()
    assert len(calls) == 1
    for hook, got in together.items():
        alone = llava.forward(prepared, hook, "all")
        assert got.keys == alone.keys and set(got.acts) == set(alone.acts)
        for m in alone.acts:
            assert torch.equal(got.acts[m], alone.acts[m]) and torch.equal(got.pair_index[m], alone.pair_index[m])
