"""Application-side client of the A/B router: experiments, assignment, routing, metrics, audit, analysis.

::

    from guardmesh.sdk import ABRouterClient

    with ABRouterClient() as ab:
        ab.create_experiment("checkout", {"control": 0.5, "treatment": 0.5}, metrics=["converted"])
        arm = ab.assign_one("user-42", "checkout", log_exposure=True, covariates={"device": "ios"}).arm
        ab.record_metrics("checkout", [("user-42", "converted", 1.0)])
        report = ab.analyze("checkout")

Every call goes through :func:`guardmesh.client.open_channel`; server errors reach the caller as
:class:`grpc.RpcError` with the status code the proto documents (INVALID_ARGUMENT names the field).

Results are light frozen dataclasses; :class:`AuditReport` and :class:`Analysis` also keep the full
proto message as ``raw`` for the figures they do not lift out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

from google.protobuf import struct_pb2

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.sdk.scorer import Score, new_request_id
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

_STATES = {
    pb.EXPERIMENT_STATE_RUNNING: "running",
    pb.EXPERIMENT_STATE_STOPPED: "stopped",
    pb.EXPERIMENT_STATE_ROLLED_BACK: "rolled_back",
}
_REWARDS = {"bernoulli": pb.REWARD_KIND_BERNOULLI, "gaussian": pb.REWARD_KIND_GAUSSIAN}
_METRIC_KINDS = {"event": pb.METRIC_KIND_EVENT, "continuous": pb.METRIC_KIND_CONTINUOUS}


@dataclass(frozen=True)
class Arm:
    """One arm: its name, weight and (for Route) the scorer model version it serves."""

    name: str
    weight: float
    model_version: str = ""


@dataclass(frozen=True)
class Guardrail:
    """Send all traffic back to control when an arm degrades ``metric`` beyond the bound."""

    metric: str
    higher_is_better: bool = True
    #: Relative degradation that trips it, in (0, 1).
    max_relative_drop: float = 0.05
    #: One-sided significance level of the sequential (always-valid) degradation test.
    alpha: float = 0.05
    #: Units each arm needs before it can trip.
    min_units: int = 100


@dataclass(frozen=True)
class GuardrailCheck:
    """One guardrail, one treatment arm against control, at one look (see ``GuardrailVerdict`` in the proto)."""

    metric: str
    arm: str
    n_control: int
    n_arm: int
    #: Relative change in the better direction (negative = worse).
    relative_change: float
    #: Always-valid upper confidence bound of the relative change; trips below -max_relative_drop.
    upper_bound: float
    #: Always-valid one-sided p-value of "worse than the bound".
    sequential_p_value: float
    tripped: bool
    reason: str


@dataclass(frozen=True)
class Bandit:
    """Thompson sampling on ``reward_metric``: weights move every ``update_interval_s``."""

    reward_metric: str
    kind: Literal["bernoulli", "gaussian"] = "bernoulli"
    update_interval_s: float = 60.0
    #: Exploration floor of every arm's weight.
    min_weight: float = 0.05
    #: Rewards needed in total before the first update.
    min_rewards: int = 0


class ExperimentOptions(TypedDict, total=False):
    """Keyword arguments of an experiment spec (see ``ExperimentSpec`` in ``abrouter.proto``)."""

    #: Hashing seed; default: the key.
    seed: str
    #: Share of units included, in [0, 1]; default 1.
    coverage: float
    #: Attribute hashed: "id" (the unit id, default) or another attribute such as "device_id".
    hash_attribute: str
    #: GrowthBook hash version, 1 or 2 (default 2).
    hash_version: int
    #: GrowthBook targeting condition over the unit's attributes (a dict, or its JSON).
    condition: Mapping[str, Any] | str
    #: Namespace range ``(name, start, end)`` for mutually exclusive experiments.
    namespace: tuple[str, float, float]
    #: Holdout ``(name, share)``.
    holdout: tuple[str, float]
    #: Keep each unit's first arm when weights change (default: True for a bandit, which requires it).
    sticky: bool
    #: Metrics that may be recorded.
    metrics: Sequence[str]
    #: What a metric's value per unit is: "event" (sum, silent units 0; the default) or "continuous" (mean).
    metric_kinds: Mapping[str, Literal["event", "continuous"]]
    #: Guardrails on those metrics.
    guardrails: Sequence[Guardrail]
    #: Thompson-sampling allocation instead of fixed weights.
    bandit: Bandit
    #: Scorer model served by :meth:`ABRouterClient.route`.
    model: str
    #: Scorer model version per arm name (for Route); arms not named serve the active version.
    model_versions: Mapping[str, str]
    #: Shadow traffic ``(version, fraction)`` for Route.
    shadow: tuple[str, float]
    #: Unix seconds before which no unit is in the experiment.
    start_at: float
    #: Unix seconds from which the experiment counts as stopped.
    stop_at: float


def experiment_spec(
    key: str, arms: Mapping[str, float] | Sequence[Arm], **options: Unpack[ExperimentOptions]
) -> pb.ExperimentSpec:
    """Build an ``ExperimentSpec``. ``arms`` maps names to weights (control first) or lists :class:`Arm`.

    Weights must sum to 1 within GrowthBook's slack (0.99..1.01; the router stores them normalised): the router
    refuses them otherwise (INVALID_ARGUMENT), as it does every other broken rule.
    """
    arm_list = [Arm(n, float(w)) for n, w in arms.items()] if isinstance(arms, Mapping) else list(arms)
    versions = dict(options.get("model_versions", {}))
    unknown = set(versions) - {a.name for a in arm_list}
    if unknown:
        raise ValueError(f"model_versions names arms that do not exist: {sorted(unknown)}")
    condition = options.get("condition", "")
    spec = pb.ExperimentSpec(
        key=key,
        seed=options.get("seed", ""),
        arms=[
            pb.Arm(name=a.name, weight=a.weight, model_version=versions.get(a.name, a.model_version)) for a in arm_list
        ],
        hash_attribute=options.get("hash_attribute", "id"),
        hash_version=options.get("hash_version", 0),
        condition_json=condition if isinstance(condition, str) else json.dumps(dict(condition)),
        sticky_bucketing=options.get("sticky", "bandit" in options),
        metrics=list(options.get("metrics", ())),
        metric_kinds={name: _METRIC_KINDS[kind] for name, kind in options.get("metric_kinds", {}).items()},
        guardrails=[
            pb.Guardrail(
                metric=g.metric,
                higher_is_better=g.higher_is_better,
                max_relative_drop=g.max_relative_drop,
                alpha=g.alpha,
                min_units=g.min_units,
            )
            for g in options.get("guardrails", ())
        ],
        model=options.get("model", ""),
        start_at=options.get("start_at", 0.0),
        stop_at=options.get("stop_at", 0.0),
    )
    if "coverage" in options:
        spec.coverage = options["coverage"]
    if "namespace" in options:
        name, start, end = options["namespace"]
        spec.namespace.CopyFrom(pb.Namespace(name=name, start=start, end=end))
    if "holdout" in options:
        name, share = options["holdout"]
        spec.holdout.CopyFrom(pb.Holdout(name=name, share=share))
    if "bandit" in options:
        b = options["bandit"]
        spec.mode = pb.ALLOCATION_MODE_BANDIT
        spec.bandit.CopyFrom(
            pb.BanditConfig(
                reward_metric=b.reward_metric,
                kind=_REWARDS[b.kind],
                update_interval_s=b.update_interval_s,
                min_weight=b.min_weight,
                min_rewards=b.min_rewards,
            )
        )
    else:
        spec.mode = pb.ALLOCATION_MODE_FIXED
    if "shadow" in options:
        version, fraction = options["shadow"]
        spec.shadow.CopyFrom(pb.ShadowConfig(version=version, fraction=fraction))
    return spec


@dataclass(frozen=True)
class Experiment:
    """An experiment as stored: config version, state, arms and the weights in force."""

    key: str
    #: Config version: 1 at creation, +1 on every change.
    version: int
    #: "running", "stopped" or "rolled_back".
    state: str
    arms: list[str]
    #: Weights in force (the spec's, the bandit's, or all on control after a rollback).
    weights: list[float]
    exposed_units: int
    #: Why it was stopped or rolled back.
    reason: str
    created_at: float
    updated_at: float
    spec: pb.ExperimentSpec = field(repr=False)

    @classmethod
    def from_pb(cls, msg: pb.Experiment) -> Experiment:
        """Convert an ``Experiment`` message."""
        return cls(
            key=msg.spec.key,
            version=msg.version,
            state=_STATES.get(msg.state, "unspecified"),
            arms=[a.name for a in msg.spec.arms],
            weights=list(msg.weights),
            exposed_units=msg.exposed_units,
            reason=msg.reason,
            created_at=msg.created_at,
            updated_at=msg.updated_at,
            spec=msg.spec,
        )


@dataclass(frozen=True)
class Assignment:
    """The arm one unit got in one experiment, with how and why."""

    experiment_key: str
    #: Arm name (control's when the unit is not in the experiment).
    arm: str
    #: -1 when the unit is not in the experiment.
    arm_index: int
    in_experiment: bool
    #: The unit's hash value in [0, 1).
    bucket: float
    hash_version: int
    config_version: int
    #: "assigned", "sticky", "not_targeted", "not_in_namespace", "held_out", "not_covered", ...
    reason: str
    #: Probability of landing in this arm under the weights in force.
    propensity: float
    exposure_logged: bool

    @classmethod
    def from_pb(cls, msg: pb.Assignment) -> Assignment:
        """Convert an ``Assignment`` message."""
        return cls(
            msg.experiment_key,
            msg.arm,
            msg.arm_index,
            msg.in_experiment,
            msg.bucket,
            msg.hash_version,
            msg.config_version,
            msg.reason,
            msg.propensity,
            msg.exposure_logged,
        )


@dataclass(frozen=True)
class BatchAssignment:
    """Offline assignment of many units to one experiment (parallel lists, one entry per unit)."""

    unit_ids: list[str]
    #: Arm index per unit; -1 when not in the experiment.
    arm_indices: list[int]
    buckets: list[float]
    #: Arm names, by index.
    arms: list[str]
    config_version: int

    def arm_of(self, i: int) -> str | None:
        """Arm name of the i-th unit, None when it is not in the experiment."""
        index = self.arm_indices[i]
        return self.arms[index] if index >= 0 else None


@dataclass(frozen=True)
class Routed:
    """Answer of :meth:`ABRouterClient.route`: the assignment and the arm's model decision."""

    assignment: Assignment
    score: Score
    #: Whether the request was also queued for the shadow model version.
    shadowed: bool


