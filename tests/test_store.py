"""The store layer (guardmesh/durable.py, guardmesh/leadership.py) on both backends: a SQLite file and a real
PostgreSQL server started by the tests (tests/postgres.py). Every behaviour runs on each (``store_url``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from guardmesh.durable import (
    Fenced,
    GroupCommitLog,
    Migration,
    SchemaTooNew,
    StoreError,
    StoreFailure,
    StoreUnreachable,
    Ticket,
    Transaction,
    parse_store_url,
    to_postgresql,
)
from guardmesh.inventory import GpuDevice, NodeSpec
from guardmesh.leadership import Lease
from services.scheduler.jobs import EventKind, Job, JobSpec, JobState
from services.scheduler.store import Store
from tests.postgres import PostgresServer

ITEMS = (Migration(1, "CREATE TABLE items (k TEXT PRIMARY KEY, v BIGINT NOT NULL)"),)


def open_items(url: str, migrations: tuple[Migration, ...] = ITEMS) -> GroupCommitLog:
    return GroupCommitLog(url, migrations, "NORMAL", component="items")


@contextmanager
def committer_held(log: GroupCommitLog) -> Iterator[Ticket]:
    """The committer stuck on its first batch (a row of ``items``) behind a lock another transaction holds:
    batches submitted in the block queue for the next transaction; the lock is let go on leaving it. Yields
    the first batch's ticket."""
    held, release = threading.Event(), threading.Event()

    def hold(tx: Transaction) -> None:
        if log.dialect == "postgresql":  # SQLite's side transaction already holds the write lock
            tx.execute("LOCK TABLE items IN SHARE MODE")
        held.set()
        release.wait(60)

    holder = threading.Thread(target=log.transaction, args=(hold,))
    holder.start()
    try:
        assert held.wait(60)
        first = log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("first", 1))])
        deadline = time.monotonic() + 30
        while log.transactions < 1:  # the committer has taken the first batch alone and waits for the lock
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield first
    finally:
        release.set()
        holder.join(60)


def test_acknowledged_batches_are_committed_and_share_transactions(store_url: str) -> None:
    log = open_items(store_url)
    try:
        tickets = []
        lock = threading.Lock()

        def writer(w: int) -> None:
            for i in range(25):
                t = log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", (f"{w}-{i}", i))])
                with lock:
                    tickets.append(t)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ticket in tickets:
            ticket.wait()
        assert log.query("SELECT COUNT(*) FROM items")[0][0] == 100
        assert 1 <= log.transactions <= 100
    finally:
        log.close()
    # Reopened: everything acknowledged is there, and the migration is not run again.
    again = open_items(store_url)
    try:
        assert again.query("SELECT COUNT(*), SUM(v) FROM items")[0] == (100, 4 * sum(range(25)))
        assert again.schema_version == 1
    finally:
        again.close()


def test_a_failed_transaction_fails_its_tickets_and_keeps_none_of_its_writes(store_url: str) -> None:
    log = open_items(store_url)
    try:
        log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("a", 1))]).wait()
        bad = log.submit(
            [("INSERT INTO items (k, v) VALUES (?, ?)", ("b", 2)), ("INSERT INTO items (k, v) VALUES (?, ?)", ("a", 3))]
        )
        with pytest.raises(StoreFailure, match="could not be written"):
            bad.wait("items")
        assert log.query("SELECT k, v FROM items ORDER BY k") == [("a", 1)]
        # The store still works after a failed transaction.
        log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("c", 4))]).wait()
        assert [r[0] for r in log.query("SELECT k FROM items ORDER BY k")] == ["a", "c"]
    finally:
        log.close()


def test_a_group_commit_is_all_or_nothing_and_acknowledged_only_once_committed(store_url: str) -> None:
    """Batches queued while a transaction is held up share the next one: a failing row in the middle of one
    batch's multi-row statement fails every ticket of that transaction and keeps none of its rows."""
    log = open_items(store_url)
    try:
        with committer_held(log) as first:
            good = log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", [("g1", 1), ("g2", 2)])])
            bad = log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", [("b1", 1), ("b1", 2), ("b3", 3)])])
            assert not any(t._event.is_set() for t in (first, good, bad))  # nothing acknowledged before COMMIT
        first.wait()
        for ticket in (good, bad):
            with pytest.raises(StoreFailure, match="could not be written"):
                ticket.wait("items")
        assert log.transactions == 2
        assert log.query("SELECT k, v FROM items ORDER BY k") == [("first", 1)]
        log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", [("g1", 1), ("g2", 2)])]).wait()
        assert [r[0] for r in log.query("SELECT k FROM items ORDER BY k")] == ["first", "g1", "g2"]
    finally:
        log.close()


