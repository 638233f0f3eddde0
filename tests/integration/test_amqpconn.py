"""The worker's lean AMQP connection (:mod:`aio_celery.amqp.connection`) against the real RabbitMQ.

Pinned here:

* connect failures are quick and say why (ACCESS_REFUSED, NOT_ALLOWED for the vhost), with
  ``closed()``/``is_open`` consistent afterwards;
* deliveries carry exactly what was published (every property, headers of every type,
  bodies of 0 bytes up to 1 MiB spanning many frames), acks (``multiple`` too) and rejects
  settle them, ``qos`` limits them, ``cancel`` stops them, and ``publish`` of a received
  message is confirmed and arrives byte-identical;
* a request given up (cancelled) after it was sent leaves its reply to be skipped: the next
  request gets its own, and the connection goes on;
* the broker ending things (a channel error, a missing queue, a deleted queue) ends the
  connection at once, with the reason from ``closed()`` and pending requests failing;
* ``hold()``/``release()``: deliveries stop at a message boundary (a message being read is
  finished first), reading pauses past 64 KiB, a request still gets its reply (bodies past
  64 KiB too) and a publish its confirm, everything arrives after ``release()``;
* heartbeats (one per half interval, seen through a recording proxy) keep an idle
  connection alive, and RabbitMQ does drop one that sends none;
* ``close()`` is polite and idempotent.

Without a broker (``tests/unit/test_amqpconn_units.py``): ``Endpoint.from_url``, a refused TCP
connection, and the connection around its frame reader on a fake broker; the reader itself is
tested without I/O in ``tests/unit/test_amqp_reader.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from helpers import Collector, declare_test_queue, ready_count
from pamqp import commands, frame
from tcp_proxy import TcpProxy

from aio_celery.amqp import wire as amqpwire
from aio_celery.amqp.connection import (
    PAUSE_READING_AT,
    AMQPConnection,
    ConnectionClosed,
    Delivery,
    Endpoint,
    Returned,
)
from aio_celery.amqp.wire import Deliver, Properties

TIMEOUT = 5.0  # an upper bound for anything awaited; every step takes far less
HEARTBEAT = amqpwire.HEARTBEAT


# --- helpers ----------------------------------------------------------------------------------


async def nothing_more(collector: Collector, count: int, duration: float = 0.3) -> None:
    """No delivery beyond ``count`` arrives for ``duration`` seconds."""
    await asyncio.sleep(duration)
    assert len(collector) == count, [d.body[:20] for d in collector.deliveries[count:]]


def with_credentials(url: str, *, password: str | None = None, vhost: str | None = None) -> str:
    """``url`` with another password and/or vhost."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if password is not None:
        netloc = f"{quote(parts.username or 'guest', safe='')}:{quote(password, safe='')}" \
                 f"@{parts.hostname}:{parts.port or 5672}"
    path = parts.path if vhost is None else "/" + quote(vhost, safe="")
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


async def connected(url: str, **options: Any) -> AMQPConnection:
    connection = AMQPConnection(url, connection_name="aio-celery test_amqpconn", **options)
    await asyncio.wait_for(connection.connect(), TIMEOUT)
    return connection


