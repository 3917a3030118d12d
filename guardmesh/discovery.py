"""Service discovery: the static registry of the mesh config, or Consul.

With Consul, each service registers itself with Consul's native gRPC health check (which calls the
service's ``grpc.health.v1`` endpoint) and a deregister-after, and deregisters on shutdown; clients resolve
the passing instances and spread calls over them round-robin.
"""

from __future__ import annotations

import logging
import socket
import uuid
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

import consul

from guardmesh.config import ConfigError, MeshConfig
from guardmesh.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One instance of a service."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


class Registry(Protocol):
    """What the runtime and the client factory need from discovery."""

    def register(self, service: str, host: str, port: int) -> str:
        """Announce an instance; return its registration id."""
        ...

    def deregister(self, registration_id: str) -> None:
        """Withdraw an instance."""
        ...

    def resolve(self, service: str) -> list[Endpoint]:
        """Healthy instances of ``service``."""
        ...


class StaticRegistry:
    """Addresses from ``[services.*]`` of the mesh config; registration is a no-op."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config

    def register(self, service: str, host: str, port: int) -> str:
        """Nothing to announce in a static mesh."""
        return f"{service}-{host}-{port}"

    def deregister(self, registration_id: str) -> None:
        """Nothing to withdraw."""

    def resolve(self, service: str) -> list[Endpoint]:
        """The configured replicas of ``service`` (``replicas``), else its one ``host:port``."""
        ep = self.config.endpoint(service)
        if ep.replicas:
            return [parse_endpoint(a, f"services.{service}.replicas") for a in ep.replicas]
        return [Endpoint(ep.host, ep.port)]


def parse_endpoint(address: str, where: str = "address") -> Endpoint:
    """``host:port`` (``[v6]:port`` too) as an endpoint; ConfigError naming ``where`` if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {address!r} is not host:port")
    return Endpoint(host.strip("[]"), int(port))


def _parse_consul_addr(addr: str) -> tuple[str, str, int]:
    url = urlparse(addr if "://" in addr else f"http://{addr}")
    return url.scheme or "http", url.hostname or "127.0.0.1", url.port or 8500


class ConsulRegistry:
    """Register in and resolve from a Consul agent over its HTTP API (py-consul)."""

    def __init__(self, config: MeshConfig) -> None:
        scheme, host, port = _parse_consul_addr(config.discovery.consul_addr)
        self.client = consul.Consul(host=host, port=port, scheme=scheme)
        self.interval = config.discovery.check_interval
        self.deregister_after = config.discovery.deregister_after

    def register(self, service: str, host: str, port: int) -> str:
        """Register ``service`` at ``host:port`` with a gRPC health check on the service's own status."""
        service_id = f"{service}-{host}-{port}-{uuid.uuid4().hex[:8]}"
        check = consul.Check.grpc(f"{host}:{port}/{service}", self.interval, deregister=self.deregister_after)
        self.client.agent.service.register(
            service, service_id=service_id, address=host, port=port, tags=["guardmesh"], check=check
        )
        log.info("registered in consul", extra={"service_id": service_id})
        return service_id

    def deregister(self, registration_id: str) -> None:
        """Deregister an instance; failures are logged (the deregister-after cleans up)."""
        try:
            self.client.agent.service.deregister(registration_id)
        except Exception:  # the agent may be gone during shutdown
            log.warning("consul deregistration failed", extra={"service_id": registration_id}, exc_info=True)

    def resolve(self, service: str) -> list[Endpoint]:
        """Instances of ``service`` whose checks pass; Unavailable if there are none."""
        _, entries = self.client.health.service(service, passing=True)
        out = []
        for entry in entries:
            svc = entry["Service"]
            host = svc.get("Address") or entry["Node"]["Address"]
            out.append(Endpoint(host, int(svc["Port"])))
        if not out:
            raise Unavailable(f"no passing instance of '{service}' in consul")
        return out


def registry_for(config: MeshConfig) -> Registry:
    """The registry the configuration selects."""
    return ConsulRegistry(config) if config.discovery.mode == "consul" else StaticRegistry(config)


def grpc_target(endpoints: list[Endpoint]) -> str:
    """A gRPC target for the endpoints: the address itself for one, an ``ipv4:``/``ipv6:`` list for many."""
    if len(endpoints) == 1:
        return endpoints[0].address
    v4: list[tuple[str, int]] = []
    v6: list[tuple[str, int]] = []
    for ep in endpoints:
        info = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)[0]
        ip = str(info[4][0])
        (v6 if ":" in ip else v4).append((ip, ep.port))
    # One target URI holds one address family: keep the larger family and say what was dropped.
    if v4 and v6:
        keep, drop = (v4, v6) if len(v4) >= len(v6) else (v6, v4)
        log.warning("mixed address families; dropping %s", [f"{ip}:{port}" for ip, port in drop])
    else:
        keep = v4 or v6
    if keep is v6:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in keep)
    return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in keep)
