"""Bad input at scale against every RPC of every service, over real gRPC.

The four services (scheduler, paramserver, scorer with the Open Inference Protocol, abrouter) run as real
servers on port 0 with a 4 MiB message limit. Every RPC is found through the descriptors of the proto
services each server announces (``ServiceDefinition.service_names``), so a new RPC is fuzzed without
touching this file, and is called generically (``channel.unary_unary`` & co. on serialized bytes) with:

* ``gen``: messages built by a hypothesis strategy derived from the request descriptor (recursive, bounded
  depth), biased to hostile values: NaN, +-Inf, extreme and negative numbers, huge shapes, empty, long and
  ~100 KB strings, unicode (lone surrogates are refused by protobuf on the client: counted and skipped),
  repeated fields with thousands of elements, random bytes, unknown enum numbers, and valid-looking ids
  (existing jobs, models, experiments) so validation deeper than "not found" runs;
* ``mut``: valid requests built by a setup step, with one to three fields replaced by hostile values (and,
  for client streams, messages dropped, duplicated or reordered);
* ``raw``: random or corrupted bytes as the serialized request (grpc itself answers INTERNAL "Exception
  deserializing request" to bytes that do not parse: accepted, and counted apart);
* ``corpus``: hand-written hostile requests per service, run first, so that the bug classes found so far
  (UNKNOWN on huge shapes, NaN in a Struct, deep JSON, an empty inference batch, huge bootstrap or layer
  sizes; state left behind by refused calls) stay covered whatever hypothesis draws.

Every answer must be OK or a proper status with a message: never UNKNOWN (an unhandled exception in a
servicer), never INTERNAL for a well-formed request, never DEADLINE_EXCEEDED for a call that should be
quick (only streams that wait by design may run into their short deadline). After every call the
observable state (read RPCs) is compared with the state before it: a rejected call, and any call of a
read-only RPC, must leave it unchanged. After the run each server still answers SERVING. A last test
checks the message-size limit on a unary RPC of every service and on a client stream.

``pytest -s tests/test_fuzz.py`` prints the number of calls per service and the status codes seen by source
(``FUZZ_VERBOSE=1``: by RPC too). Hypothesis runs derandomized (no shrinking, no example database), so a run
is repeatable; a failure lists each distinct problem once with the request that showed it.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig
from guardmesh.runtime import KNOWN_SERVICES, RunningService, load_definition, start_service
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as ppb
from guardmesh.v1 import paramserver_pb2_grpc as ppb_grpc
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as cpb
from guardmesh.v1 import scorer_pb2_grpc as cpb_grpc
from inference import grpc_predict_v2_pb2 as opb

from .conftest import make_config, node_pb

MAX_MESSAGE_MIB = 4
#: Generated requests above this size are skipped: the message limit is tested on its own at the end.
PAYLOAD_CAP = 3 * 1024 * 1024
#: Examples per RPC and source (hypothesis, derandomized): 52 RPCs, so ~1,700 calls in all with the corpus.
EXAMPLES = {"gen": 10, "mut": 16, "raw": 6}
CALL_DEADLINE_S = 10.0
#: Deadline of calls that wait by design (watch streams, a pull for a future version).
WAIT_DEADLINE_S = 0.1
#: Calls slower than this that still answered are reported as too slow for bad input.
SLOW_CALL_S = 8.0
STREAM_MESSAGE_LIMIT = 10_000

G = grpc.StatusCode
#: Proper statuses for a well-formed request.
PROPER = {
    G.OK,
    G.INVALID_ARGUMENT,
    G.NOT_FOUND,
    G.ALREADY_EXISTS,
    G.FAILED_PRECONDITION,
    G.ABORTED,
    G.OUT_OF_RANGE,
    G.RESOURCE_EXHAUSTED,
}

# -- hostile values ------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
FLOATS = [
    NAN,
    INF,
    -INF,
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-9,
    5e-324,
    1e-45,
    3.5e38,
    1e308,
    -1e308,
    1e9,
    -1e9,
    2.0,
    0.999999,
]
INT32 = [0, 1, -1, 2, 3, 63, 64, 65, 1000, 1001, 4096, 4097, 65536, 65537, 1_000_000, 2**31 - 1, -(2**31)]
INT64 = [*INT32, 86_400, 86_401, 1_048_576, 1_048_577, 67_108_864, 2**32, 2**34, 2**40, 2**53 + 1, 2**63 - 1, -(2**63)]
UINT32 = [0, 1, 2, 4096, 2**31, 2**32 - 1]
UINT64 = [*UINT32, 2**32, 2**63, 2**64 - 1]
STRINGS = [
    "",
    " ",
    "a",
    "0",
    "-1",
    "NaN",
    "inf",
    "\x00",
    "a\x00b",
    "\ud800",  # lone surrogates: protobuf refuses them on the client (counted, skipped)
    "x\udfffy",
    "ü",
    "日本😀",
    "\u202e\u0301\ufeff",
    "../../etc/passwd",
    "'; DROP TABLE experiments; --",
    "%s%n{0}",
    "a" * 63,
    "a" * 64,
    "a" * 65,
    "a" * 128,
    "a" * 129,
    "a" * 253,
    "a" * 254,
    "a" * 256,
    "a" * 257,
    "a" * 512,
    "a" * 513,
    "x" * 100_000,
    "{}",
    "[]",
    "null",
    '{"country": "US"}',
    '{"country": {"$in": ["US", "CA"]}}',
    '{"age": {"$gt": NaN}}',
    '{"name": {"$regex": "("}}',
    '{"$or": 5}',
    '{"a": {"$elemMatch": {"$size": -1}}}',
    "[" * 50_000 + "]" * 50_000,
    '{"a":' * 20_000 + "1" + "}" * 20_000,
]
BYTES = [b"", b"\x00", b"\xff" * 7, b"\x80" * 3, bytes(range(256)), b"\x00" * 100_000]
#: Repeated fields: mostly short, sometimes thousands of copies of one element.
SMALL_COUNTS = [0, 0, 1, 1, 1, 2, 3, 5]
MANY_COUNTS = [1000, 1001, 4096, 4097, 10_000, 100_001]


@dataclass(repr=False)
class Seeds:
    """Valid-looking values a service knows (ids, names, payloads), mixed into generated fields."""

    strings: list[str] = field(default_factory=list)
    bytes_: list[bytes] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Seeds({len(self.strings)} strings, {len(self.bytes_)} byte strings)"


@dataclass(repr=False)
class Setup:
    """What a service's setup step leaves: seeds, valid requests by RPC, and the hostile corpus.

    The corpus holds hand-written hostile requests (RPC name, request messages) that run in order before the
    random fuzz, through the same checks: the bug classes found so far stay covered whatever hypothesis draws.
    """

    seeds: Seeds
    templates: dict[str, list[list[Message]]]
    corpus: list[tuple[str, list[Message]]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Setup({self.seeds!r}, templates for {len(self.templates)} RPCs, {len(self.corpus)} corpus cases)"


def message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


_SCALARS: dict[tuple[str, int], st.SearchStrategy[Any]] = {}
_MESSAGES: dict[tuple[str, int, int], st.SearchStrategy[Message]] = {}


def scalar_strategy(f: FieldDescriptor, seeds: Seeds) -> st.SearchStrategy[Any]:
    """Hostile values for one scalar field, by type (cached: strategies are built once)."""
    key = (f.full_name, id(seeds))
    cached = _SCALARS.get(key)
    if cached is None:
        cached = _SCALARS[key] = _scalar_strategy(f, seeds)
    return cached


def _scalar_strategy(f: FieldDescriptor, seeds: Seeds) -> st.SearchStrategy[Any]:
    t = f.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.sampled_from(INT32), st.integers(-(2**31), 2**31 - 1), st.integers(-3, 70))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64), st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.sampled_from(UINT32), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from(UINT64), st.integers(0, 2**64 - 1))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values]
        return st.sampled_from([*numbers, *numbers, -1, len(numbers) + 7, 2**31 - 1])
    if t == FieldDescriptor.TYPE_STRING:
        options = [st.sampled_from(STRINGS), st.text(max_size=24)]
        if seeds.strings:
            options += [st.sampled_from(seeds.strings)] * 2
        return st.one_of(*options)
    if t == FieldDescriptor.TYPE_BYTES:
        options = [st.sampled_from(BYTES), st.binary(max_size=64)]
        if seeds.bytes_:
            options += [st.sampled_from(seeds.bytes_)] * 2
        return st.one_of(*options)
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


MAX_DEPTH = 5
#: Values protobuf refused to set on the client, by field type (the field is left unset).
REFUSED: Counter[int] = Counter()


def message_strategy(desc: Descriptor, seeds: Seeds, depth: int = 0) -> st.SearchStrategy[Message]:
    """A message of type ``desc`` with a random subset of fields set to hostile values (cached)."""
    key = (desc.full_name, id(seeds), depth)
    cached = _MESSAGES.get(key)
    if cached is None:
        cached = _MESSAGES[key] = _message_strategy(desc, seeds, depth)
    return cached


def _message_strategy(desc: Descriptor, seeds: Seeds, depth: int) -> st.SearchStrategy[Message]:

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = message_class(desc)()
        chance = 65 if depth == 0 else 45
        for f in desc.fields:
            if draw(st.integers(0, 99)) >= chance:
                continue
            set_field(draw, msg, f, seeds, depth)
        return msg

    return build()


def _count(draw: st.DrawFn, elem_size: int) -> int:
    if draw(st.integers(0, 99)) < 8:
        n = draw(st.sampled_from(MANY_COUNTS))
        return max(1, min(n, PAYLOAD_CAP // max(1, elem_size + 4)))
    return draw(st.sampled_from(SMALL_COUNTS))


def set_field(draw: st.DrawFn, msg: Message, f: FieldDescriptor, seeds: Seeds, depth: int) -> None:
    """Set ``f`` on ``msg`` to a drawn hostile value; values protobuf refuses client-side are skipped."""
    try:
        if _is_map(f):
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            container = getattr(msg, f.name)
            for _ in range(draw(st.sampled_from([*SMALL_COUNTS, 8]))):
                key = draw(scalar_strategy(key_f, seeds))
                if value_f.message_type is not None:
                    if depth + 1 < MAX_DEPTH:
                        container[key].CopyFrom(draw(message_strategy(value_f.message_type, seeds, depth + 1)))
                else:
                    container[key] = draw(scalar_strategy(value_f, seeds))
            return
        if f.is_repeated:
            container = getattr(msg, f.name)
            if f.message_type is not None:
                if depth + 1 >= MAX_DEPTH:
                    return
                elem = draw(message_strategy(f.message_type, seeds, depth + 1))
                container.extend([elem] * _count(draw, elem.ByteSize()))
            else:
                elem = draw(scalar_strategy(f, seeds))
                size = len(elem) if isinstance(elem, (str, bytes)) else 8
                n = _count(draw, size)
                if n > 0 and draw(st.booleans()) and n < 10:  # a few distinct values
                    container.extend([elem] + [draw(scalar_strategy(f, seeds)) for _ in range(n - 1)])
                else:
                    container.extend([elem] * n)
            return
        if f.message_type is not None:
            if depth + 1 < MAX_DEPTH:
                getattr(msg, f.name).CopyFrom(draw(message_strategy(f.message_type, seeds, depth + 1)))
            else:
                getattr(msg, f.name).SetInParent()
            return
        setattr(msg, f.name, draw(scalar_strategy(f, seeds)))
    except (ValueError, TypeError, OverflowError, UnicodeError):
        REFUSED[f.type] += 1  # protobuf refused the value on the client (a lone surrogate, an out-of-range number)


def copy_message(m: Message) -> Message:
    out = type(m)()
    out.CopyFrom(m)
    return out


def slots(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of ``msg`` and of the sub-messages it holds (map values included): what may be mutated."""
    out = []
    for f in msg.DESCRIPTOR.fields:
        out.append((msg, f))
        if f.message_type is None:
            continue
        if _is_map(f):
            value_f = f.message_type.fields_by_name["value"]
            if value_f.message_type is not None:
                for item in list(getattr(msg, f.name).values())[:3]:
                    out += slots(item)
        elif f.is_repeated:
            for item in getattr(msg, f.name)[:3]:
                out += slots(item)
        elif msg.HasField(f.name):
            out += slots(getattr(msg, f.name))
    return out


