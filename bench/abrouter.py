"""abrouter benchmark, each figure beside its peer measured in the same run.

a) Assignments/s in process: the router's batch path (``assign_batch``: the Cython hash + arm choice over
   1M ids, two threads) against the ``growthbook`` SDK on the same ids: its ``gbhash`` + ``chooseVariation``
   loop (the SDK's own hash path) and ``GrowthBook.run`` (what an app calls per user). Target >= 10x.
b) Assign over gRPC from 1 and 4 client processes (each one call at a time, 50/50 experiment, no exposure
   log, then with exposure logging): throughput and p50/p99 latency, against a bare grpcio echo server
   (generic handler on raw bytes, its own process) answering the same serialized request bytes — the
   floor of one gRPC round trip on this machine.
c) Full audit (SRM, bucket uniformity, id-structure tests, covariate balance over 5 covariates overall and
   by day/week/season/device) of 1M logged exposures: target < 1 s. Peer: the textbook scipy route on the
   same arrays (``scipy.stats.chisquare``, ``chi2_contingency`` on ``np.unique`` cross tables, ``ks_2samp``
   for every covariate, overall only).
d) The sequential guardrail (``services.abrouter.guardrails``, the served function) over 30 looks at a growing
   sample of a conversion metric (30 % in control): the share of runs in which any look rolls back when the arm
   is exactly at the bound (the least favourable null; target <= alpha = 0.05, with its Clopper-Pearson 95 %
   upper bound) and when there is no difference, and the power at a true 5 % drop against a 1 % bound. Peer:
   the fixed-sample guardrail it replaced (one-sided Welch test at alpha plus "change beyond the bound", checked
   at every look), on the same simulated runs.

e) Replicas on a shared store (issue #16): logged Assign throughput (4 client processes) of one router on
   PostgreSQL vs the same on SQLite (target ratio >= 0.8; the two routers driven in turn, ``--rounds`` times
   each, medians); config propagation between two replicas on
   PostgreSQL, UpdateExperiment on one until the other serves the new version, p99 (target <= 1 s).
f) The exposure table (issue #20): export throughput (exposures/s written to Parquet, in process, from a
   SQLite store) vs the logging throughput of e); the full audit of ``--exposures`` generated exposures read
   from the Parquet table with DuckDB vs the same audit on in-memory columns, and vs plain DuckDB SQL for the
   SRM counts alone (peak RSS of the process reported).

g) The full audit over the Parquet table at warehouse scale (10 M and 100 M generated exposures) against
   straightforward DuckDB SQL and pandas + scipy: see ``bench.warehouse_audit``.
h) Assign p99 while a table audit runs (issue #20; target <= 1.5x): one abrouter process whose exported table
   holds ``--audit-exposures`` generated exposures (``bench.exposure_table``), Assign driven from
   ``AUDIT_LOAD_CLIENTS`` client processes; p99 with ``AuditExperiment(from_table=true)`` looping over that
   table the whole window (ours) against p99 without (peer), windows interleaved ``--rounds`` times (the order
   alternating), medians.
i) Router memory and restart at ``--bounded-units`` exposed units (issue #20 item 3; SQLite store of that many
   units' first exposures, a tenth exposed again, and one observation per 4 units): resident memory the restored
   router holds per exposed unit and the restart time, with ``abrouter.exposures_in_memory = false`` (ours:
   counters, bounded caches, SQL aggregates at restart) against the default mode (peer: per-unit columns, the log
   replayed), each restored in a fresh process of its own, same run.
j) Logged Assign/s and p99 over gRPC in bounded mode vs the default mode (issue #20 item 3), 4 client processes,
   every unit new, one router of each mode on SQLite and on PostgreSQL, driven in turn ``--rounds`` times, medians.
k) Assign p99 beside RecordMetrics of units long evicted (bounded mode on PostgreSQL, the usual case at warehouse
   scale: ``RECORD_SEEDED`` units exposed, a ``RECORD_CACHE_UNITS``-unit cache): logged Assign from 2 client
   processes with 2 more processes calling RecordMetrics (``RECORD_BATCH`` observations of random seeded units)
   against the same Assign drive alone, ``--rounds`` times, medians; with ``--before DIR`` (a copy of the
   repository before a change) the same router from that tree beside it, the order alternating: the p99 beside
   RecordMetrics and RecordMetrics calls/s against that code's.

    python -m bench.abrouter [--seconds 5] [--ids 1000000] [--runs 2000] [--exposures 10000000]
        [--warehouse-sizes 10000000,100000000] [--audit-exposures 5000000] [--parts abcdefghij] [--rounds 3]
        [--bounded-units 1000000] [--before DIR]
        [--note "loaded machine"]

With ``--parts`` naming fewer parts, the records of the other parts are kept from the existing results file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from growthbook import Experiment as GBExperiment
from growthbook import GrowthBook
from growthbook.core import chooseVariation, gbhash, getBucketRanges
from scipy import stats

from bench.processes import ECHO_SERVICE, echo_process, service_process
from bench.records import RESULTS, best_of, record, write_records
from bench.warehouse_audit import warehouse_bench
from guardmesh.stats import Moments
from services.abrouter.assignment import assign_batch
from services.abrouter.audit import full_audit
from services.abrouter.columns import CategoricalColumn, ExposureColumns
from services.abrouter.experiments import ArmSpec, Experiment, ExperimentSpec, ExperimentState
from services.abrouter.guardrails import Guardrail, evaluate_guardrail

SPEC = ExperimentSpec(key="bench-exp", arms=(ArmSpec("control", 0.5), ArmSpec("treatment", 0.5)))
#: Part k: the bounded router's unit cache, the units exposed before the windows, observations per RecordMetrics.
RECORD_CACHE_UNITS = 200
RECORD_SEEDED = 4000
RECORD_BATCH = 20


def in_process(n_ids: int) -> list[dict[str, Any]]:
    """a) batch assignment vs the growthbook SDK."""
    exp = Experiment(SPEC, 1, ExperimentState.RUNNING, SPEC.weights, 0.0, 0.0)
    ids = [f"user-{i}" for i in range(n_ids)]
    peer_ids = ids[: max(n_ids // 10, 1000)]
    ranges = getBucketRanges(2, 1.0, [0.5, 0.5])
    gb_exp = GBExperiment(key="bench-exp", variations=[0, 1], weights=[0.5, 0.5], hashVersion=2)
    gb = GrowthBook(attributes={"id": ""})

    def ours() -> None:
        assign_batch(exp, ids, 1.0)

    def sdk_hash() -> None:
        for uid in peer_ids:
            chooseVariation(gbhash("bench-exp", uid, 2), ranges)  # type: ignore[arg-type]

    def sdk_run() -> None:
        for uid in peer_ids[: len(peer_ids) // 4]:
            gb.set_attributes({"id": uid})
            gb.run(gb_exp)

    arms, _ = assign_batch(exp, peer_ids[:2000], 1.0)
    expected = [chooseVariation(gbhash("bench-exp", u, 2), ranges) for u in peer_ids[:2000]]  # type: ignore[arg-type]
    assert arms.tolist() == expected, "native assignment disagrees with the SDK"
    best = best_of({"ours": ours, "sdk_hash": sdk_hash, "sdk_run": sdk_run}, repeats=3)
    ours_rate = n_ids / best["ours"]
    hash_rate = len(peer_ids) / best["sdk_hash"]
    run_rate = (len(peer_ids) // 4) / best["sdk_run"]
    print(f"assign: ours {ours_rate:,.0f}/s, gbhash {hash_rate:,.0f}/s, GrowthBook.run {run_rate:,.0f}/s")
    return [
        record(
            "assign_batch_vs_gbhash", "assignments/s", ours_rate, "growthbook gbhash+chooseVariation", hash_rate, 10.0
        ),
        record("assign_batch_vs_run", "assignments/s", ours_rate, "growthbook GrowthBook.run", run_rate, 10.0),
    ]


def _client(
    kind: str, address: str, seconds: float, worker: int, log: bool, out: Any, units: str = "", rate: float = 0.0
) -> None:
    """One client process: calls one at a time for ``seconds``; sends its latencies (s) back. ``units``
    prefixes its unit ids (new units each drive). ``rate`` > 0: paced at that many calls/s, each call's latency
    counted from the moment it was due (a late call is sent at once, and its wait counts: no coordinated
    omission)."""
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    if kind == "echo":
        call = channel.unary_unary(f"/{ECHO_SERVICE}/Unary")
    else:
        call = pb_grpc.ABRouterServiceStub(channel).Assign
    latencies = []
    begin = time.perf_counter()
    end = begin + seconds
    i = 0
    while True:
        due = begin + i / rate if rate > 0 else None
        if due is not None and (wait := due - time.perf_counter()) > 0:
            time.sleep(wait)
        request = pb.AssignRequest(
            unit_id=f"{units}w{worker}-user-{i}",
            experiment_keys=["bench-exp"],
            log_exposure=log,
            covariates=pb.Covariates(numeric={"age": 30.0}, categorical={"device": "ios"}) if log else None,
        )
        start = time.perf_counter() if due is None else due
        if kind == "echo":
            call(request.SerializeToString())
        else:
            call(request, timeout=10)
        now = time.perf_counter()
        latencies.append(now - start)
        i += 1
        if now >= end:
            break
    channel.close()
    out.put(latencies)


def _drive(
    kind: str, address: str, clients: int, seconds: float, log: bool = False, units: str = "", rate: float = 0.0
) -> dict[str, float]:
    """``clients`` client processes (:func:`_client`; ``rate``: calls/s offered in all, 0: each as fast as it
    can): calls/s, p50 and p99 latency."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args = [(kind, address, seconds, w, log, out, units, rate / clients) for w in range(clients)]
    procs = [ctx.Process(target=_client, args=a) for a in args]
    for p in procs:
        p.start()
    latencies: list[float] = []
    for _ in procs:
        latencies.extend(out.get(timeout=seconds + 120))
    for p in procs:
        p.join()
    lat = np.array(latencies)
    return {
        "qps": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
    }


