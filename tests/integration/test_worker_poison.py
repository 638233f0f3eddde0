"""The poison guard inside one worker process: what a redelivered message meets, with the
death table filled in by hand (the supervisor's part is in ``tests/process/test_poison.py``)
and the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from helpers import ready_count

from aio_celery import Celery
from aio_celery.exceptions import WorkerLostError
from aio_celery.poison import DeathTable, Guard, task_key
from aio_celery.worker import Worker, WorkerOptions


@pytest.fixture
def deaths() -> Iterator[DeathTable]:
    table = DeathTable(capacity=16)
    yield table
    table.close()


def timed_task(app: Celery, spans: dict[str, tuple[float, float]]) -> None:
    @app.task(name="timed", bind=True)
    async def timed(self: object, seconds: float) -> str:
        task_id = str(self.request.id)  # type: ignore[attr-defined]
        began = time.monotonic()
        await asyncio.sleep(seconds)
        spans[task_id] = (began, time.monotonic())
        return task_id


async def make_redelivered(amqp: AbstractConnection, queue: str, count: int) -> None:
    """Take ``count`` messages without acknowledging them and close the channel: the
    broker puts them back, marked redelivered."""
    channel = await amqp.channel()
    box = await channel.get_queue(queue, ensure=False)
    for _ in range(count):
        await box.get(no_ack=False)
    await channel.close()


async def run_burst(app: Celery, guard: Guard, concurrency: int = 5) -> int:
    worker = Worker(app, WorkerOptions(concurrency=concurrency, burst=True, banner=False),
                    guard=guard)
    return await asyncio.wait_for(worker.run(), 30)


async def test_a_task_that_died_before_runs_alone(app: Celery, amqp: AbstractConnection,
                                                  unique_name: str,
                                                  deaths: DeathTable) -> None:
    spans: dict[str, tuple[float, float]] = {}
    timed_task(app, spans)
    suspect = await app.send_task("timed", (0.3,))
    await make_redelivered(amqp, unique_name, 1)
    others = [await app.send_task("timed", (0.3,)) for _ in range(8)]
    deaths.record([task_key(suspect.id), task_key("a-neighbour")])  # died with another

    assert await run_burst(app, Guard(3, None, None, deaths)) == 0
    assert set(spans) == {suspect.id, *(r.id for r in others)}
    began, ended = spans[suspect.id]
    overlapping = [task_id for task_id, (b, e) in spans.items()
                   if task_id != suspect.id and b < ended and e > began]
    assert not overlapping, "the suspect did not run alone"
    # the others still ran side by side
    assert any(spans[a.id][0] < spans[b.id][1] and spans[b.id][0] < spans[a.id][1]
               for a in others for b in others if a is not b)


async def test_a_task_that_died_too_often_is_retired(
        app: Celery, amqp: AbstractConnection, unique_name: str, deaths: DeathTable,
        caplog: pytest.LogCaptureFixture) -> None:
    spans: dict[str, tuple[float, float]] = {}
    timed_task(app, spans)
    poison = await app.send_task("timed", (0.1,))
    await make_redelivered(amqp, unique_name, 1)
    innocent = await app.send_task("timed", (0.1,))
    for _ in range(3):
        deaths.record([task_key(poison.id)])  # three deaths alone

    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    assert await run_burst(app, Guard(3, None, None, deaths)) == 0
    assert set(spans) == {innocent.id}, "the retired task ran"
    with pytest.raises(WorkerLostError, match="died 3 times"):
        await poison.get(timeout=5)
    assert await ready_count(amqp, unique_name) == 0  # rejected, not requeued
    retired = [r.getMessage() for r in caplog.records if "retired" in r.getMessage()]
    assert len(retired) == 1
    assert f"Task timed[{poison.id}] retired" in retired[0]
    assert "dropped unless the queue has a dead-letter exchange" in retired[0]


async def test_a_quorum_style_delivery_count_isolates_a_task_never_seen_here(
        app: Celery, amqp: AbstractConnection, unique_name: str) -> None:
    """``x-delivery-count`` (set by quorum queues; published by hand here, on a classic
    queue) of at least the limit makes a redelivered task run alone."""
    spans: dict[str, tuple[float, float]] = {}
    timed_task(app, spans)
    suspect = await app.send_task("timed", (0.3,))
    others = [await app.send_task("timed", (0.3,)) for _ in range(4)]
    # Re-publish the suspect's message with the header, then make it redelivered.
    channel = await amqp.channel()
    box = await channel.get_queue(unique_name, ensure=False)
    message = await box.get(no_ack=False)
    assert message.headers["id"] == suspect.id
    await channel.default_exchange.publish(
        aio_pika.Message(message.body, headers={**message.headers, "x-delivery-count": 3},
                         content_type=message.content_type,
                         content_encoding=message.content_encoding),
        routing_key=unique_name)
    await message.ack()
    await channel.close()
    await make_redelivered(amqp, unique_name, 5)

    assert await run_burst(app, Guard(3)) == 0
    began, ended = spans[suspect.id]
    assert all(not (b < ended and e > began)
               for task_id, (b, e) in spans.items() if task_id != suspect.id)
    assert set(spans) == {suspect.id, *(r.id for r in others)}
