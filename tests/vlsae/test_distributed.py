"""Data-parallel `vlsae train` under torchrun (CPU, gloo, 2 ranks): the same SAE as one process, rank 0 alone
writes, resume after a kill under 2 ranks and under 1, state identical on every rank, refusals in one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.synthetic.generators import generate
from evals.synthetic.score import decoder_directions, score_sae
from vlsae.checkpoint import load_sae
from vlsae.cli import main
from vlsae.training.data import TensorSource
from vlsae.parts import slice_rows
from vlsae.training.distributed import Replicas
from tests.torchrun import torchrun, torchrun_env

SUITE = {"n_features": 32, "d": 32, "expected_l0": 2}
N_TRAIN, N_TEST = 6000, 1000
STEPS = 300
TIMEOUT = 150


env = torchrun_env


def train_args(out: Path, *extra: str) -> list[str]:
    return ["-m", "vlsae", "train", "--synthetic", "independent", "--set", f"data.options={json.dumps(SUITE)}",
            "--set", f"data.n_train={N_TRAIN}", "--set", f"data.n_test={N_TEST}", "--latents", "48", "--k", "3",
            "--steps", str(STEPS), "--batch-size", "256", "--quiet", "--out", str(out),
            "--set", "train.init_rows=2000", "--set", "train.eval_rows=1000", *extra]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def summary(out: Path) -> dict:
    return json.loads((out / "training.json").read_text())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same run in one process and in two ranks (each in its own empty working folder)."""
    root = tmp_path_factory.mktemp("dp")
    (root / "one").mkdir()
    (root / "two").mkdir()
    one = run([sys.executable, *train_args(root / "one" / "run")], cwd=root / "one")
    two = run(torchrun(2, *train_args(root / "two" / "run")), cwd=root / "two")
    return {"one": root / "one" / "run", "two": root / "two" / "run", "stdout_two": two.stdout, "one_out": one.stdout}


def test_two_ranks_train_the_same_sae_as_one_process(pair):
    """Same global batches, seed and init: FVU within 2 %, the same planted features recovered, the same decoder."""
    a, b = summary(pair["one"])["summary"], summary(pair["two"])["summary"]
    assert a["tokens"] == b["tokens"] == STEPS * 256 and a["input_scale"] == b["input_scale"]
    assert abs(a["fvu"] - b["fvu"]) <= 0.02 * a["fvu"], (a["fvu"], b["fvu"])
    # TopK's loss is a mean over rows over the global batch's variance: equal up to float order
    assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-3)
    data = generate("independent", seed=0, n_train=N_TRAIN, n_test=N_TEST, **SUITE)
    sae_a, sae_b = load_sae(pair["one"]), load_sae(pair["two"])
    score_a, score_b = score_sae(sae_a, data), score_sae(sae_b, data)
    assert score_a["frr_0.9"] >= 0.8, score_a  # the run recovers the planted features
    assert abs(score_a["frr_0.9"] - score_b["frr_0.9"]) <= 1 / SUITE["n_features"] + 1e-9, (score_a, score_b)
    assert abs(score_a["mmcs"] - score_b["mmcs"]) <= 0.01
    da = torch.nn.functional.normalize(decoder_directions(sae_a), dim=1)
    db = torch.nn.functional.normalize(decoder_directions(sae_b), dim=1)
    assert float((da * db).sum(1).min()) > 0.99  # latent i of one run is latent i of the other


