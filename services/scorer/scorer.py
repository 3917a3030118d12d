"""The scorer's core: model lines, the decision path, drift, explanations, feedback and rollback.

No gRPC here: ``server.py`` translates protobuf to these calls. Every way in (one Score, a ScoreBatch, an
Open Inference Protocol ModelInfer) goes through the same path, once per group of rows: features parsed
into one array, missing values imputed or refused, rules applied, the remaining rows run by the version's
dynamic batcher (a large group in chunks of the batch size, all queued before any is awaited), decisions
against the drift-aware threshold, then the drift window, missing-value monitor and decision log updated
once for the group under the line's lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from guardmesh.config import ScorerSettings
from guardmesh.durable import StoreFailure
from guardmesh.errors import AlreadyExists, FailedPrecondition, GuardmeshError, InvalidArgument, NotFound, Unavailable
from services.scorer import drift as drift_mod
from services.scorer.batching import Arrival, BatchStats, DynamicBatcher
from services.scorer.decision import Decision, Rule, ThresholdPolicy, decide
from services.scorer.explain import AttributionDriftReport, attribution_shift
from services.scorer.explain import explain as explain_fn
from services.scorer.gathering import Gathering
from services.scorer.monitoring import CleaningPolicy, DecisionLog, MissingMonitor, RollingF1, VersionHealth
from services.scorer.registry import CommitActive, ModelFormat, ModelRegistry, ModelVersion
from services.scorer.wire import Layout, WireFeatures, layout_of, names_of

log = logging.getLogger(__name__)
#: Largest magnitude a feature value may have: rows are float32, a larger double would become +-Inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The error of a row whose request (all or nothing) another row refused; the request answers that row's error.
_WITH_ITS_REQUEST = FailedPrecondition("row refused with its request")
#: Feature-name orders whose columns a line remembers (see :meth:`ModelLineState.columns`).
COLUMN_MAPS = 64


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


@dataclass(frozen=True)
class Registration:
    """Everything a version was registered with: what the registry stores and a restart registers again."""

    model: str
    version: str
    features: tuple[str, ...]
    fmt: ModelFormat
    payload: bytes
    config: VersionConfig
    arch: str = ""
    options: Mapping[str, object] = field(default_factory=dict)
    #: Reference rows (rows x features, float32; NaN = missing) or None (the first live rows become it).
    reference: np.ndarray | None = None


class RegistrationStore(Protocol):
    """Where accepted registrations and the active versions are kept (``persistence.RegistryStore``)."""

    def save_registration(self, registration: Registration) -> None:
        """Record an accepted registration durably."""
        ...

    def save_active(self, active: dict[str, tuple[str, list[str]]]) -> None:
        """Record (active version, activation history) per model durably."""
        ...

    def registrations(self) -> Iterator[Registration]:
        """Recorded registrations in the order they were accepted."""
        ...

    def active(self) -> dict[str, tuple[str, list[str]]]:
        """The recorded (active version, activation history) per model."""
        ...


@runtime_checkable
class SharedState(Protocol):
    """A registry several replicas share (``persistence.SharedRegistry``): besides the registrations, the
    active versions by compare-and-set, a change counter, the decision log and the labelled decisions."""

    def registrations(self, skip: set[tuple[str, str]] | frozenset[tuple[str, str]] = ...) -> Iterator[Registration]:
        """Recorded registrations, oldest first, but those in ``skip``."""
        ...

    def active(self) -> dict[str, tuple[str, list[str]]]:
        """The stored (active version, activation history) per model."""
        ...

    def change_active(self, model: str, expected: tuple[str | None, list[str]], new: tuple[str, list[str]]) -> bool:
        """Compare-and-set of one model's (active, history); False if the store no longer holds ``expected``."""
        ...

    def changes(self) -> int:
        """A counter that rises with every change of the registry by any replica."""
        ...

    def listen(self, callback: Any) -> Any:
        """Call ``callback`` when the registry may have changed (a hint; the counter is the truth)."""
        ...

    def record_decisions(self, model: str, decided: list[tuple[str, str, bool]]) -> Any:
        """Queue (request id, version, positive) decisions; a ticket whose ``wait`` returns once stored."""
        ...

    def match_labels(self, model: str, labels: list[tuple[str, bool]]) -> list[tuple[str, bool, bool]]:
        """(version, predicted, label) of each label matched to a stored decision of any replica (used once)."""
        ...

    def labelled(
        self, model: str, version: str, last: int, first: int
    ) -> tuple[list[tuple[bool, bool]], list[tuple[bool, bool]]]:
        """(first ``first``, last ``last``) (predicted, label) pairs of a version from every replica."""
        ...

    def prune_decisions(self, model: str, keep: int) -> int:
        """Drop all but the newest ``keep`` stored decisions of a model; how many were dropped."""
        ...

    def prune_labels(self, model: str, version: str, first: int, last: int) -> int:
        """Drop a version's labelled decisions but the first ``first`` and the last ``last``."""
        ...

    def publish_live(self, model: str, rows: np.ndarray) -> None:
        """Store this replica's live window (rows x features, float32, NaN = missing) of a model."""
        ...

    def live_windows(self, model: str, since: float) -> list[tuple[str, np.ndarray]]:
        """(replica, rows) of every replica's live window of a model published at or after ``since``."""
        ...


#: Seconds between publications of a replica's live windows to the shared store (for merged drift reports).
LIVE_PUBLISH_S = 1.0
#: Seconds between prunings of the shared decision log to ``decision_log`` decisions per model.
PRUNE_EVERY_S = 10.0
#: A replica's published live window older than this (seconds) is left out of a merged report (gone replica).
LIVE_FRESH_S = 60.0


class ActiveChanged(FailedPrecondition):
    """Another replica changed the model's active version first (the compare-and-set found other values)."""


@dataclass
class VersionState:
    """A loaded version with its settings, batcher and feedback health."""

    model: ModelVersion
    config: VersionConfig
    batcher: DynamicBatcher
    health: VersionHealth


@dataclass(frozen=True)
class VersionInfo:
    """A version as operators see it."""

    version: str
    fmt: ModelFormat
    active: bool
    labels: int
    f1: float
    baseline_f1: float


@dataclass(frozen=True)
class LineInfo:
    """A model line as operators see it."""

    model: str
    features: tuple[str, ...]
    active: str | None
    versions: tuple[VersionInfo, ...]


@dataclass(frozen=True)
class ScoreCall:
    """One request to score: its id, its features by name (absent or NaN = missing) and options."""

    model: str
    request_id: str
    features: Mapping[str, float]
    version: str = ""
    explain: bool = False
    shadow: bool = False