def test_written_values_read_back_exactly(store_url: str) -> None:
    """Quotes, placeholders, percent signs, statement separators and extreme numbers survive the write path
    (PostgreSQL's batches are bound by the client into one query message)."""
    texts = [
        "it's",
        "100%",
        "a?b",
        "back\\slash",
        "semi; colon'); DROP TABLE vals; --",
        "new\nline",
        "ünï ✓",
        "",
        "$$x$$",
    ]
    floats = [0.1, 1 / 3, -2.5e-300, 1.7976931348623157e308, float("inf"), float("-inf"), -0.0, 5e-324]
    ints = [0, 2**62, -(2**62), -1, 7]
    rows: list[tuple[int, str | None, float | None, int | None]] = [
        (i, texts[i % len(texts)], floats[i % len(floats)], ints[i % len(ints)]) for i in range(40)
    ]
    rows.append((40, None, None, None))
    log = GroupCommitLog(
        store_url,
        (Migration(1, "CREATE TABLE vals (id BIGINT PRIMARY KEY, s TEXT, x DOUBLE PRECISION, n BIGINT)"),),
        component="vals",
    )
    try:
        insert = "INSERT INTO vals (id, s, x, n) VALUES (?, ?, ?, ?)"
        log.submit([(insert, rows[:20]), (insert, rows[20])]).wait()
        log.submit([(insert, rows[21:]), ("UPDATE vals SET s = s || '%' WHERE id = ?", (1,))]).wait()
        expected = [(i, f"{s}%" if i == 1 else s, x, n) for i, s, x, n in rows]
        assert log.query("SELECT id, s, x, n FROM vals ORDER BY id") == expected
    finally:
        log.close()


def test_portable_upsert_and_insert_or_ignore(store_url: str) -> None:
    log = open_items(store_url)
    try:
        upsert = "INSERT INTO items (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
        log.submit([(upsert, [("x", 1), ("y", 2)]), (upsert, ("x", 10))]).wait()
        log.submit([("INSERT OR IGNORE INTO items (k, v) VALUES (?, ?)", [("y", 99), ("z", 3)])]).wait()
        # A literal percent sign survives the placeholder translation.
        log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("100%", 5))]).wait()
        assert log.query("SELECT k, v FROM items WHERE k LIKE ? ORDER BY k", ("%",)) == [
            ("100%", 5),
            ("x", 10),
            ("y", 2),
            ("z", 3),
        ]
        # A question mark inside a quoted literal is text, not a placeholder, on both backends.
        log.submit([("INSERT INTO items (k, v) VALUES ('why?', ?)", (7,))]).wait()
        assert log.query("SELECT v FROM items WHERE k = 'why?' AND v = ?", (7,)) == [(7,)]
    finally:
        log.close()


def test_rows_of_one_insert_across_batches_keep_their_order_and_first_wins_on_ignore(store_url: str) -> None:
    """Batches that share a transaction may have their rows of one single-row INSERT sent as one statement
    (PostgreSQL): serial numbers still follow submission order, and INSERT OR IGNORE keeps the first of two
    rows for one key, within one statement as across statements."""
    log = GroupCommitLog(
        store_url,
        (
            Migration(1, "CREATE TABLE items (k TEXT PRIMARY KEY, v BIGINT NOT NULL)"),
            Migration(
                2,
                "CREATE TABLE seqd (n INTEGER PRIMARY KEY AUTOINCREMENT, k TEXT NOT NULL)",
                postgresql="CREATE TABLE seqd (n BIGSERIAL PRIMARY KEY, k TEXT NOT NULL)",
            ),
        ),
        "NORMAL",
        component="merged",
    )
    try:
        ignore = "INSERT OR IGNORE INTO items (k, v) VALUES (?, ?)"
        numbered = "INSERT INTO seqd (k) VALUES (?)"
        with committer_held(log) as first:
            tickets = [
                log.submit([(ignore, ("a", 1)), (numbered, ("one",))]),
                log.submit([(numbered, [("two",), ("three",)])]),
                log.submit([(numbered, ("four",)), (ignore, [("a", 2), ("b", 3), ("b", 4)])]),
            ]
        for ticket in (first, *tickets):
            ticket.wait("rows")
        assert log.transactions == 2  # the three batches shared one transaction
        assert log.query("SELECT k FROM seqd ORDER BY n") == [("one",), ("two",), ("three",), ("four",)]
        assert log.query("SELECT k, v FROM items ORDER BY k") == [("a", 1), ("b", 3), ("first", 1)]
    finally:
        log.close()


