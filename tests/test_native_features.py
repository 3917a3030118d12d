"""Score's feature map split off the request's bytes natively (native/features.pyx, services/scorer/wire.py),
checked against protobuf's own parser (upb) on generated, shuffled, corrupt and truncated messages, and end to
end on a real scorer server against the same calls made with plain dicts through ``Scorer.score``."""

from __future__ import annotations

import itertools
import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.internal import api_implementation

from guardmesh.client import open_channel
from guardmesh.errors import GuardmeshError
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from native.features import split_score_request
from services.scorer.scorer import ScoreCall, ScoreOutcome, Scorer
from services.scorer.server import ScoreRequestOnWire, parse_score_request
from services.scorer.wire import WireFeatures, layout_of, names_of

from .conftest import make_config
from .test_scorer import logistic, tensor, torchscript

# -- protobuf wire format by hand: the generator writes what a client library never would -------------------


def varint(n: int, pad: int = 0) -> bytes:
    """``n`` as a varint, ``pad`` extra bytes long (an over-long encoding protobuf still accepts)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n == 0 and pad == 0:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)
        if n == 0:
            pad -= 1


def tag(number: int, wire: int, pad: int = 0) -> bytes:
    return varint((number << 3) | wire, pad)


def delimited(number: int, payload: bytes, pad: int = 0) -> bytes:
    return tag(number, 2, pad) + varint(len(payload)) + payload


def double(number: int, value: float) -> bytes:
    return tag(number, 1) + struct.pack("<d", value)


def bits(x: float) -> bytes:
    """A double's bytes: tells -0.0 from 0.0 and compares NaN."""
    return struct.pack("<d", x)


#: Feature names the generator draws from: empty, non-ASCII (2, 3 and 4 bytes), NUL, long, look-alikes.
NAMES = ["", "x0", "x1", "größe", "日本", "\U0001f600 emoji", "a\x00b", "k" * 300, "X0", "x0 ", "é", "e\u0301"]
#: Values with edge cases: NaN, infinities, signed zeros, subnormals, float32 and float64 limits.
VALUES = [0.0, -0.0, 1.5, -2.25, math.nan, -math.nan, math.inf, -math.inf, 5e-324, -5e-324, 2.2e-308,
          3.4028234663852886e38, 3.5e38, 1.7976931348623157e308, 1e-45]  # fmt: skip


@dataclass
class Built:
    """A generated ScoreRequest's bytes, and what the split must give for them."""

    raw: bytes
    #: (key, value) per features entry in wire order, as protobuf reads each entry.
    entries: list[tuple[str, float]] = field(default_factory=list)
    #: Whether the kernel takes these bytes itself (False: it must leave them to protobuf).
    native: bool = True


def unknown_field(rng: random.Random, number: int) -> bytes:
    """One unknown field of a random wire type (0, 1, 2 or 5)."""
    wire = rng.choice([0, 1, 2, 5])
    if wire == 0:
        return tag(number, 0) + varint(rng.choice([0, 1, 300, 2**63, 2**64 - 1]))
    if wire == 1:
        return tag(number, 1) + rng.randbytes(8)
    if wire == 5:
        return tag(number, 5) + rng.randbytes(4)
    return delimited(number, rng.randbytes(rng.randrange(0, 20)))


def entry(rng: random.Random, built: Built) -> bytes:
    """One features entry: key and value each absent, present or repeated, in any order; sometimes an unknown
    field, a key or value with another wire type, or a padded tag (protobuf's rules decide what it means)."""
    parts: list[tuple[str, bytes, object]] = []
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        name = rng.choice(NAMES)
        parts.append(("key", delimited(1, name.encode(), pad=rng.choice([0, 0, 0, 1])), name))
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        value = rng.choice(VALUES) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
        parts.append(("value", double(2, value), value))
    if rng.random() < 0.08:  # protobuf keeps an entry with any other field out of the map
        parts.append(("other", unknown_field(rng, rng.choice([3, 4, 9, 1000])), None))
        built.native = False
    if rng.random() < 0.04:  # a key or value with another wire type is such a field too
        parts.append(("other", tag(rng.choice([1, 2]), 0) + varint(5), None))
        built.native = False
    rng.shuffle(parts)
    key, value = "", 0.0
    for kind, _, content in parts:
        if kind == "key":
            key = str(content)
        elif kind == "value":
            value = float(content)  # type: ignore[arg-type]
    built.entries.append((key, value))
    return delimited(3, b"".join(p for _, p, _ in parts), pad=rng.choice([0, 0, 0, 0, 1]))


