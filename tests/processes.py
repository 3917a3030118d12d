"""Services as real processes in tests: ``python -m services.<name>`` with ``GUARDMESH__*`` overrides in a
clean environment, its output in a log file, started when gRPC health says SERVING, killed, restarted in
place and stopped.

A process that dies while starting fails the test with the tail of its log; so does one that is not
SERVING in time. Every life of a process writes its own log (``<name>-<life>.log``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardmesh.config import MeshConfig
from guardmesh.runtime import KNOWN_SERVICES

from .conftest import REPO, make_config

#: Longest a process may take to report SERVING: an import of torch on a 2-core machine that other test
#: runs keep busy can take tens of seconds.
START_TIMEOUT_S = 120.0
#: Prefixes of the variables a test's process must not inherit: the mesh's own configuration, the Consul
#: agent (discovery) and the OpenTelemetry exporter and resource settings of the developer's shell.
INHERITED_NOT = ("GUARDMESH", "CONSUL_", "OTEL_")


def clean_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``GUARDMESH*``, ``CONSUL_*`` and ``OTEL_*``, with
    ``PYTHONUNBUFFERED=1`` and then ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_NOT)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the kernel's ephemeral range.

    The port is bound later (and again by a process restarted in place after seconds down): a port from the
    ephemeral range could meanwhile be given to any outgoing connection on the machine, one below it only to
    a process that asks for it by number.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    pick = random.SystemRandom()  # not the tests' seeded `random`: concurrent runs must not pick alike
    for _ in range(100 if low > 20_000 else 0):
        port = pick.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log file ("" when it does not exist)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def wait_serving(
    address: str,
    service: str = "",
    timeout_s: float = START_TIMEOUT_S,
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
    log: Path | None = None,
    what: str = "",
) -> None:
    """Poll gRPC health of ``service`` at ``address`` until SERVING.

    AssertionError, with the tail of ``log``, when ``proc`` exits first or after ``timeout_s``.
    """
    what = what or address
    end = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            rc = None if proc is None else proc.poll()
            assert rc is None, f"{what} exited with {rc} while starting:\n{tail(log) if log else ''}"
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = err.code().name
            assert time.monotonic() < end, (
                f"{what} ({service!r}) not SERVING after {timeout_s}s (last: {last}, load average "
                f"{os.getloadavg()}):\n{tail(log) if log else ''}"
            )
            time.sleep(0.05)


class ServiceProcess:
    """``python -m services.<name>`` on a fixed port and state folder, restartable in place.

    ``logs`` is the folder of its log files; ``state`` (default ``logs / "state"``) its state folder;
    ``env`` the ``GUARDMESH__*`` (or other) overrides on top of :func:`clean_env`, after the port and the
    state folder. Channels made with :meth:`channel` are closed by :meth:`close`, which also stops the
    process; ``with ServiceProcess(...) as p:`` does both at the end.
    """

    def __init__(
        self,
        name: str,
        logs: Path,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        state: Path | None = None,
    ) -> None:
        self.name = name
        self.logs = logs
        self.state = state or logs / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = clean_env(
            {
                f"GUARDMESH__SERVICES__{name.upper()}__PORT": str(self.port),
                "GUARDMESH__MESH__STATE_DIR": str(self.state),
                **(env or {}),
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        #: Run in the child before ``exec`` (only to set a resource limit).
        self.preexec: Callable[[], None] | None = None
        self.channels: list[grpc.Channel] = []

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}-{self.lives}.log"

    def log_tail(self, chars: int = 3000) -> str:
        return tail(self.log_path, chars)

    def spawn(self) -> None:
        """Start a new life of the process (stdout and stderr to its own log); do not wait for it."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name}: previous life still running"
        self.lives += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec,  # only sets a resource limit
            )

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S, service: str = "") -> None:
        """Poll health of ``service`` (the empty name: the whole server) until SERVING; fail with the log if
        the process exits first or is not SERVING after ``timeout_s``."""
        assert self.proc is not None, f"{self.name} was not spawned"
        wait_serving(self.address, service, timeout_s, self.proc, self.log_path, self.name)

    def start(self, timeout_s: float = START_TIMEOUT_S, service: str = "") -> float:
        """Spawn and wait until SERVING; return the seconds it took."""
        began = time.monotonic()
        self.spawn()
        self.wait_serving(timeout_s, service)
        return time.monotonic() - began

    def health(self, service: str = "") -> str:
        """Health of ``service`` right now (or the status code that answered instead)."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    .status
                )
                return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                return err.code().name

    def channel(self) -> grpc.Channel:
        """A new insecure channel to the process, closed by :meth:`close`."""
        channel = grpc.insecure_channel(self.address)
        self.channels.append(channel)
        return channel

    def kill9(self) -> None:
        """SIGKILL the running process and wait until it is gone."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def terminate(self) -> None:
        """Send SIGTERM if it is running; do not wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout_s: float = 15.0, must_exit: bool = False) -> int | None:
        """Wait for the process to exit and return its exit code (None if it was never spawned). One still
        running after ``timeout_s`` is killed (SIGKILL); then ``must_exit`` raises TimeoutExpired."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
            if must_exit:
                raise
            return rc

    def stop(self, timeout_s: float = 15.0, must_exit: bool = False) -> int | None:
        """SIGTERM and :meth:`reap`: the exit code, None if it was never spawned. Safe to call on a dead
        process: it returns how that one ended."""
        self.terminate()
        return self.reap(timeout_s, must_exit)

    def close(self, timeout_s: float = 15.0, must_exit: bool = False) -> None:
        """Close the channels made by :meth:`channel` and :meth:`stop` the process."""
        for channel in self.channels:
            channel.close()
        self.channels.clear()
        self.stop(timeout_s, must_exit)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_all(procs: Iterable[ServiceProcess], timeout_s: float = START_TIMEOUT_S) -> None:
    """Spawn every process first, then wait for each: the start-ups overlap."""
    procs = list(procs)
    for p in procs:
        p.spawn()
    for p in procs:
        p.wait_serving(timeout_s)


