"""The router core: experiments, assignment with the exposure log, metrics, audits, analysis, guardrails,
bandits and shadow traffic. No gRPC here: the server translates messages and errors.

State lives in memory (experiments, sticky records, each experiment's first exposures as numpy columns,
metric observations and their per-arm statistics) and every change is written to SQLite before it is
acknowledged. A change is validated completely before any state is touched, so a refused call leaves nothing
behind. Exposures and observations reach memory only after their commit is durable (while in flight, a sticky
arm is held as pending so a concurrent assignment of the same unit agrees), so a failed commit leaves memory
as it was. A store that is away (connection refused or lost, server shut down, pool timeout, a SQLite file
locked or failing I/O) makes the router answer UNAVAILABLE naming the store and report NOT_SERVING until a write
through the committer succeeds again; it then reloads its memory from the store and serves again by itself. Any
other failed write (a constraint, a bad statement) stops the router (fail-stop): it answers UNAVAILABLE until it
is restarted from what is durable.

With ``abrouter.exposures_in_memory = false`` (bounded mode) memory does not grow with the units: no per-unit
columns or observation logs; exposed units per arm and the per-arm moments of each metric are counters, the
first exposure and running metric totals of the units seen most recently sit in bounded caches and the store
answers for the others (the store is the truth; a unit with a write in flight is pinned in its cache). A restart
reads those counters as SQL aggregates, not the rows; audits, analysis and the continuous audit read the exposure
table (``tables``). A unit is counted in the arm of the first of its exposures this router takes in (the
store's first at a restart: the same unless two replicas expose a new unit in different arms at once).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import psycopg

from guardmesh.config import ABRouterSettings, ConfigError
from guardmesh.durable import Fence, Fenced, Listener, Statement, StoreFailure, Ticket
from guardmesh.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    GuardmeshError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from guardmesh.leadership import Lease
from guardmesh.stats import Moments
from native import abhash
from services.abrouter import analysis as analysis_mod
from services.abrouter import audit as audit_mod
from services.abrouter import correction
from services.abrouter.assignment import AssignmentResult, assign, assign_batch, hash_value_of
from services.abrouter.bandit import ArmRewards, BanditPolicy
from services.abrouter.columns import ExposureColumns, ExposureCounts, ExposureTable, GrowableArray, LruCache
from services.abrouter.experiments import AllocationMode, Experiment, ExperimentSpec, ExperimentState
from services.abrouter.guardrails import GuardrailVerdict, evaluate_guardrails
from services.abrouter.metrics import ArmStatistics, CachedArmStatistics, MetricKind
from services.abrouter.shadow import ScoreCall, ScoreFn, ScoreResult, ShadowMirror
from services.abrouter.store import CONFIG_CHANNEL, ExposureRow, ObservationRow, RouterStore, Tail, Taken

log = logging.getLogger(__name__)

NAME_LIMIT = 64
VALUE_LIMIT = 256
MAX_OBSERVATIONS = 100_000
SHADOW_PREFIX = "__shadow__"
#: Seconds between probes of a store that is away (a write through the committer, then a reload).
STORE_PROBE_S = 1.0
#: Bounded mode on a shared store: the newest rows whose numbers a restore reads for its tail (a row still
#: committing below the restore point lies among them: far more than commit in one gap timeout).
RESTORE_TAIL_ROWS = 100_000
#: SQLite primary result codes of a store that cannot be written now but may be later: BUSY, LOCKED (another
#: process holds the lock past the busy timeout), READONLY, IOERR, FULL, CANTOPEN.
_SQLITE_AWAY = frozenset({5, 6, 8, 10, 13, 14})
#: PostgreSQL SQLSTATEs of a server that is away: connection exceptions (class 08), insufficient resources (53:
#: disk full, out of memory, too many connections), shutdown and startup (57P01..57P03).
_PG_AWAY_CLASSES = ("08", "53")
_PG_AWAY_STATES = frozenset({"57P01", "57P02", "57P03"})


class _StoreAway(StoreFailure):
    """A write refused unsent because the store is known to be away (the router is resuming)."""


def store_away(exc: BaseException) -> bool:
    """Whether ``exc`` (a failed write or read, or what caused it) says the store is away (unreachable, shut
    down, out of connections, locked, I/O failing) rather than that the statements themselves were refused
    (a constraint, a bad value): the first passes once the store is back, the second would fail again."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _StoreAway | psycopg.InterfaceError):
            return True
        if isinstance(seen, psycopg.OperationalError):  # PoolTimeout and a connection that failed included
            state = seen.sqlstate
            return state is None or state.startswith(_PG_AWAY_CLASSES) or state in _PG_AWAY_STATES
        if isinstance(seen, psycopg.Error):
            return False
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            return isinstance(seen, sqlite3.OperationalError) and code is not None and code & 0xFF in _SQLITE_AWAY
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class RouterEvent:
    """Something operators should know: a config change, an alert, a rollback, a bandit update."""

    seq: int
    kind: str
    experiment_key: str
    at: float
    message: str


@dataclass(frozen=True)
class Observation:
    """One metric observation as the caller sends it."""

    unit_id: str
    metric: str
    value: float
    arm: str = ""
    timestamp: float = 0.0
    pre_period: bool = False


@dataclass(frozen=True)
class AnalysisOptions:
    """Options of :meth:`Router.analyze` (defaults as documented in the proto)."""

    metrics: tuple[str, ...] = ()
    n_resamples: int = 2000
    confidence: float = 0.95
    winsor_quantile: float = 0.99
    position_covariate: str = ""
    reweight_covariates: tuple[str, ...] = ()
    inverse_propensity: bool = False
    aggregate: str = ""  # empty: each metric's declared kind
    seed: int = 0


@dataclass
class _MetricLog:
    """Observations of one metric of one experiment: exposure row, value, time; pre-period sums by unit; the
    per-arm statistics of the per-unit values (the metric's declared kind) that the guardrails read."""

    statistics: ArmStatistics
    rows: GrowableArray = field(default_factory=lambda: GrowableArray(np.int64))
    values: GrowableArray = field(default_factory=lambda: GrowableArray(np.float64))
    at: GrowableArray = field(default_factory=lambda: GrowableArray(np.float64))
    pre: dict[str, float] = field(default_factory=dict)


class StickyCache(LruCache[int]):
    """Sticky arms of the units seen most recently, at most ``capacity`` (least recently used evicted).

    The store keeps every sticky arm; once this cache has evicted one (:attr:`evicted`), a unit it does
    not hold is looked up in the store, so an evicted unit keeps its arm."""


@dataclass
class _Live:
    """Everything the router holds for one experiment."""

    experiment: Experiment
    #: Sticky arms recorded (durable) of the units seen most recently; the rest are in the store.
    sticky: StickyCache
    table: ExposureTable = field(default_factory=ExposureTable)
    #: Sticky arms of assignments whose commit is in flight: unit -> (arm, number of requests waiting on it).
    pending_sticky: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Exposures whose commit is in flight (arms cannot be added or removed meanwhile).
    pending_exposures: int = 0
    metrics: dict[str, _MetricLog] = field(default_factory=dict)
    bandit: BanditPolicy | None = None
    #: Config version from which the weights in force apply (SRM compares units exposed since then).
    weights_since: int = 1
    #: The weighting (its ``weights_since`` version) the last SRM alert was raised for (0: none). SRM compares
    #: the units exposed under the weights in force; a mismatch there is a fault in how units reach the log
    #: and does not heal by itself: it is raised once per weighting, not again each time a borderline p-value
    #: re-crosses the threshold as the log grows. New weights (a new population to judge) re-arm it. Memory
    #: only caches it: before raising, the store is asked whether any replica or life raised it already.
    srm_alerted_weighting: int = 0
    #: Last continuous-audit balance alert state, so that alert is raised once while it lasts.
    balance_alerting: bool = False
    #: Bounded mode (``abrouter.exposures_in_memory = false``): exposed units as counters (``table`` stays empty).
    counts: ExposureCounts | None = None
    #: Bounded mode: units whose first exposure an Assign is looking up in the store outside the lock -> number of
    #: such calls (see :meth:`Router._look_up_new_units`).
    looking: dict[str, int] = field(default_factory=dict)
    #: Bounded mode: (arm, time) of the units of :attr:`looking` counted meanwhile (the cache may have evicted them
    #: since, and the look-up's answer may predate their count).
    counted_while_looking: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: Bounded mode: (unit, metric) whose running totals a RecordMetrics is reading from the store outside the lock
    #: -> number of such calls (see :meth:`Router._read_observed_units`).
    reading: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Bounded mode: the pairs of :attr:`reading` observed meanwhile (a read that may predate the observation).
    observed_while_reading: set[tuple[str, str]] = field(default_factory=set)

    def exposed_units(self) -> int:
        """Units exposed (each counted once)."""
        return len(self.counts) if self.counts is not None else len(self.table)

    def arm_counts(self, n_arms: int) -> list[int]:
        """Exposed units per arm."""
        return self.counts.arm_counts(n_arms) if self.counts is not None else self.table.arm_counts(n_arms)


@dataclass(frozen=True)
class _UnitsRead:
    """(Bounded mode.) What a RecordMetrics read from the store before taking the router's lock, for its units that
    memory's caches lack: valid under the lock only for the same experiment (``live``) while memory holds the same
    rows (``exposures``, ``observations``: the :class:`Taken` objects the reads were made over)."""

    live: _Live
    exposures: Taken
    observations: Taken
    #: unit -> (arm, time) of its first exposure (units without one are absent)
    firsts: dict[str, tuple[int, float]]
    #: (unit, metric) -> (sum, number) of its observations
    totals: dict[tuple[str, str], tuple[float, int]]


def _check_name(value: str, field_name: str, limit: int = NAME_LIMIT) -> None:
    if not 1 <= len(value) <= limit:
        raise InvalidArgument(field_name, f"must be 1 to {limit} characters")


def check_covariates(numeric: Mapping[str, float], categorical: Mapping[str, str], prefix: str = "covariates") -> None:
    """InvalidArgument for a malformed covariate (name length, non-finite number, overlong label)."""
    for name, value in numeric.items():
        _check_name(name, f"{prefix}.numeric key")
        if not math.isfinite(value):
            raise InvalidArgument(f"{prefix}.numeric[{name}]", "must be finite")
    for name, label in categorical.items():
        _check_name(name, f"{prefix}.categorical key")
        if name in numeric:
            raise InvalidArgument(f"{prefix}.categorical[{name}]", "also given as a numeric covariate")
        if len(label) > VALUE_LIMIT:
            raise InvalidArgument(f"{prefix}.categorical[{name}]", f"at most {VALUE_LIMIT} characters")


