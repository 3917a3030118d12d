"""kube-scheduler extender latency: filter + prioritize for one pod over 1,000 nodes, over real HTTP.

kube-scheduler calls the extender for every pod it schedules and waits up to the extender's ``httpTimeout``
(5 s by default), so the extender's latency is paid per pod. This measures what kube-scheduler would see:
one keep-alive HTTP connection, a ``filter`` then a ``prioritize`` call per pod with the candidate nodes
(names when ``nodeCacheCapable``; whole Node objects otherwise), p50 and p99 over many pods, from a client
process of its own (as kube-scheduler is). The peer, in
the same run on the same cluster state: the in-process placement engine choosing a node for the same pod
(``placement.place``, the filter and score the gRPC service runs). Target: p99 <= 20 ms.

The cluster: 1,000 nodes of 8 x 80 GiB cards, a random half of the cards partly used, policy fgd (the
default). Records are added to ``scheduler.json`` (``bench/results/`` with ``GUARDMESH_BENCH_RECORD=1``,
else ``bench/results/local/``; names starting "extender"), replacing earlier extender records and keeping
every other record; run it after ``bench.scheduler``, which rewrites the file.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.records import RESULTS, machine, record, results_path, write_records
from guardmesh.config import ExtenderSettings, SchedulerSettings
from guardmesh.inventory import uniform_node
from services.scheduler.extender import NODE_LABEL, Extender, ExtenderHttpServer
from services.scheduler.jobs import JobSpec
from services.scheduler.placement import ReplicaShape, place
from services.scheduler.scheduler import Scheduler

RESOURCE = "guardmesh.io/gpu-memory-mib"
TARGET_P99_MS = 20.0


def cluster(nodes: int, seed: int) -> Scheduler:
    """``nodes`` nodes of 8 x 80 GiB, a random half of the cards holding 10-60 GiB of other work."""
    core = Scheduler(SchedulerSettings(gpu_reserve_mib=512))
    core.register_nodes(
        [
            uniform_node(f"node-{i:04d}", "A100-80G", 8, 81920, labels={NODE_LABEL: f"node-{i:04d}"})
            for i in range(nodes)
        ]
    )
    rng = random.Random(seed)
    specs = []
    for i in range(nodes * 4):
        node = f"node-{rng.randrange(nodes):04d}"
        mib = rng.choice([10240, 20480, 40960, 61440])
        specs.append(
            JobSpec(
                f"load-{i}",
                "bench",
                1,
                1,
                memory_mib_per_gpu=mib,
                allow_sharing=True,
                node_selector=((NODE_LABEL, node),),
            )
        )
    core.submit_many(specs)
    return core


def pod(i: int, mib: int) -> dict[str, Any]:
    """A v1.Pod as kube-scheduler sends it."""
    res = {"limits": {RESOURCE: str(mib)}, "requests": {RESOURCE: str(mib)}}
    return {
        "metadata": {"name": f"p{i}", "namespace": "bench", "uid": f"uid-{i}", "creationTimestamp": None},
        "spec": {"containers": [{"name": "c", "image": "x", "resources": res}]},
        "status": {},
    }


def node_object(name: str) -> dict[str, Any]:
    """A v1.Node of the size kube-scheduler sends when the extender is not nodeCacheCapable."""
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "nvidia.com/gpu.present": "true"}},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110"},
            "allocatable": {"cpu": "63", "memory": "500Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"kubeletVersion": "v1.32.4", "architecture": "amd64", "operatingSystem": "linux"},
        },
    }


def http_latencies(port: int, names: list[str], pods: int, mib: int, objects: bool) -> tuple[list[float], list[float]]:
    """Seconds per pod for filter + prioritize over one keep-alive connection, and, interleaved, for two
    round trips that do no work (GET /healthz): the floor HTTP and this machine put under any two calls."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    items = [node_object(n) for n in names] if objects else None
    out = []
    floor = []
    for i in range(pods):
        args: dict[str, Any] = {"Pod": pod(i, mib)}
        if objects:
            args |= {"Nodes": {"metadata": {}, "items": items}, "NodeNames": None}
        else:
            args |= {"Nodes": None, "NodeNames": names}
        start = time.perf_counter()
        conn.request("POST", "/filter", json.dumps(args), {"Content-Type": "application/json"})
        passed = json.loads(conn.getresponse().read())
        assert passed["Error"] == "", passed["Error"]
        if objects:
            args["Nodes"] = passed["Nodes"]
        else:
            args["NodeNames"] = passed["NodeNames"]
        conn.request("POST", "/prioritize", json.dumps(args), {"Content-Type": "application/json"})
        scores = json.loads(conn.getresponse().read())
        out.append(time.perf_counter() - start)
        assert len(scores) == len(passed["NodeNames"] or passed["Nodes"]["items"])
        start = time.perf_counter()
        for _ in range(2):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        floor.append(time.perf_counter() - start)
    conn.close()
    return out, floor


