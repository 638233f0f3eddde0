"""Our worker on RabbitMQ 4.x with 4.3's deprecated-feature defaults (see ``conftest.py``):

* on a quorum queue, prefetch above concurrency, etas beyond the window and ready tasks
  behind them: every task runs, the ready ones at once (the etas beyond the window's room
  wait on the broker, in native delayed delivery), and no global QoS is needed;
* with task events (``-E``) and the remote-control mailbox: Celery's ``ping`` and
  ``inspect`` are answered and the events arrive. This node closes the connection on a
  queue neither durable nor exclusive, so every queue the worker declares passes;
* the real Celery 5.7 client's countdown reaches our worker through native delayed delivery.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import celery
import pytest
from aio_pika.abc import AbstractIncomingMessage
from helpers import close_celery_client, eventually, run_ready_tasks_behind_etas

from aio_celery import Celery
from aio_celery.quorum import QueuePlan

pytestmark = pytest.mark.interop

TIMEOUT = 15.0
QUORUM = {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"}


@pytest.fixture
async def quorum_app(app: Celery) -> Celery:
    app.conf.update(**QUORUM)
    app.broker.plan = QueuePlan.from_settings(app.conf.settings)
    return app


async def test_ready_tasks_behind_etas_beyond_the_window_run_at_once(
        quorum_app: Celery, start_worker: Callable[..., Awaitable[Any]],
        caplog: pytest.LogCaptureFixture) -> None:
    """concurrency 2 x multiplier 2: a window of 4 with room for 2 etas; six etas first
    (straight into the queue, ahead of the rest), then four ready tasks. The four etas
    beyond the window's room are parked, at least once each."""
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    await run_ready_tasks_behind_etas(quorum_app, start_worker, TIMEOUT)
    parks = [r.getMessage() for r in caplog.records if ": parked in" in r.getMessage()]
    assert len(parks) >= 4, parks
    assert all("native delayed delivery" in p for p in parks), parks
    assert "NOT_IMPLEMENTED" not in caplog.text and "541" not in caplog.text


# --- events and the remote-control mailbox ---------------------------------------------------


class EventTap:
    """The events of one node, from an exclusive queue bound to ``celeryev``."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.types: list[str] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if (message.headers or {}).get("hostname") != self.hostname:
            return
        body = json.loads(message.body)
        self.types.extend(e["type"] for e in (body if isinstance(body, list) else [body]))


@pytest.fixture
async def tap(amqp_url: str, unique_name: str) -> AsyncIterator[EventTap]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("celeryev", aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(f"{unique_name}.celeryev", exclusive=True)
        await queue.bind(exchange, "#")
        tap = EventTap(f"{unique_name}@rmq4")
        await queue.consume(tap.on_message, no_ack=True)
        yield tap
    finally:
        await connection.close()


@pytest.fixture
def celery_client(amqp_url: str, redis_url: str, unique_name: str) -> Any:
    client = celery.Celery("rmq4-client", broker=amqp_url, backend=redis_url,
                           set_as_current=False)
    client.conf.update(task_default_queue=unique_name, task_serializer="json",
                       result_serializer="json", accept_content=["json"], **QUORUM)
    try:
        yield client
    finally:
        close_celery_client(client)


async def test_events_ping_and_inspect_with_every_queue_we_declare_allowed(
        quorum_app: Celery, start_worker: Callable[..., Awaitable[Any]], tap: EventTap,
        celery_client: celery.Celery) -> None:
    @quorum_app.task(name="rmq4.add")
    async def add(x: int, y: int) -> int:
        return x + y

    handle = await start_worker(hostname=tap.hostname, task_events=True,
                                heartbeat_interval=0.5)
    try:
        assert await (await add.delay(2, 3)).get(timeout=TIMEOUT) == 5
        await eventually(lambda: "task-succeeded" in tap.types
                         and "worker-heartbeat" in tap.types, TIMEOUT,
                         what="task-succeeded and a heartbeat")
        assert {"worker-online", "task-received", "task-started"} <= set(tap.types), tap.types
        pong = await asyncio.to_thread(celery_client.control.ping,
                                       destination=[tap.hostname], timeout=5.0)
        assert pong == [{tap.hostname: {"ok": "pong"}}]
        inspect = celery_client.control.inspect(destination=[tap.hostname], timeout=5.0)
        registered = await asyncio.to_thread(inspect.registered)
        assert "rmq4.add" in registered[tap.hostname]
        assert handle.worker.session is not None  # never lost to a 541
    finally:
        assert await handle.stop() == 0


# --- the real Celery client's countdown ------------------------------------------------------


async def test_celerys_countdown_reaches_our_worker_through_native_delayed_delivery(
        quorum_app: Celery, start_worker: Callable[..., Awaitable[Any]],
        celery_client: celery.Celery) -> None:
    @quorum_app.task(name="rmq4.when")
    async def when() -> float:
        return time.time()

    # Our worker declares the queue and the delayed levels, as a Celery worker does.
    handle = await start_worker(concurrency=2)
    try:
        sent = time.time()
        later = await asyncio.to_thread(celery_client.send_task, "rmq4.when", countdown=2)
        now = await asyncio.to_thread(celery_client.send_task, "rmq4.when")
        assert await quorum_app.AsyncResult(now.id).get(timeout=TIMEOUT) < sent + 1.5
        ran = await quorum_app.AsyncResult(later.id).get(timeout=TIMEOUT)
        assert ran >= sent + 1.9
    finally:
        assert await handle.stop() == 0