def over_grpc(seconds: float) -> list[dict[str, Any]]:
    """b) Assign over gRPC from 1 and 4 client processes vs the bare echo."""
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    records: list[dict[str, Any]] = []
    overrides = {"GUARDMESH__ABROUTER__SQLITE_SYNCHRONOUS": "NORMAL", "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0"}
    with echo_process() as echo, service_process("abrouter", overrides) as address:
        with grpc.insecure_channel(address) as ch:
            pb_grpc.ABRouterServiceStub(ch).CreateExperiment(
                pb.CreateExperimentRequest(
                    spec=pb.ExperimentSpec(
                        key="bench-exp",
                        arms=[pb.Arm(name="control", weight=0.5), pb.Arm(name="treatment", weight=0.5)],
                    )
                )
            )
        for clients in (1, 4):
            echo_fig = _drive("echo", echo, clients, seconds)
            ours = _drive("assign", address, clients, seconds)
            logged = _drive("assign", address, clients, seconds, log=True)
            print(f"{clients} client process(es): assign {ours}, assign+log {logged}, echo {echo_fig}")
            peer = "bare grpcio echo"
            records += [
                record(f"grpc_assign_{clients}p", "calls/s", ours["qps"], peer, echo_fig["qps"], None),
                record(f"grpc_assign_{clients}p_p50", "ms", ours["p50_ms"], peer, echo_fig["p50_ms"], None, False),
                record(f"grpc_assign_{clients}p_p99", "ms", ours["p99_ms"], peer, echo_fig["p99_ms"], None, False),
                record(f"grpc_assign_logged_{clients}p", "calls/s", logged["qps"], peer, echo_fig["qps"], None),
                record(
                    f"grpc_assign_logged_{clients}p_p99", "ms", logged["p99_ms"], peer, echo_fig["p99_ms"], None, False
                ),
            ]
    return records


