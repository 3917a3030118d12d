"""gRPC shell of the abrouter: ``guardmesh.v1.ABRouterService`` over :class:`Router`.

Translates messages to domain objects and back; domain errors become status codes in the runtime's
interceptor. Route's live scorer call goes through the runtime's client factory (discovery, deadline,
retries on UNAVAILABLE, tracing); a scorer error is passed on with its own code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from opentelemetry import trace

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig
from guardmesh.durable import StoreFailure, parse_store_url
from guardmesh.errors import FailedPrecondition, GuardmeshError, InvalidArgument, Unavailable
from guardmesh.leadership import Lease
from guardmesh.monitoring import observe_abrouter
from guardmesh.runtime import ServiceDefinition
from guardmesh.sdk.abrouter import MetricAnalysis
from guardmesh.security import allow
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from guardmesh.v1 import scorer_pb2, scorer_pb2_grpc
from services.abrouter.assignment import AssignmentResult
from services.abrouter.audit import AuditReport, BalanceResult, TestResult
from services.abrouter.bandit import RewardKind
from services.abrouter.experiments import (
    AllocationMode,
    ArmSpec,
    BanditSpec,
    Experiment,
    ExperimentSpec,
    ExperimentState,
    HoldoutSpec,
    NamespaceSpec,
    ShadowSpec,
)
from services.abrouter.export import ExportCorrupt, ExportWorker, ExposureExporter, ExposureStream, SettledExposure
from services.abrouter.guardrails import Guardrail, GuardrailVerdict
from services.abrouter.metrics import MetricKind
from services.abrouter.router import AnalysisOptions, Observation, Router
from services.abrouter.shadow import ScoreCall, ScoreResult
from services.abrouter.store import RouterStore

if TYPE_CHECKING:
    from services.abrouter.warehouse_analysis import ObservationExporter

log = logging.getLogger(__name__)

_STATES = {
    ExperimentState.RUNNING: pb.EXPERIMENT_STATE_RUNNING,
    ExperimentState.STOPPED: pb.EXPERIMENT_STATE_STOPPED,
    ExperimentState.ROLLED_BACK: pb.EXPERIMENT_STATE_ROLLED_BACK,
}
_KINDS = {pb.REWARD_KIND_BERNOULLI: RewardKind.BERNOULLI, pb.REWARD_KIND_GAUSSIAN: RewardKind.GAUSSIAN}
_KINDS_PB = {v: k for k, v in _KINDS.items()}
_METRIC_KINDS = {
    pb.METRIC_KIND_UNSPECIFIED: MetricKind.EVENT,
    pb.METRIC_KIND_EVENT: MetricKind.EVENT,
    pb.METRIC_KIND_CONTINUOUS: MetricKind.CONTINUOUS,
}
_METRIC_KINDS_PB = {MetricKind.EVENT: pb.METRIC_KIND_EVENT, MetricKind.CONTINUOUS: pb.METRIC_KIND_CONTINUOUS}
_EVENTS = {
    "config_changed": pb.ROUTER_EVENT_KIND_CONFIG_CHANGED,
    "srm_alert": pb.ROUTER_EVENT_KIND_SRM_ALERT,
    "guardrail_tripped": pb.ROUTER_EVENT_KIND_GUARDRAIL_TRIPPED,
    "bandit_updated": pb.ROUTER_EVENT_KIND_BANDIT_UPDATED,
    "balance_alert": pb.ROUTER_EVENT_KIND_BALANCE_ALERT,
}


class UpstreamError(GuardmeshError):
    """A call to another service failed; its status code is passed on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


#: Deepest nesting of objects and arrays a targeting condition may have (GrowthBook's are a few levels deep).
MAX_CONDITION_DEPTH = 32
#: Largest bootstrap_resamples an analysis may ask for.
MAX_RESAMPLES = 100_000


