"""vlsae concepts end to end on a tiny real-class CLIP and ShapesWorld shards."""
import json

import pytest
import torch

from evals.concepts import extract_pair_activations, planted_labels
from multimodal.adapters import create_adapter
from multimodal.pairs import iter_pairs
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.multimodal.tiny import tiny_clip_config
from vlsae import create_sae
from vlsae.checkpoint import save_sae
from vlsae.cli import main
from vlsae.training import TensorSource, TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    write_world(ShapesWorldConfig(image_size=32), root / "world", n=48, shard_size=24, progress=False)
    spec = f"open_clip:{tiny_clip_config(root)}:random"
    adapter = create_adapter(spec, device="cpu")
    pairs = extract_pair_activations(adapter, iter_pairs(root / "world"), limit=48, progress=False)
    sae = create_sae("vl", d_in=pairs.acts["image"].shape[1], n_latents=32, k=4)
    train(sae, TensorSource(pairs.acts), TrainConfig(steps=30, batch_size=16, progress=False, tensorboard=False),
          out_dir=root / "sae")
    return root, spec, pairs


def test_planted_labels_follow_the_json(setup):
    _, _, pairs = setup
    image, text = planted_labels(pairs.metas)
    assert "shape=circle" in image or "shape=square" in image
    for name in image:
        assert image[name].shape == (48,)
        assert not (text[name] & ~image[name]).any()  # a caption can only mention what is planted


