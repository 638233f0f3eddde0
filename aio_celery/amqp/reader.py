"""The frame reader of the worker's AMQP client, sans-I/O: bytes in, events out.

:meth:`FrameReader.feed` takes bytes as they come off the socket, in pieces of any size,
and calls its owner back for each event: a whole message (``basic.deliver``, its
properties and body, reassembled from as many body frames as it took) as a
:class:`Delivery`; any other method, decoded by pamqp, with its channel; a heartbeat.
Bytes that are not AMQP 0-9-1 raise :class:`~aio_celery.amqp.wire.WireError`, and the
stream is lost: the reader closes itself.

Callbacks rather than a list of events or a generator: the worker's hot path is one
delivery per no-op task, and an event object per frame or a generator frame per feed
would cost it a measurable share of its CPU.

Back-pressure (:meth:`FrameReader.hold`): while held, the reader stops at the next message
boundary (a message being read is finished first) and leaves the rest buffered as wire
bytes. It reads on anyway, deliveries and all, while its owner awaits something from the
broker (``awaiting()``: a reply or a publisher confirm may be queued behind the held
deliveries), or when a control frame (a close, a consumer cancel) waits behind them: those
must not wait for the release.

Imports nothing of aio_celery but :mod:`aio_celery.amqp.wire`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands, exceptions, frame

from aio_celery.amqp.wire import (
    BASIC_DELIVER,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEAD,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    METHOD_ID,
    Deliver,
    Properties,
    WireError,
    content_header_body_size,
    decode_deliver,
    decode_properties,
)

__all__ = ["Delivery", "FrameReader", "decode_method"]

_DELIVER_ID = METHOD_ID.pack(*BASIC_DELIVER)


@dataclass(slots=True)
class Delivery:
    """One message delivered to a consumer. ``properties`` is None when they could not be
    decoded; ``problem`` then says why (the message is still handed over, so that its
    owner can reject it rather than lose the connection over it)."""

    deliver: Deliver
    properties: Properties | None
    body: bytes
    problem: str | None = None


@dataclass(slots=True)
class _Incoming:
    deliver: Deliver | None  # None: the content of a basic.return, to be dropped
    properties: Properties | None = None
    problem: str | None = None
    size: int = -1  # -1 until the content header arrives
    received: int = 0
    chunks: list[bytes] = field(default_factory=list)


def decode_method(channel: int, payload: bytes) -> Any:
    """A method frame's payload (class and method ids first) as pamqp's command object;
    WireError if pamqp cannot read it (an unknown method, a truncated one)."""
    wire = FRAME_HEAD.pack(FRAME_METHOD, channel, len(payload)) + payload + b"\xce"
    try:
        _, _, method = frame.unmarshal(wire)
    except (ValueError, struct.error, exceptions.PAMQPException) as exc:
        raise WireError(f"unreadable method frame: {exc}") from exc
    return method


def _control_frame_end(buffer: bytearray, pos: int) -> int:
    """Where the first complete frame from ``pos`` on that is a method other than
    ``basic.deliver`` ends (a close from the broker, a consumer cancel, a reply), or ``pos``
    if there is none: held deliveries must not hide those."""
    start, size = pos, len(buffer)
    head = FRAME_HEAD.unpack_from
    while size - pos >= 8:
        kind, _, length = head(buffer, pos)
        end = pos + 7 + length
        if end >= size:
            break
        if kind == FRAME_METHOD and length >= 4 and \
                METHOD_ID.unpack_from(buffer, pos + 7) != BASIC_DELIVER:
            return int(end) + 1
        pos = end + 1
    return start


def _never() -> bool:
    return False


class FrameReader:
    """Reads an AMQP 0-9-1 byte stream (after the protocol header) into events.

    ``on_delivery(delivery)`` gets each message consumed; ``on_method(channel, method)``
    every other method (pamqp's objects; a ``basic.return``'s content is read and dropped:
    the method says all there is to know); ``on_heartbeat()``, if given, each heartbeat
    frame. ``awaiting()`` says whether the owner awaits a reply or confirm (read only while
    held). Callbacks may call :meth:`hold`, :meth:`release` and :meth:`close`; not
    :meth:`feed` (the owner feeds again from its event loop, after a release say).
    """

    __slots__ = ("_awaiting", "_buffer", "_closed", "_held", "_incoming", "_on_delivery",
                 "_on_heartbeat", "_on_method")

    def __init__(self, on_delivery: Callable[[Delivery], None],
                 on_method: Callable[[int, Any], None], *,
                 on_heartbeat: Callable[[], None] | None = None,
                 awaiting: Callable[[], bool] = _never) -> None:
        self._on_delivery = on_delivery
        self._on_method = on_method
        self._on_heartbeat = on_heartbeat
        self._awaiting = awaiting
        self._buffer = bytearray()
        self._incoming: _Incoming | None = None
        self._held = False
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet read: held messages, a partial frame."""
        return len(self._buffer)

    @property
    def mid_message(self) -> bool:
        """Part of a message has been read (its ``basic.deliver``, maybe its header and
        some of its body): the rest must be read before holding can stop the reader."""
        return self._incoming is not None

    @property
    def held(self) -> bool:
        return self._held

    @property
    def holding(self) -> bool:
        """Held, at a message boundary, nothing awaited: more bytes fed now stay buffered
        (but for control frames, and what precedes them)."""
        return self._held and self._incoming is None and not self._awaiting()

    @property
    def closed(self) -> bool:
        return self._closed

    def hold(self) -> None:
        """Stop handing over deliveries at the next message boundary."""
        self._held = True

    def release(self) -> None:
        """Hand over deliveries again: the owner feeds (``feed()``, no bytes) to read what
        was held back."""
        self._held = False

    def close(self) -> None:
        """Forget what is buffered and read nothing more (the stream has ended)."""
        self._closed = True
        self._incoming = None
        self._buffer.clear()

    def feed(self, data: bytes = b"") -> None:
        """Add ``data`` and read every complete frame, as far as holding allows. Raises
        WireError for bytes that are not AMQP (the reader is closed then); an exception
        from a callback propagates, the frames read before it consumed."""
        if self._closed:
            return
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        pos = 0
        control_end = 0
        head = FRAME_HEAD.unpack_from
        try:
            while size - pos >= 8:
                if self._held and pos >= control_end and self._incoming is None \
                        and not self._awaiting():
                    control_end = _control_frame_end(buffer, pos)
                    if pos >= control_end:
                        break
                kind, channel, length = head(buffer, pos)
                end = pos + 7 + length
                if end >= size:
                    break
                if buffer[end] != FRAME_END:
                    raise WireError(f"frame of type {kind} does not end with 0xCE")
                payload = bytes(buffer[pos + 7:end])
                pos = end + 1
                self._frame(kind, channel, payload)
                if self._closed:
                    return
        except WireError:
            self.close()
            raise
        finally:
            del buffer[:pos]  # (nothing left to delete once closed)

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == FRAME_METHOD:
            if payload.startswith(_DELIVER_ID):
                if self._incoming is not None:
                    raise WireError("basic.deliver before the previous message's content")
                self._incoming = _Incoming(decode_deliver(payload))
            else:
                self._method(channel, payload)
        elif kind == FRAME_HEADER:
            self._content_header(payload)
        elif kind == FRAME_BODY:
            incoming = self._incoming
            if incoming is None or incoming.size < 0:
                raise WireError("content body without a delivery")
            incoming.chunks.append(payload)
            incoming.received += len(payload)
            if incoming.received >= incoming.size:
                self._deliver(incoming)
        elif kind == FRAME_HEARTBEAT:
            if self._on_heartbeat is not None:
                self._on_heartbeat()
        else:
            raise WireError(f"unknown frame type {kind}")

    def _method(self, channel: int, payload: bytes) -> None:
        method = decode_method(channel, payload)
        if isinstance(method, commands.Basic.Return):
            self._incoming = _Incoming(None)  # its content frames follow: dropped
        self._on_method(channel, method)

    def _content_header(self, payload: bytes) -> None:
        incoming = self._incoming
        if incoming is None or incoming.size >= 0:
            raise WireError("content header without a delivery")
        incoming.size = content_header_body_size(payload)
        try:
            incoming.properties = decode_properties(payload, 12)
        except WireError as exc:
            incoming.problem = str(exc)
        if incoming.size == 0:
            self._deliver(incoming)

    def _deliver(self, incoming: _Incoming) -> None:
        self._incoming = None
        deliver = incoming.deliver
        if deliver is None:
            return
        chunks = incoming.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._on_delivery(Delivery(deliver, incoming.properties, body, incoming.problem))