def _depth(value: Any) -> int:
    """Nesting depth of JSON objects and arrays (iterative: a deep value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_CONDITION_DEPTH:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def spec_from_pb(m: pb.ExperimentSpec) -> ExperimentSpec:
    """Domain spec with the documented defaults; InvalidArgument for what cannot even be parsed."""
    condition = None
    if m.condition_json:
        try:
            condition = json.loads(m.condition_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument("spec.condition_json", f"not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise InvalidArgument("spec.condition_json", f"nested more than {MAX_CONDITION_DEPTH} levels") from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise InvalidArgument("spec.condition_json", f"not valid JSON ({exc})") from None
        if not isinstance(condition, dict):
            raise InvalidArgument("spec.condition_json", "must be a JSON object")
        if _depth(condition) > MAX_CONDITION_DEPTH:
            raise InvalidArgument("spec.condition_json", f"nested more than {MAX_CONDITION_DEPTH} levels")
    bandit = None
    mode = AllocationMode.BANDIT if m.mode == pb.ALLOCATION_MODE_BANDIT else AllocationMode.FIXED
    if mode is AllocationMode.BANDIT and m.HasField("bandit"):
        if m.bandit.kind not in _KINDS:
            raise InvalidArgument("spec.bandit.kind", "must be REWARD_KIND_BERNOULLI or REWARD_KIND_GAUSSIAN")
        bandit = BanditSpec(
            reward_metric=m.bandit.reward_metric,
            kind=_KINDS[m.bandit.kind],
            update_interval_s=m.bandit.update_interval_s or 60.0,
            min_weight=m.bandit.min_weight,
            min_rewards=m.bandit.min_rewards,
        )
    metric_kinds = {}
    for name, kind in m.metric_kinds.items():
        if kind not in _METRIC_KINDS:
            raise InvalidArgument(f"spec.metric_kinds[{name}]", f"unknown MetricKind {kind}")
        metric_kinds[name] = _METRIC_KINDS[kind]
    return ExperimentSpec(
        key=m.key,
        arms=tuple(ArmSpec(a.name, a.weight, a.model_version) for a in m.arms),
        seed=m.seed,
        coverage=m.coverage if m.HasField("coverage") else 1.0,
        hash_attribute=m.hash_attribute or "id",
        hash_version=m.hash_version or 2,
        condition=condition,
        namespace=NamespaceSpec(m.namespace.name, m.namespace.start, m.namespace.end)
        if m.HasField("namespace")
        else None,
        holdout=HoldoutSpec(m.holdout.name, m.holdout.share) if m.HasField("holdout") else None,
        sticky_bucketing=m.sticky_bucketing,
        metrics=tuple(m.metrics),
        metric_kinds=metric_kinds,
        guardrails=tuple(
            Guardrail(
                metric=g.metric,
                higher_is_better=g.higher_is_better,
                max_relative_drop=g.max_relative_drop or 0.05,
                alpha=g.alpha or 0.05,
                min_units=g.min_units or 100,
            )
            for g in m.guardrails
        ),
        mode=mode,
        bandit=bandit,
        model=m.model,
        shadow=ShadowSpec(m.shadow.version, m.shadow.fraction),
        start_at=m.start_at,
        stop_at=m.stop_at,
    )


def spec_to_pb(s: ExperimentSpec) -> pb.ExperimentSpec:
    """Message form of a spec."""
    m = pb.ExperimentSpec(
        key=s.key,
        seed=s.seed,
        arms=[pb.Arm(name=a.name, weight=a.weight, model_version=a.model_version) for a in s.arms],
        coverage=s.coverage,
        hash_attribute=s.hash_attribute,
        hash_version=s.hash_version,
        condition_json=json.dumps(s.condition) if s.condition else "",
        sticky_bucketing=s.sticky_bucketing,
        metrics=list(s.metrics),
        metric_kinds={name: _METRIC_KINDS_PB[kind] for name, kind in s.metric_kinds.items()},
        mode=pb.ALLOCATION_MODE_BANDIT if s.mode is AllocationMode.BANDIT else pb.ALLOCATION_MODE_FIXED,
        model=s.model,
        shadow=pb.ShadowConfig(version=s.shadow.version, fraction=s.shadow.fraction),
        start_at=s.start_at,
        stop_at=s.stop_at,
    )
    if s.namespace:
        m.namespace.CopyFrom(pb.Namespace(name=s.namespace.name, start=s.namespace.start, end=s.namespace.end))
    if s.holdout:
        m.holdout.CopyFrom(pb.Holdout(name=s.holdout.name, share=s.holdout.share))
    for g in s.guardrails:
        m.guardrails.add(
            metric=g.metric,
            higher_is_better=g.higher_is_better,
            max_relative_drop=g.max_relative_drop,
            alpha=g.alpha,
            min_units=g.min_units,
        )
    if s.bandit:
        m.bandit.CopyFrom(
            pb.BanditConfig(
                reward_metric=s.bandit.reward_metric,
                kind=_KINDS_PB[s.bandit.kind],
                update_interval_s=s.bandit.update_interval_s,
                min_weight=s.bandit.min_weight,
                min_rewards=s.bandit.min_rewards,
            )
        )
    return m


def experiment_to_pb(e: Experiment, exposed: int = 0) -> pb.Experiment:
    """Message form of a stored experiment."""
    return pb.Experiment(
        spec=spec_to_pb(e.spec),
        version=e.version,
        state=_STATES[e.state],
        weights=list(e.weights),
        created_at=e.created_at,
        updated_at=e.updated_at,
        reason=e.reason,
        exposed_units=exposed,
    )


def assignment_to_pb(r: AssignmentResult, logged: bool) -> pb.Assignment:
    """Message form of an assignment."""
    return pb.Assignment(
        experiment_key=r.experiment_key,
        arm=r.arm,
        arm_index=r.arm_index,
        in_experiment=r.in_experiment,
        bucket=r.bucket,
        hash_version=r.hash_version,
        config_version=r.config_version,
        reason=r.reason,
        propensity=r.propensity,
        exposure_logged=logged,
    )


def _test_pb(t: TestResult) -> pb.AuditTest:
    return pb.AuditTest(
        name=t.name,
        test=t.test,
        statistic=t.statistic,
        p_value=t.p_value,
        dof=t.dof,
        alert=t.alert,
        detail=t.detail,
    )


def _balance_pb(b: BalanceResult) -> pb.BalanceResult:
    return pb.BalanceResult(
        covariate=b.covariate,
        window=b.window,
        arm_a=b.arm_a,
        arm_b=b.arm_b,
        test=b.test,
        statistic=b.statistic,
        p_value=b.p_value,
        effect_size=b.effect_size,
        n_a=b.n_a,
        n_b=b.n_b,
        imbalanced=b.imbalanced,
    )


def audit_to_pb(r: AuditReport) -> pb.AuditExperimentResponse:
    """Message form of an audit."""
    s = r.srm
    return pb.AuditExperimentResponse(
        exposures=r.exposures,
        srm=pb.SampleRatioResult(
            chi2=s.chi2,
            p_value=s.p_value,
            observed=list(s.observed),
            expected=list(s.expected),
            max_relative_deviation=s.max_relative_deviation,
            alert=s.alert,
            reason=s.reason,
        ),
        uniformity=_test_pb(r.uniformity),
        clustering=[_test_pb(t) for t in r.clustering],
        balance=[_balance_pb(b) for b in r.balance],
        imbalances=[_balance_pb(b) for b in r.balance if b.imbalanced],
        alert=r.alert,
        seconds=r.seconds,
    )


def _opt(value: float | None) -> float:
    return math.nan if value is None else float(value)


def analysis_to_pb(a: MetricAnalysis, arms: Sequence[str]) -> pb.MetricAnalysis:
    """Message form of one metric's analysis."""
    m = pb.MetricAnalysis(
        metric=a.metric,
        control=arms[a.control],
        treatment=arms[a.treatment],
        n_control=a.n_control,
        n_treatment=a.n_treatment,
        control_mean=a.control_mean,
        treatment_mean=a.treatment_mean,
        effect=a.effect,
        relative_effect=a.relative_effect,
        ci=pb.Interval(low=a.ci.low, high=a.ci.high),
        p_value=a.p_value,
        prob_treatment_better=a.prob_treatment_better,
        cuped_effect=_opt(a.cuped_effect),
        variance_reduction=_opt(a.variance_reduction),
        winsorized_effect=a.winsorized_effect,
        effect_without_top=a.effect_without_top,
        top_share_of_effect=a.top_share_of_effect,
        position_corrected_effect=_opt(a.position_corrected_effect),
        weighted_effect=_opt(a.weighted_effect),
        novelty_slope=a.novelty_slope,
        novelty_p_value=a.novelty_p_value,
        novelty=a.novelty,
        corrected_effect=a.corrected_effect,
        correction_factor=a.correction_factor,
    )
    cuped = a.cuped_ci
    m.cuped_ci.CopyFrom(pb.Interval(low=_opt(cuped.low if cuped else None), high=_opt(cuped.high if cuped else None)))
    for d in a.daily:
        m.daily.add(day=d.day, effect=d.effect, n_control=d.n_control, n_treatment=d.n_treatment)
    return m


