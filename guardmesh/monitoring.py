"""The monitoring matrix as OpenTelemetry metrics: what each service exports for Prometheus and its alert.

Names follow Prometheus conventions as OpenTelemetry's exporter writes them (dots become underscores, a
counter gains ``_total``); a dimensionless share is named ``..._ratio`` in the instrument name itself, since
the exporter does not add it. The README's monitoring table lists exactly :data:`PROMETHEUS_NAMES`, and
``deploy/prometheus/alerts.yml`` alerts on them.

Gauges are observed when Prometheus scrapes (callbacks read the live state, nothing is polled meanwhile).
Each ``observe_*`` function registers the instruments of one service's core; the core knows nothing of it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from typing import Any

import grpc
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from guardmesh.handlers import Behaviour, BehaviourInterceptor, is_async

Callback = Callable[[CallbackOptions], Iterable[Observation]]

#: Every metric a guardmesh service exports, by the name Prometheus scrapes (histograms also serve
#: ``_bucket``/``_count``/``_sum``), with the service that exports it. tests/test_monitoring.py scrapes each.
PROMETHEUS_NAMES: dict[str, str] = {
    "guardmesh_scorer_f1_ratio": "scorer",
    "guardmesh_scorer_f1_drop_ratio": "scorer",
    "guardmesh_scorer_feature_missing_ratio": "scorer",
    "guardmesh_scorer_drift_score": "scorer",
    "guardmesh_scheduler_gpu_utilization_ratio": "scheduler",
    "guardmesh_scheduler_gpu_memory_allocated_ratio": "scheduler",
    "guardmesh_scheduler_pending_jobs": "scheduler",
    "guardmesh_abrouter_srm_p_value_ratio": "abrouter",
    "guardmesh_abrouter_guardrail_state": "abrouter",
    "guardmesh_abrouter_exposed_units": "abrouter",
    "guardmesh_paramserver_staleness_versions": "paramserver",
    "guardmesh_paramserver_pushes_total": "paramserver",
    "rpc_server_duration_milliseconds": "every service",
}


def _gauge(
    meter: metrics.Meter, name: str, unit: str, description: str, fn: Callable[[], Iterable[Observation]]
) -> None:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        try:
            return list(fn())
        except Exception:  # a scrape must never break the service
            return []

    meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


def observe_scorer(core: Any) -> None:
    """F1 and its relative drop per version, missing rate per feature, drift score per model."""
    meter = metrics.get_meter("guardmesh.scorer")

    def f1() -> Iterable[Observation]:
        for name, line in list(core.lines.items()):
            for version, state in list(line.versions.items()):
                _, _, value, n = state.health.rolling.metrics()
                if n:
                    yield Observation(value, {"model": name, "version": version})

    def f1_drop() -> Iterable[Observation]:
        for name, line in list(core.lines.items()):
            for version, state in list(line.versions.items()):
                baseline = state.health.baseline_f1
                _, _, value, n = state.health.rolling.metrics()
                if baseline and n:
                    yield Observation((baseline - value) / baseline, {"model": name, "version": version})

    def missing() -> Iterable[Observation]:
        for name, line in list(core.lines.items()):
            if line.missing is not None:
                for feature, rate in zip(line.features, line.missing.rates().tolist(), strict=True):
                    yield Observation(float(rate), {"model": name, "feature": feature})

    def drift() -> Iterable[Observation]:
        for name, line in list(core.lines.items()):
            yield Observation(float(line.drift_score), {"model": name})

    _gauge(meter, "guardmesh.scorer.f1_ratio", "1", "Rolling F1 of a model version from feedback labels", f1)
    _gauge(meter, "guardmesh.scorer.f1_drop_ratio", "1", "Relative F1 drop from the version's baseline F1", f1_drop)
    _gauge(meter, "guardmesh.scorer.feature_missing_ratio", "1", "Share of the live window missing a feature", missing)
    _gauge(meter, "guardmesh.scorer.drift_score", "", "Drift score between reference and live windows (0-1)", drift)


def observe_scheduler(core: Any) -> None:
    """GPU utilisation (as agents report it from NVML) and allocated GPU memory by pool, and pending jobs."""
    meter = metrics.get_meter("guardmesh.scheduler")

    def by_pool() -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
        busy: dict[str, list[float]] = {}
        allocated: dict[str, float] = {}
        total: dict[str, float] = {}
        for node in core.list_nodes():
            for gpu in node.gpus:
                busy.setdefault(gpu.model, []).append(float(gpu.utilization))
                total[gpu.model] = total.get(gpu.model, 0.0) + gpu.memory_mib
                allocated[gpu.model] = allocated.get(gpu.model, 0.0) + sum(cap for _, _, cap, _ in gpu.allocations)
        return busy, allocated, total

    def utilization() -> Iterable[Observation]:
        busy, _, _ = by_pool()
        for pool, shares in busy.items():
            yield Observation(sum(shares) / len(shares), {"pool": pool})

    def memory_allocated() -> Iterable[Observation]:
        _, allocated, total = by_pool()
        for pool, cap in total.items():
            if cap:
                yield Observation(allocated[pool] / cap, {"pool": pool})

    def pending() -> Iterable[Observation]:
        yield Observation(float(sum(j.state.name == "PENDING" for j in core.list_jobs())), {})

    _gauge(
        meter,
        "guardmesh.scheduler.gpu_utilization_ratio",
        "1",
        "Mean GPU busy share by pool, as node agents last reported it from NVML (0 where no agent reports)",
        utilization,
    )
    _gauge(
        meter,
        "guardmesh.scheduler.gpu_memory_allocated_ratio",
        "1",
        "Share of GPU memory allocated to jobs by pool (what the scale-out signal follows)",
        memory_allocated,
    )
    _gauge(meter, "guardmesh.scheduler.pending_jobs", "{job}", "Jobs waiting for placement", pending)


def observe_abrouter(router: Any) -> None:
    """SRM p-value of the last continuous audit and guardrail state per experiment."""
    meter = metrics.get_meter("guardmesh.abrouter")

    def srm() -> Iterable[Observation]:
        for key, report in list(router.last_audits.items()):
            if not math.isnan(report.srm.p_value):
                yield Observation(report.srm.p_value, {"experiment": key})

    def guardrail() -> Iterable[Observation]:
        for experiment, _exposed in router.list_experiments():
            yield Observation(1.0 if experiment.state.value == "rolled_back" else 0.0, {"experiment": experiment.key})

    def exposed() -> Iterable[Observation]:
        for experiment, count in router.list_experiments():
            yield Observation(float(count), {"experiment": experiment.key})

    _gauge(meter, "guardmesh.abrouter.srm_p_value_ratio", "1", "Sample-ratio mismatch p-value of the last audit", srm)
    _gauge(
        meter, "guardmesh.abrouter.guardrail_state", "", "1 when a guardrail sent traffic back to control", guardrail
    )
    _gauge(meter, "guardmesh.abrouter.exposed_units", "{unit}", "Units with a logged exposure", exposed)


# -- per-RPC metrics (OpenTelemetry semantic conventions for RPC servers) ------------------------------------


@cache
def _rpc_server_duration() -> metrics.Histogram:
    """The process's one ``rpc.server.duration`` instrument (every server of the process records into it)."""
    return metrics.get_meter("guardmesh.rpc").create_histogram(
        "rpc.server.duration",
        unit="ms",
        description="Duration of inbound RPCs, by service, method and gRPC status code",
    )


