"""The AMQP 0-9-1 codec of the hot path, proven against pamqp (the library it stands in for).

With pamqp as the oracle: ``decode_field_table`` gives pamqp's values *and types* for every
field type RabbitMQ sends (pamqp-encoded, hand-built, randomized) and the offset past the
table; malformed bytes (cut anywhere, unknown type, overrunning size) are a
:class:`WireError`, never IndexError/struct.error nor a wrong value; ``decode_properties``
reads what pamqp's content header reads (Celery's recordings too) and keeps the input bytes;
``encode_properties`` writes pamqp's bytes for task messages, and where it deliberately
writes another type (doubles, signed ints) pamqp reads back the same values; ack, reject,
deliver, content and heartbeat frames are pamqp's bytes.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pamqp.decode
import pamqp.encode
import pytest
from pamqp import body, commands, constants, frame, header, heartbeat

from aio_celery import protocol
from aio_celery.amqp import wire as amqpwire
from aio_celery.amqp.wire import WireError

VALID = sorted((Path(__file__).resolve().parent.parent / "messages").glob("valid_*.json"))
WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
IN_IST = datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=timezone(timedelta(hours=5, minutes=30)))


def typed(value: Any) -> Any:
    """``value`` with every scalar's type spelled out, so that 1, True and 1.0 differ."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return type(value).__name__, repr(value)


def pamqp_table(data: bytes) -> dict[str, Any]:
    return pamqp.decode.field_table(data)[1]


def assert_decodes_like_pamqp(data: bytes) -> None:
    framed = b"head" + data + b"tail"  # a table sits inside a frame: offsets matter
    ours, end = amqpwire.decode_field_table(framed, 4)
    consumed, theirs = pamqp.decode.field_table(framed[4:])
    assert typed(ours) == typed(theirs)
    assert list(ours) == list(theirs)
    assert end == 4 + consumed == 4 + len(data)


def entry(key: str, kind: bytes, payload: bytes) -> bytes:
    return bytes((len(key.encode()),)) + key.encode() + kind + payload


def sized(*parts: bytes) -> bytes:
    """Content behind its 4-byte size: a field table, array, long string or byte array."""
    content = b"".join(parts)
    return struct.pack(">I", len(content)) + content


# --- decoding field tables ------------------------------------------------------------------

TABLES: dict[str, dict[str, Any]] = {
    "empty": {},
    "strings": {"ascii": "py", "unicode": "héllo wörld ✓ 漢字 🎉", "empty": "", "big": "x" * 70000},
    "bool-void": {"yes": True, "no": False, "none": None},
    "ints": {"zero": 0, "b": -128, "b+": 127, "s": -32768, "s+": 32767, "u": 65535,
             "I": -(2**31), "I+": 2**31 - 1, "i": 2**32 - 1, "l": 2**40, "l-": -(2**40),
             "lmin": -(2**63), "lmax": 2**63 - 1},
    "floats": {"half": 1.5, "neg": -0.1, "tiny": 1e-30, "big": 3.4e38, "zero": 0.0},
    "decimals": {"d": Decimal("12.34"), "int": Decimal(7), "scale": Decimal("0.0001"),
                 "max": Decimal("2147483.647"), "exp": Decimal("1E+3")},
    "timestamps": {"when": WHEN, "epoch": datetime(1970, 1, 1, tzinfo=UTC), "ist": IN_IST},
    "bytearrays": {"x": bytearray(b"\x00\xff raw"), "empty": bytearray()},
    "nested": {"a": {"b": {"c": [{"d": "€"}]}}, "empty": {}, "ü": {"ключ": None}},
    "arrays": {"mixed": [1, "two", None, True, 2.5, [3, [4, []]], {"k": "v"}], "empty": []},
}
HAND_BUILT: dict[str, bytes] = {  # types pamqp reads but never writes, and oddities
    "B": sized(entry("k", b"B", b"\xff")),
    "u": sized(entry("k", b"u", b"\xff\xfe")),
    "i": sized(entry("k", b"i", b"\xff\xff\xff\xfe")),
    "L-signed": sized(entry("k", b"L", b"\xff" * 8)),
    "f": sized(entry("k", b"f", struct.pack(">f", 0.1))),
    "d": sized(entry("k", b"d", struct.pack(">d", 0.1))),
    "D": sized(entry("k", b"D", b"\x02" + struct.pack(">I", 12345))),
    "T-milliseconds": sized(entry("k", b"T", struct.pack(">Q", 1_700_000_000_123))),
    "T-last-second": sized(entry("k", b"T", struct.pack(">Q", 0xFFFFFFFF))),
    "x-bytes": sized(entry("k", b"x", sized(b"\x00\x01\x02"))),
    "nul-as-void": sized(entry("k", b"\x00", b""), entry("n", b"V", b"")),
    "S-not-utf8": sized(entry("k", b"S", sized(b"\xff\xfe"))),
    "S-not-utf8-in-array": sized(entry("k", b"A", sized(b"S" + sized(b"\xc3"), b"V"))),
    "key-non-ascii": sized(entry("ключ", b"t", b"\x02")),
    "duplicate-key": sized(entry("k", b"b", b"\x01"), entry("k", b"S", sized(b"last"))),
}
ALL_TABLES = [pamqp.encode.field_table(table) for table in TABLES.values()]