class Router:
    """The abrouter's state and operations (thread-safe)."""

    def __init__(
        self,
        settings: ABRouterSettings,
        store: RouterStore | None = None,
        *,
        scoring: ScoreFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.lock = threading.RLock()
        self.live: dict[str, _Live] = {}
        self.events: deque[RouterEvent] = deque(maxlen=settings.event_retention)
        self._event_seq = 0
        self._failed = ""
        #: Called once a write failed (the router then refuses every call until restarted).
        self.on_fail_stop: Callable[[str], None] | None = None
        #: Why the store is away ("" while it answers): every call is UNAVAILABLE until it is back.
        self._away = ""
        self._away_lock = threading.Lock()
        #: Called with False when the store goes away and True once the router serves again (health).
        self.on_store: Callable[[bool], None] | None = None
        #: How many times the router resumed, and in which of its lives each write in flight was submitted:
        #: a write that failed before the last resume was settled by its reload (no reason to stop again).
        self._resumes = 0
        self._submitted_in: weakref.WeakKeyDictionary[Ticket, int] = weakref.WeakKeyDictionary()
        self.scoring = scoring
        self.mirror: ShadowMirror | None = None
        if scoring is not None:
            self.mirror = ShadowMirror(
                scoring,
                queue_size=settings.shadow_queue,
                workers=settings.shadow_workers,
                on_result=self._record_shadow,
            )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Replicas on one store: a config change heard (or the resync interval passed) wakes the watcher.
        self._config_changed = threading.Event()
        self._config_thread: threading.Thread | None = None
        self._listener: Listener | None = None
        #: The lease that elects the one replica running guardrails, bandit updates and audits (shared store).
        self.monitor_lease: Lease | None = None
        #: This life's name on the exposures and observations it writes (the others' are taken in).
        self.origin = uuid.uuid4().hex[:16]
        #: Shared store: how far the exposures and observations of other replicas were taken in.
        self._tails: dict[str, Tail] = {}
        self._tail_lock = threading.Lock()
        self._tail_thread: threading.Thread | None = None
        self.last_audits: dict[str, audit_mod.AuditReport] = {}
        #: Bounded mode: no per-unit columns; audits and analysis read the exposure table.
        self.bounded = not settings.exposures_in_memory
        if self.bounded and store is None:
            raise ConfigError("abrouter.exposures_in_memory = false needs the durable store")
        #: Bounded mode: the exposure and observation tables' URLs once exported up to now (the observation table
        #: exported too when asked); set by the server, which runs the export.
        self.tables: Callable[[bool], tuple[str, str]] | None = None
        #: Bounded mode: the exposures and observations in memory's counters (see :class:`Taken`).
        self._taken_rows: dict[str, Taken] = {"exposures": Taken(), "observations": Taken()}

    # -- lifecycle ---------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild memory from the store: experiments, sticky records, exposures, observations, events."""
        self._load(shadow=True)

    def _reload(self) -> None:
        """(Under the tail lock and the lock.) Memory again from the store alone, as at a restart (the shadow
        counters, never acknowledged writes, are kept): what a write that failed left is gone."""
        self.live = {}
        self.events.clear()
        self.last_audits = {}
        self._tails = {}
        self._load(shadow=False)

    def _load(self, *, shadow: bool) -> None:
        if self.store is None:
            return
        with self.lock:
            for exp in self.store.load_experiments():
                self.live[exp.key] = self._new_live(exp)
            if self.bounded:  # sticky arms are looked up in the store as units come back, not read at once
                for key, live in self.live.items():
                    live.sticky.evicted = self.store.has_sticky(key)
            else:
                for key, unit, arm in self.store.load_sticky():
                    if key in self.live:
                        self.live[key].sticky[unit] = arm
            # A replica on a shared store takes in what the others write from here on (see take_in_others).
            upto = {t: self.store.max_seq(t) for t in ("exposures", "observations")}
            if self.bounded:
                self._load_aggregates(upto)
            else:
                self._load_rows(upto)
            if self.mirror is not None and shadow:
                for key, ls, ss, ld, sd in self.store.load_shadow():
                    st = self.live.get(key)
                    version = st.experiment.spec.shadow.version if st else ""
                    self.mirror.restore(key, version, ScoreResult(ls, ld, ""), ScoreResult(ss, sd, version))
            for seq, kind, key, at, message in self.store.load_events(self.settings.event_retention):
                self.events.append(RouterEvent(seq, kind, key, at, message))
            self._event_seq = self.store.max_event_seq()
            for st in self.live.values():
                st.weights_since = self._weights_since(st.experiment.key)
        log.info("restored", extra={"experiments": len(self.live)})

    def _load_aggregates(self, upto: dict[str, int]) -> None:
        """(Under the lock, at a restore; bounded mode.) Exposed units per arm, per-arm moments of every metric and
        the bandits' rewards as SQL aggregates of the rows up to ``upto``: no row passes through Python. A replica
        on a shared store reads the numbers of the newest rows only, for its tail (a row still committing there
        is taken in later, as another replica's)."""
        assert self.store is not None
        taken = {t: Taken(n) for t, n in upto.items()}
        if self.store.shared:
            for t, n in upto.items():
                after = max(0, n - RESTORE_TAIL_ROWS)
                self._tails[t] = Tail.after_restore(
                    self.store.numbers_between(t, after, n), n, self.clock(), after=after
                )
                taken[t] = self._tails[t].taken()
        exposed = self.store.exposed_per_arm(taken["exposures"])
        for key, st in self.live.items():
            st.counts = ExposureCounts(self.settings.unit_cache_units, exposed.get(key))
        for key, metric, arm, units, total, total_sq, mean, mean_sq in self.store.observed_moments(
            taken["exposures"], taken["observations"]
        ):
            seen = self.live.get(key)
            if seen is None or arm >= len(seen.experiment.spec.arms):
                continue
            st = seen
            event = st.experiment.spec.kind_of(metric) is MetricKind.EVENT
            moments = Moments(units, total, total_sq) if event else Moments(units, mean, mean_sq)
            self._metric_log(st, metric).statistics.observed[arm] = moments
        self._taken_rows = {t: self._taken_now(t) for t in upto}
        for st in self.live.values():
            self._replay_rewards(st)

    def _taken_now(self, table: str) -> Taken:
        """(Under the lock.) The rows of ``table`` memory holds now: on a shared store those the tail took in and
        this life's own; alone, every committed row (a write in flight is held as pending or pinned)."""
        tail = self._tails.get(table)
        return tail.taken(self.origin) if tail is not None else Taken()

    def _load_rows(self, upto: dict[str, int]) -> None:
        """(Under the lock, at a restore.) Every exposure and observation up to ``upto`` replayed into memory."""
        assert self.store is not None
        loaded: dict[str, list[tuple[int, float]]] = {"exposures": [], "observations": []}
        for n, row in self.store.load_numbered_exposures(upto["exposures"]):
            loaded["exposures"].append((n, row.at))
            st = self.live.get(row.key)
            if st is not None:
                self._add_exposure(st, row)
        for n, obs in self.store.load_numbered_observations(upto["observations"]):
            loaded["observations"].append((n, obs.at))
            st = self.live.get(obs.key)
            if st is not None:
                self._apply_observation(st, obs)
        if self.store.shared:  # rows still committing below the restore point are taken in later
            self._tails = {t: Tail.after_restore(loaded[t], n, self.clock()) for t, n in upto.items()}

    def _weights_since(self, key: str) -> int:
        if self.store is None:
            return 1
        since, last = 1, None
        for version, _at, _change, _comment, exp in self.store.load_revisions(key):
            if exp.weights != last:
                since, last = version, exp.weights
        return since

    def start(self, replica: str = "") -> None:
        """Start the periodic guardrail, bandit and audit checks, and the watch for config changes made by
        other replicas. On a shared store, ``replica`` (host:port, unique among live replicas) names this
        one in the lease that elects who runs the checks, so each decision is taken once."""
        if self.store is not None:
            if self.store.shared:
                self._listener = self.store.log.listen(CONFIG_CHANNEL, lambda _key: self._config_changed.set())
                ttl = max(3 * self.settings.guardrail_interval_s, 2.0)
                self.monitor_lease = Lease(self.store.log, "abrouter-monitor", replica or "abrouter", replica, ttl)
            self._config_thread = threading.Thread(target=self._watch_config, name="abrouter-config", daemon=True)
            self._config_thread.start()
        if self._tails:
            self._tail_thread = threading.Thread(target=self._tail_loop, name="abrouter-tail", daemon=True)
            self._tail_thread.start()
        self._thread = threading.Thread(target=self._loop, name="abrouter-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background work (the store is closed by its owner)."""
        self._stop.set()
        self._config_changed.set()
        if self._listener is not None:
            self._listener.close()
        for thread in (self._thread, self._config_thread, self._tail_thread):
            if thread is not None:
                thread.join(timeout=10)
        if self.monitor_lease is not None and self.monitor_lease.valid():
            try:
                self.monitor_lease.release()
            except StoreFailure:
                log.warning("could not release the monitor lease; it lapses on its own")
        if self.mirror is not None:
            self.mirror.close()

    def _new_live(self, exp: Experiment) -> _Live:
        st = _Live(exp, StickyCache(self.settings.sticky_cache_units))
        if self.bounded:
            st.counts = ExposureCounts(self.settings.unit_cache_units)
        st.bandit = self._bandit_policy(exp)
        return st

    @staticmethod
    def _bandit_policy(exp: Experiment, rewards: Sequence[ArmRewards] = ()) -> BanditPolicy | None:
        """A bandit experiment's policy (None for another), with ``rewards`` per arm so far."""
        spec = exp.spec
        if spec.mode is not AllocationMode.BANDIT or spec.bandit is None:
            return None
        return BanditPolicy.restore(
            len(spec.arms),
            spec.bandit.kind,
            rewards=rewards or [ArmRewards(0, 0.0, 0.0)] * len(spec.arms),
            last_update=None,
            update_interval_s=spec.bandit.update_interval_s,
            min_weight=spec.bandit.min_weight,
            min_rewards=spec.bandit.min_rewards,
            seed=abhash.fnv1a32(spec.key),
        )

    # -- durability ----------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._failed:
            raise Unavailable(f"abrouter store failed ({self._failed}); restart the abrouter")
        if self._away:
            raise self._away_error()

    def _away_error(self) -> Unavailable:
        return Unavailable(f"{self._away}; the abrouter serves again by itself once the store answers")

    def _submit(self, statements: list[Statement], fence: Fence | None = None) -> Ticket | None:
        if self.store is None or not statements:
            return None
        if self._away:  # (under the lock) nothing new reaches the store until the router reloaded from it
            refused = Ticket()
            refused.done(_StoreAway(self._away))
            self._submitted_in[refused] = self._resumes
            return refused
        ticket = self.store.submit(statements, fence)
        self._submitted_in[ticket] = self._resumes
        return ticket

    @property
    def store_away_reason(self) -> str:
        """Why the store is away ("" while it answers)."""
        return self._away

    def _store_went_away(self, exc: BaseException, ticket: Ticket | None = None) -> Unavailable:
        """Refuse every call (UNAVAILABLE naming the store) and report NOT_SERVING until the store is back;
        the error for the caller. ``ticket``: the failed write, if one (one submitted before the last resume
        changes nothing: the reload settled it)."""
        assert self.store is not None
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        reason = str(root).strip().splitlines()[0] if str(root).strip() else ""  # the first line says what failed
        away = f"abrouter store away ({self.store.log.where}): {type(root).__name__}: {reason}"
        # Under the lock: a call that found the store answering has submitted its write before the probe
        # of :meth:`_resume` is queued, so the probe's success means that write's fate is settled too.
        with self.lock, self._away_lock:
            settled = ticket is not None and self._submitted_in.get(ticket, self._resumes) != self._resumes
            if not self._away and not settled:  # else the first failure's reason stands
                self._away = away
                log.error("store away; refusing calls until it answers", extra={"error": self._away})
                if self.on_store is not None:
                    self.on_store(False)
            return Unavailable(f"{self._away or away}; the abrouter serves again by itself once the store answers")

    def _resume(self) -> bool:
        """(While the store is away.) Whether the store answers again: a write through the committer (every
        batch queued before it has then finished) and a reload of memory from the store; SERVING again."""
        assert self.store is not None
        try:
            self.store.submit([("SELECT 1", ())]).wait("abrouter store probe")
            with self._tail_lock, self.lock:
                self._reload()
                with self._away_lock:
                    self._away = ""
                    self._resumes += 1
                    if self.on_store is not None:
                        self.on_store(True)
        except Exception as exc:
            if not store_away(exc):
                log.exception("resuming from the store failed")
            return False
        log.info("store answers again: memory reloaded from it, serving")
        return True

    def _monitor_fence(self) -> Fence | None:
        """The monitor lease's epoch as a fence: a periodic decision lands only while this replica still
        holds the lease it was taken under (a deposed holder woken from a pause writes nothing)."""
        if self.monitor_lease is None:
            return None
        return (self.monitor_lease.name, self.monitor_lease.epoch)

    def _durable_monitor(
        self, ticket: Ticket | None, undo: Callable[[], None], decided: Experiment | None = None
    ) -> bool:
        """Wait for a periodic decision's write; whether it landed. Refused by the fence (the lease moved
        on): ``undo`` puts memory back under the lock, the lease is given up locally and the replica keeps
        serving (the new holder decides). ``decided``: the revision written, which a concurrent edit may
        have beaten (then also put back). Any other store failure is the usual fail-stop."""
        try:
            if ticket is not None:
                ticket.wait("abrouter periodic decision")
        except Fenced as exc:
            with self.lock:
                undo()
            if self.monitor_lease is not None:
                self.monitor_lease.forget()
            log.warning("periodic decision refused: monitor lease lost", extra={"error": str(exc)})
            return False
        except StoreFailure as exc:
            if store_away(exc):  # memory back; the decision is taken again once the store is back
                with self.lock:
                    undo()
                self._store_went_away(exc, ticket)
                return False
            self._durable(ticket)  # records the failure and raises Unavailable
            raise
        if decided is None:
            return True
        try:
            self._check_landed(decided, undo)
        except (Aborted, Unavailable) as exc:  # memory put back; the next look decides again
            log.warning("periodic decision not confirmed", extra={"error": str(exc)})
            return False
        return True

    def _undo_monitor(self, st: _Live, events: list[RouterEvent]) -> Callable[[], None]:
        """(Under the lock.) What puts ``st``'s experiment, bandit and alert flags and the events about to be
        raised back as they are now (a write that did not land)."""
        experiment, weights_since, bandit = st.experiment, st.weights_since, st.bandit
        srm, balance = st.srm_alerted_weighting, st.balance_alerting

        def undo() -> None:
            kinds_moved = any(st.experiment.spec.kind_of(m) != experiment.spec.kind_of(m) for m in st.metrics)
            st.experiment, st.weights_since, st.bandit = experiment, weights_since, bandit
            st.srm_alerted_weighting, st.balance_alerting = srm, balance
            if kinds_moved:
                self._rebuild_statistics(st)
            for event in events:
                if event in self.events:
                    self.events.remove(event)

        return undo

    def _check_landed(self, exp: Experiment, undo: Callable[[], None]) -> None:
        """After a committed config write on a shared store: whether this replica's revision is the stored
        one. Another replica may have written the same version first; then memory is put back, the winner's
        state taken in, and the caller told ABORTED (nothing of the losing write landed)."""
        if self.store is None or not self.store.shared:
            return
        try:
            landed = self.store.revision_is(exp)
        except Exception as exc:  # outcome unknown: memory back; the resync takes in whatever was stored
            with self.lock:
                undo()
            if store_away(exc):
                self._store_went_away(exc)
            raise Unavailable(
                f"abrouter store unreachable confirming experiment '{exp.key}' version {exp.version}: {exc}"
            ) from exc
        if landed:
            return
        with self.lock:
            undo()
            with self.store_reads("the experiment's stored version"):
                self._sync_key(exp.key)
        raise Aborted(
            f"experiment '{exp.key}': version {exp.version} was written first by another replica (concurrent "
            f"edit); this change was not applied: re-read the experiment and retry"
        )

    def _durable(self, ticket: Ticket | None, undo: Callable[[], None] | None = None) -> None:
        """Wait for a call's write. The store away: ``undo`` puts memory back (under the lock) and the
        router refuses calls until it is back (UNAVAILABLE). Any other failure: fail-stop."""
        if ticket is None:
            return
        try:
            ticket.wait("abrouter state")
        except StoreFailure as exc:
            if store_away(exc):
                if undo is not None:
                    with self.lock:
                        undo()
                raise self._store_went_away(exc, ticket) from exc
            self._failed = str(exc)
            log.critical("store failure; refusing further calls until restart", extra={"error": str(exc)})
            if self.on_fail_stop is not None:
                self.on_fail_stop(self._failed)
            raise Unavailable(f"abrouter store failed ({exc}); restart the abrouter") from exc

    def _event(
        self, kind: str, key: str, message: str, statements: list[Statement], about: Experiment | None = None
    ) -> RouterEvent:
        """Raise an event; ``about``: the revision it reports, written only if that revision is stored."""
        self._event_seq += 1
        event = RouterEvent(self._event_seq, kind, key, self.clock(), message)
        self.events.append(event)
        guard = None if about is None else RouterStore.revision_guard(about)
        statements.append(RouterStore.event(event.seq, kind, key, event.at, message, guard))
        log.info("router event", extra={"kind": kind, "experiment": key, "event_message": message})
        return event

    def _write_experiment(
        self, st: _Live, exp: Experiment, change: str, comment: str, statements: list[Statement]
    ) -> None:
        rows = self._experiment_rows(exp, change, comment)  # serialized first: a failure here changes nothing
        if exp.weights != st.experiment.weights:
            st.weights_since = exp.version
        st.experiment = exp
        statements.extend(rows)

    def _experiment_rows(self, exp: Experiment, change: str, comment: str) -> list[Statement]:
        rows = RouterStore.experiment(exp, change, comment)
        if self.store is not None:
            rows.append(self.store.config_notice(exp.key))
        return rows

    # -- replicas on one store ---------------------------------------------------------------------------------

    def _watch_config(self) -> None:
        """Apply experiments changed by other replicas: at once when notified (PostgreSQL), and at every
        resync interval as the safety net (the only way on SQLite, where it polls the versions)."""
        assert self.store is not None
        notified = self.store.log.dialect == "postgresql"  # SQLite hears only its own process: poll
        interval = self.settings.config_resync_s if notified else min(0.5, self.settings.config_resync_s)
        while not self._stop.is_set():
            self._config_changed.wait(STORE_PROBE_S if self._away else interval)
            self._config_changed.clear()
            if self._stop.is_set() or self._failed:
                return
            if self._away:
                self._resume()
                continue
            try:
                self.sync_config()
            except Exception as exc:  # memory stays as it was, the next round retries
                log.warning("config resync failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                if store_away(exc):  # nothing written meanwhile would be acknowledged: say so now
                    self._store_went_away(exc)

    def sync_config(self) -> list[str]:
        """Take in every experiment whose stored version is newer than this replica's; the keys taken in."""
        if self.store is None:
            return []
        stored = self.store.versions()
        with self.lock:
            stale = [k for k, v in stored.items() if k not in self.live or self.live[k].experiment.version < v]
        taken = []
        for key in stale:
            with self.lock:
                if self._sync_key(key):
                    taken.append(key)
        if taken:
            log.info("config taken from the store", extra={"experiments": taken})
        return taken

    def _sync_key(self, key: str) -> bool:
        """(Under the lock.) Take in the stored state of ``key`` if it is newer than memory's; whether it was."""
        if self.store is None:
            return False
        exp = self.store.load_experiment(key)
        if exp is None:
            return False
        st = self.live.get(key)
        if st is None:
            st = self.live[key] = self._new_live(exp)
            st.weights_since = self._weights_since(key)
            return True
        cur = st.experiment
        if exp.version <= cur.version:
            return False
        if exp.weights != cur.weights:
            st.weights_since = exp.version
        st.experiment = exp
        if (exp.spec.mode, exp.spec.bandit, len(exp.spec.arms)) != (cur.spec.mode, cur.spec.bandit, len(cur.spec.arms)):
            st.bandit = self._new_live(exp).bandit
            self._replay_rewards(st)
        if any(exp.spec.kind_of(m) != cur.spec.kind_of(m) for m in st.metrics):
            self._rebuild_statistics(st)
        return True

    def _tail_loop(self) -> None:
        while not self._stop.wait(self.settings.tail_interval_s):
            if self._failed:
                return
            if self._away:  # the reload takes in what the others wrote meanwhile
                continue
            try:
                self.take_in_others()
            except Exception as exc:
                if store_away(exc):
                    self._store_went_away(exc)
                elif isinstance(exc, StoreFailure):
                    log.warning("taking in other replicas' rows failed", extra={"error": str(exc)})
                else:
                    log.exception("taking in other replicas' rows failed")

    def take_in_others(self) -> int:
        """Take into memory the exposures and observations other replicas committed since the last call (so
        audits, analysis, guardrails and bandits see every replica's); the number taken in."""
        if not self._tails or self.store is None:
            return 0
        with self._tail_lock:
            # Observations first: each one's exposure committed before it, so it is in the exposures read next.
            # This replica's own rows come back as numbers only (it holds them): the tail must count them
            observations = self.store.others_observations_after(self._tails["observations"].low, self.origin)
            exposures = self.store.others_exposures_after(self._tails["exposures"].low, self.origin)
            now = time.monotonic()
            fresh_exp = set(self._tails["exposures"].take([n for n, _ in exposures], now))
            fresh_obs = set(self._tails["observations"].take([n for n, _ in observations], now))
            taken = 0
            with self.lock:
                for n, row in exposures:
                    st = self.live.get(row.key) if row is not None else None
                    if n in fresh_exp and row is not None and st is not None:
                        if st.counts is None:
                            self._add_exposure(st, row)
                        else:
                            self._take_in_exposure(st, n, row)
                        taken += 1
                self._taken_rows["exposures"] = self._taken_now("exposures")
                for n, obs in observations:
                    st = self.live.get(obs.key) if obs is not None else None
                    if n in fresh_obs and obs is not None and st is not None:
                        if st.counts is None:
                            self._apply_observation(st, obs)
                        elif not obs.pre and (arm := self._exposed_arm(st, obs.unit)) is not None:
                            self._observe_counted(st, obs, arm, self._taken_before(n, "observations"))
                        taken += 1
                self._taken_rows["observations"] = self._taken_now("observations")
            return taken

    def _taken_before(self, n: int, table: str) -> Taken:
        """(Under the lock, taking in row ``n`` of ``table`` from the tail, in number order.) The rows memory holds
        before row ``n``: every row numbered below it (those of this round taken in already), those taken in
        before above it, and this life's own."""
        above = frozenset(m for m in self._taken_rows[table].seen if m > n)
        return Taken(n - 1, above, self.origin)

    def _take_in_exposure(self, st: _Live, n: int, row: ExposureRow) -> None:
        """(Under the lock; bounded mode.) Another replica's exposure numbered ``n``: counted if it is its unit's
        first among the rows memory holds (a unit held pending is counted by this router's own call)."""
        assert st.counts is not None
        if row.unit in st.counts.pending or self._first_exposure(st, row.unit, self._taken_before(n, "exposures")):
            return
        self._count(st, row)

    def _before_config_write(self, key: str) -> None:
        """(Under the lock.) On a shared store, judge a change against the newest stored version (another
        replica may have changed the experiment since this one heard of it)."""
        if self.store is not None and self.store.shared:
            with self.store_reads("the experiment's stored version"):
                self._sync_key(key)

    @contextmanager
    def store_reads(self, what: str) -> Iterator[None]:
        """A read from the shared store that a call depends on: a store that cannot answer is UNAVAILABLE
        (the call changed nothing), never an unknown error."""
        try:
            yield
        except GuardmeshError:
            raise
        except Exception as exc:
            if store_away(exc):
                raise self._store_went_away(exc) from exc
            raise Unavailable(f"abrouter store unreachable reading {what}: {type(exc).__name__}: {exc}") from exc

    # -- experiments -------------------------------------------------------------------------------------------

    def _get(self, key: str) -> _Live:
        # Every call naming an experiment comes here: after a failed write, memory may hold a change that was
        # never saved, so nothing is read from it (fail-stop).
        self._check_alive()
        st = self.live.get(key)
        if st is None:
            raise NotFound(f"experiment '{key}' does not exist")
        return st

    def create(self, spec: ExperimentSpec) -> Experiment:
        """Create an experiment at version 1."""
        self._check_alive()
        spec.validate()
        now = self.clock()
        with self.lock:
            self._before_config_write(spec.key)
            if spec.key in self.live:
                raise AlreadyExists(f"experiment '{spec.key}' already exists")
            exp = Experiment(spec, 1, ExperimentState.RUNNING, spec.weights, now, now)
            statements = self._experiment_rows(exp, "created", "")  # before memory: a failure leaves none
            st = self._new_live(exp)
            self.live[spec.key] = st
            message = f"created with weights {list(spec.weights)}"
            event = self._event("config_changed", spec.key, message, statements, about=exp)
            ticket = self._submit(statements)

        def undo() -> None:
            if self.live.get(spec.key) is st:
                del self.live[spec.key]
            if event in self.events:
                self.events.remove(event)

        self._durable(ticket, undo)
        self._check_landed(exp, undo)
        return exp

    def update(self, spec: ExperimentSpec, expected_version: int = 0, comment: str = "") -> Experiment:
        """Replace the spec; version + 1. A rolled-back experiment runs again with the new spec."""
        self._check_alive()
        spec.validate()
        with self.lock:
            self._before_config_write(spec.key)
            st = self._get(spec.key)
            cur = st.experiment
            if cur.state is ExperimentState.STOPPED:
                raise FailedPrecondition(f"experiment '{spec.key}' is stopped; create a new one")
            if expected_version and expected_version != cur.version:
                raise FailedPrecondition(
                    f"expected_version: experiment '{spec.key}' is at version {cur.version}, not {expected_version}"
                )
            assigned = st.exposed_units() or len(st.sticky) or st.sticky.evicted or st.pending_exposures
            if len(spec.arms) != len(cur.spec.arms) and assigned:
                raise FailedPrecondition(
                    f"spec.arms: experiment '{spec.key}' has exposures; arms can be reweighted, not added or removed"
                )
            now = self.clock()
            weights = spec.weights
            if spec.mode is AllocationMode.BANDIT and cur.spec.mode is AllocationMode.BANDIT:
                weights = cur.weights if len(cur.weights) == len(spec.arms) else spec.weights
            exp = cur.with_changes(spec=spec, state=ExperimentState.RUNNING, weights=weights, updated_at=now, reason="")
            statements: list[Statement] = []
            events: list[RouterEvent] = []
            undo = self._undo_monitor(st, events)
            self._write_experiment(st, exp, "updated", comment, statements)
            if (spec.mode, spec.bandit, len(spec.arms)) != (cur.spec.mode, cur.spec.bandit, len(cur.spec.arms)):
                st.bandit = self._new_live(exp).bandit
                self._replay_rewards(st)
            if any(spec.kind_of(m) != cur.spec.kind_of(m) for m in st.metrics):
                self._rebuild_statistics(st)
            message = f"updated to version {exp.version}: {comment}"
            events.append(self._event("config_changed", spec.key, message, statements, about=exp))
            ticket = self._submit(statements)
        self._durable(ticket, undo)
        self._check_landed(exp, undo)
        return exp

    def stop(self, key: str, reason: str = "") -> Experiment:
        """Stop: control for everyone, not in the experiment."""
        self._check_alive()
        with self.lock:
            self._before_config_write(key)
            st = self._get(key)
            if st.experiment.state is ExperimentState.STOPPED:
                raise FailedPrecondition(f"experiment '{key}' is already stopped")
            exp = st.experiment.with_changes(state=ExperimentState.STOPPED, updated_at=self.clock(), reason=reason)
            statements: list[Statement] = []
            events: list[RouterEvent] = []
            undo = self._undo_monitor(st, events)
            self._write_experiment(st, exp, "stopped", reason, statements)
            events.append(self._event("config_changed", key, f"stopped: {reason}", statements, about=exp))
            ticket = self._submit(statements)
        self._durable(ticket, undo)
        self._check_landed(exp, undo)
        return exp

    def get(self, key: str) -> tuple[Experiment, int]:
        """An experiment and its number of exposed units."""
        with self.lock:
            st = self._get(key)
            return st.experiment, st.exposed_units()

    def list_experiments(self) -> list[tuple[Experiment, int]]:
        """Every experiment (by key) and its number of exposed units."""
        self._check_alive()
        with self.lock:
            return [(self.live[k].experiment, self.live[k].exposed_units()) for k in sorted(self.live)]

    def history(self, key: str) -> list[tuple[int, float, str, str, Experiment]]:
        """Every recorded version of an experiment."""
        with self.lock:
            self._get(key)
        if self.store is None:
            raise FailedPrecondition("history needs the durable store")
        with self.store_reads("the experiment's revisions"):
            return self.store.load_revisions(key)

    # -- assignment ----------------------------------------------------------------------------------------------

    def assign(
        self,
        unit_id: str,
        attributes: Mapping[str, Any],
        keys: Sequence[str] = (),
        *,
        log_exposure: bool = False,
        numeric: Mapping[str, float] | None = None,
        categorical: Mapping[str, str] | None = None,
        timestamp: float = 0.0,
        expect_version: int = 0,
    ) -> list[tuple[AssignmentResult, bool]]:
        """Assign one unit; with ``log_exposure`` every in-experiment assignment is logged durably first.

        ``expect_version`` (Route's commit): ABORTED, with nothing written, unless the single experiment
        named is still at that config version.
        """
        self._check_alive()
        numeric = numeric or {}
        categorical = categorical or {}
        self._check_unit(unit_id, numeric, categorical, timestamp)
        now = timestamp or self.clock()
        # Bounded mode: the store answers for new units before the lock is taken, so other calls do not wait on it
        looks, found = self._look_up_new_units(unit_id, attributes, keys, expect_version) if log_exposure else ([], {})
        try:
            return self._assign_looked_up(
                unit_id, attributes, keys, log_exposure, numeric, categorical, now, expect_version, found
            )
        finally:
            if looks:
                with self.lock:
                    self._stop_looking(looks)

    def _targets(self, keys: Sequence[str], expect_version: int) -> list[_Live]:
        """(Under the lock.) The experiments an Assign names (validated), or every running one."""
        if not keys:
            return [self.live[k] for k in sorted(self.live) if self.live[k].experiment.state is ExperimentState.RUNNING]
        seen = set()
        for i, key in enumerate(keys):
            if key in seen:
                raise InvalidArgument(f"experiment_keys[{i}]", f"'{key}' is listed twice")
            seen.add(key)
        targets = [self._get(k) for k in keys]
        if expect_version and targets[0].experiment.version != expect_version:
            raise Aborted(
                f"experiment '{keys[0]}' changed (version {targets[0].experiment.version}, "
                f"not {expect_version}) while the request was scored; retry"
            )
        return targets

    def _look_up_new_units(
        self, unit_id: str, attributes: Mapping[str, Any], keys: Sequence[str], expect_version: int
    ) -> tuple[list[tuple[_Live, str]], dict[tuple[str, str], tuple[_Live, tuple[int, float] | None]]]:
        """(Bounded mode, before a logged Assign takes the lock.) The first exposure, among the rows memory holds,
        of each of the call's units that memory knows neither as counted (cache) nor as pending: read from the store
        without the lock, so the other calls do not wait on the read. Each unit looked up is marked in
        :attr:`_Live.looking` until the call ends (:meth:`_stop_looking`), so that a count of it meanwhile (this
        router's call that held it pending, or the tail) is kept in :attr:`_Live.counted_while_looking`: a "none"
        answer is stale exactly then, as the counters change only by such counts (a reload makes new ``_Live``).
        Returns the units marked and the answers by (experiment, unit) with the ``_Live`` they were read for."""
        if not self.bounded or self.store is None:
            return [], {}
        looks: list[tuple[_Live, str]] = []
        with self.lock:
            targets = [st for st in self._targets(keys, expect_version) if st.counts is not None]
            units = [hash_value_of(st.experiment, unit_id, attributes) for st in targets]  # may refuse: none marked
            for st, unit in zip(targets, units, strict=True):
                assert st.counts is not None
                if unit in st.counts.pending or unit in st.counts.first:
                    continue
                st.looking[unit] = st.looking.get(unit, 0) + 1
                looks.append((st, unit))
            taken = self._taken_rows["exposures"]
        if not looks:
            return [], {}
        pairs = [(st.experiment.key, unit) for st, unit in looks]
        named = ", ".join(f"'{unit}'" for _, unit in pairs)
        what = f"the first exposure of unit {named}" if len(pairs) == 1 else f"the first exposures of units {named}"
        try:  # the call's experiments in one query
            with self.store_reads(what):
                firsts = self.store.first_exposures(pairs, taken)
        except BaseException:
            with self.lock:
                self._stop_looking(looks)
            raise
        return looks, {pair: (st, firsts.get(pair)) for pair, (st, _) in zip(pairs, looks, strict=True)}

    @staticmethod
    def _stop_looking(looks: list[tuple[_Live, str]]) -> None:
        """(Under the lock.) Unmark the units :meth:`_look_up_new_units` marked."""
        for st, unit in looks:
            if st.looking[unit] > 1:
                st.looking[unit] -= 1
            else:
                del st.looking[unit]
                st.counted_while_looking.pop(unit, None)

    def _assign_looked_up(
        self,
        unit_id: str,
        attributes: Mapping[str, Any],
        keys: Sequence[str],
        log_exposure: bool,
        numeric: Mapping[str, float],
        categorical: Mapping[str, str],
        now: float,
        expect_version: int,
        found: Mapping[tuple[str, str], tuple[_Live, tuple[int, float] | None]],
    ) -> list[tuple[AssignmentResult, bool]]:
        """:meth:`assign` once the store has answered for its new units (``found``)."""
        with self.lock:
            targets = self._targets(keys, expect_version)
            values = [hash_value_of(st.experiment, unit_id, attributes) for st in targets]
            out: list[tuple[AssignmentResult, bool]] = []
            statements: list[Statement] = []
            exposures: list[tuple[_Live, ExposureRow]] = []
            held: list[tuple[_Live, str]] = []  # pending sticky arms this call holds until its commit ends
            new_units: list[tuple[_Live, ExposureRow, bool]] = []  # bounded: units this call may count (first?)
            for st, value in zip(targets, values, strict=True):
                exp = st.experiment
                sticky = exp.spec.sticky_bucketing
                result = assign(exp, value, attributes, now, self._sticky_arm(st, value))
                if result.in_experiment and sticky and value not in st.sticky:
                    arm, waiting = st.pending_sticky.get(value, (result.arm_index, 0))
                    st.pending_sticky[value] = (arm, waiting + 1)
                    held.append((st, value))
                    statements.append(RouterStore.sticky(exp.key, [(value, result.arm_index, now)]))
                logged = bool(log_exposure and result.in_experiment)
                if logged:
                    row = ExposureRow(
                        exp.key,
                        value,
                        result.arm_index,
                        result.bucket,
                        result.propensity,
                        now,
                        exp.version,
                        numeric,
                        categorical,
                    )
                    exposures.append((st, row))
                    if st.counts is not None:
                        try:
                            self._hold_new_unit(st, row, new_units, found)
                        except BaseException:  # the store read failed: nothing this call held stays held
                            self._release_pending(held, keep=False)
                            self._release_new_units(new_units, keep=False)
                            raise
                out.append((result, logged))
            if exposures:
                statements.append(RouterStore.exposures([row for _, row in exposures], self.origin))
            for st, _ in exposures:
                st.pending_exposures += 1
            ticket = self._submit(statements)
        try:
            self._durable(ticket)
        except BaseException:
            with self.lock:
                self._release_pending(held, keep=False)
                self._release_new_units(new_units, keep=False)
                for st, _ in exposures:
                    st.pending_exposures -= 1
            raise
        with self.lock:  # durable: now memory may show it
            self._release_pending(held, keep=True)
            self._release_new_units(new_units, keep=True)
            for st, row in exposures:
                st.pending_exposures -= 1
                if st.counts is None:
                    self._add_exposure(st, row)
        return out

    @staticmethod
    def _add_exposure(st: _Live, row: ExposureRow) -> None:
        """Show a committed exposure in memory (its experiment's columns)."""
        st.table.add(
            row.unit, row.arm, row.bucket, row.at, row.propensity, row.numeric, row.categorical, row.config_version
        )

    def _first_exposure(self, st: _Live, unit: str, taken: Taken | None = None) -> tuple[int, float] | None:
        """(Under the lock; bounded mode.) (arm, time) of the unit's first exposure among the rows memory holds
        (``taken``: those of :meth:`_taken_now`): the cache, else the store (then cached: the unit is counted,
        unless this router holds it pending: its own call counts it once its exposure commits)."""
        assert st.counts is not None and self.store is not None
        first = st.counts.first.get(unit)
        if first is None:
            with self.store_reads(f"the first exposure of unit '{unit}'"):
                first = self.store.first_exposure(st.experiment.key, unit, taken or self._taken_rows["exposures"])
            if first is not None and unit not in st.counts.pending:
                st.counts.first[unit] = first
        return first

    def _hold_new_unit(
        self,
        st: _Live,
        row: ExposureRow,
        new_units: list[tuple[_Live, ExposureRow, bool]],
        found: Mapping[tuple[str, str], tuple[_Live, tuple[int, float] | None]],
    ) -> None:
        """(Under the lock; bounded mode.) Before an exposure's commit: if its unit has none yet, hold the unit as
        pending, so that it is counted once, by the first such call, after its commit (a concurrent exposure of it
        here or from the tail meanwhile counts nothing). ``found``: the store's answers read before the lock
        (:meth:`_look_up_new_units`), re-checked here against the pending units, the cache and the units counted
        since the read; a unit without one (the experiment reloaded meanwhile) is looked up now."""
        assert st.counts is not None
        pending = st.counts.pending
        looked_up = found.get((st.experiment.key, row.unit))
        if row.unit in pending:
            pending[row.unit] += 1
            new_units.append((st, row, False))
            return
        if looked_up is not None and looked_up[0] is st:
            first = st.counts.first.get(row.unit) or st.counted_while_looking.get(row.unit) or looked_up[1]
            if first is not None and row.unit not in st.counts.first:
                st.counts.first[row.unit] = first  # a unit counted (among the rows held): cached, as a read caches it
        else:
            first = self._first_exposure(st, row.unit)
        if first is None:
            pending[row.unit] = 1
            new_units.append((st, row, True))

    @staticmethod
    def _count(st: _Live, row: ExposureRow) -> None:
        """(Under the lock; bounded mode.) Count the unit of ``row``, its first exposure taken in; noted for the
        Assign calls looking the unit up meanwhile (their read may predate this count)."""
        assert st.counts is not None
        st.counts.count(row.unit, row.arm, row.at)
        if row.unit in st.looking:
            st.counted_while_looking[row.unit] = (row.arm, row.at)

    @staticmethod
    def _release_new_units(new_units: list[tuple[_Live, ExposureRow, bool]], *, keep: bool) -> None:
        """(Under the lock; bounded mode.) Let go of the units held by :meth:`_hold_new_unit`; ``keep``: the
        exposures are durable, count each unit this call held first."""
        for st, row, first in new_units:
            assert st.counts is not None
            if keep and first and row.unit not in st.counts.first:
                Router._count(st, row)
            waiting = st.counts.pending[row.unit]
            if waiting > 1:
                st.counts.pending[row.unit] = waiting - 1
            else:
                del st.counts.pending[row.unit]

    def _sticky_arm(self, st: _Live, value: str) -> int | None:
        """The unit's sticky arm: durable, or held by an assignment whose commit is in flight; None if none.
        On a shared store a unit this replica has not seen is looked up there (another replica may have
        recorded its arm), so every replica gives a unit the same arm; so is one the bounded cache evicted."""
        if not st.experiment.spec.sticky_bucketing:
            return None
        arm = st.sticky.get(value)
        if arm is None and value in st.pending_sticky:
            arm = st.pending_sticky[value][0]
        if arm is None and self.store is not None and (self.store.shared or st.sticky.evicted):
            with self.store_reads(f"the sticky arm of unit '{value}'"):
                arm = self.store.sticky_arm(st.experiment.key, value)
            if arm is not None:
                st.sticky[value] = arm
        return arm

    @staticmethod
    def _release_pending(held: list[tuple[_Live, str]], *, keep: bool) -> None:
        """Let go of this call's pending sticky arms; ``keep``: its commit is durable, record them as sticky."""
        for st, value in held:
            arm, waiting = st.pending_sticky[value]
            if keep:
                st.sticky.setdefault(value, arm)
            if waiting > 1:
                st.pending_sticky[value] = (arm, waiting - 1)
            else:
                del st.pending_sticky[value]

    @staticmethod
    def _check_unit(
        unit_id: str, numeric: Mapping[str, float], categorical: Mapping[str, str], timestamp: float
    ) -> None:
        """The request fields of an assignment that no experiment needs to judge."""
        check_covariates(numeric, categorical)
        if not (math.isfinite(timestamp) and timestamp >= 0):
            raise InvalidArgument("timestamp", "must be unix seconds >= 0 (0: now)")
        if len(unit_id) > VALUE_LIMIT:
            raise InvalidArgument("unit_id", f"at most {VALUE_LIMIT} characters")

    def assign_batch(self, key: str, unit_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, Experiment]:
        """Arms and buckets of many units (offline; nothing logged)."""
        self._check_alive()
        with self.lock:
            st = self._get(key)
            exp = st.experiment
            if exp.spec.condition:
                raise FailedPrecondition(
                    f"experiment '{key}' has a targeting condition, which needs each unit's attributes: use Assign"
                )
            sticky = st.sticky.as_dict() if exp.spec.sticky_bucketing else None
            if sticky is not None and self.store is not None and (self.store.shared or st.sticky.evicted):
                with self.store_reads("the experiment's sticky arms"):
                    sticky = {**self.store.sticky_arms(key), **sticky}
        arms, buckets = assign_batch(exp, unit_ids, self.clock(), sticky)
        return arms, buckets, exp

    def route(
        self,
        key: str,
        unit_id: str,
        attributes: Mapping[str, Any],
        request_id: str,
        features: Mapping[str, float],
        *,
        log_exposure: bool = False,
        numeric: Mapping[str, float] | None = None,
        categorical: Mapping[str, str] | None = None,
    ) -> tuple[AssignmentResult, bool, ScoreResult, bool]:
        """Assign, score with the arm's model version, and maybe mirror to the shadow version.

        The arm is worked out first without writing anything, the scorer is called, and only a scored
        request is committed (exposure, sticky record): a request the scorer refuses leaves no trace here.
        """
        if self.scoring is None:
            raise FailedPrecondition("the abrouter has no scorer client")
        self._check_alive()
        numeric = numeric or {}
        categorical = categorical or {}
        with self.lock:
            st = self._get(key)
            exp = st.experiment
            if not exp.spec.model:
                raise FailedPrecondition(f"experiment '{key}' names no scorer model (spec.model)")
            if not 1 <= len(request_id) <= VALUE_LIMIT:
                raise InvalidArgument("request_id", f"must be 1 to {VALUE_LIMIT} characters")
            self._check_unit(unit_id, numeric, categorical, 0.0)
            value = hash_value_of(exp, unit_id, attributes)
            now = self.clock()
            planned = assign(exp, value, attributes, now, self._sticky_arm(st, value))
        spec = exp.spec
        arm_index = planned.arm_index if planned.in_experiment else 0
        version = spec.arms[arm_index].model_version
        call = ScoreCall(spec.model, version, request_id, dict(features), key, planned.arm)
        live = self.scoring(call)
        [(result, logged)] = self.assign(
            unit_id,
            attributes,
            [key],
            log_exposure=log_exposure,
            numeric=numeric,
            categorical=categorical,
            timestamp=now,
            expect_version=exp.version,
        )
        shadowed = False
        shadow = spec.shadow
        if shadow.version and shadow.fraction > 0 and self.mirror is not None:
            share = abhash.hash_value(SHADOW_PREFIX + key, request_id, 2)
            if share < shadow.fraction:
                shadowed = self.mirror.offer(key, replace(call, version=shadow.version, shadow=True), live)
        return result, logged, live, shadowed

    def _record_shadow(self, key: str, call: ScoreCall, live: ScoreResult, shadow: ScoreResult) -> None:
        if self.store is None:
            return
        statement = RouterStore.shadow(
            key,
            call.request_id,
            (live.model_version, live.score, live.decision),
            (shadow.model_version, shadow.score, shadow.decision),
            self.clock(),
        )
        self.store.submit([statement])  # a comparison, not an acknowledgement: no need to wait

    def shadow_report(self, key: str) -> Any:
        """Shadow comparison counters of an experiment."""
        with self.lock:
            exp = self._get(key).experiment
        if self.mirror is None:
            raise FailedPrecondition("the abrouter has no scorer client")
        stats = self.mirror.snapshot(key)
        if not stats.shadow_version:
            stats.shadow_version = exp.spec.shadow.version
        return stats

    # -- metrics -------------------------------------------------------------------------------------------------

    def _statistics(self, st: _Live, metric: str) -> ArmStatistics:
        spec = st.experiment.spec
        if self.bounded:
            units: LruCache[tuple[float, int]] = LruCache(self.settings.unit_cache_units)
            return CachedArmStatistics(spec.kind_of(metric), len(spec.arms), units=units)
        return ArmStatistics(spec.kind_of(metric), len(spec.arms))

    def _metric_log(self, st: _Live, metric: str) -> _MetricLog:
        mlog = st.metrics.get(metric)
        if mlog is None:
            mlog = st.metrics[metric] = _MetricLog(self._statistics(st, metric))
        return mlog

    def _apply_observation(self, st: _Live, obs: ObservationRow) -> None:
        mlog = self._metric_log(st, obs.metric)
        if obs.pre:
            mlog.pre[obs.unit] = mlog.pre.get(obs.unit, 0.0) + obs.value
            return
        row = int(st.table.unit_rows([obs.unit])[0])
        if row < 0:  # the unit's exposure left the hot store (retention): the observation stays in the store
            return
        mlog.rows.append(row)
        mlog.values.append(obs.value)
        mlog.at.append(obs.at)
        arm = st.table.arm_of(obs.unit)
        if arm is None:
            return
        mlog.statistics.observe(row, arm, obs.value)
        self._reward(st, obs, arm)

    @staticmethod
    def _reward(st: _Live, obs: ObservationRow, arm: int) -> None:
        spec = st.experiment.spec
        if st.bandit is not None and spec.bandit is not None and obs.metric == spec.bandit.reward_metric:
            st.bandit.record(arm, obs.value)

    def _observe_counted(self, st: _Live, obs: ObservationRow, arm: int, taken: Taken | None = None) -> None:
        """(Under the lock; bounded mode.) A committed observation (not pre-period) of a unit in ``arm`` into the
        per-arm moments; a unit its metric's cache does not hold gets its totals from the store first (over the
        rows ``taken``: memory's, before this one)."""
        assert self.store is not None
        if (obs.unit, obs.metric) in st.reading:  # a RecordMetrics' read before the lock may predate this
            st.observed_while_reading.add((obs.unit, obs.metric))
        statistics = self._metric_log(st, obs.metric).statistics
        assert isinstance(statistics, CachedArmStatistics)
        if statistics.units.get(obs.unit) is None:
            with self.store_reads(f"the observations of unit '{obs.unit}'"):
                held = self.store.unit_observations(
                    st.experiment.key, obs.unit, obs.metric, taken or self._taken_rows["observations"]
                )
            statistics.hold(obs.unit, *held)
        statistics.observe(obs.unit, arm, obs.value)
        self._reward(st, obs, arm)

    def _rebuild_statistics(self, st: _Live) -> None:
        """Per-arm statistics of every metric again from its observations (a metric's declared kind changed)."""
        if self.bounded:  # from the store's aggregates; the units' running totals do not depend on the kind
            assert self.store is not None
            key, spec = st.experiment.key, st.experiment.spec
            with self.store_reads("the experiment's per-arm moments"):
                moments = self.store.observed_moments(self._taken_rows["exposures"], self._taken_rows["observations"])
            for metric, mlog in st.metrics.items():
                assert isinstance(mlog.statistics, CachedArmStatistics)
                mlog.statistics = CachedArmStatistics(spec.kind_of(metric), len(spec.arms), units=mlog.statistics.units)
            for k, metric, arm, units, total, total_sq, mean, mean_sq in moments:
                if k == key and metric in st.metrics and arm < len(spec.arms):
                    event = spec.kind_of(metric) is MetricKind.EVENT
                    observed = Moments(units, total, total_sq) if event else Moments(units, mean, mean_sq)
                    st.metrics[metric].statistics.observed[arm] = observed
            return
        arms = st.table.columns().arms
        for metric, mlog in st.metrics.items():
            mlog.statistics = self._statistics(st, metric)
            for row, value in zip(mlog.rows.view(), mlog.values.view(), strict=True):
                if row >= 0:
                    mlog.statistics.observe(int(row), int(arms[row]), float(value))

    def _replay_rewards(self, st: _Live) -> None:
        spec = st.experiment.spec
        if st.bandit is None or spec.bandit is None:
            return
        if self.bounded:  # the rewards per arm as the store sums them
            assert self.store is not None
            with self.store_reads("the bandit's rewards"):
                totals = self.store.reward_totals(
                    spec.key, spec.bandit.reward_metric, self._taken_rows["exposures"], self._taken_rows["observations"]
                )
            rewards = [ArmRewards(*totals.get(arm, (0, 0.0, 0.0))) for arm in range(len(spec.arms))]
            st.bandit = self._bandit_policy(st.experiment, rewards)
            return
        mlog = st.metrics.get(spec.bandit.reward_metric)
        if mlog is None:
            return
        arms = st.table.columns().arms
        for row, value in zip(mlog.rows.view(), mlog.values.view(), strict=True):
            st.bandit.record(int(arms[row]), float(value))

    def record_metrics(self, key: str, observations: Sequence[Observation]) -> int:
        """Store observations (all or nothing); durable before returning."""
        self._check_alive()
        if not 1 <= len(observations) <= MAX_OBSERVATIONS:
            raise InvalidArgument("observations", f"must hold 1 to {MAX_OBSERVATIONS} observations")
        seen = self.live.get(key) if self._tails else None  # shared store: another replica may have exposed
        if seen is not None and any(not (o.pre_period or self._holds_exposure(seen, o.unit_id)) for o in observations):
            with self.store_reads("other replicas' exposures"):
                self.take_in_others()  # ... a unit not taken in here yet
        read = self._read_observed_units(key, observations)
        now = self.clock()
        with self.lock:
            try:
                st = self._get(key)
                spec = st.experiment.spec
                rows: list[ObservationRow] = []
                unit_arms: list[int] = []  # the arm of each row's unit (-1: pre-period)
                for i, o in enumerate(observations):
                    where = f"observations[{i}]"
                    arm_index = self._check_observation(key, spec, where, o)
                    logged = None
                    if not o.pre_period:
                        logged = self._exposed_arm(st, o.unit_id, read)
                        if logged is None:
                            raise FailedPrecondition(f"{where}.unit_id: unit '{o.unit_id}' has no logged exposure")
                        if arm_index is not None and arm_index != logged:
                            raise FailedPrecondition(
                                f"{where}.arm: unit '{o.unit_id}' was exposed to '{spec.arms[logged].name}', "
                                f"not '{o.arm}'"
                            )
                    rows.append(ObservationRow(key, o.unit_id, o.metric, o.value, o.timestamp or now, o.pre_period))
                    unit_arms.append(-1 if logged is None else logged)
                if self.bounded:
                    self._pin_units(st, rows, read)
                ticket = self._submit([RouterStore.observations(rows, self.origin)])
            finally:
                if read is not None:
                    self._stop_reading(read.live, read.totals)
        try:
            self._durable(ticket)
        except BaseException:
            if self.bounded:
                with self.lock:
                    self._unpin_units(st, rows)
            raise
        with self.lock:  # durable: now memory may show it (exposures are never removed, so the checks still hold)
            if not self.bounded:
                for row in rows:
                    self._apply_observation(st, row)
                return len(rows)
            for row, arm in zip(rows, unit_arms, strict=True):
                if not row.pre:  # pre-period values serve the analysis, which reads the table in this mode
                    self._observe_counted(st, row, arm)
            self._unpin_units(st, rows)
        return len(rows)

    @staticmethod
    def _check_observation(key: str, spec: ExperimentSpec, where: str, o: Observation) -> int | None:
        """The fields of one observation checked (INVALID_ARGUMENT naming the field and the rule); the index of
        the arm it names (None: none named)."""
        if o.metric not in spec.metrics:
            raise InvalidArgument(f"{where}.metric", f"'{o.metric}' is not a metric of experiment '{key}'")
        if not 1 <= len(o.unit_id) <= VALUE_LIMIT:
            raise InvalidArgument(f"{where}.unit_id", f"must be 1 to {VALUE_LIMIT} characters")
        if not math.isfinite(o.value):
            raise InvalidArgument(f"{where}.value", "must be finite")
        if not (math.isfinite(o.timestamp) and o.timestamp >= 0):
            raise InvalidArgument(f"{where}.timestamp", "must be unix seconds >= 0 (0: now)")
        arm_index = spec.arm_index(o.arm) if o.arm else None
        if o.arm and arm_index is None:
            arms = ", ".join(a.name for a in spec.arms)
            raise InvalidArgument(f"{where}.arm", f"experiment '{key}' has no arm '{o.arm}' (arms: {arms})")
        reward = spec.bandit is not None and not o.pre_period and o.metric == spec.bandit.reward_metric
        if reward and spec.bandit is not None and spec.bandit.kind.value == "bernoulli" and o.value not in (0.0, 1.0):
            raise InvalidArgument(f"{where}.value", "a Bernoulli bandit's reward must be 0 or 1")
        return arm_index

    def _read_observed_units(self, key: str, observations: Sequence[Observation]) -> _UnitsRead | None:
        """(Bounded mode, before RecordMetrics takes the lock.) The first exposures and the running totals that
        memory's caches lack for the call's units, read from the store in two queries without the lock, so that
        Assign and the other calls do not wait on the reads (at warehouse scale most observed units were evicted
        long ago). Each (unit, metric) read is marked in :attr:`_Live.reading` until the call's lock section ends
        (:meth:`_stop_reading`), so that an observation of it taken in meanwhile marks the read stale; the lock
        section then reads that pair again, as it does whenever memory took in other rows since (a new
        :class:`Taken`). A first exposure found stays the first (rows are only added after it), so only a unit
        found without one is read again. None: nothing to read (or a call that will be refused anyway)."""
        if not self.bounded or self.store is None:
            return None
        with self.lock:
            st = self.live.get(key)
            if st is None or st.counts is None:
                return None  # the lock section says why (NOT_FOUND)
            spec = st.experiment.spec
            units: dict[str, None] = {}
            pairs: dict[tuple[str, str], None] = {}
            try:
                for i, o in enumerate(observations):
                    self._check_observation(key, spec, f"observations[{i}]", o)
            except GuardmeshError:
                return None  # refused under the lock, naming the field, before any read
            for o in observations:
                if o.pre_period:
                    continue
                if o.unit_id not in st.counts.first:
                    units[o.unit_id] = None
                mlog = st.metrics.get(o.metric)
                statistics = mlog.statistics if mlog is not None else None
                if not (isinstance(statistics, CachedArmStatistics) and statistics.units.get(o.unit_id) is not None):
                    pairs[(o.unit_id, o.metric)] = None
            if not units and not pairs:
                return None
            for pair in pairs:
                st.reading[pair] = st.reading.get(pair, 0) + 1
            exposures, observed = self._taken_rows["exposures"], self._taken_rows["observations"]
        try:
            with self.store_reads(f"the exposures and observations of {len(units) or len(pairs)} units"):
                firsts = self.store.units_first_exposures(key, list(units), exposures)
                totals = self.store.units_observations(key, list(pairs), observed)
        except BaseException:
            with self.lock:
                self._stop_reading(st, pairs)
            raise
        return _UnitsRead(st, exposures, observed, firsts, totals)

    @staticmethod
    def _stop_reading(st: _Live, pairs: Iterable[tuple[str, str]]) -> None:
        """(Under the lock.) Unmark the pairs :meth:`_read_observed_units` marked."""
        for pair in pairs:
            if st.reading[pair] > 1:
                st.reading[pair] -= 1
            else:
                del st.reading[pair]
                st.observed_while_reading.discard(pair)

    def _holds_exposure(self, st: _Live, unit: str) -> bool:
        """Whether memory knows the unit's exposure without asking the store."""
        return unit in st.counts.first if st.counts is not None else st.table.arm_of(unit) is not None

    def _exposed_arm(self, st: _Live, unit: str, read: _UnitsRead | None = None) -> int | None:
        """(Under the lock.) The arm of the unit's first exposure taken in (None if none); bounded mode: what
        ``read`` found (before the lock) when it still holds, else the cache, else the store."""
        if st.counts is None:
            return st.table.arm_of(unit)
        first = st.counts.first.get(unit)
        if first is None and read is not None and read.live is st and read.exposures is self._taken_rows["exposures"]:
            first = read.firsts.get(unit)
            if first is not None and unit not in st.counts.pending:
                st.counts.first[unit] = first  # as a read under the lock caches it
        if first is None:
            first = self._first_exposure(st, unit)
        return None if first is None else first[0]

    def _pin_units(self, st: _Live, rows: list[ObservationRow], read: _UnitsRead | None = None) -> None:
        """(Under the lock; bounded mode, before the observations' commit.) Hold each unit's running totals of
        each metric observed (what ``read`` found before the lock while it still holds, else from the store, if
        the cache has none) and pin them until the observations are taken in: what the store sums then is what
        memory holds (the commit is not in either yet)."""
        assert self.store is not None
        fresh = (
            read.totals
            if read is not None and read.live is st and read.observations is self._taken_rows["observations"]
            else {}
        )
        for i, row in enumerate(rows):
            if row.pre:
                continue
            statistics = self._metric_log(st, row.metric).statistics
            assert isinstance(statistics, CachedArmStatistics)
            statistics.units.pin(row.unit)  # first: holding it must not evict it at once
            if statistics.units.get(row.unit) is None:
                pair = (row.unit, row.metric)
                if pair in fresh and pair not in st.observed_while_reading:
                    statistics.hold(row.unit, *fresh[pair])
                    continue
                try:
                    with self.store_reads(f"the observations of unit '{row.unit}'"):
                        held = self.store.unit_observations(
                            st.experiment.key, row.unit, row.metric, self._taken_rows["observations"]
                        )
                except BaseException:
                    self._unpin_units(st, rows[: i + 1])
                    raise
                statistics.hold(row.unit, *held)

    @staticmethod
    def _unpin_units(st: _Live, rows: list[ObservationRow]) -> None:
        """Undo :meth:`_pin_units` (the caches back within their capacity)."""
        for row in rows:
            if not row.pre:
                statistics = st.metrics[row.metric].statistics
                assert isinstance(statistics, CachedArmStatistics)
                statistics.units.unpin(row.unit)
        for metric in {row.metric for row in rows if not row.pre}:
            statistics = st.metrics[metric].statistics
            assert isinstance(statistics, CachedArmStatistics)
            statistics.units.shrink()

    # -- audits ----------------------------------------------------------------------------------------------------

    def _other_arms(self, st: _Live, columns: ExposureColumns, others: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        keys = others or [k for k in sorted(self.live) if k != st.experiment.key and len(self.live[k].table)]
        for k in keys:
            other = self._get(k)
            if other is st:
                continue
            rows = other.table.unit_rows(columns.unit_ids)
            other_arms = other.table.columns().arms
            out[k] = np.where(rows >= 0, other_arms[np.maximum(rows, 0)] if len(other_arms) else -1, -1)
        return out

    def audit(
        self,
        key: str,
        others: Sequence[str] = (),
        min_sample: int = 0,
        min_deviation: float = 0.0,
        window_covariates: Sequence[str] = (),
    ) -> audit_mod.AuditReport:
        """Full audit of the experiment's exposure log; per-value windows of ``window_covariates`` (empty: every
        categorical covariate logged). Bounded mode: of the exposure table (:meth:`audit_from_table`)."""
        if self.bounded:
            with self.lock:
                self._get(key)  # NOT_FOUND before any export
            with self._reading_tables():
                url, _ = self._current_tables(False)
                return self.audit_from_table(url, key, others, min_sample, min_deviation, window_covariates)
        min_sample = min_sample or self.settings.audit_min_sample
        min_deviation = min_deviation or self.settings.audit_min_deviation
        if min_sample < 0 or not 0 <= min_deviation < 1:
            raise InvalidArgument("min_sample/min_deviation", "min_sample >= 0 and min_deviation in [0, 1)")
        with self.lock:
            st = self._get(key)
            for i, k in enumerate(others):
                if k not in self.live:
                    raise NotFound(f"other_experiments[{i}]: experiment '{k}' does not exist")
            columns = st.table.columns()
            for i, name in enumerate(window_covariates):
                if name not in columns.categorical:
                    raise InvalidArgument(
                        f"window_covariates[{i}]", f"'{name}' was never logged as a categorical covariate"
                    )
            versions = st.table.config_versions()
            other_arms = self._other_arms(st, columns, others)
            weights = st.experiment.propensities()  # normalised: GrowthBook allows sums of 0.99..1.01
            ranges = st.experiment.ranges()
            version = st.experiment.spec.hash_version
            since = st.weights_since
        report = audit_mod.full_audit(
            columns,
            weights,
            other_arms=other_arms,
            min_sample=min_sample,
            min_deviation=min_deviation,
            ranges=ranges,
            resolution=1000 if version == 1 else 10_000,
            by_categorical=tuple(window_covariates) or None,
        )
        # weights changed: SRM compares only units exposed under today's weights
        report = audit_mod.with_srm_since(
            report, columns.arms, versions, since, weights, min_sample=min_sample, min_deviation=min_deviation
        )
        return report

    def audit_from_table(
        self,
        table_url: str,
        key: str,
        others: Sequence[str] = (),
        min_sample: int = 0,
        min_deviation: float = 0.0,
        window_covariates: Sequence[str] = (),
    ) -> audit_mod.AuditReport:
        """:meth:`audit` over the Parquet exposure table at ``table_url`` with DuckDB (every replica's exposures,
        out of core). The router's lock is held only to read the experiment, so assignments go on meanwhile."""
        from services.abrouter import warehouse  # DuckDB only where asked for

        min_sample = min_sample or self.settings.audit_min_sample
        min_deviation = min_deviation or self.settings.audit_min_deviation
        if min_sample < 0 or not 0 <= min_deviation < 1:
            raise InvalidArgument("min_sample/min_deviation", "min_sample >= 0 and min_deviation in [0, 1)")
        with self.lock:
            st = self._get(key)
            for i, k in enumerate(others):
                if k not in self.live:
                    raise NotFound(f"other_experiments[{i}]: experiment '{k}' does not exist")
            experiment, since = st.experiment, st.weights_since
        return warehouse.audit_table(
            table_url,
            experiment,
            since,
            others=others,
            min_sample=min_sample,
            min_deviation=min_deviation,
            window_covariates=window_covariates,
        )

    def check_balance(
        self,
        key: str,
        units: Sequence[tuple[str, Mapping[str, Any], Mapping[str, float], Mapping[str, str], float]],
    ) -> tuple[list[int], list[audit_mod.BalanceResult]]:
        """Balance of the planned assignment of a population (unit, attributes, numeric, categorical, time)."""
        if not 1 <= len(units) <= 1_000_000:
            raise InvalidArgument("units", "must hold 1 to 1000000 units")
        with self.lock:
            exp = self._get(key).experiment
        table = ExposureTable()
        now = self.clock()
        # The population as the experiment would assign it if it ran now (state and schedule aside).
        planned = replace(exp, state=ExperimentState.RUNNING, spec=replace(exp.spec, start_at=0.0, stop_at=0.0))
        for i, (unit_id, attributes, numeric, categorical, at) in enumerate(units):
            check_covariates(numeric, categorical, prefix=f"units[{i}].covariates")
            try:
                value = hash_value_of(exp, unit_id, attributes)
            except InvalidArgument as exc:
                raise InvalidArgument(f"units[{i}].{exc.field}", exc.rule) from None
            result = assign(planned, value, attributes, now)
            if result.in_experiment:
                table.add(value, result.arm_index, result.bucket, at or now, result.propensity, numeric, categorical)
        columns = table.columns()
        counts = (
            np.bincount(columns.arms, minlength=len(exp.spec.arms)).tolist()
            if len(columns)
            else [0] * len(exp.spec.arms)
        )
        if len(columns) == 0:
            return counts, []
        overall = audit_mod.covariate_balance(columns)  # flagged at p < 0.01
        windowed = audit_mod.familywise_balance(audit_mod.balance_over_windows(columns))  # Bonferroni
        return counts, overall + windowed

    # -- analysis ----------------------------------------------------------------------------------------------------

    def _current_tables(self, observations: bool) -> tuple[str, str]:
        """Bounded mode: the exposure and observation tables' URLs, exported up to now."""
        if self.tables is None:
            raise FailedPrecondition(
                "abrouter.exposures_in_memory = false: audits and analysis read the exposure table, which this "
                "router has no exporter for (abrouter.export_url)"
            )
        return self.tables(observations)

    @staticmethod
    @contextmanager
    def _reading_tables() -> Iterator[None]:
        """A table that cannot be read (corrupt, cut short: ExportCorrupt names it) is UNAVAILABLE."""
        from services.abrouter.export import ExportCorrupt

        try:
            yield
        except ExportCorrupt as exc:
            raise Unavailable(str(exc)) from exc

    def analyze(self, key: str, options: AnalysisOptions) -> tuple[list[analysis_mod.MetricAnalysis], Experiment, int]:
        """The multi-metric table of an experiment. Bounded mode: over the exposure and observation tables."""
        if self.bounded:
            from services.abrouter.warehouse_analysis import analyze_table  # DuckDB only where asked for

            with self.lock:
                exp = self._get(key).experiment  # NOT_FOUND before any export
            with self._reading_tables():
                exposures, observations = self._current_tables(True)
                results, exposed = analyze_table(exposures, observations, exp, options)
            return results, exp, exposed
        with self.lock:
            st = self._get(key)
            exp = st.experiment
            for i, m in enumerate(options.metrics):
                if m not in exp.spec.metrics:
                    raise InvalidArgument(f"metrics[{i}]", f"'{m}' is not a metric of experiment '{key}'")
            wanted = options.metrics or tuple(m for m in exp.spec.metrics if m in st.metrics)
            for m in wanted:
                declared = exp.spec.kind_of(m)
                if options.aggregate and options.aggregate != declared.aggregate:
                    raise InvalidArgument(
                        "aggregate",
                        f"metric '{m}' is declared {declared.name} (per-unit {declared.aggregate}); "
                        f"'{options.aggregate}' would count it differently from its guardrails (leave it empty)",
                    )
            columns = st.table.columns()
            logs = {
                m: (
                    st.metrics[m].rows.view().copy(),
                    st.metrics[m].values.view().copy(),
                    st.metrics[m].at.view().copy(),
                    dict(st.metrics[m].pre),
                )
                for m in wanted
                if m in st.metrics
            }
        n_arms = len(exp.spec.arms)
        counts = np.bincount(columns.arms, minlength=n_arms) if len(columns) else np.zeros(n_arms, dtype=np.int64)
        for arm, count in enumerate(counts):
            if count == 0:
                raise FailedPrecondition(f"arm '{exp.spec.arms[arm].name}' of experiment '{key}' has no exposed unit")
        position = self._position(columns, options.position_covariate)
        weights = self._weights(columns, options, n_arms)
        inputs = []
        for metric in wanted:
            if metric not in logs:
                continue
            rows, values, at, pre = logs[metric]
            keep = rows >= 0
            rows, values, at = rows[keep], values[keep], at[keep]
            days = np.maximum(at - columns.timestamps[rows], 0.0) / 86400.0
            unit_pre = None
            if pre:
                unit_pre = np.array([pre.get(u, np.nan) for u in columns.unit_ids], dtype=np.float64)
            inputs.append(
                analysis_mod.MetricInput(
                    metric=metric,
                    unit_arms=columns.arms.astype(np.int64),
                    obs_unit=rows,
                    obs_value=values,
                    obs_days=days,
                    unit_pre=unit_pre,
                    unit_position=position,
                    unit_weights=weights,
                    aggregate=exp.spec.kind_of(metric).aggregate,
                )
            )
        try:
            results = analysis_mod.analyze_experiment(
                inputs,
                n_arms,
                confidence=options.confidence,
                n_resamples=options.n_resamples,
                winsor_quantile=options.winsor_quantile,
                seed=options.seed,
            )
        except ValueError as exc:
            raise InvalidArgument("analysis", str(exc)) from None
        return results, exp, len(columns)

    @staticmethod
    def _position(columns: ExposureColumns, name: str) -> np.ndarray | None:
        if name:
            if name in columns.categorical:
                return columns.categorical[name].codes.astype(np.int64)
            if name in columns.numeric:
                values = columns.numeric[name]
                _, codes = np.unique(np.nan_to_num(values, nan=-1.0), return_inverse=True)
                return np.where(np.isnan(values), -1, codes).astype(np.int64)
            raise InvalidArgument("position_covariate", f"no covariate '{name}' was logged")
        if "position" in columns.categorical:
            return columns.categorical["position"].codes.astype(np.int64)
        return None

    @staticmethod
    def _weights(columns: ExposureColumns, options: AnalysisOptions, n_arms: int) -> np.ndarray | None:
        if options.inverse_propensity:
            try:
                return correction.ipw_weights(columns.propensity)
            except ValueError as exc:
                raise InvalidArgument("inverse_propensity", str(exc)) from None
        if not options.reweight_covariates:
            return None
        for i, name in enumerate(options.reweight_covariates):
            if name not in columns.numeric and name not in columns.categorical:
                raise InvalidArgument(f"reweight_covariates[{i}]", f"no covariate '{name}' was logged")
        strata = correction.strata_codes(columns, list(options.reweight_covariates))
        weights = np.ones(len(columns), dtype=np.float64)
        for arm in range(1, n_arms):  # each call reweights only that arm's units
            weights *= correction.bin_weights(columns.arms, strata, control=0, treatment=arm)
        return weights

    # -- periodic checks --------------------------------------------------------------------------------------------

    def _leads_monitor(self) -> bool:
        """Whether this replica runs the periodic checks now: always alone; on a shared store only while it
        holds the monitor lease (so a rollback or bandit update is decided once, not once per replica)."""
        if self.monitor_lease is None:
            return True
        try:
            return self.monitor_lease.claim().leader
        except StoreFailure as exc:
            log.warning("monitor lease claim failed", extra={"error": str(exc)})
            return False

    def _loop(self) -> None:
        last_audit = self.clock()
        while not self._stop.wait(self.settings.guardrail_interval_s):
            if self._away or not self._leads_monitor():
                continue
            try:
                if self.monitor_lease is not None:
                    self.sync_config()  # decide on the newest stored versions, not on what was last heard
                self.check_guardrails()
                self.update_bandits()
                interval = self.settings.audit_interval_s
                if interval and self.clock() - last_audit >= interval:
                    last_audit = self.clock()
                    self.audit_running()
            except Unavailable:
                if self._failed:
                    return
            except Exception as exc:
                if store_away(exc):  # e.g. the stored versions could not be read: the watcher resumes
                    self._store_went_away(exc)
                else:
                    log.exception("periodic check failed")

    def _guardrail_verdicts(self, st: _Live) -> list[GuardrailVerdict]:
        """This look at the experiment's guardrails, from the per-arm statistics (O(arms) per guardrail)."""
        spec = st.experiment.spec
        n_arms = len(spec.arms)
        exposed = st.arm_counts(n_arms)
        per_metric = {}
        for g in spec.guardrails:
            mlog = st.metrics.get(g.metric)
            statistics = mlog.statistics if mlog is not None else self._statistics(st, g.metric)
            per_metric[g.metric] = [statistics.moments(a, exposed[a]) for a in range(n_arms)]
        return evaluate_guardrails(spec.guardrails, per_metric)

    def guardrail_status(self, key: str) -> tuple[list[GuardrailVerdict], Experiment]:
        """Every guardrail of an experiment at this look (nothing is rolled back here)."""
        with self.lock:
            st = self._get(key)
            return self._guardrail_verdicts(st), st.experiment

    def check_guardrails(self) -> list[GuardrailVerdict]:
        """Evaluate every running experiment's guardrails; roll back those that trip (with an event)."""
        verdicts: list[GuardrailVerdict] = []
        tickets = []
        with self.lock:
            for key in sorted(self.live):
                st = self.live[key]
                exp = st.experiment
                if exp.state is not ExperimentState.RUNNING or not exp.spec.guardrails:
                    continue
                found = self._guardrail_verdicts(st)
                verdicts.extend(found)
                tripped = [v for v in found if v.tripped]
                if not tripped:
                    continue
                v = tripped[0]
                reason = (
                    f"guardrail {v.metric}: arm '{exp.spec.arms[v.arm].name}' {v.relative_change:+.1%} vs control "
                    f"(upper bound {v.bound:+.1%}, sequential p={v.p_value:.2g}); {v.reason}"
                )
                control_only = tuple(1.0 if i == 0 else 0.0 for i in range(len(exp.spec.arms)))
                rolled = exp.with_changes(
                    state=ExperimentState.ROLLED_BACK, weights=control_only, updated_at=self.clock(), reason=reason
                )
                statements: list[Statement] = []
                events: list[RouterEvent] = []
                undo = self._undo_monitor(st, events)
                self._write_experiment(st, rolled, "rolled_back", reason, statements)
                message = f"traffic back to control: {reason}"
                events.append(self._event("guardrail_tripped", key, message, statements, about=rolled))
                tickets.append((self._submit(statements, self._monitor_fence()), undo, rolled))
        for ticket, undo, rolled in tickets:
            self._durable_monitor(ticket, undo, rolled)
        return verdicts

    def update_bandits(self) -> list[str]:
        """Update the weights of bandit experiments whose interval elapsed; returns their keys."""
        updated = []
        tickets = []
        now = self.clock()
        with self.lock:
            for key in sorted(self.live):
                st = self.live[key]
                exp = st.experiment
                if st.bandit is None or exp.state is not ExperimentState.RUNNING or not st.bandit.due(now):
                    continue
                result = st.bandit.update(now)
                weights = tuple(float(w) for w in result.weights)
                new = exp.with_changes(weights=weights, updated_at=now)
                statements: list[Statement] = []
                events: list[RouterEvent] = []
                undo = self._undo_monitor(st, events)
                self._write_experiment(st, new, "bandit", "", statements)
                probs = ", ".join(f"{a.name}={p:.3f}" for a, p in zip(exp.spec.arms, result.prob_best, strict=True))
                message = f"weights {[round(w, 4) for w in weights]} (P(best): {probs})"
                events.append(self._event("bandit_updated", key, message, statements, about=new))
                tickets.append((self._submit(statements, self._monitor_fence()), undo, new))
        for ticket, undo, new in tickets:
            if self._durable_monitor(ticket, undo, new):
                updated.append(new.key)
        return updated

    def audit_running(self) -> None:
        """The continuous audit: every running experiment with enough units; alerts raise events once."""
        with self.lock:
            keys = [
                k
                for k, st in self.live.items()
                if st.experiment.state is ExperimentState.RUNNING
                and st.exposed_units() >= self.settings.audit_min_sample
            ]
        for key in keys:
            with self.lock:
                weighting, alerted = self.live[key].weights_since, self.live[key].srm_alerted_weighting
            report = self.audit(key)
            self.last_audits[key] = report
            stored = False
            if report.srm.alert and alerted != weighting and self.store is not None:
                # raised already by another replica or an earlier life of this one (memory does not know)
                with self.store_reads("the experiment's SRM alerts"):
                    stored = self.store.srm_alerted_since_version(key, weighting)
            statements: list[Statement] = []
            events: list[RouterEvent] = []
            with self.lock:
                st = self.live[key]
                if st.weights_since != weighting:  # reweighted during the audit: the next audit judges the new one
                    continue
                undo = self._undo_monitor(st, events)
                if report.srm.alert and st.srm_alerted_weighting != weighting:
                    if not stored:
                        events.append(self._event("srm_alert", key, report.srm.reason, statements))
                    st.srm_alerted_weighting = weighting
                imbalanced = [b for b in report.balance if b.imbalanced] + [t for t in report.clustering if t.alert]
                if imbalanced and not st.balance_alerting:
                    first = imbalanced[0]
                    message = f"{len(imbalanced)} imbalances, first: {first}"
                    events.append(self._event("balance_alert", key, message, statements))
                st.balance_alerting = bool(imbalanced)
                ticket = self._submit(statements, self._monitor_fence())
            self._durable_monitor(ticket, undo)

    def list_events(self, key: str = "", after_seq: int = 0) -> list[RouterEvent]:
        """Events, oldest first."""
        self._check_alive()
        with self.lock:
            return [e for e in self.events if e.seq > after_seq and (not key or e.experiment_key == key)]
