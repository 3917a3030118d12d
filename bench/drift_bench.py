"""Scorer drift benchmark: ``drift_stats`` beside scipy + numpy per feature, measured in the same run.

``python -m bench.drift_bench`` prints the figures; ``run()`` returns them as records (dicts with ``name``,
``unit``, ``ours``, ``peer``, ``peer_value``, ``higher_is_better``, ``target``, plus ``ratio`` and
``machine``) and writes nothing.

The workload of the issue: 100 features, a 10,000-row live window against a 100,000-row reference, 1 % of the
values missing, 20 of the features small integers (heavy ties), a third of the features shifted.

* ours: ``drift_stats(reference, live)`` with the ``ReferenceWindow`` prepared beforehand, as the service
  holds it, and the rows in a ``LiveWindow``: PSI, KS statistic and p-value, missing rates, Cohen's d and the
  drift scores of all 100 features.
* peer: per feature, ``scipy.stats.ks_2samp(ref, live)`` (statistic and p-value; its ``auto`` method picks
  ``asymp`` at these sizes) plus a numpy PSI over the same decile bins (``np.searchsorted`` + ``np.bincount``,
  the same 0.5 pseudo-count per bin) and the missing rate. The peer is prepared beforehand too: the
  reference's present values per feature, its bin edges and proportions.

The figures must agree: KS statistic and PSI within 1e-6 on every feature (asserted). Every time is the best
of several runs, ours and the peer interleaved. Threads: torch uses its intra-op pool
(``torch.get_num_threads()``), scipy/numpy one thread. With CUDA present a second record times ours on the GPU
(synchronised) against the same CPU peer.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from scipy import stats

from bench.records import best_of, record
from services.scorer.drift import PSI_PSEUDO_COUNT, LiveWindow, ReferenceWindow, drift_stats

FEATURES = 100
REF_ROWS = 100_000
LIVE_ROWS = 10_000
TIED_FEATURES = 20
MISSING = 0.01
REPEATS = 7
TARGET = 5.0
TOLERANCE = 1e-6


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference and live rows x features, float64 with NaN for missing."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(REF_ROWS, FEATURES))
    live = rng.normal(size=(LIVE_ROWS, FEATURES))
    live[:, ::3] += rng.uniform(0.0, 1.0, size=len(range(0, FEATURES, 3)))
    ref[:, :TIED_FEATURES] = rng.integers(0, 8, size=(REF_ROWS, TIED_FEATURES))
    live[:, :TIED_FEATURES] = rng.integers(0, 9, size=(LIVE_ROWS, TIED_FEATURES))
    ref[rng.random(ref.shape) < MISSING] = np.nan
    live[rng.random(live.shape) < MISSING] = np.nan
    return ref, live


def smoothed(bin_of_value: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin proportions with ``PSI_PSEUDO_COUNT`` added to each of the ``n_bins`` bins."""
    counts = np.bincount(bin_of_value, minlength=n_bins)
    return (counts + PSI_PSEUDO_COUNT) / (len(bin_of_value) + PSI_PSEUDO_COUNT * n_bins)


class Peer:
    """scipy ks_2samp + numpy PSI, one feature at a time, with the reference prepared per feature."""

    def __init__(self, ref: np.ndarray, bins: int = 10) -> None:
        self.ref = [np.sort(col[~np.isnan(col)]) for col in ref.T]
        self.edges = [np.unique(np.quantile(col, np.arange(1, bins) / bins)) for col in self.ref]
        self.p_ref = [
            smoothed(np.searchsorted(e, col, side="right"), len(e) + 1)
            for col, e in zip(self.ref, self.edges, strict=True)
        ]

    def __call__(self, live_by_feature: np.ndarray) -> dict[str, np.ndarray]:
        """KS statistic, p-value, PSI and missing rate per feature; ``live_by_feature`` is features x rows."""
        d, p, psi, missing = (np.empty(len(self.ref)) for _ in range(4))
        for f, col in enumerate(live_by_feature):
            present = ~np.isnan(col)
            live = col[present]
            missing[f] = 1 - present.mean()
            result = stats.ks_2samp(self.ref[f], live)
            d[f], p[f] = result.statistic, result.pvalue
            edges = self.edges[f]
            p_live = smoothed(np.searchsorted(edges, live, side="right"), len(edges) + 1)
            psi[f] = np.sum((p_live - self.p_ref[f]) * np.log(p_live / self.p_ref[f]))
        return {"ks": d, "pvalue": p, "psi": psi, "missing": missing}