def test_rank_zero_alone_writes_and_records_the_world_size(pair):
    record = summary(pair["two"])
    assert record["world_size"] == 2 and record["summary"]["world_size"] == 2
    assert summary(pair["one"])["world_size"] == 1
    out = pair["two"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # nothing written beside the run folder
    assert {p.name for p in out.iterdir()} == {"run.yaml", "training.json", "sae.safetensors", "config.json",
                                               "metrics.jsonl", "tensorboard"}
    assert len(list((out / "tensorboard").rglob("events.*"))) == 1  # one writer
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each logged step once
    assert pair["stdout_two"].count("saved topk SAE to") == 1  # one rank prints


def _start_and_kill(out: Path, cwd: Path) -> None:
    """Start the 2-rank run, SIGTERM torchrun (it stops its workers) once the first checkpoint is written."""
    proc = subprocess.Popen(torchrun(2, *train_args(out, "--checkpoint-every", "40")), cwd=cwd, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[str] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint" / "state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # torchrun stops them; make sure, by their own ids
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not (out / "training.json").exists(), "the run finished before it was killed"


def test_a_killed_run_resumes_under_two_ranks_and_under_one_process(pair, tmp_path):
    out = tmp_path / "run"
    _start_and_kill(out, tmp_path)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < STEPS and state["world_size"] == 2
    single = tmp_path / "single"
    shutil.copytree(out, single)
    run(torchrun(2, "-m", "vlsae", "train", "--out", str(out), "--resume", "--quiet"), cwd=tmp_path)
    run([sys.executable, "-m", "vlsae", "train", "--out", str(single), "--resume", "--quiet"], cwd=tmp_path)
    uninterrupted = summary(pair["two"])["summary"]
    for folder, world in ((out, 2), (single, 1)):
        record = summary(folder)
        assert record["summary"]["steps"] == STEPS and record["summary"]["tokens"] == STEPS * 256
        assert record["world_size"] == world and not (folder / "checkpoint").exists()
        assert abs(record["summary"]["fvu"] - uninterrupted["fvu"]) <= 0.02 * uninterrupted["fvu"]
    # the same number of ranks continues the uninterrupted run exactly
    assert summary(out)["summary"]["fvu"] == pytest.approx(uninterrupted["fvu"], rel=1e-5)


STATE_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from vlsae.saes import create_sae
    from vlsae.training import TensorSource, TrainConfig, train
    from vlsae.training.distributed import end_process
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3000, 32, generator=g) < 0.1).float() @ torch.randn(32, 16, generator=g)
    for arch, extra in [("batchtopk", {"k": 4}), ("fc", {"k": 4}), ("gba", {"interval": 5}),
                        ("mc", {"k": 4, "aux": "zipf"})]:
        torch.manual_seed(1)
        sae = create_sae(arch, {"d_in": 16, "n_latents": 48, **extra})
        train(sae, TensorSource(x), TrainConfig(steps=32, batch_size=128, progress=False, tensorboard=False,
                                                init_rows=500, eval_rows=500, dead_tokens=256))
        mine = {k: v.float().contiguous() for k, v in sae.state_dict().items()}
        for name, t in mine.items():
            if parallel:
                other = t.clone()
                dist.broadcast(other, src=0)
                assert torch.equal(torch.nan_to_num(other), torch.nan_to_num(t)), (arch, name)
        if not parallel or dist.get_rank() == 0:
            save_file(mine, os.path.join(sys.argv[1], arch + ".safetensors"))
            print("same state", arch, sorted(n for n, _ in sae.named_buffers()))
    if parallel:
        dist.barrier()
    end_process(0)  # leaves the group and ends a rank the way `vlsae train` does
