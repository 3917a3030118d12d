"""The protobuf wire format of tensor-carrying messages, read and written without copying the tensors.

The protobuf runtime (upb) copies a ``bytes`` field into its arena when it parses a message and again
into a Python ``bytes`` object when the field is read; serializing copies twice more. For a 4 MiB gradient
those copies cost more than gRPC's own transport of it. The parameter server's hot methods (Pull, Push,
PushPull and their streamed forms) therefore use this codec on both ends:

* :func:`decode` reads any valid encoding of a message (fields in any order, repeated scalars packed
  or not, repeated occurrences of a message field merged, unknown fields skipped) into a
  :class:`WireMessage`, whose ``bytes`` fields are ``memoryview`` slices of the received buffer: a tensor
  reaches numpy without a copy.
* :func:`named_tensor` and :func:`tensor_chunk` frame a tensor payload as an occurrence of a
  ``NamedTensor`` or ``TensorChunk`` field; ``b"".join`` of a small upb-serialized head and such frames is
  the whole message, the payload copied once. The data is placed 16-byte aligned in the message (the
  ``padding`` field, which readers ignore), so that a reader's kernels can use it in place.
* :func:`add_servicer` registers a servicer with this codec for the methods named, and upb for the rest.

The bytes on the wire are exactly the proto contract's, so any protobuf client or server interoperates
(the tests check both directions against upb). Only the Python representation differs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from guardmesh.errors import InvalidArgument

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
MAX_DEPTH = 100
#: Alignment of tensor data within messages framed here (``Tensor.padding``).
ALIGN = 16
_PADDING_KEY = bytes([15 << 3 | 2])
_MASK64 = (1 << 64) - 1
_F = FieldDescriptor
_VARINT_TYPES = {
    _F.TYPE_INT64,
    _F.TYPE_UINT64,
    _F.TYPE_INT32,
    _F.TYPE_BOOL,
    _F.TYPE_UINT32,
    _F.TYPE_ENUM,
    _F.TYPE_SINT32,
    _F.TYPE_SINT64,
}
_FIXED = {
    _F.TYPE_DOUBLE: (I64, struct.Struct("<d")),
    _F.TYPE_FIXED64: (I64, struct.Struct("<Q")),
    _F.TYPE_SFIXED64: (I64, struct.Struct("<q")),
    _F.TYPE_FLOAT: (I32, struct.Struct("<f")),
    _F.TYPE_FIXED32: (I32, struct.Struct("<I")),
    _F.TYPE_SFIXED32: (I32, struct.Struct("<i")),
}


class WireError(ValueError):
    """The bytes are not a valid encoding of the message; ``path`` names the field where it broke."""

    def __init__(self, path: str, rule: str) -> None:
        super().__init__(f"{path or 'message'}: {rule}")
        self.path = path or "message"
        self.rule = rule


# -- encoding ----------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative integer (negative int64 values take their 64-bit two's complement)."""
    n &= _MASK64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    """A field's tag: number and wire type."""
    return varint(number << 3 | wire_type)


def _aligned_head(start: int, head: bytes, data_number: int, size: int, extra: int = 0) -> bytes:
    """``head`` (fields before the data) and the data's tag and length, with a ``padding`` field (number 15,
    ignored by readers) between them when needed so that the data starts at a multiple of ``ALIGN`` when the
    result is written at ``start``; ``extra`` (a multiple of ``ALIGN``) pads further."""
    data_key = key(data_number, LEN) + varint(size)
    total = -(start + len(head) + len(data_key)) % ALIGN + extra
    if total == 0:
        return head + data_key
    if total < 2:  # the padding field takes 2 bytes at least
        total += ALIGN
    return head + _PADDING_KEY + varint(total - 2) + bytes(total - 2) + data_key


def _aligned_tensor_head(start: int, dtype: int, dims: bytes, size: int, extra: int) -> bytes:
    """A ``Tensor``'s dtype, shape and data prefix, its data aligned (see :func:`_aligned_head`)."""
    head = key(1, VARINT) + varint(dtype) if dtype else b""
    if dims:
        head += key(2, LEN) + varint(len(dims)) + dims
    return _aligned_head(start, head, 3, size, extra)