def test_an_insert_of_no_rows_writes_nothing_and_fails_nothing_beside_it(store_url: str) -> None:
    log = open_items(store_url)
    try:
        insert = "INSERT INTO items (k, v) VALUES (?, ?)"
        log.submit([(insert, []), (insert, ("a", 1)), ("INSERT INTO items (k, v) VALUES (?, ?)", [])]).wait()
        log.submit([(insert, [])]).wait()
        assert log.query("SELECT k, v FROM items") == [("a", 1)]
    finally:
        log.close()


def test_text_reaches_a_database_in_another_encoding_intact(postgres_server: PostgresServer) -> None:
    """The committer sends its batch in the connection's client encoding, not always UTF-8."""
    name = f"latin1_{os.getpid()}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        log = open_items(postgres_server.url(name))
        try:
            log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", [("café", 1), ("naïve", 2)])]).wait()
            assert log.query("SELECT k, octet_length(k) FROM items ORDER BY v") == [("café", 4), ("naïve", 5)]
        finally:
            log.close()
    finally:
        with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name}")


def test_closing_with_a_commit_stuck_on_the_server_fails_it_unacknowledged(postgres_server: PostgresServer) -> None:
    """A commit waiting on the server (here a lock) while the store closes is cancelled, not freed under:
    its ticket fails, nothing of it is kept, and the process lives on."""
    url = postgres_server.create_database()
    log = open_items(url)
    with psycopg.connect(url) as blocker, psycopg.connect(url, autocommit=True) as watcher:
        blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        stuck = log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("stuck", 1))])
        deadline = time.monotonic() + 30
        while not watcher.execute(  # its own transaction each time: pg_stat_activity is read afresh
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone():
            assert time.monotonic() < deadline, "the commit never reached the lock"
            time.sleep(0.05)
        log.backend.close()  # what GroupCommitLog.close does once its wait for the committer runs out
        blocker.rollback()
    with pytest.raises(StoreFailure):
        stuck.wait("items")
    log.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone() == (0,)


def test_insert_or_replace_is_refused_on_postgresql_with_the_portable_form_named() -> None:
    with pytest.raises(StoreError, match="ON CONFLICT"):
        to_postgresql("INSERT OR REPLACE INTO t (a) VALUES (?)")
    assert to_postgresql("SELECT ? WHERE a LIKE '5%'") == "SELECT %s WHERE a LIKE '5%%'"
    assert to_postgresql("""SELECT "a?" FROM t WHERE b = 'it''s ?' AND c = ?""") == (
        """SELECT "a?" FROM t WHERE b = 'it''s ?' AND c = %s"""
    )


def test_migrations_run_in_order_once_and_a_newer_schema_is_refused(store_url: str) -> None:
    log = open_items(store_url)
    log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("a", 1))]).wait()
    log.close()
    step2 = Migration(2, "ALTER TABLE items ADD COLUMN note TEXT NOT NULL DEFAULT 'none'")
    upgraded = open_items(store_url, (*ITEMS, step2))
    try:
        assert upgraded.schema_version == 2
        assert upgraded.query("SELECT k, v, note FROM items") == [("a", 1, "none")]
    finally:
        upgraded.close()
    # The older code (knows version 1 only) refuses the upgraded store, saying why and what to do.
    with pytest.raises(SchemaTooNew, match=r"'items' is at version 2, but this code knows versions up to 1"):
        open_items(store_url)
    # Migrations must rise from 1.
    with pytest.raises(ValueError, match="must rise"):
        open_items(store_url, (step2, ITEMS[0]))