def exposures(n: int, seed: int = 0) -> ExposureColumns:
    """n synthetic exposures: 2 arms, 120 days, 3 numeric and 2 categorical covariates (one is "device")."""
    rng = np.random.default_rng(seed)
    devices = tuple(f"CT-{i}" for i in range(8))
    regions = tuple(f"region-{i}" for i in range(12))
    return ExposureColumns(
        unit_ids=np.array([f"user-{i:07d}" for i in range(n)], dtype=object),
        arms=rng.integers(0, 2, n).astype(np.int16),
        buckets=np.floor(rng.random(n) * 10000) / 10000,
        timestamps=1_770_000_000 + rng.random(n) * 120 * 86400,
        propensity=np.full(n, 0.5),
        numeric={
            "lesion_mm": rng.normal(20, 4, n),
            "age": rng.normal(55, 12, n),
            "dose": rng.gamma(2.0, 3.0, n),
        },
        categorical={
            "device": CategoricalColumn(rng.integers(0, len(devices), n).astype(np.int32), devices),
            "region": CategoricalColumn(rng.integers(0, len(regions), n).astype(np.int32), regions),
        },
    )


def scipy_audit(cols: ExposureColumns) -> None:
    """The peer: textbook scipy on the same arrays (overall tests only)."""
    counts = np.bincount(cols.arms, minlength=2)
    stats.chisquare(counts, counts.sum() * np.array([0.5, 0.5]))
    stats.chisquare(np.histogram(cols.buckets, bins=100, range=(0, 1))[0])
    control, treatment = cols.arms == 0, cols.arms == 1
    for values in cols.numeric.values():
        stats.ks_2samp(values[control], values[treatment])
    for column in cols.categorical.values():
        _, table = np.unique(np.stack([cols.arms, column.codes]), axis=1, return_counts=True)
        stats.chi2_contingency(table.reshape(2, -1))


def audit_bench(n: int) -> list[dict[str, Any]]:
    """c) full audit of n exposures."""
    cols = exposures(n)
    times = []
    peer_times = []
    for _ in range(3):
        start = time.perf_counter()
        report = full_audit(cols, (0.5, 0.5))
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        scipy_audit(cols)
        peer_times.append(time.perf_counter() - start)
    ours, peer = statistics.median(times), statistics.median(peer_times)
    print(
        f"full audit of {n:,} exposures: {ours:.3f} s ({len(report.balance)} balance tests, "
        f"{len(report.clustering)} clustering tests); scipy overall-only peer {peer:.3f} s"
    )
    return [
        record(
            "full_audit_1M_seconds", "s", ours, "scipy.stats overall tests only", peer, None, higher_is_better=False
        ),
        record("full_audit_1M_vs_1s_budget", "s", ours, "target budget", 1.0, 1.0, higher_is_better=False),
    ]


def _fixed_test_trips(c: Moments, a: Moments, drop: float, alpha: float, min_units: int) -> bool:
    """The peer: the replaced fixed-sample guardrail (higher is better, control mean > 0) at one look."""
    if min(c.count, a.count) < min_units:
        return False
    relative = (a.mean - c.mean) / c.mean
    limit = a.mean - (1 - drop) * c.mean
    se = math.sqrt(a.variance / a.count + (1 - drop) ** 2 * c.variance / c.count)
    return relative <= -drop and (limit < 0 if se == 0 else stats.norm.cdf(limit / se) < alpha)


def _rollback_shares(
    pc: float, pa: float, drop: float, runs: int, per_look: int, seed: int, looks: int = 30
) -> tuple[float, float]:
    """Shares of runs (Bernoulli arms, ``per_look`` more units per arm each look) rolled back at any look:
    (sequential guardrail, fixed-sample peer)."""
    rng = np.random.default_rng(seed)
    guardrail = Guardrail("conversion", max_relative_drop=drop, alpha=0.05, min_units=100)
    control = rng.binomial(per_look, pc, (runs, looks)).cumsum(axis=1)
    arm = rng.binomial(per_look, pa, (runs, looks)).cumsum(axis=1)
    ours = peer = 0
    for r in range(runs):
        ours_tripped = peer_tripped = False
        for k in range(looks):
            n = per_look * (k + 1)
            c = Moments(n, float(control[r, k]), float(control[r, k]))  # 0/1 values: sum of squares = sum
            a = Moments(n, float(arm[r, k]), float(arm[r, k]))
            ours_tripped = ours_tripped or evaluate_guardrail(guardrail, c, a, 1).tripped
            peer_tripped = peer_tripped or _fixed_test_trips(c, a, drop, 0.05, 100)
            if ours_tripped and peer_tripped:
                break
        ours += ours_tripped
        peer += peer_tripped
    return ours / runs, peer / runs