def named_tensor(number: int, name: str, dtype: int, shape: Iterable[int], payload: Any, start: int = 0) -> list[Any]:
    """One occurrence of a ``NamedTensor`` field ``number`` (name, ``Tensor{dtype, shape, data}``).

    Returns the parts to join: a small head and ``payload`` itself (any C-contiguous buffer: an ndarray,
    a memoryview), so that the join is the payload's only copy. ``start`` is where the frame begins in the
    message: the data is padded (``Tensor.padding``) to start ``ALIGN``-aligned there.
    """
    return [named_tensor_head(number, name, dtype, shape, memoryview(payload).nbytes, start), payload]


def named_tensor_head(number: int, name: str, dtype: int, shape: Iterable[int], size: int, start: int = 0) -> bytes:
    """The bytes of a ``NamedTensor`` field ``number`` that come before its ``size`` bytes of data, placed so
    that the data starts ``ALIGN``-aligned when the frame begins at ``start`` (see :func:`named_tensor`)."""
    name_b = name.encode()
    dims = b"".join(varint(d) for d in shape)
    name_field = key(1, LEN) + varint(len(name_b)) + name_b
    outer_key, tensor_key = key(number, LEN), key(2, LEN)
    # The padding depends on the two length prefixes before the data, whose sizes depend on the padding.
    # Guess their sizes and build; when a prefix crossed a varint size boundary, rebuild with the sizes it
    # took, and if that flips back (a length right at a boundary), pad ALIGN bytes more to move off it.
    for extra in (0, ALIGN, 2 * ALIGN, 3 * ALIGN):
        outer_n = tensor_n = len(varint(size))
        for _ in range(3):
            at = start + len(outer_key) + outer_n + len(name_field) + len(tensor_key) + tensor_n
            head = _aligned_tensor_head(at, dtype, dims, size, extra)
            tensor_len = varint(len(head) + size)
            inner = name_field + tensor_key + tensor_len + head
            outer_len = varint(len(inner) + size)
            if (len(outer_len), len(tensor_len)) == (outer_n, tensor_n):
                return outer_key + outer_len + inner
            outer_n, tensor_n = len(outer_len), len(tensor_len)
    raise AssertionError("tensor frame did not settle")


def tensor_chunk(number: int, tensor: int, offset: int, payload: Any) -> list[Any]:
    """A message made of one ``TensorChunk`` field ``number`` (tensor index, byte offset, data), as parts to
    join; the data lands ``ALIGN``-aligned in the message (``TensorChunk.padding``)."""
    size = memoryview(payload).nbytes
    head = (key(1, VARINT) + varint(tensor) if tensor else b"") + (key(2, VARINT) + varint(offset) if offset else b"")
    outer_key = key(number, LEN)
    for extra in (0, ALIGN, 2 * ALIGN, 3 * ALIGN):  # as in named_tensor
        outer_n = len(varint(size))
        for _ in range(3):
            inner = _aligned_head(len(outer_key) + outer_n, head, 3, size, extra)
            outer_len = varint(len(inner) + size)
            if len(outer_len) == outer_n:
                return [outer_key + outer_len + inner, payload]
            outer_n = len(outer_len)
    raise AssertionError("chunk frame did not settle")


class Frames:
    """A message being framed: a head (upb-serialized, no payloads) and tensor frames, joined once."""

    def __init__(self, head: bytes = b"") -> None:
        self.parts: list[Any] = [head]
        self.size = len(head)

    def named_tensor(self, number: int, name: str, dtype: int, shape: Iterable[int], payload: Any) -> None:
        """Append a ``NamedTensor`` occurrence whose data lands aligned (see :func:`named_tensor`)."""
        frame = named_tensor(number, name, dtype, shape, payload, self.size)
        self.parts += frame
        self.size += len(frame[0]) + memoryview(payload).nbytes

    def join(self) -> bytes:
        """The message's bytes: the payloads' one copy."""
        return b"".join(self.parts)


