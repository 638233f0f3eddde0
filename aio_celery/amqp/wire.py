"""The AMQP 0-9-1 wire format of task messages, as pure functions, fast.

pamqp encodes and decodes field tables generically and pays for it on every message; a
Celery message carries ~19 headers, so that cost dominated both publishing and consuming.

* Encoding (publishing) handles exactly the value types a task message uses (str, None,
  bool, int, float, list, dict, datetime) and produces the bytes pamqp would, keys sorted
  like pamqp's, except that floats are doubles ('d', as py-amqp writes them; pamqp's 'f'
  loses precision) and ints use signed types only (b/s/I/l, where pamqp picks u/i for
  32768..65535 and 2**31..2**32-1). pamqp reads both back to the same values.
* Decoding (the worker) reads every field type RabbitMQ sends, to the values pamqp would
  give, and the frames of the hot path: ``basic.deliver``, content header and body, and
  ``basic.ack``/``basic.reject``/``basic.nack``. Both are tested against pamqp (``tests/unit``).
  :mod:`aio_celery.amqp.reader` cuts those frames out of the byte stream and assembles them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from pamqp import commands


class Envelope(Protocol):
    """What a message's properties are encoded from (:class:`aio_celery.protocol.Envelope`
    is one): declared here so that this module depends on nothing else of aio_celery."""

    @property
    def headers(self) -> dict[str, Any]: ...
    @property
    def correlation_id(self) -> str: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def expiration(self) -> str | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_encoding(self) -> str: ...
    @property
    def delivery_mode(self) -> int: ...

_LONG = struct.Struct(">I")
_SHORT = struct.Struct(">H")
_INT8 = struct.Struct(">b")
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")
_TIMESTAMP = struct.Struct(">Q")

# Property flag bits, in the order the properties are written.
_CONTENT_TYPE = 1 << 15
_CONTENT_ENCODING = 1 << 14
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_CORRELATION_ID = 1 << 10
_REPLY_TO = 1 << 9
_EXPIRATION = 1 << 8
_MESSAGE_ID = 1 << 7
_TIMESTAMP_FLAG = 1 << 6


def _short_str(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


def _int(value: int) -> bytes:
    # Smallest signed type first, as pamqp does.
    if -128 <= value <= 127:
        return b"b" + _INT8.pack(value)
    if -32768 <= value <= 32767:
        return b"s" + _INT16.pack(value)
    if -(2**31) <= value < 2**31:
        return b"I" + _INT32.pack(value)
    return b"l" + _INT64.pack(value)


def _value(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        data: bytes = value.encode()
        return b"S" + _LONG.pack(len(data)) + data
    if value is None:
        return b"V"
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int:
        return _int(value)
    if kind is float:
        return b"d" + _DOUBLE.pack(value)
    if kind is dict:
        return b"F" + field_table(value)
    if kind is list or kind is tuple:
        items = b"".join(_value(item) for item in value)
        return b"A" + _LONG.pack(len(items)) + items
    if isinstance(value, datetime):
        if value.tzinfo is None:  # naive means UTC, as pamqp takes it (not local time)
            value = value.replace(tzinfo=UTC)
        return b"T" + _TIMESTAMP.pack(int(value.timestamp()))
    raise TypeError(f"cannot put {type(value).__name__} {value!r} in an AMQP header")


#: encoded ``key + value`` for the small set of header entries that repeat in every message
#: (``"lang": "py"``, ``"shadow": None``, ...); bounded, never holds a task id
_PAIR_CACHE: dict[tuple[str, type, Any], bytes] = {}
_KEY_CACHE: dict[str, bytes] = {}
_ORDER_CACHE: dict[tuple[str, ...], list[str]] = {}
_CACHE_MAX = 512
_CACHEABLE = frozenset({type(None), bool, int})


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """Store ``value`` under ``key`` unless the cache is full; return ``value``."""
    if len(cache) < _CACHE_MAX:
        cache[key] = value
    return value


def _key(key: str) -> bytes:
    encoded = _KEY_CACHE.get(key)
    return encoded if encoded is not None else _remember(_KEY_CACHE, key, _short_str(key))


def _sorted_keys(table: dict[str, Any]) -> list[str]:
    # Every task message has the same keys in the same order: sort them once.
    keys = tuple(table)
    order = _ORDER_CACHE.get(keys)
    return order if order is not None else _remember(_ORDER_CACHE, keys, sorted(keys))


def field_table(table: dict[str, Any]) -> bytes:
    """An AMQP field table (keys sorted, as pamqp writes them)."""
    parts: list[bytes] = []
    append = parts.append
    for key in _sorted_keys(table):
        value = table[key]
        kind = type(value)
        if kind is str:
            data = value.encode()
            append(_key(key) + b"S" + _LONG.pack(len(data)) + data)
        elif kind in _CACHEABLE:
            cache_key = (key, kind, value)
            encoded = _PAIR_CACHE.get(cache_key)
            if encoded is None:
                encoded = _remember(_PAIR_CACHE, cache_key, _key(key) + _value(value))
            append(encoded)
        else:
            append(_key(key) + _value(value))
    data = b"".join(parts)
    return _LONG.pack(len(data)) + data


def encode_properties(envelope: Envelope) -> bytes:
    """The property flags and values of a content header frame for ``envelope``."""
    flags = _CONTENT_TYPE | _CONTENT_ENCODING | _HEADERS | _DELIVERY_MODE
    parts = [
        # the same few content types and encodings in every message: encoded once (cached
        # like the header keys)
        _key(envelope.content_type),
        _key(envelope.content_encoding),
        field_table(envelope.headers),
        bytes((envelope.delivery_mode,)),
    ]
    if envelope.priority is not None:
        flags |= _PRIORITY
        parts.append(bytes((envelope.priority,)))
    flags |= _CORRELATION_ID
    parts.append(_short_str(envelope.correlation_id))
    if envelope.reply_to:
        flags |= _REPLY_TO
        parts.append(_short_str(envelope.reply_to))
    if envelope.expiration is not None:
        flags |= _EXPIRATION
        parts.append(_short_str(envelope.expiration))
    flags |= _MESSAGE_ID
    parts.append(_short_str(envelope.correlation_id))
    return _SHORT.pack(flags) + b"".join(parts)


class EncodedProperties(commands.Basic.Properties):
    """Basic properties whose wire form was computed up front by :func:`encode_properties`.

    Built through pamqp's public constructor (every attribute is set, as aiormq or pamqp may
    read any), with only :meth:`marshal` overridden: pamqp's content header frames a
    message by calling it, and its generic field table encoder is what made publishing
    expensive. ``tests/unit/test_amqpwire.py`` fails if a pamqp release stops calling it;
    pyproject.toml pins pamqp to the 4.0 series it was checked against. ``headers`` is
    None: they are in the encoded bytes only (50,000 concurrent publishes holding their
    header dicts cost 50 MiB and the garbage collector's time).
    """

    __slots__ = ("_encoded",)

    def __init__(self, envelope: Envelope) -> None:
        self._encoded = encode_properties(envelope)
        super().__init__(content_type=envelope.content_type,
                         content_encoding=envelope.content_encoding,
                         delivery_mode=envelope.delivery_mode,
                         priority=envelope.priority, correlation_id=envelope.correlation_id,
                         reply_to=envelope.reply_to or None, expiration=envelope.expiration,
                         message_id=envelope.correlation_id)

    def marshal(self) -> bytes:
        return self._encoded


# --- decoding (the worker's side) --------------------------------------------------------------

class WireError(ValueError):
    """Bytes that are not valid AMQP 0-9-1 (a truncated field, an unknown field type)."""


_TIMESTAMP_SECONDS_MAX = 0xFFFFFFFF  # above this pamqp reads milliseconds; so do we


def _long_str(data: bytes, offset: int) -> tuple[str | bytes, int]:
    size = _LONG.unpack_from(data, offset)[0]
    start = offset + 4
    end = start + size
    if end > len(data):
        raise WireError("long string runs past the end of its frame")
    raw = data[start:end]
    try:
        return raw.decode(), end
    except UnicodeDecodeError:  # pamqp hands back the bytes; so do we
        return raw, end


def _timestamp(data: bytes, offset: int) -> datetime:
    seconds: float = _TIMESTAMP.unpack_from(data, offset)[0]
    if seconds > _TIMESTAMP_SECONDS_MAX:
        seconds /= 1000.0
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (ValueError, OverflowError, OSError) as exc:  # past the year 9999
        raise WireError(f"timestamp {seconds!r} is out of range") from exc


def _field(data: bytes, offset: int) -> tuple[Any, int]:
    """One typed value of a field table or array (RabbitMQ's type letters)."""
    reader = _READERS.get(data[offset])
    if reader is None:
        raise WireError(f"unknown field type {data[offset:offset + 1]!r}")
    return reader(data, offset + 1)


def _sized(data: bytes, offset: int, what: str) -> tuple[int, int]:
    """Start and end of a value that begins with its 4-byte size."""
    end = offset + 4 + _LONG.unpack_from(data, offset)[0]
    if end > len(data):
        raise WireError(f"{what} runs past the end of its frame")
    return offset + 4, end


def _array(data: bytes, offset: int) -> tuple[list[Any], int]:
    offset, end = _sized(data, offset, "field array")
    items = []
    while offset < end:
        item, offset = _field(data, offset)
        items.append(item)
    if offset != end:
        raise WireError("field array length does not match its content")
    return items, end


def _table_at(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    start, end = _sized(data, offset, "field table")
    return _table(data, start, end), end


def _timestamp_at(data: bytes, offset: int) -> tuple[datetime, int]:
    return _timestamp(data, offset), offset + 8


def _byte_array(data: bytes, offset: int) -> tuple[bytearray, int]:
    start, end = _sized(data, offset, "byte array")
    return bytearray(data[start:end]), end


def _decimal(data: bytes, offset: int) -> tuple[Decimal, int]:
    digits = _INT32.unpack_from(data, offset + 1)[0]  # signed, as pamqp reads it
    return Decimal(digits) * (Decimal(10) ** -data[offset]), offset + 5


def _fixed(layout: struct.Struct) -> Callable[[bytes, int], tuple[Any, int]]:
    def read(data: bytes, offset: int) -> tuple[Any, int]:
        return layout.unpack_from(data, offset)[0], offset + layout.size

    return read


_READERS: dict[int, Callable[[bytes, int], tuple[Any, int]]] = {
    ord("S"): _long_str,
    ord("t"): lambda data, offset: (data[offset] != 0, offset + 1),
    ord("V"): lambda data, offset: (None, offset),
    0: lambda data, offset: (None, offset),  # NUL as void: not in the spec, seen in the wild
    ord("F"): _table_at,
    ord("A"): _array,
    ord("x"): _byte_array,
    ord("T"): _timestamp_at,
    ord("D"): _decimal,
    ord("b"): _fixed(_INT8), ord("B"): _fixed(struct.Struct(">B")),
    ord("s"): _fixed(_INT16), ord("u"): _fixed(_SHORT),
    ord("I"): _fixed(_INT32), ord("i"): _fixed(_LONG),
    ord("l"): _fixed(_INT64), ord("L"): _fixed(_INT64),  # pamqp reads L as signed too
    ord("f"): _fixed(struct.Struct(">f")), ord("d"): _fixed(_DOUBLE),
}


def _table(data: bytes, offset: int, end: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    while offset < end:
        key_end = offset + 1 + data[offset]
        key = data[offset + 1:key_end].decode()
        if data[key_end] == 0x53:  # S, by far the most common header value: inlined
            size = _LONG.unpack_from(data, key_end + 1)[0]
            offset = key_end + 5 + size
            raw = data[key_end + 5:offset]
            try:
                table[key] = raw.decode()
            except UnicodeDecodeError:
                table[key] = raw
        else:
            table[key], offset = _field(data, key_end)
    if offset != end:
        raise WireError("field table length does not match its content")
    return table


def decode_field_table(data: bytes, offset: int = 0) -> tuple[dict[str, Any], int]:
    """The field table at ``offset`` (it starts with its 4-byte size) and the offset past
    it. Values decode as pamqp decodes them; malformed bytes raise :class:`WireError`."""
    try:
        return _table_at(data, offset)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed field table: {exc}") from exc


@dataclass(slots=True)
class Properties:
    """The basic properties of a received message, plus their wire bytes (``encoded``) so
    that the message can be published again exactly as it came."""

    encoded: bytes = b"\x00\x00"
    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None


def _short_str_at(data: bytes, offset: int) -> tuple[str, int]:
    end = offset + 1 + data[offset]
    if end > len(data):
        raise WireError("short string runs past the end of its frame")
    return data[offset + 1:end].decode(), end


def _octet_at(data: bytes, offset: int) -> tuple[int, int]:
    return data[offset], offset + 1


#: every basic property in wire order: its flag bit, name and reader
_PROPERTY_READERS: tuple[tuple[int, str, Callable[[bytes, int], tuple[Any, int]]], ...] = (
    (_CONTENT_TYPE, "content_type", _short_str_at),
    (_CONTENT_ENCODING, "content_encoding", _short_str_at),
    (_HEADERS, "headers", _table_at),
    (_DELIVERY_MODE, "delivery_mode", _octet_at),
    (_PRIORITY, "priority", _octet_at),
    (_CORRELATION_ID, "correlation_id", _short_str_at),
    (_REPLY_TO, "reply_to", _short_str_at),
    (_EXPIRATION, "expiration", _short_str_at),
    (_MESSAGE_ID, "message_id", _short_str_at),
    (_TIMESTAMP_FLAG, "timestamp", _timestamp_at),
    (1 << 5, "type", _short_str_at),
    (1 << 4, "user_id", _short_str_at),
    (1 << 3, "app_id", _short_str_at),
    (1 << 2, "cluster_id", _short_str_at),
)


def decode_properties(data: bytes, offset: int = 0) -> Properties:
    """Basic properties from a content header's property flags onwards."""
    try:
        return _properties(data, offset)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed message properties: {exc}") from exc


def _properties(data: bytes, offset: int) -> Properties:
    encoded = data[offset:]
    flags = _SHORT.unpack_from(data, offset)[0]
    offset += 2
    more = flags
    while more & 1:  # continuation words: no property of AMQP 0-9-1 lives there
        more = _SHORT.unpack_from(data, offset)[0]
        offset += 2
    values: dict[str, Any] = {}
    for bit, name, read in _PROPERTY_READERS:
        if flags & bit:
            values[name], offset = read(data, offset)
    return Properties(encoded, **values)


def negotiate(client: int, server: int) -> int:
    """A tuned limit (``heartbeat``, ``frame_max``, ``channel_max``) as AMQP 0-9-1 says:
    the lower of the two values where both are non-zero, else the non-zero one (0 means
    "no limit", or no heartbeat, only when both sides say 0)."""
    if client and server:
        return min(client, server)
    return client or server


# --- frames of the hot path --------------------------------------------------------------------

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
#: type, channel, payload size; the payload and a FRAME_END byte follow
FRAME_HEAD = struct.Struct(">BHI")
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
#: class and method ids at the start of a method frame's payload
METHOD_ID = struct.Struct(">HH")
BASIC_DELIVER = (60, 60)
_BASIC_CLASS = 60
_ACK_OR_REJECT = struct.Struct(">BHIHHQBB")  # a whole frame: 13 bytes of payload
_CONTENT_HEADER = struct.Struct(">HHQ")  # class id, weight, body size
_LONGLONG = struct.Struct(">Q")


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """A ``basic.ack`` frame."""
    return _ACK_OR_REJECT.pack(FRAME_METHOD, channel, 13, _BASIC_CLASS, 80, delivery_tag,
                               multiple, FRAME_END)


def encode_reject(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """A ``basic.reject`` frame."""
    return _ACK_OR_REJECT.pack(FRAME_METHOD, channel, 13, _BASIC_CLASS, 90, delivery_tag,
                               requeue, FRAME_END)


def encode_nack(channel: int, delivery_tag: int, requeue: bool, multiple: bool = False) -> bytes:
    """A ``basic.nack`` frame (RabbitMQ's extension: its two flags share one octet).
    Returning a delivery with it, not with ``basic.reject``, keeps RabbitMQ 4.3's quorum
    queues from counting the return in ``x-delivery-count``."""
    return _ACK_OR_REJECT.pack(FRAME_METHOD, channel, 13, _BASIC_CLASS, 120, delivery_tag,
                               multiple | requeue << 1, FRAME_END)


@dataclass(slots=True)
class Deliver:
    """The arguments of a ``basic.deliver`` method."""

    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str


def decode_deliver(payload: bytes) -> Deliver:
    """A ``basic.deliver`` method frame's payload (class and method ids included)."""
    try:
        consumer_tag, offset = _short_str_at(payload, 4)
        delivery_tag = _LONGLONG.unpack_from(payload, offset)[0]
        redelivered = payload[offset + 8] & 1 == 1
        exchange, offset = _short_str_at(payload, offset + 9)
        routing_key, _ = _short_str_at(payload, offset)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed basic.deliver: {exc}") from exc
    return Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)


def content_header_body_size(payload: bytes) -> int:
    """The body size a content header announces (its properties follow at offset 12)."""
    try:
        return int(_LONGLONG.unpack_from(payload, 4)[0])
    except struct.error as exc:
        raise WireError(f"malformed content header: {exc}") from exc


def content_frames(channel: int, body: bytes, properties: bytes, frame_max: int) -> bytes:
    """The content header and body frames that follow a ``basic.publish`` method frame.
    ``properties`` are encoded properties (:attr:`Properties.encoded` republishes a message
    as it came); bodies are split to fit ``frame_max``."""
    header = _CONTENT_HEADER.pack(_BASIC_CLASS, 0, len(body)) + properties
    parts = [FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)), header, b"\xce"]
    chunk = frame_max - 8  # frame overhead: 7 bytes of head, 1 end byte
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        parts += (FRAME_HEAD.pack(FRAME_BODY, channel, len(piece)), piece, b"\xce")
    return b"".join(parts)
