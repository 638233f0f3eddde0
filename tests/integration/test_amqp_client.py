"""The AMQP client as production needs it, against the real RabbitMQ (#8 §2).

* failover: a ``;``-separated ``broker_url`` of two :class:`~tcp_proxy.TcpProxy` endpoints in
  front of the one RabbitMQ; the first is cut (and refuses new connections) or hangs, and the
  worker's consumer connection and the publisher carry on through the second; logs and the
  banner name the URL in use, password masked;
* heartbeat, frame_max and channel_max as agreed with RabbitMQ (which confirms the heartbeat
  in ``rabbitmqctl list_connections``), and a body of 1 MiB both ways in 131072-byte frames;
* a broker that stops answering (the proxy's stall mode) fails a request within its timeout
  and never hangs start-up or shutdown;
* a queue deleted under a running worker: RabbitMQ cancels the consumer, the worker logs it,
  declares the queue again and consumes it.

``connection.blocked`` and channel errors, on a fake server:
``tests/unit/test_amqp_client_units.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractChannel
from helpers import AMQP_URL, declare_test_queue, eventually, rabbitmqctl
from tcp_proxy import TcpProxy

from aio_celery import Celery, exitcodes
from aio_celery.amqp import wire as amqpwire
from aio_celery.amqp.connection import AMQPConnection, ConnectionClosed, Delivery
from aio_celery.broker import Broker, ConsumerChannel
from aio_celery.exceptions import BrokerConnectionError
from aio_celery.protocol import Envelope

TIMEOUT = 15.0
StartWorker = Callable[..., Awaitable[Any]]


def proxy_url(proxy: TcpProxy) -> str:
    parts = urlsplit(AMQP_URL)
    return proxy.url(parts.username or "guest", parts.password or "guest",
                     parts.path[1:] or "/")


@pytest.fixture
async def proxies() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    parts = urlsplit(AMQP_URL)
    pair = (TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672),
            TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672))
    for proxy in pair:
        await proxy.start()
    try:
        yield pair
    finally:
        for proxy in pair:
            proxy.flow()
            await proxy.close()


def failover_app(name: str, queue: str, redis_url: str, *proxies: TcpProxy) -> Celery:
    """An app on ``queue`` whose broker_url lists the proxies (the real port if none)."""
    application = Celery(name, set_as_current=False)
    application.conf.update(
        broker_url=";".join(proxy_url(proxy) for proxy in proxies) or AMQP_URL,
        result_backend=redis_url, task_default_queue=queue, broker_connection_timeout=1.0)

    @application.task(name="failover.add")
    async def add(x: int, y: int) -> int:
        return x + y

    return application


def masked(proxy: TcpProxy) -> str:
    return f"amqp://guest:***@127.0.0.1:{proxy.port}//"


# --- failover ---------------------------------------------------------------------------------


async def test_worker_fails_over_to_the_next_url(
        app: Celery, unique_name: str, redis_url: str, proxies: tuple[TcpProxy, TcpProxy],
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    first, second = proxies
    worker_app = failover_app(unique_name + "-w", unique_name, redis_url, first, second)
    # The worker's other connections (remote control, events) go through the proxies
    # too: the consumer's is followed by the worker's own account of it.
    handle = await start_worker(worker_app, concurrency=2, banner=True)
    # three connections: the consumer's, and its companions: the remote control mailbox's
    # and the publisher's (opened at start for worker events)
    await eventually(lambda: (first.accepted, second.accepted) == (3, 0), TIMEOUT)
    # (start_worker returns as consumers attach; the banner comes once they are)
    await eventually(lambda: f"broker:      {masked(first)} (1 of 2 URLs, failover "
                             "round-robin)" in caplog.text, TIMEOUT)
    assert await (await app.send_task("failover.add", (1, 2))).get(timeout=TIMEOUT) == 3

    await first.pause()  # the node is gone: its connections drop, new ones are refused
    assert first.cut() == 3
    await eventually(lambda: second.accepted == 3 and handle.worker.consuming.is_set(),
                     TIMEOUT)
    assert f"Lost the broker connection to {masked(first)}" in caplog.text
    assert f"Reconnected to {masked(second)}" in caplog.text
    assert await (await app.send_task("failover.add", (2, 3))).get(timeout=TIMEOUT) == 5

    # And back round: the second goes, the first is there again.
    await first.resume()
    await second.pause()
    assert second.cut() == 3
    await eventually(lambda: first.accepted == 6 and handle.worker.consuming.is_set(),
                     TIMEOUT)
    assert await (await app.send_task("failover.add", (3, 4))).get(timeout=TIMEOUT) == 7
    assert "guest:guest@" not in caplog.text
    assert await handle.stop() == exitcodes.OK


async def test_worker_starts_past_a_hung_first_url(
        app: Celery, unique_name: str, redis_url: str, proxies: tuple[TcpProxy, TcpProxy],
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    """The first node accepts TCP but never answers: the handshake times out within
    broker_connection_timeout and the worker starts on the second."""
    caplog.set_level(logging.INFO)
    first, second = proxies
    first.stall()
    worker_app = failover_app(unique_name + "-w", unique_name, redis_url, first, second)
    started = time.monotonic()
    handle = await start_worker(worker_app, concurrency=2)
    assert time.monotonic() - started < 5
    # the mailbox's and the publisher's connections try the URL the consumer uses first:
    # no second wait
    await eventually(lambda: (first.accepted, second.accepted) == (1, 3), TIMEOUT)
    assert f"cannot connect to broker {masked(first)}: timed out; trying the next" \
        in caplog.text
    assert handle.worker.failover.in_use == proxy_url(second)
    assert await (await app.send_task("failover.add", (5, 6))).get(timeout=TIMEOUT) == 11
    assert await handle.stop() == exitcodes.OK


async def test_publisher_fails_over_to_the_next_url(
        app: Celery, unique_name: str, redis_url: str, proxies: tuple[TcpProxy, TcpProxy],
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    first, second = proxies
    # the worker consumes on the real port
    await start_worker(failover_app(unique_name + "-w", unique_name, redis_url),
                       concurrency=2)
    client = failover_app(unique_name + "-c", unique_name, redis_url, first, second)
    async with client.setup():
        assert await (await client.send_task("failover.add", (1, 1))).get(timeout=TIMEOUT) == 2
        assert (first.accepted, second.accepted) == (1, 0)
        assert client.broker.failover.in_use == proxy_url(first)

        await first.pause()
        assert first.cut() == 1
        await eventually(lambda: "Lost the publisher connection" in caplog.text, TIMEOUT)
        assert f"Lost the publisher connection to {masked(first)}" in caplog.text
        result = await client.send_task("failover.add", (2, 2))  # reconnects, to the second
        assert await result.get(timeout=TIMEOUT) == 4
        assert second.accepted == 1
        assert client.broker.failover.in_use == proxy_url(second)


# --- negotiated limits ------------------------------------------------------------------------


def rabbitmq_heartbeat(connection_name: str) -> int:
    """The heartbeat RabbitMQ agreed for the connection of that name."""
    listed = rabbitmqctl("list_connections", "client_properties", "timeout")
    lines = [line for line in listed.splitlines() if connection_name in line]
    assert len(lines) == 1, listed
    return int(lines[0].rsplit("\t", 1)[1])


@pytest.mark.parametrize(("ours", "agreed"), [(5, 5), (0, 60), (600, 60)])
async def test_heartbeat_is_the_lower_non_zero_of_ours_and_rabbitmqs(
        amqp_url: str, ours: int, agreed: int) -> None:
    """RabbitMQ proposes 60 s: asking less gets less, asking 0 or more gets its 60 s."""
    name = f"aio-celery heartbeat test {uuid.uuid4().hex}"
    connection = AMQPConnection(amqp_url, heartbeat=ours, connection_name=name)
    await asyncio.wait_for(connection.connect(), TIMEOUT)
    try:
        assert connection.heartbeat == agreed
        assert connection.frame_max == 131072  # RabbitMQ's and ours
        assert connection.channel_max == 2047
        assert rabbitmq_heartbeat(name) == agreed
    finally:
        await connection.close()


async def test_a_body_of_one_mebibyte_goes_both_ways_in_frames(
        amqp_url: str, channel: AbstractChannel, unique_name: str) -> None:
    """Published by us (split into 131072-byte body frames), consumed by us (reassembled)."""
    body = bytes(range(256)) * 4096  # 1 MiB, no two neighbouring frames alike
    await declare_test_queue(channel, unique_name)
    connection = AMQPConnection(amqp_url)
    await asyncio.wait_for(connection.connect(), TIMEOUT)
    try:
        await asyncio.wait_for(connection.publish(body, b"\x00\x00", unique_name), TIMEOUT)
        received: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        await connection.consume(unique_name, received.set_result)
        delivery = await asyncio.wait_for(received, TIMEOUT)
        assert delivery.body == body
        connection.ack(delivery.deliver.delivery_tag)
    finally:
        await connection.close()
    frames = amqpwire.content_frames(1, body, b"\x00\x00", connection.frame_max)
    assert frames.count(b"\xce\x03\x00\x01") == 9  # a frame end, then a body frame: 9 of them


# --- a broker that stops answering ------------------------------------------------------------


async def test_a_stalled_broker_fails_requests_in_time(
        proxies: tuple[TcpProxy, TcpProxy], unique_name: str) -> None:
    proxy = proxies[0]
    connection = AMQPConnection(proxy_url(proxy), rpc_timeout=0.5)
    await asyncio.wait_for(connection.connect(), TIMEOUT)
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(ConnectionClosed, match=r"did not answer Queue\.Declare within 0\.5s"):
        await connection.queue_declare(unique_name)
    assert 0.5 <= time.monotonic() - started < 2
    assert not connection.is_open
    assert "did not answer" in await asyncio.wait_for(connection.closed(), 1)
    await asyncio.wait_for(connection.close(), 1)  # nothing left to wait for


async def test_shutdown_with_a_stalled_broker_is_bounded(
        proxies: tuple[TcpProxy, TcpProxy], unique_name: str, channel: AbstractChannel) -> None:
    """Cancelling consumers and closing, as a warm shutdown does, against a broker that has
    gone silent: each waits its bound, then gives up."""
    proxy = proxies[0]
    await declare_test_queue(channel, unique_name)
    consumer = ConsumerChannel(proxy_url(proxy), prefetch_count=1, rpc_timeout=0.5)
    await asyncio.wait_for(consumer.open(), TIMEOUT)
    await consumer.consume(unique_name, lambda delivery: None)
    proxy.stall()
    started = time.monotonic()
    await consumer.cancel_consumers()
    assert time.monotonic() - started < 2
    assert not consumer.is_open
    await asyncio.wait_for(consumer.close(), 1)


async def test_the_publisher_against_a_stalled_broker_is_bounded(
        proxies: tuple[TcpProxy, TcpProxy], unique_name: str) -> None:
    proxy = proxies[0]
    publisher = Broker(proxy_url(proxy), connection_timeout=0.5, publish_timeout=0.5)
    publisher.rpc_timeout = 0.5
    envelope = Envelope(b"[[], {}, {}]", {"task": "t", "id": "i"}, "i")
    await asyncio.wait_for(publisher.connect(), TIMEOUT)
    await publisher.declare_queue(unique_name)
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match=r"no confirm within 0\.5s"):
        await publisher.publish(envelope, unique_name)
    with pytest.raises(BrokerConnectionError, match="did not answer the declaration"):
        await publisher.publish(envelope, unique_name + "-new")
    await publisher.close()
    assert time.monotonic() - started < 3


# --- the broker cancels the consumer ----------------------------------------------------------


async def test_worker_consumes_again_after_its_queue_is_deleted(
        app: Celery, channel: AbstractChannel, unique_name: str, start_worker: StartWorker,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    @app.task(name="cancelled.echo")
    async def echo(value: str) -> str:
        return value

    handle = await start_worker(app, concurrency=2)
    assert await (await app.send_task("cancelled.echo", ("before",))).get(timeout=TIMEOUT) \
        == "before"
    await channel.queue_delete(unique_name)
    await eventually(lambda: "Reconnected to" in caplog.text
                     and handle.worker.consuming.is_set(), TIMEOUT)
    assert f"The broker cancelled the consumer of queue {unique_name!r}" in caplog.text
    assert "Lost the broker connection" in caplog.text
    # the worker declared the queue again: the publisher's next message has a consumer
    queue = await channel.declare_queue(unique_name, passive=True)
    assert queue.declaration_result.consumer_count == 1
    assert await (await app.send_task("cancelled.echo", ("after",))).get(timeout=TIMEOUT) \
        == "after"
    assert await handle.stop() == exitcodes.OK
