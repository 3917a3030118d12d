"""The scorer's core: model lines, the decision path, drift, explanations, feedback and rollback.

No gRPC here: ``server.py`` translates protobuf to these calls. Scoring takes a model line's lock only to
update windows and counters; the model itself runs in the per-version dynamic batcher.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from guardmesh.config import ScorerSettings
from guardmesh.errors import FailedPrecondition, GuardmeshError, InvalidArgument, NotFound
from services.scorer import drift as drift_mod
from services.scorer.batching import DynamicBatcher
from services.scorer.decision import Decision, Rule, ThresholdPolicy, decide
from services.scorer.explain import explain as explain_fn
from services.scorer.monitoring import CleaningPolicy, DecisionLog, MissingMonitor, RollingF1, VersionHealth
from services.scorer.registry import ModelFormat, ModelRegistry, ModelVersion

log = logging.getLogger(__name__)
#: Largest magnitude a feature value may have: rows are float32, a larger double would become +-Inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class VersionConfig:
    """Per-version decision settings."""

    policy: ThresholdPolicy
    rules: tuple[Rule, ...]
    cleaning: CleaningPolicy
    missing_alert_rate: float
    baseline_f1: float | None
    max_f1_drop: float
    reference_rows: int


@dataclass
class VersionState:
    """A loaded version with its settings, batcher and feedback health."""

    model: ModelVersion
    config: VersionConfig
    batcher: DynamicBatcher
    health: VersionHealth


@dataclass
class ScoreOutcome:
    """One request's answer."""

    decision: Decision
    version: str
    imputed: bool
    attributions: list[tuple[str, float]] = field(default_factory=list)
    attribution_method: str = ""


@dataclass(frozen=True)
class FeedbackResult:
    """What a batch of labels did."""

    accepted: int
    unknown: int
    active: str
    rolled_back: bool
    precision: float
    recall: float
    f1: float


@dataclass
class Event:
    """Something operators must see."""

    model: str
    kind: str
    message: str
    at: float


class ModelLineState:
    """Windows, caches and versions of one model name."""

    def __init__(self, name: str, features: tuple[str, ...], settings: ScorerSettings, device: torch.device) -> None:
        self.name = name
        self.features = features
        self.index = {f: i for i, f in enumerate(features)}
        self.lock = threading.Lock()
        self.versions: dict[str, VersionState] = {}
        self.live = drift_mod.LiveWindow(len(features), settings.live_window, device=device)
        self.reference: drift_mod.ReferenceWindow | None = None
        self.medians = np.full(len(features), np.nan, dtype=np.float32)
        self.missing: MissingMonitor | None = None
        self.decisions = DecisionLog(settings.decision_log)
        self.drift_score = 0.0
        self.rows_since_drift = 0


