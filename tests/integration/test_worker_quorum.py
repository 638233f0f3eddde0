"""Quorum queues and no global QoS, against the real RabbitMQ: the queue declared as Celery
5.5+ declares it, the static per-consumer prefetch window that etas never fill up (ready
tasks behind more etas than it has room for run at once), native delayed delivery, and
``basic.nack`` returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from helpers import (
    eventually,
    rabbitmqctl,
    ready_count,
    resolves_to,
    run_ready_tasks_behind_etas,
)

from aio_celery import Celery
from aio_celery.amqp.connection import AMQPConnection, ConnectionClosed, Delivery
from aio_celery.broker import ConsumerChannel
from aio_celery.quorum import QueuePlan

TIMEOUT = 5.0


def configure(app: Celery, queue_type: str, exchange_type: str) -> None:
    app.conf.update(task_default_queue_type=queue_type,
                    task_default_exchange_type=exchange_type)
    app.broker.plan = QueuePlan.from_settings(app.conf.settings)


@pytest.fixture
async def cleanup(amqp: AbstractConnection, unique_name: str) -> AsyncIterator[None]:
    """Delete the test's exchange (a topic one would not match conftest's direct
    clean-up) and the holding queues its parks may have created."""
    yield
    channel = await amqp.channel()
    for name in (unique_name, *(f"{unique_name}.aio-celery-hold-{2**k * 1000}ms"
                                for k in range(4))):
        with contextlib.suppress(Exception):
            await channel.queue_delete(name)
    with contextlib.suppress(Exception):
        await channel.exchange_delete(unique_name)
    await channel.close()


@pytest.mark.parametrize(("queue_type", "exchange_type"), [
    ("classic", "direct"), ("quorum", "direct"), ("quorum", "topic")],
    ids=["classic-holding-queues", "quorum-holding-queues", "quorum-native-delayed"])
async def test_ready_tasks_behind_more_etas_than_the_window_holds_run_at_once(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str, cleanup: None,
        queue_type: str, exchange_type: str, caplog: pytest.LogCaptureFixture) -> None:
    """concurrency 2 x multiplier 2: a static window of 4, room for 2 etas in memory. Six
    etas arrive first, then four ready tasks: the ready ones run at once (the extra etas
    are parked, not held), every eta runs, none early. On a quorum queue this also proves
    that no global QoS is used: RabbitMQ 3.x refuses a quorum consumer on such a channel.
    The etas are sent straight into the queue, ahead of the ready ones (see
    :func:`helpers.send_eta_into_the_queue`: through native delayed delivery they would
    arrive from the delayed levels shortly before due, after the ready ones, and one that
    came out late would run without being parked)."""
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    configure(app, queue_type, exchange_type)
    ran = await run_ready_tasks_behind_etas(app, start_worker, TIMEOUT)
    assert all(ran[f"eta-{i}"] <= ran["eta"] + 2.5 for i in range(6)), \
        ("an eta task ran much too late", ran)
    parks = [r.getMessage() for r in caplog.records if ": parked in" in r.getMessage()]
    assert len(parks) >= 4, parks  # the four beyond the window's room, at least once each
    native = exchange_type == "topic"
    assert all(("native delayed delivery" in p) == native for p in parks), parks
    direct_warning = [r for r in caplog.records if "has a direct exchange" in r.getMessage()]
    assert len(direct_warning) == (queue_type == "quorum" and not native), direct_warning
    if not native:  # a holding queue of the target's type; a quorum one dead-letters safely
        holding = holding_queues(unique_name)
        assert holding, "no holding queue was declared"
        for kind, arguments in holding.values():
            assert kind == queue_type, holding
            assert ("at-least-once" in arguments) == (queue_type == "quorum"), holding


def holding_queues(target: str) -> dict[str, tuple[str, str]]:
    """The holding queues of ``target``: their type and arguments, as rabbitmqctl shows them.
    (The type, not the arguments: RabbitMQ 4.x lists ``x-queue-type`` for a classic queue
    declared without it, 3.x does not.)"""
    listing = rabbitmqctl("list_queues", "name", "type", "arguments")
    prefix = f"{target}.aio-celery-hold-"
    found = {}
    for line in listing.splitlines():
        name, _, rest = line.partition("\t")
        kind, _, arguments = rest.partition("\t")
        if name.startswith(prefix):
            found[name] = (kind, arguments)
    return found


async def test_the_queue_is_declared_as_celery_declares_it(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        cleanup: None) -> None:
    """Our worker declares first; a passive and an exact redeclaration like Celery's
    (x-queue-type quorum, durable, a topic exchange of the queue's name) are accepted."""
    configure(app, "quorum", "topic")
    app.conf.update(task_queue_max_priority=10)  # not a quorum argument: left out
    app.broker.plan = QueuePlan.from_settings(app.conf.settings)
    handle = await start_worker(concurrency=1)
    try:
        channel = await amqp.channel()
        await channel.declare_queue(unique_name, durable=True,
                                    arguments={"x-queue-type": "quorum"})
        await channel.declare_exchange(unique_name, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.close()
    finally:
        assert await handle.stop() == 0


# --- basic.nack ---------------------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    async def until(self, count: int) -> list[Delivery]:
        await eventually(lambda: len(self.deliveries) >= count, timeout=TIMEOUT,
                         what=f"{count} deliveries")
        return self.deliveries


async def _consumer(amqp_url: str, queue: str, plan: QueuePlan,
                    collector: Collector) -> ConsumerChannel:
    channel = ConsumerChannel(amqp_url, prefetch_count=10, plan=plan)
    await channel.open()
    await channel.declare(queue)
    await channel.consume(queue, collector)
    return channel


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_nack_gives_the_delivery_back_and_the_channel_stays_open(
        amqp_url: str, channel: AbstractChannel, amqp: AbstractConnection, unique_name: str,
        cleanup: None, queue_type: str) -> None:
    plan = QueuePlan(default_queue=unique_name, default_queue_type=queue_type)
    collector = Collector()
    consumer = await _consumer(amqp_url, unique_name, plan, collector)
    try:
        await channel.default_exchange.publish(aio_pika.Message(b"back"),
                                               routing_key=unique_name)
        first = (await collector.until(1))[0]
        consumer.nack(first.deliver.delivery_tag)
        again = (await collector.until(2))[1]
        assert (again.body, again.deliver.redelivered) == (b"back", True)
        # (x-delivery-count: RabbitMQ 3.x and 4.0.5 count this return, see tests/rabbitmq4;
        # 4.3 is said not to count a nack's.)
        consumer.ack(again.deliver.delivery_tag)
        await consumer.barrier()
        assert consumer.is_open
        assert await ready_count(amqp, unique_name) == 0
    finally:
        await consumer.close()


def broker_major_version(amqp: AbstractConnection) -> int:
    """RabbitMQ's major version, from the server properties of its connection.start."""
    version = amqp.transport.connection.server_properties["version"]
    return int(str(version).split(".")[0])


async def test_global_qos_on_a_quorum_queue_is_refused_by_3x_and_ignored_by_4x(
        amqp_url: str, amqp: AbstractConnection, unique_name: str, cleanup: None) -> None:
    """Why the worker's QoS is per consumer. RabbitMQ 3.x refuses a consumer on a quorum
    queue on a channel with the old global QoS (the connection is closed). RabbitMQ 4.x
    with 4.3's default (``global_qos`` denied; seen on 4.0.5, tests/rabbitmq4) answers the
    basic.qos, logs the deprecated feature, and accepts the consumer: the global flag is
    not honoured, so a worker relying on it would not get the window it asked for."""
    plan = QueuePlan(default_queue=unique_name, default_queue_type="quorum")
    connection = AMQPConnection(amqp_url, connection_name="aio-celery test global qos")
    await asyncio.wait_for(connection.connect(), TIMEOUT)

    async def consume_under_global_qos() -> None:
        await connection.qos(10, global_=True)
        declaration = plan.queue(unique_name)
        await connection.queue_declare(unique_name, arguments=declaration.arguments)
        await asyncio.wait_for(connection.consume(unique_name, Collector()), TIMEOUT)

    try:
        if broker_major_version(amqp) < 4:
            with pytest.raises(ConnectionClosed):
                await consume_under_global_qos()
        else:
            await consume_under_global_qos()
            assert connection.is_open
    finally:
        await connection.close()
    collector = Collector()
    consumer = await _consumer(amqp_url, unique_name, plan, collector)
    try:
        assert consumer.consumer_count == 1
    finally:
        await consumer.close()


async def test_native_delayed_delivery_reaches_a_bound_queue(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        cleanup: None) -> None:
    """Our client in quorum mode sends a countdown through ``celery_delayed_27``: it waits
    on the broker (not in the queue) and reaches the worker when due."""
    configure(app, "quorum", "topic")

    @app.task
    async def job() -> float:
        return time.time()

    sent = time.time()
    result = await job.apply_async(countdown=2)
    await asyncio.sleep(0)  # (the publish is confirmed: routed into the delayed levels)
    assert await ready_count(amqp, unique_name) == 0
    handle = await start_worker(concurrency=1)
    try:
        ran = await result.get(timeout=10)
        assert ran >= sent + 1.9
    finally:
        assert await handle.stop() == 0
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 0),
                     what="an empty queue")