class RpcServerMetrics(BehaviourInterceptor):
    """``rpc.server.duration`` (milliseconds) of every call, with ``rpc.system``, ``rpc.service``,
    ``rpc.method`` and ``rpc.grpc.status_code``: requests are its count, errors its count by status code.

    One interceptor in the runtime does it for every service; it sees the status a call ended with, including
    the ones the domain-error mapping and the drain gate set.
    """

    def __init__(self) -> None:
        self._duration = _rpc_server_duration()

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """Wrap the handler's behaviour so that its duration and final status are recorded."""
        service, _, name = method.lstrip("/").partition("/")
        # Built once per method: a call picks its attribute set by status code instead of building one.
        base = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        by_code = {code: {**base, "rpc.grpc.status_code": code.value[0]} for code in grpc.StatusCode}
        duration = self._duration
        if is_async(behaviour):
            if streaming:

                async def stream_async(request: Any, context: Any) -> Any:
                    with _Timed(duration, context, by_code, sync=False):
                        async for response in behaviour(request, context):
                            yield response

                return stream_async

            async def unary_async(request: Any, context: Any) -> Any:
                with _Timed(duration, context, by_code, sync=False):
                    return await behaviour(request, context)

            return unary_async
        if streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with _Timed(duration, context, by_code, sync=True):
                    yield from behaviour(request, context)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with _Timed(duration, context, by_code, sync=True):
                return behaviour(request, context)

        return unary


class _Timed:
    """Records one call's duration with the status it ended with, as the block around its behaviour ends."""

    __slots__ = ("began", "by_code", "context", "duration", "sync")

    def __init__(
        self,
        duration: metrics.Histogram,
        context: Any,
        by_code: dict[grpc.StatusCode, dict[str, str | int]],
        *,
        sync: bool,
    ) -> None:
        self.duration = duration
        self.context = context
        self.by_code = by_code
        self.sync = sync
        self.began = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        code = self.context.code()
        if code is None:  # no status set: the behaviour returned (OK), raised (UNKNOWN) or its caller left
            if kind is None:
                code = grpc.StatusCode.OK
            # A caller that left: a sync call is no longer active; on the event loop its task was cancelled.
            elif (not self.context.is_active()) if self.sync else issubclass(kind, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        self.duration.record((time.perf_counter() - self.began) * 1000.0, self.by_code[code])