class Scorer:
    """Serves model lines; see the module docstring."""

    def __init__(self, settings: ScorerSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.registry = ModelRegistry(device)
        self.lines: dict[str, ModelLineState] = {}
        self.lock = threading.Lock()
        self.events: deque[Event] = deque(maxlen=10_000)

    # -- models ----------------------------------------------------------------------------------------

    def _line(self, model: str) -> ModelLineState:
        if not model:
            raise InvalidArgument("model", "must not be empty")
        line = self.lines.get(model)
        if line is None:
            raise NotFound(f"model {model!r} not found")
        return line

    def register(
        self,
        model: str,
        version: str,
        features: list[str],
        fmt: ModelFormat,
        payload: bytes,
        config: VersionConfig,
        *,
        arch: str = "",
        options: dict[str, object] | None = None,
        reference: np.ndarray | None = None,
        activate: bool = False,
    ) -> VersionState:
        """Load, warm up and (optionally) activate a version; a refused version changes nothing."""
        if not 1 <= len(model) <= 128:
            raise InvalidArgument("model", "must be 1 to 128 characters")
        if not 1 <= len(version) <= 64:
            raise InvalidArgument("version", "must be 1 to 64 characters")
        config.policy.validate()
        for i, rule in enumerate(config.rules):
            rule.validate(tuple(features), f"rules[{i}]")
        if not 0 < config.max_f1_drop <= 1:
            raise InvalidArgument("max_f1_drop", "must be in (0, 1]")
        existing = self.lines.get(model)
        if existing is not None and existing.features != tuple(features):
            raise InvalidArgument("features", f"must equal the model's features {list(existing.features)}")
        if reference is not None and (reference.ndim != 2 or reference.shape[1] != len(features) or len(reference) < 2):
            raise InvalidArgument("reference", f"must be (rows >= 2, {len(features)}) float32")
        warmup = None
        if reference is not None:
            warmup = torch.from_numpy(np.nan_to_num(reference[:8], nan=0.0).astype(np.float32))
        mv = self.registry.register(model, version, features, fmt, payload, arch=arch, options=options, warmup=warmup)
        with self.lock:
            line = self.lines.get(model)
            if line is None:
                line = self.lines[model] = ModelLineState(model, tuple(features), self.settings, self.device)

        def run(rows: np.ndarray, mv: ModelVersion = mv) -> np.ndarray:
            return mv(torch.from_numpy(rows).to(self.device)).float().cpu().numpy()

        state = VersionState(
            mv,
            config,
            DynamicBatcher(
                run,
                max_batch_size=self.settings.max_batch_size,
                max_queue_delay_s=self.settings.max_queue_delay_ms / 1000,
                max_queue_rows=self.settings.max_queue_rows,
                name=f"batcher-{model}-{version}",
            ),
            VersionHealth(RollingF1(1000), config.baseline_f1, self.settings.min_labels),
        )
        with line.lock:
            line.versions[version] = state
            if reference is not None and line.reference is None:
                self._set_reference(line, reference.astype(np.float32), config)
        if activate:
            self.activate(model, version)
        return state

    def _set_reference(self, line: ModelLineState, rows: np.ndarray, config: VersionConfig) -> None:
        line.reference = drift_mod.ReferenceWindow.from_rows(rows, device=self.device, names=list(line.features))
        with np.errstate(all="ignore"):
            line.medians = np.nanmedian(rows, axis=0).astype(np.float32)
        line.missing = MissingMonitor(
            line.features, line.medians, config.missing_alert_rate, self.settings.live_window, config.cleaning
        )
        self._event(line.name, "reference_ready", f"reference window of {len(rows)} rows")

    def activate(self, model: str, version: str) -> str:
        """Activate a version."""
        self._line(model)
        return self.registry.activate(model, version).version

    def rollback(self, model: str, reason: str = "requested") -> str:
        """Re-activate the previous version."""
        self._line(model)
        previous = self.registry.active(model).version
        now = self.registry.rollback(model).version
        self._event(model, "rollback", f"{previous} -> {now}: {reason}")
        return now

    def _event(self, model: str, kind: str, message: str) -> None:
        self.events.append(Event(model, kind, message, time.time()))
        log.warning("scorer event", extra={"model": model, "kind": kind, "detail": message})

    # -- scoring ---------------------------------------------------------------------------------------

    def _row(self, line: ModelLineState, features: dict[str, float]) -> np.ndarray:
        row = np.full(len(line.features), np.nan, dtype=np.float32)
        for name, value in features.items():
            j = line.index.get(name)
            if j is None:
                raise InvalidArgument(
                    f"features[{name}]", f"is not a feature of {line.name!r} (expects {len(line.features)})"
                )
            if math.isinf(value) or abs(value) > FLOAT32_MAX:  # NaN passes: it means missing
                raise InvalidArgument(
                    f"features[{name}]",
                    f"must be finite and fit float32 (|value| <= {FLOAT32_MAX:.8g}; absent or NaN means missing)",
                )
            row[j] = value
        return row

    def score(
        self,
        model: str,
        request_id: str,
        features: dict[str, float],
        *,
        version: str = "",
        explain: bool = False,
        shadow: bool = False,
    ) -> ScoreOutcome:
        """Score one request (see ScoreRequest in the proto); a shadow call leaves no trace in the line."""
        if not 1 <= len(request_id) <= 256:
            raise InvalidArgument("request_id", "must be 1 to 256 characters")
        line = self._line(model)
        mv = self.registry.active(model, version)
        state = line.versions[mv.version]
        raw = self._row(line, features)
        missing = np.isnan(raw)
        row = raw
        imputed = False
        if missing.any():
            first_missing = line.features[int(np.argmax(missing))]
            if state.config.cleaning is CleaningPolicy.REJECT:
                raise InvalidArgument(f"features[{first_missing}]", "is missing and the cleaning policy rejects")
            if line.missing is None or np.isnan(line.medians[missing]).any():
                raise InvalidArgument(
                    f"features[{first_missing}]", "is missing and there is no reference median to impute it from yet"
                )
            cleaned, flags = line.missing.clean(raw[None, :])
            row, imputed = cleaned[0], bool(flags[0])
        by_name = {f: float(row[j]) for f, j in line.index.items()}
        path = f"model:{model}:{mv.version}"
        ruled = decide(by_name, state.config.rules, 0.0, path, state.config.policy, line.drift_score)
        if ruled.path.startswith("rule:"):
            if not shadow:
                self._observe(line, raw, missing, state.config)
            return ScoreOutcome(ruled, "", imputed)
        score = float(state.batcher.submit(row[None, :]).result()[0])
        decision = decide(by_name, (), score, path, state.config.policy, line.drift_score)
        # Explained before anything is recorded: a request refused here leaves no trace in the line.
        explanation = self._explain(line, mv, row) if explain else None
        if not shadow:  # shadow scores are compared by the caller, never fed back as served decisions
            self._observe(line, raw, missing, state.config)
            line.decisions.record(request_id, mv.version, decision.positive)
        outcome = ScoreOutcome(decision, mv.version, imputed)
        if explanation is not None:
            outcome.attributions, outcome.attribution_method = explanation
        return outcome

    def _observe(self, line: ModelLineState, raw: np.ndarray, missing: np.ndarray, config: VersionConfig) -> None:
        with line.lock:
            line.live.add(raw[None, :])
            if line.missing is not None:
                for feature in line.missing.observe(missing[None, :]):
                    rate = float(line.missing.rates()[line.index[feature]])
                    self._event(
                        line.name,
                        "missing_alert",
                        f"feature {feature} missing in {rate:.1%} of the live window "
                        f"(> {line.missing.alert_rate:.0%}); "
                        f"policy {line.missing.policy.value}",
                    )
            if line.reference is None and len(line.live) >= config.reference_rows:
                self._set_reference(line, line.live.values().cpu().numpy().T.astype(np.float32), config)
            line.rows_since_drift += 1
            if line.reference is not None and line.rows_since_drift >= self.settings.drift_every:
                line.rows_since_drift = 0
                line.drift_score = float(drift_mod.drift_stats(line.reference, line.live).score)

    def _explain(self, line: ModelLineState, mv: ModelVersion, row: np.ndarray) -> tuple[list[tuple[str, float]], str]:
        """(attributions by feature, method); InvalidArgument naming ``explain`` when there are none."""
        module = mv.raw_module if mv.raw_module is not None else mv.module
        if line.reference is not None:
            background = line.reference.mean.to(torch.float32).unsqueeze(0)
            finite = torch.isfinite(background[0]).tolist()
            unusable = [f for f, ok in zip(line.features, finite, strict=True) if not ok]
            if unusable:
                raise FailedPrecondition(
                    f"explain: the reference window of {line.name!r} has no finite mean for {unusable[:5]} "
                    "(every reference value missing?); score without explain"
                )
        else:
            background = torch.zeros(1, len(line.features))
        x = torch.from_numpy(row).to(self.device)
        try:
            result = explain_fn(module, x, background.to(self.device))  # type: ignore[arg-type]
        except InvalidArgument as exc:
            raise InvalidArgument("explain", f"no attributions for this request ({exc.field}: {exc.rule})") from None
        attributions = [(f, float(a)) for f, a in zip(line.features, result.attributions.tolist(), strict=True)]
        return attributions, str(result.method)

    def score_many(
        self, requests: list[tuple[str, str, dict[str, float], str, bool]]
    ) -> list[ScoreOutcome | GuardmeshError]:
        """Score requests concurrently through the batchers; each gets its outcome or its error."""
        out: list[ScoreOutcome | GuardmeshError] = []
        for model, request_id, features, version, explain in requests:
            try:
                out.append(self.score(model, request_id, features, version=version, explain=explain))
            except GuardmeshError as err:
                out.append(err)
        return out

    # -- feedback --------------------------------------------------------------------------------------

    def feedback(self, model: str, labels: list[tuple[str, bool]]) -> FeedbackResult:
        """Match labels to decisions; update rolling F1 per version; roll back a degraded active version."""
        line = self._line(model)
        if not labels:
            raise InvalidArgument("labels", "must not be empty")
        accepted = unknown = 0
        active = self.registry.active(model).version
        for request_id, label in labels:
            found = line.decisions.pop(request_id)
            if found is None:
                unknown += 1
                continue
            version, predicted = found
            state = line.versions.get(version)
            if state is None:
                unknown += 1
                continue
            state.health.observe(predicted, label)
            accepted += 1
        health = line.versions[active].health
        precision, recall, f1, _ = health.rolling.metrics()
        rolled_back = False
        degraded, drop = health.degraded(line.versions[active].config.max_f1_drop)
        if degraded:
            try:
                self.rollback(model, f"F1 {f1:.3f} is {drop:.1%} below its baseline {health.baseline_f1:.3f}")
                rolled_back = True
            except FailedPrecondition:
                self._event(model, "degraded", f"F1 dropped {drop:.1%} but no earlier version exists")
        return FeedbackResult(
            accepted, unknown, self.registry.active(model).version, rolled_back, precision, recall, f1
        )

    # -- reports ---------------------------------------------------------------------------------------

    def drift_report(self, model: str) -> tuple[drift_mod.DriftReport, float, int, int]:
        """(report, threshold in force, reference rows, live rows)."""
        line = self._line(model)
        with line.lock:
            if line.reference is None:
                raise FailedPrecondition(f"model {model!r} has no reference window yet")
            if len(line.live) == 0:
                raise FailedPrecondition(f"model {model!r} has scored no rows yet")
            report = drift_mod.drift_stats(line.reference, line.live)
            line.drift_score = float(report.score)
        active = self.registry.active(model)
        threshold = line.versions[active.version].config.policy.threshold(line.drift_score)
        return report, threshold, line.reference.rows, len(line.live)

    def close(self) -> None:
        """Stop every batcher."""
        for line in self.lines.values():
            for state in line.versions.values():
                state.batcher.close()
