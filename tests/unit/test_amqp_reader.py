"""The sans-I/O frame reader (:mod:`aio_celery.amqp.reader`), fed golden byte streams.

The streams are pamqp's frames (``frame.marshal``) and our own content frames
(``wire.content_frames``, themselves proven to be pamqp's bytes). Pinned here:

* any split of the stream (in two at every byte, one byte at a time) gives the same events
  in the same order: deliveries with their properties and body (0 bytes, one frame, many
  frames, unreadable properties handed over with the reason), other methods with their
  channel, heartbeats; nothing is left buffered;
* ``basic.return``: the method is an event, its content frames are read and dropped;
* holding: the reader stops at a message boundary, finishing the message being read first;
  it reads through (deliveries and all) up to a reply while one is awaited and up to a
  control frame (a consumer cancel, a close) waiting behind held deliveries, for any split;
  ``release()`` and a feed hand over the rest, in order;
* errors: a bad frame end, an unknown frame type, content without a delivery, a delivery
  inside another's content, an unknown or truncated method, a truncated ``basic.deliver``
  raise WireError after handing over what came before, and close the reader;
* a callback may close the reader (nothing more is read); an exception from a callback
  propagates with the frames before it consumed, none read twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands, frame
from pamqp import header as pamqp_header

from aio_celery.amqp import wire
from aio_celery.amqp.reader import Delivery, FrameReader, decode_method
from aio_celery.amqp.wire import Deliver, Properties, WireError

HEARTBEAT = wire.HEARTBEAT


class Recorder:
    """The reader's callbacks: every event, in order."""

    def __init__(self, awaiting: bool = False) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.deliveries: list[Delivery] = []
        self.awaiting = awaiting
        #: what a callback does after recording (hold, close, fail, ...)
        self.then_delivery: Callable[[Delivery], None] | None = None
        self.then_method: Callable[[Any], None] | None = None
        self.reader = FrameReader(self.delivered, self.method, on_heartbeat=self.heartbeat,
                                  awaiting=lambda: self.awaiting)

    def delivered(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.events.append(("delivery", delivery.deliver.delivery_tag, delivery.body))
        if self.then_delivery is not None:
            self.then_delivery(delivery)

    def method(self, channel: int, method: Any) -> None:
        self.events.append(("method", channel, method.name, dict(method)))
        if self.then_method is not None:
            self.then_method(method)

    def heartbeat(self) -> None:
        self.events.append(("heartbeat",))

    @property
    def tags(self) -> list[int]:
        return [d.deliver.delivery_tag for d in self.deliveries]


def deliver_frame(tag: int, *, consumer_tag: str = "ctag", redelivered: bool = False,
                  exchange: str = "", routing_key: str = "q") -> bytes:
    return frame.marshal(commands.Basic.Deliver(consumer_tag=consumer_tag, delivery_tag=tag,
                                                redelivered=redelivered, exchange=exchange,
                                                routing_key=routing_key), 1)


def message(tag: int, body: bytes, properties: commands.Basic.Properties | None = None, *,
            frame_max: int = 131072, **deliver: Any) -> bytes:
    encoded = (properties or commands.Basic.Properties()).marshal()
    return deliver_frame(tag, **deliver) + wire.content_frames(1, body, encoded, frame_max)


def pamqp_message(tag: int, body: bytes, properties: commands.Basic.Properties) -> bytes:
    """The same frames as :func:`message`, all from pamqp."""
    return (deliver_frame(tag)
            + frame.marshal(pamqp_header.ContentHeader(0, len(body), properties), 1)
            + frame.marshal(pamqp_body.ContentBody(body), 1))


def bad_headers_message(tag: int) -> bytes:
    """A delivery whose headers table holds a value of an unknown type ('Z')."""
    table = b"\x01kZ"
    properties = (1 << 13).to_bytes(2, "big") + len(table).to_bytes(4, "big") + table
    return deliver_frame(tag) + wire.content_frames(1, b"bad", properties, 131072)


def method(value: Any, channel: int = 1) -> bytes:
    return frame.marshal(value, channel)


def returned(body: bytes, frame_max: int = 131072) -> bytes:
    return (method(commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="",
                                         routing_key="gone"))
            + wire.content_frames(1, body, b"\x00\x00", frame_max))


def raw_frame(kind: int, payload: bytes, end: bytes = b"\xce", channel: int = 1) -> bytes:
    return wire.FRAME_HEAD.pack(kind, channel, len(payload)) + payload + end


