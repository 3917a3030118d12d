"""The one client factory: used by the SDK, by the services when they call each other, and by tests.

A channel gets its address from discovery, the mesh's message-size limits and keepalive, retries on
UNAVAILABLE only (gRPC's own service config), a default deadline on every call that names none, round-robin
over several instances, the tracing interceptor that propagates W3C trace context, TLS or mTLS credentials
and the role token, as ``[security]`` says.

The default deadline is set per call (:class:`DeadlineChannel`), not as the service config's ``timeout``:
with grpcio 1.85 that one is computed from gRPC core's cached clock and expired up to two seconds early
(a 3 s deadline after about 1 s), while a per-call ``timeout`` is exact.

Clients follow instances (:class:`FollowingChannel`): the instances are resolved again every
``client.reresolve_s`` and at once after an UNAVAILABLE, and the channel moves to the new set when it
changed (the old channel is closed only after its calls' deadlines, so no call in flight is cut). A standby
replica's UNAVAILABLE names the leader (``leader=host:port``, guardmesh/leadership.py): the channel then
moves to the leader and sends the unary call there again, which is safe because a standby executes
nothing. gRPC's own resolver cannot be replaced from Python, hence a channel that swaps channels.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from guardmesh.config import MeshConfig, load_config
from guardmesh.discovery import Endpoint, grpc_target, parse_endpoint, registry_for
from guardmesh.leadership import leader_in_message
from guardmesh.security import channel_credentials, token_interceptor
from guardmesh.tracing import client_tracing_interceptor

MIB = 1024 * 1024
log = logging.getLogger(__name__)
#: Standbys a unary call may be redirected past before its UNAVAILABLE reaches the caller.
MAX_LEADER_HOPS = 3


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


def open_channel(
    service: str,
    config: MeshConfig | None = None,
    *,
    address: str | None = None,
    addresses: list[str] | None = None,
) -> FollowingChannel:
    """Open a traced channel to ``service``: its instances from discovery, or the fixed ``address`` or
    ``addresses``; either way it follows a standby's pointer to the leader (see the module docstring)."""
    config = config or load_config()
    fixed = addresses or ([address] if address else None)
    if fixed:
        endpoints = [parse_endpoint(a) for a in fixed]
        resolve: Callable[[], list[Endpoint]] = lambda: endpoints  # noqa: E731
    else:
        registry = registry_for(config)
        resolve = lambda: registry.resolve(service)  # noqa: E731
    return FollowingChannel(service, config, resolve, reresolve=not fixed)


def _open_target(target: str, config: MeshConfig) -> DeadlineChannel:
    """One traced channel to a fixed gRPC target."""
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


class _FollowingCall:
    """A multi-callable bound to whichever channel its :class:`FollowingChannel` uses at call time; a unary
    request is sent again to the leader a standby names."""

    __slots__ = ("_args", "_bound", "_channel", "_kind", "_kwargs", "_method")

    def __init__(self, channel: FollowingChannel, kind: str, method: str, args: Any, kwargs: Any) -> None:
        self._channel = channel
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._bound: tuple[DeadlineChannel, Any] | None = None
        self._current()  # bound now, as a plain stub's calls are

    def _current(self) -> Any:
        if self._channel.closed:  # as gRPC says it (and grpcio crashes on a call made on a closed channel)
            raise ValueError("Cannot invoke RPC on closed channel!")
        inner = self._channel.current
        bound = self._bound
        if bound is None or bound[0] is not inner:
            bound = (inner, getattr(inner, self._kind)(self._method, *self._args, **self._kwargs))
            self._bound = bound
        return bound[1]

    def _follow(self, call: Callable[[Any], Any]) -> Any:
        for hop in range(MAX_LEADER_HOPS + 1):
            try:
                return call(self._current())
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise
                moved = self._channel.unavailable(err.details() or "")
                if not moved or hop == MAX_LEADER_HOPS:
                    raise
        raise AssertionError("unreachable")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._kind != "unary_unary":  # a stream's request iterator cannot be sent twice
            return self._current()(*args, **kwargs)
        return self._follow(lambda mc: mc(*args, **kwargs))

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        """As the wrapped multi-callable's ``with_call``."""
        if self._kind != "unary_unary":
            return self._current().with_call(*args, **kwargs)
        return self._follow(lambda mc: mc.with_call(*args, **kwargs))

    def future(self, *args: Any, **kwargs: Any) -> Any:
        """As the wrapped multi-callable's ``future`` (not redirected: its error arrives later)."""
        return self._current().future(*args, **kwargs)