def test_concepts_cli_writes_a_report(setup, capsys):
    root, spec, _ = setup
    out = root / "report"
    assert main(["concepts", "--sae", str(root / "sae"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(out), "--limit", "40", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 40 and set(summary["fvu"]) == {"image", "text"}
    assert summary["planted"]["values"] > 10
    html = (out / "index.html").read_text()
    assert "Concept cards" in html and "modality_score.png" in html and "planted_matrix.png" in html
    assert "probe ceiling" in html and "encodable_values" in summary["planted"]
    assert all({"ceiling_image", "ceiling_text"} <= set(m) for m in summary["planted_matches"])
    assert (out / "modality_score.png").exists() and any((out / "img").iterdir())
    assert "zf_plot.png" in html and (out / "zf_plot.png").exists() and "LBO" in html
    assert set(summary["zf"]) == {"image", "text"} and summary["zf"]["image"]["median_eps_lbo"] >= 0
    assert "report:" in capsys.readouterr().out
    # refuses to overwrite, and a width mismatch is one line
    assert main(["concepts", "--sae", str(root / "sae"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(out), "--quiet"]) == 2
    other = create_sae("vl", d_in=7, n_latents=8, k=2)
    save_sae(other, root / "wrong")
    assert main(["concepts", "--sae", str(root / "wrong"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(root / "r2"), "--quiet"]) == 2
    assert "width" in capsys.readouterr().err


def test_two_fold_probe_ceiling_separates_linear_labels_only():
    import numpy as np
    import torch

    from evals.concepts import two_fold_probe_ceiling

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g)
    labels = {"colour=red": (x[:, 3] > 0.5).numpy(), "shape=star": np.random.default_rng(0).random(1000) < 0.3}
    ceiling = two_fold_probe_ceiling(x, labels)
    assert ceiling["colour=red"] > 0.97 and 0.4 < ceiling["shape=star"] < 0.6
    assert two_fold_probe_ceiling(x[:4], labels) == {}
    capped = two_fold_probe_ceiling(x, labels, max_pairs=400)  # a subsample still fits the linear label
    assert capped["colour=red"] > 0.95


def test_pair_activations_are_the_extraction_cache(setup, tmp_path):
    """The report's rows are what `vlsae extract` writes for the same pairs, in the same order."""
    from multimodal.cache import ActivationCache
    from multimodal.extract import extract_pairs

    root, spec, _ = setup
    adapter = create_adapter(spec, device="cpu")  # random weights: one adapter for both extractions
    pairs = extract_pair_activations(adapter, iter_pairs(root / "world"), limit=48, progress=False)
    extract_pairs(adapter, iter_pairs(root / "world"), tmp_path / "acts", limit=48, progress=False)
    cache = ActivationCache(tmp_path / "acts")
    assert pairs.keys == cache.keys()
    direct = cache.read_all()
    for m in ("image", "text"):
        assert torch.equal(pairs.acts[m], direct[m])
    records = list(iter_pairs(root / "world"))[:48]
    assert pairs.captions == [r.caption for r in records] and pairs.metas == [r.meta for r in records]
    kept = extract_pair_activations(adapter, iter_pairs(root / "world"), tmp_path / "kept", limit=5, progress=False)
    assert kept.keys == pairs.keys[:5] and (tmp_path / "kept" / "manifest.json").exists()


def test_report_headline_and_cards_name_exclusive_matches(setup):
    import re

    from evals.planted import ValueMatch, latent_roles

    root, spec, _ = setup
    out = root / "report-exclusive"
    assert main(["concepts", "--sae", str(root / "sae"), "--data", str(root / "world"), "--model", spec,
                 "--out", str(out), "--limit", "40", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    planted = summary["planted"]
    assert 0 <= planted["exclusive_same_index_rate"] <= planted["same_index_rate"] <= 1
    assert isinstance(planted["catch_all_latents"], int)
    fields = ("value", "image_latent", "image_auroc", "text_latent", "text_auroc", "image_exclusive", "text_exclusive")
    matches = [ValueMatch(**{k: m[k] for k in fields}) for m in summary["planted_matches"]]
    assert [m["exclusive_same"] for m in summary["planted_matches"]] == [m.exclusive_same for m in matches]
    roles = latent_roles(matches)
    html = (out / "index.html").read_text()
    assert "exclusively" in html
    headers = dict(re.findall(r"<h3>latent (\d+)(.*?)</h3>", html))
    assert headers and any(int(latent) in roles for latent in headers)
    import html as html_module
    for latent, header in headers.items():
        role = roles.get(int(latent))
        assert (html_module.escape(role.label()) in header) if role else header == ""
    assert not (root / ".report-exclusive.tmp").exists()  # the staging folder and its cache are gone


def test_concepts_help_names_every_flag_and_its_default(capsys, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exit_info:
        main(["concepts", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    entries = dict(re.findall(r"^  (--[\w-]+)[^\n]*?\s{2,}(\S[^\n]*)$", text, flags=re.MULTILINE))
    flags = {"--sae", "--data", "--model", "--out", "--hook", "--tokens", "--limit", "--batch-size", "--device",
             "--cards", "--overwrite", "--quiet"}
    assert flags <= set(entries), sorted(flags - set(entries))
    for flag in flags:
        assert "(default: " in entries[flag] or "(required)" in entries[flag], (flag, entries[flag])


def test_an_unwritable_out_is_one_line_before_anything_loads(tmp_path, capsys):
    """The SAE folder and the model do not exist: the --out error has to come first."""
    code = main(["concepts", "--sae", str(tmp_path / "no-sae"), "--data", str(tmp_path / "no-data"),
                 "--model", "no-such-model", "--out", "/proc/vlsae-x", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out /proc/vlsae-x is not writable" in err


def test_a_truncated_shard_is_refused_under_the_read_policy(setup, tmp_path, capsys):
    """The concept report reads shards under the same lost-pair policy as vlsae extract."""
    import shutil

    root, spec, _ = setup
    world = tmp_path / "world"
    shutil.copytree(root / "world", world)
    shard = world / "000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2 + 100])  # cut mid-member: about half of that shard's pairs lost
    argv = ["concepts", "--sae", str(root / "sae"), "--data", str(world), "--model", spec, "--limit", "48", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "000000.tar" in err and "--max-skipped" in err
    assert not (tmp_path / "report").exists()
    assert main([*argv, "--out", str(tmp_path / "report2"), "--max-skipped", "0.6"]) == 0
    assert (tmp_path / "report2" / "index.html").is_file()