@pytest.fixture
async def conn(amqp_url: str) -> AsyncIterator[AMQPConnection]:
    connection = await connected(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()


async def publish(channel: AbstractChannel, queue: str, *bodies: bytes, **properties: Any) -> None:
    """Publish (confirmed) to ``queue`` through the default exchange."""
    for body in bodies:
        await channel.default_exchange.publish(aio_pika.Message(body, **properties),
                                               routing_key=queue)


# --- connecting -------------------------------------------------------------------------------


async def test_wrong_password_is_refused_quickly(amqp_url: str) -> None:
    connection = AMQPConnection(with_credentials(amqp_url, password="wrong-" + uuid.uuid4().hex))
    started = time.monotonic()
    with pytest.raises(ConnectionClosed, match="ACCESS_REFUSED") as refused:
        await asyncio.wait_for(connection.connect(), TIMEOUT)
    assert time.monotonic() - started < 2.0
    assert "403" in str(refused.value)
    assert refused.value.reply_code == 403
    assert not connection.is_open
    assert await asyncio.wait_for(connection.closed(), 1) == str(refused.value)


async def test_unknown_vhost_is_refused_quickly(amqp_url: str) -> None:
    vhost = f"no-such-vhost-{uuid.uuid4().hex[:8]}"
    connection = AMQPConnection(with_credentials(amqp_url, vhost=vhost))
    assert connection.endpoint.vhost == vhost
    started = time.monotonic()
    with pytest.raises(ConnectionClosed, match="NOT_ALLOWED") as refused:
        await asyncio.wait_for(connection.connect(), TIMEOUT)
    assert time.monotonic() - started < 2.0
    assert vhost in str(refused.value)
    assert refused.value.reply_code == 530
    assert not connection.is_open
    assert await asyncio.wait_for(connection.closed(), 1) == str(refused.value)


async def test_connect_and_close_politely(amqp_url: str) -> None:
    connection = await connected(amqp_url)
    assert connection.is_open
    assert 0 < connection.frame_max <= 131072
    ended = asyncio.ensure_future(connection.closed())
    await asyncio.sleep(0)
    assert not ended.done()
    await asyncio.wait_for(connection.close(), TIMEOUT)
    assert await asyncio.wait_for(ended, 1) == "closed"
    assert not connection.is_open
    await asyncio.wait_for(connection.close(), 1)  # a second close is harmless
    assert await connection.closed() == "closed"
    with pytest.raises(ConnectionClosed, match="closed"):
        connection.ack(1)
    with pytest.raises(ConnectionClosed, match="closed"):
        connection.reject(1, requeue=True)
    with pytest.raises(ConnectionClosed, match="closed"):
        await asyncio.wait_for(connection.qos(1), 1)


# --- deliveries -------------------------------------------------------------------------------

HEADERS: dict[str, Any] = {
    "str": "plain",
    "unicode": "héllo wörld ✓ 日本語 🐍",
    "empty": "",
    "int_small": 7,
    "int_negative": -3,
    "int_16": 30000,
    "int_32": 100000,
    "int_64": 2**40,
    "true": True,
    "false": False,
    "none": None,
    "float": 3.25,
    "decimal": Decimal("1.25"),
    "bytes": bytearray(b"\x00\xff"),
    "nested": {"a": 1, "b": {"c": "d", "e": None}, "l": [1, "x"]},
    "list": [1, "two", None, True, 2.5, {"k": "v"}, []],
    "when": datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
}
ONE_MIB = bytes(range(256)) * 4096


async def test_deliveries_carry_everything_published(
        conn: AMQPConnection, amqp: AbstractConnection, channel: AbstractChannel,
        unique_name: str, amqp_url: str) -> None:
    await declare_test_queue(channel, unique_name, arguments={"x-max-priority": 10})
    bodies = [b"", b"small body", ONE_MIB, "ünïcode".encode()]
    sent = []
    for index, body in enumerate(bodies):
        message = aio_pika.Message(
            body, headers={**HEADERS, "index": index}, content_type="application/json",
            content_encoding="utf-8", correlation_id=f"corr-{index}", reply_to="replies",
            priority=7, expiration=60, message_id=f"msg-{index}", type="task.kind",
            app_id="test-app", user_id=urlsplit(amqp_url).username or "guest",
            timestamp=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        sent.append(message)
        await channel.default_exchange.publish(message, routing_key=unique_name)

    collector = Collector()
    tag = await asyncio.wait_for(conn.consume(unique_name, collector), TIMEOUT)
    deliveries = await collector.until(len(bodies))
    await nothing_more(collector, len(bodies), 0.1)

    for index, (delivery, message) in enumerate(zip(deliveries, sent, strict=True)):
        assert delivery.deliver == Deliver(consumer_tag=tag, delivery_tag=index + 1,
                                           redelivered=False, exchange="",
                                           routing_key=unique_name)
        assert delivery.problem is None
        assert delivery.body == bodies[index]
        assert type(delivery.body) is bytes
        props = delivery.properties
        assert props is not None
        # the broker passes the properties through as they were written
        assert props.encoded == message.properties.marshal()
        assert props.headers == {**HEADERS, "index": index}
        assert props == Properties(
            encoded=props.encoded, content_type="application/json", content_encoding="utf-8",
            headers=props.headers, delivery_mode=2, priority=7, correlation_id=f"corr-{index}",
            reply_to="replies", expiration="60000", message_id=f"msg-{index}",
            timestamp=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), type="task.kind",
            user_id=urlsplit(amqp_url).username or "guest", app_id="test-app")

    # A prefix in one frame, then close: only the last one goes back to the queue.
    conn.ack(len(bodies) - 1, multiple=True)
    await asyncio.wait_for(conn.close(), TIMEOUT)
    assert await ready_count(amqp, unique_name) == 1

    again = await connected(amqp_url)
    try:
        collector = Collector()
        await asyncio.wait_for(again.consume(unique_name, collector), TIMEOUT)
        [last] = await collector.until(1)
        assert last.body == bodies[-1]
        assert last.deliver.redelivered is True
        assert last.deliver.delivery_tag == 1  # tags are per channel
        again.ack(last.deliver.delivery_tag)
    finally:
        await asyncio.wait_for(again.close(), TIMEOUT)
    assert await ready_count(amqp, unique_name) == 0


async def test_a_returned_mandatory_publish_fails_and_the_others_are_confirmed(
        conn: AMQPConnection, channel: AbstractChannel, unique_name: str) -> None:
    """Mandatory publishes to a missing queue come back (basic.return, then their confirm):
    each fails with Returned; those to an existing queue in between are confirmed."""
    await declare_test_queue(channel, unique_name)
    missing = f"{unique_name}-missing"
    props = b"\x00\x00"  # encoded basic properties: none set
    outcomes = await asyncio.gather(
        conn.publish(b"1", props, unique_name, mandatory=True),
        conn.publish(b"2", props, missing, mandatory=True),
        conn.publish(b"3", props, unique_name, mandatory=True),
        conn.publish(b"4", props, missing, mandatory=True),
        return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None, outcomes
    for returned in (outcomes[1], outcomes[3]):
        assert isinstance(returned, Returned), outcomes
        assert "312 NO_ROUTE" in str(returned) and missing in str(returned)
    assert conn.is_open
    queue = await declare_test_queue(channel, unique_name, passive=True)
    assert queue.declaration_result.message_count == 2


async def test_publish_is_confirmed_and_byte_identical(
        conn: AMQPConnection, amqp: AbstractConnection, channel: AbstractChannel,
        unique_name: str) -> None:
    source, target = unique_name, unique_name + "-b"
    await declare_test_queue(channel, source)
    await declare_test_queue(channel, target)
    bodies = [b"x" * 300_000, b"small", b""]  # 300 kB: three body frames each way
    for index, body in enumerate(bodies):
        await publish(channel, source, body, headers={**HEADERS, "index": index},
                      content_type="application/json", correlation_id=f"c{index}")

    received = Collector()
    await asyncio.wait_for(conn.consume(source, received), TIMEOUT)
    originals = await received.until(len(bodies))
    for original in originals:
        assert original.properties is not None
        await asyncio.wait_for(
            conn.publish(original.body, original.properties.encoded, target), TIMEOUT)
        conn.ack(original.deliver.delivery_tag)
    assert conn.unconfirmed == 0
    # encoded properties as they are, none at all included
    await asyncio.wait_for(conn.publish(b"bare", b"\x00\x00", target), TIMEOUT)

    copies = Collector()
    await asyncio.wait_for(conn.consume(target, copies), TIMEOUT)
    republished = await copies.until(len(bodies) + 1)
    for original, copy in zip(originals, republished, strict=False):
        assert copy.properties is not None and original.properties is not None
        assert copy.properties.encoded == original.properties.encoded
        assert copy.properties == original.properties
        assert copy.body == original.body
        assert copy.deliver.routing_key == target
    bare = republished[-1]
    assert bare.body == b"bare"
    assert bare.properties == Properties(encoded=b"\x00\x00")
    conn.ack(republished[-1].deliver.delivery_tag, multiple=True)

    # Many at once: the broker confirms them in batches (multiple=True), each one counts.
    many = unique_name + "-c"
    await declare_test_queue(channel, many)
    await asyncio.wait_for(asyncio.gather(
        *(conn.publish(b"%d" % i, b"\x00\x00", many) for i in range(300))), TIMEOUT)
    assert conn.unconfirmed == 0
    assert await ready_count(amqp, many) == 300


async def test_reject_requeues_or_drops(
        conn: AMQPConnection, amqp: AbstractConnection, channel: AbstractChannel,
        unique_name: str) -> None:
    await declare_test_queue(channel, unique_name)
    await publish(channel, unique_name, b"again", b"gone")
    collector = Collector()
    await asyncio.wait_for(conn.consume(unique_name, collector), TIMEOUT)
    first, second = await collector.until(2)
    assert (first.body, first.deliver.redelivered) == (b"again", False)
    conn.reject(first.deliver.delivery_tag, requeue=True)
    conn.reject(second.deliver.delivery_tag, requeue=False)

    redelivered = (await collector.until(3))[2]
    assert redelivered.body == b"again"
    assert redelivered.deliver.redelivered is True
    assert redelivered.deliver.delivery_tag == 3
    await nothing_more(collector, 3)  # "gone" is gone
    conn.ack(redelivered.deliver.delivery_tag)
    await asyncio.wait_for(conn.close(), TIMEOUT)
    assert await ready_count(amqp, unique_name) == 0


async def test_qos_limits_and_cancel_stops_deliveries(
        conn: AMQPConnection, amqp: AbstractConnection, channel: AbstractChannel,
        unique_name: str) -> None:
    await declare_test_queue(channel, unique_name)
    await publish(channel, unique_name, *(b"m%d" % i for i in range(5)))
    await asyncio.wait_for(conn.qos(2), TIMEOUT)
    collector = Collector()
    tag = await asyncio.wait_for(conn.consume(unique_name, collector), TIMEOUT)
    assert conn.consumers == {tag: unique_name}
    await collector.until(2)
    await nothing_more(collector, 2, 0.2)
    conn.ack(2, multiple=True)
    await collector.until(4)
    assert [d.body for d in collector.deliveries] == [b"m0", b"m1", b"m2", b"m3"]

    await asyncio.wait_for(conn.cancel(tag), TIMEOUT)
    assert conn.consumers == {}
    conn.ack(4, multiple=True)
    await nothing_more(collector, 4, 0.2)  # the fifth stays in the queue
    assert conn.is_open
    await asyncio.wait_for(conn.close(), TIMEOUT)
    assert await ready_count(amqp, unique_name) == 1


async def test_a_cancelled_request_does_not_take_the_next_reply(
        conn: AMQPConnection, channel: AbstractChannel, unique_name: str) -> None:
    await asyncio.wait_for(conn.queue_declare(unique_name), TIMEOUT)
    # A request given up after it was sent (a timeout, a cancelled task): its reply still comes.
    # (It declares a queue of its own: the queue's existence shows that it was sent.)
    sent = unique_name + "-a"
    abandoned = asyncio.ensure_future(conn.queue_declare(sent))
    queued = asyncio.ensure_future(conn.qos(3))  # waits its turn: never sent
    await asyncio.sleep(0)
    abandoned.cancel()
    queued.cancel()
    for task in (abandoned, queued):
        with pytest.raises(asyncio.CancelledError):
            await task

    # The next request gets its own reply, not the abandoned one's...
    assert await asyncio.wait_for(conn.qos(10), 1) is None
    # ... and the connection goes on: no reply is unexpected, none is skipped twice.
    declared = await asyncio.wait_for(conn.queue_declare(unique_name, passive=True), 1)
    assert declared.queue == unique_name
    assert await asyncio.wait_for(conn.qos(5), 1) is None
    ended = asyncio.ensure_future(conn.closed())
    await asyncio.sleep(0.1)
    assert conn.is_open and not ended.done()
    ended.cancel()
    assert (await channel.declare_queue(sent, passive=True)).name == sent  # it was sent


# --- the broker ending things -----------------------------------------------------------------


async def test_channel_error_ends_the_connection(conn: AMQPConnection) -> None:
    conn.ack(9999)  # an unknown delivery tag: the broker closes the channel
    pending = asyncio.ensure_future(conn.qos(5))
    started = time.monotonic()
    reason = await asyncio.wait_for(conn.closed(), 2)
    assert time.monotonic() - started < 1.0
    assert "PRECONDITION_FAILED" in reason and "406" in reason
    assert "9999" in reason
    assert not conn.is_open
    with pytest.raises(ConnectionClosed, match="PRECONDITION_FAILED"):
        await asyncio.wait_for(pending, 1)
    with pytest.raises(ConnectionClosed, match="PRECONDITION_FAILED"):
        conn.ack(1)


async def test_missing_queue_fails_the_request(conn: AMQPConnection, unique_name: str) -> None:
    with pytest.raises(ConnectionClosed, match="NOT_FOUND") as missing:
        await asyncio.wait_for(conn.queue_declare(unique_name + "-c", passive=True), 2)
    assert unique_name + "-c" in str(missing.value)
    reason = await asyncio.wait_for(conn.closed(), 1)
    assert "404" in reason and "channel" in reason
    assert not conn.is_open


async def test_publish_to_a_missing_exchange_fails(conn: AMQPConnection,
                                                   unique_name: str) -> None:
    with pytest.raises(ConnectionClosed, match="NOT_FOUND"):
        await asyncio.wait_for(conn.publish(b"x", b"\x00\x00", "rk", exchange=unique_name), 2)
    assert conn.unconfirmed == 0
    assert not conn.is_open


async def test_queue_deleted_while_consuming(
        conn: AMQPConnection, channel: AbstractChannel, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ sends basic.cancel (we announce consumer_cancel_notify): the reason is
    logged with the queue, and the connection ends for its owner to consume again."""
    await asyncio.wait_for(conn.queue_declare(unique_name), TIMEOUT)
    tag = await asyncio.wait_for(conn.consume(unique_name, Collector()), TIMEOUT)
    await channel.queue_delete(unique_name)
    reason = await asyncio.wait_for(conn.closed(), 2)
    assert "cancelled consumer" in reason and tag in reason and unique_name in reason
    assert not conn.is_open
    assert f"The broker cancelled the consumer of queue {unique_name!r}" in caplog.text
    assert "the queue was deleted, its quorum leader moved" in caplog.text


# --- holding deliveries back ------------------------------------------------------------------


async def test_hold_and_release(conn: AMQPConnection, amqp: AbstractConnection,
                                channel: AbstractChannel, unique_name: str) -> None:
    count, size, hold_at = 500, 4096, 10  # 2 MB in all: far past the 64 KiB pause threshold
    await declare_test_queue(channel, unique_name)
    for i in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(i.to_bytes(4, "big") * (size // 4)), routing_key=unique_name)
    assert await ready_count(amqp, unique_name) == count

    received: list[Delivery] = []

    def callback(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == hold_at:
            conn.hold()

    def check(deliveries: list[Delivery]) -> None:
        for index, delivery in enumerate(deliveries):  # complete, in order, none twice
            assert delivery.deliver.delivery_tag == index + 1
            assert delivery.body == index.to_bytes(4, "big") * (size // 4)

    await asyncio.wait_for(conn.consume(unique_name, callback), TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not conn.reading_paused:  # the bytes keep coming until 64 KiB wait
        assert time.monotonic() < deadline, "reading never paused"
        await asyncio.sleep(0.01)
    assert conn.buffered > PAUSE_READING_AT and conn.held
    await asyncio.sleep(0.2)
    assert len(received) == hold_at
    check(received)

    # A request still gets its reply (handing over what was queued before it)...
    declared = await asyncio.wait_for(conn.queue_declare(unique_name, passive=True), 2)
    assert declared.message_count == 0  # all delivered (not all handed over)
    after_request = len(received)
    check(received)
    assert conn.is_open
    # ... and then deliveries are held again.
    await asyncio.sleep(0.2)
    assert len(received) == after_request

    conn.release()
    deadline = time.monotonic() + TIMEOUT
    while len(received) < count:
        assert time.monotonic() < deadline, f"only {len(received)} of {count} arrived"
        await asyncio.sleep(0.01)
    assert not conn.reading_paused
    check(received)
    assert len(received) == count
    conn.ack(count, multiple=True)
    await asyncio.wait_for(conn.close(), TIMEOUT)
    assert await ready_count(amqp, unique_name) == 0


async def test_request_while_held_with_large_messages(
        conn: AMQPConnection, amqp: AbstractConnection, channel: AbstractChannel,
        unique_name: str) -> None:
    # Bodies past the 64 KiB pause threshold (two frames each): reading must not pause in the
    # middle of a frame while a reply waits behind it, or the request waits forever.
    count, size = 20, 200_000
    await declare_test_queue(channel, unique_name)
    await publish(channel, unique_name, *(bytes([i]) * size for i in range(count)))
    received: list[Delivery] = []

    def callback(delivery: Delivery) -> None:
        received.append(delivery)
        conn.hold()

    def check(deliveries: list[Delivery]) -> None:
        for index, delivery in enumerate(deliveries):  # complete, in order, none twice
            assert delivery.deliver.delivery_tag == index + 1
            assert delivery.body == bytes([index]) * size

    await asyncio.wait_for(conn.consume(unique_name, callback), TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not conn.reading_paused:
        assert time.monotonic() < deadline, "reading never paused"
        await asyncio.sleep(0.01)
    assert len(received) == 1

    declared = await asyncio.wait_for(conn.queue_declare(unique_name, passive=True), 2)
    assert declared.queue == unique_name
    assert conn.is_open
    check(received)
    after_request = len(received)
    await asyncio.sleep(0.1)  # held again
    assert len(received) == after_request

    conn.release()
    deadline = time.monotonic() + TIMEOUT
    while len(received) < count:
        assert time.monotonic() < deadline, f"only {len(received)} of {count} arrived"
        await asyncio.sleep(0.01)
    check(received)
    assert len(received) == count
    conn.ack(count, multiple=True)
    await asyncio.wait_for(conn.close(), TIMEOUT)
    assert await ready_count(amqp, unique_name) == 0


async def test_publish_while_held_is_confirmed(
        conn: AMQPConnection, amqp: AbstractConnection, channel: AbstractChannel,
        unique_name: str) -> None:
    source, target = unique_name, unique_name + "-b"
    await declare_test_queue(channel, source)
    await declare_test_queue(channel, target)
    count, size, hold_at = 20, 10_000, 5  # 200 kB: reading pauses while held
    bodies = [bytes([i]) * size for i in range(count)]
    await publish(channel, source, *bodies)
    received: list[Delivery] = []

    def callback(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == hold_at:
            conn.hold()

    await asyncio.wait_for(conn.consume(source, callback), TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not conn.reading_paused:
        assert time.monotonic() < deadline, "reading never paused"
        await asyncio.sleep(0.01)
    assert len(received) == hold_at

    # The confirm comes behind the held deliveries, on a paused socket: it is read without
    # waiting for release().
    await asyncio.wait_for(conn.publish(b"while held", b"\x00\x00", target), 1)
    assert conn.unconfirmed == 0
    assert conn.is_open
    assert await ready_count(amqp, target) == 1

    conn.release()
    deadline = time.monotonic() + TIMEOUT
    while len(received) < count:
        assert time.monotonic() < deadline, f"only {len(received)} of {count} arrived"
        await asyncio.sleep(0.01)
    assert [d.body for d in received] == bodies
    assert [d.deliver.delivery_tag for d in received] == list(range(1, count + 1))
    conn.ack(count, multiple=True)
    await asyncio.wait_for(conn.close(), TIMEOUT)
    assert await ready_count(amqp, source) == 0


async def test_broker_ending_things_behind_held_deliveries_is_seen_while_held(
        conn: AMQPConnection, channel: AbstractChannel, unique_name: str) -> None:
    """The parser looks past held deliveries for control frames: a consumer cancel (here:
    the queue is deleted) behind them ends the connection without waiting for release()."""
    count, size, hold_at = 10, 4096, 2  # 40 kB: held in the buffer, reading not paused
    await declare_test_queue(channel, unique_name)
    await publish(channel, unique_name, *(bytes([i]) * size for i in range(count)))
    received: list[Delivery] = []

    def callback(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == hold_at:
            conn.hold()

    await asyncio.wait_for(conn.qos(100), TIMEOUT)
    tag = await asyncio.wait_for(conn.consume(unique_name, callback), TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while conn.buffered < (count - hold_at) * size:  # the rest arrived, and is held
        assert time.monotonic() < deadline, "the held deliveries never arrived"
        await asyncio.sleep(0.01)
    assert len(received) == hold_at
    assert not conn.reading_paused
    await channel.queue_delete(unique_name)
    reason = await asyncio.wait_for(conn.closed(), 2)
    assert "cancelled consumer" in reason and tag in reason
    assert not conn.is_open
    assert conn.held  # seen without a release


async def test_heartbeats_read_a_paused_connection_while_held(
        amqp_url: str, channel: AbstractChannel, unique_name: str) -> None:
    """With reading paused by held deliveries, each heartbeat still reads once (a close from
    the broker, or a dead socket, must not wait for release()), and the parser pauses again;
    deliveries stay held. A queue deleted meanwhile ends the connection."""
    count, size, hold_at = 120, 4096, 2  # ~500 kB: more than one read of the socket
    await declare_test_queue(channel, unique_name)
    await publish(channel, unique_name, *(bytes([i % 256]) * size for i in range(count)))
    url = amqp_url + ("&" if "?" in amqp_url else "?") + "heartbeat=1"
    conn = await connected(url)
    try:
        received: list[Delivery] = []

        def callback(delivery: Delivery) -> None:
            received.append(delivery)
            if len(received) == hold_at:
                conn.hold()

        await asyncio.wait_for(conn.qos(1000), TIMEOUT)
        await asyncio.wait_for(conn.consume(unique_name, callback), TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not conn.reading_paused:
            assert time.monotonic() < deadline, "reading never paused"
            await asyncio.sleep(0.01)
        paused_at = conn.buffered
        deadline = time.monotonic() + 1.5
        while conn.buffered == paused_at:
            assert time.monotonic() < deadline, "a paused connection is never read again"
            await asyncio.sleep(0.01)
        assert len(received) == hold_at  # still held
        assert conn.is_open
        await channel.queue_delete(unique_name)
        reason = await asyncio.wait_for(conn.closed(), 2.5)
        assert "cancelled consumer" in reason
        assert conn.held
    finally:
        await conn.close()


# --- heartbeats -------------------------------------------------------------------------------


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` by way of ``proxy`` (same credentials, vhost and query)."""
    parts = urlsplit(url)
    netloc = f"{parts.username or 'guest'}:{parts.password or 'guest'}@{proxy.listen_host}" \
             f":{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


async def silent_login(url: str, heartbeat: int) -> None:
    """Log in with pamqp's frames, agree on ``heartbeat``, then send nothing at all (no
    heartbeat either); return once the broker has closed the socket."""
    endpoint = Endpoint.from_url(url)
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    buffer = b""

    async def receive(kind: type) -> Any:
        nonlocal buffer
        while True:
            consumed, _, method = frame.unmarshal(buffer) if len(buffer) >= 8 else (0, 0, None)
            if consumed:
                buffer = buffer[consumed:]
                if isinstance(method, kind):
                    return method
                continue
            data = await reader.read(65536)
            assert data, "the broker closed the connection during the handshake"
            buffer += data

    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        await receive(commands.Connection.Start)
        mechanism, response = endpoint.login()
        writer.write(frame.marshal(commands.Connection.StartOk(
            client_properties={"connection_name": "aio-celery test_amqpconn silent"},
            mechanism=mechanism, response=response, locale="en_US"), 0))
        tune = await receive(commands.Connection.Tune)
        writer.write(frame.marshal(commands.Connection.TuneOk(
            channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=heartbeat), 0)
            + frame.marshal(commands.Connection.Open(virtual_host=endpoint.vhost), 0))
        await receive(commands.Connection.OpenOk)
        with contextlib.suppress(ConnectionResetError):  # RabbitMQ resets it
            while await reader.read(65536):  # the broker's heartbeats, then the end
                pass
    finally:
        writer.close()


async def test_heartbeats_keep_an_idle_connection(amqp_url: str, unique_name: str,
                                                  proxy: TcpProxy) -> None:
    """Seen on the wire (a recording proxy): one heartbeat every half interval, and the
    broker's arrive. The control: a login that sends no heartbeats is dropped."""
    proxy.recording = True
    url = through(proxy, amqp_url)
    alive = await connected(url + ("&" if "?" in url else "?") + "heartbeat=1")
    silent = asyncio.ensure_future(silent_login(amqp_url, heartbeat=1))
    try:
        assert alive.heartbeat == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(3.5)
        assert alive.is_open
        beats = [when for when, upstream, data in proxy.traffic if upstream and when > started
                 for _ in range(data.count(HEARTBEAT))]
        # one every half interval (the broker drops a client silent for ~3 intervals)
        assert len(beats) >= 5
        assert max(b - a for a, b in zip([started, *beats], beats, strict=False)) < 0.8
        heard = [when for when, upstream, data in proxy.traffic
                 if not upstream and HEARTBEAT in data]
        assert heard and loop.time() - heard[-1] < 1.5  # the broker's heartbeats arrive
        declared = await asyncio.wait_for(alive.queue_declare(unique_name), 1)
        assert declared.queue == unique_name
        assert await asyncio.wait_for(alive.qos(3), 1) is None
        await asyncio.wait_for(silent, 1)  # the control was dropped by then
    finally:
        silent.cancel()
        await alive.close()
