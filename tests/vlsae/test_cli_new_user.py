"""Defects a new user hit: unwritable --out, train without --out, integer activations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlsae.cli import main
from vlsae.files import check_writable_dir, check_writable_file
from vlsae.errors import VlsaeError

from tests.vlsae.test_cli_train import planted, small

UNWRITABLE = "/proc/vlsae-x"


def one_line(capsys, argv) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv", [
    ["train", "--synthetic", "hierarchical", "--steps", "5", "--out", UNWRITABLE],
    ["world", "--n", "10", "--out", UNWRITABLE],
    ["synth", "--suite", "hierarchical", "--archs", "topk", "--steps", "5", "--out", UNWRITABLE + "/rows.json"],
    ["eval", "synth", "--archs", "[topk]", "--steps", "5", "--out", UNWRITABLE + "/rows.json"],
    ["zoo", "train", "shapes-clip", "--out", UNWRITABLE],
    ["demo", "--out", UNWRITABLE],
    ["eval", "demo", "--out", UNWRITABLE],
], ids=["train", "world", "synth", "eval-synth", "zoo-train", "demo", "eval-demo"])
def test_unwritable_out_is_one_line_before_any_work(capsys, monkeypatch, argv):
    import evals.synthetic.leaderboard
    import evals.tasks.demo
    import multimodal.shapesworld
    import vlsae.training.run
    from multimodal import zoo

    def work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(vlsae.training.run, "resolve_data", work)       # train: reading the data
    monkeypatch.setattr(multimodal.shapesworld, "render_sample", work)  # world: drawing scenes
    monkeypatch.setattr(evals.synthetic.leaderboard, "generate", work)  # synth: drawing the suite
    monkeypatch.setattr(evals.tasks.demo, "run_suite", work)            # demo: its first step
    monkeypatch.setattr(evals.tasks.demo, "write_world", work)
    monkeypatch.setattr(zoo.get_zoo_class("shapes-clip"), "train", work)
    err = one_line(capsys, argv)
    assert "not writable" in err and "vlsae-x" in err


def test_writable_checks_create_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable_dir(target) == target and not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(VlsaeError, match="is a file"):
        check_writable_dir(tmp_path / "f")
    with pytest.raises(VlsaeError, match="not writable"):
        check_writable_dir(tmp_path / "f" / "sub")
    with pytest.raises(VlsaeError, match="is a folder"):
        check_writable_file(tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]


def test_train_without_out_keeps_the_run_in_a_fresh_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file({"acts": planted()}, tmp_path / "acts.safetensors")
    assert main(["train", "--data", "acts.safetensors", *small()]) == 0
    out = capsys.readouterr().out
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("topk-")
    assert f"writing the run to {Path('runs') / runs[0].name}" in out
    assert (runs[0] / "sae.safetensors").is_file() and (runs[0] / "training.json").is_file()
    assert main(["train", "--data", "acts.safetensors", *small()]) == 0  # a second run gets its own folder
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_checkpoint_every_flag(tmp_path):
    save_file({"acts": planted()}, tmp_path / "acts.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "acts.safetensors"), *small("--checkpoint-every", "7", "--out", str(out))]) == 0
    assert "checkpoint_every: 7" in (out / "run.yaml").read_text()


def test_integer_activations_train_with_a_notice(tmp_path, capsys):
    ints = (planted() * 10).round().to(torch.int32)
    save_file({"acts": ints}, tmp_path / "ints.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "ints.safetensors"), *small("--out", str(out))]) == 0
    err = capsys.readouterr().err
    assert "notice" in err and "int32" in err and "float32" in err
    assert (out / "sae.safetensors").is_file()


def test_zoo_list_name_shows_that_model_only(capsys):
    assert main(["zoo", "list", "shapes-diffusion"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shapes-diffusion")
    assert main(["zoo", "list", "shapes-clipp"]) == 2
    assert "did you mean 'shapes-clip'" in capsys.readouterr().err


def test_zoo_actions_have_their_own_help(capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "train", "--help"])
    train_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["zoo", "list", "--help"])
    list_help = capsys.readouterr().out
    assert "--set" in train_help and "--set" not in list_help


def test_a_multi_process_launch_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Only `vlsae train` is data-parallel: under torchrun any other verb would do its whole job in every
    process into one output, so it is refused in one line (tests/vlsae/test_distributed.py runs train)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = one_line(capsys, ["synth", "--suite", "independent", "--archs", "topk", "--steps", "5",
                            "--out", str(tmp_path / "synth")])
    assert "WORLD_SIZE=2" in err and "vlsae synth" in err and not (tmp_path / "synth").exists()
    assert "does not run data-parallel" in one_line(capsys, ["info", str(tmp_path)])
    # train joins torchrun's process group, and says so when the launch is not torchrun's
    err = one_line(capsys, ["train", "--synthetic", "hierarchical", "--steps", "5", "--out", str(tmp_path / "run")])
    assert "MASTER_ADDR" in err and not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "--synthetic", "hierarchical", "--steps", "5", "--latents", "16", "--k", "2", "--quiet",
                 "--set", "data.n_train=500", "--set", "data.n_test=100", "--out", str(tmp_path / "run")]) == 0