def generate(rng: random.Random) -> Built:
    """A ScoreRequest with every field set or not (some repeated), features entries, unknown fields of every
    wire type, sometimes a group, all in shuffled order."""
    built = Built(b"")
    chunks: list[bytes] = []
    for number in (1, 2, 4, 5, 6):
        for _ in range(rng.choice([0, 1, 1, 2])):
            chunks.append(delimited(number, rng.choice([*NAMES, "risk", "r-1", "v2"]).encode()))
    for number in (7, 8):
        for _ in range(rng.choice([0, 1, 2])):
            chunks.append(tag(number, 0) + varint(rng.choice([0, 1, 2])))
    for _ in range(rng.choice([0, 0, 1, 3])):
        chunks.append(unknown_field(rng, rng.choice([9, 15, 16, 2047, 2**29 - 1])))
    if rng.random() < 0.05:  # a group (wire types 3 and 4): protobuf skips it, the kernel leaves it to protobuf
        chunks.append(tag(12, 3) + unknown_field(rng, 1) + tag(12, 4))
        built.native = False
    features = [entry(rng, built) for _ in range(rng.choice([0, 1, 2, 5, 30]))]
    if features and rng.random() < 0.3:  # a repeated key: the last entry wins
        features.append(features[0])
        built.entries.append(built.entries[0])
    # Fields in any order, but the entries' relative order is the map's wire order.
    slots = sorted(rng.sample(range(len(chunks) + len(features)), len(features)))
    merged: list[bytes] = []
    it_chunks, it_features = iter(rng.sample(chunks, len(chunks))), iter(features)
    for k in range(len(chunks) + len(features)):
        merged.append(next(it_features) if k in slots else next(it_chunks))
    built.raw = b"".join(merged)
    return built


def upb(raw: bytes) -> pb.ScoreRequest | None:
    """Protobuf's own parse of the bytes; None where it refuses them."""
    try:
        return pb.ScoreRequest.FromString(raw)
    except Exception:  # DecodeError
        return None


def ours(raw: bytes) -> ScoreRequestOnWire | None:
    """Score's deserializer; None where it refuses the bytes (as the server does, INVALID_ARGUMENT)."""
    try:
        return parse_score_request(raw)
    except Exception:
        return None


def without_features(message: pb.ScoreRequest) -> bytes:
    rest = pb.ScoreRequest()
    rest.CopyFrom(message)
    rest.ClearField("features")
    return rest.SerializeToString()


def by_name(features: object) -> dict[str, bytes]:
    return {k: bits(v) for k, v in dict(features).items()}  # type: ignore[call-overload]


def assert_same_as_protobuf(raw: bytes) -> ScoreRequestOnWire | None:
    """The deserializer refuses exactly when protobuf does, and gives what protobuf gives otherwise."""
    expected, got = upb(raw), ours(raw)
    assert (got is None) == (expected is None), raw
    if got is None or expected is None:
        return None
    assert by_name(got.features) == by_name(expected.features), raw
    if isinstance(got.features, WireFeatures):
        assert got.message.SerializeToString() == without_features(expected), raw
        assert not got.message.features
    else:  # protobuf parsed the whole request
        assert got.message == expected
    return got


def test_protobuf_here_is_upb() -> None:
    """The rules below are upb's, checked by comparison: they hold for the runtime the scorer runs on."""
    assert api_implementation.Type() == "upb"


def test_the_split_equals_protobufs_parse_on_generated_messages() -> None:
    rng = random.Random(22)
    native = 0
    for _ in range(3000):
        built = generate(rng)
        got = assert_same_as_protobuf(built.raw)
        assert got is not None, built.raw
        assert isinstance(got.features, WireFeatures) == built.native, built.raw
        if built.native:
            native += 1
            wire = got.features
            assert isinstance(wire, WireFeatures)
            names = names_of(wire.layout)
            assert [(n, bits(v)) for n, v in zip(names, wire.entry_values.tolist(), strict=True)] == [
                (n, bits(v)) for n, v in built.entries
            ]
            # last entry wins, first appearance orders: as a dict built from the entries in wire order
            assert list(wire) == list(dict(built.entries))
            assert len(wire) == len(dict(built.entries))
    assert native > 1500  # most messages are taken natively: the comparison above is not all fallbacks


