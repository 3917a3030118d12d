"""TEST DOUBLE of a Consul agent's HTTP API. This is not Consul.

It answers, on ``127.0.0.1:<ephemeral port>``, the three endpoints guardmesh's discovery uses through
py-consul, with the request and response shapes of the Consul HTTP API:

* ``PUT /v1/agent/service/register``: records the service and its checks (keys decoded case- and
  underscore-insensitively, as Consul's decoder does; a GRPC check without a valid ``Interval`` or with a
  malformed ``DeregisterCriticalServiceAfter`` is refused with 400 like Consul refuses it);
* ``PUT /v1/agent/service/deregister/<id>``: removes it (404 for an unknown id);
* ``GET /v1/health/service/<name>[?passing=1]``: a list of ``{Node, Service, Checks}`` entries and an
  ``X-Consul-Index`` header.

To stand in for Consul's native gRPC health check, every health query actually runs the check for each
instance: ``grpc.health.v1.Health/Check`` against the check's ``GRPC`` target ``host:port[/service]`` (the
part after ``/`` is the service name asked about). Only an instance answering SERVING is ``passing``; with
``passing=1`` the others are left out. Unlike Consul there is no periodic checking, no deregister-after
reaping, no catalog, no blocking queries and no ACLs.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

NODE_NAME = "consul-double"
NODE_ADDRESS = "127.0.0.1"
DATACENTER = "dc1"
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _norm(key: str) -> str:
    return key.replace("_", "").lower()


def _field(data: dict[str, Any], name: str, default: Any = None) -> Any:
    """Consul-style lookup: ``name`` matched ignoring case and underscores."""
    want = _norm(name)
    for key, value in data.items():
        if _norm(key) == want:
            return value
    return default


class _BadRequest(Exception):
    pass


@dataclass
class CheckDef:
    """A registered check, canonical field names (``GRPC``, ``Interval``, ``DeregisterCriticalServiceAfter``)."""

    grpc: str = ""
    interval: str = ""
    timeout: str = ""
    deregister_critical_service_after: str = ""
    grpc_use_tls: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The check as Consul names its fields."""
        return {
            "GRPC": self.grpc,
            "Interval": self.interval,
            "Timeout": self.timeout,
            "DeregisterCriticalServiceAfter": self.deregister_critical_service_after,
            "GRPCUseTLS": self.grpc_use_tls,
        }


@dataclass
class Registration:
    """One registered service instance."""

    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    checks: list[CheckDef]
    payload: dict[str, Any]


def _parse_check(raw: dict[str, Any]) -> CheckDef:
    check = CheckDef(
        grpc=str(_field(raw, "GRPC", "")),
        interval=str(_field(raw, "Interval", "")),
        timeout=str(_field(raw, "Timeout", "")),
        deregister_critical_service_after=str(_field(raw, "DeregisterCriticalServiceAfter", "")),
        grpc_use_tls=bool(_field(raw, "GRPCUseTLS", False)),
        raw=raw,
    )
    durations = {
        "Interval": check.interval,
        "Timeout": check.timeout,
        "DeregisterCriticalServiceAfter": check.deregister_critical_service_after,
    }
    for name, value in durations.items():
        if value and not _GO_DURATION.match(value):
            raise _BadRequest(f"Invalid check: {name}: invalid duration {value!r}")
    if check.grpc and not check.interval:
        raise _BadRequest("Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks")
    return check