def serialize(message: Message | bytes) -> bytes:
    """gRPC serializer of a method whose handler answers either a message or already-framed bytes."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# -- decoding ----------------------------------------------------------------------------------------------


class _Field:
    __slots__ = ("default", "fixed", "message", "name", "oneof", "packable", "repeated", "type")

    def __init__(self, f: FieldDescriptor) -> None:
        self.name = f.name
        self.type = f.type
        self.repeated = f.is_repeated
        self.packable = f.is_repeated and f.type not in (_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE, _F.TYPE_GROUP)
        self.message: _Layout | None = None
        self.oneof = f.containing_oneof.name if f.containing_oneof is not None else None
        self.default = f.default_value
        self.fixed = _FIXED.get(f.type)


class _Layout:
    """A message descriptor's fields by number and by name, built once."""

    _cache: dict[str, _Layout] = {}

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        self.by_number: dict[int, _Field] = {}
        self.by_name: dict[str, _Field] = {}

    @classmethod
    def of(cls, descriptor: Descriptor) -> _Layout:
        layout = cls._cache.get(descriptor.full_name)
        if layout is None:
            layout = cls._cache[descriptor.full_name] = cls(descriptor)
            for f in descriptor.fields:
                field = _Field(f)
                layout.by_number[f.number] = layout.by_name[f.name] = field
            for f in descriptor.fields:  # after registration: recursive messages reuse the layout
                if f.type == _F.TYPE_MESSAGE:
                    layout.by_number[f.number].message = cls.of(f.message_type)
        return layout


class WireMessage:
    """A decoded message: fields read as attributes, ``bytes`` fields as ``memoryview`` slices (no copy).

    Absent fields read as their defaults, as on a protobuf message: ``[]`` for repeated fields, an empty
    message for message fields, zero values otherwise. ``WhichOneof`` and ``HasField`` behave as protobuf's.
    """

    __slots__ = ("_layout", "_oneofs", "_values")

    def __init__(self, layout: _Layout) -> None:
        self._layout = layout
        self._values: dict[str, Any] = {}
        self._oneofs: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            pass
        field = self._layout.by_name.get(name)
        if field is None:
            raise AttributeError(f"{self._layout.descriptor.full_name} has no field {name!r}")
        if field.repeated:
            return []
        if field.message is not None:
            return WireMessage(field.message)
        return field.default

    def WhichOneof(self, oneof: str) -> str | None:
        """Name of the member of ``oneof`` that is set, or None."""
        if oneof not in self._layout.descriptor.oneofs_by_name:
            raise ValueError(f"{self._layout.descriptor.full_name} has no oneof {oneof!r}")
        return self._oneofs.get(oneof)

    def HasField(self, name: str) -> bool:
        """Whether a message field (or a oneof member) is present."""
        return name in self._values

    def to_message(self, cls: type[Message]) -> Message:
        """The protobuf message these fields make (copies the bytes fields: for tests and cold paths)."""
        msg = cls()
        _fill(msg, self)
        return msg

    def __repr__(self) -> str:
        shown = {k: (f"<{len(v)} bytes>" if isinstance(v, memoryview) else v) for k, v in self._values.items()}
        return f"WireMessage({self._layout.descriptor.full_name}, {shown})"


def _fill(msg: Message, wire: WireMessage) -> None:
    for name, value in wire._values.items():
        field = wire._layout.by_name[name]
        if field.message is not None:
            if field.repeated:
                container = getattr(msg, name)
                for item in value:
                    _fill(container.add(), item)
            else:
                _fill(getattr(msg, name), value)
                if not value._values:
                    getattr(msg, name).SetInParent()  # present though empty, as parsed
        elif field.repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, bytes(value) if field.type == _F.TYPE_BYTES else value)