@dataclass(frozen=True)
class Observation:
    """One metric observation of one exposed unit (``pre_period``: a CUPED covariate value)."""

    unit_id: str
    metric: str
    value: float
    #: Arm the caller believes the unit is in; checked when given.
    arm: str = ""
    #: Unix seconds; 0: now.
    timestamp: float = 0.0
    pre_period: bool = False


@dataclass(frozen=True)
class SampleRatio:
    """The sample-ratio mismatch test."""

    chi2: float
    p_value: float
    observed: list[int]
    expected: list[float]
    max_relative_deviation: float
    alert: bool
    reason: str


@dataclass(frozen=True)
class Imbalance:
    """A covariate whose distribution differs between control and a treatment arm."""

    covariate: str
    #: "all", "day:...", "week:...", "season:...", "device:...".
    window: str
    arm_a: int
    arm_b: int
    #: "ks" or "chi2".
    test: str
    p_value: float
    #: Standardised mean difference (continuous) or Cramér's V (categorical).
    effect_size: float


@dataclass(frozen=True)
class AuditReport:
    """An experiment's audit: SRM, hash uniformity, clustering alerts and covariate imbalances."""

    alert: bool
    exposures: int
    srm: SampleRatio
    uniformity_p_value: float
    #: Names of the clustering tests that alert ("id_sequential", "carry_over:<key>", ...).
    clustering_alerts: list[str]
    imbalances: list[Imbalance]
    raw: pb.AuditExperimentResponse = field(repr=False)


