"""Domain errors and their one mapping to gRPC status codes.

Service cores raise these (they import no gRPC); the runtime's interceptor turns them into statuses, so a
bad field always reaches the caller as INVALID_ARGUMENT with a message naming the field and the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import status_pb2
from grpc_status import rpc_status

from guardmesh.handlers import Behaviour, BehaviourInterceptor, is_async

log = logging.getLogger(__name__)


class GuardmeshError(Exception):
    """Base of the domain errors; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, details: list[message.Message] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidArgument(GuardmeshError):
    """A request field breaks its rule. The message is ``"<field>: <rule>"``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, rule: str, *, details: list[message.Message] | None = None) -> None:
        super().__init__(f"{field}: {rule}", details=details)
        self.field = field
        self.rule = rule


class NotFound(GuardmeshError):
    """The named entity does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GuardmeshError):
    """An entity with that id exists with a different definition."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GuardmeshError):
    """The system is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(GuardmeshError):
    """The caller is authenticated but may not do this (another principal's job, a role not allowed)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Aborted(GuardmeshError):
    """A concurrency conflict; the caller should re-read and retry."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(GuardmeshError):
    """A queue or quota is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GuardmeshError):
    """The service is starting or draining."""

    code = grpc.StatusCode.UNAVAILABLE


#: Longest status message sent, in UTF-8 bytes: a message quoting a huge input must not push the status past
#: the client's metadata limit (which would replace the real status by RESOURCE_EXHAUSTED).
MAX_MESSAGE_BYTES = 1024


def clip_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to ``limit`` UTF-8 bytes at a character boundary, saying that it was cut."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    return raw[:limit].decode("utf-8", "ignore") + f"... ({len(raw)} bytes, truncated)"


def to_status(err: GuardmeshError) -> grpc.Status:
    """Build a rich ``grpc.Status`` (google.rpc.Status with packed details) from a domain error."""
    details = []
    for d in err.details:
        packed = any_pb2.Any()
        packed.Pack(d)
        details.append(packed)
    message = clip_message(err.message)
    return rpc_status.to_status(status_pb2.Status(code=err.code.value[0], message=message, details=details))


def _abort(context: grpc.ServicerContext, err: GuardmeshError) -> None:
    context.abort_with_status(to_status(err))


def _wrap_unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(request, context)
        except GuardmeshError as err:
            _abort(context, err)

    return handler


def _wrap_stream(
    fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(request, context)
        except GuardmeshError as err:
            _abort(context, err)

    return handler


def _wrap_unary_async(fn: Behaviour) -> Behaviour:
    async def handler(request: Any, context: Any) -> Any:
        try:
            return await fn(request, context)
        except GuardmeshError as err:
            await context.abort_with_status(to_status(err))

    return handler


def _wrap_stream_async(fn: Behaviour) -> Behaviour:
    async def handler(request: Any, context: Any) -> Any:
        try:
            async for response in fn(request, context):
                yield response
        except GuardmeshError as err:
            await context.abort_with_status(to_status(err))

    return handler


class DomainErrorInterceptor(BehaviourInterceptor):
    """Turn GuardmeshError raised by a servicer (unary or streaming, sync or async) into its gRPC status."""

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """Wrap the behaviour of the resolved handler."""
        if is_async(behaviour):
            return _wrap_stream_async(behaviour) if streaming else _wrap_unary_async(behaviour)
        return _wrap_stream(behaviour) if streaming else _wrap_unary(behaviour)


def status_details(err: grpc.RpcError, message_type: type[message.Message]) -> list[message.Message]:
    """Client side: unpack the details of ``message_type`` carried by a rich error status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out: list[message.Message] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(message_type.DESCRIPTOR):
            msg = message_type()
            detail.Unpack(msg)
            out.append(msg)
    return out