def stop_all(procs: Iterable[ServiceProcess], timeout_s: float = 15.0) -> dict[str, int | None]:
    """SIGTERM to every process, then wait for each (SIGKILL after ``timeout_s``): exit codes by name."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    return {p.name: p.reap(timeout_s) for p in procs}


@contextlib.contextmanager
def postgres_mesh(monkeypatch: pytest.MonkeyPatch, service: str) -> Iterator[MeshConfig]:
    """The configuration of ``make up REPLICAS=2 STORE=postgres`` running ``service`` alone, on free ports.

    The mesh's and OpenTelemetry's variables of the developer's shell are removed first; no Jaeger starts.
    The state directory is under /tmp (the ``postgres`` user must reach it); on exit the mesh is taken down
    (errors ignored: the test may have done so) and the directory removed.
    """
    from guardmesh import mesh

    for key in [k for k in os.environ if k.startswith(("GUARDMESH", "OTEL_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GUARDMESH_REPLICAS", "2")
    monkeypatch.setenv("GUARDMESH_STORE", "postgres")
    monkeypatch.setenv("GUARDMESH_POSTGRES_PORT", str(free_port()))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")  # no Jaeger start
    state = Path("/tmp") / f"guardmesh-{service}-mesh-{os.getpid()}"
    # The processes `mesh up` starts read their configuration themselves: without this they would keep their
    # state under the default `.mesh` of the working directory (the repository).
    monkeypatch.setenv("GUARDMESH__MESH__STATE_DIR", str(state))
    config = make_config(
        state,
        **{
            "mesh.state_dir": str(state),
            f"services.{service}.port": free_port(),
            f"services.{service}.metrics_port": 0,
            **{f"services.{other}.enabled": False for other in KNOWN_SERVICES if other != service},
        },
    )
    try:
        yield config
    finally:
        with contextlib.suppress(Exception):
            mesh.down(config)
        shutil.rmtree(state, ignore_errors=True)


def assert_exits_on_unreachable_store(proc: ServiceProcess, database: str, password: str) -> None:
    """``proc``, configured with a store URL on 127.0.0.1 that nothing listens on, exits 4 at start; its log
    names the host and ``database`` and never shows ``password``."""
    proc.spawn()
    assert proc.reap(START_TIMEOUT_S) == 4
    out = proc.log_tail()
    assert "host=127.0.0.1" in out and f"database={database}" in out, out
    assert password not in out