def _varint_at(buf: bytes, pos: int, end: int, path: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError(path, "truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise WireError(path, "varint longer than 10 bytes")


def _tag_at(buf: bytes, pos: int, end: int, path: str) -> tuple[int, int]:
    """A field tag: a varint of at most 5 bytes and 32 bits, as protobuf requires."""
    tag, stop = _varint_at(buf, pos, end, path)
    if stop - pos > 5 or tag > 0xFFFFFFFF:
        raise WireError(path, "field tag longer than 32 bits")
    return tag, stop


def _scalar(ftype: int, raw: int) -> int | bool:
    """A varint's value as the field type reads it (two's complement, 32-bit truncation, zigzag)."""
    if ftype in (_F.TYPE_INT64, _F.TYPE_INT32, _F.TYPE_ENUM):
        if ftype != _F.TYPE_INT64:
            raw &= 0xFFFFFFFF
            return raw - (1 << 32) if raw >= 1 << 31 else raw
        return raw - (1 << 64) if raw >= 1 << 63 else raw
    if ftype == _F.TYPE_UINT32:
        return raw & 0xFFFFFFFF
    if ftype == _F.TYPE_BOOL:
        return raw != 0
    if ftype == _F.TYPE_SINT32:
        raw &= 0xFFFFFFFF
        return (raw >> 1) ^ -(raw & 1)
    if ftype == _F.TYPE_SINT64:
        return (raw >> 1) ^ -(raw & 1)
    return raw  # uint64


def _skip(buf: bytes, pos: int, end: int, wire_type: int, number: int, path: str, depth: int) -> int:
    """Position after an unknown field's value (groups skipped to their matching end)."""
    if wire_type == VARINT:
        return _varint_at(buf, pos, end, path)[1]
    if wire_type == I64:
        pos += 8
    elif wire_type == I32:
        pos += 4
    elif wire_type == LEN:
        n, pos = _varint_at(buf, pos, end, path)
        pos += n
    elif wire_type == SGROUP:
        if depth >= MAX_DEPTH:
            raise WireError(path, f"nested deeper than {MAX_DEPTH}")
        while True:
            tag, pos = _tag_at(buf, pos, end, path)
            if tag & 7 == EGROUP:
                if tag >> 3 != number:
                    raise WireError(path, "group end does not match its start")
                return pos
            pos = _skip(buf, pos, end, tag & 7, tag >> 3, path, depth + 1)
    else:
        raise WireError(path, f"invalid wire type {wire_type}")
    if pos > end:
        raise WireError(path, "field runs past the end of the message")
    return pos


def _decode_into(msg: WireMessage, buf: bytes, view: memoryview, pos: int, end: int, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError(path, f"nested deeper than {MAX_DEPTH}")
    layout = msg._layout
    values = msg._values
    while pos < end:
        tag, pos = _tag_at(buf, pos, end, path)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireError(path, "field number 0")
        field = layout.by_number.get(number)
        if field is None:
            pos = _skip(buf, pos, end, wire_type, number, path, depth)
            continue
        here = f"{path}.{field.name}" if path else field.name
        ftype = field.type
        value: Any
        if wire_type == LEN and (ftype in (_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE) or field.packable):
            n, pos = _varint_at(buf, pos, end, here)
            stop = pos + n
            if stop > end:
                raise WireError(here, "length runs past the end of the message")
            if ftype == _F.TYPE_BYTES:
                value = view[pos:stop]
            elif ftype == _F.TYPE_STRING:
                try:
                    value = str(view[pos:stop], "utf-8")
                except UnicodeDecodeError:
                    raise WireError(here, "strings must be valid UTF-8") from None
            elif ftype == _F.TYPE_MESSAGE:
                assert field.message is not None
                existing = values.get(field.name) if not field.repeated else None
                value = existing if existing is not None else WireMessage(field.message)
                _decode_into(value, buf, view, pos, stop, here, depth + 1)
            else:  # a packed run of scalars
                items = values.setdefault(field.name, [])
                p = pos
                if field.fixed is not None:
                    fmt = field.fixed[1]
                    if (stop - p) % fmt.size:
                        raise WireError(here, "packed fixed-width values do not fill the length")
                    items.extend(v[0] for v in fmt.iter_unpack(view[p:stop]))
                else:
                    while p < stop:
                        raw, p = _varint_at(buf, p, stop, here)
                        items.append(_scalar(ftype, raw))
                pos = stop
                continue
            pos = stop
        elif wire_type == VARINT and ftype in _VARINT_TYPES:
            raw, pos = _varint_at(buf, pos, end, here)
            value = _scalar(ftype, raw)
        elif field.fixed is not None and wire_type == field.fixed[0]:
            fmt = field.fixed[1]
            if pos + fmt.size > end:
                raise WireError(here, "truncated fixed-width value")
            value = fmt.unpack_from(buf, pos)[0]
            pos += fmt.size
        else:  # a known number with another wire type: protobuf keeps it as an unknown field
            pos = _skip(buf, pos, end, wire_type, number, path, depth)
            continue
        if field.repeated:
            values.setdefault(field.name, []).append(value)
            continue
        values[field.name] = value
        if field.oneof is not None:
            previous = msg._oneofs.get(field.oneof)
            if previous is not None and previous != field.name:
                values.pop(previous, None)
            msg._oneofs[field.oneof] = field.name
    if pos != end:
        raise WireError(path, "field runs past the end of the message")


def decode(descriptor: Descriptor, data: bytes) -> WireMessage:
    """Decode ``data`` as the message ``descriptor`` describes; ``bytes`` fields stay views of ``data``.

    Raises :class:`WireError` on bytes that protobuf would refuse too (truncation, bad UTF-8, bad wire types,
    nesting deeper than 100).
    """
    buf = bytes(data) if not isinstance(data, bytes) else data
    msg = WireMessage(_Layout.of(descriptor))
    _decode_into(msg, buf, memoryview(buf), 0, len(buf), "", 0)
    return msg


class Malformed:
    """What :func:`deserializer` hands the handler for bytes that do not decode (see :func:`accept`)."""

    __slots__ = ("error",)

    def __init__(self, error: WireError) -> None:
        self.error = error


def deserializer(message_cls: type[Message]) -> Callable[[bytes], WireMessage | Malformed]:
    """gRPC request deserializer decoding into a :class:`WireMessage`.

    It never raises (gRPC would answer a bare INTERNAL): malformed bytes reach the handler as
    :class:`Malformed`, which :func:`accept` turns into INVALID_ARGUMENT naming the field.
    """
    descriptor = message_cls.DESCRIPTOR

    def parse(data: bytes) -> WireMessage | Malformed:
        try:
            return decode(descriptor, data)
        except WireError as err:
            return Malformed(err)

    return parse


def accept(request: WireMessage | Malformed) -> WireMessage:
    """The decoded request, or INVALID_ARGUMENT naming where its bytes broke the wire format."""
    if isinstance(request, Malformed):
        raise InvalidArgument(request.error.path, f"malformed protobuf: {request.error.rule}")
    return request


def accept_all(requests: Iterator[WireMessage | Malformed]) -> Iterator[WireMessage]:
    """:func:`accept` over a request stream."""
    for request in requests:
        yield accept(request)


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    server: grpc.Server,
    service: ServiceDescriptor,
    servicer: object,
    *,
    requests: dict[str, type[Message]] | None = None,
    parsers: dict[str, Callable[[bytes], Any]] | None = None,
    framed_responses: Iterable[str] = (),
) -> None:
    """Register ``servicer``'s methods for ``service``, as the generated ``add_*_to_server`` does, except that

    the methods named in ``requests`` receive their requests through :func:`deserializer` (decoded without
    copying bytes fields), those named in ``parsers`` through their own parser of the request's bytes, and the
    methods in ``framed_responses`` may answer already-encoded ``bytes``.
    """
    requests = requests or {}
    parsers = parsers or {}
    framed = set(framed_responses)
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=parsers.get(method.name)
            or (deserializer(requests[method.name]) if method.name in requests else request_cls.FromString),
            response_serializer=serialize if method.name in framed else response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
