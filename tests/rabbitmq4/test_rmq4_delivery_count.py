"""What RabbitMQ 4.0.5 (with 4.3's deprecated-feature defaults) does with the two things
our worker leans on, measured with our own AMQP client on a quorum queue:

* ``x-delivery-count`` (the poison guard counts a task's deliveries with it): on 4.0.5 a
  ``basic.reject(requeue=True)`` and a ``basic.nack(requeue=True)`` BOTH count, and so
  on 4.0 to 4.2. Only 4.3 leaves a nack's return out (rabbitmq-server pull request 15387),
  which this node cannot show.
* a global QoS (``global_qos`` denied): ``basic.qos(global=True)`` is answered, logged by
  the broker as a denied deprecated feature, and a quorum consumer is accepted after it
  (3.x refuses that consumer): a worker that still asked for it would not be stopped, but
  its window would not be what it asked for. Ours asks for a per-consumer one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from aio_celery.amqp.connection import AMQPConnection
from aio_celery.amqp.reader import Delivery

TIMEOUT = 5.0


@pytest.fixture
async def connection(amqp_url: str, unique_name: str) -> AsyncIterator[AMQPConnection]:
    connection = AMQPConnection(amqp_url, connection_name="aio-celery test rmq4")
    await asyncio.wait_for(connection.connect(), TIMEOUT)
    try:
        await connection.queue_declare(unique_name, arguments={"x-queue-type": "quorum"})
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def _next(deliveries: asyncio.Queue[Delivery]) -> Delivery:
    return await asyncio.wait_for(deliveries.get(), TIMEOUT)


def _count(delivery: Delivery) -> int:
    assert delivery.properties is not None
    return int((delivery.properties.headers or {}).get("x-delivery-count", 0))


async def test_reject_and_nack_with_requeue_both_count_a_delivery(
        connection: AMQPConnection, unique_name: str) -> None:
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
    await connection.qos(10)
    await connection.consume(unique_name, deliveries.put_nowait)
    await connection.publish(b"again", b"\x00\x00", unique_name)
    first = await _next(deliveries)
    assert (_count(first), first.deliver.redelivered) == (0, False)
    connection.reject(first.deliver.delivery_tag, requeue=True)
    after_reject = await _next(deliveries)
    assert (_count(after_reject), after_reject.deliver.redelivered) == (1, True)
    connection.nack(after_reject.deliver.delivery_tag, requeue=True)
    after_nack = await _next(deliveries)
    assert (_count(after_nack), after_nack.deliver.redelivered) == (2, True)
    connection.ack(after_nack.deliver.delivery_tag)


async def test_a_global_qos_is_answered_and_a_quorum_consumer_accepted_after_it(
        connection: AMQPConnection, unique_name: str) -> None:
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
    await connection.qos(10, global_=True)
    await connection.consume(unique_name, deliveries.put_nowait)
    await connection.publish(b"taken", b"\x00\x00", unique_name)
    assert (await _next(deliveries)).body == b"taken"
    assert connection.is_open
