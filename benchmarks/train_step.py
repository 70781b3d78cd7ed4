"""Tokens/s of one SAE training step (forward, backward, optimizer) per architecture.

    python benchmarks/train_step.py                       # d=512, 8192 latents, k=32, batch 4096
    python benchmarks/train_step.py --archs topk,vl --repeats 5

Columns: every registered vlsae architecture, a plain dense PyTorch TopK SAE
(nn.Linear encoder, dense topk mask, dense decoder matmul, autograd, Adam), and
EleutherAI sparsify's ``SparseCoder`` when it is installed (``pip install
eai-sparsify``), stepped with torch's Adam as sparsify's ``optimizer="adam"``
trainer path does and, for a kernel-only comparison, with fused Adam too.
All rows run in the same process on the same data, interleaved: after the
warm-up, each of ``--repeats`` rounds times one step of every implementation in
turn, and each row reports its median, so a busy or quiet phase of a shared
machine does not favour whichever row happened to run then.
On a CPU with bf16 matrix units (AMX or AVX512-BF16) each vlsae architecture is
timed twice: choosing the active latents in fp32 and in bf16
(``train.selection_dtype``, the trainer's default there); the values, loss and
gradients are fp32 in both.
The **floor** rows time what no TopK training step can avoid: the encoder matmul in the selection
dtype (bf16 on a CPU with bf16 units) and ``torch.topk`` over its output, no backward and no
optimizer: as written (a fresh output per call) and into a reused output (no allocation either).
The ``vs floor`` column divides every row's step time by the first.
Multimodal architectures (``vl*``) step on a batch of every modality, so their
tokens/s counts the rows of all modalities (image rows + text rows).
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

import dataclasses

from vlsae import create_sae, get_sae_class, list_archs
from vlsae.saes.base import TrainContext
from vlsae.training.trainer import cpu_has_bf16_matmul, resolve_selection_dtype


def time_steps(step: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def vlsae_step(arch: str, x: torch.Tensor | dict, d: int, n_latents: int, k: int, device: str,
               selection: str = "fp32") -> Callable[[], None]:
    kwargs = {"d_in": d, "n_latents": n_latents}
    if "k" in get_sae_class(arch).config_class.__dataclass_fields__:
        kwargs["k"] = k
    sae = create_sae(arch, **kwargs).to(device)
    sae.selection_dtype = resolve_selection_dtype(selection, torch.device(device))  # as the trainer sets it
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    ctx = TrainContext(step=100, progress=0.5)

    def step() -> None:
        out = sae.training_forward(x, ctx)
        optimizer.zero_grad(set_to_none=True)
        if torch.is_tensor(out.loss) and out.loss.requires_grad:  # itda learns without gradients
            out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return step


def default_modalities(arch: str) -> tuple[str, ...]:
    """Modalities a multimodal architecture trains on by default (empty for single-stream)."""
    for f in dataclasses.fields(get_sae_class(arch).config_class):
        if f.name == "modalities":
            if f.default is not dataclasses.MISSING:
                return tuple(f.default)
            if f.default_factory is not dataclasses.MISSING:
                return tuple(f.default_factory())
    return ()


def dense_topk_step(x: torch.Tensor, d: int, n_latents: int, k: int, device: str) -> Callable[[], None]:
    """The textbook implementation everything is compared with."""
    encoder = torch.nn.Linear(d, n_latents).to(device)
    decoder = torch.nn.Linear(n_latents, d).to(device)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=1e-4)

    def step() -> None:
        pre = torch.relu(encoder(x))
        values, indices = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, indices, values)
        recon = decoder(z)
        loss = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def floor_step(x: torch.Tensor, n_latents: int, k: int, dtype: torch.dtype, reuse: bool) -> Callable[[], None]:
    """The encoder matmul in ``dtype`` and a row-wise top-k of its output: a TopK step's unavoidable part."""
    left = x.to(dtype)
    weight = torch.randn(n_latents, x.shape[1], device=x.device).to(dtype)
    bias = torch.zeros(n_latents, device=x.device, dtype=dtype)
    out = torch.empty(x.shape[0], n_latents, device=x.device, dtype=dtype) if reuse else None

    def step() -> None:
        pre = torch.addmm(bias, left, weight.t(), out=out) if reuse else torch.addmm(bias, left, weight.t())
        pre.topk(k, dim=1, sorted=False)
    return step


