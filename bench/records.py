"""Benchmark records: one figure of ours beside the peer it was measured against, written as JSON.

Every record carries ``ratio``, how many times better ours is than the peer (> 1 means ours is better,
whatever the direction of the unit), and ``target``, the ratio the issue asks for (None for figures that
are only informative). ``machine`` says where the figures were taken.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent

RESULTS = Path(__file__).resolve().parent / "results"
#: Set to 1 (``make bench-... RECORD=1``, ``make load RECORD=1``) to replace the tracked files in ``RESULTS``;
#: otherwise a run writes under ``RESULTS / "local"`` (ignored by git), so trying a benchmark changes nothing
#: that is committed.
RECORD_ENV = "GUARDMESH_BENCH_RECORD"


def results_path(name: str) -> Path:
    """Where this run writes result file ``name``: ``bench/results/<name>`` when recording, else
    ``bench/results/local/<name>``."""
    recording = os.environ.get(RECORD_ENV, "") not in ("", "0")
    folder = RESULTS if recording else RESULTS / "local"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def say_where(path: Path) -> None:
    """Print where results went, and how to record them when they did not replace the tracked file."""
    if path.parent == RESULTS:
        print(f"wrote {path} (recorded)")
    else:
        print(f"wrote {path}; not recorded: {RECORD_ENV}=1 (make ... RECORD=1) replaces {RESULTS / path.name}")


@cache
def machine() -> str:
    """Platform, CPU count, CPU model and Python version, in one short line."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}"


def record(
    name: str,
    unit: str,
    ours: float,
    peer: str,
    peer_value: float | None,
    target: float | None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """One record; ``ratio`` is ours/peer when higher is better, peer/ours when lower is better."""
    ratio: float | None = None
    if peer_value is not None:
        num, den = (ours, peer_value) if higher_is_better else (peer_value, ours)
        if den:
            ratio = num / den  # a zero denominator leaves it None: JSON has no infinity
    return {
        "name": name,
        "unit": unit,
        "ours": ours,
        "peer": peer,
        "peer_value": peer_value,
        "ratio": ratio,
        "target": target,
        "machine": machine(),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def write_records(service: str, records: list[dict[str, Any]]) -> Path:
    """Write ``<service>.json`` (see :func:`results_path`) and print the records as a table; return the path."""
    path = results_path(f"{service}.json")
    path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    table = Table(title=f"{service} benchmark ({machine()})")
    for col in ("name", "unit", "ours", "peer", "peer value", "ratio", "target", "met"):
        table.add_column(col, overflow="fold", justify="right" if col in ("ours", "peer value", "ratio") else "left")
    for r in records:
        met = "-"
        if r["target"] is not None and r["ratio"] is not None:
            met = "yes" if r["ratio"] >= r["target"] else "NO"
        table.add_row(
            r["name"],
            r["unit"],
            _fmt(r["ours"]),
            r["peer"],
            _fmt(r["peer_value"]),
            _fmt(r["ratio"]),
            _fmt(r["target"]),
            met,
        )
    Console(width=200).print(table)
    say_where(path)
    return path


def best_of(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best wall time (s) of each function; the functions run interleaved, round after round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