@pytest.mark.parametrize("data", ALL_TABLES + list(HAND_BUILT.values()),
                         ids=[*TABLES, *HAND_BUILT])
def test_tables_decode_like_pamqp(data: bytes) -> None:
    assert_decodes_like_pamqp(data)


def test_negative_decimals_decode_like_pamqp() -> None:
    assert_decodes_like_pamqp(pamqp.encode.field_table({"d": Decimal("-1.5"),
                                                        "n": Decimal(-7)}))


Scalar = Callable[[random.Random], Any]
SCALARS: list[Scalar] = [  # the encoder's types first: str, bool, None, int, float, datetime
    lambda r: "".join(r.choice("aZ9 é✓漢🎉\x00") for _ in range(r.randrange(12))),
    lambda r: r.random() < 0.5,
    lambda r: None,
    lambda r: r.randint(-(2**63), 2**63 - 1) >> r.randrange(64),  # every size class
    lambda r: r.uniform(-1e6, 1e6),
    lambda r: datetime.fromtimestamp(r.randrange(2**32), tz=UTC),
    lambda r: Decimal(r.randrange(2**31)).scaleb(-r.randrange(10)),
    lambda r: bytearray(r.randbytes(r.randrange(8))),
]


def random_table(rng: random.Random, scalars: list[Scalar], depth: int = 0) -> dict[str, Any]:
    def value() -> Any:
        roll = rng.randrange(10)
        if depth < 3 and roll == 8:
            return random_table(rng, scalars, depth + 1)
        if depth < 3 and roll == 9:
            return list(random_table(rng, scalars, depth + 1).values())
        return rng.choice(scalars)(rng)

    return {"".join(rng.choice("abé_") for _ in range(rng.randrange(1, 6))): value()
            for _ in range(rng.randrange(6))}


def test_random_tables_decode_like_pamqp() -> None:
    rng = random.Random(20260304)
    for _ in range(300):
        assert_decodes_like_pamqp(pamqp.encode.field_table(random_table(rng, SCALARS)))


# --- malformed bytes ------------------------------------------------------------------------