HEADERS = {"a": 1, "s": "x", "n": None, "nested": {"l": [1, "two"]}}
STREAM = b"".join([
    message(1, b"hello", commands.Basic.Properties(
        content_type="application/json", headers=HEADERS, correlation_id="c1",
        delivery_mode=2)),
    HEARTBEAT,
    message(2, b"", redelivered=True, exchange="ex", routing_key="rk"),
    method(commands.Basic.Ack(delivery_tag=7, multiple=True)),
    message(3, bytes(range(256)) + b"tail", commands.Basic.Properties(priority=3),
            frame_max=108),  # 100-byte body frames: three of them
    returned(b"dropped" * 40, frame_max=108),
    method(commands.Connection.Blocked(reason="low on memory"), 0),
    bad_headers_message(4),
    pamqp_message(5, b"from pamqp", commands.Basic.Properties(message_id="m5")),
    HEARTBEAT,
])
EXPECTED = [
    ("delivery", 1, b"hello"),
    ("heartbeat",),
    ("delivery", 2, b""),
    ("method", 1, "Basic.Ack", {"delivery_tag": 7, "multiple": True}),
    ("delivery", 3, bytes(range(256)) + b"tail"),
    ("method", 1, "Basic.Return",
     {"reply_code": 312, "reply_text": "NO_ROUTE", "exchange": "", "routing_key": "gone"}),
    ("method", 0, "Connection.Blocked", {"reason": "low on memory"}),
    ("delivery", 4, b"bad"),
    ("delivery", 5, b"from pamqp"),
    ("heartbeat",),
]


def test_the_golden_stream_read_whole() -> None:
    recorder = Recorder()
    recorder.reader.feed(STREAM)
    assert recorder.events == EXPECTED
    first, empty, multi, bad, pamqps = recorder.deliveries
    assert first.deliver == Deliver("ctag", 1, False, "", "q")
    assert first.properties is not None and first.problem is None
    assert (first.properties.content_type, first.properties.headers,
            first.properties.correlation_id, first.properties.delivery_mode) == \
        ("application/json", HEADERS, "c1", 2)
    assert empty.deliver == Deliver("ctag", 2, True, "ex", "rk")
    assert empty.properties == Properties()
    assert multi.properties is not None and multi.properties.priority == 3
    # unreadable properties: the message is still handed over, with the reason
    assert bad.properties is None
    assert bad.problem is not None and "unknown field type" in bad.problem
    assert pamqps.properties is not None and pamqps.properties.message_id == "m5"
    assert recorder.reader.buffered == 0 and not recorder.reader.mid_message


def test_any_split_in_two_gives_the_same_events() -> None:
    for cut in range(len(STREAM) + 1):
        recorder = Recorder()
        recorder.reader.feed(STREAM[:cut])
        recorder.reader.feed(STREAM[cut:])
        assert recorder.events == EXPECTED, f"split at byte {cut}"
        assert recorder.reader.buffered == 0 and not recorder.reader.mid_message


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    recorder = Recorder()
    for index in range(len(STREAM)):
        recorder.reader.feed(STREAM[index:index + 1])
    assert recorder.events == EXPECTED
    assert recorder.reader.buffered == 0


def test_a_body_of_one_mebibyte_in_frame_max_frames() -> None:
    body = bytes(range(256)) * 4096
    stream = message(1, body)
    assert stream.count(b"\x03\x00\x01\x00\x01\xff\xf8") == 8  # 8 full 131064-byte frames
    recorder = Recorder()
    for start in range(0, len(stream), 50_000):
        recorder.reader.feed(stream[start:start + 50_000])
    assert [d.body for d in recorder.deliveries] == [body]


def test_no_heartbeat_callback_means_heartbeats_are_skipped() -> None:
    deliveries: list[Delivery] = []
    reader = FrameReader(deliveries.append, lambda channel, method: None)
    reader.feed(HEARTBEAT + message(1, b"x") + HEARTBEAT)
    assert [d.body for d in deliveries] == [b"x"] and reader.buffered == 0


# --- holding ----------------------------------------------------------------------------------


