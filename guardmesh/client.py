"""The one client factory: used by the SDK, by the services when they call each other, and by tests.

A channel gets its address from discovery, the mesh's message-size limits and keepalive, a default
deadline and retries on UNAVAILABLE only (both through gRPC's own service config), round-robin over
several instances, the tracing interceptor that propagates W3C trace context, TLS or mTLS credentials and
the role token, as ``[security]`` says.
"""

from __future__ import annotations

import json

import grpc
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from guardmesh.config import MeshConfig, load_config
from guardmesh.discovery import grpc_target, registry_for
from guardmesh.security import channel_credentials, token_interceptor
from guardmesh.tracing import client_tracing_interceptor

MIB = 1024 * 1024


def channel_options(config: MeshConfig) -> list[tuple[str, object]]:
    """Options shared by servers and clients: message limits and keepalive."""
    limit = config.grpc.max_message_mib * MIB
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", int(config.grpc.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.grpc.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def service_config(config: MeshConfig) -> str:
    """gRPC service config: default deadline for every method, retries on UNAVAILABLE only."""
    c = config.client
    method: dict[str, object] = {"name": [{}], "timeout": f"{c.deadline_s:.3f}s"}
    if c.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": c.max_attempts,
            "initialBackoff": f"{c.initial_backoff_s:.3f}s",
            "maxBackoff": f"{c.max_backoff_s:.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method], "loadBalancingConfig": [{"round_robin": {}}]})


def open_channel(service: str, config: MeshConfig | None = None, *, address: str | None = None) -> grpc.Channel:
    """Open a traced channel to ``service`` (resolved through discovery unless ``address`` is given)."""
    config = config or load_config()
    target = address or grpc_target(registry_for(config).resolve(service))
    options = [
        *channel_options(config),
        ("grpc.enable_retries", 1),
        # Reconnect quickly after a server restart (gRPC's default backoff grows to 120 s between attempts).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.service_config", service_config(config)),
    ]
    credentials = channel_credentials(config)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    token = token_interceptor(config)
    if token is not None:
        channel = grpc.intercept_channel(channel, token)
    return intercept_channel(channel, client_tracing_interceptor())