def guardrail_bench(runs: int) -> list[dict[str, Any]]:
    """d) false-rollback rate over 30 looks and power of the sequential guardrail vs the fixed-sample one."""
    peer = "fixed-sample Welch guardrail checked at every look (replaced)"
    at_bound, at_bound_peer = _rollback_shares(0.30, 0.30 * 0.95, 0.05, runs, per_look=300, seed=1)
    null_01, null_01_peer = _rollback_shares(0.30, 0.30, 0.01, runs, per_look=300, seed=2)
    null_05, null_05_peer = _rollback_shares(0.30, 0.30, 0.05, runs, per_look=300, seed=3)
    power, power_peer = _rollback_shares(0.30, 0.30 * 0.95, 0.01, runs, per_look=1000, seed=4)
    upper = float(stats.beta.ppf(0.95, at_bound * runs + 1, runs - at_bound * runs))  # Clopper-Pearson
    print(
        f"guardrail over 30 looks, {runs} runs: false rollback at the bound {at_bound:.4f} (fixed {at_bound_peer:.4f}),"
        f" no difference drop 0.01 {null_01:.4f} ({null_01_peer:.4f}), drop 0.05 {null_05:.4f} ({null_05_peer:.4f});"
        f" power at a true 5 % drop vs a 1 % bound {power:.3f} ({power_peer:.3f})"
    )
    lower = {"higher_is_better": False}
    return [
        record(
            "guardrail_false_rollback_30_looks_at_bound_0.05",
            "share of runs",
            at_bound,
            peer,
            at_bound_peer,
            None,
            **lower,
        ),
        record("guardrail_false_rollback_upper95_vs_alpha", "share of runs", upper, "alpha", 0.05, 1.0, **lower),
        record(
            "guardrail_false_rollback_30_looks_no_difference_0.01",
            "share of runs",
            null_01,
            peer,
            null_01_peer,
            None,
            **lower,
        ),
        record(
            "guardrail_false_rollback_30_looks_no_difference_0.05",
            "share of runs",
            null_05,
            peer,
            null_05_peer,
            None,
            **lower,
        ),
        record("guardrail_power_true_5pct_drop_bound_0.01_30k_units", "share of runs", power, peer, power_peer, None),
    ]


def _create(address: str, key: str = "bench-exp", metrics: tuple[str, ...] = ()) -> None:
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        arms = [pb.Arm(name="control", weight=0.5), pb.Arm(name="treatment", weight=0.5)]
        pb_grpc.ABRouterServiceStub(ch).CreateExperiment(
            pb.CreateExperimentRequest(spec=pb.ExperimentSpec(key=key, arms=arms, metrics=metrics))
        )


def _propagation(a: str, b: str, rounds: int) -> list[float]:
    """Seconds from an acknowledged UpdateExperiment on ``a`` until ``b`` serves that version."""
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    out = []
    with grpc.insecure_channel(a) as ca, grpc.insecure_channel(b) as cb:
        sa, sb = pb_grpc.ABRouterServiceStub(ca), pb_grpc.ABRouterServiceStub(cb)
        _create(a, "propagation")
        while True:  # b has it
            try:
                sb.GetExperiment(pb.GetExperimentRequest(key="propagation"))
                break
            except grpc.RpcError:
                time.sleep(0.01)
        for i in range(rounds):
            w = 0.2 + 0.6 * ((i % 2) == 0)
            arms = [pb.Arm(name="control", weight=w), pb.Arm(name="treatment", weight=1 - w)]
            start = time.perf_counter()
            version = sa.UpdateExperiment(
                pb.UpdateExperimentRequest(spec=pb.ExperimentSpec(key="propagation", arms=arms))
            ).experiment.version
            while sb.GetExperiment(pb.GetExperimentRequest(key="propagation")).experiment.version < version:
                time.sleep(0.001)
            out.append(time.perf_counter() - start)
    return out


#: Figures one part hands to another in the same run (the export is compared with e's logging rate).
_MEASURED: dict[str, float] = {}


def replicas_bench(seconds: float, rounds: int) -> list[dict[str, Any]]:
    """e) logged Assign on PostgreSQL vs SQLite; config propagation p99 between two replicas.

    The two routers run side by side and are driven in turn, ``rounds`` times each: on a machine shared with
    other work both backends see the same load, and the figures are the medians of the rounds."""
    from bench.scale import postgres

    common = {"GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0", "GUARDMESH__ABROUTER__EXPORT_URL": ""}
    samples: dict[str, list[float]] = {"postgresql": [], "sqlite": []}
    with postgres() as server:
        url = server.ensure_database("bench_abrouter")
        shared = {**common, "GUARDMESH__ABROUTER__STORE_URL": url}
        # SQLite with synchronous FULL (the default) beside PostgreSQL with synchronous_commit on (its default)
        with service_process("abrouter", common) as on_sqlite, service_process("abrouter", shared) as on_pg:
            for address in (on_sqlite, on_pg):
                _create(address)
            for _ in range(rounds):
                for backend, address in (("sqlite", on_sqlite), ("postgresql", on_pg)):
                    samples[backend].append(_drive("assign", address, 4, seconds, log=True)["qps"])
        url2 = server.ensure_database("bench_abrouter_propagation")
        shared = {**common, "GUARDMESH__ABROUTER__STORE_URL": url2}
        with service_process("abrouter", shared) as a, service_process("abrouter", shared) as b:
            delays = _propagation(a, b, 200)
    p99 = float(np.percentile(delays, 99))
    pg_qps, sqlite_qps = statistics.median(samples["postgresql"]), statistics.median(samples["sqlite"])
    _MEASURED["assign_logged_4p_sqlite"] = sqlite_qps
    print(
        f"logged Assign 4p calls/s by round: PostgreSQL {samples['postgresql']}, SQLite {samples['sqlite']}; "
        f"propagation p50 {np.percentile(delays, 50) * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms"
    )
    logged = record("assign_logged_4p_postgresql", "calls/s", pg_qps, "same on SQLite", sqlite_qps, 0.8)
    logged["samples"] = samples  # calls/s of each round; ours and peer are their medians
    return [logged, record("config_propagation_p99", "s", p99, "target", 1.0, None, False)]