@dataclass(frozen=True)
class RowsCall:
    """One request scoring rows given as an array in the model's feature order (NaN = missing), all or none
    (the Open Inference Protocol's ModelInfer): one decision per row, ``request_ids`` one per row."""

    model: str
    rows: np.ndarray
    request_ids: Sequence[str]
    version: str = ""


@dataclass
class RowsResult:
    """A RowsCall's answer: the version that decided and one outcome per row."""

    version: str
    outcomes: list[ScoreOutcome]


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
        #: Rows of groups answered once their decisions are stored (:meth:`Scorer.score_many_later`), not yet
        #: in the live window.
        self.rows_deferred = 0
        #: Notified as deferred rows are taken in: rows taken in at once wait for those before them.
        self.taken_in = threading.Condition(self.lock)
        self._columns: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}
        #: The line's features as a Score request's map names them in order on the wire (see ``wire.py``).
        self.layout = layout_of(features)
        self._wire_names: dict[Layout, tuple[str, ...] | None] = {}

    def wire_names(self, layout: Layout) -> tuple[str, ...] | None:
        """The feature names of a wire layout other than the line's, in wire order; None when a name repeats
        (the map's last entry wins: such a map is read by name). Remembered per layout like :meth:`columns`."""
        if layout in self._wire_names:
            return self._wire_names[layout]
        decoded = names_of(layout)
        names = decoded if len(set(decoded)) == len(decoded) else None
        if len(self._wire_names) >= COLUMN_MAPS:
            self._wire_names.clear()
        self._wire_names[layout] = names
        return names

    def columns(self, names: tuple[str, ...]) -> tuple[np.ndarray, int]:
        """The line's column of each feature name (-1: not a feature of the line), and the position of the first
        unknown name (``len(names)``: none). Remembered per names tuple, as clients send the same maps over and
        over; at most :data:`COLUMN_MAPS` of them, then forgotten and learnt again."""
        known = self._columns.get(names)
        if known is None:
            columns = np.array([self.index.get(name, -1) for name in names], dtype=np.intp)
            unknown = np.flatnonzero(columns < 0)
            known = (columns, int(unknown[0]) if len(unknown) else len(names))
            if len(self._columns) >= COLUMN_MAPS:
                self._columns.clear()
            self._columns[names] = known
        return known

    def expected(self) -> str:
        """The features this line takes, for error messages."""
        shown = ", ".join(self.features[:20]) + (", ..." if len(self.features) > 20 else "")
        return f"{len(self.features)} features: {shown}"


@dataclass
class _Group:
    """Rows of one line and version on their way through the decision path (see the module docstring).

    ``errors[i]`` is set for a row refused before the model; such a row is neither scored nor observed.
    """

    line: ModelLineState
    state: VersionState
    raw: np.ndarray  # rows x features as sent, NaN = missing
    request_ids: list[str]
    explain: list[bool]
    shadow: list[bool]
    errors: list[GuardmeshError | None]
    #: Row ranges [start, end) of all-or-nothing calls (RowsCall): a refused row refuses its whole range.
    atomic: list[tuple[int, int]] = field(default_factory=list)
    rows: np.ndarray = field(init=False)  # after imputation
    imputed: np.ndarray = field(init=False)
    ruled: list[Decision | None] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = self.raw
        self.imputed = np.zeros(len(self.raw), dtype=bool)
        self.ruled = [None] * len(self.raw)


@dataclass
class _Later:
    """What :meth:`Scorer.score_many_later` leaves for after a group's decisions are stored: each group's
    take-in (``skip``: an earlier one failed), and whether the next group must wait for them (``barrier``)."""

    steps: list[Callable[[bool], None]] = field(default_factory=list)
    barrier: bool = False