class FollowingChannel(grpc.Channel):
    """A channel to the current instances of a service (see the module docstring).

    ``resolve`` returns the instances; with ``reresolve`` it is called again every ``client.reresolve_s``
    and soon after an UNAVAILABLE without a leader named. :attr:`target` is the gRPC target in use.
    """

    def __init__(
        self, service: str, config: MeshConfig, resolve: Callable[[], list[Endpoint]], *, reresolve: bool
    ) -> None:
        self.service = service
        self.config = config
        self.deadline_s = config.client.deadline_s
        self._resolve = resolve
        self._lock = threading.Lock()
        self._instances = resolve()
        #: The leader a standby named, while the channel is pinned to it ("" when not).
        self.leader = ""
        self.target = grpc_target(self._instances)
        self._inner = _open_target(self.target, config)
        self._retired: list[threading.Timer] = []
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        if reresolve:
            self._refresher = threading.Thread(target=self._refresh_loop, name=f"{service}-resolve", daemon=True)
            self._refresher.start()

    @property
    def current(self) -> DeadlineChannel:
        """The channel calls go to now."""
        return self._inner

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def _refresh_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.config.client.reresolve_s)
            self._wake.clear()
            if not self._closed.is_set():
                self.refresh()

    def refresh(self) -> None:
        """Resolve the instances again; move to them if they changed (a pinned leader still among them
        stays pinned). A failed resolution keeps the current channel."""
        try:
            found = self._resolve()
        except Exception as exc:  # discovery down, or no passing instance: keep what works
            log.warning("re-resolution failed", extra={"service": self.service, "error": str(exc)})
            return
        with self._lock:
            self._instances = found
            if self.leader and self.leader in {e.address for e in found}:
                return
            self.leader = ""
            self._switch(grpc_target(found))

    def unavailable(self, message: str) -> bool:
        """A call ended UNAVAILABLE with ``message``. Follow the leader it names (True: a unary call may be
        sent again, the standby executed nothing); otherwise unpin and re-resolve soon (False)."""
        leader = leader_in_message(message)
        with self._lock:
            if leader:
                self.leader = leader
                return self._switch(leader)
            if self.leader:  # the leader itself is gone: back to every instance until one names the next
                self.leader = ""
                self._switch(grpc_target(self._instances))
        self._wake.set()
        return False

    def _switch(self, target: str) -> bool:
        """Move new calls to ``target`` (under the lock); the old channel is closed once its calls' deadlines
        have passed. False if already there."""
        if target == self.target or self._closed.is_set():
            return False
        old, self._inner, self.target = self._inner, _open_target(target, self.config), target
        log.info("following", extra={"service": self.service, "target": target})
        timer = threading.Timer(self.deadline_s + 1.0, old.close)
        timer.daemon = True
        timer.start()
        self._retired.append(timer)
        return True

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        """As ``grpc.Channel.subscribe`` (on the channel in use now)."""
        self._inner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        """As ``grpc.Channel.unsubscribe``."""
        self._inner.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.unary_unary``: default deadline, follows the leader."""
        return _FollowingCall(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.unary_stream``, on the channel in use when called."""
        return _FollowingCall(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.stream_unary``, on the channel in use when called."""
        return _FollowingCall(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """As ``grpc.Channel.stream_stream``, on the channel in use when called."""
        return _FollowingCall(self, "stream_stream", method, args, kwargs)

    def close(self) -> None:
        """Stop re-resolving and close every channel this one opened."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            for timer in self._retired:
                timer.cancel()
                timer.function()  # type: ignore[attr-defined]  # close the retired channel now
            self._retired.clear()
            self._inner.close()

    def __enter__(self) -> FollowingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
