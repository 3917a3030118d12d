"""Distributed tracing over real protocols: two service processes, W3C context over gRPC, spans over OTLP.

The scheduler (``python -m services.scheduler``) and a second service, the relay (``tests/relay_service.py``),
run as real processes exporting to :class:`tests.otlp_receiver.OtlpReceiver`, a real OTLP/gRPC receiver that
stands in for Jaeger. The batch processor's schedule delay is set far beyond the test's length, so the spans
can only reach the receiver through the flush each process does when it shuts down on SIGTERM.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest

from guardmesh.client import open_channel
from guardmesh.tracing import tracer_provider
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from tests.conftest import make_config, node_pb
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.processes import START_TIMEOUT_S, clean_env, free_port, tail, wait_serving

REPO = Path(__file__).resolve().parent.parent
RELAY_SCRIPT = REPO / "tests" / "relay_service.py"
FORWARD = "/guardmesh.test.Relay/Forward"
LIST_NODES = "/guardmesh.v1.SchedulerService/ListNodes"


def _service_env(otlp_endpoint: str, scheduler_port: int, state_dir: Path) -> dict[str, str]:
    return clean_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
            # Nothing is exported on a timer during the test: only the flush at SIGTERM shutdown delivers spans.
            "OTEL_BSP_SCHEDULE_DELAY": "120000",
            "GUARDMESH__SERVICES__SCHEDULER__PORT": str(scheduler_port),
            "GUARDMESH__MESH__STATE_DIR": str(state_dir),
            "GUARDMESH__GRPC__GRACE_S": "2.0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }
    )


def _read_port(proc: subprocess.Popen[str], timeout: float) -> int:
    lines: queue.Queue[str | None] = queue.Queue()
    stdout: IO[str] | None = proc.stdout
    assert stdout is not None

    def pump() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="relay-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"relay printed no PORT line within {timeout}s")
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"relay exited before printing its port (rc={proc.wait()})")
        if line.startswith("PORT "):
            return int(line.split()[1])


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    rx = OtlpReceiver()
    yield rx
    rx.stop()


def _start(args: list[str], env: dict[str, str], log: Path, stdout: int) -> subprocess.Popen[str]:
    with log.open("w") as err:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=stdout, stderr=err, text=True)


def _terminate_all(procs: dict[str, subprocess.Popen[str]], timeout: float) -> dict[str, int]:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes[name] = -9
    return codes


@pytest.mark.timeout(600)  # three process start-ups of up to START_TIMEOUT_S each on a loaded machine
def test_trace_crosses_two_service_processes_and_is_flushed_on_sigterm(tmp_path: Path, receiver: OtlpReceiver) -> None:
    scheduler_port = free_port()
    env = _service_env(receiver.endpoint, scheduler_port, tmp_path / "state")
    logs = {"scheduler": tmp_path / "scheduler.log", "relay": tmp_path / "relay.log"}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["scheduler"] = _start(
            [sys.executable, "-m", "services.scheduler"], env, logs["scheduler"], subprocess.DEVNULL
        )
        scheduler_addr = f"127.0.0.1:{scheduler_port}"
        wait_serving(
            scheduler_addr,
            "guardmesh.v1.SchedulerService",
            START_TIMEOUT_S,
            procs["scheduler"],
            logs["scheduler"],
            "scheduler",
        )
        procs["relay"] = _start([sys.executable, str(RELAY_SCRIPT)], env, logs["relay"], subprocess.PIPE)
        try:
            relay_port = _read_port(procs["relay"], timeout=START_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\nrelay log:\n{tail(logs['relay'])}") from None
        relay_addr = f"127.0.0.1:{relay_port}"
        wait_serving(relay_addr, "relay", START_TIMEOUT_S, procs["relay"], logs["relay"], "relay")

        config = make_config(tmp_path)
        with open_channel("scheduler", config, address=scheduler_addr) as sched_channel:
            spb_grpc.SchedulerServiceStub(sched_channel).RegisterNode(
                spb.RegisterNodeRequest(node=node_pb("trace-node", 2, 81920))
            )

        tracer = tracer_provider().get_tracer("tests.test_tracing")
        with (
            tracer.start_as_current_span("test-root") as root,
            open_channel("relay", config, address=relay_addr) as relay_channel,
        ):
            forward = relay_channel.unary_unary(
                FORWARD, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            reply = forward(b"", timeout=10)
        assert reply == b"1", f"relay answered {reply!r}\nrelay log:\n{tail(logs['relay'])}"
        test_trace_id = format(root.get_span_context().trace_id, "032x")
        test_root_id = format(root.get_span_context().span_id, "016x")
        # With the batch timer out of the way, nothing has been exported yet: the spans below come from the
        # flush on SIGTERM, which is what this test holds the runtime to.
        early = receiver.spans
        assert early == [], "spans exported before SIGTERM: " + ", ".join(map(str, early))
    finally:
        codes = _terminate_all(procs, timeout=60)

    assert codes == {"scheduler": 0, "relay": 0}, (
        f"exit codes after SIGTERM: {codes}\nscheduler log:\n{tail(logs['scheduler'])}\n"
        f"relay log:\n{tail(logs['relay'])}"
    )

    def relay_server(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.service_name == "relay" and s.kind == "SERVER" and s.name == FORWARD]

    def complete(spans: list[ReceivedSpan]) -> bool:
        return any(
            s.trace_id == test_trace_id and s.service_name == "scheduler" and s.name == LIST_NODES for s in spans
        ) and any(s.trace_id == test_trace_id for s in relay_server(spans))

    # Both processes have exited: whatever they flushed on SIGTERM is already here (short wait, no timer).
    spans = receiver.wait_for(complete, timeout=5)
    listing = "\n  ".join(str(s) for s in spans)

    servers = [s for s in relay_server(spans) if s.trace_id == test_trace_id]
    assert len(servers) == 1, f"relay SERVER spans for {FORWARD} in trace {test_trace_id}:\n  {listing}"
    relay_srv = servers[0]
    # The caller's context crossed the wire: the relay's span is a child inside the test's trace, not a root.
    assert relay_srv.parent_span_id not in ("", test_root_id), listing

    clients = [
        s
        for s in spans
        if s.trace_id == test_trace_id and s.service_name == "relay" and s.kind == "CLIENT" and s.name == LIST_NODES
    ]
    assert len(clients) == 1, f"relay CLIENT spans for {LIST_NODES}:\n  {listing}"
    relay_cli = clients[0]
    assert relay_cli.parent_span_id == relay_srv.span_id, listing

    sched = [s for s in spans if s.trace_id == test_trace_id and s.service_name == "scheduler" and s.name == LIST_NODES]
    assert len(sched) == 1, f"scheduler spans for {LIST_NODES}:\n  {listing}"
    sched_srv = sched[0]
    assert sched_srv.kind == "SERVER", listing
    assert sched_srv.parent_span_id == relay_cli.span_id, listing
    assert sched_srv.attributes.get("rpc.grpc.status_code") == grpc.StatusCode.OK.value[0], sched_srv.attributes

    # The RegisterNode call made before the relay call is a separate trace, also flushed by the scheduler.
    assert any(
        s.service_name == "scheduler"
        and s.kind == "SERVER"
        and s.name == "/guardmesh.v1.SchedulerService/RegisterNode"
        and s.trace_id != test_trace_id
        for s in spans
    ), listing


LIST_JOBS = "/guardmesh.v1.SchedulerService/ListJobs"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: An application that knows nothing of OpenTelemetry: it only uses the SDK, with the standard OTEL_* variables.
SDK_APP = """
from guardmesh.sdk import Mesh
with Mesh() as mesh:
    print("JOBS", len(mesh.scheduler.list_jobs()), flush=True)
