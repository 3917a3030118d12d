"""Mesh configuration: one TOML file with environment overrides, validated once at start.

Order of precedence (later wins): the embedded ``mesh.toml``, the file named by ``GUARDMESH_CONFIG`` (or
passed explicitly), then ``GUARDMESH__SECTION__KEY`` environment variables. ``CONSUL_HTTP_ADDR`` selects
Consul discovery and ``OTEL_EXPORTER_OTLP_ENDPOINT`` the trace endpoint, as users of those tools expect.
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "GUARDMESH__"


class ConfigError(ValueError):
    """The configuration is malformed; the message names the offending key and the rule it breaks."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MeshSettings(_Section):
    """Where the local mesh keeps pids, logs and databases."""

    state_dir: str = ".mesh"


class ServiceEndpoint(_Section):
    """Static address of one service."""

    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    enabled: bool = True
    #: Address announced to discovery when it differs from the bind host (e.g. a container name).
    advertise_host: str = ""
    #: Port of the Prometheus scrape endpoint (``/metrics``); 0: none. Paramserver shard i uses port + i.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    #: ``host:port`` of every replica when several run (static discovery resolves to these); empty: one.
    replicas: list[str] = Field(default_factory=list)

    @property
    def address(self) -> str:
        """``host:port`` of the endpoint."""
        return f"{self.host}:{self.port}"


class GrpcSettings(_Section):
    """Server and channel limits applied the same way to every service and client."""

    max_message_mib: int = Field(default=64, ge=1, le=2047)
    keepalive_time_s: float = Field(default=30.0, gt=0)
    keepalive_timeout_s: float = Field(default=10.0, gt=0)
    grace_s: float = Field(default=10.0, ge=0)
    drain_delay_s: float = Field(default=0.5, ge=0, le=60)
    max_workers: int = Field(default=64, ge=2, le=4096)


class ClientSettings(_Section):
    """Deadlines and retry policy of the client factory."""

    deadline_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=5)
    initial_backoff_s: float = Field(default=0.1, gt=0)
    max_backoff_s: float = Field(default=2.0, gt=0)
    reresolve_s: float = Field(default=5.0, gt=0, le=3600)


class DiscoverySettings(_Section):
    """Static registry or Consul."""

    mode: Literal["static", "consul"] = "static"
    consul_addr: str = "127.0.0.1:8500"
    check_interval: str = "5s"
    deregister_after: str = "1m"


class TracingSettings(_Section):
    """OpenTelemetry export."""

    otlp_endpoint: str = ""


class MetricsSettings(_Section):
    """Prometheus scraping of every service's OpenTelemetry metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"


class LoggingSettings(_Section):
    """Structured logs on standard error."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class SchedulerSettings(_Section):
    """The scheduler service (see ``mesh.toml`` for each key's meaning)."""

    db_path: str = "scheduler.db"
    store_url: str = ""
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    leader_lease_s: float = Field(default=5.0, ge=0.5, le=300)
    gpu_reserve_mib: int = Field(default=512, ge=0, le=65536)
    lease_ttl_s: int = Field(default=30, ge=1, le=86400)
    preemption_grace_s: float = Field(default=10.0, ge=0)
    policy: Literal["fgd", "best-fit", "first-fit"] = "fgd"
    cluster_file: str = ""
    node_ttl_s: float = Field(default=0.0, ge=0)
    reap_interval_s: float = Field(default=0.5, gt=0)
    scale_out_utilization: float = Field(default=0.9, gt=0, le=1)
    scale_in_utilization: float = Field(default=0.2, ge=0, lt=1)
    scale_window_s: float = Field(default=300.0, gt=0)
    event_retention: int = Field(default=100_000, ge=100)


class ExtenderSettings(_Section):
    """The scheduler's Kubernetes scheduler extender and controller (see ``mesh.toml`` and docs/kubernetes.md)."""

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(default=8888, ge=0, le=65535)
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    resource_name: str = "guardmesh.io/gpu-memory-mib"
    gang_wait_s: float = Field(default=20.0, gt=0, le=600)
    filtered_pods_kept: int = Field(default=10_000, ge=1)
    controller: bool = True
    resync_s: float = Field(default=30.0, gt=0)


class ParamServerSettings(_Section):
    """The parameter server (see ``mesh.toml``)."""

    shards: int = Field(default=1, ge=1, le=256)
    shard_index: int = Field(default=0, ge=0, le=255)
    checkpoint_locations: list[str] = Field(default_factory=lambda: ["checkpoints/replica-a", "checkpoints/replica-b"])
    min_replicas: int = Field(default=2, ge=1)
    step_id_window: int = Field(default=4096, ge=1)
    monitor_interval_s: float = Field(default=5.0, gt=0)
    throughput_window_s: float = Field(default=10.0, gt=0)
    throughput_drop_share: float = Field(default=0.5, gt=0, lt=1)
    stream_threshold_mib: float = Field(default=4.0, gt=0)
    heap_keep_mib: int = Field(default=1024, ge=0)


class ScorerSettings(_Section):
    """The scorer (see ``mesh.toml``)."""

    device: str = "auto"
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    max_queue_rows: int = Field(default=4096, ge=1)
    torch_threads: int = Field(default=0, ge=0, le=1024)
    live_window: int = Field(default=1000, ge=10)
    drift_every: int = Field(default=100, ge=1)
    min_labels: int = Field(default=200, ge=1)
    decision_log: int = Field(default=100_000, ge=100)
    registry_dir: str = "scorer-models"
    store_url: str = ""
    artefact_url: str = ""
    follow_poll_s: float = Field(default=0.25, gt=0, le=60)
    commit_ahead: bool = False