ONE_VALUE: dict[str, Any] = {
    "string": "héllo wörld",
    "table": {"n": 1, "x": bytearray(b"ab"), "t": WHEN, "D": Decimal("1.5"), "l": 2**40,
              "f": 0.5, "none": None, "b": True, "s": "é"},
    "array": ["héllo", [], {}, [1, [2.5]], "end"],
}
MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "short-size": b"\x00\x00",
    "unknown-type": sized(entry("k", b"Z", b"")),
    "unknown-type-in-array": sized(entry("k", b"A", sized(b"Z"))),
    "table-overruns-data": struct.pack(">I", 100) + entry("k", b"V", b""),
    "key-overruns": sized(b"\x09kV"),
    "key-not-utf8": sized(b"\x01\xffV"),
    "string-overruns": sized(entry("k", b"S", struct.pack(">I", 2**31) + b"ab")),
    "string-in-array-overruns": sized(entry("k", b"A", sized(b"S" + struct.pack(">I", 9)))),
    "bytearray-overruns": sized(entry("k", b"x", struct.pack(">I", 5) + b"ab")),
    "table-overruns-outer": sized(entry("k", b"F", struct.pack(">I", 10) + b"\x01nV")) + bytes(9),
    "array-overruns-outer": sized(entry("k", b"A", struct.pack(">I", 10) + b"V")) + bytes(9),
    "item-overruns-array": sized(entry("k", b"A", struct.pack(">I", 2) + b"S" + sized(b"z"))),
    "item-overruns-array-quietly": sized(entry("k", b"A", struct.pack(">I", 1) + b"t"), b"\0V"),
    "decimal-cut": sized(entry("k", b"D", b"\x01\x00")),
    "bool-cut": sized(entry("k", b"t", b"")),
}


@pytest.mark.parametrize("value", list(ONE_VALUE.values()), ids=list(ONE_VALUE))
def test_a_table_cut_anywhere_is_a_wire_error(value: Any) -> None:
    whole = pamqp.encode.field_table({"k": value})
    content = whole[4:]
    for cut in range(len(whole)):
        with pytest.raises(WireError):
            amqpwire.decode_field_table(whole[:cut])
    for cut in range(1, len(content)):
        # the table's size agrees with the cut, so the value itself is short ...
        with pytest.raises(WireError):
            amqpwire.decode_field_table(sized(content[:cut]))
        # ... or it reads on past the table into what follows in the frame
        with pytest.raises(WireError):
            amqpwire.decode_field_table(sized(content[:cut]) + content[cut:])


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_tables_are_wire_errors(data: bytes) -> None:
    with pytest.raises(WireError):
        amqpwire.decode_field_table(data)
    assert issubclass(WireError, ValueError)


def test_an_out_of_range_timestamp_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        amqpwire.decode_field_table(sized(entry("k", b"T", struct.pack(">Q", 2**63))))
    with pytest.raises(WireError):  # the timestamp property too: one bad message, not the link
        amqpwire.decode_properties(struct.pack(">HQ", 1 << 6, 2**63))


def test_a_naive_datetime_header_is_utc_like_pamqps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        naive = datetime(2026, 1, 1, 12, 0)
        assert amqpwire.field_table({"t": naive}) == pamqp.encode.field_table({"t": naive})
    finally:
        monkeypatch.undo()
        time.tzset()


# --- basic properties -----------------------------------------------------------------------

ALL_PROPERTIES: dict[str, Any] = {
    "content_type": "application/json", "content_encoding": "utf-8",
    "headers": {**TABLES["ints"], **TABLES["nested"], "s": "ü", "t": WHEN},
    "delivery_mode": 2, "priority": 9, "correlation_id": "c-1", "reply_to": "reply.ü",
    "expiration": "60000", "message_id": "m-1", "timestamp": WHEN, "message_type": "tasks.add",
    "user_id": "guest", "app_id": "aio-celery", "cluster_id": "rabbit@node",
}
PROPERTY_SETS: dict[str, dict[str, Any]] = {
    "all-14": ALL_PROPERTIES,
    "headers-only": {"headers": ALL_PROPERTIES["headers"]},
    "none": {},
    "zeros": {"priority": 0, "delivery_mode": 1, "headers": {}},
    "tail-only": {"timestamp": WHEN, "cluster_id": "c"},
}


def pamqp_properties(**values: Any) -> commands.Basic.Properties:
    cluster_id = values.pop("cluster_id", "")
    props = commands.Basic.Properties(**values)
    props.cluster_id = cluster_id  # deprecated: pamqp's __init__ refuses it, but reads it
    return props


