"""The worker's publisher: our own AMQP client on a second connection (#8 §2).

* a publish the broker refuses for good (a queue that exists with other arguments) is
  PublishRefusedError; the refusal closes the publishing connection (one channel) and the
  next publish opens a new one;
* a cut publishing connection (:class:`~tcp_proxy.TcpProxy`) is opened again on next use,
  on the next URL of a failover list;
* while the broker blocks the worker's publishing connection (``connection.blocked``, sent
  by a fake server: a real resource alarm would block every publisher of the shared test
  broker), a task's follow-up waits, and the other tasks still run and are acknowledged on
  the consumer connection to the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from helpers import AMQP_URL, FakeBroker, eventually, rabbitmqctl, ready_count, resolves_to
from pamqp import commands
from tcp_proxy import TcpProxy

from aio_celery import Celery, protocol, states
from aio_celery.exceptions import BrokerConnectionError, PublishRefusedError
from aio_celery.failover import Failover
from aio_celery.protocol import Envelope
from aio_celery.publisher import WorkerPublisher
from aio_celery.quorum import QueuePlan
from aio_celery.worker import Worker

TIMEOUT = 15.0


def envelope_for(app: Celery, queue: str) -> Envelope:
    message, _ = app.build_message("publisher.test", [1], {}, {"queue": queue})
    return protocol.encode(message, app.now())


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[WorkerPublisher]:
    publisher = WorkerPublisher(Failover(amqp_url), plan=QueuePlan(),
                                publish_timeout=TIMEOUT)
    try:
        yield publisher
    finally:
        await publisher.close()


async def test_a_refused_publish_is_publish_refused_and_the_next_one_reconnects(
        app: Celery, publisher: WorkerPublisher, channel: AbstractChannel,
        amqp: AbstractConnection, unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    other = f"{unique_name}-other"
    await channel.declare_queue(other, durable=True, arguments={"x-max-priority": 7})
    await publisher.publish(envelope_for(app, unique_name), unique_name)
    first = publisher.connection
    assert first is not None

    with pytest.raises(PublishRefusedError, match="PRECONDITION_FAILED"):
        await publisher.publish(envelope_for(app, other), other)
    assert publisher.connection is None  # one channel: the refusal closed the connection

    await publisher.publish(envelope_for(app, unique_name), unique_name)
    assert publisher.connection is not None and publisher.connection is not first
    assert await ready_count(amqp, unique_name) == 2
    assert await ready_count(amqp, other) == 0
    assert "The worker's publishing connection" in caplog.text


async def test_a_cut_publishing_connection_is_opened_again_on_next_use(
        app: Celery, proxy: TcpProxy, amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    parts = urlsplit(AMQP_URL)
    url = proxy.url(parts.username or "guest", parts.password or "guest",
                    parts.path[1:] or "/")
    publisher = WorkerPublisher(Failover(url), plan=QueuePlan(), connection_timeout=2.0,
                                publish_timeout=TIMEOUT)
    try:
        assert publisher.connection is None  # connects on first use
        await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert proxy.open_connections == 1
        assert proxy.cut() == 1
        await eventually(lambda: publisher.connection is None, TIMEOUT,
                         what="the cut noticed")

        await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert proxy.open_connections == 1
        assert await ready_count(amqp, unique_name) == 2
        assert "The worker's publishing connection to" in caplog.text

        # While nothing answers, a publish fails in time with BrokerConnectionError (the
        # worker's follow-up logic waits and tries again on that), and then works again.
        proxy.cut()
        await proxy.pause()
        with pytest.raises(BrokerConnectionError) as failed:
            await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert not isinstance(failed.value, PublishRefusedError)
        await proxy.resume()
        await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert await ready_count(amqp, unique_name) == 3
    finally:
        await publisher.close()


async def test_the_publishing_connection_fails_over_to_the_next_url(
        app: Celery, proxy: TcpProxy, amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    parts = urlsplit(AMQP_URL)
    second = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await second.start()
    urls = [tcp.url(parts.username or "guest", parts.password or "guest",
                    parts.path[1:] or "/") for tcp in (proxy, second)]
    publisher = WorkerPublisher(Failover(";".join(urls)), plan=QueuePlan(),
                                connection_timeout=2.0, publish_timeout=TIMEOUT)
    try:
        await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert (proxy.accepted, second.accepted) == (1, 0)
        await proxy.pause()  # the node is gone: its connection drops, new ones are refused
        assert proxy.cut() == 1
        await eventually(lambda: publisher.connection is None, TIMEOUT, what="the cut noticed")
        await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert second.accepted == 1
        assert publisher.failover.in_use == urls[1]
        assert await ready_count(amqp, unique_name) == 2
        assert "trying the next broker URL first" in caplog.text
        assert "guest:guest@" not in caplog.text
    finally:
        await publisher.close()
        await second.close()


# --- a blocked publishing connection -----------------------------------------------------------

class BlockingBroker(FakeBroker):
    """Blocks publishing (a resource alarm) as soon as the client's channel is open."""

    def _answer(self, method: Any) -> None:
        super()._answer(method)
        if isinstance(method, commands.Confirm.Select):
            self.send(commands.Connection.Blocked(reason="low on memory"))


