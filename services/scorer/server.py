"""gRPC shell of the scorer: ``guardmesh.v1.ScorerService`` and the Open Inference Protocol.

Protobuf in, domain calls on :class:`~services.scorer.scorer.Scorer`, protobuf out; nothing here reaches
into the core's state. Both protocols score through the same core path (rules, batcher, drift window,
decision log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from opentelemetry import trace

from guardmesh.config import MeshConfig
from guardmesh.durable import parse_store_url
from guardmesh.errors import GuardmeshError, InvalidArgument, Unavailable
from guardmesh.monitoring import observe_scorer
from guardmesh.runtime import ServiceDefinition
from guardmesh.security import allow
from guardmesh.tensors import to_float32
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from guardmesh.wire import add_servicer
from inference import grpc_predict_v2_pb2 as oip_pb
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.scorer.decision import Rule, RuleAction, ThresholdPolicy
from services.scorer.drift import ALERT_LEVEL, FALSE_ALARM_RATE
from services.scorer.monitoring import CleaningPolicy
from services.scorer.oip import AsyncOpenInferenceServicer, ExecutionStats, ModelSignature, TensorSpec
from services.scorer.persistence import RegistryStore, SharedRegistry, open_shared_registry
from services.scorer.registry import ModelFormat, pick_device
from services.scorer.scorer import (
    Registration,
    RowsCall,
    ScoreCall,
    ScoreOutcome,
    Scorer,
    VersionConfig,
    VersionInfo,
)
from services.scorer.wire import split_features

log = logging.getLogger(__name__)
MAX_BATCH = 4096
_FORMATS = {
    pb.MODEL_FORMAT_TORCHSCRIPT: ModelFormat.TORCHSCRIPT,
    pb.MODEL_FORMAT_TORCH_EXPORT: ModelFormat.TORCH_EXPORT,
    pb.MODEL_FORMAT_STATE_DICT: ModelFormat.STATE_DICT,
}
_FORMAT_PB = {v: k for k, v in _FORMATS.items()}


def config_from_pb(req: pb.RegisterModelRequest) -> VersionConfig:
    """Version settings with the documented defaults filled in."""
    t = req.threshold
    policy = ThresholdPolicy(base=t.base or 0.5, k=t.k if t.k else 0.3, lower=t.lower or 0.05, upper=t.upper or 0.95)
    rules = tuple(Rule(r.name, r.feature, r.limit, RuleAction.BLOCK if r.block else RuleAction.PASS) for r in req.rules)
    cleaning = CleaningPolicy.REJECT if req.cleaning == pb.CLEANING_POLICY_REJECT else CleaningPolicy.IMPUTE
    if not 0 <= req.missing_alert_rate <= 1:
        raise InvalidArgument("missing_alert_rate", "must be in [0, 1]")
    if not 0 <= req.baseline_f1 <= 1:
        raise InvalidArgument("baseline_f1", "must be in [0, 1]")
    if req.reference_rows < 0:
        raise InvalidArgument("reference_rows", "must be >= 0")
    return VersionConfig(
        policy=policy,
        rules=rules,
        cleaning=cleaning,
        missing_alert_rate=req.missing_alert_rate or 0.02,
        baseline_f1=req.baseline_f1 or None,
        max_f1_drop=req.max_f1_drop or 0.05,
        reference_rows=req.reference_rows or 1000,
    )


def registration_from_pb(request: pb.RegisterModelRequest) -> Registration:
    """The domain record of a RegisterModel request; INVALID_ARGUMENT naming the field that breaks a rule."""
    fmt = _FORMATS.get(request.format)
    if fmt is None:
        raise InvalidArgument("format", "must be TORCHSCRIPT, TORCH_EXPORT or STATE_DICT")
    features = tuple(request.features)
    if not features or len(set(features)) != len(features):
        raise InvalidArgument("features", "must be a non-empty list of unique names")
    reference = None
    if request.HasField("reference"):
        flat = to_float32("reference", request.reference)
        shape = tuple(request.reference.shape)
        if len(shape) != 2 or shape[1] != len(features):
            raise InvalidArgument(
                "reference.shape", f"must be [rows, {len(features)}], one column per feature; got {list(shape)}"
            )
        reference = flat.reshape(shape)
    options: dict[str, object] = {}
    if request.hidden:
        if any(h < 1 or h > 65536 for h in request.hidden):
            raise InvalidArgument("hidden", "widths must be 1 to 65,536")
        options["hidden"] = tuple(request.hidden)
    return Registration(
        model=request.model,
        version=request.version,
        features=features,
        fmt=fmt,
        payload=request.payload,
        config=config_from_pb(request),
        arch=request.architecture,
        options=options,
        reference=reference,
    )


def outcome_to_pb(o: ScoreOutcome) -> pb.ScoreResponse:
    """Message form of a decision."""
    d = o.decision
    msg = pb.ScoreResponse(
        score=d.score or 0.0,
        decision=d.positive,
        threshold=d.threshold or 0.0,
        path=d.path,
        model_version=o.version,
        drift_score=d.drift_score,
        imputed=o.imputed,
        attribution_method=o.attribution_method,
    )
    for feature, value in o.attributions:
        msg.attributions.add(feature=feature, attribution=value)
    return msg


def version_to_pb(v: VersionInfo) -> pb.ModelVersionInfo:
    """Message form of a version."""
    return pb.ModelVersionInfo(
        version=v.version,
        format=_FORMAT_PB[v.fmt],
        active=v.active,
        labels=v.labels,
        f1=v.f1,
        baseline_f1=v.baseline_f1,
    )


def call_from_pb(r: pb.ScoreRequest, features: Mapping[str, float] | None = None) -> ScoreCall:
    """The domain form of one ScoreRequest; ``features`` in place of ``r.features`` when the map came apart
    from the message (:class:`ScoreRequestOnWire`)."""
    return ScoreCall(
        r.model, r.request_id, r.features if features is None else features, r.version, r.explain, r.shadow
    )


@dataclass(frozen=True, slots=True)
class ScoreRequestOnWire:
    """A Score request as its deserializer hands it over: every field but ``features`` as protobuf parsed
    them (``message``), and the feature map as the request carried it (``features``)."""

    message: pb.ScoreRequest
    features: Mapping[str, float]


def parse_score_request(raw: bytes) -> ScoreRequestOnWire:
    """Score's request deserializer: the feature map split off natively (:func:`split_features`), the rest
    parsed by protobuf; bytes the kernel does not take as they are go to protobuf whole, whose DecodeError the
    server answers INVALID_ARGUMENT naming the method."""
    split = split_features(raw)
    if split is None:
        message = pb.ScoreRequest.FromString(raw)
        return ScoreRequestOnWire(message, message.features)
    rest, features = split
    return ScoreRequestOnWire(pb.ScoreRequest.FromString(rest), features)


class ScorerServicer(pb_grpc.ScorerServiceServicer):
    """Implements ``guardmesh.v1.ScorerService`` over :class:`Scorer`."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._core: Scorer | None = None
        #: Where the async handlers run work that waits for the model outside the gathering (ScoreBatch, and
        #: Score with batching off); None: the event loop's default executor.
        self.executor = executor

    @property
    def core(self) -> Scorer:
        """The scorer; UNAVAILABLE until started."""
        if self._core is None:
            raise Unavailable("scorer is starting")
        return self._core

    def RegisterModel(
        self, request: pb.RegisterModelRequest, context: grpc.ServicerContext
    ) -> pb.RegisterModelResponse:
        """See the proto."""
        info = self.core.register(registration_from_pb(request), activate=request.activate)
        return pb.RegisterModelResponse(version=version_to_pb(info), device=str(self.core.device))

    def ActivateModel(
        self, request: pb.ActivateModelRequest, context: grpc.ServicerContext
    ) -> pb.ActivateModelResponse:
        """See the proto."""
        return pb.ActivateModelResponse(active_version=self.core.activate(request.model, request.version))

    def RollbackModel(
        self, request: pb.RollbackModelRequest, context: grpc.ServicerContext
    ) -> pb.RollbackModelResponse:
        """See the proto."""
        return pb.RollbackModelResponse(active_version=self.core.rollback(request.model))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        """See the proto."""
        resp = pb.ListModelsResponse(device=str(self.core.device))
        for line in self.core.model_lines():
            resp.models.add(
                model=line.model,
                active_version=line.active or "",
                features=list(line.features),
                versions=[version_to_pb(v) for v in line.versions],
            )
        return resp

    async def Score(
        self, request: pb.ScoreRequest | ScoreRequestOnWire, context: grpc.ServicerContext
    ) -> pb.ScoreResponse:
        """See the proto. Runs on the server's event loop: the call waits for its gathered group (see
        :meth:`Scorer.score_async`) without holding the loop. The server hands it a :class:`ScoreRequestOnWire`
        (:func:`parse_score_request`); a message works as well."""
        if isinstance(request, ScoreRequestOnWire):
            call = call_from_pb(request.message, request.features)
            request = request.message
        else:
            call = call_from_pb(request)
        outcome = await self.core.score_async(call, self.executor)
        span = trace.get_current_span()
        if span.is_recording():  # no span is built when none is exported: then its attributes are not either
            d = outcome.decision
            attributes: dict[str, str | bool | float] = {
                "guardmesh.model": request.model,
                "guardmesh.model_version": outcome.version,
                "guardmesh.decision_path": d.path,
                "guardmesh.decision": d.positive,
                "guardmesh.drift_score": d.drift_score,
            }
            if d.threshold is not None:
                attributes["guardmesh.threshold"] = d.threshold
            if request.experiment:
                attributes["guardmesh.experiment"] = request.experiment
                attributes["guardmesh.arm"] = request.arm
            if request.shadow:
                attributes["guardmesh.shadow"] = True
            span.set_attributes(attributes)  # one call: the span takes its lock once
        return outcome_to_pb(outcome)

    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.ServicerContext) -> pb.ScoreBatchResponse:
        """See the proto: the requests go through the scorer together (full batches, one window update), on
        :attr:`executor` (the loop goes on taking calls up meanwhile)."""
        if not 1 <= len(request.requests) <= MAX_BATCH:
            raise InvalidArgument("requests", f"must hold 1 to {MAX_BATCH} requests")
        calls = [call_from_pb(r) for r in request.requests]
        results = await asyncio.get_running_loop().run_in_executor(self.executor, self.core.score_many, calls)
        resp = pb.ScoreBatchResponse()
        positive = 0
        for result in results:
            if isinstance(result, ScoreOutcome):
                resp.results.add(response=outcome_to_pb(result))
                positive += result.decision.positive
            elif isinstance(result, GuardmeshError):
                resp.results.add(error=common_pb2.ErrorStatus(code=result.code.value[0], message=result.message))
        span = trace.get_current_span()
        span.set_attribute("guardmesh.batch_size", len(results))
        span.set_attribute("guardmesh.batch_errors", sum(1 for r in results if not isinstance(r, ScoreOutcome)))
        span.set_attribute("guardmesh.batch_positive", positive)
        models = sorted({r.model for r in request.requests})
        span.set_attribute("guardmesh.model", models[0] if len(models) == 1 else ",".join(models[:10]))
        return resp

    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackResponse:
        """See the proto."""
        r = self.core.feedback(request.model, [(lb.request_id, lb.label) for lb in request.labels])
        if r.rolled_back:
            trace.get_current_span().add_event("model rolled back", {"guardmesh.active_version": r.active})
        return pb.FeedbackResponse(
            accepted=r.accepted,
            unknown=r.unknown,
            active_version=r.active,
            rolled_back=r.rolled_back,
            precision=r.precision,
            recall=r.recall,
            f1=r.f1,
        )

    def GetDriftReport(
        self, request: pb.GetDriftReportRequest, context: grpc.ServicerContext
    ) -> pb.GetDriftReportResponse:
        """See the proto."""
        report, threshold, ref_rows, live_rows, replicas = self.core.drift_report(
            request.model, merge_replicas=request.merge_replicas
        )
        resp = pb.GetDriftReportResponse(
            replicas=replicas,
            drift_score=float(report.score),
            threshold=threshold,
            reference_rows=ref_rows,
            live_rows=live_rows,
            noise_floor_level=report.level,
            false_alarm_rate=FALSE_ALARM_RATE,
            alert_level=ALERT_LEVEL,
        )
        try:  # a model that cannot be explained still has its drift report, without attribution shifts
            _, attributions = self.core.attribution_drift(request.model)
            shifts = [f.shift for f in attributions.features]
            resp.attribution_method = attributions.method
        except GuardmeshError:
            shifts = [0.0] * len(report.names)
        for f, shift in zip(report.features(), shifts, strict=True):
            resp.features.add(
                feature=f.name,
                psi=_finite(f.psi),
                ks_statistic=_finite(f.ks_statistic),
                ks_pvalue=_finite(f.ks_pvalue),
                reference_missing_rate=f.missing_reference,
                live_missing_rate=f.missing_live,
                standardized_mean_difference=_finite(f.smd),
                drift_score=f.score,
                psi_noise_floor=_finite(f.floor_psi),
                ks_noise_floor=_finite(f.floor_ks),
                missing_noise_floor=_finite(f.floor_missing),
                attribution_shift=shift,
            )
        return resp

    def GetAttributionDrift(
        self, request: pb.GetAttributionDriftRequest, context: grpc.ServicerContext
    ) -> pb.GetAttributionDriftResponse:
        """See the proto."""
        version, report = self.core.attribution_drift(request.model, request.version)
        resp = pb.GetAttributionDriftResponse(
            model_version=version,
            method=report.method,
            space=report.space,
            reference_rows=report.reference_rows,
            live_rows=report.live_rows,
            score_change=report.score_change,
        )
        rank = {feature: i + 1 for i, feature in enumerate(report.ranked)}
        for f in report.features:
            resp.features.add(
                feature=f.name,
                reference_mean_abs=f.reference_mean_abs,
                reference_mean=f.reference_mean,
                live_mean_abs=f.live_mean_abs,
                live_mean=f.live_mean,
                change_mean_abs=f.change_mean_abs,
                change_mean=f.change_mean,
                shift=f.shift,
                rank=rank[f.feature],
            )
        return resp

    def ListScorerEvents(
        self, request: pb.ListScorerEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListScorerEventsResponse:
        """See the proto."""
        return pb.ListScorerEventsResponse(
            events=[
                pb.ScorerEvent(model=e.model, kind=e.kind, message=e.message, at=e.at)
                for e in list(self.core.events)
                if not request.model or e.model == request.model
            ]
        )


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


#: Outputs of a model behind the Open Inference Protocol, one value per row (see ScorerInferenceBackend).
OIP_OUTPUTS = (
    TensorSpec("score", "FP32", (-1,)),
    TensorSpec("decision", "BOOL", (-1,)),
    TensorSpec("threshold", "FP32", (-1,)),
    TensorSpec("path", "BYTES", (-1,)),
    TensorSpec("request_id", "BYTES", (-1,)),
)


class ScorerInferenceBackend:
    """The scorer's models behind the Open Inference Protocol, through the same guards as Score.

    Input ``features`` [-1, n] FP32, one column per feature in the model's order (ModelConfig's parameter
    "feature_names" lists them; NaN = missing, imputed or refused as in Score). Each row is one decision:
    rules first, then the model through the version's batcher, the drift-aware threshold, the drift window
    and the decision log. Outputs per row: ``score`` (the model's score; NaN where a rule decided),
    ``decision`` (true = positive class), ``threshold`` (NaN where a rule decided), ``path`` (as in Score)
    and ``request_id`` (``<id>/<row>``, ``id`` being the request's id or a fresh one: the ids Feedback
    takes). Differences from Score: all or nothing (a refused row refuses the request, naming the row),
    no explanations, no shadow flag. An empty version means the active one.
    """

    def __init__(self, servicer: ScorerServicer) -> None:
        self.servicer = servicer

    def server_ready(self) -> bool:
        """Ready once the core exists."""
        return self.servicer._core is not None

    def model_names(self) -> list[str]:
        """Models with an active version."""
        return [model for model, _, active, _ in self.servicer.core.served() if active]

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the version is loaded."""
        return any(version in versions for model, _, _, versions in self.servicer.core.served() if model == name)

    def model_metadata(self, name: str, version: str) -> ModelSignature:
        """Versions (active last: the default), inputs, outputs and the batching settings."""
        core = self.servicer.core
        # Every ModelInfer asks for this: from memory (core.served), never the store's feedback health.
        [(_, features, active, loaded)] = [line for line in core.served() if line[0] == name]
        versions = [v for v in loaded if v != active] + ([active] if active else [])
        settings = core.settings
        return ModelSignature(
            name,
            tuple(versions),
            "pytorch_libtorch",
            (TensorSpec("features", "FP32", (-1, len(features))),),
            OIP_OUTPUTS,
            max_batch_size=settings.max_batch_size,
            preferred_batch_sizes=(settings.max_batch_size,),
            max_queue_delay_us=int(settings.max_queue_delay_ms * 1000),
            parameters=(("feature_names", json.dumps(list(features))),),
        )

    def infer(self, name: str, version: str, inputs: dict[str, np.ndarray], request_id: str) -> dict[str, np.ndarray]:
        """Decisions for the rows (see the class docstring)."""
        call = self._call(name, version, inputs, request_id)
        _, outcomes = self.servicer.core.score_rows(call.model, call.rows, call.request_ids, version=call.version)
        return self._outputs(call, outcomes)

    async def infer_async(
        self, name: str, version: str, inputs: dict[str, np.ndarray], request_id: str
    ) -> dict[str, np.ndarray]:
        """:meth:`infer` awaited on the event loop: the rows join the scorer's gathering with concurrent Score
        and ModelInfer calls (one forward, one decision-log commit per group), all or nothing per request."""
        call = self._call(name, version, inputs, request_id)
        _, outcomes = await self.servicer.core.score_rows_async(call, self.servicer.executor)
        return self._outputs(call, outcomes)

    @staticmethod
    def _call(name: str, version: str, inputs: dict[str, np.ndarray], request_id: str) -> RowsCall:
        rows = inputs["features"]
        prefix = request_id or uuid.uuid4().hex
        return RowsCall(name, rows, [f"{prefix}/{i}" for i in range(len(rows))], version)

    @staticmethod
    def _outputs(call: RowsCall, outcomes: list[ScoreOutcome]) -> dict[str, np.ndarray]:
        nan = float("nan")
        return {
            "score": np.array(
                [o.decision.score if o.decision.score is not None else nan for o in outcomes], np.float32
            ),
            "decision": np.array([o.decision.positive for o in outcomes], dtype=bool),
            "threshold": np.array(
                [o.decision.threshold if o.decision.threshold is not None else nan for o in outcomes], np.float32
            ),
            "path": np.array([o.decision.path.encode() for o in outcomes], dtype=object),
            "request_id": np.array([i.encode() for i in call.request_ids], dtype=object),
        }

    def statistics(self, name: str, version: str) -> ExecutionStats:
        """The version's batcher: rows, executions and their sizes."""
        stats = self.servicer.core.batch_stats(name, version)
        return ExecutionStats(
            inference_count=stats.rows,
            execution_count=stats.batches,
            last_inference_ms=int(stats.last_at * 1000),
            batch_sizes=tuple(sorted(Counter(stats.sizes).items())),
        )


class ScorerBinding:
    """The scorer's servicers and resources."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        # Calls that wait for the model off the event loop (ScoreBatch; Score and ModelInfer with batching off).
        self.executor = ThreadPoolExecutor(max_workers=config.grpc.max_workers, thread_name_prefix="scorer-wait")
        self.servicer = ScorerServicer(self.executor)
        self.extra: list[Any] = []
        self.store: SharedRegistry | None = None

    def add_to_server(self, server: grpc.Server) -> None:
        """Add the servicers: ScorerService and the Open Inference Protocol."""
        # As the generated add_*_to_server, Score's requests parsed by the deserializer that splits the map off.
        add_servicer(server, _SCORER_SERVICE, self.servicer, parsers={"Score": parse_score_request})
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            AsyncOpenInferenceServicer(ScorerInferenceBackend(self.servicer), self.executor), server
        )

    def start(self) -> None:
        """Pick the device, create the core over the durable registry and restore what it recorded."""
        device = pick_device(self.config.scorer.device)
        settings = self.config.scorer
        folder = RegistryStore(self.config.state_path(settings.registry_dir))
        migrate_legacy(folder)
        artefacts = settings.artefact_url or str(self.config.state_path("scorer-artefacts"))
        replica = f"{socket.gethostname()}/{os.getpid()}"
        store = open_shared_registry(
            parse_store_url(settings.store_url or "scorer.db", self.config.mesh.state_dir), artefacts, replica
        )
        self.store = store
        store.adopt_folder(folder)  # an older scorer's registry folder is served from the store from now on
        core = Scorer(settings, device, store)
        core.restore()
        # Scoring writes the decision log: while the store does not answer, health says NOT_SERVING.
        core.follow(settings.follow_poll_s, getattr(self, "set_serving", None))
        self.servicer._core = core
        if self.config.metrics.enabled:
            observe_scorer(core)
        log.info("scorer device", extra={"device": str(device)})

    def drain(self) -> None:
        """Nothing streams indefinitely here."""

    def close(self) -> None:
        """Stop the batchers."""
        self.executor.shutdown(wait=True)  # the server stopped: nothing is waiting on it any more
        if self.servicer._core is not None:
            self.servicer._core.close()
        if self.store is not None:
            self.store.log.close()


def migrate_legacy(store: RegistryStore) -> int:
    """Rewrite registrations recorded in the old format (protobuf RegisterModelRequest files) as domain
    records, keeping their order; the old files are kept aside as ``*.pb.migrated``. An old record that
    does not parse or breaks a rule is logged and left in place, never fatal. Returns how many moved."""
    moved = 0
    for seq, path in store.legacy_records():
        if store.has_record(seq):  # migrated before a crash kept the old file: only retiring it was left
            store.retire_legacy(path)
            continue
        request = pb.RegisterModelRequest()
        try:
            request.ParseFromString(path.read_bytes())
            registration = registration_from_pb(request)
        except (GuardmeshError, ValueError, OSError) as exc:  # protobuf's DecodeError is a ValueError
            log.error("old model registration not migrated", extra={"file": str(path), "error": str(exc)})
            continue
        store.save_registration(registration, seq=seq)
        store.retire_legacy(path)
        moved += 1
    if moved:
        log.info("old model registrations migrated", extra={"records": moved, "folder": str(store.folder)})
    return moved


_SCORER_SERVICE = pb.DESCRIPTOR.services_by_name["ScorerService"]
_SCORER = _SCORER_SERVICE.full_name
_OIP = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVICE = ServiceDefinition(
    name="scorer",
    service_names=(_SCORER, _OIP),
    build=ScorerBinding,
    asyncio=True,  # Score, ScoreBatch and ModelInfer are async def (see the README's scorer performance section)
    # Applications score and send labels; models (register, activate, roll back) are admin's.
    roles={
        **allow(_SCORER, ("app",), "Score", "ScoreBatch", "Feedback"),
        **allow(_OIP, ("app",), *(m.name for m in oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)),
    },
)