def test_map_entry_rules_pinned() -> None:
    """upb's rules as the kernel follows them, one case each (the generated test covers their mixtures)."""
    cases = {
        # missing key "" and missing value 0.0; within an entry the last key and value win; fields in any order
        delimited(3, double(2, 3.0)): [("", 3.0)],
        delimited(3, delimited(1, b"b")): [("b", 0.0)],
        delimited(3, double(2, 3.0) + delimited(1, b"c")): [("c", 3.0)],
        delimited(3, delimited(1, b"a") + delimited(1, b"b") + double(2, 1.0) + double(2, 2.0)): [("b", 2.0)],
        delimited(3, b""): [("", 0.0)],
        # a repeated key across entries: both come back in wire order, the mapping keeps the last
        delimited(3, delimited(1, b"a") + double(2, 1.0)) + delimited(3, delimited(1, b"a") + double(2, 2.0)): [
            ("a", 1.0),
            ("a", 2.0),
        ],
        # a NUL and 4-byte UTF-8 are valid keys
        delimited(3, delimited(1, "a\x00\U0010ffff".encode()) + double(2, 1.0)): [("a\x00\U0010ffff", 1.0)],
    }
    for raw, entries in cases.items():
        got = assert_same_as_protobuf(raw)
        assert got is not None and isinstance(got.features, WireFeatures)
        assert list(zip(names_of(got.features.layout), got.features.entry_values.tolist(), strict=True)) == entries
    assert dict(parse_score_request(list(cases)[5]).features) == {"a": 2.0}


def test_what_upb_does_not_put_in_the_map_is_left_to_protobuf() -> None:
    """upb keeps an entry holding any field besides key and value out of the map (into the message's unknown
    fields): the kernel gives such bytes to protobuf, so the map and the message are exactly protobuf's."""
    for extra in (tag(5, 0) + varint(1), delimited(6, b"xx"), tag(7, 5) + b"1234", tag(8, 1) + b"12345678",
                  tag(9, 3) + tag(9, 4), tag(1, 0) + varint(5), tag(2, 0) + varint(5), tag(2, 5) + b"\0\0\x80?",
                  delimited(2, struct.pack("<d", 7.0)), tag(1, 1) + bytes(8)):  # fmt: skip
        raw = delimited(1, b"risk") + delimited(3, delimited(1, b"u") + extra + double(2, 4.0))
        assert split_score_request(raw) is None
        got = assert_same_as_protobuf(raw)
        assert got is not None and dict(got.features) == {}
    # features with another wire type than length-delimited: an unknown field to protobuf
    for raw in (tag(3, 0) + varint(5), tag(3, 1) + bytes(8), tag(3, 5) + bytes(4)):
        assert split_score_request(raw) is None
        got = assert_same_as_protobuf(raw)
        assert got is not None and dict(got.features) == {}


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf5\x80\x80\x80", b"\xe2\x82", b"\x80", b"a\xc3", b"\xf0\x8f\xbf\xbf", b"\xe2\x28\xa1"]  # fmt: skip


def test_keys_that_are_not_utf8_are_refused_as_protobuf_refuses_them() -> None:
    for key in BAD_UTF8:
        raw = delimited(1, b"risk") + delimited(3, delimited(1, key) + double(2, 1.0))
        assert upb(raw) is None and ours(raw) is None, key
    # a sequence split between two keys is two invalid keys, though the blob of both would be valid
    raw = delimited(3, delimited(1, b"\xc3")) + delimited(3, delimited(1, b"\xa9"))
    assert upb(raw) is None and ours(raw) is None
    # every two-byte key, and three- and four-byte keys around the table's edges, against protobuf
    rng = random.Random(7)
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE,
             0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]  # fmt: skip
    keys = [bytes([a, b]) for a in range(256) for b in range(256)]
    keys += [bytes(t) for t in itertools.product(edges, repeat=3)]
    keys += [bytes([rng.choice(edges) for _ in range(4)]) for _ in range(20000)]
    refused = 0
    for key in keys:
        raw = delimited(3, delimited(1, key) + double(2, 2.0))
        expected = upb(raw)
        got = ours(raw)
        assert (got is None) == (expected is None), key
        refused += got is None
        if got is not None:
            assert isinstance(got.features, WireFeatures) and dict(got.features) == {key.decode(): 2.0}
    assert 0 < refused < len(keys)


