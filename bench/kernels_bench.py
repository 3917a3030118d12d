"""Parameter-server hot path benchmark: native kernels beside their peers, measured in the same run.

``python -m bench.kernels_bench`` prints the figures; ``run()`` returns them as records (dicts with ``name``,
``unit``, ``ours``, ``peer``, ``peer_value``, ``higher_is_better``, ``target``) and writes nothing.

a) Fused aggregation (``native.aggregate.aggregate``) of K = 2, 4, 8 float32 buffers of 16 Mi elements
   - against numpy: ``np.copyto(out, b0)`` then ``np.add(out, bk, out=out)`` for the other K-1 buffers.
     Both sides use weights of 1.0, so numpy needs no scaling pass (the kernel still multiplies by each
     weight); the kernel also counts the NaN/Inf inputs and computes the squared norm, numpy does not.
   - against the memory-bandwidth bound: the bytes the kernel must move ((K reads + 1 write) x 64 MiB)
     at the bandwidth ``np.copyto`` reaches on a 64 MiB copy (read + write bytes over time; the better of
     one thread and one thread per CPU on contiguous slices) in the same run. A ratio near 1 means the
     kernel runs at the copy bandwidth of the machine.
b) Fused Adam step (``native.optim.adam_step``) on 16 Mi float32 parameters against
   ``torch.optim.Adam`` with ``foreach=True`` and with ``fused=True`` (where this torch has it), timing
   only ``step()`` after warm-up steps.

Every figure is the best of several runs, ours and the peer interleaved so that both see the same
machine: other processes on a small machine skew single runs. Threads: the kernels use OpenMP
(``OMP_NUM_THREADS`` caps them), torch its intra-op pool (``torch.get_num_threads()``); numpy is single
threaded.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from native.aggregate import aggregate
from native.optim import adam_step

from bench.records import best_of

N = 16 * 1024 * 1024
KS = (2, 4, 8)
REPEATS = 15
ADAM_REPEATS = 11
AGG_TARGET_K8 = 1.8
ADAM_TARGET = 1.0
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8


def rec(name: str, unit: str, ours: float, peer: str, peer_value: float | None, target: float | None) -> dict[str, Any]:
    """One record; every figure here is a time in ms, so lower is better."""
    return {
        "name": name,
        "unit": unit,
        "ours": ours,
        "peer": peer,
        "peer_value": peer_value,
        "higher_is_better": False,
        "target": target,
    }


def bench_aggregate() -> list[dict[str, Any]]:
    """Fused aggregation vs numpy and vs the copy-bandwidth bound, K = 2, 4, 8."""
    rng = np.random.default_rng(0)
    buffers = [rng.standard_normal(N, dtype=np.float32) for _ in range(max(KS))]
    out = np.empty(N, dtype=np.float32)
    src = buffers[0]
    workers = os.cpu_count() or 1
    slices = [slice(i * N // workers, (i + 1) * N // workers) for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:

        def copy_threads() -> None:  # np.copyto releases the GIL: one contiguous slice per CPU
            list(pool.map(lambda s: np.copyto(out[s], src[s]), slices))

        copy_s = min(best_of({"1": lambda: np.copyto(out, src), "n": copy_threads}, REPEATS).values())
    bandwidth = 2 * N * 4 / copy_s  # bytes/s, read + write: the better of 1 thread and one per CPU
    records: list[dict[str, Any]] = []
    for k in KS:
        bufs = buffers[:k]
        weights = np.ones(k)

        def ours(bufs: list[np.ndarray] = bufs, weights: np.ndarray = weights) -> None:
            bad, _ = aggregate(out, bufs, weights)
            assert bad == 0

        def numpy_sum(bufs: list[np.ndarray] = bufs) -> None:
            np.copyto(out, bufs[0])
            for b in bufs[1:]:
                np.add(out, b, out=out)

        t = best_of({"ours": ours, "numpy": numpy_sum}, REPEATS)
        bound_s = (k + 1) * N * 4 / bandwidth
        label = f"aggregate K={k} x 16Mi float32 (fused sum + NaN/Inf count + norm)"
        records.append(
            rec(
                f"{label} vs numpy",
                "ms",
                t["ours"] * 1e3,
                f"numpy np.copyto + {k - 1} x np.add (weights 1.0, no scaling pass, no count/norm)",
                t["numpy"] * 1e3,
                AGG_TARGET_K8 if k == 8 else None,
            )
        )
        records.append(
            rec(
                f"{label} vs memory bandwidth",
                "ms",
                t["ours"] * 1e3,
                f"memory-bandwidth bound: {k + 1} x 64 MiB at np.copyto's {bandwidth / 1e9:.1f} GB/s (read+write)",
                bound_s * 1e3,
                None,
            )
        )
    return records


def bench_adam() -> list[dict[str, Any]]:
    """Fused Adam step vs torch.optim.Adam (foreach=True, fused=True where available), 16 Mi parameters."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(N, generator=gen)
    grad = torch.randn(N, generator=gen) * 1e-2
    param = p0.numpy().copy()
    g = grad.numpy()
    exp_avg = np.zeros(N, dtype=np.float32)
    exp_avg_sq = np.zeros(N, dtype=np.float32)
    step = [0]

    def ours() -> None:
        step[0] += 1
        adam_step(param, g, exp_avg, exp_avg_sq, step[0], LR, BETA1, BETA2, EPS, 0.0, False)

    fns: dict[str, Callable[[], Any]] = {"ours": ours}
    for variant in ("foreach", "fused"):
        tp = torch.nn.Parameter(p0.clone())
        tp.grad = grad.clone()
        try:
            opt = torch.optim.Adam([tp], lr=LR, betas=(BETA1, BETA2), eps=EPS, **{variant: True})
            opt.step()
        except (RuntimeError, TypeError, ValueError):  # an older torch without this variant on CPU
            continue
        fns[variant] = opt.step
    t = best_of(fns, ADAM_REPEATS, warmup=2)
    peers = {k: v for k, v in t.items() if k != "ours"}
    fastest = min(peers, key=peers.__getitem__)
    return [
        rec(
            f"adam step, 16Mi float32 params (fused native kernel) vs torch {variant}",
            "ms",
            t["ours"] * 1e3,
            f"torch {torch.__version__} optim.Adam({variant}=True), {torch.get_num_threads()} threads",
            secs * 1e3,
            ADAM_TARGET if variant == fastest else None,
        )
        for variant, secs in peers.items()
    ]


def run() -> list[dict[str, Any]]:
    """All records of this benchmark (nothing is written)."""
    records = bench_aggregate()
    gc.collect()  # the aggregation buffers (576 MiB) go before the Adam arrays come
    return records + bench_adam()


def main() -> None:
    threads = os.environ.get("OMP_NUM_THREADS", f"default ({os.cpu_count()} CPUs)")
    print(f"native kernels: OMP_NUM_THREADS={threads}; torch threads {torch.get_num_threads()}; numpy 1 thread")
    for r in run():
        ratio = r["peer_value"] / r["ours"] if r["peer_value"] else float("nan")
        verdict = ""
        if r["target"] is not None:
            verdict = f"  (target >= {r['target']:.2f}x: {'met' if ratio >= r['target'] else 'MISSED'})"
        print(r["name"])
        print(f"    ours {r['ours']:8.2f} {r['unit']}   {r['peer']}: {r['peer_value']:8.2f} {r['unit']}")
        print(f"    ratio {ratio:.2f}x{verdict}")


if __name__ == "__main__":
    main()