def test_a_deposed_writer_is_fenced_and_none_of_its_batch_lands(store_url: str) -> None:
    first, second = open_items(store_url), open_items(store_url)
    try:
        a = Lease(first, "items", "a", "host-a:1", ttl_s=0.5)
        b = Lease(second, "items", "b", "host-b:2", ttl_s=0.5)
        state = a.claim()
        assert state.leader and state.epoch == 1 and a.valid()
        first.fence("items", a.epoch)
        first.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("from-a", 1))]).wait()
        standby = b.claim()
        assert not standby.leader and standby.address == "host-a:1" and standby.holder == "a"
        # a stops renewing (paused); b takes over once the lease has expired on the store's clock.
        deadline = time.monotonic() + 30
        while not (taken := b.claim()).leader:
            assert time.monotonic() < deadline, "standby never took over"
            time.sleep(0.1)
        assert taken.epoch == 2
        assert not a.valid()  # a's own conservative clock ran out before b could take over
        with pytest.raises(Fenced, match="epoch 1 is stale"):
            first.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("late-from-a", 2))]).wait()
        # a, waking up, learns it lost the lease and who holds it now.
        woke = a.claim()
        assert not woke.leader and woke.holder == "b" and woke.address == "host-b:2"
        second.fence("items", b.epoch)
        second.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("from-b", 3))]).wait()
        assert [r[0] for r in second.query("SELECT k FROM items ORDER BY k")] == ["from-a", "from-b"]
    finally:
        first.close()
        second.close()


def test_a_fenced_batch_names_the_holder_or_the_missing_lease_and_keeps_nothing(store_url: str) -> None:
    log = open_items(store_url)
    try:
        state = Lease(log, "items", "a", "host-a:1", ttl_s=60).claim()
        stale = [
            ("items", state.epoch + 1, f"epoch {state.epoch + 1} is stale \\(epoch {state.epoch} held by a\\)"),
            ("no such lease", 1, "epoch 1 is stale \\(no lease row\\)"),
            ("odd $guardmesh_fence$ 'name", 1, "epoch 1 is stale \\(no lease row\\)"),  # checked another way
        ]
        for lease, epoch, says in stale:
            batch = [("INSERT INTO items (k, v) VALUES (?, ?)", [(lease, 1), ("other", 2)])]
            with pytest.raises(Fenced, match=says):
                log.submit(batch, fence=(lease, epoch)).wait()
        log.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("kept", 3))], fence=("items", state.epoch)).wait()
        assert log.query("SELECT k FROM items") == [("kept",)]
    finally:
        log.close()


def test_a_released_lease_is_taken_at_once_and_renewal_keeps_the_epoch(store_url: str) -> None:
    first, second = open_items(store_url), open_items(store_url)
    try:
        a = Lease(first, "items", "a", "host-a:1", ttl_s=60)
        b = Lease(second, "items", "b", "host-b:2", ttl_s=60)
        assert a.claim().epoch == 1
        assert a.claim().epoch == 1  # a renewal
        assert not b.claim().leader
        a.release()
        assert not a.valid()
        taken = b.claim()
        assert taken.leader and taken.epoch == 2
        assert b.current().address == "host-b:2"
    finally:
        first.close()
        second.close()


def test_scheduler_rows_round_trip(store_url: str) -> None:
    store = Store(store_url)
    nodes = [
        NodeSpec(f"node-{c}", (GpuDevice(0, f"GPU-{c}", "A100-80GB", 81920, ""),), (("zone", "a"),), 8000, 64000)
        for c in "cab"
    ]
    try:
        for n in nodes:
            store.stage_node(n)
        spec = JobSpec(job_id="j1", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=1000)
        job = Job(spec=spec, seq=1, submitted_at=1.5, state=JobState.PENDING, pending_reason="waiting")
        store.stage_job(job)
        store.stage_event(1, EventKind.PENDING, "j1", 1.5, "submitted")
        store.commit().wait()  # type: ignore[union-attr]
        job.state = JobState.RUNNING
        store.stage_job(job)  # an update of the same row
        store.stage_node(nodes[0])  # re-registration keeps the node's place
        store.commit().wait()  # type: ignore[union-attr]
    finally:
        store.close()
    again = Store(store_url)
    try:
        assert [n.name for n in again.load_nodes()] == ["node-c", "node-a", "node-b"]
        assert again.load_nodes()[0] == nodes[0]
        (loaded,) = again.load_jobs()
        assert (loaded.job_id, loaded.state, loaded.submitted_at, loaded.spec) == ("j1", JobState.RUNNING, 1.5, spec)
        assert again.load_events(10) == [(1, int(EventKind.PENDING), "j1", 1.5, "submitted")]
        assert again.max_event_seq() == 1
    finally:
        again.close()


