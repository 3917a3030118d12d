"""The scorer's shared registry on each backend (SQLite file, real PostgreSQL server): two scorer cores on one
store behave as one registry; the decision log and labels are shared; an F1 rollback is decided once;
what was acknowledged survives kill -9; a newer schema is refused; artefacts are checked against their name."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from guardmesh.config import load_config
from guardmesh.durable import GroupCommitLog, SchemaTooNew, StoreError
from guardmesh.errors import AlreadyExists, FailedPrecondition, Unavailable
from services.scorer import drift as drift_mod
from services.scorer.decision import ThresholdPolicy
from services.scorer.monitoring import CleaningPolicy
from services.scorer.persistence import MIGRATIONS, ArtefactStore, RegistryStore, SharedRegistry, open_shared_registry
from services.scorer.registry import ModelFormat
from services.scorer.scorer import Registration, Scorer, VersionConfig
from tests.postgres import PostgresServer

FEATURES = ("amount", "velocity")


def torchscript(weights: list[float], bias: float = 0.0) -> bytes:
    layer = torch.nn.Linear(len(weights), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.bias.fill_(bias)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(layer, torch.nn.Sigmoid()).eval()), buf)
    return buf.getvalue()


def registration(version: str, weights: list[float], *, baseline_f1: float | None = None) -> Registration:
    config = VersionConfig(ThresholdPolicy(base=0.5), (), CleaningPolicy.IMPUTE, 0.02, baseline_f1, 0.2, 1000)
    reference = np.random.default_rng(0).standard_normal((50, len(FEATURES))).astype(np.float32)
    return Registration(
        "risk", version, FEATURES, ModelFormat.TORCHSCRIPT, torchscript(weights), config, reference=reference
    )


def shared(core: Scorer) -> SharedRegistry:
    """The core's shared registry."""
    assert isinstance(core.shared, SharedRegistry)
    return core.shared


@pytest.fixture
def pair(store_url: str, tmp_path: Path) -> Iterator[tuple[Scorer, Scorer]]:
    """Two scorer cores, each with its own connection to one store and one artefact folder."""
    settings = load_config(env={}).scorer.model_copy(update={"min_labels": 20})
    stores = [open_shared_registry(store_url, str(tmp_path / "artefacts"), name) for name in ("a", "b")]
    cores = [Scorer(settings, torch.device("cpu"), s) for s in stores]
    yield cores[0], cores[1]
    for core, store in zip(cores, stores, strict=True):
        core.close()
        store.log.close()


def test_a_version_registered_on_one_core_is_served_by_the_other(pair: tuple[Scorer, Scorer]) -> None:
    a, b = pair
    a.register(registration("v1", [1.0, 0.0]), activate=True)
    assert b.model_lines() == []
    assert b.refresh() == 1
    [line] = b.model_lines()
    assert line.active == "v1" and [v.version for v in line.versions] == ["v1"]
    out = b.score("risk", "r1", {"amount": 2.0, "velocity": 0.0})
    assert out.version == "v1" and out.decision.score == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    with pytest.raises(AlreadyExists, match="another replica"):  # the store, not b's memory, says it exists
        shared(a).save_registration(registration("v1", [1.0, 0.0]))
    with pytest.raises(AlreadyExists):
        b.register(registration("v1", [0.5, 0.0]))


def test_activation_is_a_compare_and_set(pair: tuple[Scorer, Scorer]) -> None:
    a, b = pair
    a.register(registration("v1", [1.0, 0.0]), activate=True)
    a.register(registration("v2", [-1.0, 0.0]), activate=True)
    b.refresh()
    # b rolls back v2 -> v1; a still believes v2 serves with history [v1] and activates v1 -> a's
    # compare-and-set fails, a re-reads the store and activates over the newer state.
    assert b.rollback("risk") == "v1"
    assert a.registry.active_name("risk") == "v2"
    with pytest.raises(FailedPrecondition, match="another replica changed"):
        a.rollback("risk")  # never a second step back on a stale view
    assert a.registry.active_name("risk") == "v1"  # a took the store's state instead
    assert a.activate("risk", "v2") == "v2"
    b.refresh()
    assert b.registry.active_name("risk") == "v2" and b.registry.lines["risk"].history == ["v1"]
    assert shared(a).active() == {"risk": ("v2", ["v1"])}