def mutate(draw: st.DrawFn, msg: Message, seeds: Seeds) -> None:
    """Replace one field anywhere in ``msg`` (chosen uniformly) with a hostile value, or clear it."""
    candidates = slots(msg)
    if not candidates:
        return
    target, f = draw(st.sampled_from(candidates))
    depth = 0 if target is msg else 1
    target.ClearField(f.name)
    if draw(st.integers(0, 99)) >= 15:
        set_field(draw, target, f, seeds, depth)


def mutated_strategy(templates: list[list[Message]], seeds: Seeds, streaming: bool) -> st.SearchStrategy[list[Message]]:
    @st.composite
    def build(draw: st.DrawFn) -> list[Message]:
        msgs = [copy_message(m) for m in draw(st.sampled_from(templates))]
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.integers(0, 9)) if streaming and len(msgs) > 1 else 0
            if op <= 5 or not msgs:
                if msgs:
                    mutate(draw, msgs[draw(st.integers(0, len(msgs) - 1))], seeds)
            elif op == 6:
                del msgs[draw(st.integers(0, len(msgs) - 1))]
            elif op == 7:
                i = draw(st.integers(0, len(msgs) - 1))
                msgs.insert(i, copy_message(msgs[i]))
            elif op == 8:
                msgs.reverse()
            else:
                msgs = msgs[:1]
        return msgs

    return build()


def raw_strategy(templates: list[list[Message]], streaming: bool) -> st.SearchStrategy[list[bytes]]:
    """Random bytes, or a valid request's bytes corrupted (flipped bytes, truncated, extended)."""
    random_bytes = st.one_of(
        st.binary(max_size=300),
        st.sampled_from(
            [
                b"\xff" * 16,  # a truncated varint
                b"\x0a\xff\xff\xff\xff\x0f",  # a field 1 length of 4 GiB
                b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong varint
                b"\x0b\x0c",  # a group
                b"\x0a\x02" * 50_000,  # deep nesting
                b"\x12\x00" * 1000,
            ]
        ),
    )
    options: list[st.SearchStrategy[bytes]] = [random_bytes]
    if templates:

        @st.composite
        def corrupted(draw: st.DrawFn) -> bytes:
            data = bytearray(draw(st.sampled_from(templates))[0].SerializeToString())
            for _ in range(draw(st.integers(1, 4))):
                if data:
                    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            cut = draw(st.integers(0, len(data)))
            return bytes(data[:cut] if draw(st.booleans()) else data + draw(st.binary(max_size=16)))

        options.append(corrupted())
    one = st.one_of(*options)
    return st.lists(one, max_size=4) if streaming else one.map(lambda b: [b])


# -- calling any RPC generically ----------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    responses: int = 0