def table_bench(n: int) -> list[dict[str, Any]]:
    """f) export throughput vs logging; the table audit (DuckDB over Parquet) vs in memory vs plain SQL."""
    import resource
    import tempfile
    from pathlib import Path

    import duckdb

    from guardmesh.config import ABRouterSettings
    from services.abrouter.export import ExposureExporter
    from services.abrouter.router import Router
    from services.abrouter.store import ExposureRow, RouterStore
    from services.abrouter.warehouse import audit_table

    records = []
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-table-") as tmp:
        store = RouterStore(Path(tmp) / "r.db", "NORMAL")
        router = Router(ABRouterSettings(), store)
        router.create(SPEC)
        exp = router.live[SPEC.key].experiment
        cols = exposures(n)
        start = time.perf_counter()
        chunk = 100_000
        for lo in range(0, n, chunk):  # the log as Assign would write it, in large batches
            rows = [
                ExposureRow(
                    SPEC.key,
                    str(cols.unit_ids[i]),
                    int(cols.arms[i]),
                    float(cols.buckets[i]),
                    0.5,
                    float(cols.timestamps[i]),
                    1,
                    {"age": float(cols.numeric["age"][i])},
                    {},
                )
                for i in range(lo, min(n, lo + chunk))
            ]
            store.submit([RouterStore.exposures(rows)]).wait()
        log_s = time.perf_counter() - start
        table = str(Path(tmp) / "table")
        exporter = ExposureExporter(store, table)
        start = time.perf_counter()
        while exporter.export_once():
            pass
        export_s = time.perf_counter() - start
        if "assign_logged_4p_sqlite" in _MEASURED:
            records.append(
                record(
                    f"export_{n}_vs_logged_assign",
                    "exposures/s",
                    n / export_s,
                    "logged Assign over gRPC, 4 clients, SQLite (e)",
                    _MEASURED["assign_logged_4p_sqlite"],
                    1.0,
                )
            )
        records.append(
            record(f"export_{n}_exposures", "exposures/s", n / export_s, "logging the same in batches", n / log_s, 1.0)
        )
        start = time.perf_counter()
        report = audit_table(table, exp, 1, min_sample=1000)
        table_s = time.perf_counter() - start
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        con = duckdb.connect()
        counts = con.sql(
            f"SELECT arm, COUNT(*) FROM (SELECT arm, row_number() OVER (PARTITION BY unit ORDER BY exposure_id) AS r "
            f"FROM read_parquet('{table}/*/*/*.parquet')) WHERE r = 1 GROUP BY arm"
        ).fetchall()
        stats.chisquare([c for _, c in sorted(counts)])
        sql_s = time.perf_counter() - start
        start = time.perf_counter()
        full_audit(cols, (0.5, 0.5), min_sample=1000)
        memory_s = time.perf_counter() - start
        store.close()
    print(
        f"{n:,} exposures: log {log_s:.1f} s, export {export_s:.1f} s, table audit {table_s:.1f} s "
        f"(SRM p={report.srm.p_value:.3g}; peak RSS {rss_mb:.0f} MB), plain DuckDB SRM {sql_s:.1f} s, "
        f"in-memory audit {memory_s:.1f} s"
    )
    records += [
        record(f"table_audit_{n}", "s", table_s, "the same audit on in-memory columns", memory_s, None, False),
        record(f"table_audit_{n}_vs_plain_sql_srm", "s", table_s, "plain DuckDB SQL, SRM only", sql_s, None, False),
        record(f"table_audit_{n}_peak_rss", "MB", rss_mb, "target", 2048.0, None, False),
    ]
    return records


#: Client processes of part h's Assign load (one per core of the 2-core machine the issue names).
AUDIT_LOAD_CLIENTS = 2


def _audit_loop(address: str, stop: Any, seconds: list[float]) -> None:
    """AuditExperiment(from_table=true) of the generated experiment, back to back until ``stop`` is set (at
    least one); the seconds of each audit appended to ``seconds`` (the server's figure)."""
    from bench.warehouse_audit import KEY
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ABRouterServiceStub(ch)
        while True:
            report = stub.AuditExperiment(pb.AuditExperimentRequest(key=KEY, from_table=True), timeout=3600)
            seconds.append(report.seconds)
            if stop.is_set():
                break