""")


def test_every_rank_ends_with_the_same_weights_and_buffers(tmp_path):
    """Buffers updated from batch statistics (thresholds, densities, GBA's windows and biases) stay in step
    on every rank; GBA (per-row code, window counts summed over ranks) ends as in one process."""
    script = tmp_path / "state.py"
    script.write_text(STATE_SCRIPT)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    done = run(torchrun(2, str(script), str(tmp_path / "two")), cwd=tmp_path)
    for arch in ("batchtopk", "fc", "gba", "mc"):
        assert f"same state {arch}" in done.stdout, done.stdout
    run([sys.executable, str(script), str(tmp_path / "one")], cwd=tmp_path)
    one, two = load_file(tmp_path / "one" / "gba.safetensors"), load_file(tmp_path / "two" / "gba.safetensors")
    assert float(two["window_rows"]) == 2 * 128 and bool(one["b_enc"].any())  # mid-window, biases adapted
    assert torch.equal(one["window_rows"], two["window_rows"]) and torch.equal(one["window_fires"], two["window_fires"])
    for name in ("W_dec", "b_dec", "b_enc", "scale"):
        assert torch.allclose(one[name], two[name], atol=1e-4), name


def test_other_verbs_still_refuse_a_multi_process_launch(tmp_path):
    done = subprocess.run(torchrun(2, "-m", "vlsae", "synth", "--suite", "independent", "--archs", "topk",
                                   "--steps", "5", "--out", str(tmp_path / "synth")),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0 and not (tmp_path / "synth").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("vlsae synth: error:")]
    assert len(lines) == 1 and "does not run data-parallel (only `vlsae train`" in lines[0], done.stderr[-3000:]


@pytest.mark.parametrize("argv, words", [
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--nproc", "2", "--batch-size", "255"], "does not split over 2 processes"),
    (["--nproc", "2", "--arch", "itda"], "does not run data-parallel"),
])
def test_nproc_bad_input_is_one_line(tmp_path, capsys, argv, words):
    assert main(["train", "--synthetic", "independent", "--latents", "16", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and not (tmp_path / "run").exists(), err


def test_nproc_launches_torchrun_and_its_help_states_the_default(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default 1: this process alone)" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "run"
    done = run([sys.executable, "-m", "vlsae", "train", "--nproc=2", "--synthetic", "independent", "--latents", "16",
                "--k", "2", "--steps", "20", "--batch-size", "64", "--quiet", "--set", "data.n_train=800",
                "--set", "data.n_test=200", "--out", str(out)], cwd=tmp_path)
    assert done.stdout.count("saved topk SAE to") == 1
    assert summary(out)["world_size"] == 2


def test_each_rank_reads_its_own_slice_of_every_batch():
    """The ranks' slices of a global batch are disjoint and together are the batch, for a TensorSource (which
    indexes only its slice) and for any other source (read whole, then sliced)."""
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    source = TensorSource(x)

    class Plain:  # an ActivationSource that is not a TensorSource
        d_in = 3

        def __len__(self):
            return len(source)

        def batches(self, batch_size, seed, start=0):
            return source.batches(batch_size, seed=seed, start=start)

    for src in (source, Plain()):
        whole = source.batches(96, seed=3, start=5)
        parts = [Replicas(rank, 4).batches(src, 96, seed=3, start=5) for rank in range(4)]
        for _ in range(12):  # across an epoch boundary (10 batches per epoch)
            batch = next(whole)
            slices = [next(p) for p in parts]
            assert all(s.shape == (24, 3) for s in slices)
            assert torch.equal(torch.cat(slices), batch)
    paired = {"image": x, "text": -x}
    sliced = slice_rows(paired, 1, 2)
    assert torch.equal(sliced["image"], x[500:]) and torch.equal(sliced["text"], -x[500:])


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_that_cannot_reach_the_others_stops_in_one_line(tmp_path, rank):
    """A launch whose other process never starts: rank 0 waits for it to connect, rank 1 for a store nobody
    hosts; both stop after VLSAE_CONNECT_TIMEOUT with one line (exit 2), not a hang or a C++ trace."""
    from tests.torchrun import free_port

    launch = {**env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "VLSAE_CONNECT_TIMEOUT": "2"}
    for verb in (train_args(tmp_path / "run"), ["-m", "vlsae", "extract", "--model", "shapes-clip", "--data",
                                                "world/{000000..000001}.tar", "--out", str(tmp_path / "acts")]):
        if "extract" in verb:
            main(["world", "--n", "20", "--shard-size", "10", "--out", str(tmp_path / "world"), "--quiet"])
        start = time.monotonic()
        done = subprocess.run([sys.executable, *verb], cwd=tmp_path, env=launch, capture_output=True, text=True,
                              timeout=TIMEOUT)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert f"process {rank} of 2 waited 2 s" in lines[0] and "VLSAE_CONNECT_TIMEOUT" in lines[0]
        assert time.monotonic() - start < 60 and not (tmp_path / "run").exists() and not (tmp_path / "acts" / "parts").exists()