@dataclass(frozen=True)
class MetricEffect:
    """One metric's effect for one treatment arm against control."""

    metric: str
    control: str
    treatment: str
    n_control: int
    n_treatment: int
    control_mean: float
    treatment_mean: float
    #: Treatment mean minus control mean.
    effect: float
    relative_effect: float
    #: Bootstrap confidence interval of the effect.
    ci: tuple[float, float]
    #: Welch t-test p-value.
    p_value: float
    prob_treatment_better: float
    #: NaN when no pre-period values were recorded.
    cuped_effect: float
    #: Effect after every applicable correction, and corrected / raw.
    corrected_effect: float
    correction_factor: float
    novelty: bool
    raw: pb.MetricAnalysis = field(repr=False)


@dataclass(frozen=True)
class Analysis:
    """An experiment's analysis: one :class:`MetricEffect` per metric and treatment arm."""

    arms: list[str]
    exposed_units: int
    effects: list[MetricEffect]
    raw: pb.AnalyzeExperimentResponse = field(repr=False)

    def effect(self, metric: str, treatment: str | None = None) -> MetricEffect:
        """The effect of ``metric`` (for ``treatment``, default the first treatment arm); KeyError if absent."""
        for e in self.effects:
            if e.metric == metric and (treatment is None or e.treatment == treatment):
                return e
        raise KeyError(f"no analysis of metric {metric!r}" + (f" for arm {treatment!r}" if treatment else ""))