def _client(port: int, names: list[str], pods: int, mib: int, objects: bool, out: Any) -> None:
    out.put(http_latencies(port, names, pods, mib, objects))


def client_process_latencies(
    port: int, names: list[str], pods: int, mib: int, objects: bool
) -> tuple[list[float], list[float]]:
    """:func:`http_latencies` from a separate process, as kube-scheduler calls (no GIL shared with the server)."""
    # spawn, not fork: forking a process with a serving thread can copy a held lock into the child.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client, args=(port, names, pods, mib, objects, queue))
    proc.start()
    try:
        verbs, floor = queue.get(timeout=3600)
        return list(verbs), list(floor)
    finally:
        proc.join(timeout=60)


def engine_latencies(core: Scheduler, pods: int, mib: int) -> list[float]:
    """Seconds per pod for the in-process placement engine choosing a node for the same pod."""
    shape = ReplicaShape.of(JobSpec("x", "bench", 1, 1, memory_mib_per_gpu=mib, allow_sharing=True))
    out = []
    for _ in range(pods):
        start = time.perf_counter()
        with core.lock:
            choice = place(core.state, shape, core.policy)
        out.append(time.perf_counter() - start)
        assert choice is not None
    return out


def pct(values: list[float], q: float) -> float:
    """The q-th percentile in milliseconds."""
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def main(argv: Sequence[str] | None = None) -> int:
    """Run and record; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=500, help="pods timed (after 20 warm-up pods)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--note", default="", help="added to each record's machine (e.g. 'loaded machine')")
    args = parser.parse_args(argv)
    core = cluster(args.nodes, args.seed)
    names = [n.name for n in core.state.nodes]
    extender = Extender(core, None, ExtenderSettings(port=0))
    server = ExtenderHttpServer(extender, "127.0.0.1", 0).start()
    mib = 20480
    try:
        client_process_latencies(server.port, names, 20, mib, objects=False)
        engine_latencies(core, 20, mib)
        names_only, floor = client_process_latencies(server.port, names, args.pods, mib, objects=False)
        engine = engine_latencies(core, args.pods, mib)
        objects, _ = client_process_latencies(server.port, names, max(args.pods // 5, 20), mib, objects=True)
    finally:
        server.stop()
    n = f"{args.nodes:,}"
    records = []
    for q in (50, 99):
        records.append(
            record(
                f"extender filter+prioritize p{q} over HTTP, one pod, {n} nodes (nodeCacheCapable)",
                "ms",
                pct(names_only, q),
                "in-process placement engine choosing a node for the same pod (same run)",
                pct(engine, q),
                None,
                higher_is_better=False,
            )
        )
    for q in (50, 99):
        records.append(
            record(
                f"extender filter+prioritize p{q} over HTTP, one pod, {n} nodes, vs two empty HTTP round trips",
                "ms",
                pct(names_only, q),
                "two GET /healthz round trips on the same connection, interleaved (same run): the HTTP floor",
                pct(floor, q),
                None,
                higher_is_better=False,
            )
        )
    records.append(
        record(
            f"extender filter+prioritize p99 over HTTP, one pod, {n} nodes (nodeCacheCapable) vs the budget",
            "ms",
            pct(names_only, 99),
            "issue's p99 budget (kube-scheduler waits up to httpTimeout, 5 s by default)",
            TARGET_P99_MS,
            1.0,
            higher_is_better=False,
        )
    )
    records.append(
        record(
            f"extender filter+prioritize p99 over HTTP, one pod, {n} whole Node objects (not nodeCacheCapable)",
            "ms",
            pct(objects, 99),
            "issue's p99 budget",
            TARGET_P99_MS,
            None,
            higher_is_better=False,
        )
    )
    if args.note:
        for r in records:
            r["machine"] = f"{machine()}; {args.note}"
    # Read-modify-write of the file this run writes: bench.scheduler's records in it stay. A local run starts
    # from the recorded file when it has no local one.
    path = results_path("scheduler.json")
    path = path if path.exists() else RESULTS / "scheduler.json"
    kept = [r for r in json.loads(path.read_text()) if not r["name"].startswith("extender")] if path.exists() else []
    write_records("scheduler", kept + records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