def assert_properties_decode_like_pamqp(props: commands.Basic.Properties) -> amqpwire.Properties:
    payload = header.ContentHeader(body_size=2**40, properties=props).marshal()
    theirs = header.ContentHeader()
    theirs.unmarshal(payload)
    ours = amqpwire.decode_properties(payload, 12)
    assert ours.encoded == payload[12:] == props.marshal()
    assert amqpwire.content_header_body_size(payload) == theirs.body_size == 2**40
    for name in commands.Basic.Properties.__slots__:
        mine = getattr(ours, "type" if name == "message_type" else name)
        if getattr(props, name) in (None, ""):  # not sent (pamqp's default may be "")
            assert mine is None
        else:
            assert typed(mine) == typed(getattr(theirs.properties, name))
    return ours


@pytest.mark.parametrize("values", list(PROPERTY_SETS.values()), ids=list(PROPERTY_SETS))
def test_properties_decode_like_pamqp(values: dict[str, Any]) -> None:
    assert_properties_decode_like_pamqp(pamqp_properties(**values))


def test_properties_skip_a_continuation_flag_word_like_pamqp() -> None:
    payload = struct.pack(">HHQHH", 60, 0, 3, 0x8000 | 1, 0) + b"\x04text"
    theirs = header.ContentHeader()
    theirs.unmarshal(payload)
    ours = amqpwire.decode_properties(payload, 12)
    assert ours.content_type == theirs.properties.content_type == "text"
    assert ours.encoded == payload[12:]


def test_properties_cut_anywhere_are_wire_errors() -> None:
    data = pamqp_properties(**ALL_PROPERTIES).marshal()
    for cut in range(len(data)):
        with pytest.raises(WireError):
            amqpwire.decode_properties(data[:cut])
    with pytest.raises(WireError):
        amqpwire.content_header_body_size(struct.pack(">HHI", 60, 0, 0))


# --- encoding -------------------------------------------------------------------------------

#: every bound of the int size classes where pamqp and we pick the same type
INT_BOUNDS = [-(2**63), -(2**31) - 1, -(2**31), -32769, -32768, -129, -128, -1, 0, 127, 128,
              32767, 65536, 2**31 - 1, 2**32, 2**63 - 1]
MESSAGES: dict[str, protocol.TaskMessage] = {
    "minimal": protocol.TaskMessage(id="t-1", task="tasks.add"),
    "all-options": protocol.TaskMessage(
        id="t-2", task="tasks.mul", args=[1, "ü"], root_id="r", parent_id="p", group="g",
        group_index=3, retries=2**40, eta=WHEN, expires=WHEN + timedelta(minutes=5),
        time_limit=20, soft_time_limit=10, shadow="s", origin="gen1@host", ignore_result=True,
        stamped_headers=["a"], stamps={"a": ["x"]}, priority=7, reply_to="reply-queue"),
    "extra-headers": protocol.TaskMessage(id="t-3", task="tasks.x", priority=0, extra_headers={
        "x-unicode": "漢字 🎉", "x-ints": INT_BOUNDS, "x-when": WHEN,
        "x-ist": IN_IST, "x-nested": {"a": {"b": [True, False, None, {}, []]}}}),
}


def writes_unlike_pamqp(value: Any) -> bool:
    """Whether ``value`` holds a float, or an int pamqp would write as unsigned."""
    if isinstance(value, dict | list):
        return any(map(writes_unlike_pamqp, value.values() if isinstance(value, dict) else value))
    return isinstance(value, float) or (
        type(value) is int and (32768 <= value <= 65535 or 2**31 <= value < 2**32))


def pamqp_reads(properties: bytes) -> dict[str, Any]:
    content_header = header.ContentHeader()
    content_header.unmarshal(struct.pack(">HHQ", 60, 0, 0) + properties)
    return {name: typed(getattr(content_header.properties, name))
            for name in commands.Basic.Properties.__slots__}