def test_corrupt_bytes_are_refused_exactly_when_protobuf_refuses_them() -> None:
    rng = random.Random(5)
    corrupt = [
        tag(9, 0) + b"\xff" * 10 + b"\x01",  # an 11-byte varint
        tag(9, 0) + b"\xff" * 9 + b"\x7f",  # a 10-byte varint protobuf takes
        b"\x88\x80\x80\x80\x80\x00",  # a 6-byte tag
        b"\x9a\x80\x80\x80\x00\x00",  # field 3 with a padded 5-byte tag, an empty entry
        b"\x80\x80\x80\x80\x10\x01",  # field number 2**29
        b"\xf8\xff\xff\xff\x0f\x01",  # field number 2**29 - 1
        b"\x00\x01",  # field number 0
        tag(9, 4),  # an end-group with no start
        tag(9, 3),  # a group never ended
        tag(9, 6),
        tag(9, 7),
        tag(3, 2) + varint(5) + delimited(1, b"a"),  # an entry longer than the message
        delimited(3, tag(1, 2) + varint(9) + b"ab"),  # a key longer than its entry
        delimited(3, delimited(1, b"a") + tag(2, 1) + b"\0\0\0"),  # a value cut short inside its entry
        delimited(3, tag(1, 2) + b"\x80\x80\x80\x80\x80\x01"),  # a key length of six bytes
        tag(3, 2) + b"\xff\xff\xff\xff\x0f",  # a 4 GiB entry
        delimited(1, b"\xff"),  # invalid UTF-8 in the model name: protobuf refuses the rest's bytes
        delimited(3, tag(0, 0) + b"\x01"),  # field number 0 inside an entry
    ]
    for raw in corrupt:
        assert_same_as_protobuf(raw)
        assert_same_as_protobuf(delimited(1, b"risk") + raw + delimited(3, delimited(1, b"x0") + double(2, 1.0)))
    samples = [generate(rng).raw for _ in range(12)]
    samples.append(layout_request([f"x{i}" for i in range(40)], 1.0))
    for raw in samples:  # truncated at every byte
        for k in range(len(raw)):
            assert_same_as_protobuf(raw[:k])
    for raw in samples:  # bytes flipped, dropped or inserted at random
        for _ in range(400):
            mutated = bytearray(raw)
            at = rng.randrange(len(mutated) + 1)
            how = rng.randrange(3)
            if how == 0 and at < len(mutated):
                mutated[at] = rng.randrange(256)
            elif how == 1 and at < len(mutated):
                del mutated[at]
            else:
                mutated[at:at] = bytes([rng.randrange(256)])
            assert_same_as_protobuf(bytes(mutated))


def layout_request(names: list[str], value: float, **fields: str) -> bytes:
    head = pb.ScoreRequest(**fields).SerializeToString()  # type: ignore[arg-type]
    return head + b"".join(delimited(3, delimited(1, n.encode()) + double(2, value + i)) for i, n in enumerate(names))


def test_layout_names_one_order_of_names() -> None:
    """Equal layouts name the same features in the same order; where the names' bytes run together alike, the
    end offsets still tell them apart."""
    assert layout_of(["ab", "c"]) != layout_of(["a", "bc"]) and layout_of(["ab", "c"])[0] == layout_of(["a", "bc"])[0]
    assert names_of(layout_of(["größe", "", "日本"])) == ("größe", "", "日本")
    assert names_of(layout_of([])) == ()
    split = split_score_request(layout_request(["ab", "c"], 0.0))
    assert split is not None
    assert WireFeatures(split[1], split[2], split[3]).layout == layout_of(["ab", "c"]) != layout_of(["a", "bc"])


