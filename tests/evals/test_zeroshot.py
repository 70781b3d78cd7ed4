"""vlsae zeroshot: λ = 0 is plain zero-shot, the concept terms by hand, the protocol, labels, and the CLI."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals.zeroshot.concept import ConceptMatcher, check_sae, dense_codes, mix, reconstruct, sweep_predictions
from evals.zeroshot.data import read_labels, split
from evals.zeroshot.head import ZeroShotHead
from evals.zeroshot.protocol import choose, evaluate_attribute, paired_gain_interval
from multimodal.shapesworld import ShapesWorldConfig, vocabulary, write_world
from vlsae import create_sae
from vlsae.checkpoint import save_sae
from vlsae.cli import main
from vlsae.errors import VlsaeError
from tests.multimodal.tiny import tiny_clip_config

D = 24  # the tiny CLIP's embedding width


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run faster on one thread, and much faster on a machine whose cores are shared
    (measured: 0.8 s vs 11.6 s for 2,560 prompts through the tiny CLIP with other jobs running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _head(n_prompts: int = 30, d: int = D) -> ZeroShotHead:
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(n_prompts, d, generator=g) * 3
    return ZeroShotHead(attributes=["a", "b"], classes={"a": ["x", "y", "z"], "b": ["p", "q"]},
                        text=F.normalize(raw, dim=-1), prompt_class={"a": torch.arange(n_prompts) % 3,
                                                                     "b": (torch.arange(n_prompts) // 3) % 2},
                        logit_scale=30.0, raw=raw)


def _vl(d: int = D, n_latents: int = 16, k: int = 4):
    sae = create_sae("vl", d_in=d, n_latents=n_latents, k=k).eval()
    with torch.no_grad():  # decoder biases away from zero, so decoding as image vs text differs
        sae.b_dec["image"].normal_()
        sae.b_dec["text"].normal_()
    return sae


def test_lambda_zero_reproduces_plain_predictions_exactly():
    head, sae = _head(), _vl()
    image = torch.randn(200, D)
    matcher = ConceptMatcher.build(sae, head)
    plain = head.prompt_logits(image)
    for variant in ("concept", "decoder"):
        term = matcher.term_logits(image, variant)
        assert torch.equal(mix(plain, term, 0.0), plain)  # bit for bit, not approximately
    out = sweep_predictions(matcher, image, head.attributes, [0.0, 0.3, 1.0], chunk=64)
    for attribute in head.attributes:
        assert torch.equal(out["plain"][attribute], head.predict(image, attribute))
        for variant in ("concept", "decoder"):
            assert torch.equal(out[variant][attribute][0], out["plain"][attribute])
        # the concept term does move predictions (the test could fail)
        assert not torch.equal(out["concept"][attribute][2], out["plain"][attribute])


def test_concept_terms_match_their_formulas():
    head, sae = _head(), _vl()
    image = torch.randn(50, D) * 2
    matcher = ConceptMatcher.build(sae, head)
    z_image = F.normalize(sae.encode(image, "image").to_dense(), dim=-1)
    z_text = F.normalize(sae.encode(head.raw, "text").to_dense(), dim=-1)
    assert torch.allclose(matcher.term_logits(image, "concept"), 30.0 * z_image @ z_text.T, atol=1e-5)
    as_image = sae.decode(sae.encode(head.raw, "text"), "image")  # the prompt's concepts through the image decoder
    expected = 30.0 * F.normalize(image, dim=-1) @ F.normalize(as_image, dim=-1).T
    assert torch.allclose(matcher.term_logits(image, "decoder"), expected, atol=1e-5)
    assert not torch.allclose(reconstruct(sae, head.raw, "text", "image"), reconstruct(sae, head.raw, "text"))
    assert torch.allclose(dense_codes(sae, image, "image").norm(dim=1), torch.ones(50))
    with pytest.raises(VlsaeError, match=r"\[0, 1\]"):
        mix(head.prompt_logits(image), head.prompt_logits(image), 1.5)


def test_an_sae_of_the_wrong_width_is_one_line():
    with pytest.raises(VlsaeError, match="width 32 but the model's final embeddings have width 24"):
        check_sae(_vl(d=32), D)
    with pytest.raises(VlsaeError, match="width 32"):
        ConceptMatcher.build(_vl(d=32), _head())


def test_choice_ties_go_to_the_smaller_lambda_and_the_gain_interval_is_paired():
    lambdas = [0.0, 0.5, 1.0]
    assert choose({"concept": torch.tensor([0.8, 0.8, 0.7])}, lambdas) == ("concept", 0)
    assert choose({"concept": torch.tensor([0.8, 0.8, 0.9]), "decoder": torch.tensor([0.8, 0.9, 0.9])}, lambdas) == ("decoder", 1)
    same = np.array([1, 0, 1, 1])
    assert paired_gain_interval(same, same) == (0.0, 0.0)
    rng = np.random.default_rng(0)
    plain = rng.random(400) < 0.7
    enhanced = plain | (rng.random(400) < 0.2)  # strictly better: every resample's gain is >= 0
    low, high = paired_gain_interval(plain, enhanced)
    assert 0 <= low < (enhanced.mean() - plain.mean()) < high


def test_evaluate_attribute_reports_the_test_split_at_the_validation_choice():
    truth = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    plain = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0])
    swept = {"concept": torch.stack([plain, truth])}  # λ = 1 is always right
    val, test = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    result, enhanced = evaluate_attribute("a", 2, truth, plain, swept, [0.0, 1.0], val, test, resamples=200)
    assert (result.variant, result.lam) == ("concept", 1.0)
    assert result.plain_test == 0.5 and result.enhanced_test == 1.0 and result.gain == 0.5
    assert torch.equal(enhanced, truth)
    a, b = split(10, 0.5, seed=3)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10)) and len(a) == 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    single = folder / "single"
    write_world(ShapesWorldConfig(seed=5, image_size=32, max_objects=1), single, n=40, shard_size=20, progress=False)
    mixed = folder / "mixed"
    write_world(ShapesWorldConfig(seed=5, image_size=32, min_objects=2), mixed, n=10, shard_size=10, progress=False)
    return {"single": single, "mixed": mixed}


def test_labels_need_single_objects_and_known_classes(world, tmp_path):
    vocab = vocabulary()
    keys, labels, left = read_labels(str(world["single"]), {"shape": vocab["shape"], "size": vocab["size"]})
    assert len(keys) == 40 and left == {} and labels["shape"].shape == (40,)
    with pytest.raises(VlsaeError, match="single-object scenes"):
        read_labels(str(world["mixed"]), {"shape": vocab["shape"]})
    with pytest.raises(VlsaeError, match="which the head does not name"):
        read_labels(str(world["single"]), {"shape": ["circle"]})
    present = sorted({vocab["shape"][i] for i in labels["shape"].tolist()})
    with pytest.raises(VlsaeError, match="names shape 'octagon', which no record"):
        read_labels(str(world["single"]), {"shape": present + ["octagon"]}, classes_file="c.json")
    keys, labels, _ = read_labels(str(world["single"]), {"shape": present}, classes_file="c.json")
    assert [present[i] for i in labels["shape"].tolist()] == [vocab["shape"][i] for i in
                                                            read_labels(str(world["single"]), {"shape": vocab["shape"]})[1]["shape"].tolist()]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, world):
    folder = tmp_path_factory.mktemp("setup")
    model = f"open_clip:{tiny_clip_config(folder)}:random"
    save_sae(_vl(), folder / "vl")
    save_sae(_vl(d=32), folder / "vl32")
    shapes = sorted({json.loads(line)["objects"][0]["shape"] for line in _metas(world["single"])})
    (folder / "classes.json").write_text(json.dumps({"attribute": "shape", "classes": shapes,
                                                     "templates": ["a {}", "a photo of a {}."]}))
    (folder / "extra.json").write_text(json.dumps({"attribute": "shape", "classes": shapes + ["octagon"]}))
    return {"folder": folder, "model": model}


def _metas(shards):
    import tarfile

    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield tar.extractfile(member).read().decode()


def test_cli_writes_the_report(tiny_setup, world, capsys):
    folder, out = tiny_setup["folder"], tiny_setup["folder"] / "report"
    code = main(["zeroshot", "--sae", str(folder / "vl"), "--model", tiny_setup["model"], "--data", str(world["single"]),
                 "--classes", str(folder / "classes.json"), "--out", str(out), "--lambdas", "0,0.5,1", "--quiet",
                 "--resamples", "200"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean gain" in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    (shape,) = results["attributes"]
    assert shape["attribute"] == "shape" and shape["n_val"] + shape["n_test"] == 40
    assert set(shape["curves"]) == {"concept", "decoder"} and len(shape["curves"]["concept"]["test"]) == 3
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 40 and set(rows[0]) == {"key", "split", "attribute", "true", "plain", "enhanced"}
    plain_test = np.mean([r["true"] == r["plain"] for r in rows if r["split"] == "test"])
    assert plain_test == pytest.approx(shape["plain_test"])
    assert (out / "index.html").read_text().count("accuracy_vs_lambda.png") == 1
    assert (out / "accuracy_vs_lambda.png").stat().st_size > 1000


@pytest.mark.parametrize("case, needle", [("width", "width 32"), ("extra", "names shape 'octagon', which no record"),
                                          ("attribute", "--attribute takes"), ("lambdas", "include 0")])
def test_cli_bad_inputs_are_one_line(tiny_setup, world, capsys, case, needle):
    folder = tiny_setup["folder"]
    args = {"--sae": str(folder / "vl"), "--model": tiny_setup["model"], "--data": str(world["single"]),
            "--classes": str(folder / "classes.json"), "--out": str(folder / f"bad-{case}")}
    if case == "width":
        args["--sae"] = str(folder / "vl32")
    elif case == "extra":
        args["--classes"] = str(folder / "extra.json")
    elif case == "attribute":
        args.pop("--classes")
        args["--attribute"] = "weight"
    elif case == "lambdas":
        args["--lambdas"] = "0.5,1"
    code = main(["zeroshot", *[x for kv in args.items() for x in kv], "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1
    assert not (folder / f"bad-{case}").exists()


def test_labels_of_a_real_style_webdataset_come_from_cls_members_or_json(tmp_path):
    """A folder of labelled images as users have them: the class in a cls member (name or index) or the json."""
    import io

    import webdataset as wds
    from PIL import Image

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        return buffer.getvalue()

    shard = tmp_path / "000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "a", "png": png(), "txt": "x", "cls": b"dog"})
        writer.write({"__key__": "b", "png": png(), "txt": "x", "cls": b"0"})
        writer.write({"__key__": "c", "png": png(), "txt": "x", "json": json.dumps({"label": "dog"}).encode()})
    keys, labels, _ = read_labels(str(shard), {"class": ["cat", "dog"]}, classes_file="f.json")
    assert keys == ["a", "b", "c"] and labels["class"].tolist() == [1, 0, 1]
    with pytest.raises(VlsaeError, match="record a has class 'dog', which --classes f.json does not name"):
        read_labels(str(shard), {"class": ["cat", "bird"]}, classes_file="f.json")