"""


@pytest.mark.timeout(400)
def test_sdk_app_request_is_the_trace_root_and_health_checks_are_not_traced(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    scheduler_port = free_port()
    env = _service_env(receiver.endpoint, scheduler_port, tmp_path / "state")
    log = tmp_path / "scheduler.log"
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["scheduler"] = _start([sys.executable, "-m", "services.scheduler"], env, log, subprocess.DEVNULL)
        address = f"127.0.0.1:{scheduler_port}"
        wait_serving(address, "guardmesh.v1.SchedulerService", START_TIMEOUT_S, procs["scheduler"], log, "scheduler")
        with grpc.insecure_channel(address) as channel:  # a health check, as a load balancer makes them
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        app_env = {**env, "OTEL_SERVICE_NAME": "checkout-app", "OTEL_BSP_SCHEDULE_DELAY": "500"}
        app = subprocess.run(
            [sys.executable, "-c", SDK_APP],
            cwd=REPO,
            env=app_env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        assert app.returncode == 0 and "JOBS 0" in app.stdout, app.stderr[-3000:]
    finally:
        codes = _terminate_all(procs, timeout=60)
    assert codes == {"scheduler": 0}, tail(log)

    def complete(spans: list[ReceivedSpan]) -> bool:
        return any(s.service_name == "scheduler" and s.name == LIST_JOBS for s in spans) and any(
            s.service_name == "checkout-app" for s in spans
        )

    spans = receiver.wait_for(complete, timeout=10)
    listing = "\n  ".join(str(s) for s in spans)
    (root,) = [s for s in spans if s.service_name == "checkout-app" and s.name == LIST_JOBS]
    assert root.kind == "CLIENT" and root.parent_span_id == "", listing  # the app's call is the root
    (served,) = [s for s in spans if s.service_name == "scheduler" and s.name == LIST_JOBS]
    assert served.kind == "SERVER", listing
    assert (served.trace_id, served.parent_span_id) == (root.trace_id, root.span_id), listing
    assert not [s for s in spans if s.name.startswith("/grpc.health.v1.Health/")], listing


@pytest.mark.timeout(400)
def test_service_honours_otel_traces_exporter_console(tmp_path: Path) -> None:
    scheduler_port = free_port()
    env = _service_env("", scheduler_port, tmp_path / "state")
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT")
    env["OTEL_TRACES_EXPORTER"] = "console"
    log, out = tmp_path / "scheduler.log", tmp_path / "scheduler.out"
    procs: dict[str, subprocess.Popen[str]] = {}
    with out.open("w") as stdout:
        try:
            procs["scheduler"] = _start([sys.executable, "-m", "services.scheduler"], env, log, stdout.fileno())
            address = f"127.0.0.1:{scheduler_port}"
            wait_serving(
                address, "guardmesh.v1.SchedulerService", START_TIMEOUT_S, procs["scheduler"], log, "scheduler"
            )
            with grpc.insecure_channel(address) as channel:
                spb_grpc.SchedulerServiceStub(channel).ListJobs(spb.ListJobsRequest(), timeout=10)
        finally:
            codes = _terminate_all(procs, timeout=60)
    assert codes == {"scheduler": 0}, tail(log)
    printed = out.read_text()
    assert f'"name": "{LIST_JOBS}"' in printed, printed[-3000:]
    assert '"service.name": "scheduler"' in printed, printed[-3000:]
    assert HEALTH_CHECK not in printed  # wait_serving's health checks are not traced


#: An application that set OpenTelemetry up itself before using the SDK: the SDK's spans go to its provider.
OWN_PROVIDER_APP = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

import grpc
from guardmesh.sdk import Mesh

with Mesh(addresses={"scheduler": sys.argv[1]}) as mesh:
    try:
        mesh.scheduler.list_jobs()
    except grpc.RpcError as err:
        print("CODE", err.code().name)
print("SPANS", [(s.name, s.kind.name) for s in exporter.get_finished_spans()])
"""


def test_sdk_keeps_the_tracer_provider_an_app_set_up_itself() -> None:
    env = clean_env(
        {
            "PYTHONPATH": str(REPO),
            "GUARDMESH__CLIENT__MAX_ATTEMPTS": "1",
            "GUARDMESH__CLIENT__DEADLINE_S": "2",
            "OTEL_TRACES_EXPORTER": "console",  # would print spans if the SDK set up its own provider
        }
    )
    app = subprocess.run(
        [sys.executable, "-c", OWN_PROVIDER_APP, f"127.0.0.1:{free_port()}"],  # nothing listens there
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert app.returncode == 0, app.stderr[-3000:]
    assert "CODE UNAVAILABLE" in app.stdout
    assert f"('{LIST_JOBS}', 'CLIENT')" in app.stdout, app.stdout
    assert '"name":' not in app.stdout  # no console exporter of the SDK's own
