"""Server processes for the benchmarks: the mesh's services and the bare grpcio echo, each on a free port.

Every benchmark that talks to a real process starts it here: ``python -m services.<name>`` (or the echo of
``bench.paramserver``) with a clean environment (no GUARDMESH/CONSUL/OTEL settings from the caller's shell),
its state in a temporary folder, logs to a file, and gRPC health polled until SERVING; SIGTERM at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
#: The bare echo's service name (``bench.paramserver --echo-server``), also what its health reports.
ECHO_SERVICE = "bench.Echo"


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(state_dir: str | Path, **overrides: str) -> dict[str, str]:
    """This process's environment without GUARDMESH, CONSUL and OTEL settings; state in ``state_dir``,
    WARNING logs, the repository on PYTHONPATH, then ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUARDMESH", "CONSUL_", "OTEL_"))}
    env["GUARDMESH__MESH__STATE_DIR"] = str(state_dir)
    env["GUARDMESH__LOGGING__LEVEL"] = "WARNING"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env | overrides


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the repository with its output in ``log_path``."""
    with log_path.open("wb") as log_fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_fh, stderr=log_fh)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_serving(
    address: str, service: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0
) -> None:
    """Poll gRPC health of ``service`` until SERVING; RuntimeError with the log's tail if the process exits."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{service} did not report SERVING within {timeout:.0f} s")


@contextlib.contextmanager
def service_process(
    service: str, overrides: dict[str, str], timeout: float = 90.0, tree: Path | None = None
) -> Iterator[str]:
    """Run ``python -m services.<service>`` (from ``tree``, a copy of the repository at another commit, when
    given) on a free loopback port with GUARDMESH__ overrides; yield its address once gRPC health says SERVING;
    SIGTERM it afterwards."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"guardmesh-bench-{service}-") as tmp:
        env = clean_env(tmp, **{f"GUARDMESH__SERVICES__{service.upper()}__PORT": str(port)}, **overrides)
        log = Path(tmp) / "service.log"
        if tree is None:
            proc = start([sys.executable, "-m", f"services.{service}"], env, log)
        else:  # run in the tree: ``-m`` puts the working directory first on sys.path
            env["PYTHONPATH"] = str(tree)
            with log.open("wb") as out:
                cmd = [sys.executable, "-m", f"services.{service}"]
                proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=out)
        try:
            wait_serving(f"127.0.0.1:{port}", service, proc, log, timeout)
            yield f"127.0.0.1:{port}"
        finally:
            stop(proc)


@contextlib.contextmanager
def echo_process(**overrides: str) -> Iterator[str]:
    """Run the bare grpcio echo (``python -m bench.paramserver --echo-server PORT``: generic handlers on raw
    bytes, no protobuf, no interceptors) on a free loopback port; yield its address once it serves."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-echo-") as tmp:
        log = Path(tmp) / "echo.log"
        cmd = [sys.executable, "-m", "bench.paramserver", "--echo-server", str(port)]
        proc = start(cmd, clean_env(tmp, **overrides), log)
        try:
            wait_serving(f"127.0.0.1:{port}", ECHO_SERVICE, proc, log)
            yield f"127.0.0.1:{port}"
        finally:
            stop(proc)


def calls_per_second(call: Callable[[int, int], None], clients: int, per_client: int) -> float:
    """Run ``call(client, n)`` for ``n`` in ``range(per_client)`` on each of ``clients`` threads at once.

    Returns the completed calls per second of wall time, all threads together. Any exception in a thread
    stops that thread and, once all have ended, raises ``RuntimeError`` with the count and the first one.
    """
    errors: list[BaseException] = []

    def run(client: int) -> None:
        try:
            for n in range(per_client):
                call(client, n)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]}")
    return per_client * clients / elapsed
