"""After a failed write the router is stopped for reads too: memory may hold a config change that never
reached the store, so every read answers UNAVAILABLE instead of serving it; a restart shows what is durable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.errors import Unavailable
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.router import AnalysisOptions, Router
from services.abrouter.store import RouterStore

SPEC = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), metrics=("m",))


def _fail_config_writes(store: RouterStore) -> None:
    """A real SQLite trigger that aborts every experiment write (the commit fails, as on a broken disk)."""
    assert store.log.db is not None
    store.log.db.execute("CREATE TRIGGER fail_cfg BEFORE INSERT ON experiments BEGIN SELECT RAISE(ABORT, 'x'); END")


READS: dict[str, Callable[[Router], Any]] = {
    "get": lambda r: r.get("k"),
    "list_experiments": lambda r: r.list_experiments(),
    "history": lambda r: r.history("k"),
    "guardrail_status": lambda r: r.guardrail_status("k"),
    "analyze": lambda r: r.analyze("k", AnalysisOptions()),
    "audit": lambda r: r.audit("k"),
    "list_events": lambda r: r.list_events(),
    "shadow_report": lambda r: r.shadow_report("k"),
}


@pytest.mark.parametrize("failing", ["update", "stop", "create"])
@pytest.mark.parametrize("read", sorted(READS))
def test_reads_after_a_failed_config_write_are_unavailable(tmp_path: Path, failing: str, read: str) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    router.create(SPEC)
    router.assign("u0", {}, ["k"], log_exposure=True)
    _fail_config_writes(store)
    with pytest.raises(Unavailable, match="store failed"):
        if failing == "update":
            router.update(replace(SPEC, arms=(ArmSpec("a", 0.1), ArmSpec("b", 0.9))))
        elif failing == "stop":
            router.stop("k", "done")
        else:
            router.create(replace(SPEC, key="k2"))
    with pytest.raises(Unavailable, match="store failed"):
        READS[read](router)
    store.close()


def test_a_restart_after_a_failed_update_shows_the_saved_version(tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    router.create(SPEC)
    _fail_config_writes(store)
    with pytest.raises(Unavailable):
        router.update(replace(SPEC, arms=(ArmSpec("a", 0.1), ArmSpec("b", 0.9))))
    store.close()
    restored = Router(ABRouterSettings(), RouterStore(tmp_path / "r.db", "NORMAL"))
    restored.restore()
    exp, _ = restored.get("k")
    assert (exp.version, exp.weights) == (1, (0.5, 0.5))
    assert restored.store is not None
    restored.store.close()