def numbered(tags: range, size: int = 1000, frame_max: int = 131072) -> list[bytes]:
    return [message(tag, tag.to_bytes(2, "big") * (size // 2), frame_max=frame_max)
            for tag in tags]


def test_hold_stops_at_a_message_boundary_until_released() -> None:
    messages = numbered(range(1, 101))
    recorder = Recorder()
    reader = recorder.reader
    recorder.then_delivery = lambda delivery: reader.hold()
    reader.feed(b"".join(messages))
    assert recorder.tags == [1]
    assert reader.held and reader.holding and not reader.mid_message
    assert reader.buffered == sum(map(len, messages[1:]))  # message 2 is next, whole
    reader.feed(b"")
    reader.feed(HEARTBEAT)  # even a heartbeat waits behind held deliveries
    assert recorder.tags == [1] and recorder.events[-1][0] == "delivery"

    for expected in range(2, 101):
        reader.release()
        reader.feed()
        assert recorder.tags[-1] == expected
    assert recorder.tags == list(range(1, 101))
    assert reader.buffered == len(HEARTBEAT)  # held again after the last one
    reader.release()
    reader.feed()
    assert recorder.events[-1] == ("heartbeat",) and reader.buffered == 0
    assert all(d.body == d.deliver.delivery_tag.to_bytes(2, "big") * 500
               for d in recorder.deliveries)


def test_hold_finishes_the_message_being_read_first() -> None:
    stream = b"".join(numbered(range(1, 4), frame_max=308))  # 300-byte body frames
    recorder = Recorder()
    reader = recorder.reader
    reader.feed(stream[:500])  # deliver, header and part of the body
    assert recorder.deliveries == [] and reader.mid_message
    reader.hold()
    assert not reader.holding  # a message is being read
    reader.feed(stream[500:])
    assert recorder.tags == [1]  # whole, then held
    assert not reader.mid_message and reader.holding
    reader.release()
    reader.feed()
    assert recorder.tags == [1, 2, 3] and reader.buffered == 0


def test_a_reply_is_read_through_held_deliveries_while_awaited() -> None:
    recorder = Recorder()
    reader = recorder.reader
    reader.hold()
    reader.feed(numbered(range(1, 2))[0])
    assert recorder.deliveries == []  # held, and no reply awaited
    recorder.awaiting = True
    assert not reader.holding

    def replied(method: Any) -> None:
        recorder.awaiting = False  # the reply came: nothing awaited any more

    recorder.then_method = replied
    later = numbered(range(3, 4))[0]
    reader.feed(numbered(range(2, 3))[0] + method(commands.Basic.QosOk()) + later)
    # what came before the reply was handed over; after it, holding resumes
    assert [event[:2] for event in recorder.events] == \
        [("delivery", 1), ("delivery", 2), ("method", 1)]
    assert recorder.events[-1][2] == "Basic.QosOk"
    assert reader.holding and reader.buffered == len(later)


@pytest.mark.parametrize("control", [
    pytest.param(commands.Basic.Cancel(consumer_tag="ctag"), id="consumer-cancel"),
    pytest.param(commands.Channel.Close(reply_code=406, reply_text="PRECONDITION_FAILED",
                                        class_id=60, method_id=80),
                 id="channel-close"),
])
def test_a_control_frame_behind_held_deliveries_is_read_through(control: Any) -> None:
    held = numbered(range(1, 4))
    behind = numbered(range(4, 5))[0]
    stream = b"".join(held) + method(control) + behind
    for cut in range(len(stream) + 1):
        recorder = Recorder()
        recorder.reader.hold()
        recorder.reader.feed(stream[:cut])
        recorder.reader.feed(stream[cut:])
        assert [event[:2] for event in recorder.events] == \
            [("delivery", 1), ("delivery", 2), ("delivery", 3), ("method", 1)], cut
        assert recorder.events[-1][2] == control.name
        # behind the control frame, holding resumes
        assert recorder.reader.holding and recorder.reader.buffered == len(behind), cut


def test_a_partial_control_frame_does_not_release_held_deliveries() -> None:
    recorder = Recorder()
    recorder.reader.hold()
    cancel = method(commands.Basic.Cancel(consumer_tag="ctag"))
    recorder.reader.feed(b"".join(numbered(range(1, 3))) + cancel[:-1])
    assert recorder.events == []
    recorder.reader.feed(cancel[-1:])
    assert [event[:2] for event in recorder.events] == \
        [("delivery", 1), ("delivery", 2), ("method", 1)]


# --- basic.return -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 250], ids=["empty", "one-byte", "three-frames"])
def test_a_returns_content_is_dropped(size: int) -> None:
    recorder = Recorder()
    ack = method(commands.Basic.Ack(delivery_tag=1))
    recorder.reader.feed(returned(b"r" * size, frame_max=108) + ack + message(9, b"next"))
    assert [event[:3] for event in recorder.events] == [
        ("method", 1, "Basic.Return"), ("method", 1, "Basic.Ack"), ("delivery", 9, b"next")]
    assert recorder.reader.buffered == 0 and not recorder.reader.mid_message


# --- errors -----------------------------------------------------------------------------------


GOOD = message(1, b"fine")


def header_frame(body_size: int) -> bytes:
    """A content header announcing ``body_size`` bytes, no properties."""
    return raw_frame(2, (60).to_bytes(2, "big") + b"\x00\x00" + body_size.to_bytes(8, "big")
                     + b"\x00\x00")

DELIVER_ID = b"\x00\x3c\x00\x3c"


@pytest.mark.parametrize(("bad", "error"), [
    pytest.param(HEARTBEAT[:-1] + b"\x00", "frame of type 8 does not end with 0xCE",
                 id="bad-frame-end"),
    pytest.param(message(2, b"x")[:-1] + b"\x00", "frame of type 3 does not end with 0xCE",
                 id="bad-body-frame-end"),
    pytest.param(raw_frame(4, b"\x00" * 4), "unknown frame type 4", id="unknown-frame-type"),
    pytest.param(header_frame(4), "content header without a delivery",
                 id="header-without-deliver"),
    pytest.param(raw_frame(3, b"body"), "content body without a delivery",
                 id="body-without-deliver"),
    pytest.param(deliver_frame(2) + raw_frame(3, b"body"), "content body without a delivery",
                 id="body-before-header"),
    pytest.param(deliver_frame(2) + deliver_frame(3),
                 "basic.deliver before the previous message's content",
                 id="deliver-inside-content"),
    pytest.param(deliver_frame(2) + header_frame(4) * 2, "content header without a delivery",
                 id="two-headers"),
    pytest.param(raw_frame(1, b"\x00\x63\x00\x63"), "unreadable method frame",
                 id="unknown-method"),
    pytest.param(raw_frame(1, b"\x00\x3c"), "unreadable method frame", id="too-short"),
    pytest.param(raw_frame(1, DELIVER_ID + b"\x04ct"), "short string runs past",
                 id="truncated-deliver"),
    pytest.param(raw_frame(1, DELIVER_ID + b"\x02ct\x00\x00"), "malformed basic.deliver",
                 id="deliver-without-its-tag"),
])
def test_unreadable_bytes_raise_after_what_came_before(bad: bytes, error: str) -> None:
    recorder = Recorder()
    reader = recorder.reader
    with pytest.raises(WireError, match=error):
        reader.feed(GOOD + bad + GOOD)
    assert recorder.tags == [1]  # what came before counts
    assert reader.closed and reader.buffered == 0 and not reader.mid_message
    reader.feed(GOOD)  # the stream is lost: nothing more is read
    assert recorder.tags == [1] and reader.buffered == 0


def test_a_callback_may_close_the_reader() -> None:
    recorder = Recorder()
    reader = recorder.reader
    recorder.then_method = lambda method: reader.close()  # as a connection that ends
    close = method(commands.Connection.Close(reply_code=320, reply_text="SHUTDOWN",
                                      class_id=0, method_id=0), 0)
    reader.feed(GOOD + close + message(2, b"after"))
    assert [event[0] for event in recorder.events] == ["delivery", "method"]
    assert reader.closed and reader.buffered == 0
    reader.feed(message(3, b"later"))
    assert recorder.tags == [1]


def test_an_exception_from_a_callback_propagates_and_nothing_is_read_twice() -> None:
    recorder = Recorder()
    reader = recorder.reader
    failing = {2}

    def fail_once(delivery: Delivery) -> None:
        if delivery.deliver.delivery_tag in failing:
            failing.clear()
            raise ConnectionError("could not write")

    recorder.then_delivery = fail_once
    with pytest.raises(ConnectionError):
        reader.feed(b"".join(numbered(range(1, 5))))
    assert recorder.tags == [1, 2] and not reader.closed
    reader.feed()
    assert recorder.tags == [1, 2, 3, 4] and reader.buffered == 0


# --- decode_method ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    commands.Basic.ConsumeOk(consumer_tag="ctag"),
    commands.Basic.Nack(delivery_tag=5, multiple=True, requeue=False),
    commands.Queue.DeclareOk(queue="q", message_count=3, consumer_count=1),
    commands.Connection.Close(reply_code=320, reply_text="CONNECTION_FORCED",
                              class_id=0, method_id=0),
], ids=lambda value: value.name)
def test_decode_method_reads_pamqps_frames(value: Any) -> None:
    payload = frame.marshal(value, 1)[7:-1]
    decoded = decode_method(1, payload)
    assert type(decoded) is type(value) and dict(decoded) == dict(value)
