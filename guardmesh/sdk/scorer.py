"""Application-side client of the scorer: register PyTorch models, score, feed labels back, read drift.

::

    from guardmesh.sdk import ScorerClient

    with ScorerClient() as scorer:
        scorer.register_module("fraud", "v1", model, features=["amount", "velocity"], activate=True)
        out = scorer.score("fraud", {"amount": 120.0, "velocity": 3.0})
        print(out.decision, out.score, out.threshold, out.path)
        scorer.feedback("fraud", {out.request_id: True})

Every call goes through :func:`guardmesh.client.open_channel`; server errors reach the caller as
:class:`grpc.RpcError` with the status code the proto documents. A batch answers per item:
:meth:`ScorerClient.score_batch` returns a :class:`Score` or an :class:`ItemError` for each request.
"""

from __future__ import annotations

import io
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

import grpc
import numpy as np
from google.protobuf import message

from guardmesh.attribution import AttributionChange
from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

ModelFormatName = Literal["torchscript", "export"]
_FORMAT_NAMES = {
    pb.MODEL_FORMAT_TORCHSCRIPT: "torchscript",
    pb.MODEL_FORMAT_TORCH_EXPORT: "export",
    pb.MODEL_FORMAT_STATE_DICT: "state_dict",
}
_CLEANING = {"impute": pb.CLEANING_POLICY_IMPUTE, "reject": pb.CLEANING_POLICY_REJECT}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` of a numeric status (UNKNOWN for a number gRPC does not define)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def feature_values(features: Mapping[str, float]) -> dict[str, float]:
    """``features`` as the request carries them; TypeError naming the rule for anything but a mapping of
    feature names to numbers (a list of values in model order is refused: the order is easy to get wrong)."""
    if not isinstance(features, Mapping):
        raise TypeError(
            f"features: must be a mapping of feature name to value, e.g. {{'amount': 12.5}}; got a "
            f"{type(features).__name__} (for values in the model's order, zip them with its features: "
            "ScorerClient.list_models() lists them)"
        )
    values: dict[str, float] = {}
    for name, value in features.items():
        if not isinstance(name, str):
            raise TypeError(f"features: names must be str, got {type(name).__name__} {name!r}")
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"features[{name}]: must be a number, got {type(value).__name__} {value!r}") from None
    return values


def new_request_id() -> str:
    """A fresh random request id (what :meth:`ScorerClient.score` uses when none is given)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Score:
    """One decision: the model's score against the drift-aware threshold, or a rule's verdict."""

    request_id: str
    #: Model score in [0, 1]; 0 when a rule decided.
    score: float
    #: True = the positive class (block, flag, show ...).
    decision: bool
    #: Threshold used; 0 when a rule decided.
    threshold: float
    #: "rule:<name>" or "model:<name>:<version>@threshold=<t>".
    path: str
    #: Version that scored; empty when a rule decided.
    model_version: str
    #: Model drift score in [0, 1] at decision time.
    drift_score: float
    #: A missing feature was imputed from the reference median.
    imputed: bool = False
    #: Per-feature attributions when ``explain=True``.
    attributions: dict[str, float] = field(default_factory=dict)
    #: "linear_shap" or "integrated_gradients" when explained.
    attribution_method: str = ""

    @classmethod
    def from_pb(cls, msg: pb.ScoreResponse, request_id: str) -> Score:
        """Convert a ``ScoreResponse`` message."""
        return cls(
            request_id=request_id,
            score=msg.score,
            decision=msg.decision,
            threshold=msg.threshold,
            path=msg.path,
            model_version=msg.model_version,
            drift_score=msg.drift_score,
            imputed=msg.imputed,
            attributions={a.feature: a.attribution for a in msg.attributions},
            attribution_method=msg.attribution_method,
        )

    @property
    def rule(self) -> str | None:
        """Name of the rule that decided, or None when the model did."""
        return self.path.removeprefix("rule:") if self.path.startswith("rule:") else None


@dataclass(frozen=True)
class ItemError:
    """A batch item the scorer refused, with the status a single call would have raised."""

    request_id: str
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class Rule:
    """A rule run before the model: ``feature`` strictly above ``limit`` decides (blocks when ``block``)."""

    name: str
    feature: str
    limit: float
    block: bool = True


@dataclass(frozen=True)
class ModelVersion:
    """A model version as the scorer lists it."""

    version: str
    #: "torchscript", "export" or "state_dict".
    format: str
    active: bool
    #: Labelled decisions in its rolling window.
    labels: int
    f1: float
    baseline_f1: float

    @classmethod
    def from_pb(cls, msg: pb.ModelVersionInfo) -> ModelVersion:
        """Convert a ``ModelVersionInfo`` message."""
        return cls(msg.version, _FORMAT_NAMES.get(msg.format, ""), msg.active, msg.labels, msg.f1, msg.baseline_f1)


@dataclass(frozen=True)
class Registered:
    """Answer of a registration: the loaded version and the device it runs on."""

    version: ModelVersion
    device: str


@dataclass(frozen=True)
class ModelLine:
    """A model name with its versions and the active one."""

    model: str
    versions: list[ModelVersion]
    active_version: str
    features: list[str]


@dataclass(frozen=True)
class FeedbackResult:
    """Answer of :meth:`ScorerClient.feedback`; the metrics are those of the version active before."""

    accepted: int
    unknown: int
    active_version: str
    rolled_back: bool
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class FeatureDrift:
    """Drift figures of one feature between the reference and the live window."""

    psi: float
    ks_statistic: float
    ks_pvalue: float
    reference_missing_rate: float
    live_missing_rate: float
    standardized_mean_difference: float
    drift_score: float
    #: What sampling noise alone exceeds with probability ``DriftReport.noise_floor_level`` at these windows.
    psi_noise_floor: float = 0.0
    ks_noise_floor: float = 0.0
    missing_noise_floor: float = 0.0
    #: The feature's attribution shift (see :meth:`ScorerClient.attribution_drift`); 0 when not explained.
    attribution_shift: float = 0.0


@dataclass(frozen=True)
class DriftReport:
    """The model's drift score, the threshold in force and per-feature figures (in feature order)."""

    drift_score: float
    threshold: float
    reference_rows: int
    live_rows: int
    features: dict[str, FeatureDrift]
    #: Per-test false-alarm level of the noise floors (0.05 / (3 x features)).
    noise_floor_level: float = 0.0
    #: Model drift score at and above which the scorer alerts.
    alert_level: float = 0.0
    #: How ``attribution_shift`` was computed; empty when the model could not be explained.
    attribution_method: str = ""
    #: The replicas whose live windows the report covers (one unless merged; "" without a shared store).
    replicas: tuple[str, ...] = ()

    def most_drifted(self, n: int = 3) -> list[str]:
        """Names of the ``n`` features with the highest drift score."""
        return sorted(self.features, key=lambda f: self.features[f].drift_score, reverse=True)[:n]


@dataclass(frozen=True)
class AttributionShift(AttributionChange):
    """How one feature's attributions moved between the reference and the live window (attribution units;
    ``shift``, the ranking key, is the scorer's own rule from :class:`~guardmesh.attribution.AttributionChange`)."""

    #: 1 for the feature that moved most.
    rank: int


@dataclass(frozen=True)
class AttributionDrift:
    """Which features account for the change of a version's scores between the reference and live window."""

    model_version: str
    #: "linear_shap" or "integrated_gradients".
    method: str
    #: "log-odds", "raw score" or "model output".
    space: str
    reference_rows: int
    live_rows: int
    #: Change of the mean score between the windows (the sum of every feature's change_mean).
    score_change: float
    #: Per feature, in feature order.
    features: dict[str, AttributionShift]

    def ranked(self) -> list[str]:
        """Feature names, the one that moved most first."""
        return sorted(self.features, key=lambda f: self.features[f].rank)


@dataclass(frozen=True)
class ScorerEvent:
    """A scorer event: "rollback", "missing_alert", "reference_ready" ..."""

    model: str
    kind: str
    message: str
    #: Unix time, seconds.
    at: float


_Record = TypeVar("_Record")


def _same_named(record: type[_Record], msg: message.Message) -> _Record:
    """A ``record`` dataclass filled from the fields of ``msg`` that carry the same names as its own."""
    return record(**{f.name: getattr(msg, f.name) for f in fields(record)})  # type: ignore[arg-type]


def rows_tensor(rows: object) -> common_pb2.Tensor:
    """A float32 ``Tensor`` message from a 2-D array-like (numpy array, torch tensor, nested lists)."""
    if hasattr(rows, "detach"):
        rows = rows.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(rows, dtype=np.float32), dtype="<f4")
    if arr.ndim != 2:
        raise ValueError(f"reference rows must be 2-D (rows x features), got shape {arr.shape}")
    return common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=list(arr.shape), data=arr.tobytes())


def serialize_module(module: torch.nn.Module, n_features: int, fmt: ModelFormatName = "torchscript") -> bytes:
    """Serialize a module for the scorer: TorchScript (scripted, else traced) or ``torch.export``.

    The module maps a float32 batch (rows x ``n_features``) to one score per row in [0, 1].
    """
    import torch

    if fmt not in ("torchscript", "export"):
        raise ValueError(f"format: {fmt!r} is not 'torchscript' or 'export'")
    was_training = module.training
    module.eval()
    try:
        return _serialize(module, torch.zeros(2, n_features), fmt)
    finally:
        module.train(was_training)


def _serialize(module: torch.nn.Module, example: torch.Tensor, fmt: ModelFormatName) -> bytes:
    import torch

    buf = io.BytesIO()
    if fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, buf)
        return buf.getvalue()
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; the scorer still loads it and most teams still ship it.
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(module, torch.jit.ScriptModule):
            scripted = module
        else:
            try:
                scripted = torch.jit.script(module)
            except Exception:
                scripted = torch.jit.trace(module, example)
        torch.jit.save(scripted, buf)
    return buf.getvalue()


class ScorerClient:
    """Register and activate model versions, score requests, send labels, read drift.

    ``config`` defaults to :func:`guardmesh.config.load_config`; ``address`` (``host:port``) bypasses
    discovery. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, config: MeshConfig | None = None, *, address: str | None = None) -> None:
        self.config = config or load_config()
        self.channel = open_channel("scorer", self.config, address=address)
        #: The raw stub, for the RPCs and fields this client does not wrap.
        self.stub = pb_grpc.ScorerServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> ScorerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- models ----------------------------------------------------------------------------------------

    def register_module(
        self,
        model: str,
        version: str,
        module: torch.nn.Module,
        features: Sequence[str],
        *,
        format: ModelFormatName = "torchscript",
        activate: bool = False,
        reference: object | None = None,
        reference_rows: int = 0,
        threshold: float = 0.0,
        drift_k: float = 0.0,
        threshold_bounds: tuple[float, float] | None = None,
        rules: Sequence[Rule] = (),
        cleaning: Literal["impute", "reject"] = "impute",
        missing_alert_rate: float = 0.0,
        baseline_f1: float = 0.0,
        max_f1_drop: float = 0.0,
    ) -> Registered:
        """Register a ``torch.nn.Module`` as ``model``/``version`` (serialized with :func:`serialize_module`).

        ``features`` are the input columns in order. ``reference`` (rows x features, e.g. training rows;
        NaN = missing) is the drift reference; without it the first ``reference_rows`` scored rows are.
        ``threshold`` is the base threshold (0: 0.5), ``drift_k`` the drift sensitivity (0: 0.3) and
        ``threshold_bounds`` its clamp (default 0.05-0.95). ``rules`` run before the model, first match
        wins. ``cleaning`` is the missing-value policy; ``baseline_f1``/``max_f1_drop`` drive the
        automatic rollback. Errors: INVALID_ARGUMENT, ALREADY_EXISTS, FAILED_PRECONDITION (warm-up failed).
        """
        payload = serialize_module(module, len(features), format)
        return self.register_payload(
            model,
            version,
            payload,
            features,
            format=format,
            activate=activate,
            reference=reference,
            reference_rows=reference_rows,
            threshold=threshold,
            drift_k=drift_k,
            threshold_bounds=threshold_bounds,
            rules=rules,
            cleaning=cleaning,
            missing_alert_rate=missing_alert_rate,
            baseline_f1=baseline_f1,
            max_f1_drop=max_f1_drop,
        )

    def register_payload(
        self,
        model: str,
        version: str,
        payload: bytes,
        features: Sequence[str],
        *,
        format: ModelFormatName = "torchscript",
        activate: bool = False,
        reference: object | None = None,
        reference_rows: int = 0,
        threshold: float = 0.0,
        drift_k: float = 0.0,
        threshold_bounds: tuple[float, float] | None = None,
        rules: Sequence[Rule] = (),
        cleaning: Literal["impute", "reject"] = "impute",
        missing_alert_rate: float = 0.0,
        baseline_f1: float = 0.0,
        max_f1_drop: float = 0.0,
    ) -> Registered:
        """Register already serialized bytes (``torch.jit.save`` or ``torch.export.save`` output).

        The arguments are those of :meth:`register_module`.
        """
        if cleaning not in _CLEANING:
            raise ValueError(f"cleaning: {cleaning!r} is not 'impute' or 'reject'")
        lower, upper = threshold_bounds or (0.0, 0.0)
        request = pb.RegisterModelRequest(
            model=model,
            version=version,
            features=list(features),
            format=pb.MODEL_FORMAT_TORCH_EXPORT if format == "export" else pb.MODEL_FORMAT_TORCHSCRIPT,
            payload=payload,
            reference_rows=reference_rows,
            threshold=pb.ThresholdConfig(base=threshold, k=drift_k, lower=lower, upper=upper),
            rules=[pb.ScoringRule(name=r.name, feature=r.feature, limit=r.limit, block=r.block) for r in rules],
            cleaning=_CLEANING[cleaning],
            missing_alert_rate=missing_alert_rate,
            baseline_f1=baseline_f1,
            max_f1_drop=max_f1_drop,
            activate=activate,
        )
        if reference is not None:
            request.reference.CopyFrom(rows_tensor(reference))
        resp = self.stub.RegisterModel(request)
        return Registered(ModelVersion.from_pb(resp.version), resp.device)

    def activate(self, model: str, version: str) -> str:
        """Make ``version`` the active one; returns the active version (NOT_FOUND if unknown)."""
        return str(self.stub.ActivateModel(pb.ActivateModelRequest(model=model, version=version)).active_version)

    def rollback(self, model: str) -> str:
        """Re-activate the previously active version; returns it (FAILED_PRECONDITION if none)."""
        return str(self.stub.RollbackModel(pb.RollbackModelRequest(model=model)).active_version)

    def list_models(self) -> list[ModelLine]:
        """Every model with its versions and the active one."""
        resp = self.stub.ListModels(pb.ListModelsRequest())
        return [
            ModelLine(m.model, [ModelVersion.from_pb(v) for v in m.versions], m.active_version, list(m.features))
            for m in resp.models
        ]

    # -- scoring ---------------------------------------------------------------------------------------

    @staticmethod
    def _request(
        model: str,
        features: Mapping[str, float],
        request_id: str | None,
        version: str,
        experiment: str,
        arm: str,
        explain: bool,
        shadow: bool,
    ) -> pb.ScoreRequest:
        return pb.ScoreRequest(
            model=model,
            request_id=request_id or new_request_id(),
            features=feature_values(features),
            version=version,
            experiment=experiment,
            arm=arm,
            explain=explain,
            shadow=shadow,
        )

    def score(
        self,
        model: str,
        features: Mapping[str, float],
        *,
        request_id: str | None = None,
        version: str = "",
        experiment: str = "",
        arm: str = "",
        explain: bool = False,
        shadow: bool = False,
    ) -> Score:
        """Score one request (a missing or NaN feature is missing). A random ``request_id`` is made if none
        is given; it is on the answer, for :meth:`feedback`.

        Errors: INVALID_ARGUMENT (unknown feature, Inf, a missing feature under "reject"), NOT_FOUND,
        FAILED_PRECONDITION (no active version), RESOURCE_EXHAUSTED (the batching queue is full).
        """
        request = self._request(model, features, request_id, version, experiment, arm, explain, shadow)
        return Score.from_pb(self.stub.Score(request), request.request_id)

    def score_batch(
        self,
        model: str,
        rows: Sequence[Mapping[str, float]],
        *,
        request_ids: Sequence[str] | None = None,
        version: str = "",
        experiment: str = "",
        arm: str = "",
        explain: bool = False,
    ) -> list[Score | ItemError]:
        """Score up to 4,096 requests in one call; each gets a :class:`Score` or an :class:`ItemError`."""
        if request_ids is not None and len(request_ids) != len(rows):
            raise ValueError("request_ids must have one id per row")
        requests = [
            self._request(model, row, request_ids[i] if request_ids else None, version, experiment, arm, explain, False)
            for i, row in enumerate(rows)
        ]
        resp = self.stub.ScoreBatch(pb.ScoreBatchRequest(requests=requests))
        out: list[Score | ItemError] = []
        for req, result in zip(requests, resp.results, strict=True):
            if result.WhichOneof("result") == "response":
                out.append(Score.from_pb(result.response, req.request_id))
            else:
                out.append(ItemError(req.request_id, status_code(result.error.code), result.error.message))
        return out

    def feedback(self, model: str, labels: Mapping[str, bool] | Iterable[tuple[str, bool]]) -> FeedbackResult:
        """Send ground-truth labels by request id; may roll the model back (``rolled_back``)."""
        pairs = labels.items() if isinstance(labels, Mapping) else labels
        request = pb.FeedbackRequest(model=model, labels=[pb.Label(request_id=r, label=bool(y)) for r, y in pairs])
        resp = self.stub.Feedback(request)
        return FeedbackResult(
            resp.accepted, resp.unknown, resp.active_version, resp.rolled_back, resp.precision, resp.recall, resp.f1
        )

    def drift_report(self, model: str, *, merge_replicas: bool = False) -> DriftReport:
        """Per-feature drift between the reference and the live window (FAILED_PRECONDITION before rows);
        ``merge_replicas``: the live window pooled over every replica on the shared store."""
        resp = self.stub.GetDriftReport(pb.GetDriftReportRequest(model=model, merge_replicas=merge_replicas))
        return DriftReport(
            drift_score=resp.drift_score,
            threshold=resp.threshold,
            reference_rows=resp.reference_rows,
            live_rows=resp.live_rows,
            features={f.feature: _same_named(FeatureDrift, f) for f in resp.features},
            noise_floor_level=resp.noise_floor_level,
            alert_level=resp.alert_level,
            attribution_method=resp.attribution_method,
            replicas=tuple(resp.replicas),
        )

    def attribution_drift(self, model: str, version: str = "") -> AttributionDrift:
        """Each feature's attribution shift between the reference and the live window, for ``version`` (empty:
        the active one). Errors: NOT_FOUND, FAILED_PRECONDITION (no rows yet), INVALID_ARGUMENT (a model
        that cannot be explained)."""
        resp = self.stub.GetAttributionDrift(pb.GetAttributionDriftRequest(model=model, version=version))
        return AttributionDrift(
            model_version=resp.model_version,
            method=resp.method,
            space=resp.space,
            reference_rows=resp.reference_rows,
            live_rows=resp.live_rows,
            score_change=resp.score_change,
            features={f.feature: _same_named(AttributionShift, f) for f in resp.features},
        )

    def events(self, model: str = "") -> list[ScorerEvent]:
        """Scorer events (rollbacks, missing-value alerts, refused versions), oldest first."""
        resp = self.stub.ListScorerEvents(pb.ListScorerEventsRequest(model=model))
        return [ScorerEvent(e.model, e.kind, e.message, e.at) for e in resp.events]