class SecuritySettings(_Section):
    """Transport security and authorization (see ``guardmesh/security.py`` and ``mesh.toml``)."""

    mode: Literal["plain", "tls", "mtls"] = "plain"
    certs_dir: str = "certs"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    client_role: Literal["trainer", "app", "admin"] = "admin"
    client_cert_file: str = ""
    client_key_file: str = ""
    authorization: bool = False
    roles_file: str = ""
    token: str = ""
    token_file: str = ""


class ABRouterSettings(_Section):
    """The A/B router (see ``mesh.toml``)."""

    db_path: str = "abrouter.db"
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    audit_interval_s: float = Field(default=60.0, ge=0)
    audit_min_sample: int = Field(default=1000, ge=1)
    audit_min_deviation: float = Field(default=0.01, ge=0, lt=1)
    guardrail_interval_s: float = Field(default=10.0, gt=0)
    scorer_deadline_s: float = Field(default=2.0, gt=0)
    shadow_queue: int = Field(default=1024, ge=1)
    shadow_workers: int = Field(default=2, ge=1, le=64)
    event_retention: int = Field(default=100_000, ge=100)
    store_url: str = ""
    config_resync_s: float = Field(default=5.0, gt=0, le=3600)
    tail_interval_s: float = Field(default=0.2, gt=0, le=60)
    export_url: str = "exposures"
    export_interval_s: float = Field(default=10.0, gt=0, le=86400)
    retention_s: float = Field(default=0.0, ge=0)
    sticky_cache_units: int = Field(default=1_000_000, ge=1)
    exposures_in_memory: bool = True
    unit_cache_units: int = Field(default=100_000, ge=1)

    @model_validator(mode="after")
    def _bounded_needs_the_table(self) -> ABRouterSettings:
        # Without per-unit columns, audits and analysis read the exposure table: there must be one.
        if not self.exposures_in_memory and not self.export_url:
            raise ValueError(
                "abrouter.exposures_in_memory = false needs abrouter.export_url (audits and analysis then read the "
                "exposure table); set abrouter.export_url or keep abrouter.exposures_in_memory = true"
            )
        return self


class MeshConfig(_Section):
    """The whole validated configuration."""

    mesh: MeshSettings = MeshSettings()
    services: dict[str, ServiceEndpoint] = Field(default_factory=dict)
    grpc: GrpcSettings = GrpcSettings()
    client: ClientSettings = ClientSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    tracing: TracingSettings = TracingSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    extender: ExtenderSettings = ExtenderSettings()
    paramserver: ParamServerSettings = ParamServerSettings()
    scorer: ScorerSettings = ScorerSettings()
    abrouter: ABRouterSettings = ABRouterSettings()
    security: SecuritySettings = SecuritySettings()

    def endpoint(self, service: str) -> ServiceEndpoint:
        """Static endpoint of ``service``; ConfigError if the mesh config does not list it."""
        try:
            return self.services[service]
        except KeyError:
            raise ConfigError(f"services.{service}: not configured (known: {sorted(self.services)})") from None

    def state_path(self, path: str) -> Path:
        """Resolve ``path`` against ``mesh.state_dir`` unless it is absolute."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.mesh.state_dir) / p

    def with_overrides(self, overrides: Mapping[str, Any]) -> MeshConfig:
        """Copy with dotted-key overrides applied, e.g. ``{"services.scheduler.port": 0}``."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            _set_path(data, dotted.split("."), value, dotted)
        return _validate(data)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_path(data: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _validate(data: dict[str, Any]) -> MeshConfig:
    try:
        return MeshConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problem = f"{where}: {err['msg']} (got {err.get('input')!r})"
            if err["type"] == "extra_forbidden":
                problem += _did_you_mean([str(p) for p in err["loc"]])
            problems.append(problem)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _known_keys(path: list[str]) -> list[str]:
    """The keys the section at ``path`` accepts (its model's fields; a service's under ``services.<name>``)."""
    model: Any = MeshConfig
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:  # a key of a mapping (services.<name>): its value type
            args = typing.get_args(model)
            model = args[-1] if args else None
            continue
        model = field.annotation
    if typing.get_origin(model) is dict:
        model = typing.get_args(model)[-1]
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _did_you_mean(loc: list[str]) -> str:
    """`` (did you mean 'section.key'?)`` for the valid key nearest to a mistyped one, else ``""``."""
    *section, key = loc
    close = difflib.get_close_matches(key, _known_keys(section), n=1, cutoff=0.6)
    return f" (did you mean '{'.'.join([*section, close[0]])}'?)" if close else ""


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None


def default_data() -> dict[str, Any]:
    """The embedded defaults as a plain dict."""
    text = resources.files("guardmesh").joinpath("mesh.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> MeshConfig:
    """Load and validate the mesh configuration; raise ConfigError naming the bad key."""
    env = os.environ if env is None else env
    data = default_data()
    file = path or env.get("GUARDMESH_CONFIG")
    if file:
        data = _deep_merge(data, _read_toml(Path(file)))
    for key, raw in sorted(env.items()):
        if key.startswith(ENV_PREFIX):
            parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
            if not all(parts):
                raise ConfigError(f"{key}: empty path segment")
            _set_path(data, parts, _parse_env_value(raw), key)
    if env.get("CONSUL_HTTP_ADDR"):
        data.setdefault("discovery", {})["mode"] = "consul"
        data["discovery"]["consul_addr"] = env["CONSUL_HTTP_ADDR"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        data.setdefault("tracing", {})["otlp_endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    return _validate(data)