def sparsify_step(x: torch.Tensor, d: int, n_latents: int, k: int, device: str, fused: bool,
                  cpu_bf16: bool = False) -> Callable[[], None] | None:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    if not str(device).startswith("cuda"):
        # sparsify picks its Triton decoder whenever triton imports (the CUDA torch
        # wheel ships it), which cannot run without a GPU; use its own eager path.
        import sparsify.sparse_coder
        import sparsify.utils
        sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
    coder = SparseCoder(d, SparseCoderConfig(num_latents=n_latents, k=k), device=device)
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            out = coder(x)
        optimizer.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        coder.set_decoder_norm_to_unit_norm()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(a for a in list_archs() if a not in ("mp",)) + ",mp",
                        help="comma-separated vlsae architectures")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--selection", default=None,
                        help="comma-separated train.selection_dtype values to time (fp32, bf16); default fp32, plus bf16 "
                             "on a CPU with bf16 matrix units")
    parser.add_argument("--no-baselines", action="store_true", help="skip the dense and sparsify rows")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d, device=args.device)
    rows: list[tuple[str, float, int]] = []  # name, seconds, input rows per step
    candidates: list[tuple[str, int, Callable[[], Callable[[], None] | None]]] = []
    selections = args.selection.split(",") if args.selection else (
        ["fp32", "bf16"] if args.device == "cpu" and cpu_has_bf16_matmul() else ["fp32"])
    for arch in [a for a in args.archs.split(",") if a]:
        if arch not in list_archs():
            raise SystemExit(f"unknown architecture '{arch}'; registered: {', '.join(list_archs())}")
        data: torch.Tensor | dict = x
        if default_modalities(arch):
            data = {m: torch.randn_like(x) for m in default_modalities(arch)}
        n_rows = args.batch * (len(data) if isinstance(data, dict) else 1)
        for sel in selections:
            label = f"vlsae {arch}" + (f" (select {sel})" if len(selections) > 1 else "")
            candidates.append((label, n_rows, lambda arch=arch, data=data, sel=sel:
                               vlsae_step(arch, data, args.d, args.latents, args.k, args.device, sel)))
    floor_dtype = torch.bfloat16 if "bf16" in selections else torch.float32
    floor_name = f"floor: {'bf16' if floor_dtype == torch.bfloat16 else 'fp32'} encoder matmul + torch.topk"
    candidates.insert(0, (floor_name, args.batch, lambda: floor_step(x, args.latents, args.k, floor_dtype, False)))
    candidates.insert(1, (floor_name + ", output reused", args.batch,
                          lambda: floor_step(x, args.latents, args.k, floor_dtype, True)))
    if not args.no_baselines:
        candidates.append(("dense PyTorch TopK", args.batch, lambda: dense_topk_step(x, args.d, args.latents, args.k, args.device)))
        candidates.append(("sparsify SparseCoder + Adam", args.batch, lambda: sparsify_step(x, args.d, args.latents, args.k, args.device, fused=False)))
        candidates.append(("sparsify SparseCoder + fused Adam", args.batch, lambda: sparsify_step(x, args.d, args.latents, args.k, args.device, fused=True)))
        if "bf16" in selections:  # the same bf16 units offered to sparsify, through CPU autocast
            candidates.append(("sparsify SparseCoder + Adam, CPU bf16 autocast", args.batch,
                               lambda: sparsify_step(x, args.d, args.latents, args.k, args.device, fused=False, cpu_bf16=True)))

    built: list[tuple[str, int, Callable[[], None]]] = []
    for name, n_rows, build in candidates:
        try:
            step = build()
            if step is None:
                print(f"skipping {name}: not installed")
                continue
            for _ in range(args.warmup):
                step()
        except Exception as exc:  # noqa: BLE001 - an architecture that needs more than a batch (a readout)
            print(f"skipping {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        built.append((name, n_rows, step))
    # Round-robin: every round times one step of each implementation, so a slow or fast phase
    # of a shared machine hits all rows alike; the median over rounds is reported.
    times: dict[str, list[float]] = {name: [] for name, _, _ in built}
    for _ in range(args.repeats):
        for name, _, step in built:
            times[name].append(time_steps(step, 0, 1))
    for name, n_rows, _ in built:
        seconds = sorted(times[name])[len(times[name]) // 2]
        rows.append((name, seconds, n_rows))
        print(f"{name:48s} {seconds * 1000:9.1f} ms/step {n_rows / seconds:12,.0f} tokens/s", flush=True)

    reference = next((n_rows / s for name, s, n_rows in rows if name == "sparsify SparseCoder + Adam"), None)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    table = Table(title=f"training step, d={args.d}, {args.latents} latents, k={args.k}, batch {args.batch} ({machine}, torch {torch.__version__})")
    table.add_column("implementation")
    table.add_column("rows/step", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs sparsify+Adam", justify="right")
    table.add_column("vs floor", justify="right")
    floor = rows[0][1]  # seconds per step of the first floor row
    for name, seconds, n_rows in rows:
        tokens_per_s = n_rows / seconds
        ratio = f"{tokens_per_s / reference:.2f}x" if reference else "-"
        versus_floor = f"{seconds * rows[0][2] / (floor * n_rows):.2f}x"  # per input row: vl* steps take two
        table.add_row(name, str(n_rows), f"{seconds * 1000:.1f}", f"{tokens_per_s:,.0f}", ratio, versus_floor)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