def assign_during_audit_bench(n: int, seconds: float, rounds: int, rate: float = 0.0) -> list[dict[str, Any]]:
    """h) Assign p99 while AuditExperiment(from_table=true) of ``n`` exposures runs vs without (``rate`` > 0: the
    Assign calls paced at that many calls/s in all, latency from each call's due time)."""
    import os
    import tempfile
    import threading

    from bench.exposure_table import write_exposure_table
    from bench.warehouse_audit import KEY

    samples: dict[str, list[float]] = {"during_audit": [], "without": []}
    audits: list[float] = []
    load: list[float] = []  # 1-minute load average after each round
    offered: list[float] = []  # Assign calls/s of each window
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-audit-load-") as tmp:
        table = f"{tmp}/table"
        write_exposure_table(table, n, key=KEY, days=60, first_id=10**12)  # ids far above the router's own
        overrides = {
            "GUARDMESH__ABROUTER__SQLITE_SYNCHRONOUS": "NORMAL",
            "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
            "GUARDMESH__ABROUTER__EXPORT_URL": table,
            "GUARDMESH__ABROUTER__EXPORT_INTERVAL_S": "3600",
        }
        with service_process("abrouter", overrides) as address:
            _create(address)
            _create(address, KEY)
            _drive("assign", address, AUDIT_LOAD_CLIENTS, min(seconds, 2.0))  # warm-up
            warm_up = threading.Event()
            warm_up.set()  # one audit: the first one in a process imports its modules (under the GIL)
            _audit_loop(address, warm_up, audits)
            for r in range(rounds):  # the order alternates, so a load that drifts favours neither
                for window in ("without", "during_audit") if r % 2 == 0 else ("during_audit", "without"):
                    if window == "without":
                        fig = _drive("assign", address, AUDIT_LOAD_CLIENTS, seconds, rate=rate)
                        samples[window].append(fig["p99_ms"])
                        offered.append(fig["qps"])
                        continue
                    stop, done = threading.Event(), len(audits)
                    looping = threading.Thread(target=_audit_loop, args=(address, stop, audits))
                    looping.start()
                    time.sleep(0.5)  # the first audit is past its export round and inside DuckDB
                    fig = _drive("assign", address, AUDIT_LOAD_CLIENTS, seconds, rate=rate)
                    samples[window].append(fig["p99_ms"])
                    offered.append(fig["qps"])
                    stop.set()
                    looping.join()
                    if len(audits) == done:
                        raise RuntimeError("no table audit ran during the window")
                load.append(os.getloadavg()[0])
    ours, peer = statistics.median(samples["during_audit"]), statistics.median(samples["without"])
    print(
        f"Assign p99 ({AUDIT_LOAD_CLIENTS} clients) by round: during a table audit of {n:,} exposures "
        f"{samples['during_audit']} ms, without {samples['without']} ms; audits took {audits} s"
    )
    name = f"assign_p99_during_table_audit_{n}" + (f"_paced_{rate:g}_per_s" if rate > 0 else "")
    rec = record(name, "ms", ours, "Assign p99 without an audit", peer, 1 / 1.5, False)
    rec["samples"] = samples  # p99 ms of each window; ours and peer are their medians
    rec["assign_calls_per_s"] = offered  # each window's, in the order run
    rec["audit_seconds"] = audits  # the server's seconds of each audit, the warm-up first
    rec["load_average_1min"] = load
    return [rec]


def _restore_in_child(url: str, bounded: bool, out: Any) -> None:
    """One restart in a fresh process: (seconds, resident bytes added by the restore, exposed units)."""
    import gc

    from guardmesh.config import ABRouterSettings
    from services.abrouter.router import Router
    from services.abrouter.store import RouterStore

    def resident() -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * 4096

    settings = ABRouterSettings(exposures_in_memory=not bounded)
    router = Router(settings, RouterStore(url, "NORMAL"))
    gc.collect()
    before = resident()
    start = time.perf_counter()
    router.restore()
    seconds = time.perf_counter() - start
    gc.collect()
    out.put((seconds, resident() - before, router.get(SPEC.key)[1]))
    router.close()