class Scorer:
    """Serves model lines; see the module docstring."""

    def __init__(self, settings: ScorerSettings, device: torch.device, store: RegistrationStore | None = None) -> None:
        self.settings = settings
        self.device = device
        if settings.torch_threads:  # process-wide: the scorer is the process's only model runner
            torch.set_num_threads(settings.torch_threads)
        self.registry = ModelRegistry(device)
        self.lines: dict[str, ModelLineState] = {}
        self.lock = threading.Lock()
        self.events: deque[Event] = deque(maxlen=10_000)
        self.store = store
        #: The store when replicas share it: decisions, labels and activations then go through it.
        self.shared = store if isinstance(store, SharedState) else None
        self._refresh_lock = threading.Lock()
        self._seen_changes = -1
        self._stop_following = threading.Event()
        self._follower: threading.Thread | None = None
        #: This replica's name in the shared store ("" without one); rows_seen last published per model.
        self.replica: str = getattr(store, "replica", "") or ""
        self._published: dict[str, int] = {}
        #: Concurrent single calls go through the path together (one parse, one batcher hand-off, one
        #: window update, one decision-log commit per group); not with batching off (max_batch_size 1).
        self.gathering: Gathering[ScoreCall | RowsCall, ScoreOutcome | RowsResult | GuardmeshError] | None = (
            Gathering(
                self.score_many,
                settings.max_batch_size,
                settings.max_queue_delay_ms / 1000,
                self.score_many_later if settings.commit_ahead else None,
            )
            if settings.max_batch_size > 1
            else None
        )

    # -- models ----------------------------------------------------------------------------------------

    def _line(self, model: str) -> ModelLineState:
        if not model:
            raise InvalidArgument("model", "must not be empty")
        line = self.lines.get(model)
        if line is None:
            raise NotFound(f"model {model!r} not found")
        return line

    def register(self, registration: Registration, *, activate: bool = False) -> VersionInfo:
        """Load, warm up, record durably and (optionally) activate a version; a refused one changes nothing."""
        state = self._load(registration)
        if self.store is not None:  # durable before the answer: a restart serves it again
            try:
                self.store.save_registration(registration)
            except BaseException:
                self._unload(registration.model, registration.version)  # not durable, so not served either
                raise
        if activate:
            self.activate(registration.model, registration.version)
        return self.version_info(registration.model, state.model.version)

    def _load(self, registration: Registration) -> VersionState:
        r = registration
        model, version, features, config, reference = r.model, r.version, list(r.features), r.config, r.reference
        if not 1 <= len(model) <= 128:
            raise InvalidArgument("model", "must be 1 to 128 characters")
        if not 1 <= len(version) <= 64:
            raise InvalidArgument("version", "must be 1 to 64 characters")
        if not features or len(set(features)) != len(features):
            raise InvalidArgument("features", "must be a non-empty list of unique names")
        config.policy.validate()
        for i, rule in enumerate(config.rules):
            rule.validate(tuple(features), f"rules[{i}]")
        if not 0 < config.max_f1_drop <= 1:
            raise InvalidArgument("max_f1_drop", "must be in (0, 1]")
        existing = self.lines.get(model)
        if existing is not None and existing.features != tuple(features):
            raise InvalidArgument(
                "features", f"must equal the model's features ({existing.expected()}); got {len(features)}"
            )
        if reference is not None and (reference.ndim != 2 or reference.shape[1] != len(features) or len(reference) < 2):
            raise InvalidArgument(
                "reference",
                f"must be (rows >= 2, {len(features)}) float32, one column per feature; got {reference.shape}",
            )
        warmup = None
        if reference is not None:
            warmup = torch.from_numpy(np.nan_to_num(reference[:64], nan=0.0).astype(np.float32))
        mv = self.registry.register(
            model, version, features, r.fmt, r.payload, arch=r.arch, options=dict(r.options), warmup=warmup
        )
        with self.lock:
            line = self.lines.get(model)
            if line is None:
                line = self.lines[model] = ModelLineState(model, tuple(features), self.settings, self.device)

        def run(rows: np.ndarray, mv: ModelVersion = mv) -> np.ndarray:
            x = torch.from_numpy(rows)
            return mv.scores(x if self.device.type == "cpu" else x.to(self.device))

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
        return state

    def _unload(self, model: str, version: str) -> None:
        """Take back a version that was loaded but never answered for (its record could not be written)."""
        line = self.lines[model]
        with line.lock:
            state = line.versions.pop(version, None)
        self.registry.remove(model, version)
        with self.lock:
            if not line.versions and self.lines.get(model) is line:
                del self.lines[model]
        if state is not None:
            state.batcher.close()

    def restore(self) -> int:
        """Register every recorded version again (each passes its warm-up again), then restore the recorded
        active versions and their histories; what cannot be restored is logged and left out. Returns the
        number of versions restored."""
        if self.store is None:
            return 0
        restored = 0
        for registration in self.store.registrations():
            try:
                self._load(registration)
                restored += 1
            except GuardmeshError as err:
                log.error(
                    "recorded model version not restored",
                    extra={"model": registration.model, "version": registration.version, "error": err.message},
                )
        for model, (version, history) in self.store.active().items():
            try:
                self.registry.restore_active(model, version, history)
            except GuardmeshError as err:
                log.error("recorded active version not restored", extra={"model": model, "error": err.message})
        if restored:
            log.info("model registry restored", extra={"versions": restored})
        return restored

    def _commit_active(self, model: str) -> CommitActive | None:
        """What makes an activation change durable before it takes effect (nothing without a store). On a
        shared store, a compare-and-set from what this replica serves: ActiveChanged if another replica
        changed the model first (then nothing changes here either)."""
        shared = self.shared
        if shared is None:
            return self.store.save_active if self.store is not None else None

        def compare_and_set(planned: dict[str, tuple[str, list[str]]]) -> None:
            line = self.registry.lines[model]  # called under the registry's lock: this is what serves now
            if not shared.change_active(model, (line.active, list(line.history)), planned[model]):
                raise ActiveChanged(f"model {model!r}: another replica changed its active version meanwhile")

        return compare_and_set

    def _set_reference(self, line: ModelLineState, rows: np.ndarray, config: VersionConfig) -> None:
        line.reference = drift_mod.ReferenceWindow.from_rows(rows, device=self.device, names=list(line.features))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            # A feature missing from every reference row has no median (NaN): imputing it is refused later.
            warnings.simplefilter("ignore", RuntimeWarning)
            line.medians = np.nanmedian(rows, axis=0).astype(np.float32)
        line.missing = MissingMonitor(line.features, config.missing_alert_rate, self.settings.live_window)
        self._event(line.name, "reference_ready", f"reference window of {len(rows)} rows")

    def activate(self, model: str, version: str) -> str:
        """Activate a version (recorded durably before it serves; a failed write changes nothing)."""
        self._line(model)
        try:
            return self.registry.activate(model, version, self._commit_active(model)).version
        except ActiveChanged:
            self.refresh()  # the version asked for is named: activating it over the newer state is safe
            return self.registry.activate(model, version, self._commit_active(model)).version

    def rollback(self, model: str, reason: str = "requested") -> str:
        """Re-activate the previous version (recorded durably before it serves; a failed write changes nothing)."""
        self._line(model)
        previous = self.registry.active(model).version
        try:
            now = self.registry.rollback(model, self._commit_active(model)).version
        except ActiveChanged:
            self.refresh()  # never a second step back on top of another replica's change
            serving = self.registry.active_name(model)
            raise ActiveChanged(
                f"model {model!r}: another replica changed its active version meanwhile (it now serves "
                f"{serving!r}); nothing rolled back here"
            ) from None
        self._event(model, "rollback", f"{previous} -> {now}: {reason}")
        return now

    def version_info(self, model: str, version: str) -> VersionInfo:
        """A version's format, whether it serves, and its feedback health (on a shared store, from every
        replica's labels; this replica's last known figures while the store does not answer)."""
        state = self._state(self._line(model), version)
        if self.shared is not None:
            try:
                self._health_from_store(model, version, state)
            except GuardmeshError as err:
                log.warning("feedback health not read from the store", extra={"model": model, "error": err.message})
        _, _, f1, n = state.health.rolling.metrics()
        return VersionInfo(
            version,
            state.model.fmt,
            self.registry.active_name(model) == version,
            n,
            f1,
            state.health.baseline_f1 or 0.0,
        )

    def model_lines(self) -> list[LineInfo]:
        """Every model line, its features, active version and versions (in registration order)."""
        out = []
        for name, versions, active in self.registry.list():
            line = self.lines.get(name)
            if line is None:  # registered in the registry, its line not yet made (a registration in flight)
                continue
            infos = tuple(self.version_info(name, v) for v in versions if v in line.versions)
            out.append(LineInfo(name, line.features, active, infos))
        return out

    def served(self) -> list[tuple[str, tuple[str, ...], str | None, tuple[str, ...]]]:
        """(model, features, active version, loaded versions in registration order) per model line, from
        memory only: what request paths need, without the feedback health :meth:`model_lines` reads (from
        the store when shared), so a request never waits on the store for it."""
        out = []
        for name, versions, active in self.registry.list():
            line = self.lines.get(name)
            if line is not None:  # None: a registration in flight
                out.append((name, line.features, active, tuple(v for v in versions if v in line.versions)))
        return out

    def features(self, model: str) -> tuple[str, ...]:
        """The features of a model, in the order its rows take them."""
        return self._line(model).features

    def _event(self, model: str, kind: str, message: str) -> None:
        self.events.append(Event(model, kind, message, time.time()))
        log.warning("scorer event", extra={"model": model, "kind": kind, "detail": message})

    def _state(self, line: ModelLineState, version: str) -> VersionState:
        state = line.versions.get(version)
        if state is None:  # registered in the registry a moment ago, not yet on the line
            raise NotFound(f"model {line.name!r} version {version!r} not found")
        return state

    # -- scoring ---------------------------------------------------------------------------------------

    def score(
        self,
        model: str,
        request_id: str,
        features: Mapping[str, float],
        *,
        version: str = "",
        explain: bool = False,
        shadow: bool = False,
    ) -> ScoreOutcome:
        """Score one request (see ScoreRequest in the proto); a shadow call leaves no trace in the line.
        Concurrent calls are scored together (:attr:`gathering`), each answered as if alone."""
        call = ScoreCall(model, request_id, features, version, explain, shadow)
        result = self.gathering.call(call) if self.gathering is not None else self.score_many([call])[0]
        if isinstance(result, GuardmeshError):
            raise result
        assert isinstance(result, ScoreOutcome)
        return result

    async def score_async(self, call: ScoreCall, executor: Executor | None = None) -> ScoreOutcome:
        """:meth:`score` for a caller on an event loop: the call waits in the gathering (its group runs on the
        gathering's thread) holding neither the loop nor a thread; with batching off it runs on ``executor``."""
        result = await self._awaited(call, executor)
        assert isinstance(result, ScoreOutcome)
        return result

    async def _awaited(self, call: ScoreCall | RowsCall, executor: Executor | None) -> ScoreOutcome | RowsResult:
        """The call's answer from the gathering (or ``executor`` with batching off); its error raised."""
        if self.gathering is not None:
            result = await self.gathering.submit(call)
        else:
            [result] = await asyncio.get_running_loop().run_in_executor(executor, self.score_many, [call])
        if isinstance(result, GuardmeshError):
            raise result
        return result

    def score_many_later(
        self, calls: Sequence[ScoreCall | RowsCall]
    ) -> tuple[list[ScoreOutcome | RowsResult | GuardmeshError], Callable[[], None] | None, bool]:
        """:meth:`score_many` whose answers may wait for the group's decision-log commit off this thread: the
        results, and None (they may be given now) or a function that returns once the group's decisions are
        stored and its rows taken in, in order (it raises UNAVAILABLE if the store failed: the results must
        then not be given); and whether the next group must wait for that function (a barrier: these rows may
        change what it decides with). Otherwise the next group may run meanwhile."""
        later = _Later()
        try:
            results = self.score_many(calls, later)
        except BaseException:
            for take_in in later.steps:
                take_in(True)
            raise
        if not later.steps:
            return results, None, False

        def complete() -> None:
            failed: BaseException | None = None
            for take_in in later.steps:
                try:
                    take_in(failed is not None)
                except BaseException as exc:  # the later ones are skipped, and the group fails as before
                    failed = exc
            if failed is not None:
                raise failed

        return results, complete, later.barrier

    def score_many(
        self, calls: Sequence[ScoreCall | RowsCall], later: _Later | None = None
    ) -> list[ScoreOutcome | RowsResult | GuardmeshError]:
        """Score requests together: the calls of each model version go through the path as one group (one
        parse, the batcher in full batches, one window update, one decision-log commit). Each call gets its
        outcome (a RowsCall: its version and one outcome per row) or its error, in order; a refused call
        leaves no trace (a RowsCall is refused whole by any refused row, the error naming the row)."""
        results: list[ScoreOutcome | RowsResult | GuardmeshError | None] = [None] * len(calls)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, call in enumerate(calls):
            try:
                if isinstance(call, ScoreCall):
                    if not 1 <= len(call.request_id) <= 256:
                        raise InvalidArgument("request_id", "must be 1 to 256 characters")
                    self._line(call.model)
                else:
                    self._check_rows(self._line(call.model), call)
                version = self.registry.active(call.model, call.version).version
            except GuardmeshError as err:
                results[i] = err
                continue
            groups.setdefault((call.model, version), []).append(i)
        queued: list[tuple[list[int], list[tuple[int, int]], _Group, list[Future[np.ndarray]]]] = []
        for (model, version), members in groups.items():  # every group queued before any is awaited
            line = self.lines[model]
            try:
                state = self._state(line, version)
            except GuardmeshError as err:
                for i in members:
                    results[i] = err
                continue
            with state.batcher.arriving() as arrival:  # the batcher may wait for these rows, not leave without
                group, spans = self._assemble(line, state, [calls[i] for i in members])
                # inline only for one group: otherwise the first model's rows would run on this thread
                # before the next model's rows are queued
                queued.append((members, spans, group, self._prepare(group, arrival, inline=len(groups) == 1)))
        for members, spans, group, pending in queued:
            outcomes = self._finish(group, pending, later)
            for i, (start, end) in zip(members, spans, strict=True):
                if isinstance(calls[i], ScoreCall):
                    results[i] = outcomes[start]
                    continue
                first = next(
                    (
                        k
                        for k in range(start, end)
                        if isinstance(outcomes[k], GuardmeshError) and outcomes[k] is not _WITH_ITS_REQUEST
                    ),
                    None,
                )
                if first is None:
                    results[i] = RowsResult(group.state.model.version, outcomes[start:end])  # type: ignore[arg-type]
                    continue
                refused = outcomes[first]
                assert isinstance(refused, GuardmeshError)
                results[i] = (
                    InvalidArgument(f"row {first - start} {refused.field}", refused.rule)
                    if isinstance(refused, InvalidArgument)
                    else refused
                )
        return [r if r is not None else GuardmeshError("not scored") for r in results]

    def score_rows(
        self, model: str, rows: np.ndarray, request_ids: Sequence[str], *, version: str = ""
    ) -> tuple[str, list[ScoreOutcome]]:
        """Score rows given as an array in the model's feature order (NaN = missing), all or none: the first
        refused row raises (its message names the row) and nothing is recorded. Returns (version, outcomes)."""
        [result] = self.score_many([RowsCall(model, rows, request_ids, version)])
        if isinstance(result, GuardmeshError):
            raise result
        assert isinstance(result, RowsResult)
        return result.version, result.outcomes

    async def score_rows_async(
        self, call: RowsCall, executor: Executor | None = None
    ) -> tuple[str, list[ScoreOutcome]]:
        """:meth:`score_rows` for a caller on an event loop: gathered with concurrent Score and ModelInfer calls
        (one forward, one decision-log commit per group) like :meth:`score_async`."""
        result = await self._awaited(call, executor)
        assert isinstance(result, RowsResult)
        return result.version, result.outcomes

    def _check_rows(self, line: ModelLineState, call: RowsCall) -> None:
        """INVALID_ARGUMENT naming the field (and row) for a RowsCall that breaks a rule."""
        rows = call.rows
        if rows.ndim != 2 or rows.shape[1] != len(line.features):
            raise InvalidArgument("rows", f"must be (rows, {len(line.features)}): {line.expected()}")
        if len(call.request_ids) != len(rows):
            raise InvalidArgument("request_ids", "must hold one id per row")
        if len(rows) > self.settings.max_queue_rows:
            raise InvalidArgument(
                "rows",
                f"at most {self.settings.max_queue_rows} rows per request (scorer.max_queue_rows); got {len(rows)}",
            )
        if np.isinf(rows).any():
            bad = np.argwhere(np.isinf(rows))[0]
            raise InvalidArgument(
                f"row {int(bad[0])} features[{line.features[int(bad[1])]}]",
                "must be finite (NaN means missing)",
            )

    def _assemble(
        self, line: ModelLineState, state: VersionState, calls: Sequence[ScoreCall | RowsCall]
    ) -> tuple[_Group, list[tuple[int, int]]]:
        """One group of the calls' rows in the calls' order (Score calls parsed together, a RowsCall's rows as
        they came) and each call's row range in it: the drift window sees them in the order they arrived."""
        singles = [c for c in calls if isinstance(c, ScoreCall)]
        if len(singles) == len(calls):
            return self._parse(line, state, singles), [(k, k + 1) for k in range(len(calls))]
        spans: list[tuple[int, int]] = []
        offset = 0
        for call in calls:
            width = 1 if isinstance(call, ScoreCall) else len(call.rows)
            spans.append((offset, offset + width))
            offset += width
        # one copy, float32 and writable: a caller's array may be a read-only view of a request's bytes
        raw = np.empty((offset, len(line.features)), np.float32)
        request_ids: list[str] = [""] * offset
        errors: list[GuardmeshError | None] = [None] * offset
        explain, shadow = [False] * offset, [False] * offset
        at_single = [start for call, (start, _) in zip(calls, spans, strict=True) if isinstance(call, ScoreCall)]
        if singles:
            parsed = self._parse(line, state, singles)
            raw[at_single] = parsed.raw
            for k, at in enumerate(at_single):
                request_ids[at] = parsed.request_ids[k]
                errors[at], explain[at], shadow[at] = parsed.errors[k], parsed.explain[k], parsed.shadow[k]
        atomic = []
        for call, (start, end) in zip(calls, spans, strict=True):
            if isinstance(call, RowsCall):
                raw[start:end] = call.rows
                request_ids[start:end] = call.request_ids
                atomic.append((start, end))
        return _Group(line, state, raw, request_ids, explain, shadow, errors, atomic), spans

    @staticmethod
    def _refuse_atomic(group: _Group) -> None:
        """A refused row of an all-or-nothing call refuses the call's other rows too (neither scored nor
        recorded); they carry :data:`_WITH_ITS_REQUEST`, the row's own error stays first."""
        for start, end in group.atomic:
            if any(group.errors[k] is not None for k in range(start, end)):
                for k in range(start, end):
                    if group.errors[k] is None:
                        group.errors[k] = _WITH_ITS_REQUEST

    def _parse(self, line: ModelLineState, state: VersionState, calls: Sequence[ScoreCall]) -> _Group:
        """The calls' features as one (calls x features) float32 array; a bad value refuses only its call.

        Calls whose maps name the same features in the same order (the usual case: one client library) are
        parsed together: their columns are looked up once (:meth:`ModelLineState.columns`) and their values
        checked as one array. A map as Score's request carried it (:class:`WireFeatures`) whose names are the
        line's, in its order, gives its values as they are; one in another order has its names decoded once per
        order (:meth:`ModelLineState.wire_names`). The first problem in a map's order refuses its call, as a
        value-by-value loop would."""
        raw = np.full((len(calls), len(line.features)), np.nan, dtype=np.float32)
        errors: list[GuardmeshError | None] = [None] * len(calls)
        on_wire: dict[Layout, list[int]] = {}
        alike: dict[tuple[str, ...], list[int]] = {}
        for i, call in enumerate(calls):
            features = call.features
            if type(features) is WireFeatures:
                on_wire.setdefault(features.layout, []).append(i)
            else:
                alike.setdefault(tuple(features), []).append(i)
        for layout, members in on_wire.items():
            arrays = [cast(WireFeatures, calls[i].features).entry_values for i in members]
            if layout == line.layout:
                self._place(line, line.features, None, len(line.features), np.stack(arrays), members, raw, errors)
                continue
            names = line.wire_names(layout)
            if names is None:  # a name repeats: read by name, the last entry winning
                for i in members:
                    alike.setdefault(tuple(calls[i].features), []).append(i)
                continue
            columns, unknown = line.columns(names)
            self._place(line, names, columns, unknown, np.stack(arrays), members, raw, errors)
        for names, members in alike.items():
            columns, unknown = line.columns(names)
            values = np.fromiter(
                itertools.chain.from_iterable(map(calls[i].features.__getitem__, names) for i in members),
                np.float64,
                len(names) * len(members),
            ).reshape(len(members), len(names))
            self._place(line, names, columns, unknown, values, members, raw, errors)
        return _Group(
            line,
            state,
            raw,
            [c.request_id for c in calls],
            [c.explain for c in calls],
            [c.shadow for c in calls],
            errors,
        )

    @staticmethod
    def _place(
        line: ModelLineState,
        names: tuple[str, ...],
        columns: np.ndarray | None,
        unknown: int,
        values: np.ndarray,
        members: list[int],
        raw: np.ndarray,
        errors: list[GuardmeshError | None],
    ) -> None:
        """Check one group of alike maps (``values``: members x names, float64) and put the accepted rows in
        ``raw`` at their features' ``columns`` (None: the line's own order); the first problem in the map's
        order (an unknown name at ``unknown``, a value too large) refuses its call."""
        width = len(names)
        with np.errstate(invalid="ignore"):
            too_big = np.abs(values) > FLOAT32_MAX  # NaN passes: it means missing
        out_of_range = np.where(too_big.any(axis=1), too_big.argmax(axis=1), width) if width else [0] * len(members)
        accepted: list[int] = []
        for k, i in enumerate(members):
            first_bad = int(out_of_range[k])
            if unknown < first_bad:
                errors[i] = InvalidArgument(
                    f"features[{names[unknown]}]", f"is not a feature of {line.name!r} (expects {line.expected()})"
                )
            elif first_bad < width:
                errors[i] = InvalidArgument(
                    f"features[{names[first_bad]}]",
                    f"must be finite and fit float32 (|value| <= {FLOAT32_MAX:.8g}; absent or NaN means missing)",
                )
            else:
                accepted.append(k)
        rows = np.asarray(members) if len(accepted) == len(members) else np.asarray(members)[accepted]
        if len(accepted) < len(members):
            values = values[accepted]
        if not len(rows):
            return
        if columns is None:
            raw[rows] = values
        else:
            raw[rows[:, None], columns] = values

    def _prepare(self, group: _Group, arrival: Arrival, *, inline: bool) -> list[Future[np.ndarray]]:
        """Impute or refuse missing values, apply the rules, and queue the rows the model decides (with
        ``inline``, rows may run on this thread when the batcher is idle)."""
        line, config = group.line, group.state.config
        missing = np.isnan(group.raw)
        incomplete = np.flatnonzero(missing.any(axis=1))
        if len(incomplete):
            rows = group.raw.copy()
            for i in incomplete:
                if group.errors[i] is not None:
                    continue
                first_missing = line.features[int(np.argmax(missing[i]))]
                if config.cleaning is CleaningPolicy.REJECT:
                    group.errors[i] = InvalidArgument(
                        f"features[{first_missing}]", "is missing and the cleaning policy rejects"
                    )
                elif line.missing is None or np.isnan(line.medians[missing[i]]).any():
                    group.errors[i] = InvalidArgument(
                        f"features[{first_missing}]",
                        "is missing and there is no reference median to impute it from yet",
                    )
                else:
                    rows[i] = np.where(missing[i], line.medians, rows[i])
                    group.imputed[i] = True
            group.rows = rows
        model_path = f"model:{line.name}:{group.state.model.version}"
        for rule in config.rules:  # the first matching rule decides (NaN never matches)
            with np.errstate(invalid="ignore"):
                hits = np.flatnonzero(group.rows[:, line.index[rule.feature]] > rule.limit)
            for i in hits:
                if group.ruled[i] is None and group.errors[i] is None:
                    group.ruled[i] = decide(
                        {rule.feature: float(group.rows[i, line.index[rule.feature]])},
                        (rule,),
                        None,
                        model_path,
                        config.policy,
                        line.drift_score,
                    )
        self._refuse_atomic(group)
        scored = self._scored(group)
        if not scored:
            return []
        try:
            # inline: a lone caller runs its rows on its own thread when the batcher is idle (no hand-offs)
            return group.state.batcher.submit_many(group.rows[scored], arrival, inline=inline)
        except GuardmeshError as refused:  # the queue is full (RESOURCE_EXHAUSTED): the model rows share it
            for k in scored:
                group.errors[k] = refused
            return []

    @staticmethod
    def _scored(group: _Group) -> list[int]:
        return [i for i in range(len(group.raw)) if group.errors[i] is None and group.ruled[i] is None]

    def _finish(
        self, group: _Group, pending: list[Future[np.ndarray]], later: _Later | None = None
    ) -> list[ScoreOutcome | GuardmeshError]:
        """Await the model, decide, explain, then record the group's rows in the line (one lock)."""
        line, state = group.line, group.state
        scored = self._scored(group)
        try:
            scores = np.concatenate([f.result() for f in pending]) if pending else np.empty(0, np.float32)
        except GuardmeshError as refused:  # the batcher refused (closing): every model row shares it
            for i in scored:
                group.errors[i] = refused
            self._refuse_atomic(group)
            scored, scores = [], np.empty(0, np.float32)
        drift_score = line.drift_score
        threshold = state.config.policy.threshold(drift_score)
        path = f"model:{line.name}:{state.model.version}@threshold={threshold:.4f}"
        outcomes: list[ScoreOutcome | GuardmeshError | None] = [None] * len(group.raw)
        for i, error in enumerate(group.errors):
            if error is not None:
                outcomes[i] = error
        for i, ruled in enumerate(group.ruled):
            if ruled is not None and group.errors[i] is None:
                outcomes[i] = ScoreOutcome(ruled, "", bool(group.imputed[i]))
        for i, s in zip(scored, scores.tolist(), strict=True):
            outcome = ScoreOutcome(
                Decision(s, s >= threshold, threshold, path, drift_score), state.model.version, bool(group.imputed[i])
            )
            if group.explain[i]:
                # Explained before anything is recorded: a request refused here leaves no trace in the line.
                try:
                    outcome.attributions, outcome.attribution_method = self._explain(line, state.model, group.rows[i])
                except GuardmeshError as err:
                    outcomes[i] = err
                    continue
            outcomes[i] = outcome
        observed = [i for i, o in enumerate(outcomes) if isinstance(o, ScoreOutcome) and not group.shadow[i]]
        if observed:
            decided = [
                (group.request_ids[i], o.decision.positive)
                for i in observed
                if isinstance(o := outcomes[i], ScoreOutcome) and o.version
            ]
            self._observe(line, group.raw[observed], state.config, state.model.version, decided, later)
        return [o if o is not None else GuardmeshError("not scored") for o in outcomes]

    def _observe(
        self,
        line: ModelLineState,
        raw: np.ndarray,
        config: VersionConfig,
        version: str,
        decided: list[tuple[str, bool]],
        later: _Later | None = None,
    ) -> None:
        """Record rows as sent (NaN = missing) in the live window and monitors, and the model's decisions
        (on a shared store the decisions are in the store before the answer, so any replica takes their
        labels; UNAVAILABLE if they could not be written). With ``later``, the wait for the store and the
        window update may be left to a closure appended there (see :meth:`score_many_later`)."""
        stored = None
        with line.lock:
            if self.shared is not None and decided:
                # Queued under the line's lock, waited for outside it (concurrent groups share one commit);
                # the live window, monitors and drift take the rows only once the decisions are stored, so a
                # call refused UNAVAILABLE leaves no trace.
                stored = self.shared.record_decisions(line.name, [(r, version, p) for r, p in decided])
            if later is not None:
                # The next group may decide before these rows are in only where taking them in cannot change
                # what it decides with (the reference and its medians, the drift score); otherwise a barrier.
                if line.reference is None or (
                    line.rows_since_drift + line.rows_deferred + len(raw) >= self.settings.drift_every
                ):
                    later.barrier = True
                line.rows_deferred += len(raw)
        if later is not None:

            def take_in(skip: bool) -> None:
                self._take_in(line, raw, config, version, decided, stored, deferred=True, skip=skip)

            later.steps.append(take_in)
            return
        self._take_in(line, raw, config, version, decided, stored, deferred=False, skip=False)

    def _take_in(
        self,
        line: ModelLineState,
        raw: np.ndarray,
        config: VersionConfig,
        version: str,
        decided: list[tuple[str, bool]],
        stored: Any,
        *,
        deferred: bool,
        skip: bool,
    ) -> None:
        """Wait until the decisions are stored, then take the rows in (live window, monitors, drift); ``skip``:
        an earlier group failed, the rows stay out."""
        try:
            if stored is not None and not skip:
                try:
                    stored.wait("decisions")
                except StoreFailure as exc:
                    raise Unavailable(f"scorer store unavailable: {exc}") from None
        except BaseException:
            skip = True
            raise
        finally:
            if deferred and skip:
                with line.lock:
                    line.rows_deferred -= len(raw)
                    line.taken_in.notify_all()
        if skip:
            return
        missing = np.isnan(raw)
        with line.lock:
            if deferred:
                line.rows_deferred -= len(raw)
                line.taken_in.notify_all()
            else:  # the window takes groups in order: an earlier group's rows may still be on their way
                line.taken_in.wait_for(lambda: line.rows_deferred == 0)
            if self.shared is None:
                for request_id, positive in decided:
                    line.decisions.record(request_id, version, positive)
            line.live.add(raw)
            if line.missing is not None:
                for feature in line.missing.observe(missing):
                    rate = float(line.missing.rates()[line.index[feature]])
                    self._event(
                        line.name,
                        "missing_alert",
                        f"feature {feature} missing in {rate:.1%} of the live window "
                        f"(> {line.missing.alert_rate:.0%}; one alert until it falls below "
                        f"{line.missing.clear_rate:.1%}); policy {config.cleaning.value} (version {version})",
                    )
            if line.reference is None and len(line.live) >= config.reference_rows:
                self._set_reference(line, line.live.values().cpu().numpy().T.astype(np.float32), config)
            line.rows_since_drift += len(raw)
            if line.reference is not None and line.rows_since_drift >= self.settings.drift_every:
                line.rows_since_drift = 0
                line.drift_score = float(drift_mod.drift_stats(line.reference, line.live).score)

    def batch_stats(self, model: str, version: str) -> BatchStats:
        """What the version's batcher did: batches, rows, sizes and why each batch left."""
        return self._state(self._line(model), version).batcher.stats

    def live_rows(self, model: str) -> np.ndarray:
        """The live window's rows (rows x features, oldest first; NaN = missing): what drift is measured on."""
        line = self._line(model)
        with line.lock:
            return line.live.values().cpu().numpy().T.copy()

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
        x = torch.from_numpy(np.ascontiguousarray(row)).to(self.device)
        try:
            result = explain_fn(module, x, background.to(self.device))  # type: ignore[arg-type]
        except InvalidArgument as exc:
            raise InvalidArgument("explain", f"no attributions for this request ({exc.field}: {exc.rule})") from None
        attributions = [(f, float(a)) for f, a in zip(line.features, result.attributions.tolist(), strict=True)]
        return attributions, str(result.method)

    # -- feedback --------------------------------------------------------------------------------------

    def feedback(self, model: str, labels: list[tuple[str, bool]]) -> FeedbackResult:
        """Match labels to decisions; update rolling F1 per version; roll back a degraded active version."""
        line = self._line(model)
        if not labels:
            raise InvalidArgument("labels", "must not be empty")
        active = self.registry.active(model).version
        if self.shared is not None:
            accepted, unknown = self._labels_shared(model, line, labels, active)
        else:
            accepted = unknown = 0
            for request_id, label in labels:
                found = line.decisions.pop(request_id)
                state = line.versions.get(found[0]) if found is not None else None
                if found is None or state is None:
                    unknown += 1
                    continue
                state.health.observe(found[1], label)
                accepted += 1
        health = line.versions[active].health
        precision, recall, f1, _ = health.rolling.metrics()
        rolled_back = False
        degraded, drop = health.degraded(line.versions[active].config.max_f1_drop)
        if degraded:
            try:
                self.rollback(model, f"F1 {f1:.3f} is {drop:.1%} below its baseline {health.baseline_f1:.3f}")
                rolled_back = True
            except ActiveChanged:
                pass  # another replica changed it first (its rollback of the same degradation); now served here
            except FailedPrecondition:
                self._event(model, "degraded", f"F1 dropped {drop:.1%} but no earlier version exists")
        return FeedbackResult(
            accepted, unknown, self.registry.active(model).version, rolled_back, precision, recall, f1
        )

    def _labels_shared(
        self, model: str, line: ModelLineState, labels: list[tuple[str, bool]], active: str
    ) -> tuple[int, int]:
        """Labels on a shared store: matched to the decisions of every replica, each counted once; every
        touched version's (and the active one's) F1 then computed on every replica's labels. A rollback
        that follows is a compare-and-set: of replicas finding the same degradation at once, one rolls
        back and the others see it done. Returns (accepted, unknown)."""
        assert self.shared is not None
        matched = self.shared.match_labels(model, labels)
        for version in dict.fromkeys([v for v, _, _ in matched] + [active]):
            state = line.versions.get(version)
            if state is not None:
                self._health_from_store(model, version, state)
        accepted = sum(1 for v, _, _ in matched if v in line.versions)
        return accepted, len(labels) - accepted

    def _health_from_store(self, model: str, version: str, state: VersionState) -> None:
        """A version's rolling F1 (and learned baseline) from the labels every replica stored."""
        assert self.shared is not None
        health = state.health
        head, tail = self.shared.labelled(model, version, health.rolling.window, health.min_labels)
        health.rolling.outcomes = deque(tail)
        if state.config.baseline_f1 is None and len(head) >= health.min_labels:
            # The same definition as one process's: F1 of the first min_labels labelled decisions.
            health.baseline_f1 = RollingF1(health.min_labels, deque(head)).metrics()[2]

    # -- replicas --------------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Serve what the shared store holds: load versions other replicas registered (each passes its
        warm-up here too) and take the stored active versions and histories. Returns versions loaded."""
        shared = self.shared
        if shared is None:
            return 0
        with self._refresh_lock:
            counter = shared.changes()  # read first: a change made while this runs is seen by the next call
            loaded = 0
            known = {(m, v) for m, versions, _ in self.registry.list() for v in versions}
            for registration in shared.registrations(skip=known):
                try:
                    self._load(registration)
                    loaded += 1
                except AlreadyExists:
                    pass  # registered here meanwhile
                except GuardmeshError as err:
                    log.error(
                        "shared model version not loaded",
                        extra={"model": registration.model, "version": registration.version, "error": err.message},
                    )
            for model, (version, history) in shared.active().items():
                line = self.registry.lines.get(model)
                if line is not None and (line.active, line.history) == (version, history):
                    continue
                try:
                    self.registry.restore_active(model, version, history)
                except GuardmeshError as err:
                    log.error("shared active version not taken", extra={"model": model, "error": err.message})
            self._seen_changes = counter
            return loaded

    def prune_decisions(self) -> int:
        """Keep the newest ``decision_log`` decisions per model in the shared store (older ones can no longer
        take a label, as with one process's bounded log); how many were dropped."""
        if self.shared is None:
            return 0
        dropped = 0
        for name, line in list(self.lines.items()):
            dropped += self.shared.prune_decisions(name, self.settings.decision_log)
            for version, state in list(line.versions.items()):
                # Labels no F1 figure reads any more: past the first min_labels (the learned baseline's) and
                # before the last rolling window.
                self.shared.prune_labels(name, version, state.health.min_labels, state.health.rolling.window)
        return dropped

    def follow(self, poll_s: float = 0.25, on_store: Callable[[bool], None] | None = None) -> None:
        """Keep serving what the shared store holds: refresh when a NOTIFY (PostgreSQL) says the registry
        changed, and check the change counter every ``poll_s`` seconds (SQLite, and the safety net); publish
        the live windows every :data:`LIVE_PUBLISH_S` and prune the decision log every
        :data:`PRUNE_EVERY_S`. ``on_store(False)`` when the store stops answering, ``on_store(True)`` when
        it answers again (the service reports NOT_SERVING meanwhile: scoring needs the store)."""
        shared = self.shared
        if shared is None or self._follower is not None:
            return
        wake = threading.Event()
        listener = shared.listen(lambda _payload: wake.set())

        def run() -> None:
            published = pruned = time.monotonic()
            reachable = True
            while not self._stop_following.is_set():
                wake.wait(poll_s)
                wake.clear()
                try:
                    if shared.changes() != self._seen_changes:
                        self.refresh()
                    if time.monotonic() - published >= LIVE_PUBLISH_S:
                        published = time.monotonic()
                        for line in list(self.lines.values()):
                            self._publish_live(line)
                    if time.monotonic() - pruned >= PRUNE_EVERY_S:
                        pruned = time.monotonic()
                        self.prune_decisions()
                    answered = True
                except Exception as exc:  # the store may be away for a while: try again
                    answered = False
                    if reachable:
                        log.warning("scorer store not answering", extra={"error": str(exc)})
                if answered != reachable:
                    reachable = answered
                    if answered:
                        log.info("scorer store answering again")
                    if on_store is not None:
                        on_store(answered)
            listener.close()

        self._follower = threading.Thread(target=run, name="scorer-follow", daemon=True)
        self._follower.start()

    # -- reports ---------------------------------------------------------------------------------------

    def drift_report(
        self, model: str, *, merge_replicas: bool = False
    ) -> tuple[drift_mod.DriftReport, float, int, int, list[str]]:
        """(report, threshold in force, reference rows, live rows, replicas whose live windows it covers).

        Without ``merge_replicas`` the report describes this replica's live window. With it (on a shared
        store), the live window is the pooled rows of every replica's window, each as published within the
        last :data:`LIVE_FRESH_S` seconds (this replica's is published first, so it is current), compared
        with this replica's reference window: the same statistics, on the union of the replicas' samples.
        The threshold in force stays this replica's (it follows its own window's drift score).
        """
        line = self._line(model)
        pooled: drift_mod.LiveWindow | None = None
        replicas = [self.replica]
        if merge_replicas and self.shared is not None:
            self._publish_live(line)
            windows = self.shared.live_windows(model, time.time() - LIVE_FRESH_S)
            rows = [r for _, r in windows if r.shape[1] == len(line.features) and len(r)]
            replicas = sorted(name for name, r in windows if r.shape[1] == len(line.features) and len(r))
            if rows:
                stacked = np.concatenate(rows)
                pooled = drift_mod.LiveWindow(len(line.features), len(stacked), device=self.device)
                pooled.add(stacked)
        with line.lock:
            if line.reference is None:
                raise FailedPrecondition(f"model {model!r} has no reference window yet")
            live = pooled if pooled is not None else line.live
            if len(live) == 0:
                raise FailedPrecondition(f"model {model!r} has scored no rows yet")
            report = drift_mod.drift_stats(line.reference, live)
            if pooled is None:
                line.drift_score = float(report.score)
        active = self.registry.active(model)
        threshold = line.versions[active.version].config.policy.threshold(line.drift_score)
        return report, threshold, line.reference.rows, len(live), replicas

    def _publish_live(self, line: ModelLineState) -> None:
        """Put this replica's live window in the shared store (for merged drift reports), if it changed."""
        if self.shared is None:
            return
        with line.lock:
            seen = line.live.rows_seen
            if seen == 0 or self._published.get(line.name) == seen:
                return
            rows = line.live.rows().cpu().numpy().astype(np.float32)
        self.shared.publish_live(line.name, rows)
        self._published[line.name] = seen

    def attribution_drift(self, model: str, version: str = "") -> tuple[str, AttributionDriftReport]:
        """(version explained, each feature's attribution shift between the reference sample and the live
        window); ``version`` empty: the active one. FAILED_PRECONDITION before both windows hold rows."""
        line = self._line(model)
        mv = self.registry.active(model, version)
        with line.lock:
            if line.reference is None:
                raise FailedPrecondition(f"model {model!r} has no reference window yet")
            if len(line.live) == 0:
                raise FailedPrecondition(f"model {model!r} has scored no rows yet")
            reference, live = line.reference, line.live.rows()
            fill = torch.from_numpy(line.medians.astype(np.float64))
        module = mv.raw_module if mv.raw_module is not None else mv.module
        report = attribution_shift(
            module,  # type: ignore[arg-type]
            reference.sample.to(self.device),
            live.to(self.device),
            reference.mean,
            fill.to(self.device),
            line.features,
        )
        return mv.version, report

    def close(self) -> None:
        """Stop following the shared store and every batcher."""
        self._stop_following.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        for line in self.lines.values():
            for state in line.versions.values():
                state.batcher.close()