def assert_encodes_like_pamqp(envelope: protocol.Envelope) -> None:
    expected = commands.Basic.Properties(
        content_type=envelope.content_type, content_encoding=envelope.content_encoding,
        headers=envelope.headers, delivery_mode=envelope.delivery_mode,
        priority=envelope.priority, correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to, expiration=envelope.expiration,
        message_id=envelope.correlation_id).marshal()
    ours = amqpwire.encode_properties(envelope)
    assert pamqp_reads(ours) == pamqp_reads(expected)
    if not writes_unlike_pamqp(envelope.headers):  # those: see the test below
        assert ours == expected
    encoded = amqpwire.EncodedProperties(envelope)
    assert isinstance(encoded, commands.Basic.Properties)  # what aiormq takes
    assert encoded.message_id == envelope.correlation_id
    # every attribute pamqp has, as pamqp's own would hold it (aiormq may read any)
    pamqps = commands.Basic.Properties(
        content_type=envelope.content_type, content_encoding=envelope.content_encoding,
        headers=envelope.headers, delivery_mode=envelope.delivery_mode,
        priority=envelope.priority, correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to or None, expiration=envelope.expiration,
        message_id=envelope.correlation_id)
    for name in commands.Basic.Properties.__slots__:
        if name != "headers":  # only in the encoded bytes
            assert getattr(encoded, name) == getattr(pamqps, name), name
    assert encoded.headers is None
    # pamqp (as aiormq drives it) frames EncodedProperties with our bytes
    wire = frame.marshal(header.ContentHeader(0, len(envelope.body), encoded), 1)
    assert wire[7 + 12:-1] == ours


@pytest.mark.parametrize("message", list(MESSAGES.values()), ids=list(MESSAGES))
def test_task_messages_encode_like_pamqp(message: protocol.TaskMessage) -> None:
    assert_encodes_like_pamqp(protocol.encode(message, WHEN))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_celery_recordings_decode_and_encode_like_pamqp(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    props = data["properties"]
    ours = assert_properties_decode_like_pamqp(
        commands.Basic.Properties(headers=data["headers"], **props))
    assert ours.headers == data["headers"]
    message = protocol.decode(data["body"].encode(), ours.headers, ours.content_type,
                              ours.content_encoding, ours.priority, ours.reply_to)
    assert_encodes_like_pamqp(protocol.encode(message, datetime.now(UTC)))


@pytest.mark.parametrize("value", [1.1, -0.0, 1e300, 32768, 65535, 2**31, 2**32 - 1],
                         ids=["1.1", "-0.0", "1e300", "u-low", "u-high", "i-low", "i-high"])
def test_values_written_unlike_pamqp_read_back_the_same_in_pamqp(value: Any) -> None:
    """pamqp writes floats as single 'f' (1.1 comes back 1.100000023841858) and these ints
    as unsigned 'u'/'i'; we write doubles (as py-amqp does) and signed ints."""
    table = {"v": value, "nested": [value, {"v": value}]}
    assert typed(pamqp_table(amqpwire.field_table(table))) == typed(table)


def test_random_tables_encode_like_pamqp() -> None:
    rng = random.Random(42)
    same_bytes = 0
    for _ in range(300):
        table = random_table(rng, SCALARS[:6])
        data = amqpwire.field_table(table)
        assert typed(pamqp_table(data)) == typed(table)
        assert typed(amqpwire.decode_field_table(data)[0]) == typed(table)
        if not writes_unlike_pamqp(table):
            assert data == pamqp.encode.field_table(table)
            same_bytes += 1
    assert same_bytes > 50


# --- frames ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("channel", "tag", "flag"),
                         [(1, 1, False), (1, 1, True), (7, 2**32, False), (65535, 2**63 - 1, True)],
                         ids=["1-1-false", "1-1-true", "7-2**32-false", "max-max-true"])
def test_ack_and_reject_frames_are_pamqps(channel: int, tag: int, flag: bool) -> None:
    assert amqpwire.encode_ack(channel, tag, flag) == frame.marshal(
        commands.Basic.Ack(delivery_tag=tag, multiple=flag), channel)
    assert amqpwire.encode_reject(channel, tag, flag) == frame.marshal(
        commands.Basic.Reject(delivery_tag=tag, requeue=flag), channel)
    assert amqpwire.encode_ack(channel, tag) == frame.marshal(commands.Basic.Ack(tag), channel)