def _seconds(duration: str, default: float) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    if not duration:
        return default
    total = 0.0
    for number, _, unit in re.findall(r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def grpc_health_status(target: str, timeout: float = 10.0) -> tuple[str, str]:
    """Run Consul's gRPC check against ``host:port[/service]``: (``passing``/``critical``, output)."""
    address, _, service = target.partition("/")
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as err:
        return "critical", f"gRPC check {target}: {err.code().name}: {err.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "passing", f"gRPC check {target}: success"
    return "critical", f"gRPC check {target}: service status {name}"


class ConsulDouble:
    """A test double of a Consul agent's HTTP API (see the module docstring); ``addr`` is ``127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.services: dict[str, Registration] = {}
        #: Every accepted call in order: ("register", id) / ("deregister", id) / ("health", name).
        self.calls: list[tuple[str, str]] = []
        self.deregistered: list[str] = []
        self._index = 1
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                double._handle(self, "PUT")

            def do_GET(self) -> None:
                double._handle(self, "GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="consul-double", daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        """``host:port`` for ``CONSUL_HTTP_ADDR``."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def instances(self, name: str) -> list[Registration]:
        """Registered instances of ``name`` (healthy or not)."""
        with self._lock:
            return [r for r in self.services.values() if r.name == name]

    # -- HTTP -------------------------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        query = parse_qs(url.query, keep_blank_values=True)
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        try:
            if method == "PUT" and url.path == "/v1/agent/service/register":
                code, payload, headers = self._register(body)
            elif method == "PUT" and url.path.startswith("/v1/agent/service/deregister/"):
                code, payload, headers = self._deregister(unquote(url.path.rsplit("/", 1)[1]))
            elif method == "GET" and url.path.startswith("/v1/health/service/"):
                code, payload, headers = self._health(unquote(url.path.rsplit("/", 1)[1]), query)
            else:
                code, payload, headers = 404, f"no handler for {method} {url.path} in the consul test double", {}
        except _BadRequest as exc:
            code, payload, headers = 400, str(exc), {}
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        req.send_response(code)
        req.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        req.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)

    def _register(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise _BadRequest(f"Request decode failed: {exc}") from None
        name = _field(payload, "Name")
        if not name:
            raise _BadRequest("Missing service name")
        raw_checks = list(_field(payload, "Checks") or [])
        single = _field(payload, "Check")
        if single:
            raw_checks.append(single)
        reg = Registration(
            id=str(_field(payload, "ID") or name),
            name=str(name),
            address=str(_field(payload, "Address") or ""),
            port=int(_field(payload, "Port") or 0),
            tags=list(_field(payload, "Tags") or []),
            checks=[_parse_check(c) for c in raw_checks],
            payload=payload,
        )
        with self._lock:
            self.services[reg.id] = reg
            self.calls.append(("register", reg.id))
            self._index += 1
        return 200, "", {}

    def _deregister(self, service_id: str) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            if service_id not in self.services:
                return (
                    404,
                    f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.',
                    {},
                )
            del self.services[service_id]
            self.calls.append(("deregister", service_id))
            self.deregistered.append(service_id)
            self._index += 1
        return 200, "", {}

    def _health(self, name: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        passing_only = "passing" in query and query["passing"][-1].lower() not in ("0", "false")
        with self._lock:
            regs = [r for r in self.services.values() if r.name == name]
            self.calls.append(("health", name))
            index = self._index
        entries = []
        for reg in regs:
            checks = [
                {
                    "Node": NODE_NAME,
                    "CheckID": "serfHealth",
                    "Name": "Serf Health Status",
                    "Status": "passing",
                    "Notes": "",
                    "Output": "Agent alive and reachable",
                    "ServiceID": "",
                    "ServiceName": "",
                    "ServiceTags": [],
                    "Type": "",
                }
            ]
            for n, check in enumerate(reg.checks, start=1):
                if check.grpc:
                    # Consul's default timeout is 10 s (2 s could fail a busy but healthy instance under load).
                    status, output = grpc_health_status(check.grpc, _seconds(check.timeout, 10.0))
                    kind = "grpc"
                else:  # the double runs gRPC checks only; any other kind stays critical, as Consul starts them
                    status, output, kind = "critical", "check kind not run by the consul test double", ""
                checks.append(
                    {
                        "Node": NODE_NAME,
                        "CheckID": f"service:{reg.id}" + (f":{n}" if len(reg.checks) > 1 else ""),
                        "Name": f"Service '{reg.name}' check",
                        "Status": status,
                        "Notes": "",
                        "Output": output,
                        "ServiceID": reg.id,
                        "ServiceName": reg.name,
                        "ServiceTags": reg.tags,
                        "Type": kind,
                        "Interval": check.interval,
                        "Timeout": check.timeout,
                    }
                )
            if passing_only and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append(
                {
                    "Node": {
                        "ID": "00000000-0000-0000-0000-000000000001",
                        "Node": NODE_NAME,
                        "Address": NODE_ADDRESS,
                        "Datacenter": DATACENTER,
                        "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS},
                        "Meta": {},
                    },
                    "Service": {
                        "ID": reg.id,
                        "Service": reg.name,
                        "Tags": reg.tags,
                        "Address": reg.address,
                        "Meta": {},
                        "Port": reg.port,
                        "Weights": {"Passing": 1, "Warning": 1},
                        "EnableTagOverride": False,
                    },
                    "Checks": checks,
                }
            )
        return 200, entries, {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true"}