@dataclass(frozen=True)
class Interval:
    """A confidence interval."""

    low: float
    high: float

    @property
    def width(self) -> float:
        """``high - low``."""
        return self.high - self.low

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high``."""
        return self.low <= value <= self.high


@dataclass(frozen=True)
class DailyEffect:
    """The effect among units active on one whole day since their first exposure."""

    day: int
    effect: float
    n_control: int
    n_treatment: int


@dataclass(frozen=True)
class MetricAnalysis:
    """One metric, one treatment arm against control (see the module docstring for every definition)."""

    metric: str
    control: int
    treatment: int
    n_control: int
    n_treatment: int
    control_mean: float
    treatment_mean: float
    effect: float
    relative_effect: float
    ci: Interval
    p_value: float
    prob_treatment_better: float
    cuped_effect: float | None
    cuped_ci: Interval | None
    variance_reduction: float | None
    winsorized_effect: float
    effect_without_top: float
    top_share_of_effect: float
    position_corrected_effect: float | None
    weighted_effect: float | None
    daily: tuple[DailyEffect, ...]
    novelty_slope: float
    novelty_p_value: float
    novelty: bool
    corrected_effect: float
    correction_factor: float
    primacy: bool = False
    """Mirror of ``novelty``: the effect grows (slope > 0, p < 0.05, early < late)."""
    early_effect: float = math.nan
    """Inverse-variance mean of the daily effects of days 0-2."""
    late_effect: float = math.nan
    """Inverse-variance mean of the daily effects of the last third of the usable days."""
    ci_method: str = ""
    """How ``ci`` was computed (path and resamples)."""
    detail: str = ""
    """Human-readable findings: novelty/primacy, heavy users, position bias, correction factor."""


# --------------------------------------------------------------------------------------------------- validation


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def analysis_from_pb(m: pb.MetricAnalysis, arms: Sequence[str]) -> MetricAnalysis:
    """The full record of one metric's analysis from its message (reports such as ``abrouter report`` render it)."""
    cuped = None if math.isnan(m.cuped_ci.low) else Interval(m.cuped_ci.low, m.cuped_ci.high)
    return MetricAnalysis(
        metric=m.metric,
        control=list(arms).index(m.control),
        treatment=list(arms).index(m.treatment),
        n_control=m.n_control,
        n_treatment=m.n_treatment,
        control_mean=m.control_mean,
        treatment_mean=m.treatment_mean,
        effect=m.effect,
        relative_effect=m.relative_effect,
        ci=Interval(m.ci.low, m.ci.high),
        p_value=m.p_value,
        prob_treatment_better=m.prob_treatment_better,
        cuped_effect=_nan_none(m.cuped_effect),
        cuped_ci=cuped,
        variance_reduction=_nan_none(m.variance_reduction),
        winsorized_effect=m.winsorized_effect,
        effect_without_top=m.effect_without_top,
        top_share_of_effect=m.top_share_of_effect,
        position_corrected_effect=_nan_none(m.position_corrected_effect),
        weighted_effect=_nan_none(m.weighted_effect),
        daily=tuple(DailyEffect(d.day, d.effect, d.n_control, d.n_treatment) for d in m.daily),
        novelty_slope=m.novelty_slope,
        novelty_p_value=m.novelty_p_value,
        novelty=m.novelty,
        corrected_effect=m.corrected_effect,
        correction_factor=m.correction_factor,
    )


def covariates_pb(covariates: Mapping[str, float | int | str | bool] | None) -> pb.Covariates:
    """``Covariates`` from a dict: numbers are numeric covariates, strings (and booleans) categorical."""
    out = pb.Covariates()
    for name, value in (covariates or {}).items():
        if isinstance(value, bool):
            out.categorical[name] = str(value).lower()
        elif isinstance(value, int | float):
            out.numeric[name] = float(value)
        else:
            out.categorical[name] = str(value)
    return out