def verdict_to_pb(v: GuardrailVerdict, arms: Sequence[str]) -> pb.GuardrailVerdict:
    """Message form of one guardrail verdict."""
    return pb.GuardrailVerdict(
        metric=v.metric,
        arm=arms[v.arm],
        n_control=v.n_control,
        n_arm=v.n_arm,
        control_mean=v.control_mean,
        arm_mean=v.arm_mean,
        relative_change=v.relative_change,
        upper_bound=v.bound,
        sequential_p_value=v.p_value,
        tripped=v.tripped,
        reason=v.reason,
    )


def _attributes(m: Any, field: str = "attributes") -> dict[str, Any]:
    """A Struct as a dict; InvalidArgument naming ``field`` for what JSON cannot hold (NaN, Infinity)."""
    if m is None:
        return {}
    try:
        return json_format.MessageToDict(m)
    except ValueError as exc:
        raise InvalidArgument(field, f"numbers must be finite ({exc})") from None


#: Seconds a live exposure stream waits before it looks for newly settled exposures again.
WATCH_POLL_S = 0.2


def exposure_to_pb(e: SettledExposure) -> pb.Exposure:
    """One settled exposure as its message (the exposure table's columns)."""
    row = e.row
    return pb.Exposure(
        exposure_id=e.exposure_id,
        time=row.at,
        experiment=row.key,
        revision=row.config_version,
        unit=row.unit,
        arm=row.arm,
        arm_name=e.arm_name,
        bucket=row.bucket,
        hash_version=e.hash_version,
        propensity=row.propensity,
        numeric_covariates=dict(row.numeric),
        categorical_covariates=dict(row.categorical),
    )


