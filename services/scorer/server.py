"""gRPC shell of the scorer: ``guardmesh.v1.ScorerService`` and the Open Inference Protocol."""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc
import numpy as np
import torch
from opentelemetry import trace

from guardmesh.config import MeshConfig
from guardmesh.errors import GuardmeshError, InvalidArgument, Unavailable
from guardmesh.monitoring import observe_scorer
from guardmesh.runtime import ServiceDefinition
from guardmesh.security import allow
from guardmesh.tensors import to_float32
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from inference import grpc_predict_v2_pb2 as oip_pb
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.scorer.decision import Rule, RuleAction, ThresholdPolicy
from services.scorer.monitoring import CleaningPolicy
from services.scorer.oip import ModelSignature, OpenInferenceServicer, TensorSpec
from services.scorer.persistence import RegistryStore
from services.scorer.registry import ModelFormat, ModelLine, pick_device
from services.scorer.scorer import ScoreOutcome, Scorer, VersionConfig

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


class ScorerServicer(pb_grpc.ScorerServiceServicer):
    """Implements ``guardmesh.v1.ScorerService`` over :class:`Scorer`."""

    def __init__(self) -> None:
        self._core: Scorer | None = None
        self.store: RegistryStore | None = None

    @property
    def core(self) -> Scorer:
        """The scorer; UNAVAILABLE until started."""
        if self._core is None:
            raise Unavailable("scorer is starting")
        return self._core

    def _version_info(self, model: str, version: str) -> pb.ModelVersionInfo:
        state = self.core.lines[model].versions[version]
        _, _, f1, n = state.health.rolling.metrics()
        active = self.core.registry.lines[model].active
        return pb.ModelVersionInfo(
            version=version,
            format=_FORMAT_PB[state.model.fmt],
            active=active == version,
            labels=n,
            f1=f1,
            baseline_f1=state.health.baseline_f1 or 0.0,
        )

    def _save_active(self) -> None:
        if self.store is not None:
            lines = self.core.registry.lines
            self.store.save_active(
                {name: (line.active, list(line.history)) for name, line in list(lines.items()) if line.active}
            )

    def RegisterModel(
        self, request: pb.RegisterModelRequest, context: grpc.ServicerContext
    ) -> pb.RegisterModelResponse:
        """See the proto."""
        response = self._register(request)
        if self.store is not None:  # durable before the answer: a restart serves it again
            self.store.save_registration(request)
            if request.activate:
                self._save_active()
        return response

    def _register(self, request: pb.RegisterModelRequest) -> pb.RegisterModelResponse:
        fmt = _FORMATS.get(request.format)
        if fmt is None:
            raise InvalidArgument("format", "must be TORCHSCRIPT, TORCH_EXPORT or STATE_DICT")
        features = list(request.features)
        if not features or len(set(features)) != len(features):
            raise InvalidArgument("features", "must be a non-empty list of unique names")
        reference = None
        if request.HasField("reference"):
            flat = to_float32("reference", request.reference)
            shape = tuple(request.reference.shape)
            if len(shape) != 2 or shape[1] != len(features):
                raise InvalidArgument("reference.shape", f"must be [rows, {len(features)}]")
            reference = flat.reshape(shape)
        options: dict[str, object] = {}
        if request.hidden:
            if any(h < 1 or h > 65536 for h in request.hidden):
                raise InvalidArgument("hidden", "widths must be 1 to 65,536")
            options["hidden"] = tuple(request.hidden)
        state = self.core.register(
            request.model,
            request.version,
            features,
            fmt,
            request.payload,
            config_from_pb(request),
            arch=request.architecture,
            options=options,
            reference=reference,
            activate=request.activate,
        )
        return pb.RegisterModelResponse(
            version=self._version_info(request.model, state.model.version), device=str(self.core.device)
        )

    def ActivateModel(
        self, request: pb.ActivateModelRequest, context: grpc.ServicerContext
    ) -> pb.ActivateModelResponse:
        """See the proto."""
        active = self.core.activate(request.model, request.version)
        self._save_active()
        return pb.ActivateModelResponse(active_version=active)

    def RollbackModel(
        self, request: pb.RollbackModelRequest, context: grpc.ServicerContext
    ) -> pb.RollbackModelResponse:
        """See the proto."""
        active = self.core.rollback(request.model)
        self._save_active()
        return pb.RollbackModelResponse(active_version=active)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        """See the proto."""
        resp = pb.ListModelsResponse(device=str(self.core.device))
        for name, versions, active in self.core.registry.list():
            line = resp.models.add(
                model=name, active_version=active or "", features=list(self.core.lines[name].features)
            )
            for v in versions:
                line.versions.append(self._version_info(name, v))
        return resp

    def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        outcome = self.core.score(
            request.model,
            request.request_id,
            dict(request.features),
            version=request.version,
            explain=request.explain,
            shadow=request.shadow,
        )
        span = trace.get_current_span()
        d = outcome.decision
        span.set_attribute("guardmesh.model", request.model)
        span.set_attribute("guardmesh.model_version", outcome.version)
        span.set_attribute("guardmesh.decision_path", d.path)
        span.set_attribute("guardmesh.decision", d.positive)
        span.set_attribute("guardmesh.drift_score", d.drift_score)
        if d.threshold is not None:
            span.set_attribute("guardmesh.threshold", d.threshold)
        if request.experiment:
            span.set_attribute("guardmesh.experiment", request.experiment)
            span.set_attribute("guardmesh.arm", request.arm)
        if request.shadow:
            span.set_attribute("guardmesh.shadow", True)
        return outcome_to_pb(outcome)

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        """See the proto."""
        return self._score(request)

    def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.ServicerContext) -> pb.ScoreBatchResponse:
        """See the proto."""
        if not 1 <= len(request.requests) <= MAX_BATCH:
            raise InvalidArgument("requests", f"must hold 1 to {MAX_BATCH} requests")
        resp = pb.ScoreBatchResponse()
        for r in request.requests:
            try:
                resp.results.add(response=self._score(r))
            except GuardmeshError as err:
                resp.results.add(error=common_pb2.ErrorStatus(code=err.code.value[0], message=err.message))
        return resp

    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackResponse:
        """See the proto."""
        r = self.core.feedback(request.model, [(lb.request_id, lb.label) for lb in request.labels])
        if r.rolled_back:
            trace.get_current_span().add_event("model rolled back", {"guardmesh.active_version": r.active})
            self._save_active()
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
        report, threshold, ref_rows, live_rows = self.core.drift_report(request.model)
        resp = pb.GetDriftReportResponse(
            drift_score=float(report.score), threshold=threshold, reference_rows=ref_rows, live_rows=live_rows
        )
        for f in report.features():
            resp.features.add(
                feature=f.name,
                psi=_finite(f.psi),
                ks_statistic=_finite(f.ks_statistic),
                ks_pvalue=_finite(f.ks_pvalue),
                reference_missing_rate=f.missing_reference,
                live_missing_rate=f.missing_live,
                standardized_mean_difference=_finite(f.smd),
                drift_score=f.score,
            )
        return resp

    def ListScorerEvents(
        self, request: pb.ListScorerEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListScorerEventsResponse:
        """See the proto."""
        return pb.ListScorerEventsResponse(
            events=[
                pb.ScorerEvent(model=e.model, kind=e.kind, message=e.message, at=e.at)
                for e in self.core.events
                if not request.model or e.model == request.model
            ]
        )


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


class ScorerInferenceBackend:
    """The scorer's models behind the Open Inference Protocol: input ``features`` [-1, n] FP32 in the
    model's feature order, output ``score`` [-1] FP32. An empty version means the active one. OIP calls
    return raw model scores: no rules, thresholds or decision log (that is ScorerService's job)."""

    def __init__(self, servicer: ScorerServicer) -> None:
        self.servicer = servicer

    def server_ready(self) -> bool:
        """Ready once the core exists."""
        return self.servicer._core is not None

    def model_names(self) -> list[str]:
        """Models with an active version."""
        return [name for name, _, active in self.servicer.core.registry.list() if active]

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the version is loaded."""
        return version in self.servicer.core.registry.lines.get(name, ModelLine()).versions

    def model_metadata(self, name: str, version: str) -> ModelSignature:
        """Versions (active last: the default), inputs and outputs."""
        core = self.servicer.core
        line = core.registry.lines[name]
        versions = [v for v in line.versions if v != line.active] + ([line.active] if line.active else [])
        n = len(core.lines[name].features)
        return ModelSignature(
            name,
            tuple(versions),
            "pytorch_libtorch",
            (TensorSpec("features", "FP32", (-1, n)),),
            (TensorSpec("score", "FP32", (-1,)),),
        )

    def infer(self, name: str, version: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scores of the rows."""
        mv = self.servicer.core.registry.active(name, version)
        x = torch.from_numpy(np.array(inputs["features"], dtype=np.float32))  # a writable copy of the view
        return {"score": mv(x.to(self.servicer.core.device)).float().cpu().numpy()}


class ScorerBinding:
    """The scorer's servicers and resources."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.servicer = ScorerServicer()
        self.extra: list[Any] = []

    def add_to_server(self, server: grpc.Server) -> None:
        """Add the servicers: ScorerService and the Open Inference Protocol."""
        pb_grpc.add_ScorerServiceServicer_to_server(self.servicer, server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            OpenInferenceServicer(ScorerInferenceBackend(self.servicer)), server
        )

    def start(self) -> None:
        """Pick the device and create the core."""
        device = pick_device(self.config.scorer.device)
        self.servicer._core = Scorer(self.config.scorer, device)
        store = RegistryStore(self.config.state_path(self.config.scorer.registry_dir))
        self._restore(store)
        self.servicer.store = store
        if self.config.metrics.enabled:
            observe_scorer(self.servicer._core)
        log.info("scorer device", extra={"device": str(device)})

    def _restore(self, store: RegistryStore) -> None:
        """Register every recorded version again, then activate the recorded active versions."""
        restored = 0
        for request in store.registrations():
            try:
                self.servicer._register(request)
                restored += 1
            except GuardmeshError as err:
                log.error(
                    "recorded model version not restored",
                    extra={"model": request.model, "version": request.version, "error": err.message},
                )
        registry = self.servicer.core.registry
        for model, (version, history) in store.active().items():
            line = registry.lines.get(model)
            known = set(line.versions) if line is not None else set()
            if line is None or version not in known or not set(history) <= known:
                log.error("recorded active version not restored", extra={"model": model, "version": version})
                continue
            with registry.lock:
                line.active, line.history = version, list(history)
        if restored:
            log.info("model registry restored", extra={"versions": restored, "active": store.active()})

    def drain(self) -> None:
        """Nothing streams indefinitely here."""

    def close(self) -> None:
        """Stop the batchers."""
        if self.servicer._core is not None:
            self.servicer._core.close()


_SCORER = pb.DESCRIPTOR.services_by_name["ScorerService"].full_name
_OIP = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVICE = ServiceDefinition(
    name="scorer",
    service_names=(_SCORER, _OIP),
    build=ScorerBinding,
    # Applications score and send labels; models (register, activate, roll back) are admin's.
    roles={
        **allow(_SCORER, ("app",), "Score", "ScoreBatch", "Feedback"),
        **allow(_OIP, ("app",), *(m.name for m in oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)),
    },
)