def attributes_pb(attributes: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A ``Struct`` of JSON-like unit attributes."""
    out = struct_pb2.Struct()
    if attributes:
        out.update(dict(attributes))
    return out


class ABRouterClient:
    """Create and manage experiments, assign units, route to scorer versions, record metrics, analyse.

    ``config`` defaults to :func:`guardmesh.config.load_config`; ``address`` (``host:port``) bypasses
    discovery. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, config: MeshConfig | None = None, *, address: str | None = None) -> None:
        self.config = config or load_config()
        self.channel = open_channel("abrouter", self.config, address=address)
        #: The raw stub, for the RPCs this client does not wrap (history, balance checks, shadow reports).
        self.stub = pb_grpc.ABRouterServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> ABRouterClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- experiments -----------------------------------------------------------------------------------

    def create_experiment(
        self, key: str, arms: Mapping[str, float] | Sequence[Arm], **options: Unpack[ExperimentOptions]
    ) -> Experiment:
        """Create an experiment (config version 1); see :class:`ExperimentOptions` for the keywords.

        Errors: INVALID_ARGUMENT (the message names the field), ALREADY_EXISTS.
        """
        spec = experiment_spec(key, arms, **options)
        return Experiment.from_pb(self.stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec)).experiment)

    def update_experiment(
        self,
        key: str,
        arms: Mapping[str, float] | Sequence[Arm],
        *,
        expected_version: int = 0,
        comment: str = "",
        **options: Unpack[ExperimentOptions],
    ) -> Experiment:
        """Replace an experiment's spec (the whole spec: options not given take their defaults).

        ``expected_version`` > 0 applies the update only at that version (FAILED_PRECONDITION otherwise).
        """
        request = pb.UpdateExperimentRequest(
            spec=experiment_spec(key, arms, **options), expected_version=expected_version, comment=comment
        )
        return Experiment.from_pb(self.stub.UpdateExperiment(request).experiment)

    def stop_experiment(self, key: str, reason: str = "") -> Experiment:
        """Stop an experiment: every unit gets control (FAILED_PRECONDITION if already stopped)."""
        return Experiment.from_pb(self.stub.StopExperiment(pb.StopExperimentRequest(key=key, reason=reason)).experiment)

    def get_experiment(self, key: str) -> Experiment:
        """One experiment (NOT_FOUND if unknown)."""
        return Experiment.from_pb(self.stub.GetExperiment(pb.GetExperimentRequest(key=key)).experiment)

    def list_experiments(self) -> list[Experiment]:
        """Every experiment, by key."""
        return [Experiment.from_pb(e) for e in self.stub.ListExperiments(pb.ListExperimentsRequest()).experiments]

    # -- assignment ------------------------------------------------------------------------------------

    def assign(
        self,
        unit_id: str,
        experiments: Sequence[str] | None = None,
        *,
        attributes: Mapping[str, Any] | None = None,
        log_exposure: bool = False,
        covariates: Mapping[str, float | int | str | bool] | None = None,
        timestamp: float = 0.0,
    ) -> dict[str, Assignment]:
        """Assign a unit to ``experiments`` (default: every running one); assignments by experiment key.

        ``log_exposure`` logs each in-experiment assignment with ``covariates`` (numbers: numeric,
        strings: categorical), durably before the answer. ``attributes`` feed targeting conditions and
        other hash attributes.
        """
        if isinstance(experiments, str):
            experiments = [experiments]
        request = pb.AssignRequest(
            unit_id=unit_id,
            attributes=attributes_pb(attributes),
            experiment_keys=list(experiments or ()),
            log_exposure=log_exposure,
            covariates=covariates_pb(covariates),
            timestamp=timestamp,
        )
        return {a.experiment_key: Assignment.from_pb(a) for a in self.stub.Assign(request).assignments}

    def assign_one(
        self,
        unit_id: str,
        experiment: str,
        *,
        attributes: Mapping[str, Any] | None = None,
        log_exposure: bool = False,
        covariates: Mapping[str, float | int | str | bool] | None = None,
        timestamp: float = 0.0,
    ) -> Assignment:
        """Assign a unit to one experiment (see :meth:`assign`)."""
        found = self.assign(
            unit_id,
            [experiment],
            attributes=attributes,
            log_exposure=log_exposure,
            covariates=covariates,
            timestamp=timestamp,
        )
        return found[experiment]

    def assign_batch(self, experiment: str, unit_ids: Sequence[str]) -> BatchAssignment:
        """Assign many units offline (nothing is logged; FAILED_PRECONDITION with a targeting condition)."""
        resp = self.stub.AssignBatch(pb.AssignBatchRequest(experiment_key=experiment, unit_ids=list(unit_ids)))
        return BatchAssignment(
            list(unit_ids), list(resp.arm_indices), list(resp.buckets), list(resp.arms), resp.config_version
        )

    def route(
        self,
        experiment: str,
        unit_id: str,
        features: Mapping[str, float],
        *,
        request_id: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        log_exposure: bool = False,
        covariates: Mapping[str, float | int | str | bool] | None = None,
    ) -> Routed:
        """Assign a unit and score ``features`` with its arm's scorer model version.

        A random ``request_id`` is made if none is given (it is ``routed.score.request_id``, for
        :meth:`ScorerClient.feedback`). Errors: as :meth:`assign`, FAILED_PRECONDITION (the experiment has
        no model) and the scorer's own status.
        """
        rid = request_id or new_request_id()
        request = pb.RouteRequest(
            experiment_key=experiment,
            unit_id=unit_id,
            attributes=attributes_pb(attributes),
            request_id=rid,
            features={k: float(v) for k, v in features.items()},
            log_exposure=log_exposure,
            covariates=covariates_pb(covariates),
        )
        resp = self.stub.Route(request)
        return Routed(Assignment.from_pb(resp.assignment), Score.from_pb(resp.score, rid), resp.shadowed)

    # -- metrics, audit, analysis ----------------------------------------------------------------------

    def record_metrics(self, experiment: str, observations: Iterable[Observation | tuple[str, str, float]]) -> int:
        """Record observations of exposed units, all or nothing; returns how many were stored.

        Each is an :class:`Observation` or a ``(unit_id, metric, value)`` tuple.
        """
        msgs = []
        for o in observations:
            if isinstance(o, Observation):
                msgs.append(
                    pb.MetricObservation(
                        unit_id=o.unit_id,
                        metric=o.metric,
                        value=float(o.value),
                        arm=o.arm,
                        timestamp=o.timestamp,
                        pre_period=o.pre_period,
                    )
                )
            else:
                unit_id, metric, value = o
                msgs.append(pb.MetricObservation(unit_id=unit_id, metric=metric, value=float(value)))
        request = pb.RecordMetricsRequest(experiment_key=experiment, observations=msgs)
        return int(self.stub.RecordMetrics(request).recorded)

    def audit(
        self,
        experiment: str,
        *,
        other_experiments: Sequence[str] = (),
        min_sample: int = 0,
        min_deviation: float = 0.0,
        from_table: bool = False,
    ) -> AuditReport:
        """Audit the exposure log: SRM, hash uniformity, clustering and covariate balance. ``from_table``:
        over the Parquet exposure table with DuckDB (every replica, any horizon) instead of router memory."""
        resp = self.stub.AuditExperiment(
            pb.AuditExperimentRequest(
                key=experiment,
                other_experiments=list(other_experiments),
                min_sample=min_sample,
                min_deviation=min_deviation,
                from_table=from_table,
            )
        )
        s = resp.srm
        return AuditReport(
            alert=resp.alert,
            exposures=resp.exposures,
            srm=SampleRatio(
                s.chi2, s.p_value, list(s.observed), list(s.expected), s.max_relative_deviation, s.alert, s.reason
            ),
            uniformity_p_value=resp.uniformity.p_value,
            clustering_alerts=[t.name for t in resp.clustering if t.alert],
            imbalances=[
                Imbalance(b.covariate, b.window, b.arm_a, b.arm_b, b.test, b.p_value, b.effect_size)
                for b in resp.imbalances
            ],
            raw=resp,
        )

    def shadow_report(self, experiment: str) -> pb.GetShadowReportResponse:
        """The experiment's shadow traffic so far: requests mirrored, compared, dropped and failed, and the
        shadow version's decision agreement with the served answers (NOT_FOUND if unknown)."""
        return self.stub.GetShadowReport(pb.GetShadowReportRequest(key=experiment))

    def events(self, experiment: str = "", after_seq: int = 0) -> list[pb.RouterEvent]:
        """Router events (config changes, SRM and balance alerts, guardrail trips, bandit updates), oldest
        first; of one experiment when ``experiment`` is given, with ``seq`` above ``after_seq``."""
        request = pb.ListRouterEventsRequest(experiment_key=experiment, after_seq=after_seq)
        return list(self.stub.ListRouterEvents(request).events)

    def guardrail_status(self, experiment: str) -> tuple[str, list[GuardrailCheck]]:
        """The experiment's state and each guardrail at this look (sequential p-value and upper bound)."""
        resp = self.stub.GetGuardrailStatus(pb.GetGuardrailStatusRequest(key=experiment))
        checks = [
            GuardrailCheck(
                v.metric,
                v.arm,
                v.n_control,
                v.n_arm,
                v.relative_change,
                v.upper_bound,
                v.sequential_p_value,
                v.tripped,
                v.reason,
            )
            for v in resp.verdicts
        ]
        return _STATES[resp.state], checks

    def analyze(
        self,
        experiment: str,
        *,
        metrics: Sequence[str] = (),
        bootstrap_resamples: int = 0,
        confidence: float = 0.0,
        winsor_quantile: float = 0.0,
        position_covariate: str = "",
        reweight_covariates: Sequence[str] = (),
        inverse_propensity: bool = False,
        aggregate: Literal["", "sum", "mean"] = "",
        seed: int = 0,
        from_table: bool = False,
    ) -> Analysis:
        """Analyse the recorded metrics: effects with bootstrap CIs, CUPED, novelty, corrections.

        Zeros mean the server's defaults (2,000 resamples, 95%, winsorising at 0.99, each metric's declared
        kind: "sum" for event metrics, "mean" for continuous ones; a different ``aggregate`` is refused).
        ``from_table``: over the Parquet exposure and observation tables with DuckDB (every replica, any
        horizon) instead of router memory.
        Errors: NOT_FOUND, INVALID_ARGUMENT (unknown metric or covariate), FAILED_PRECONDITION (an arm
        has no exposed unit; from_table with export off), UNAVAILABLE (a table cannot be read).
        """
        resp = self.stub.AnalyzeExperiment(
            pb.AnalyzeExperimentRequest(
                key=experiment,
                metrics=list(metrics),
                bootstrap_resamples=bootstrap_resamples,
                confidence=confidence,
                winsor_quantile=winsor_quantile,
                position_covariate=position_covariate,
                reweight_covariates=list(reweight_covariates),
                inverse_propensity=inverse_propensity,
                aggregate=aggregate,
                seed=seed,
                from_table=from_table,
            )
        )
        effects = [
            MetricEffect(
                metric=m.metric,
                control=m.control,
                treatment=m.treatment,
                n_control=m.n_control,
                n_treatment=m.n_treatment,
                control_mean=m.control_mean,
                treatment_mean=m.treatment_mean,
                effect=m.effect,
                relative_effect=m.relative_effect,
                ci=(m.ci.low, m.ci.high),
                p_value=m.p_value,
                prob_treatment_better=m.prob_treatment_better,
                cuped_effect=m.cuped_effect,
                corrected_effect=m.corrected_effect,
                correction_factor=m.correction_factor,
                novelty=m.novelty,
                raw=m,
            )
            for m in resp.metrics
        ]
        return Analysis(list(resp.arms), resp.exposed_units, effects, resp)

    # -- the exposure table ----------------------------------------------------------------------------

    def export_exposures(self) -> pb.ExportExposuresResponse:
        """Export every settled exposure not in the Parquet exposure table yet, now; the response says how
        many, up to which exposure id, and where the table is (FAILED_PRECONDITION if export is off)."""
        return self.stub.ExportExposures(pb.ExportExposuresRequest())

    def watch_exposures(self, experiment: str = "", after_exposure_id: int = 0) -> Iterator[pb.Exposure]:
        """Every replica's exposures in id order from ``after_exposure_id`` on, live, until the caller stops
        iterating (resume after a break with the last ``exposure_id`` received)."""
        request = pb.WatchExposuresRequest(experiment_key=experiment, after_exposure_id=after_exposure_id)
        stream = self.stub.WatchExposures(request)
        try:
            for message in stream:
                yield from message.exposures
        finally:
            stream.cancel()