# -- end to end: a real scorer server, its Score deserializer, against plain dicts through Scorer.score ------

SCORE = "/guardmesh.v1.ScorerService/Score"
LINE = ["amount", "größe", "日本", "velocity", "x"]


def start(tmp_path: Path, name: str) -> RunningService:
    config = make_config(
        tmp_path / name, **{"services.scorer.port": 0, "scorer.drift_every": 5, "scorer.min_labels": 50}
    )
    return start_service(load_definition("scorer"), config, port=0)


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[tuple[RunningService, RunningService]]:
    """Two scorers with the same model line: one scored over gRPC, one through ``Scorer.score``."""
    served, alone = start(tmp_path, "served"), start(tmp_path, "alone")
    reference = np.random.default_rng(3).standard_normal((500, len(LINE))).astype(np.float32)
    model = logistic([1.0, -0.5, 0.25, 2.0, -1.0], 0.1)
    for running in (served, alone):
        channel = open_channel("scorer", running.config, address=running.address)
        pb_grpc.ScorerServiceStub(channel).RegisterModel(
            pb.RegisterModelRequest(
                model="risk",
                version="v1",
                features=LINE,
                format=pb.MODEL_FORMAT_TORCHSCRIPT,
                payload=torchscript(model),
                reference=tensor(reference),
                activate=True,
                rules=[pb.ScoringRule(name="huge", feature="x", limit=3.0, block=True)],
            )
        )
        channel.close()
    yield served, alone
    for running in (served, alone):
        running.stop(grace=0.5)


def wire_maps(rng: np.random.Generator) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """(what, entries in wire order): the line's order, others, unknown and bad features, missing ones."""
    for k in range(60):
        values = [float(v) for v in rng.standard_normal(len(LINE)) * 1.5]
        entries = list(zip(LINE, values, strict=True))
        kind = k % 10
        if kind == 1:
            yield "reversed", entries[::-1]
        elif kind == 2:
            yield "shuffled", [entries[i] for i in rng.permutation(len(entries))]
        elif kind == 3:
            yield "unknown", [*entries[:2], ("nope", 1.0), *entries[2:3], ("amount", math.inf)]
        elif kind == 4:
            yield "too big first", [*entries[:1], ("größe", -3.5e38), ("nope", 1.0), *entries[2:]]
        elif kind == 5:
            yield "missing", entries[:1] + entries[2:]  # absent: imputed from the reference median
        elif kind == 6:
            yield "nan", [*entries[:3], ("velocity", math.nan), *entries[4:]]
        elif kind == 7:
            yield "repeated", [*entries, ("amount", values[0] + 1.0)]  # the last entry wins
        elif kind == 8:
            yield "rule", [*entries[:4], ("x", 9.0)]
        elif kind == 9 and k == 9:
            yield "empty", []
        else:
            yield "line order", entries


def test_score_over_the_wire_answers_as_plain_dicts_through_scorer_score(
    twins: tuple[RunningService, RunningService],
) -> None:
    served, alone = twins
    core: Scorer = alone.binding.servicer.core  # type: ignore[attr-defined]
    channel = open_channel("scorer", served.config, address=served.address)
    # bytes as written here: the entries go in this order, not protobuf's map order
    score_bytes = channel.unary_unary(SCORE, request_serializer=None, response_deserializer=pb.ScoreResponse.FromString)
    seen = set()
    try:
        for k, (what, entries) in enumerate(wire_maps(np.random.default_rng(11))):
            raw = pb.ScoreRequest(model="risk", request_id=f"r{k}").SerializeToString() + b"".join(
                delimited(3, delimited(1, n.encode()) + double(2, v)) for n, v in entries
            )
            parsed = parse_score_request(raw)
            assert isinstance(parsed.features, WireFeatures)  # the native path, not protobuf's map
            try:
                expected: ScoreOutcome | GuardmeshError = core.score("risk", f"r{k}", dict(entries))
            except GuardmeshError as exc:
                expected = exc
            try:
                got = score_bytes(raw, timeout=60)
            except grpc.RpcError as err:
                assert isinstance(expected, GuardmeshError), (what, err.details())
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == expected.message, what
                seen.add(f"{what}: refused")
                continue
            assert isinstance(expected, ScoreOutcome), (what, expected)
            d = expected.decision
            assert (got.score, got.decision, got.threshold, got.path, got.drift_score, got.imputed) == (
                d.score or 0.0,
                d.positive,
                d.threshold or 0.0,
                d.path,
                d.drift_score,
                expected.imputed,
            ), what
            seen.add(what)
    finally:
        channel.close()
    assert {"line order", "reversed", "shuffled", "missing", "nan", "repeated", "rule", "empty"} <= seen
    assert {"unknown: refused", "too big first: refused"} <= seen
    # and the two scorers' drift windows hold the same rows
    served_core: Scorer = served.binding.servicer.core  # type: ignore[attr-defined]
    np.testing.assert_array_equal(served_core.live_rows("risk"), core.live_rows("risk"))
    assert served_core.lines["risk"].drift_score == core.lines["risk"].drift_score