def invoke(
    channel: grpc.Channel,
    method: MethodDescriptor,
    payloads: list[bytes],
    timeout: float,
    limit: int = STREAM_MESSAGE_LIMIT,
) -> Outcome:
    """Call ``method`` with already serialized requests; responses are parsed with the response type.

    A response stream is read up to ``limit`` messages, then cancelled (answered OK).
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    parse = message_class(method.output_type).FromString
    start = time.monotonic()
    n = 0
    try:
        if not method.client_streaming and not method.server_streaming:
            parse(channel.unary_unary(path)(payloads[0], timeout=timeout))
            n = 1
        elif not method.client_streaming:
            call = channel.unary_stream(path)(payloads[0], timeout=timeout)
            for resp in call:
                parse(resp)
                n += 1
                if n >= limit:
                    _stop(call)
                    break
        elif not method.server_streaming:
            parse(channel.stream_unary(path)(iter(payloads), timeout=timeout))
            n = 1
        else:
            call = channel.stream_stream(path)(iter(payloads), timeout=timeout)
            for resp in call:
                parse(resp)
                n += 1
                if n >= limit:
                    _stop(call)
                    break
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", time.monotonic() - start, n)
    return Outcome(G.OK, "", time.monotonic() - start, n)


def _stop(call: Any) -> None:
    """Cancel a response stream (the tracing interceptor hands out a plain generator: close it)."""
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()
    else:
        call.close()


#: RPCs that may wait by design (until their deadline) for the given request.
MAY_WAIT: dict[str, Callable[[Any], bool]] = {
    "guardmesh.v1.SchedulerService.WatchJob": lambda r: True,
    "guardmesh.v1.SchedulerService.WatchScaleSignals": lambda r: True,
    "guardmesh.v1.ParamServerService.Pull": lambda r: r.min_version > 0,
    "guardmesh.v1.ParamServerService.PullStream": lambda r: r.pull.min_version > 0,
    "guardmesh.v1.ABRouterService.WatchExposures": lambda r: True,  # live: waits for the next exposure
}

#: RPCs that read state only: they must never change it, even when they answer OK.
READ_ONLY = {
    "ListNodes",
    "DescribeJob",
    "ListJobs",
    "WatchJob",
    "ListEvents",
    "PlanCapacity",
    "WatchScaleSignals",
    "WatchExposures",
    "DescribeModel",
    "Pull",
    "PullStream",
    "GetStats",
    "ListModels",
    "GetDriftReport",
    "ListScorerEvents",
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    # ModelInfer is not read-only: its rows go through the scorer's guards (drift window, decision log).
    "GetExperiment",
    "ListExperiments",
    "GetExperimentHistory",
    "AssignBatch",
    "AuditExperiment",
    "CheckBalance",
    "AnalyzeExperiment",
    "GetShadowReport",
    "ListRouterEvents",
}


def services_of(name: str) -> list[Any]:
    """Service descriptors a running service announces (every proto service it serves)."""
    pool = descriptor_pool.Default()
    return [pool.FindServiceByName(s) for s in load_definition(name).service_names]


def methods_of(name: str) -> list[MethodDescriptor]:
    return [m for s in services_of(name) for m in s.methods]


def _trimmed(m: Message) -> Message:
    """A copy with repeated fields cut to 3 elements (their length noted in a comment by ``short``)."""
    out = copy_message(m)
    for f, value in out.ListFields():
        if f.is_repeated and not _is_map(f) and len(value) > 3:
            del value[3:]
        if f.message_type is not None and not _is_map(f):
            for item in value if f.is_repeated else [value]:
                item.CopyFrom(_trimmed(item))
    return out


def _lengths(m: Message, prefix: str = "") -> list[str]:
    notes = []
    for f, value in m.ListFields():
        if f.is_repeated and not _is_map(f) and len(value) > 3:
            notes.append(f"{prefix}{f.name}: {len(value)} elements")
        if f.message_type is not None and not _is_map(f):
            for i, item in enumerate(value[:3] if f.is_repeated else [value]):
                notes += _lengths(item, f"{prefix}{f.name}{f'[{i}]' if f.is_repeated else ''}.")
    return notes


def short(msgs: list[Message] | None, payloads: list[bytes]) -> str:
    """The request in a line (long strings and repeated fields cut)."""
    if msgs is None:
        return "raw " + " | ".join(repr(p[:120]) + (f"...({len(p)} bytes)" if len(p) > 120 else "") for p in payloads)
    out = []
    for m in msgs:
        text = text_format.MessageToString(_trimmed(m), as_one_line=True)
        text = re.sub(r'"((?:[^"\\]|\\.){60})(?:[^"\\]|\\.){40,}"', r'"\1...(long)"', text)
        notes = _lengths(m)
        out.append(text[:600] + (f" [{', '.join(notes)}]" if notes else ""))
    return " | ".join(out) or "(no messages)"


# -- state snapshots --------------------------------------------------------------------------------------


def _text(m: Message) -> str:
    return text_format.MessageToString(m)


def _rpc_text(fn: Callable[[], Message]) -> str:
    try:
        return _text(fn())
    except grpc.RpcError as err:
        return f"error {err.code().name}: {err.details()}"


def snapshot_scheduler(ch: grpc.Channel) -> dict[str, str]:
    stub = spb_grpc.SchedulerServiceStub(ch)
    events = stub.ListEvents(spb.ListEventsRequest(limit=10_000), timeout=CALL_DEADLINE_S).events
    return {
        "ListNodes": _text(stub.ListNodes(spb.ListNodesRequest(), timeout=CALL_DEADLINE_S)),
        "ListJobs": _text(stub.ListJobs(spb.ListJobsRequest(), timeout=CALL_DEADLINE_S)),
        "ListEvents": f"{len(events)} events, last {_text(events[-1]) if events else '-'}",
    }


PS_MODELS = ("m1", "msync")


def snapshot_paramserver(ch: grpc.Channel) -> dict[str, str]:
    stub = ppb_grpc.ParamServerServiceStub(ch)
    out = {}
    for m in PS_MODELS:
        out[f"DescribeModel {m}"] = _rpc_text(
            lambda m=m: stub.DescribeModel(ppb.DescribeModelRequest(model=m), timeout=CALL_DEADLINE_S)
        )
        out[f"Pull {m}"] = _rpc_text(lambda m=m: stub.Pull(ppb.PullRequest(model=m), timeout=CALL_DEADLINE_S))
    return out


def snapshot_scorer(ch: grpc.Channel) -> dict[str, str]:
    stub = cpb_grpc.ScorerServiceStub(ch)
    return {
        "ListModels": _text(stub.ListModels(cpb.ListModelsRequest(), timeout=CALL_DEADLINE_S)),
        "ListScorerEvents": _text(stub.ListScorerEvents(cpb.ListScorerEventsRequest(), timeout=CALL_DEADLINE_S)),
        "GetDriftReport risk": _rpc_text(
            lambda: stub.GetDriftReport(cpb.GetDriftReportRequest(model="risk"), timeout=CALL_DEADLINE_S)
        ),
    }


AB_KEYS = ("exp", "exp-stop", "exp-bandit")


def snapshot_abrouter(ch: grpc.Channel) -> dict[str, str]:
    stub = apb_grpc.ABRouterServiceStub(ch)
    out = {
        "ListExperiments": _text(stub.ListExperiments(apb.ListExperimentsRequest(), timeout=CALL_DEADLINE_S)),
        "ListRouterEvents": _text(stub.ListRouterEvents(apb.ListRouterEventsRequest(), timeout=CALL_DEADLINE_S)),
    }
    for key in AB_KEYS:
        out[f"GetExperimentHistory {key}"] = _rpc_text(
            lambda key=key: stub.GetExperimentHistory(apb.GetExperimentHistoryRequest(key=key), timeout=CALL_DEADLINE_S)
        )
    return out


SNAPSHOTS: dict[str, Callable[[grpc.Channel], dict[str, str]]] = {
    "scheduler": snapshot_scheduler,
    "paramserver": snapshot_paramserver,
    "scorer": snapshot_scorer,
    "abrouter": snapshot_abrouter,
}


def state_diff(before: dict[str, str], after: dict[str, str]) -> str:
    parts = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, ""), after.get(key, "")
        if a != b:
            lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0))[2:8]
            parts.append(f"{key}: " + " / ".join(line.strip()[:160] for line in lines))
    return "; ".join(parts)


# -- setup: valid state and valid requests per service --------------------------------------------------


def f32(values: Any, shape: list[int] | None = None) -> common_pb2.Tensor:
    arr = np.asarray(values, dtype="<f4")
    return common_pb2.Tensor(
        dtype=common_pb2.D_TYPE_FLOAT32, shape=list(arr.shape) if shape is None else shape, data=arr.tobytes()
    )


def setup_scheduler(ch: grpc.Channel) -> Setup:
    stub = spb_grpc.SchedulerServiceStub(ch)
    stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("node-a", 4, 81920, group_size=2, zone="z1")))
    stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("node-t4", 2, 16384, model="T4")))

    def job(job_id: str, share: int = 0, **kw: Any) -> spb.JobSpec:
        base: dict[str, Any] = {"tenant": "t1", "replicas": 1, "gpus_per_replica": 1}
        spec = spb.JobSpec(job_id=job_id, **{**base, **kw})
        if share:
            spec.gpu_share_milli = share
        elif spec.WhichOneof("gpu_memory") is None:
            spec.memory_mib_per_gpu = 8000
        return spec

    for spec in (
        job("job-a"),
        job("job-r", share=250, allow_sharing=True),
        job("job-p", gpus_per_replica=4, gang=True, allowed_models=["A100-80GB"]),
        job("job-be", qos=spb.QOS_CLASS_BEST_EFFORT, allow_sharing=True),
    ):
        stub.SubmitJob(spb.SubmitJobRequest(job=spec))
    seeds = Seeds(
        strings=[
            "node-a",
            "node-t4",
            "GPU-node-a-0",
            "GPU-node-a-3",
            "GPU-node-t4-1",
            "A100-80GB",
            "T4",
            "job-a",
            "job-r",
            "job-p",
            "job-be",
            "t1",
            "zone",
            "z1",
            "node-a/nvl0",
        ]
    )
    new_job = job("job-new", allow_sharing=True, node_selector={"zone": "z1"}, lease_ttl_s=60, priority=5)
    templates: dict[str, list[list[Message]]] = {
        "RegisterNode": [[spb.RegisterNodeRequest(node=node_pb("node-b", 2, 40960, zone="z2"))]],
        "ReportNodeStatus": [
            [
                spb.ReportNodeStatusRequest(
                    node="node-a", gpus=[spb.GpuUsage(uuid="GPU-node-a-0", used_memory_mib=9000, utilization=0.5)]
                )
            ]
        ],
        "ListNodes": [[spb.ListNodesRequest(model="A100-80GB")]],
        "SubmitJob": [[spb.SubmitJobRequest(job=new_job)]],
        "SubmitJobs": [[spb.SubmitJobsRequest(jobs=[new_job, job("job-new2", gpus_per_replica=2)])]],
        "ReleaseJob": [[spb.ReleaseJobRequest(job_id="job-r")]],
        "DescribeJob": [[spb.DescribeJobRequest(job_id="job-a")]],
        "ListJobs": [[spb.ListJobsRequest(tenant="t1", state=spb.JOB_STATE_RUNNING)]],
        "WatchJob": [[spb.WatchJobRequest(job_id="job-a")]],
        "RenewLease": [[spb.RenewLeaseRequest(job_id="job-a", replica=0)]],
        "ListEvents": [[spb.ListEventsRequest(after_seq=1, limit=10, job_id="job-a")]],
        "PlanCapacity": [
            [
                spb.PlanCapacityRequest(
                    shape=spb.NodeShape(model="A100-80GB", gpus=8, memory_mib_per_gpu=81920), jobs=[new_job]
                )
            ]
        ],
        "WatchScaleSignals": [[spb.WatchScaleSignalsRequest(pool="A100-80GB")]],
    }
    huge_gpu = spb.GpuDevice(index=0, uuid="GPU-h", model="A100-80GB", memory_mib=2**63 - 1)
    corpus: list[tuple[str, list[Message]]] = [
        ("RegisterNode", [spb.RegisterNodeRequest(node=spb.NodeSpec(name="node-h", gpus=[huge_gpu]))]),
        ("RegisterNode", [spb.RegisterNodeRequest(node=node_pb("node-65", 65, 1024))]),
        ("RegisterNode", [spb.RegisterNodeRequest(node=node_pb("node-a", 1, 81920))]),  # shrinks a busy node
        (
            "ReportNodeStatus",
            [spb.ReportNodeStatusRequest(node="node-a", gpus=[spb.GpuUsage(uuid="GPU-node-a-1", utilization=NAN)])],
        ),
        (
            "ReportNodeStatus",
            [spb.ReportNodeStatusRequest(node="node-a", gpus=[spb.GpuUsage(uuid="GPU-node-a-1", used_memory_mib=-1)])],
        ),
        ("SubmitJob", [spb.SubmitJobRequest(job=job("job-h1", replicas=2**31 - 1, gpus_per_replica=64))]),
        ("SubmitJob", [spb.SubmitJobRequest(job=job("job-h2", memory_mib_per_gpu=2**63 - 1))]),
        ("SubmitJob", [spb.SubmitJobRequest(job=job("job-h3", share=-5))]),
        ("SubmitJob", [spb.SubmitJobRequest(job=job("job-h4", lease_ttl_s=2**31 - 1, priority=-(2**31)))]),
        ("SubmitJob", [spb.SubmitJobRequest(job=job("job-h5", node_selector={"": "x"}, qos=99, topology=-1))]),
        ("SubmitJob", [spb.SubmitJobRequest(job=job("job-a", gpus_per_replica=2))]),  # the id of another spec
        ("SubmitJobs", [spb.SubmitJobsRequest(jobs=[job("job-many")] * 1001)]),
        ("SubmitJobs", [spb.SubmitJobsRequest(jobs=[job(f"job-b{i}", replicas=-i) for i in range(50)])]),
        ("RenewLease", [spb.RenewLeaseRequest(job_id="job-a", replica=-1)]),
        ("RenewLease", [spb.RenewLeaseRequest(job_id="job-a", replica=2**31 - 1)]),
        ("RenewLease", [spb.RenewLeaseRequest(job_id="job-p", replica=0)]),
        ("ListEvents", [spb.ListEventsRequest(after_seq=-1)]),
        ("ListEvents", [spb.ListEventsRequest(after_seq=2**63 - 1, limit=2**31 - 1)]),
        ("ListJobs", [spb.ListJobsRequest(state=99)]),
        ("DescribeJob", [spb.DescribeJobRequest(job_id="\x00")]),
        ("ReleaseJob", [spb.ReleaseJobRequest(job_id="")]),
        (
            "PlanCapacity",
            [
                spb.PlanCapacityRequest(
                    shape=spb.NodeShape(model="A100-80GB", gpus=64, memory_mib_per_gpu=1_048_576),
                    jobs=[job("p", replicas=4096, gpus_per_replica=64, memory_mib_per_gpu=1_048_576)] * 1000,
                )
            ],
        ),
        (
            "PlanCapacity",
            [spb.PlanCapacityRequest(shape=spb.NodeShape(model="x", gpus=2**31 - 1, memory_mib_per_gpu=-1))],
        ),
        ("WatchJob", [spb.WatchJobRequest(job_id="job-a")]),
        ("WatchScaleSignals", [spb.WatchScaleSignalsRequest(pool="\U0001f600" * 1000)]),
        ("DescribeJob", [spb.DescribeJobRequest(job_id="j" * 100_000)]),  # the error must not echo 100 KB
    ]
    return Setup(seeds, templates, corpus)


def setup_paramserver(ch: grpc.Channel) -> Setup:
    stub = ppb_grpc.ParamServerServiceStub(ch)
    w, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, dtype=np.float32)
    tensors = [ppb.NamedTensor(name="w", tensor=f32(w)), ppb.NamedTensor(name="b", tensor=f32(b))]
    adam = ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_ADAM, learning_rate=0.01)
    bounded = ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_BOUNDED_STALENESS, max_staleness=1_000_000)
    stub.CreateModel(ppb.CreateModelRequest(model="m1", tensors=tensors, optimizer=adam, consistency=bounded))
    stub.CreateModel(
        ppb.CreateModelRequest(
            model="msync",
            tensors=tensors,
            optimizer=ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_MOMENTUM, learning_rate=0.1, momentum=0.9),
            consistency=ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_SYNC, workers=2, backup_workers=1),
            checkpoint_every=3,
        )
    )
    grads = [ppb.NamedTensor(name="w", tensor=f32(np.ones((2, 3)))), ppb.NamedTensor(name="b", tensor=f32(np.ones(3)))]
    half = np.ones(6, dtype=np.float16)
    seeds = Seeds(
        strings=["m1", "msync", "w", "b", "w0", "worker-1"],
        bytes_=[
            np.ones(6, dtype="<f4").tobytes(),
            np.ones(3, dtype="<f4").tobytes(),
            np.full(6, np.nan, dtype="<f4").tobytes(),
            np.full(3, np.inf, dtype="<f4").tobytes(),
            half.tobytes(),
            np.full(6, 3e38, dtype="<f4").tobytes(),
        ],
    )

    def header(model: str, worker: str, step: int) -> ppb.StreamHeader:
        return ppb.StreamHeader(
            model=model,
            version=0,
            worker_id=worker,
            step_id=step,
            tensors=[
                ppb.TensorInfo(name="w", dtype=common_pb2.D_TYPE_FLOAT32, shape=[2, 3]),
                ppb.TensorInfo(name="b", dtype=common_pb2.D_TYPE_FLOAT32, shape=[3]),
            ],
        )

    def chunk(i: int, offset: int, data: bytes) -> ppb.TensorChunk:
        return ppb.TensorChunk(tensor=i, offset=offset, data=data)

    wb, bb = np.ones(6, dtype="<f4").tobytes(), np.ones(3, dtype="<f4").tobytes()
    empty = [
        ppb.NamedTensor(name="w", tensor=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[2, 3])),
        ppb.NamedTensor(name="b", tensor=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[3])),
    ]
    create_header = ppb.CreateModelRequest(model="m-stream", tensors=empty, optimizer=adam, consistency=bounded)
    templates: dict[str, list[list[Message]]] = {
        "CreateModel": [
            [ppb.CreateModelRequest(model="m-new", tensors=tensors, optimizer=adam, consistency=bounded)],
            [ppb.CreateModelRequest(model="m1", tensors=tensors, optimizer=adam, consistency=bounded)],
        ],
        "CreateModelStream": [
            [
                ppb.CreateModelStreamRequest(header=create_header),
                ppb.CreateModelStreamRequest(chunk=chunk(0, 0, wb[:12])),
                ppb.CreateModelStreamRequest(chunk=chunk(0, 12, wb[12:])),
                ppb.CreateModelStreamRequest(chunk=chunk(1, 0, bb)),
            ]
        ],
        "DescribeModel": [[ppb.DescribeModelRequest(model="m1")]],
        "Pull": [[ppb.PullRequest(model="m1", names=["w"])]],
        "PullStream": [[ppb.PullStreamRequest(pull=ppb.PullRequest(model="m1"), chunk_bytes=65536)]],
        "Push": [
            [ppb.PushRequest(model="m1", worker_id="w0", base_version=0, step_id=1, gradients=grads)],
            [ppb.PushRequest(model="msync", worker_id="w0", base_version=0, step_id=1, gradients=grads)],
        ],
        "PushStream": [
            [
                ppb.PushStreamRequest(header=header("m1", "w1", 7)),
                ppb.PushStreamRequest(chunk=chunk(0, 0, wb)),
                ppb.PushStreamRequest(chunk=chunk(1, 0, bb[:4])),
                ppb.PushStreamRequest(chunk=chunk(1, 4, bb[4:])),
            ]
        ],
        "Checkpoint": [[ppb.CheckpointRequest(model="m1")]],
        "GetStats": [[ppb.GetStatsRequest(model="m1")]],
    }

    def stream_header(shape: list[int], dtype: int = common_pb2.D_TYPE_FLOAT32) -> ppb.CreateModelStreamRequest:
        tensor = ppb.NamedTensor(name="w", tensor=common_pb2.Tensor(dtype=dtype, shape=shape))  # type: ignore[arg-type]
        return ppb.CreateModelStreamRequest(
            header=ppb.CreateModelRequest(model="m-h", tensors=[tensor], optimizer=adam, consistency=bounded)
        )

    def create(tensor: common_pb2.Tensor, **kw: Any) -> ppb.CreateModelRequest:
        base: dict[str, Any] = {"optimizer": adam, "consistency": bounded, **kw}
        return ppb.CreateModelRequest(model="m-h", tensors=[ppb.NamedTensor(name="w", tensor=tensor)], **base)

    def push(model: str = "m1", **kw: Any) -> ppb.PushRequest:
        base: dict[str, Any] = {"worker_id": "w9", "base_version": 0, "step_id": 1, "gradients": grads, **kw}
        return ppb.PushRequest(model=model, **base)

    nan_grads = [ppb.NamedTensor(name="w", tensor=f32(np.full((2, 3), np.nan)))]
    corpus: list[tuple[str, list[Message]]] = [
        *[
            ("CreateModelStream", [stream_header(shape)])
            for shape in ([2**40], [2**33], [2**31, 2**31], [2**32, 2**32], [-1], [2**63 - 1, 0])
        ],
        ("CreateModelStream", [stream_header([3], dtype=0)]),
        ("CreateModelStream", [stream_header([3], dtype=99)]),
        (
            "CreateModelStream",
            [stream_header([2]), ppb.CreateModelStreamRequest(chunk=chunk(0, -1, b"\x00" * 8))],
        ),
        ("CreateModelStream", [stream_header([2]), ppb.CreateModelStreamRequest(chunk=chunk(2**31 - 1, 0, b"1"))]),
        ("CreateModelStream", [stream_header([2]), ppb.CreateModelStreamRequest(chunk=chunk(0, 0, b"\x00" * 9))]),
        ("CreateModelStream", [ppb.CreateModelStreamRequest(chunk=chunk(0, 0, b""))]),
        ("CreateModelStream", []),
        ("CreateModel", [create(common_pb2.Tensor(dtype=1, shape=[2**32, 2**32]))]),
        ("CreateModel", [create(f32(np.full(3, np.nan)))]),
        ("CreateModel", [create(f32(np.ones(3)), optimizer=ppb.OptimizerConfig(kind=1, learning_rate=NAN))]),
        ("CreateModel", [create(f32(np.ones(3)), consistency=ppb.ConsistencyConfig(mode=1, workers=2**31 - 1))]),
        ("CreateModel", [create(f32(np.ones(3)), checkpoint_every=-1)]),
        ("CreateModel", [create(f32(np.ones(3)), optimizer=ppb.OptimizerConfig(kind=99, learning_rate=1.0))]),
        ("Push", [push(gradients=nan_grads)]),
        ("Push", [push("msync", gradients=nan_grads)]),
        ("Push", [push(base_version=2**63 - 1)]),
        ("Push", [push(step_id=-1)]),
        ("Push", [push(worker_id="")]),
        ("Push", [push(gradients=[ppb.NamedTensor(name="w", tensor=f32(np.ones(7)))])]),
        ("Push", [push(gradients=[grads[0], grads[0]])]),
        (
            "PushStream",
            [
                ppb.PushStreamRequest(header=header("m1", "w2", 3)),
                ppb.PushStreamRequest(chunk=chunk(0, 0, np.full(6, np.inf, dtype="<f4").tobytes())),
                ppb.PushStreamRequest(chunk=chunk(1, 0, bb)),
            ],
        ),
        (
            "PushStream",
            [ppb.PushStreamRequest(header=header("m1", "w2", 4)), ppb.PushStreamRequest(chunk=chunk(0, 24, wb))],
        ),
        ("PushStream", [ppb.PushStreamRequest(header=header("m1", "w2", 5))]),
        ("Pull", [ppb.PullRequest(model="m1", min_version=2**63 - 1)]),
        ("Pull", [ppb.PullRequest(model="m1", names=["nope", "w"])]),
        ("Pull", [ppb.PullRequest(model="m1", min_version=-1)]),
        ("PullStream", [ppb.PullStreamRequest(pull=ppb.PullRequest(model="m1"), chunk_bytes=2**31 - 1)]),
        ("PullStream", [ppb.PullStreamRequest(pull=ppb.PullRequest(model="m1"), chunk_bytes=-1)]),
        ("Checkpoint", [ppb.CheckpointRequest(model="\x00")]),
        ("DescribeModel", [ppb.DescribeModelRequest(model="m" * 100_000)]),  # the error must not echo 100 KB
        # Thousands of dimensions: a product of thousands of digits (and seconds of CPU for 20,000 of them).
        (
            "Push",
            [push(gradients=[ppb.NamedTensor(name="w", tensor=common_pb2.Tensor(dtype=1, shape=[10**6] * 4097))])],
        ),
        ("CreateModel", [create(common_pb2.Tensor(dtype=1, shape=[2**63 - 1] * 20_000))]),
    ]
    stream_dup = header("m1", "w2", 6)
    stream_dup.tensors.append(stream_dup.tensors[0])
    corpus.append(("PushStream", [ppb.PushStreamRequest(header=stream_dup)]))
    return Setup(seeds, templates, corpus)


FEATURES = ["amount", "velocity", "age_days", "foreign"]


def _logistic() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.5, -0.5, 0.2]]))
        model[0].bias.fill_(-0.1)
    return model.eval()


def setup_scorer(ch: grpc.Channel) -> Setup:
    stub = cpb_grpc.ScorerServiceStub(ch)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(_logistic()), buf)
    torchscript = buf.getvalue()
    state_dict = st_save(_logistic().state_dict())
    reference = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    ref = f32(reference)

    def register(version: str, **kw: Any) -> cpb.RegisterModelRequest:
        base: dict[str, Any] = {"features": FEATURES, "format": cpb.MODEL_FORMAT_TORCHSCRIPT, "payload": torchscript}
        return cpb.RegisterModelRequest(model="risk", version=version, **{**base, **kw})

    stub.RegisterModel(register("v1", reference=ref, activate=True, threshold=cpb.ThresholdConfig(base=0.6)))
    stub.RegisterModel(register("v2", rules=[cpb.ScoringRule(name="big", feature="amount", limit=3.0, block=True)]))
    rng = np.random.default_rng(1)
    for i in range(30):
        row = rng.standard_normal(4)
        values = dict(zip(FEATURES, map(float, row), strict=True))
        stub.Score(cpb.ScoreRequest(model="risk", request_id=f"r{i}", features=values))
    features = {"amount": 0.5, "velocity": -0.2, "age_days": 1.0, "foreign": 0.0}
    rows = np.array([[0.5, -0.2, 1.0, 0.0], [1.5, 0.3, -1.0, 1.0]], dtype=np.float32)
    infer_typed = opb.ModelInferRequest(
        model_name="risk",
        id="i1",
        inputs=[
            opb.ModelInferRequest.InferInputTensor(
                name="features",
                datatype="FP32",
                shape=[2, 4],
                contents=opb.InferTensorContents(fp32_contents=rows.reshape(-1).tolist()),
            )
        ],
        outputs=[opb.ModelInferRequest.InferRequestedOutputTensor(name="score")],
    )
    infer_raw = opb.ModelInferRequest(
        model_name="risk",
        model_version="v1",
        inputs=[opb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[2, 4])],
        raw_input_contents=[rows.tobytes()],
    )
    seeds = Seeds(
        strings=[
            "risk",
            "v1",
            "v2",
            *FEATURES,
            "r1",
            "r2",
            "logistic",
            "mlp",
            "features",
            "score",
            "FP32",
            "FP16",
            "BYTES",
            "INT8",
            "binary_data_size",
            "classification",
        ],
        bytes_=[torchscript, state_dict, ref.data, rows.tobytes(), rows[:1].tobytes()],
    )
    score = cpb.ScoreRequest(model="risk", request_id="r1", features=features, explain=True, experiment="e", arm="a")
    templates: dict[str, list[list[Message]]] = {
        "RegisterModel": [
            [register("v-new", reference=ref, rules=[cpb.ScoringRule(name="r", feature="velocity", limit=2.0)])],
            [
                cpb.RegisterModelRequest(
                    model="risk-sd",
                    version="s1",
                    features=FEATURES,
                    format=cpb.MODEL_FORMAT_STATE_DICT,
                    architecture="logistic",
                    payload=state_dict,
                    threshold=cpb.ThresholdConfig(base=0.5, k=0.2, lower=0.1, upper=0.9),
                    cleaning=cpb.CLEANING_POLICY_REJECT,
                    missing_alert_rate=0.1,
                    max_f1_drop=0.2,
                    reference_rows=10,
                )
            ],
        ],
        "ActivateModel": [[cpb.ActivateModelRequest(model="risk", version="v2")]],
        "RollbackModel": [[cpb.RollbackModelRequest(model="risk")]],
        "ListModels": [[cpb.ListModelsRequest()]],
        "Score": [[score], [cpb.ScoreRequest(model="risk", request_id="r2", features={"amount": 9.0}, version="v2")]],
        "ScoreBatch": [[cpb.ScoreBatchRequest(requests=[score, score])]],
        "Feedback": [[cpb.FeedbackRequest(model="risk", labels=[cpb.Label(request_id="r3", label=True)])]],
        "GetDriftReport": [[cpb.GetDriftReportRequest(model="risk")]],
        "ListScorerEvents": [[cpb.ListScorerEventsRequest(model="risk")]],
        "ServerLive": [[opb.ServerLiveRequest()]],
        "ServerReady": [[opb.ServerReadyRequest()]],
        "ModelReady": [[opb.ModelReadyRequest(name="risk", version="v1")]],
        "ServerMetadata": [[opb.ServerMetadataRequest()]],
        "ModelMetadata": [[opb.ModelMetadataRequest(name="risk")]],
        "ModelInfer": [[infer_typed], [infer_raw]],
    }

    def infer(shape: list[int], raw: bytes | None = None, datatype: str = "FP32", **kw: Any) -> opb.ModelInferRequest:
        tensor = opb.ModelInferRequest.InferInputTensor(name="features", datatype=datatype, shape=shape)
        req = opb.ModelInferRequest(model_name="risk", inputs=[tensor], **kw)
        if raw is not None:
            req.raw_input_contents.append(raw)
        return req

    empty_safetensors = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"
    nan_column = reference.copy()
    nan_column[:, 0] = np.nan
    corpus: list[tuple[str, list[Message]]] = [
        ("ModelInfer", [infer([0, 4], b"")]),
        ("ModelInfer", [infer([0, 4])]),
        ("ModelInfer", [infer([2**62, 4], b"")]),
        ("ModelInfer", [infer([1, 4], b"\x00" * 16, datatype="BYTES")]),
        ("ModelInfer", [infer([1, 4], np.full(4, np.nan, dtype="<f4").tobytes())]),
        ("ModelInfer", [infer([2, 4], rows.tobytes(), model_version="nope")]),
        ("Score", [cpb.ScoreRequest(model="risk", request_id="h1", features={"amount": 1e300}, explain=True)]),
        ("Score", [cpb.ScoreRequest(model="risk", request_id="h2", features=dict.fromkeys(FEATURES, -1e308))]),
        (
            "Score",
            [
                cpb.ScoreRequest(
                    model="risk", request_id="h3", features={"amount": 3e38, "velocity": -3e38}, explain=True
                )
            ],
        ),
        ("Score", [cpb.ScoreRequest(model="risk", request_id="h4", features={"amount": NAN}, explain=True)]),
        ("Score", [cpb.ScoreRequest(model="risk", request_id="x" * 257, features={})]),
        (
            "RegisterModel",
            [
                cpb.RegisterModelRequest(
                    model="risk-mlp",
                    version="m",
                    features=FEATURES,
                    format=cpb.MODEL_FORMAT_STATE_DICT,
                    architecture="mlp",
                    hidden=[65536, 65536, 65536],
                    payload=empty_safetensors,
                )
            ],
        ),
        ("RegisterModel", [register("h-hidden", format=cpb.MODEL_FORMAT_STATE_DICT, architecture="mlp", hidden=[0])]),
        ("RegisterModel", [register("h-base", threshold=cpb.ThresholdConfig(base=NAN))]),
        ("RegisterModel", [register("h-ref", reference=common_pb2.Tensor(dtype=1, shape=[2**31, 4]))]),
        ("RegisterModel", [register("h-rows", reference_rows=-1, missing_alert_rate=INF, max_f1_drop=-1)]),
        ("RegisterModel", [register("h-rule", rules=[cpb.ScoringRule(name="r", feature="amount", limit=NAN)])]),
        ("RegisterModel", [register("h-feat", features=["a"] * 2)]),
        # A reference with a feature that is always missing, then an explained score of that model.
        (
            "RegisterModel",
            [
                cpb.RegisterModelRequest(
                    model="risk-nan",
                    version="n1",
                    features=FEATURES,
                    format=cpb.MODEL_FORMAT_TORCHSCRIPT,
                    payload=torchscript,
                    reference=f32(nan_column),
                    activate=True,
                )
            ],
        ),
        ("Score", [cpb.ScoreRequest(model="risk-nan", request_id="n1", features=features, explain=True)]),
        ("Feedback", [cpb.FeedbackRequest(model="risk", labels=[cpb.Label(request_id="r1", label=True)] * 100_000)]),
        ("ScoreBatch", [cpb.ScoreBatchRequest(requests=[score] * 4097)]),
        (
            "ScoreBatch",
            [
                cpb.ScoreBatchRequest(
                    requests=[cpb.ScoreRequest(model="risk", request_id="b", features={"amount": 1e300}, explain=True)]
                    * 3
                )
            ],
        ),
        ("ActivateModel", [cpb.ActivateModelRequest(model="risk", version="")]),
        ("ModelReady", [opb.ModelReadyRequest(name="risk", version="\x00")]),
        ("Score", [cpb.ScoreRequest(model="x" * 100_000, request_id="r")]),  # the error must not echo 100 KB
        ("RegisterModel", [register("h-dims", reference=common_pb2.Tensor(dtype=1, shape=[10**6] * 4097))]),
    ]
    return Setup(seeds, templates, corpus)


def setup_abrouter(ch: grpc.Channel) -> Setup:
    stub = apb_grpc.ABRouterServiceStub(ch)
    arms = [apb.Arm(name="control", weight=0.5), apb.Arm(name="treatment", weight=0.5, model_version="v1")]
    spec = apb.ExperimentSpec(
        key="exp",
        arms=arms,
        metrics=["clicks", "revenue"],
        model="risk",
        shadow=apb.ShadowConfig(version="v2", fraction=0.5),
        guardrails=[apb.Guardrail(metric="revenue", higher_is_better=True, max_relative_drop=0.2, alpha=0.05)],
    )
    stub.CreateExperiment(apb.CreateExperimentRequest(spec=spec))
    stop_spec = apb.ExperimentSpec(key="exp-stop", arms=arms, sticky_bucketing=True, hash_version=1)
    stub.CreateExperiment(apb.CreateExperimentRequest(spec=stop_spec))
    bandit_spec = apb.ExperimentSpec(
        key="exp-bandit",
        arms=arms,
        metrics=["conv"],
        mode=apb.ALLOCATION_MODE_BANDIT,
        bandit=apb.BanditConfig(reward_metric="conv", kind=apb.REWARD_KIND_BERNOULLI, update_interval_s=3600),
        sticky_bucketing=True,  # a bandit requires it
        condition_json='{"country": {"$in": ["US", "CA"]}}',
        hash_attribute="device_id",
    )
    stub.CreateExperiment(apb.CreateExperimentRequest(spec=bandit_spec))
    for i in range(40):
        stub.Assign(
            apb.AssignRequest(
                unit_id=f"u{i}",
                experiment_keys=["exp"],
                log_exposure=True,
                covariates=apb.Covariates(
                    numeric={"age": 20.0 + i},
                    categorical={"device": "ios" if i % 2 else "android", "position": str(i % 3)},
                ),
            )
        )
    stub.RecordMetrics(
        apb.RecordMetricsRequest(
            experiment_key="exp",
            observations=[
                apb.MetricObservation(unit_id=f"u{i}", metric="clicks", value=float(i % 4)) for i in range(40)
            ],
        )
    )
    attributes = apb.AssignRequest().attributes
    attributes.update({"country": "US", "device_id": "d1", "age": 30})
    seeds = Seeds(
        strings=[
            "exp",
            "exp-stop",
            "exp-bandit",
            "control",
            "treatment",
            "clicks",
            "revenue",
            "conv",
            "u1",
            "u2",
            "risk",
            "v1",
            "v2",
            "id",
            "device_id",
            "country",
            "US",
            "age",
            "device",
            "position",
            "sum",
            "mean",
            *FEATURES,
        ]
    )
    features = {"amount": 0.5, "velocity": 0.1, "age_days": 2.0, "foreign": 0.0}
    covariates = apb.Covariates(numeric={"age": 33.0}, categorical={"device": "ios", "position": "1"})
    new_spec = apb.ExperimentSpec()
    new_spec.CopyFrom(spec)
    new_spec.key = "exp-new"
    new_spec.namespace.CopyFrom(apb.Namespace(name="ns1", start=0.0, end=0.5))
    new_spec.holdout.CopyFrom(apb.Holdout(name="ho1", share=0.1))
    update_spec = apb.ExperimentSpec()
    update_spec.CopyFrom(spec)
    update_spec.arms[0].weight, update_spec.arms[1].weight = 0.4, 0.6
    templates: dict[str, list[list[Message]]] = {
        "CreateExperiment": [
            [apb.CreateExperimentRequest(spec=new_spec)],
            [apb.CreateExperimentRequest(spec=bandit_spec)],
        ],
        "UpdateExperiment": [
            [apb.UpdateExperimentRequest(spec=update_spec, expected_version=0, comment="ramp")],
            [apb.UpdateExperimentRequest(spec=bandit_spec, comment="again")],
        ],
        "StopExperiment": [[apb.StopExperimentRequest(key="exp-stop", reason="done")]],
        "GetExperiment": [[apb.GetExperimentRequest(key="exp")]],
        "ListExperiments": [[apb.ListExperimentsRequest()]],
        "GetExperimentHistory": [[apb.GetExperimentHistoryRequest(key="exp")]],
        "Assign": [
            [
                apb.AssignRequest(
                    unit_id="u1",
                    attributes=attributes,
                    experiment_keys=["exp", "exp-bandit"],
                    log_exposure=True,
                    covariates=covariates,
                )
            ]
        ],
        "AssignBatch": [[apb.AssignBatchRequest(experiment_key="exp", unit_ids=["u1", "u2", "u3"])]],
        "Route": [
            [
                apb.RouteRequest(
                    experiment_key="exp",
                    unit_id="u1",
                    attributes=attributes,
                    request_id="rr1",
                    features=features,
                    log_exposure=True,
                    covariates=covariates,
                )
            ]
        ],
        "RecordMetrics": [
            [
                apb.RecordMetricsRequest(
                    experiment_key="exp",
                    observations=[
                        apb.MetricObservation(unit_id="u1", metric="clicks", value=1.0, arm="treatment"),
                        apb.MetricObservation(unit_id="u2", metric="revenue", value=3.5, pre_period=True),
                    ],
                )
            ]
        ],
        "AuditExperiment": [[apb.AuditExperimentRequest(key="exp", other_experiments=["exp-stop"], min_sample=10)]],
        "CheckBalance": [
            [
                apb.CheckBalanceRequest(
                    key="exp",
                    units=[apb.PlannedUnit(unit_id=f"p{i}", covariates=covariates, timestamp=1.7e9) for i in range(6)],
                )
            ]
        ],
        "AnalyzeExperiment": [
            [
                apb.AnalyzeExperimentRequest(
                    key="exp",
                    metrics=["clicks"],
                    bootstrap_resamples=50,
                    confidence=0.9,
                    position_covariate="position",
                    reweight_covariates=["device"],
                    aggregate="mean",
                    seed=7,
                )
            ]
        ],
        "GetShadowReport": [[apb.GetShadowReportRequest(key="exp")]],
        "ListRouterEvents": [[apb.ListRouterEventsRequest(experiment_key="exp", after_seq=1)]],
    }

    def with_condition(condition: str) -> apb.CreateExperimentRequest:
        return apb.CreateExperimentRequest(spec=apb.ExperimentSpec(key="exp-c", arms=arms, condition_json=condition))

    def struct(**values: Any) -> Any:
        out = apb.AssignRequest().attributes
        out.update(values)
        return out

    corpus: list[tuple[str, list[Message]]] = [
        ("CreateExperiment", [with_condition("[" * 50_000 + "]" * 50_000)]),
        ("CreateExperiment", [with_condition('{"a":' * 600 + "1" + "}" * 600)]),
        ("CreateExperiment", [with_condition('{"a": ' + "1" * 5000 + "}")]),
        ("CreateExperiment", [with_condition('{"a": 1e999, "b": NaN}')]),
        ("Assign", [apb.AssignRequest(unit_id="u1", experiment_keys=["exp"], attributes=struct(x=NAN))]),
        ("Assign", [apb.AssignRequest(unit_id="u1", experiment_keys=["exp-bandit"], attributes=struct(device_id=INF))]),
        (
            "Assign",
            [apb.AssignRequest(unit_id="u1", covariates=apb.Covariates(numeric={"age": NAN}), log_exposure=True)],
        ),
        ("Assign", [apb.AssignRequest(unit_id="u1", timestamp=-1.0, log_exposure=True)]),
        ("Assign", [apb.AssignRequest(unit_id="u1", experiment_keys=["exp"] * 2)]),
        # The scorer refuses the features: nothing may be logged for the new unit.
        (
            "Route",
            [
                apb.RouteRequest(
                    experiment_key="exp", unit_id="fresh-1", request_id="f1", features={"nope": 1.0}, log_exposure=True
                )
            ],
        ),
        (
            "Route",
            [
                apb.RouteRequest(
                    experiment_key="exp",
                    unit_id="fresh-2",
                    request_id="f2",
                    features={"amount": 1e300},
                    log_exposure=True,
                )
            ],
        ),
        (
            "Route",
            [apb.RouteRequest(experiment_key="exp", unit_id="fresh-3", request_id="f3", attributes=struct(a=NAN))],
        ),
        ("Route", [apb.RouteRequest(experiment_key="exp-stop", unit_id="fresh-4", request_id="f4", features=features)]),
        (
            "CheckBalance",
            [apb.CheckBalanceRequest(key="exp", units=[apb.PlannedUnit(unit_id="p", attributes=struct(x=INF))])],
        ),
        ("AnalyzeExperiment", [apb.AnalyzeExperimentRequest(key="exp", bootstrap_resamples=2**31 - 1)]),
        ("AnalyzeExperiment", [apb.AnalyzeExperimentRequest(key="exp", bootstrap_resamples=20, seed=-1)]),
        ("AnalyzeExperiment", [apb.AnalyzeExperimentRequest(key="exp", confidence=NAN, winsor_quantile=2.0)]),
        ("AuditExperiment", [apb.AuditExperimentRequest(key="exp", min_sample=2**63 - 1, min_deviation=NAN)]),
        (
            "RecordMetrics",
            [apb.RecordMetricsRequest(experiment_key="exp", observations=[apb.MetricObservation()] * 100_001)],
        ),
        (
            "RecordMetrics",
            [
                apb.RecordMetricsRequest(
                    experiment_key="exp",
                    observations=[
                        apb.MetricObservation(unit_id="u1", metric="clicks", value=1.0),
                        apb.MetricObservation(unit_id="u2", metric="clicks", value=NAN),
                    ],
                )
            ],
        ),
        ("UpdateExperiment", [apb.UpdateExperimentRequest(spec=apb.ExperimentSpec(key="exp", arms=[*arms, arms[0]]))]),
        ("AssignBatch", [apb.AssignBatchRequest(experiment_key="exp", unit_ids=["u"] * 100_000)]),
        ("AssignBatch", [apb.AssignBatchRequest(experiment_key="exp-bandit", unit_ids=["u"])]),
        ("GetExperiment", [apb.GetExperimentRequest(key="k" * 100_000)]),  # the error must not echo 100 KB
    ]
    return Setup(seeds, templates, corpus)


SETUPS = {
    "scheduler": setup_scheduler,
    "paramserver": setup_paramserver,
    "scorer": setup_scorer,
    "abrouter": setup_abrouter,
}


# -- the mesh ---------------------------------------------------------------------------------------------


@dataclass(repr=False)  # a short repr: pytest prints the fixture when a test fails
class Mesh:
    config: MeshConfig
    running: dict[str, RunningService]
    channels: dict[str, grpc.Channel]
    setups: dict[str, Setup] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Mesh({', '.join(f'{n}@{s.address}' for n, s in self.running.items())})"


def fuzz_config(tmp_path: Path, **overrides: object) -> MeshConfig:
    return make_config(
        tmp_path,
        **{
            "grpc.max_message_mib": MAX_MESSAGE_MIB,
            # No background work during the run: state changes only through the calls under test.
            "scheduler.reap_interval_s": 3600.0,
            "scheduler.sqlite_synchronous": "NORMAL",
            "abrouter.sqlite_synchronous": "NORMAL",
            "abrouter.guardrail_interval_s": 3600.0,
            "abrouter.audit_interval_s": 0.0,
            "paramserver.monitor_interval_s": 3600.0,
            "scorer.device": "cpu",
            **{f"services.{name}.port": 0 for name in KNOWN_SERVICES},
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # grpc logs every request it cannot parse (the raw-bytes cases) with a traceback: keep the output readable.
    grpc_log = logging.getLogger("grpc._common")
    level = grpc_log.level
    grpc_log.setLevel(logging.CRITICAL)
    running: dict[str, RunningService] = {}
    channels: dict[str, grpc.Channel] = {}
    scorer_config = fuzz_config(tmp)
    running["scorer"] = start_service(load_definition("scorer"), scorer_config, port=0)
    # The abrouter's Route calls the scorer through discovery: point it at the real one.
    config = fuzz_config(tmp, **{"services.scorer.port": running["scorer"].port})
    try:
        for name in ("scheduler", "paramserver", "abrouter"):
            running[name] = start_service(load_definition(name), config, port=0)
        for name, service in running.items():
            channels[name] = open_channel(name, config, address=service.address)
        mesh = Mesh(config, running, channels)
        for name in ("scheduler", "paramserver", "scorer", "abrouter"):  # the abrouter routes to the scorer's model
            mesh.setups[name] = SETUPS[name](channels[name])
        yield mesh
    finally:
        for channel in channels.values():
            channel.close()
        for name in ("abrouter", "scheduler", "paramserver", "scorer"):
            if name in running:
                running[name].stop(grace=0.5)
        grpc_log.setLevel(level)
        if REPORT:
            print("\nfuzz calls per service:", {k: REPORT[k] for k in sorted(REPORT)}, "total", sum(REPORT.values()))


REPORT: dict[str, int] = {}


def assert_serving(channel: grpc.Channel, name: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", name):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, f"{name} health({service!r}): {resp.status}"


# -- the fuzz run -----------------------------------------------------------------------------------------


@dataclass(repr=False)
class Run:
    service: str
    channel: grpc.Channel
    snapshot: Callable[[], dict[str, str]]
    state: dict[str, str]
    calls: int = 0
    skipped: int = 0
    codes: dict[str, Counter[str]] = field(default_factory=dict)
    failures: dict[tuple[str, ...], str] = field(default_factory=dict)
    slowest: tuple[float, str] = (0.0, "")
    seconds: Counter[str] = field(default_factory=Counter)
    by_method: dict[str, Counter[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Run({self.service}: {self.calls} calls, {len(self.failures)} failures)"

    def fail(self, method: MethodDescriptor, kind: str, detail: str, request: Any) -> None:
        key = (method.name, kind, re.sub(r"\d+", "N", detail)[:80])
        if key not in self.failures:
            self.failures[key] = f"{method.full_name} [{kind}] {detail[:300]}\n      request: {str(request)[:900]}"


class Lazy:
    """A request summary, built only when a failure is recorded."""

    def __init__(self, build: Callable[[], str]) -> None:
        self.build = build

    def __str__(self) -> str:
        return self.build()


def judge(
    run: Run,
    method: MethodDescriptor,
    source: str,
    msgs: list[Message] | None,
    payloads: list[bytes],
    *,
    check_reads: bool = False,
) -> None:
    """Make one call and record what was wrong with its answer or with the state after it.

    The state is compared after every call of a mutating RPC; after a read-only RPC only with ``check_reads``
    (otherwise once after all its calls, in :func:`fuzz_method`).
    """
    may_wait = False
    rule = MAY_WAIT.get(method.full_name)
    if rule is not None:
        try:
            parsed = msgs[0] if msgs else message_class(method.input_type).FromString(payloads[0])
            may_wait = bool(rule(parsed))
        except Exception:
            may_wait = False
    if may_wait:  # a stream that waits by design: its first message (or its deadline) is enough
        out = invoke(run.channel, method, payloads, WAIT_DEADLINE_S, limit=1)
    else:
        out = invoke(run.channel, method, payloads, CALL_DEADLINE_S)
    run.calls += 1
    run.codes.setdefault(source, Counter())[out.code.name] += 1
    run.by_method.setdefault(method.name, Counter())[f"{source}:{out.code.name}"] += 1
    request = Lazy(lambda: short(msgs, payloads))
    if out.seconds > run.slowest[0]:
        run.slowest = (out.seconds, f"{method.name} {out.code.name}")
    code = out.code
    if code == G.UNKNOWN:
        run.fail(method, "UNKNOWN: unhandled exception in the servicer", out.details, request)
    elif code == G.DEADLINE_EXCEEDED and not may_wait:
        run.fail(method, "DEADLINE_EXCEEDED on a call that should be quick", out.details, request)
    elif code == G.INTERNAL and source == "raw" and "deserializ" in out.details.lower():
        pass  # grpc's own answer to bytes that do not parse
    elif code == G.RESOURCE_EXHAUSTED and "metadata size exceeds" in out.details:
        # The server's status message was larger than the client accepts (16 KiB): the real status is lost.
        run.fail(method, "status message over the metadata limit (the error echoes its input)", out.details, request)
    elif code not in PROPER and not (code == G.DEADLINE_EXCEEDED and may_wait):
        run.fail(method, f"improper status {code.name}", out.details, request)
    elif code != G.OK and not out.details.strip():
        run.fail(method, f"{code.name} without a message", "", request)
    elif code == G.OK and not may_wait and out.seconds > SLOW_CALL_S:
        run.fail(method, f"took {out.seconds:.1f}s", "", request)
    read_only = method.name in READ_ONLY
    if read_only and not check_reads:
        return
    after = run.snapshot()
    if code == G.OK and not read_only:
        run.state = after  # an accepted change
    elif after != run.state:
        why = "read-only RPC changed state" if read_only else f"rejected call ({code.name}) changed state"
        run.fail(method, why, state_diff(run.state, after), request)
        run.state = after


def source_strategies(
    seeds: Seeds, templates: list[list[Message]], method: MethodDescriptor
) -> list[tuple[str, Any, int]]:
    """(source, strategy, examples): generated messages, mutated valid requests, raw bytes."""
    streaming = method.client_streaming
    gen = message_strategy(method.input_type, seeds)
    generated = st.lists(gen, max_size=4) if streaming else gen.map(lambda m: [m])
    out: list[tuple[str, Any, int]] = [("gen", generated, EXAMPLES["gen"])]
    if templates:
        out.append(("mut", mutated_strategy(templates, seeds, streaming), EXAMPLES["mut"]))
    else:
        out[0] = ("gen", generated, EXAMPLES["gen"] + EXAMPLES["mut"])
    out.append(("raw", raw_strategy(templates, streaming), EXAMPLES["raw"]))
    return out


def fuzz_source(run: Run, method: MethodDescriptor, source: str, strategy: Any, examples: int) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        items = data.draw(strategy)
        if source == "raw":
            msgs, payloads = None, list(items)
        else:
            msgs = list(items)
            try:
                payloads = [m.SerializeToString() for m in msgs]
            except Exception:  # protobuf refused a value on the client
                run.skipped += 1
                return
        if sum(len(p) for p in payloads) > PAYLOAD_CAP:
            run.skipped += 1
            return
        judge(run, method, source, msgs, payloads)

    one()


def fuzz_method(run: Run, method: MethodDescriptor, seeds: Seeds, templates: list[list[Message]]) -> None:
    started = time.monotonic()
    for source, strategy, examples in source_strategies(seeds, templates, method):
        fuzz_source(run, method, source, strategy, examples)
    if method.name in READ_ONLY:
        after = run.snapshot()
        if after != run.state:
            run.fail(method, "read-only RPC changed state", state_diff(run.state, after), "(one of its calls)")
            run.state = after
    run.seconds[method.name] += time.monotonic() - started


@pytest.mark.parametrize("service", KNOWN_SERVICES)
def test_fuzz_every_rpc(mesh: Mesh, service: str) -> None:
    channel = mesh.channels[service]
    setup = mesh.setups[service]
    snapshot = SNAPSHOTS[service]
    run = Run(service, channel, lambda: snapshot(channel), snapshot(channel))
    started = time.monotonic()
    refused_before = REFUSED[FieldDescriptor.TYPE_STRING]
    methods = methods_of(service)
    by_name = {m.name: m for m in methods}
    for name, msgs in setup.corpus:
        judge(run, by_name[name], "corpus", msgs, [m.SerializeToString() for m in msgs], check_reads=True)
    for method in methods:
        fuzz_method(run, method, setup.seeds, setup.templates.get(method.name, []))
    assert_serving(channel, service)
    REPORT[service] = run.calls
    codes = {src: dict(sorted(c.items())) for src, c in sorted(run.codes.items())}
    print(
        f"\n{service}: {run.calls} calls over {len(methods)} RPCs in {time.monotonic() - started:.1f}s "
        f"({run.skipped} requests too large or refused by protobuf, "
        f"{REFUSED[FieldDescriptor.TYPE_STRING] - refused_before} lone-surrogate strings left unset); "
        f"slowest call {run.slowest[0]:.2f}s ({run.slowest[1]}); "
        f"slowest RPCs {[(m, round(t, 1)) for m, t in run.seconds.most_common(4)]}; codes {codes}"
    )
    if os.environ.get("FUZZ_VERBOSE"):
        for name, counts in run.by_method.items():
            print(f"  {name}: {dict(sorted(counts.items()))}")
    if run.failures:
        failures = "\n".join(f"  - {f}" for f in run.failures.values())
        pytest.fail(f"{service}: {len(run.failures)} distinct failures:\n{failures}", pytrace=False)


# -- message-size limits ----------------------------------------------------------------------------------

OVERSIZE = 2 * MAX_MESSAGE_MIB * 1024 * 1024


def oversized_requests() -> dict[str, list[tuple[str, Message]]]:
    """A unary request of 2x the message limit per service (real messages, one big field each)."""
    big = b"\x00" * OVERSIZE
    return {
        "scheduler": [("RegisterNode", spb.RegisterNodeRequest(node=spb.NodeSpec(name="x" * OVERSIZE)))],
        "paramserver": [
            (
                "Push",
                ppb.PushRequest(
                    model="m1",
                    worker_id="w0",
                    gradients=[ppb.NamedTensor(name="w", tensor=common_pb2.Tensor(dtype=1, shape=[2, 3], data=big))],
                ),
            )
        ],
        "scorer": [
            (
                "RegisterModel",
                cpb.RegisterModelRequest(model="risk", version="big", features=FEATURES, format=1, payload=big),
            ),
            ("ModelInfer", opb.ModelInferRequest(model_name="risk", raw_input_contents=[big])),
        ],
        "abrouter": [
            (
                "CreateExperiment",
                apb.CreateExperimentRequest(spec=apb.ExperimentSpec(key="big", condition_json="x" * OVERSIZE)),
            )
        ],
    }


def test_message_size_limits(mesh: Mesh) -> None:
    # A client allowed to send 64 MiB, so the servers' 4 MiB limit is what answers.
    client_config = mesh.config.with_overrides({"grpc.max_message_mib": 64})
    for service, cases in oversized_requests().items():
        channel = open_channel(service, client_config, address=mesh.running[service].address)
        try:
            methods = {m.name: m for m in methods_of(service)}
            before = SNAPSHOTS[service](mesh.channels[service])
            for name, request in cases:
                payload = request.SerializeToString()
                assert len(payload) > OVERSIZE
                out = invoke(channel, methods[name], [payload], CALL_DEADLINE_S)
                assert out.code == G.RESOURCE_EXHAUSTED, f"{service}.{name}: {out.code} {out.details}"
            assert_serving(mesh.channels[service], service)
            assert SNAPSHOTS[service](mesh.channels[service]) == before
        finally:
            channel.close()

    # A client stream with one oversized chunk: refused when that chunk arrives, without reading the rest.
    ps = mesh.running["paramserver"]
    channel = open_channel("paramserver", client_config, address=ps.address)
    stub = ppb_grpc.ParamServerServiceStub(channel)
    pulled: list[int] = []

    def push_stream() -> Iterator[ppb.PushStreamRequest]:
        header = ppb.StreamHeader(
            model="m1",
            version=0,
            worker_id="big",
            step_id=1,
            tensors=[ppb.TensorInfo(name="w", dtype=common_pb2.D_TYPE_FLOAT32, shape=[2, 3])],
        )
        yield ppb.PushStreamRequest(header=header)
        yield ppb.PushStreamRequest(chunk=ppb.TensorChunk(tensor=0, offset=0, data=b"\x00" * OVERSIZE))
        for i in range(200):
            pulled.append(i)
            yield ppb.PushStreamRequest(chunk=ppb.TensorChunk(tensor=0, offset=0, data=b"\x00" * 1_000_000))

    def create_stream() -> Iterator[ppb.CreateModelStreamRequest]:
        header = ppb.CreateModelRequest(
            model="m-big",
            tensors=[ppb.NamedTensor(name="w", tensor=common_pb2.Tensor(dtype=1, shape=[4 * OVERSIZE]))],
            optimizer=ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_SGD, learning_rate=0.1),
            consistency=ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_ASYNC),
        )
        yield ppb.CreateModelStreamRequest(header=header)
        yield ppb.CreateModelStreamRequest(chunk=ppb.TensorChunk(tensor=0, offset=0, data=b"\x00" * OVERSIZE))

    try:
        before = snapshot_paramserver(mesh.channels["paramserver"])
        for call, stream in ((stub.PushStream, push_stream), (stub.CreateModelStream, create_stream)):
            with pytest.raises(grpc.RpcError) as err:
                call(stream(), timeout=CALL_DEADLINE_S)
            assert err.value.code() == G.RESOURCE_EXHAUSTED, f"{err.value.code()} {err.value.details()}"
        # The stream was cut off, not read to its end (judged by what was consumed, not by a time limit).
        assert len(pulled) < 200
        assert_serving(mesh.channels["paramserver"], "paramserver")
        assert snapshot_paramserver(mesh.channels["paramserver"]) == before
        with pytest.raises(grpc.RpcError) as err:
            ppb_grpc.ParamServerServiceStub(mesh.channels["paramserver"]).DescribeModel(
                ppb.DescribeModelRequest(model="m-big"), timeout=CALL_DEADLINE_S
            )
        assert err.value.code() == G.NOT_FOUND
    finally:
        channel.close()