def test_store_urls() -> None:
    assert parse_store_url("sqlite:///rel/s.db", "/state").path == Path("/state/rel/s.db")
    assert parse_store_url("sqlite:////abs/s.db", "/state").path == Path("/abs/s.db")
    assert parse_store_url("plain.db", "/state").path == Path("/state/plain.db")
    assert parse_store_url("postgresql://u@h/db").dialect == "postgresql"
    with pytest.raises(StoreError, match="unknown scheme 'mysql'"):
        parse_store_url("mysql://h/db")


def test_unreachable_postgresql_names_host_and_database_never_the_password(postgres_server: object) -> None:
    from tests.processes import free_port

    url = f"postgresql://alice:s3cret-pw@127.0.0.1:{free_port()}/ledger"
    with pytest.raises(StoreUnreachable) as caught:
        open_items(url)
    message = str(caught.value)
    assert "host=127.0.0.1" in message and "database=ledger" in message
    assert "s3cret-pw" not in message


def test_listeners_hear_committed_notifications_only(store_url: str) -> None:
    first = open_items(store_url)
    heard: list[str | None] = []
    listener = first.listen("items", heard.append)
    try:
        first.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("a", 1)), first.notify("items", "a")]).wait()
        # A failed batch's notification is never heard.
        with pytest.raises(StoreFailure):
            first.submit([("INSERT INTO items (k, v) VALUES (?, ?)", ("a", 2)), first.notify("items", "dup")]).wait()
        first.submit([first.notify("other", "x"), first.notify("items", "b")]).wait()
        deadline = time.monotonic() + 30
        while heard.count("a") < 1 or heard.count("b") < 1:
            assert time.monotonic() < deadline, heard
            time.sleep(0.05)
        assert "dup" not in heard and "x" not in heard
    finally:
        listener.close()
        first.close()


def test_another_process_on_postgresql_hears_a_notification(postgres_server: object) -> None:
    from tests.postgres import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    url = postgres_server.create_database()
    writer, reader = open_items(url), open_items(url)  # two logs: two connections, as two replicas have
    heard: list[str | None] = []
    listener = reader.listen("items", heard.append)
    try:
        writer.submit([writer.notify("items", "changed")]).wait()
        deadline = time.monotonic() + 30
        while "changed" not in heard:
            assert time.monotonic() < deadline, heard
            time.sleep(0.05)
        # The server restarts: the listener connects again and says notifications may have been missed.
        postgres_server.stop("fast")
        postgres_server.start()
        deadline = time.monotonic() + 60
        while None not in heard:
            assert time.monotonic() < deadline, heard
            time.sleep(0.1)
        try:  # the writer's connection died with the server: its first batch fails, unacknowledged
            writer.submit([writer.notify("items", "after-restart")]).wait()
        except StoreFailure:
            writer.submit([writer.notify("items", "after-restart")]).wait()
        deadline = time.monotonic() + 30
        while "after-restart" not in heard:
            assert time.monotonic() < deadline, heard
            time.sleep(0.05)
    finally:
        listener.close()
        writer.close()
        reader.close()


def test_an_unversioned_schema_script_runs_at_every_start(store_url: str) -> None:
    """Older callers pass one script of IF NOT EXISTS statements: a table added to it later is created."""
    first = GroupCommitLog(store_url, "CREATE TABLE IF NOT EXISTS a (k TEXT PRIMARY KEY)", component="legacy")
    first.close()
    grown = "CREATE TABLE IF NOT EXISTS a (k TEXT PRIMARY KEY); CREATE TABLE IF NOT EXISTS b (k TEXT PRIMARY KEY)"
    second = GroupCommitLog(store_url, grown, component="legacy")
    try:
        second.submit([("INSERT INTO b (k) VALUES (?)", ("x",))]).wait()
        assert second.query("SELECT k FROM b") == [("x",)] and second.schema_version == 0
    finally:
        second.close()