def test_feedback_on_either_core_matches_the_decisions_of_both(pair: tuple[Scorer, Scorer]) -> None:
    a, b = pair
    a.register(registration("v1", [1.0, 0.0]), activate=True)
    b.refresh()
    a.score("risk", "from-a", {"amount": 3.0, "velocity": 0.0})  # positive
    b.score("risk", "from-b", {"amount": -3.0, "velocity": 0.0})  # negative
    result = b.feedback("risk", [("from-a", True), ("from-b", True), ("never-scored", True)])
    assert (result.accepted, result.unknown) == (2, 1)
    assert (result.precision, result.recall) == (1.0, 0.5)
    assert a.version_info("risk", "v1").labels == 2  # a reports the labels b took
    # Each label counts once, whichever replica gets it again.
    again = a.feedback("risk", [("from-a", True), ("from-b", False)])
    assert (again.accepted, again.unknown) == (0, 2)
    assert a.version_info("risk", "v1").labels == 2  # a's F1 window holds b's labels too


def test_an_f1_rollback_is_decided_once(pair: tuple[Scorer, Scorer]) -> None:
    a, b = pair
    a.register(registration("v1", [1.0, 0.0]), activate=True)
    a.register(registration("v2", [1.0, 0.0], baseline_f1=0.9), activate=True)
    b.refresh()
    # v2 answers positive for amount > 0; the labels say the opposite: its F1 falls to 0 on both cores.
    for i in range(20):
        (a if i % 2 else b).score("risk", f"r{i}", {"amount": 1.0, "velocity": 0.0})
    first = a.feedback("risk", [(f"r{i}", False) for i in range(0, 20, 2)])
    assert not first.rolled_back and first.active == "v2"  # 10 labels, fewer than min_labels
    b_sees = b.feedback("risk", [(f"r{i}", False) for i in range(1, 20, 2)])
    assert b_sees.rolled_back and b_sees.active == "v1"
    # a, on its stale view, finds the same degradation; the store already changed, so a does not step back
    # again (v1 has no earlier version: a second rollback would fail or go further).
    a.score("risk", "late", {"amount": 1.0, "velocity": 0.0})  # still v2 on a: a has not re-read yet
    late = a.feedback("risk", [("late", False)])
    assert not late.rolled_back and late.active == "v1"
    assert shared(a).active() == {"risk": ("v1", [])}
    assert [e.kind for e in a.events].count("rollback") + [e.kind for e in b.events].count("rollback") == 1


def test_an_old_registry_folder_is_adopted_once(store_url: str, tmp_path: Path) -> None:
    folder = RegistryStore(tmp_path / "scorer-models")
    folder.save_registration(registration("v1", [1.0, 0.0]))
    folder.save_registration(registration("v2", [-1.0, 0.0]))
    folder.save_active({"risk": ("v2", ["v1"])})
    shared = open_shared_registry(store_url, str(tmp_path / "artefacts"), "a")
    try:
        assert shared.adopt_folder(folder) == 2
        assert shared.adopt_folder(folder) == 0  # the second start copies nothing again
        assert [(r.version, r.payload) for r in shared.registrations()] == [
            (r.version, r.payload) for r in folder.registrations()
        ]
        assert shared.active() == {"risk": ("v2", ["v1"])}
    finally:
        shared.log.close()


