"""The monitoring matrix as OpenTelemetry metrics: what each service exports for Prometheus and its alert.

| metric | service | alert (README) |
| --- | --- | --- |
| ``guardmesh_scorer_f1`` / ``guardmesh_scorer_f1_drop`` | scorer | drop >= 0.05 of baseline: rollback |
| ``guardmesh_scorer_feature_missing_rate`` | scorer | > 0.02: cleaning (impute or reject) |
| ``guardmesh_scorer_drift_score`` | scorer | > 0.5: threshold adapts, investigate |
| ``guardmesh_scheduler_gpu_utilization`` (by pool) | scheduler | >= 0.9 held: scale out |
| ``guardmesh_scheduler_pending_jobs`` | scheduler | > 0 for minutes: capacity |
| ``guardmesh_abrouter_srm_p_value`` | abrouter | < 0.001: sample-ratio mismatch |
| ``guardmesh_abrouter_guardrail_state`` | abrouter | 1: rolled back to control |
| ``guardmesh_paramserver_staleness`` / ``_pushes`` | paramserver | rejected share > 0.2: stragglers |

Gauges are observed when Prometheus scrapes (callbacks read the live state, nothing is polled meanwhile).
Each ``observe_*`` function registers the instruments of one service's core; the core knows nothing of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

Callback = Callable[[CallbackOptions], Iterable[Observation]]


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

    _gauge(meter, "guardmesh.scorer.f1", "1", "Rolling F1 of a model version from feedback labels", f1)
    _gauge(meter, "guardmesh.scorer.f1_drop", "1", "Relative F1 drop from the version's baseline", f1_drop)
    _gauge(meter, "guardmesh.scorer.feature_missing_rate", "1", "Share of the live window missing a feature", missing)
    _gauge(meter, "guardmesh.scorer.drift_score", "1", "Drift score between reference and live windows", drift)


def observe_scheduler(core: Any) -> None:
    """GPU memory utilisation by pool (GPU model) and pending jobs."""
    meter = metrics.get_meter("guardmesh.scheduler")

    def utilization() -> Iterable[Observation]:
        used: dict[str, float] = {}
        total: dict[str, float] = {}
        for node in core.list_nodes():
            for gpu in node.gpus:
                total[gpu.model] = total.get(gpu.model, 0.0) + gpu.memory_mib
                used[gpu.model] = used.get(gpu.model, 0.0) + sum(cap for _, _, cap, _ in gpu.allocations)
        for pool, cap in total.items():
            if cap:
                yield Observation(used[pool] / cap, {"pool": pool})

    def pending() -> Iterable[Observation]:
        yield Observation(float(sum(j.state.name == "PENDING" for j in core.list_jobs())), {})

    _gauge(meter, "guardmesh.scheduler.gpu_utilization", "1", "Allocated share of GPU memory by pool", utilization)
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

    _gauge(meter, "guardmesh.abrouter.srm_p_value", "1", "Sample-ratio mismatch p-value of the last audit", srm)
    _gauge(
        meter, "guardmesh.abrouter.guardrail_state", "1", "1 when a guardrail sent traffic back to control", guardrail
    )
    _gauge(meter, "guardmesh.abrouter.exposed_units", "{unit}", "Units with a logged exposure", exposed)
