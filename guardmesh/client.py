"""The one client factory: used by the SDK, by the services when they call each other, and by tests.

A channel gets its address from discovery, the mesh's message-size limits and keepalive, retries on
UNAVAILABLE only (gRPC's own service config), a default deadline on every call that names none, round-robin
over several instances, the tracing interceptor that propagates W3C trace context, TLS or mTLS credentials
and the role token, as ``[security]`` says.

The default deadline is set per call (:class:`DeadlineChannel`), not as the service config's ``timeout``:
with grpcio 1.85 that one is computed from gRPC core's cached clock and expired up to two seconds early
(a 3 s deadline after about 1 s), while a per-call ``timeout`` is exact.
"""

from __future__ import annotations

import json
from typing import Any

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
    """gRPC service config: retries on UNAVAILABLE only, round-robin (the deadline is set per call)."""
    c = config.client
    method: dict[str, object] = {"name": [{}]}
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
    return DeadlineChannel(intercept_channel(channel, client_tracing_interceptor()), config.client.deadline_s)


class _WithDeadline:
    """A multi-callable whose calls get ``timeout=deadline_s`` unless they name one."""

    __slots__ = ("_deadline_s", "_inner")

    def __init__(self, inner: Any, deadline_s: float) -> None:
        self._inner = inner
        self._deadline_s = deadline_s

    def _kw(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) < 2 and kwargs.get("timeout") is None:  # (request, timeout, ...): none given
            kwargs["timeout"] = self._deadline_s
        return kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **self._kw(args, kwargs))

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        """As the wrapped multi-callable's ``with_call``."""
        return self._inner.with_call(*args, **self._kw(args, kwargs))

    def future(self, *args: Any, **kwargs: Any) -> Any:
        """As the wrapped multi-callable's ``future``."""
        return self._inner.future(*args, **self._kw(args, kwargs))


class DeadlineChannel(grpc.Channel):
    """A channel whose calls get a default deadline (``client.deadline_s``) unless they name one."""

    def __init__(self, channel: grpc.Channel, deadline_s: float) -> None:
        self._channel = channel
        self.deadline_s = deadline_s

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        """As ``grpc.Channel.subscribe``."""
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        """As ``grpc.Channel.unsubscribe``."""
        self._channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.unary_unary``, with the default deadline."""
        return _WithDeadline(self._channel.unary_unary(method, *args, **kwargs), self.deadline_s)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.unary_stream``, with the default deadline (it bounds the whole stream)."""
        return _WithDeadline(self._channel.unary_stream(method, *args, **kwargs), self.deadline_s)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.stream_unary``, with the default deadline."""
        return _WithDeadline(self._channel.stream_unary(method, *args, **kwargs), self.deadline_s)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.stream_stream``, with the default deadline (it bounds the whole stream)."""
        return _WithDeadline(self._channel.stream_stream(method, *args, **kwargs), self.deadline_s)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> DeadlineChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
