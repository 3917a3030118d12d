"""A PyTorch training step through the parameter server, beside the same step with a local optimizer.

``python -m bench.ps_trainer [--hidden 1024] [--layers 4] [--steps 30]``

An MLP (``--layers`` linear layers of ``--hidden`` units, about hidden^2 x layers float32 parameters) on the
device torch finds (CUDA when present, else the CPU) takes SGD steps on a fixed random batch three ways:

* local: ``torch.optim.SGD`` on the device, no parameter server (the peer);
* PS, two calls: ``ParamServerClient.train_step`` (Pull into the module, forward, backward, Push);
* PS, one call: ``train_step(fused=True)`` (forward, backward, PushPull whose answer loads the module);
  on CUDA also with ``pinned = False`` (copies through pageable memory instead of page-locked buffers).

The server is a real ``python -m services.paramserver`` process (1 shard, SGD, ASYNC). Each PS step moves the
parameters both ways (and, on CUDA, copies them between device and host). The figures are the median step
time after warm-up; the records (``bench/results/ps_trainer.json``) give each PS way against the local step.
The PS ways start from the same parameters and must end on the same ones, bit for bit (one worker: a fused
step computes on exactly what a pull would have given it); the run fails otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bench.processes import service_process
from bench.records import record, write_records
from guardmesh.config import load_config
from guardmesh.sdk.paramserver import ParamServerClient, asynchronous, sgd

LR = 1e-3
WARMUP = 3


def make_model(hidden: int, layers: int, device: torch.device) -> torch.nn.Module:
    """The MLP, initialised from a fixed seed."""
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers - 1):
        blocks += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    blocks.append(torch.nn.Linear(hidden, hidden))
    return torch.nn.Sequential(*blocks).to(device)


def timed(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> list[float]:
    """Seconds per step after ``WARMUP`` untimed ones."""
    for _ in range(WARMUP):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three ways, print and record them; return the exit code."""
    ap = argparse.ArgumentParser(prog="python -m bench.ps_trainer", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.hidden, generator=gen).to(device)
    y = torch.randn(args.batch, args.hidden, generator=gen).to(device)
    loss_fn = torch.nn.MSELoss()
    n_params = sum(p.numel() for p in make_model(args.hidden, args.layers, torch.device("cpu")).parameters())
    what = (
        f"{args.layers}-layer MLP, {n_params / 1e6:.1f} M float32 parameters, batch {args.batch}, on "
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}"
    )
    print(f"{what}; median of {args.steps} steps after {WARMUP} warm-up", flush=True)

    local = make_model(args.hidden, args.layers, device)
    opt = torch.optim.SGD(local.parameters(), lr=LR)

    def local_step() -> None:
        opt.zero_grad()
        loss_fn(local(x), y).backward()
        opt.step()

    results = {"local": timed(local_step, args.steps, sync)}
    finals: dict[str, np.ndarray] = {}
    config = load_config(env={}).with_overrides({"grpc.max_message_mib": 64})
    # (name, fused, page-locked staging); on CUDA the fused step also runs with pageable copies, for the
    # difference the page-locked buffers make in the same run
    ways = [("two calls", False, True), ("fused", True, True)]
    if device.type == "cuda":
        ways.append(("fused, pageable", True, False))
    with service_process("paramserver", {"GUARDMESH__GRPC__MAX_MESSAGE_MIB": "64"}) as address:
        for i, (name, fused, pinned) in enumerate(ways):
            model = make_model(args.hidden, args.layers, device)
            ps = ParamServerClient.connect(f"mlp-{i}", config=config, addresses=[address])
            ps.pinned = pinned
            ps.create_from_module(model, sgd(LR), asynchronous())

            def compute(model: torch.nn.Module = model) -> float:
                loss = loss_fn(model(x), y)
                loss.backward()
                return 0.0

            def ps_step(model: torch.nn.Module = model, ps: ParamServerClient = ps, fused: bool = fused) -> None:
                ps.train_step(model, compute, fused=fused)

            results[name] = timed(ps_step, args.steps, sync)
            finals[name] = ps.pull().tensors["0.weight"].copy()
            ps.close()
    if any(not np.array_equal(finals[name], finals["two calls"]) for name, _, _ in ways):
        raise RuntimeError("the ways of training ended on different parameters")

    median = {k: statistics.median(v) for k, v in results.items()}
    for k, v in median.items():
        print(f"  {k:<16} {v * 1e3:9.2f} ms/step")
    moved = 2 * 4 * n_params
    records = [
        record(
            f"training step through the PS ({how}) vs a local torch.optim.SGD step: {what}, {moved >> 20} MiB moved",
            "ms",
            median[key] * 1e3,
            f"torch.optim.SGD on {device.type}, no parameter server (median)",
            median["local"] * 1e3,
            None,
            higher_is_better=False,
        )
        for key, how in (
            ("two calls", "Pull + Push"),
            ("fused", "PushPull, train_step(fused=True)"),
            ("fused, pageable", "PushPull, copies to and from the GPU through pageable memory"),
        )
        if key in median
    ]
    write_records("ps_trainer", records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
