"""The AMQP client against a fake server on a local socket (no RabbitMQ).

* ``connection.blocked``: a publish waits while blocked, bounded by its timeout, and goes out
  once unblocked (the worker's connection and the publisher). RabbitMQ blocks only under a
  resource alarm, which would block every publisher of a shared broker, so the fake server
  speaks the handshake and sends the frames: what is under test is our parser and publish
  path (``tests/integration/test_memory_alarm.py`` raises a real alarm on a node of its own);
* a channel error is the publishes' own only when a publish caused it.

The client against the real RabbitMQ: ``tests/integration/test_amqp_client.py``.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import FakeBroker, eventually, stays
from pamqp import commands

from aio_celery.amqp.connection import AMQPConnection, ConnectionClosed
from aio_celery.broker import Broker
from aio_celery.exceptions import BrokerConnectionError
from aio_celery.protocol import Envelope

TIMEOUT = 15.0


# --- connection.blocked -----------------------------------------------------------------------


async def test_a_blocked_connection_holds_publishes_until_unblocked(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = FakeBroker()
    await broker.start()
    connection = AMQPConnection(f"amqp://guest:guest@127.0.0.1:{broker.port}/",
                                publish_timeout=0.3)
    try:
        await asyncio.wait_for(connection.connect(), TIMEOUT)
        broker.send(commands.Connection.Blocked(reason="low on memory"))
        await eventually(lambda: connection.blocked == "low on memory", TIMEOUT)
        assert "The broker blocked publishing on this connection (low on memory" \
            in caplog.text

        with pytest.raises(TimeoutError, match="blocked by the broker \\(low on memory\\)"):
            await connection.publish(b"held", b"\x00\x00", "q")
        connection.publish_timeout = TIMEOUT
        waiting = asyncio.ensure_future(connection.publish(b"later", b"\x00\x00", "q"))
        await stays(lambda: not broker.methods(commands.Basic.Publish) and not waiting.done())

        broker.send(commands.Connection.Unblocked())
        await eventually(lambda: len(broker.methods(commands.Basic.Publish)) == 1, TIMEOUT)
        assert connection.blocked is None
        assert "unblocked publishing on this connection (low on memory cleared)" \
            in caplog.text
        broker.send(commands.Basic.Ack(delivery_tag=1), 1)
        await asyncio.wait_for(waiting, TIMEOUT)
    finally:
        await asyncio.wait_for(connection.close(), TIMEOUT)
        await broker.close()


@pytest.mark.parametrize(("class_id", "method_id", "code", "blamed"),
                         [(40, 30, 406, None), (60, 40, 404, 404)],
                         ids=["a request's error", "a publish's error"])
async def test_a_channel_error_is_the_publishes_own_only_when_a_publish_caused_it(
        class_id: int, method_id: int, code: int, blamed: int | None) -> None:
    """The broker names what caused a channel error. One a request caused (a refused
    declaration) is that request's: the publishes awaiting confirms meanwhile are lost with
    the channel (retry them), not refused; one a publish caused is refused for each."""
    broker = FakeBroker()
    await broker.start()
    connection = AMQPConnection(f"amqp://guest:guest@127.0.0.1:{broker.port}/",
                                publish_timeout=TIMEOUT)
    try:
        await asyncio.wait_for(connection.connect(), TIMEOUT)
        publishing = asyncio.ensure_future(connection.publish(b"x", b"\x00\x00", "q"))
        await eventually(lambda: broker.methods(commands.Basic.Publish), TIMEOUT)
        binding = asyncio.ensure_future(connection.exchange_bind("a", "b", "k"))
        await eventually(lambda: broker.methods(commands.Exchange.Bind), TIMEOUT)
        broker.send(commands.Channel.Close(reply_code=code, reply_text="REFUSED - test",
                                           class_id=class_id, method_id=method_id), 1)
        with pytest.raises(ConnectionClosed) as request:
            await asyncio.wait_for(binding, TIMEOUT)
        assert request.value.reply_code == code
        with pytest.raises(ConnectionClosed, match="REFUSED - test") as publish:
            await asyncio.wait_for(publishing, TIMEOUT)
        assert publish.value.reply_code == blamed
    finally:
        await asyncio.wait_for(connection.close(), TIMEOUT)
        await broker.close()


async def test_a_blocked_publisher_holds_publishes_until_unblocked(
        caplog: pytest.LogCaptureFixture) -> None:
    """The same for the publisher (aio-pika): bounded by broker_publish_timeout."""
    fake = FakeBroker()
    await fake.start()
    publisher = Broker(f"amqp://guest:guest@127.0.0.1:{fake.port}/", publish_timeout=0.3)
    envelope = Envelope(b"[[], {}, {}]", {"task": "t", "id": "i"}, "i")
    try:
        await asyncio.wait_for(publisher.connect(), TIMEOUT)
        fake.send(commands.Connection.Blocked(reason="low on memory"))
        await publisher.declare_queue("q")  # answered after the block: the block is seen
        with pytest.raises(BrokerConnectionError, match="blocked publishing that long"):
            await publisher.publish(envelope, "q")
        publisher.publish_timeout = TIMEOUT
        waiting = asyncio.ensure_future(publisher.publish(envelope, "q"))
        await stays(lambda: not fake.methods(commands.Basic.Publish) and not waiting.done())

        fake.send(commands.Connection.Unblocked())
        await eventually(lambda: len(fake.methods(commands.Basic.Publish)) == 1, TIMEOUT)
        fake.send(commands.Basic.Ack(delivery_tag=1), 1)
        await asyncio.wait_for(waiting, TIMEOUT)
    finally:
        await asyncio.wait_for(publisher.close(), TIMEOUT)
        await fake.close()