def test_a_message_still_scores_through_the_servicer(twins: tuple[RunningService, RunningService]) -> None:
    """Score given a parsed message (an in-process caller), or bytes protobuf had to parse (an entry with an
    unknown field), answers as before."""
    served, _ = twins
    channel = open_channel("scorer", served.config, address=served.address)
    try:
        stub = pb_grpc.ScorerServiceStub(channel)
        features = dict(zip(LINE, [0.5, 0.1, -0.2, 0.3, 0.0], strict=True))
        plain = stub.Score(pb.ScoreRequest(model="risk", request_id="p", features=features, shadow=True))
        raw = pb.ScoreRequest(model="risk", request_id="q", shadow=True).SerializeToString() + b"".join(
            delimited(3, delimited(1, n.encode()) + double(2, v)) for n, v in features.items()
        )
        odd = raw + delimited(3, delimited(1, b"nope") + tag(9, 0) + varint(1) + double(2, 1.0))
        assert not isinstance(parse_score_request(odd).features, WireFeatures)  # protobuf's map: "nope" not in it
        score_bytes = channel.unary_unary(
            "/guardmesh.v1.ScorerService/Score",
            request_serializer=None,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        assert score_bytes(odd, timeout=60) == plain == score_bytes(raw, timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            score_bytes(raw + delimited(3, delimited(1, b"\xff")), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Score" in err.value.details()
    finally:
        channel.close()


def test_a_group_of_wire_maps_and_dicts_answers_as_the_dicts(
    twins: tuple[RunningService, RunningService],
) -> None:
    """One group mixing maps as Score's deserializer gives them (the line's order, other orders, a repeated
    name, unknown and bad features) with plain dicts: each call answered as its dict in the same group (shadow
    calls: the line is left as it was, so both groups see the same state)."""
    _, alone = twins
    core: Scorer = alone.binding.servicer.core  # type: ignore[attr-defined]
    maps = [entries for _, entries in wire_maps(np.random.default_rng(5))][:20]
    wire_calls, dict_calls = [], []
    for k, entries in enumerate(maps):
        raw = b"".join(delimited(3, delimited(1, n.encode()) + double(2, v)) for n, v in entries)
        features = parse_score_request(raw).features
        assert isinstance(features, WireFeatures)
        wire_calls.append(ScoreCall("risk", f"w{k}", features, shadow=True))
        dict_calls.append(ScoreCall("risk", f"w{k}", dict(entries), shadow=True))
    # The same group with dicts in place of the wire maps: the same rows in the same places of one batch (a
    # row's float32 score may differ in its last bits between batch shapes, so the group is what is compared).
    together = core.score_many([c for pair in zip(wire_calls, dict_calls, strict=True) for c in pair])
    as_dicts = core.score_many([c for pair in zip(dict_calls, dict_calls, strict=True) for c in pair])
    kinds = set()
    for got, expected in zip(together, as_dicts, strict=True):
        if isinstance(expected, ScoreOutcome):
            assert isinstance(got, ScoreOutcome)
            assert (got.decision, got.imputed) == (expected.decision, expected.imputed)
            kinds.add(expected.decision.path.split(":")[0])
        else:
            assert isinstance(expected, GuardmeshError) and isinstance(got, GuardmeshError)
            assert got.message == expected.message
            kinds.add("refused")
    assert kinds == {"model", "rule", "refused"}