def test_an_artefact_that_does_not_match_its_checksum_is_not_loaded(store_url: str, tmp_path: Path) -> None:
    shared = open_shared_registry(store_url, str(tmp_path / "artefacts"), "a")
    try:
        shared.save_registration(registration("v1", [1.0, 0.0]))
        record = json.loads(shared.log.query("SELECT record FROM scorer_versions")[0][0])
        (tmp_path / "artefacts" / record["payload_sha256"]).write_bytes(b"tampered")
        assert list(shared.registrations()) == []  # logged and left out, never served
    finally:
        shared.log.close()


def test_a_newer_schema_is_refused(store_url: str, tmp_path: Path) -> None:
    log = GroupCommitLog(store_url, MIGRATIONS, component="scorer")
    log.transaction(lambda tx: tx.execute("UPDATE schema_version SET version = 99 WHERE component = 'scorer'"))
    log.close()
    with pytest.raises(SchemaTooNew, match="version 99"):
        open_shared_registry(store_url, str(tmp_path / "artefacts"), "a")


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from guardmesh.config import load_config
    from services.scorer.persistence import open_shared_registry
    from tests.test_scorer_store import registration
    from services.scorer.scorer import Scorer

    store = open_shared_registry(sys.argv[1], sys.argv[2], "doomed")
    core = Scorer(load_config(env={}).scorer, torch.device("cpu"), store)
    core.register(registration("v1", [1.0, 0.0]), activate=True)
    core.register(registration("v2", [-1.0, 0.0]), activate=True)
    for i in range(50):
        core.score("risk", f"r{i}", {"amount": 1.0, "velocity": 0.0})
        print(f"acked r{i}", flush=True)
    print("done", flush=True)
    sys.stdin.read()  # wait for kill -9
    """
)


def test_acknowledged_registrations_and_decisions_survive_kill_9(store_url: str, tmp_path: Path) -> None:
    artefacts = str(tmp_path / "artefacts")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, store_url, artefacts],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.stdout is not None
    acked = []
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line == "done":
            break
        acked.append(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(acked) == 50
    shared: SharedRegistry = open_shared_registry(store_url, artefacts, "survivor")
    core = Scorer(load_config(env={}).scorer, torch.device("cpu"), shared)
    try:
        assert core.restore() == 2
        assert core.registry.active_name("risk") == "v2" and core.registry.lines["risk"].history == ["v1"]
        result = core.feedback("risk", [(rid, False) for rid in acked])
        assert result.accepted == 50  # every acknowledged decision was in the store
    finally:
        core.close()
        shared.log.close()


def test_a_merged_drift_report_pools_every_replica_live_window(pair: tuple[Scorer, Scorer]) -> None:
    a, b = pair
    a.register(registration("v1", [1.0, 0.0]), activate=True)
    b.refresh()
    rng = np.random.default_rng(1)
    rows_a = rng.standard_normal((30, 2)).astype(np.float32)
    rows_b = (rng.standard_normal((40, 2)) + 1.5).astype(np.float32)  # b sees shifted traffic
    for i, row in enumerate(rows_a):
        a.score("risk", f"a{i}", dict(zip(FEATURES, map(float, row), strict=True)))
    for i, row in enumerate(rows_b):
        b.score("risk", f"b{i}", dict(zip(FEATURES, map(float, row), strict=True)))
    own, _, _, own_rows, own_replicas = a.drift_report("risk")
    assert own_replicas == ["a"] and own_rows == 30
    b._publish_live(b.lines["risk"])  # what b's follower does every second
    merged, _, reference_rows, live_rows, replicas = a.drift_report("risk", merge_replicas=True)
    assert replicas == ["a", "b"] and live_rows == 70 and reference_rows == 50
    # The definition: the same statistics on the union of the two samples.
    line = a.lines["risk"]
    assert line.reference is not None
    pooled = drift_mod.LiveWindow(2, 70)
    pooled.add(np.concatenate([rows_a, rows_b]))
    expected = drift_mod.drift_stats(line.reference, pooled)
    np.testing.assert_allclose(
        [f.ks_statistic for f in merged.features()], [f.ks_statistic for f in expected.features()]
    )
    np.testing.assert_allclose([f.psi for f in merged.features()], [f.psi for f in expected.features()])
    assert merged.score == pytest.approx(expected.score)
    assert merged.features()[0].ks_statistic > own.features()[0].ks_statistic  # b's shift shows only when merged


def test_the_decision_log_keeps_the_newest_decisions_per_model(store_url: str, tmp_path: Path) -> None:
    settings = load_config(env={}).scorer.model_copy(update={"decision_log": 100})
    store = open_shared_registry(store_url, str(tmp_path / "artefacts"), "a")
    core = Scorer(settings, torch.device("cpu"), store)
    try:
        core.register(registration("v1", [1.0, 0.0]), activate=True)
        for i in range(130):
            core.score("risk", f"r{i}", {"amount": 1.0, "velocity": 0.0})
        assert core.prune_decisions() == 30
        result = core.feedback("risk", [("r0", True), ("r29", True), ("r30", True), ("r129", True)])
        assert (result.accepted, result.unknown) == (2, 2)  # r0..r29 were the oldest
    finally:
        core.close()
        store.log.close()


def test_store_lost_at_run_time_then_back(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """PostgreSQL stops under a serving core: Score is UNAVAILABLE (its decision cannot be written), the core
    says the store is gone (the service turns NOT_SERVING); when the server is back both recover."""
    store = open_shared_registry(postgres_server.create_database(), str(tmp_path / "artefacts"), "a")
    core = Scorer(load_config(env={}).scorer, torch.device("cpu"), store)
    health: list[bool] = []
    try:
        core.register(registration("v1", [1.0, 0.0]), activate=True)
        core.follow(0.1, health.append)
        core.score("risk", "before", {"amount": 1.0, "velocity": 0.0})
        postgres_server.stop("immediate")
        try:
            with pytest.raises(Unavailable, match="scorer store unavailable"):
                core.score("risk", "during", {"amount": 1.0, "velocity": 0.0})
            wait_until("the core to report the store gone", lambda: health[-1:] == [False])
        finally:
            postgres_server.start()
        wait_until("the core to report the store back", lambda: health[-1:] == [True])
        wait_until("a Score to be answered again", lambda: _scores(core, "after"))
        result = core.feedback("risk", [("before", True), ("during", True), ("after", True)])
        assert (result.accepted, result.unknown) == (2, 1)  # nothing answered UNAVAILABLE was stored
    finally:
        core.close()
        store.log.close()


def _scores(core: Scorer, request_id: str) -> bool:
    try:
        core.score("risk", request_id, {"amount": 1.0, "velocity": 0.0})
        return True
    except Unavailable:
        return False


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll ``check`` with a generous deadline (the machine is shared)."""
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_labels_no_f1_figure_reads_are_pruned(store_url: str, tmp_path: Path) -> None:
    store = open_shared_registry(store_url, str(tmp_path / "artefacts"), "a")
    try:
        decided = [(f"r{i}", "v1", i % 3 == 0) for i in range(20)]
        store.record_decisions("risk", decided).wait()
        assert len(store.match_labels("risk", [(f"r{i}", i % 2 == 0) for i in range(20)])) == 20
        before = store.labelled("risk", "v1", last=5, first=3)
        assert store.prune_labels("risk", "v1", first=3, last=5) == 12
        assert store.labelled("risk", "v1", last=5, first=3) == before  # what the F1 figures read is kept
        assert store.prune_labels("risk", "v1", first=3, last=5) == 0
        assert len(store.labelled("risk", "v1", last=100, first=100)[1]) == 8
    finally:
        store.log.close()


def test_an_unusable_artefact_url_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"scorer\.artefact_url 'nosuchprotocol://bucket/models' cannot be used"):
        ArtefactStore("nosuchprotocol://bucket/models")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(StoreError, match=r"scorer\.artefact_url"):
        ArtefactStore(str(blocked / "artefacts"))