def unacknowledged(queue: str) -> int | None:
    """The queue's deliveries not acknowledged yet, as RabbitMQ counts them."""
    out = rabbitmqctl("list_queues", "name", "messages_unacknowledged", timeout=30)
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == queue:
            return int(fields[1])
    return None


async def unacknowledged_is(queue: str, count: int) -> bool:
    return await asyncio.to_thread(unacknowledged, queue) == count


async def test_acks_flow_while_the_workers_publishing_connection_is_blocked(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = BlockingBroker()
    await fake.start()
    new_publisher = Worker._new_publisher

    def blocked_publisher(self: Worker) -> WorkerPublisher:
        publisher = new_publisher(self)
        publisher.failover = Failover(f"amqp://guest:guest@127.0.0.1:{fake.port}/")
        return publisher

    monkeypatch.setattr(Worker, "_new_publisher", blocked_publisher)
    app.conf.update(broker_publish_timeout=60.0)

    @app.task
    async def plain(value: int) -> int:
        return value

    @app.task
    async def sender() -> str:
        await plain.delay(0)  # goes to the fake broker, which blocks it
        return "sent"

    handle = await start_worker(concurrency=4)
    try:
        waiting = await sender.delay()
        await eventually(lambda: fake.methods(commands.Queue.Bind), TIMEOUT,
                         what="the follow-up's queue declared on the publishing connection")
        await eventually(lambda: "blocked publishing on this connection (low on memory"
                         in caplog.text, TIMEOUT, what="the block")

        results = [await plain.delay(n) for n in range(1, 6)]
        for n, result in enumerate(results, 1):
            assert await result.get(timeout=TIMEOUT) == n
        # Acked on the consumer connection: only the sender's delivery is still out.
        await eventually(lambda: unacknowledged_is(unique_name, 1), TIMEOUT,
                         what="the five plain tasks acknowledged")
        assert await ready_count(amqp, unique_name) == 0
        assert not fake.methods(commands.Basic.Publish)
        assert (await waiting.refresh()).state != states.SUCCESS

        fake.send(commands.Connection.Unblocked())
        await eventually(lambda: fake.methods(commands.Basic.Publish), TIMEOUT,
                         what="the follow-up published once unblocked")
        fake.send(commands.Basic.Ack(delivery_tag=1), 1)
        assert await waiting.get(timeout=TIMEOUT) == "sent"
        await eventually(lambda: unacknowledged_is(unique_name, 0), TIMEOUT,
                         what="the sender acknowledged")
    finally:
        assert await handle.stop() == 0
        await fake.close()
    assert await resolves_to(ready_count(amqp, unique_name), 0)
    assert not [r for r in caplog.records if "Lost the broker connection" in r.getMessage()]
