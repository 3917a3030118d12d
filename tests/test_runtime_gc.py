"""A service process moves what its start made into the collector's permanent generation once it serves
(:func:`guardmesh.runtime.freeze_startup_objects`, called by :func:`guardmesh.runtime.serve`): a full collection
then walks only what came after, so it no longer stalls every call in flight for the length of a walk over the
imported modules. Each service runs as its own process here (``serve`` installs signal handlers and runs until
SIGTERM), reporting from a thread of its own what the collector tracks once it serves."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.processes import clean_env

PROBE = textwrap.dedent(
    """
    import gc, os, signal, sys, threading, time
    from guardmesh import runtime

    made_before = [[]]  # a container the collector tracks, alive since before the start
    real = runtime.start_service

    def started(*args, **kwargs):
        running = real(*args, **kwargs)

        def report():
            deadline = time.monotonic() + 120
            while not gc.get_freeze_count() and time.monotonic() < deadline:
                time.sleep(0.05)
            made_after = [[]]
            tracked = gc.get_objects()
            print("frozen", gc.get_freeze_count(), flush=True)
            print("before-tracked", any(o is made_before for o in tracked), flush=True)
            print("after-tracked", any(o is made_after for o in tracked), flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=report, daemon=True).start()
        return running

    runtime.start_service = started
    sys.exit(runtime.serve(sys.argv[1]))
    """
)


@pytest.mark.parametrize("service", ["abrouter", "paramserver", "scorer"])
def test_a_service_process_freezes_what_its_start_made(service: str, tmp_path: Path) -> None:
    """Once serving, the objects alive before the start are out of the collector's sight (frozen), what the
    process makes afterwards is still collected, and the process stops cleanly on SIGTERM."""
    env = clean_env(
        {
            "GUARDMESH__MESH__STATE_DIR": str(tmp_path),
            f"GUARDMESH__SERVICES__{service.upper()}__PORT": "0",
            "PYTHONPATH": str(REPO),
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE, service], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert int(lines["frozen"]) > 10_000, done.stdout  # the imported modules' objects, at least
    assert lines["before-tracked"] == "False" and lines["after-tracked"] == "True", done.stdout