@pytest.mark.parametrize("requeue", [False, True])
@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize(("channel", "tag"), [(1, 1), (7, 2**32), (65535, 2**63 - 1)])
def test_nack_frames_are_pamqps(channel: int, tag: int, requeue: bool, multiple: bool) -> None:
    assert amqpwire.encode_nack(channel, tag, requeue, multiple) == frame.marshal(
        commands.Basic.Nack(delivery_tag=tag, multiple=multiple, requeue=requeue), channel)
    assert amqpwire.encode_nack(channel, tag, requeue) == frame.marshal(
        commands.Basic.Nack(delivery_tag=tag, requeue=requeue), channel)


@pytest.mark.parametrize("deliver", [
    amqpwire.Deliver("ctag", 1, False, "", "celery"),
    amqpwire.Deliver("amq.ctag-ü", 2**63 - 1, True, "celery.direct", "rk.漢字"),
    amqpwire.Deliver("", 0, False, "", ""),
    amqpwire.Deliver("t" * 255, 12, True, "e" * 127, "r" * 255),
], ids=["plain", "unicode-max-tag", "empty", "longest"])
def test_deliver_decodes_like_pamqp(deliver: amqpwire.Deliver) -> None:
    wire = frame.marshal(commands.Basic.Deliver(**dataclasses.asdict(deliver)), 3)
    payload = wire[7:-1]
    assert amqpwire.FRAME_HEAD.unpack_from(wire) == (amqpwire.FRAME_METHOD, 3, len(payload))
    assert amqpwire.METHOD_ID.unpack_from(payload) == amqpwire.BASIC_DELIVER
    theirs = frame.unmarshal(wire)[2]
    assert amqpwire.decode_deliver(payload) == amqpwire.Deliver(
        theirs.consumer_tag, theirs.delivery_tag, theirs.redelivered, theirs.exchange,
        theirs.routing_key) == deliver
    for cut in range(len(payload)):
        with pytest.raises(WireError):
            amqpwire.decode_deliver(payload[:cut])


CONTENT = [(frame_max, size) for frame_max in (4096, 131072)
           for size in (0, 1, frame_max - 8, frame_max - 7, 2 * (frame_max - 8), 1 << 20)]


@pytest.mark.parametrize(("frame_max", "size"), CONTENT, ids=[f"{f}-{s}" for f, s in CONTENT])
def test_content_frames_are_pamqps(frame_max: int, size: int) -> None:
    data = random.Random(size).randbytes(size)
    props = pamqp_properties(**ALL_PROPERTIES)
    chunk = frame_max - 8
    expected = frame.marshal(header.ContentHeader(0, size, props), 5) + b"".join(
        frame.marshal(body.ContentBody(data[start:start + chunk]), 5)
        for start in range(0, size, chunk))
    assert amqpwire.content_frames(5, data, props.marshal(), frame_max) == expected


def test_heartbeat_and_frame_constants_are_pamqps() -> None:
    assert frame.marshal(heartbeat.Heartbeat(), 0) == amqpwire.HEARTBEAT
    assert (constants.FRAME_METHOD, constants.FRAME_HEADER, constants.FRAME_BODY,
            constants.FRAME_HEARTBEAT, constants.FRAME_END) == (
        amqpwire.FRAME_METHOD, amqpwire.FRAME_HEADER, amqpwire.FRAME_BODY,
        amqpwire.FRAME_HEARTBEAT, amqpwire.FRAME_END)
    assert amqpwire.FRAME_HEAD.size == constants.FRAME_HEADER_SIZE
    assert (commands.Basic.frame_id, commands.Basic.Deliver.frame_id) == amqpwire.BASIC_DELIVER


@pytest.mark.parametrize(("client", "server", "agreed"), [
    (60, 60, 60), (5, 60, 5), (60, 5, 5),  # the lower of two non-zero values
    (0, 60, 60), (60, 0, 60),  # 0 from one side: the other's value
    (0, 0, 0),  # none only when neither side wants one
    (131072, 4096, 4096), (131072, 0, 131072),  # frame_max: 0 is "no limit"
])
def test_tuned_limits_are_negotiated_as_amqp_says(client: int, server: int,
                                                   agreed: int) -> None:
    assert amqpwire.negotiate(client, server) == agreed