class ABRouterServicer(pb_grpc.ABRouterServiceServicer):
    """Implements ``guardmesh.v1.ABRouterService`` over :class:`Router`."""

    def __init__(self) -> None:
        self._router: Router | None = None
        self.exporter: ExportWorker | None = None
        self._observations: ObservationExporter | None = None
        #: Set when the server drains: live streams end (OK) so the grace period is not spent on them.
        self.draining = threading.Event()

    @property
    def router(self) -> Router:
        """The router; UNAVAILABLE until started."""
        if self._router is None:
            raise Unavailable("abrouter is starting")
        return self._router

    def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: grpc.ServicerContext
    ) -> pb.CreateExperimentResponse:
        """See the proto."""
        exp = self.router.create(spec_from_pb(request.spec))
        return pb.CreateExperimentResponse(experiment=experiment_to_pb(exp))

    def UpdateExperiment(
        self, request: pb.UpdateExperimentRequest, context: grpc.ServicerContext
    ) -> pb.UpdateExperimentResponse:
        """See the proto."""
        exp = self.router.update(spec_from_pb(request.spec), request.expected_version, request.comment)
        _, exposed = self.router.get(exp.key)
        return pb.UpdateExperimentResponse(experiment=experiment_to_pb(exp, exposed))

    def StopExperiment(
        self, request: pb.StopExperimentRequest, context: grpc.ServicerContext
    ) -> pb.StopExperimentResponse:
        """See the proto."""
        exp = self.router.stop(request.key, request.reason)
        _, exposed = self.router.get(exp.key)
        return pb.StopExperimentResponse(experiment=experiment_to_pb(exp, exposed))

    def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.ServicerContext
    ) -> pb.GetExperimentResponse:
        """See the proto."""
        exp, exposed = self.router.get(request.key)
        return pb.GetExperimentResponse(experiment=experiment_to_pb(exp, exposed))

    def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> pb.ListExperimentsResponse:
        """See the proto."""
        return pb.ListExperimentsResponse(
            experiments=[experiment_to_pb(e, n) for e, n in self.router.list_experiments()]
        )

    def GetExperimentHistory(
        self, request: pb.GetExperimentHistoryRequest, context: grpc.ServicerContext
    ) -> pb.GetExperimentHistoryResponse:
        """See the proto."""
        resp = pb.GetExperimentHistoryResponse()
        for version, at, change, comment, exp in self.router.history(request.key):
            resp.revisions.add(version=version, at=at, change=change, comment=comment, experiment=experiment_to_pb(exp))
        return resp

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignResponse:
        """See the proto."""
        results = self.router.assign(
            request.unit_id,
            _attributes(request.attributes),
            list(request.experiment_keys),
            log_exposure=request.log_exposure,
            numeric=dict(request.covariates.numeric),
            categorical=dict(request.covariates.categorical),
            timestamp=request.timestamp,
        )
        span = trace.get_current_span()
        for r, _ in results:
            span.set_attribute(f"guardmesh.arm.{r.experiment_key}", r.arm if r.in_experiment else "")
        return pb.AssignResponse(assignments=[assignment_to_pb(r, logged) for r, logged in results])

    def AssignBatch(self, request: pb.AssignBatchRequest, context: grpc.ServicerContext) -> pb.AssignBatchResponse:
        """See the proto."""
        arms, buckets, exp = self.router.assign_batch(request.experiment_key, request.unit_ids)
        return pb.AssignBatchResponse(
            arm_indices=arms.tolist(),
            buckets=buckets.tolist(),
            arms=[a.name for a in exp.spec.arms],
            config_version=exp.version,
        )

    def Route(self, request: pb.RouteRequest, context: grpc.ServicerContext) -> pb.RouteResponse:
        """See the proto."""
        result, logged, live, shadowed = self.router.route(
            request.experiment_key,
            request.unit_id,
            _attributes(request.attributes),
            request.request_id,
            dict(request.features),
            log_exposure=request.log_exposure,
            numeric=dict(request.covariates.numeric),
            categorical=dict(request.covariates.categorical),
        )
        score = live.raw if isinstance(live.raw, scorer_pb2.ScoreResponse) else scorer_pb2.ScoreResponse()
        span = trace.get_current_span()
        span.set_attribute("guardmesh.experiment", request.experiment_key)
        span.set_attribute("guardmesh.arm", result.arm)
        span.set_attribute("guardmesh.in_experiment", result.in_experiment)
        span.set_attribute("guardmesh.config_version", result.config_version)
        span.set_attribute("guardmesh.model_version", score.model_version)
        span.set_attribute("guardmesh.decision", score.decision)
        span.set_attribute("guardmesh.decision_path", score.path)
        span.set_attribute("guardmesh.threshold", score.threshold)
        span.set_attribute("guardmesh.drift_score", score.drift_score)
        span.set_attribute("guardmesh.shadowed", shadowed)
        return pb.RouteResponse(assignment=assignment_to_pb(result, logged), score=score, shadowed=shadowed)

    def ExportExposures(
        self, request: pb.ExportExposuresRequest, context: grpc.ServicerContext
    ) -> pb.ExportExposuresResponse:
        """See the proto."""
        if self.exporter is None:
            raise FailedPrecondition("export is off: abrouter.export_url is empty")
        exported, done = self._export_now()
        return pb.ExportExposuresResponse(
            exported=exported, exported_through=done, table_url=self.exporter.exporter.url
        )

    def _export_now(self, observations: bool = False) -> tuple[int, int]:
        """Export rounds until the table is current: (exposures written, highest id in the table); with
        ``observations``, the store's settled observations to the observation table beside it too."""
        assert self.exporter is not None
        try:
            with self.exporter.lock:  # not at the same time as the continuous rounds (nor two observation rounds)
                exported = 0
                while True:
                    written = self.exporter.exporter.export_once()
                    exported += written
                    if written < self.exporter.exporter.batch_rows:
                        break
                if observations:
                    self._observation_exporter().export_once()
                return exported, self.exporter.exporter.state()[0]
        except (StoreFailure, OSError) as exc:
            raise Unavailable(f"exposure export failed: {exc}") from exc

    def _observation_exporter(self) -> ObservationExporter:
        """The observation table's exporter (one per process: its wait for ids still committing spans calls)."""
        from services.abrouter.warehouse_analysis import ObservationExporter, observation_table_url

        assert self.exporter is not None
        if self._observations is None:
            url = observation_table_url(self.exporter.exporter.url)
            self._observations = ObservationExporter(self.exporter.exporter.store, url)
        return self._observations

    def _current_table(self, observations: bool = False) -> str:
        """The exposure table's URL once exported up to now (with ``observations``, the observation table beside
        it too), for the ``from_table`` requests; FAILED_PRECONDITION naming the setting when export is off."""
        if self.exporter is None:
            raise FailedPrecondition("from_table: export is off (abrouter.export_url is empty)")
        self._export_now(observations)
        return self.exporter.exporter.url

    def current_tables(self, observations: bool) -> tuple[str, str]:
        """The exposure and observation tables' URLs, exported up to now (with ``observations``, that table too):
        what the router's audits and analysis read with abrouter.exposures_in_memory = false."""
        url = self._current_table(observations)
        return url, self._observation_exporter().url

    def WatchExposures(
        self, request: pb.WatchExposuresRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchExposuresResponse]:
        """See the proto."""
        if request.after_exposure_id < 0:
            raise InvalidArgument("after_exposure_id", "must be >= 0")
        router = self.router
        if request.experiment_key:
            router.get(request.experiment_key)  # NOT_FOUND names it
        if router.store is None:
            raise FailedPrecondition("the live exposure stream needs the durable store")
        stream = ExposureStream(router.store, request.after_exposure_id, request.experiment_key)
        while context.is_active() and not self.draining.is_set():
            with router.store_reads("the exposure log"):  # the store away ends the stream UNAVAILABLE
                batch = stream.next_batch()
            if batch:
                yield pb.WatchExposuresResponse(exposures=[exposure_to_pb(e) for e in batch])
            else:
                self.draining.wait(WATCH_POLL_S)

    def RecordMetrics(
        self, request: pb.RecordMetricsRequest, context: grpc.ServicerContext
    ) -> pb.RecordMetricsResponse:
        """See the proto."""
        observations = [
            Observation(o.unit_id, o.metric, o.value, o.arm, o.timestamp, o.pre_period) for o in request.observations
        ]
        return pb.RecordMetricsResponse(recorded=self.router.record_metrics(request.experiment_key, observations))

    def AuditExperiment(
        self, request: pb.AuditExperimentRequest, context: grpc.ServicerContext
    ) -> pb.AuditExperimentResponse:
        """See the proto."""
        if request.from_table:
            url = self._current_table()
            with _reading_tables():
                report = self.router.audit_from_table(
                    url,
                    request.key,
                    list(request.other_experiments),
                    request.min_sample,
                    request.min_deviation,
                    list(request.window_covariates),
                )
        else:
            report = self.router.audit(
                request.key,
                list(request.other_experiments),
                request.min_sample,
                request.min_deviation,
                list(request.window_covariates),
            )
        span = trace.get_current_span()
        span.set_attribute("guardmesh.srm_p_value", report.srm.p_value)
        span.set_attribute("guardmesh.audit_alert", report.alert)
        return audit_to_pb(report)

    def CheckBalance(self, request: pb.CheckBalanceRequest, context: grpc.ServicerContext) -> pb.CheckBalanceResponse:
        """See the proto."""
        units = [
            (
                u.unit_id,
                _attributes(u.attributes, f"units[{i}].attributes"),
                dict(u.covariates.numeric),
                dict(u.covariates.categorical),
                u.timestamp,
            )
            for i, u in enumerate(request.units)
        ]
        counts, balance = self.router.check_balance(request.key, units)
        return pb.CheckBalanceResponse(
            units_per_arm=counts,
            balance=[_balance_pb(b) for b in balance],
            imbalances=[_balance_pb(b) for b in balance if b.imbalanced],
        )

    def AnalyzeExperiment(
        self, request: pb.AnalyzeExperimentRequest, context: grpc.ServicerContext
    ) -> pb.AnalyzeExperimentResponse:
        """See the proto."""
        if request.aggregate not in ("", "sum", "mean"):
            raise InvalidArgument("aggregate", f"must be 'sum' or 'mean', got '{request.aggregate}'")
        if request.bootstrap_resamples and not 10 <= request.bootstrap_resamples <= MAX_RESAMPLES:
            raise InvalidArgument("bootstrap_resamples", f"must be 0 (2000) or 10 to {MAX_RESAMPLES:,}")
        if request.seed < 0:
            raise InvalidArgument("seed", "must be >= 0")
        options = AnalysisOptions(
            metrics=tuple(request.metrics),
            n_resamples=request.bootstrap_resamples or 2000,
            confidence=request.confidence or 0.95,
            winsor_quantile=request.winsor_quantile or 0.99,
            position_covariate=request.position_covariate,
            reweight_covariates=tuple(request.reweight_covariates),
            inverse_propensity=request.inverse_propensity,
            aggregate=request.aggregate,
            seed=request.seed,
        )
        if request.from_table:
            from services.abrouter.warehouse_analysis import analyze_table  # DuckDB only where asked for

            exp, _ = self.router.get(request.key)  # NOT_FOUND before any export
            url = self._current_table(observations=True)
            with _reading_tables():
                results, exposed = analyze_table(url, self._observation_exporter().url, exp, options)
        else:
            results, exp, exposed = self.router.analyze(request.key, options)
        arms = [a.name for a in exp.spec.arms]
        return pb.AnalyzeExperimentResponse(
            metrics=[analysis_to_pb(a, arms) for a in results], arms=arms, exposed_units=exposed
        )

    def GetShadowReport(
        self, request: pb.GetShadowReportRequest, context: grpc.ServicerContext
    ) -> pb.GetShadowReportResponse:
        """See the proto."""
        s = self.router.shadow_report(request.key)
        return pb.GetShadowReportResponse(
            shadow_version=s.shadow_version,
            mirrored=s.mirrored,
            compared=s.compared,
            dropped=s.dropped,
            errors=s.errors,
            decision_agreement=s.decision_agreement,
            mean_abs_score_diff=s.mean_abs_score_diff,
        )

    def GetGuardrailStatus(
        self, request: pb.GetGuardrailStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetGuardrailStatusResponse:
        """See the proto."""
        verdicts, exp = self.router.guardrail_status(request.key)
        arms = [a.name for a in exp.spec.arms]
        return pb.GetGuardrailStatusResponse(
            verdicts=[verdict_to_pb(v, arms) for v in verdicts], state=_STATES[exp.state]
        )

    def ListRouterEvents(
        self, request: pb.ListRouterEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListRouterEventsResponse:
        """See the proto."""
        return pb.ListRouterEventsResponse(
            events=[
                pb.RouterEvent(
                    seq=e.seq, kind=_EVENTS[e.kind], experiment_key=e.experiment_key, at=e.at, message=e.message
                )
                for e in self.router.list_events(request.experiment_key, request.after_seq)
            ]
        )


@contextlib.contextmanager
def _reading_tables() -> Iterator[None]:
    """A Parquet table that cannot be read (corrupt, cut short: ExportCorrupt names it) answers UNAVAILABLE."""
    try:
        yield
    except ExportCorrupt as exc:
        raise Unavailable(str(exc)) from exc


class ScorerClient:
    """Route's scorer calls over gRPC (a channel opened on first use, through discovery)."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self._stub: scorer_pb2_grpc.ScorerServiceStub | None = None
        self._channel: grpc.Channel | None = None

    def __call__(self, call: ScoreCall) -> ScoreResult:
        """Score one call; UpstreamError carries the scorer's status."""
        if self._stub is None:
            self._channel = open_channel("scorer", self.config)
            self._stub = scorer_pb2_grpc.ScorerServiceStub(self._channel)
        request = scorer_pb2.ScoreRequest(
            model=call.model,
            request_id=call.request_id,
            features=dict(call.features),
            version=call.version,
            experiment=call.experiment,
            arm=call.arm,
            shadow=call.shadow,
        )
        try:
            resp = self._stub.Score(request, timeout=self.config.abrouter.scorer_deadline_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            details = err.details() if hasattr(err, "details") else str(err)
            raise UpstreamError(code, f"scorer: {details}") from None
        return ScoreResult(resp.score, resp.decision, resp.model_version, resp)

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()


class ABRouterBinding:
    """The abrouter's servicer and resources."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.servicer = ABRouterServicer()
        self.store: RouterStore | None = None
        self.exporter: ExportWorker | None = None
        self.scorer = ScorerClient(config)

    def add_to_server(self, server: grpc.Server) -> None:
        """Add ABRouterService."""
        pb_grpc.add_ABRouterServiceServicer_to_server(self.servicer, server)

    def start(self) -> None:
        """Open the store, restore state, start the periodic checks."""
        settings = self.config.abrouter
        url = settings.store_url or str(self.config.state_path(settings.db_path))
        self.store = RouterStore(parse_store_url(url, self.config.mesh.state_dir), settings.sqlite_synchronous)
        router = Router(settings, self.store, scoring=self.scorer)
        router.on_fail_stop = getattr(self, "fail_stop", None)
        router.on_store = getattr(self, "set_serving", None)  # NOT_SERVING while the store is away
        router.restore()
        # One holder per live process: host, bound port and pid (two lives of one port never overlap).
        port = getattr(self, "bound_port", 0)
        replica = f"{socket.gethostname()}:{port}/{os.getpid()}"
        router.start(replica=replica)
        if settings.export_url:
            url = settings.export_url
            url = url if "://" in url else str(self.config.state_path(url))
            lease = None
            if self.store.shared:  # one exporter among the replicas
                ttl = max(3 * settings.export_interval_s, 2.0)
                lease = Lease(self.store.log, "abrouter-export", replica, replica, ttl)
            self.exporter = ExportWorker(
                ExposureExporter(self.store, url), settings.export_interval_s, lease, settings.retention_s
            )
            self.exporter.start()
            self.servicer.exporter = self.exporter
            router.tables = self.servicer.current_tables  # abrouter.exposures_in_memory = false reads them
        if self.config.metrics.enabled:
            observe_abrouter(router)
        self.servicer._router = router

    def drain(self) -> None:
        """End the live exposure streams."""
        self.servicer.draining.set()

    def close(self) -> None:
        """Stop the checks and the shadow workers, flush and close the store and the scorer channel."""
        if self.servicer._router is not None:
            self.servicer._router.close()
        if self.exporter is not None:
            self.exporter.close()
        if self.store is not None:
            self.store.close()
        self.scorer.close()


_ABROUTER = pb.DESCRIPTOR.services_by_name["ABRouterService"].full_name
SERVICE = ServiceDefinition(
    name="abrouter",
    service_names=(_ABROUTER,),
    build=ABRouterBinding,
    # Applications get assignments and send metrics; experiments, audits and analyses are admin's.
    roles=allow(_ABROUTER, ("app",), "Assign", "AssignBatch", "Route", "RecordMetrics"),
)