def bounded_bench(n: int) -> list[dict[str, Any]]:
    """i) resident memory per exposed unit and restart time, bounded vs default mode, at ``n`` units."""
    import tempfile
    from pathlib import Path

    from guardmesh.config import ABRouterSettings
    from services.abrouter.router import Router
    from services.abrouter.store import ExposureRow, ObservationRow, RouterStore

    metric_spec = ExperimentSpec(key=SPEC.key, arms=SPEC.arms, metrics=("clicks",))
    figures: dict[bool, tuple[float, int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-bounded-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'r.db'}"
        store = RouterStore(url, "NORMAL")
        Router(ABRouterSettings(), store).create(metric_spec)
        rng = np.random.default_rng(5)
        chunk = 100_000
        for lo in range(0, n, chunk):  # the log as logged Assign and RecordMetrics write it, in large batches
            ids = range(lo, min(n, lo + chunk))
            arms = rng.integers(0, 2, len(ids))
            rows = [
                ExposureRow(SPEC.key, f"user-{i}", int(a), float(rng.random()), 0.5, 1.76e9 + i, 1, {}, {})
                for i, a in zip(ids, arms, strict=True)
            ]
            rows += rows[::10]  # a tenth exposed again
            observed = [ObservationRow(SPEC.key, r.unit, "clicks", 1.0, r.at + 60, False) for r in rows[::4]]
            store.submit([RouterStore.exposures(rows), RouterStore.observations(observed)]).wait()
        store.close()
        ctx = mp.get_context("spawn")
        for bounded in (False, True):
            queue = ctx.Queue()
            child = ctx.Process(target=_restore_in_child, args=(url, bounded, queue))
            child.start()
            figures[bounded] = queue.get(timeout=1800)
            child.join(timeout=60)
    (ours_s, ours_bytes, ours_units), (peer_s, peer_bytes, peer_units) = figures[True], figures[False]
    assert ours_units == peer_units == n, (ours_units, peer_units, n)
    return [
        record(
            f"router_resident_bytes_per_exposed_unit_{n // 1000}k",
            "B/unit",
            ours_bytes / n,
            "default mode (per-unit columns, the log replayed), same store, same run",
            peer_bytes / n,
            None,
            higher_is_better=False,
        ),
        record(
            f"router_restart_s_{n // 1000}k_units",
            "s",
            ours_s,
            "default mode (replays every exposure and observation), same store, same run",
            peer_s,
            None,
            higher_is_better=False,
        ),
    ]


def bounded_assign_bench(seconds: float, rounds: int) -> list[dict[str, Any]]:
    """j) logged Assign over gRPC (4 client processes, every unit new), bounded vs default mode, on SQLite and on
    PostgreSQL. The four routers run side by side and are driven in turn ``rounds`` times (the order alternating,
    each drive with units none has seen), so every pair sees the same load; figures are medians of the rounds."""
    from bench.scale import postgres

    common = {"GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0"}  # the export on in both modes (bounded needs it)
    samples: dict[str, list[dict[str, float]]] = {}
    with postgres() as server, contextlib.ExitStack() as stack:
        routers: dict[tuple[str, bool], str] = {}
        for backend in ("sqlite", "postgresql"):
            for bounded in (True, False):
                env = {**common, "GUARDMESH__ABROUTER__EXPOSURES_IN_MEMORY": str(not bounded).lower()}
                if backend == "postgresql":
                    db = f"bench_abrouter_{'bounded' if bounded else 'default'}_assign"
                    env["GUARDMESH__ABROUTER__STORE_URL"] = server.ensure_database(db)
                routers[backend, bounded] = stack.enter_context(service_process("abrouter", env))
                _create(routers[backend, bounded])
        for r in range(rounds):
            for backend in ("sqlite", "postgresql"):
                for bounded in (True, False) if r % 2 == 0 else (False, True):
                    fig = _drive("assign", routers[backend, bounded], 4, seconds, log=True, units=f"r{r}-")
                    samples.setdefault(f"{backend}_{'bounded' if bounded else 'default'}", []).append(fig)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    path = RESULTS / "abrouter.json"
    earlier = {r["name"]: r for r in json.loads(path.read_text(encoding="utf-8"))} if path.exists() else {}
    records: list[dict[str, Any]] = []
    for backend in ("sqlite", "postgresql"):
        ours, peer = samples[f"{backend}_bounded"], samples[f"{backend}_default"]
        print(f"j) {backend} logged Assign 4p by round: bounded {ours}, default {peer}")
        peer_name = f"default mode (exposures_in_memory = true), same store kind ({backend}), same run"
        for figure, unit, higher in (("qps", "calls/s", True), ("p99_ms", "ms", False)):
            rec = record(
                f"grpc_assign_logged_4p_bounded_{backend}" + ("" if figure == "qps" else "_p99"),
                unit,
                statistics.median(f[figure] for f in ours),
                peer_name,
                statistics.median(f[figure] for f in peer),
                None,
                higher,
            )
            rec["samples"] = {"ours": [f[figure] for f in ours], "peer": [f[figure] for f in peer]}
            # each round's two drives ran back to back: their ratio is steadier than the medians' on a busy machine
            paired = [(o[figure] / p[figure]) ** (1 if higher else -1) for o, p in zip(ours, peer, strict=True)]
            rec["paired_ratio_median"] = statistics.median(paired)
            rec["commit"] = commit
            if rec["name"] in earlier:  # the figures of the code before (the record this run replaces)
                rec["before"] = {k: earlier[rec["name"]].get(k) for k in ("ours", "peer_value", "ratio", "commit")}
            records.append(rec)
    return records


def _seed_units(address: str, n: int) -> None:
    """Expose units ``seed-0`` .. ``seed-{n-1}`` of bench-exp (logged Assign, 64 calls in flight)."""
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ABRouterServiceStub(ch)
        for start in range(0, n, 64):
            calls = [
                stub.Assign.future(
                    pb.AssignRequest(unit_id=f"seed-{i}", experiment_keys=["bench-exp"], log_exposure=True), timeout=60
                )
                for i in range(start, min(start + 64, n))
            ]
            for call in calls:
                call.result()


def _recorder(address: str, seconds: float, units: int, worker: int, out: Any) -> None:
    """One client process: RecordMetrics of RECORD_BATCH observations of random seeded units, one call at a time,
    for ``seconds``; sends back its calls per second."""
    import random

    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    rng = random.Random(worker)
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ABRouterServiceStub(ch)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            observations = [
                pb.MetricObservation(unit_id=f"seed-{rng.randrange(units)}", metric="clicks", value=rng.randrange(3))
                for _ in range(RECORD_BATCH)
            ]
            stub.RecordMetrics(
                pb.RecordMetricsRequest(experiment_key="bench-exp", observations=observations), timeout=60
            )
            calls += 1
        out.put(calls / (time.perf_counter() - start))


def record_metrics_bench(seconds: float, rounds: int, before: Path | None) -> list[dict[str, Any]]:
    """k) Assign p99 beside RecordMetrics of evicted units (bounded mode, PostgreSQL): see the module docstring."""
    from bench.scale import postgres

    trees: dict[str, Path | None] = {"ours": None, **({"before": before} if before is not None else {})}
    samples: dict[str, list[float]] = {}
    with postgres() as server, contextlib.ExitStack() as stack:
        routers: dict[str, str] = {}
        for name, tree in trees.items():
            env = {
                "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
                "GUARDMESH__ABROUTER__EXPOSURES_IN_MEMORY": "false",
                "GUARDMESH__ABROUTER__UNIT_CACHE_UNITS": str(RECORD_CACHE_UNITS),
                "GUARDMESH__ABROUTER__STORE_URL": server.ensure_database(f"bench_abrouter_record_{name}"),
            }
            routers[name] = stack.enter_context(service_process("abrouter", env, tree=tree))
            _create(routers[name], metrics=("clicks",))
            _seed_units(routers[name], RECORD_SEEDED)
        ctx = mp.get_context("spawn")
        for r in range(rounds):
            for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                address = routers[name]
                alone = _drive("assign", address, 2, seconds, log=True, units=f"k{r}a-")
                out = ctx.Queue()
                # the recorders start first and outlast the Assign window (its clients start in fresh processes too)
                procs = [
                    ctx.Process(target=_recorder, args=(address, seconds + 3.0, RECORD_SEEDED, 10 * r + w, out))
                    for w in range(2)
                ]
                for p in procs:
                    p.start()
                time.sleep(1.0)
                beside = _drive("assign", address, 2, seconds, log=True, units=f"k{r}b-")
                rates = [out.get(timeout=seconds + 120) for _ in procs]
                for p in procs:
                    p.join()
                samples.setdefault(f"{name}_alone", []).append(alone["p99_ms"])
                samples.setdefault(f"{name}_beside", []).append(beside["p99_ms"])
                samples.setdefault(f"{name}_record_rate", []).append(sum(rates))
                print(
                    f"k) round {r} {name}: Assign p99 alone {alone['p99_ms']:.2f} ms, beside RecordMetrics "
                    f"{beside['p99_ms']:.2f} ms; RecordMetrics {sum(rates):.0f} calls/s",
                    flush=True,
                )
    median = {k: statistics.median(v) for k, v in samples.items()}
    what = f"{RECORD_BATCH} observations of units evicted from a {RECORD_CACHE_UNITS}-unit cache, 2 client processes"
    rec = record(
        "assign_p99_beside_record_metrics_evicted_postgresql",
        "ms",
        median["ours_beside"],
        f"Assign p99 without RecordMetrics traffic, same router, same run (RecordMetrics: {what})",
        median["ours_alone"],
        None,
        False,
    )
    rec["samples"] = {k: v for k, v in samples.items() if k.startswith("ours")}
    records = [rec]
    if before is not None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=before, capture_output=True, text=True)
        for name, figure, unit, higher in (
            ("assign_p99_beside_record_metrics_evicted_vs_before", "beside", "ms", False),
            ("record_metrics_evicted_calls_per_s_vs_before", "record_rate", "calls/s", True),
        ):
            rec = record(
                name,
                unit,
                median[f"ours_{figure}"],
                f"the same on the code before (commit {commit.stdout.strip()}), same run",
                median[f"before_{figure}"],
                None,
                higher,
            )
            rec["samples"] = {"ours": samples[f"ours_{figure}"], "before": samples[f"before_{figure}"]}
            records.append(rec)
    return records


