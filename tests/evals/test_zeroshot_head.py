"""The shared zero-shot head: the zoo protocol reproduced exactly, template ensembling, the --classes file."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from evals.zeroshot.head import ZeroShotHead, classes_head, encode_texts, load_classes, shapesworld_head
from multimodal.adapters import create_adapter
from multimodal.shapesworld import ShapesWorldConfig, render_sample, vocabulary
from multimodal.zoo.shapes_clip import EVAL_OFFSET, ZERO_SHOT_ATTRIBUTES, eval_world, zero_shot_accuracy
from vlsae.errors import VlsaeError
from tests.multimodal.tiny import tiny_clip_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run faster on one thread, and much faster on a machine whose cores are shared
    (measured: 0.8 s vs 11.6 s for 2,560 prompts through the tiny CLIP with other jobs running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = tiny_clip_config(tmp_path_factory.mktemp("clip"))
    return create_adapter(f"open_clip:{config}:random", device="cpu")


def _image_embeddings(adapter, world, indices) -> torch.Tensor:
    """Final image embeddings of rendered ShapesWorld records, through the adapter (as a cache holds them)."""
    records = [render_sample(world, i) for i in indices]
    pairs = [{"key": s.key, "image": s.image, "caption": s.caption} for s in records]
    prepared = adapter.prepare(pairs, modalities=("image",))
    return adapter.forward(prepared, "visual.final", "cls").acts["image"]


def _truth(world, indices, attribute) -> torch.Tensor:
    values = vocabulary()[attribute]
    return torch.tensor([values.index(render_sample(world, i).meta["objects"][0][attribute]) for i in indices])


def test_class_log_probs_is_the_log_of_the_summed_softmax_mass():
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    head = ZeroShotHead(attributes=["a"], classes={"a": ["x", "y", "z"]}, text=text,
                        prompt_class={"a": torch.tensor([0, 0, 1, -1])}, logit_scale=2.0)
    image = torch.tensor([[3.0, 1.0], [0.0, -2.0]])
    cos = F.normalize(image, dim=-1) @ text.T
    p = torch.softmax(2.0 * cos, dim=1)
    expected = torch.stack([p[:, 0] + p[:, 1], p[:, 2]], dim=1).log()
    got = head.class_log_probs(image, "a")
    assert torch.allclose(got[:, :2], expected, atol=1e-6)
    assert torch.isinf(got[:, 2]).all() and (got[:, 2] < 0).all()  # no prompt names z
    assert head.predict(image, "a").tolist() == expected.argmax(dim=1).tolist()
    with pytest.raises(VlsaeError, match="width 3"):
        head.prompt_logits(torch.zeros(1, 3))


def test_head_reproduces_the_zoo_evaluation_on_a_tiny_clip(tiny):
    world = ShapesWorldConfig(seed=0, image_size=32)
    indices = range(EVAL_OFFSET, EVAL_OFFSET + 60)
    zoo = zero_shot_accuracy(tiny.model, tiny.tokenizer, world, indices)
    head = shapesworld_head(tiny)
    assert head.n_prompts == 9240 and head.logit_scale == pytest.approx(float(tiny.model.logit_scale.detach().exp()))
    image = _image_embeddings(tiny, eval_world(world), indices)
    for attribute in ZERO_SHOT_ATTRIBUTES:
        truth = _truth(eval_world(world), indices, attribute)
        accuracy = float((head.predict(image, attribute) == truth).float().mean())
        assert accuracy == zoo[attribute]["accuracy"], attribute


@pytest.mark.slow
def test_head_reproduces_shapes_clip_zero_shot_accuracy():
    """The shipped shapes-clip: the head's plain accuracy is the zoo evaluation's, attribute by attribute."""
    adapter = create_adapter("shapes-clip", device="cpu")
    world = ShapesWorldConfig(seed=0)
    indices = range(EVAL_OFFSET, EVAL_OFFSET + 300)
    zoo = zero_shot_accuracy(adapter.model, adapter.tokenizer, world, indices)
    head = shapesworld_head(adapter)
    image = _image_embeddings(adapter, eval_world(world), indices)
    for attribute in ZERO_SHOT_ATTRIBUTES:
        truth = _truth(eval_world(world), indices, attribute)
        assert float((head.predict(image, attribute) == truth).float().mean()) == zoo[attribute]["accuracy"]
    assert zoo["shape"]["accuracy"] > 0.7  # the model holds shape: the agreement is not one of two chance levels


def test_classes_head_is_the_template_ensemble(tiny, tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": ["red circle", "blue square"], "templates": ["a {}", "a photo of a {}."]}))
    head = classes_head(tiny, path)
    assert head.attributes == ["class"] and head.classes == {"class": ["red circle", "blue square"]}
    each = encode_texts(tiny, ["a red circle", "a photo of a red circle.", "a blue square", "a photo of a blue square."])
    expected = F.normalize(each.view(2, 2, -1).mean(dim=1), dim=-1)
    assert torch.allclose(head.text, expected, atol=1e-6)
    image = torch.randn(5, head.d)
    # one prompt per class: marginalising changes nothing, the prediction is the nearest class embedding
    assert head.predict(image, "class").tolist() == (F.normalize(image, dim=-1) @ expected.T).argmax(dim=1).tolist()


def test_classes_file_errors(tmp_path):
    cases = {
        "missing.json": None,
        "bad.json": "{not json",
        "empty.json": json.dumps({"classes": []}),
        "key.json": json.dumps({"classes": ["a"], "template": ["{}"]}),
        "twice.json": json.dumps({"classes": ["a", "a"]}),
        "template.json": json.dumps({"classes": ["a"], "templates": ["no placeholder"]}),
    }
    messages = {}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(VlsaeError) as info:
            load_classes(tmp_path / name)
        messages[name] = str(info.value)
        assert "\n" not in messages[name]
    assert "not found" in messages["missing.json"] and "unknown key 'template'" in messages["key.json"]
    assert "twice" in messages["twice.json"] and "'{}'" in messages["template.json"]
    (tmp_path / "ok.yaml").write_text("attribute: shape\nclasses: [circle, star]\n")
    spec = load_classes(tmp_path / "ok.yaml")
    assert spec.attribute == "shape" and spec.classes == ["circle", "star"] and spec.templates == ["a photo of a {}."]