def bench_device(device: str, ref: np.ndarray, live: np.ndarray, peer: Peer) -> tuple[dict[str, Any], dict[str, Any]]:
    """One record (ours on ``device`` vs the CPU peer) and the informative figures measured beside it."""
    prep_start = time.perf_counter()
    reference = ReferenceWindow.from_rows(torch.from_numpy(ref).to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    prep_s = time.perf_counter() - prep_start
    window = LiveWindow(FEATURES, capacity=LIVE_ROWS, device=device)
    window.add(torch.from_numpy(live).to(device))
    live_by_feature = np.ascontiguousarray(live.T)

    def ours() -> None:
        drift_stats(reference, window)
        if device == "cuda":
            torch.cuda.synchronize()

    times = best_of({"ours": ours, "peer": lambda: peer(live_by_feature)}, REPEATS)

    report = drift_stats(reference, window)
    expected = peer(live_by_feature)
    ks_gap = float(np.max(np.abs(report.ks_statistic.cpu().numpy() - expected["ks"])))
    psi_gap = float(np.max(np.abs(report.psi.cpu().numpy() - expected["psi"])))
    missing_gap = float(np.max(np.abs(report.missing_live.cpu().numpy() - expected["missing"])))
    assert ks_gap <= TOLERANCE, f"KS statistic differs from scipy by {ks_gap:.3g}"
    assert psi_gap <= TOLERANCE, f"PSI differs from numpy by {psi_gap:.3g}"
    assert missing_gap <= TOLERANCE, f"missing rate differs by {missing_gap:.3g}"
    pvalue_gap = float(np.max(np.abs(report.ks_pvalue.cpu().numpy() - expected["pvalue"])))

    where = "CPU" if device == "cpu" else torch.cuda.get_device_name()
    rec = record(
        f"drift stats, {FEATURES} features, {LIVE_ROWS:,} live vs {REF_ROWS:,} reference rows (ours on {where})",
        "ms",
        times["ours"] * 1e3,
        "scipy.stats.ks_2samp + numpy PSI + missing rate, per feature (CPU)",
        times["peer"] * 1e3,
        TARGET,
        higher_is_better=False,
    )
    rec["higher_is_better"] = False  # a time: lower is better (``record`` keeps the direction only in ratio)
    info = {
        "device": where,
        "reference_prep_ms": prep_s * 1e3,
        "ks_max_abs_diff": ks_gap,
        "psi_max_abs_diff": psi_gap,
        "pvalue_max_abs_diff": pvalue_gap,
        "score": report.score,
    }
    return rec, info


def run() -> list[dict[str, Any]]:
    """All records of this benchmark (nothing is written); values are checked against the peer."""
    records, _ = run_with_details()
    return records


def run_with_details() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records and, per record, the informative figures (prep time, value gaps) measured beside them."""
    ref, live = make_data()
    peer = Peer(ref)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = [bench_device(device, ref, live, peer) for device in devices]
    return [rec for rec, _ in pairs], [info for _, info in pairs]


def main() -> None:
    print(f"drift: torch threads {torch.get_num_threads()} ({os.cpu_count()} CPUs); scipy/numpy 1 thread")
    records, details = run_with_details()
    for r, info in zip(records, details, strict=True):
        ratio = r["peer_value"] / r["ours"]
        verdict = f"  (target >= {r['target']:.0f}x: {'met' if ratio >= r['target'] else 'MISSED'})"
        print(r["name"])
        print(f"    ours {r['ours']:9.2f} {r['unit']}   peer {r['peer_value']:9.2f} {r['unit']}   ({r['peer']})")
        print(f"    ratio {ratio:.2f}x{verdict}")
        print(
            f"    max |diff| vs peer: KS {info['ks_max_abs_diff']:.2g}, PSI {info['psi_max_abs_diff']:.2g};"
            f" p-value (Kolmogorov limit vs scipy kstwo) {info['pvalue_max_abs_diff']:.2g};"
            f" reference prepared once in {info['reference_prep_ms']:.0f} ms; model score {info['score']:.3f}"
        )


if __name__ == "__main__":
    main()