def main() -> int:
    """Run the parts asked for and write ``bench/results/abrouter.json`` (other parts' records kept)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2000, help="simulated experiments per guardrail figure")
    parser.add_argument("--exposures", type=int, default=10_000_000, help="exposures of the table audit (f)")
    parser.add_argument(
        "--warehouse-sizes", default="10000000,100000000", help="exposures of the warehouse audit (g), comma-separated"
    )
    parser.add_argument(
        "--warehouse-sql-max", type=int, default=100_000_000, help="largest size (g) the plain-SQL peer runs at"
    )
    parser.add_argument(
        "--warehouse-tables", default=None, help="folder keeping g's generated tables for later runs (else temporary)"
    )
    parser.add_argument(
        "--audit-exposures", type=int, default=5_000_000, help="exposures in the table audited during part h"
    )
    parser.add_argument("--parts", default="abcdefghijk", help="which parts to run (letters a-k)")
    parser.add_argument("--bounded-units", type=int, default=1_000_000, help="exposed units of part i")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each backend in part e (medians kept)")
    parser.add_argument("--note", default="", help="added to the machine of this run's records (e.g. 'loaded')")
    parser.add_argument(
        "--audit-rate", type=float, default=0.0, help="part h: Assign calls/s offered (0: the clients flat out)"
    )
    parser.add_argument(
        "--before", type=Path, default=None, help="part k: a copy of the repository before a change, run beside"
    )
    args = parser.parse_args()
    parts = {
        "a": lambda: in_process(args.ids),
        "c": lambda: audit_bench(args.ids),
        "b": lambda: over_grpc(args.seconds),
        "d": lambda: guardrail_bench(args.runs),
        "e": lambda: replicas_bench(args.seconds, args.rounds),
        "f": lambda: table_bench(args.exposures),
        "g": lambda: warehouse_bench(
            [int(n) for n in args.warehouse_sizes.split(",")],
            sql_max=args.warehouse_sql_max,
            tables=args.warehouse_tables,
        ),
        "h": lambda: assign_during_audit_bench(args.audit_exposures, args.seconds, args.rounds, args.audit_rate),
        "i": lambda: bounded_bench(args.bounded_units),
        "j": lambda: bounded_assign_bench(args.seconds, args.rounds),
        "k": lambda: record_metrics_bench(args.seconds, args.rounds, args.before),
    }
    records: list[dict[str, Any]] = []
    for letter, run in parts.items():
        if letter in args.parts:
            records += run()
    if args.note:
        for r in records:
            r["machine"] = f"{r['machine']}; {args.note}"
    path = RESULTS / "abrouter.json"
    if set(parts) - set(args.parts) and path.exists():
        ran = {r["name"] for r in records}
        kept = [r for r in json.loads(path.read_text(encoding="utf-8")) if r["name"] not in ran]
        records = kept + records
    write_records("abrouter", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
