"""countdown/eta (in memory and parked on the broker), expires, soft and hard time limits."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractConnection
from helpers import eventually, publish_raw, ready_count, resolves_to

from aio_celery import Celery, protocol, states
from aio_celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded
from aio_celery.worker import WorkerOptions
from aio_celery.worker.delivery import wait_queue_name

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def holding_queue(amqp: AbstractConnection,
                        unique_name: str) -> AsyncIterator[Callable[[float], str]]:
    """The eta holding queue of the test's queue for a horizon; not in conftest's clean-up
    list, so those named are deleted here."""
    names: list[str] = []

    def name_for(horizon: float) -> str:
        names.append(wait_queue_name(unique_name, horizon))
        return names[-1]

    try:
        yield name_for
    finally:
        channel = await amqp.channel()
        try:
            for name in names:
                await channel.queue_delete(name)
        finally:
            await channel.close()


# --- countdown / eta ------------------------------------------------------------------------


async def test_waiting_eta_task_holds_no_concurrency_slot(app: Celery, start_worker) -> None:
    """concurrency=1 and a prefetch of 2: the eta message arrives first and waits in memory
    (the window has room for one eta); the five ready ones behind it still run and finish
    first."""
    done: list[tuple[str, float]] = []

    @app.task
    async def job(label: str) -> str:
        await asyncio.sleep(0.02)
        done.append((label, time.monotonic()))
        return label

    sent = time.monotonic()
    r_eta = await job.apply_async(("eta",), countdown=1.5)
    ready = [await job.delay(f"ready-{i}") for i in range(5)]
    handle = await start_worker(concurrency=1, prefetch_multiplier=2, burst=True)
    assert await handle.wait(timeout=10) == 0
    assert [label for label, _ in done] == [f"ready-{i}" for i in range(5)] + ["eta"]
    assert all(at - sent < 1.0 for _, at in done[:5]), "ready tasks waited behind the eta"
    assert done[-1][1] - sent >= 1.4, "the eta task ran before its eta"
    assert await r_eta.get(timeout=5) == "eta"
    assert [await r.get(timeout=5) for r in ready] == [f"ready-{i}" for i in range(5)]


async def test_eta_in_the_past_runs_at_once(app: Celery, start_worker) -> None:
    @app.task
    async def job() -> str:
        return "ran"

    r = await job.apply_async(eta=datetime.now(UTC) - timedelta(hours=1))
    handle = await start_worker(concurrency=1)
    try:
        started = time.monotonic()
        assert await r.get(timeout=5) == "ran"
        assert time.monotonic() - started < 1.0
    finally:
        assert await handle.stop() == 0


async def test_eta_beyond_horizon_is_parked_and_runs_after_its_eta(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        holding_queue: Callable[[float], str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    parking = holding_queue(1.0)
    ran_at: list[datetime] = []

    @app.task
    async def later() -> str:
        ran_at.append(datetime.now(UTC))
        return "on time"

    r = await later.apply_async(countdown=2.5)
    eta = datetime.now(UTC) + timedelta(seconds=2.5)
    handle = await start_worker(concurrency=1, eta_horizon=1.0)
    try:
        await eventually(lambda: resolves_to(ready_count(amqp, parking), 1),
                         what="the message parked in the holding queue")
        assert ran_at == []
        assert await r.get(timeout=5) == "on time"
        assert ran_at[0] >= eta - timedelta(seconds=0.1), "ran before its eta"
        assert ran_at[0] <= eta + timedelta(seconds=1.5)
        parked = [rec for rec in caplog.records if "parked in" in rec.getMessage()]
        assert len(parked) >= 2, "expected to be parked, handed back, and parked again"
        assert all(parking in rec.getMessage() for rec in parked)
        assert await ready_count(amqp, parking) == 0
        assert await ready_count(amqp, unique_name) == 0
    finally:
        assert await handle.stop() == 0
    assert len(ran_at) == 1


async def test_countdown_of_hours_is_parked_while_other_work_flows(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        holding_queue: Callable[[float], str]) -> None:
    parking = holding_queue(WorkerOptions().eta_horizon)
    ran: list[str] = []

    @app.task
    async def job(label: str) -> str:
        ran.append(label)
        return label

    r_far = await job.apply_async(("far",), countdown=3 * 3600)
    others = [await job.delay(f"now-{i}") for i in range(3)]
    # Burst mode exits once nothing runs or waits and the queue is empty: a parked message
    # is neither, and its delivery must have been acked (a closed channel would requeue it).
    handle = await start_worker(concurrency=1, prefetch_multiplier=1, burst=True)
    assert await handle.wait(timeout=10) == 0
    assert [await r.get(timeout=5) for r in others] == [f"now-{i}" for i in range(3)]
    assert ran == ["now-0", "now-1", "now-2"]
    assert (await r_far.refresh()).state == states.PENDING
    assert await ready_count(amqp, unique_name) == 0
    assert await ready_count(amqp, parking) == 1
    channel = await amqp.channel()
    try:
        queue = await channel.get_queue(parking, ensure=False)
        message = await queue.get(no_ack=True, fail=True, timeout=5)
        assert message is not None
        assert message.headers["id"] == r_far.id
        assert message.headers["task"] == job.name
    finally:
        await channel.close()


# --- expires --------------------------------------------------------------------------------


async def test_expired_task_is_not_run_and_stored_as_revoked(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    runs = 0

    @app.task
    async def job() -> None:
        nonlocal runs
        runs += 1

    handle = await start_worker(concurrency=1)
    try:
        # Delivered at once (the worker is consuming), due after it expires.
        r = await job.apply_async(countdown=0.8, expires=0.3)
        with pytest.raises(TaskRevokedError) as info:
            await r.get(timeout=5)
        assert info.value.args == ("expired",)
        assert r.state == states.REVOKED
    finally:
        assert await handle.stop() == 0
    assert runs == 0
    assert await ready_count(amqp, unique_name) == 0


async def test_message_expired_in_the_queue_is_revoked_and_acked(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """A message whose ``expires`` header has passed (no AMQP TTL to drop it earlier)."""
    runs = 0

    @app.task
    async def job() -> None:
        nonlocal runs
        runs += 1

    now = datetime.now(UTC)
    message = protocol.TaskMessage(id=str(uuid.uuid4()), task=job.name,
                                   expires=now - timedelta(seconds=5))
    envelope = protocol.encode(message, now)
    await app.broker.declare_queue(unique_name)
    await publish_raw(amqp, unique_name, envelope.body, headers=envelope.headers,
                      content_type=envelope.content_type,
                      content_encoding=envelope.content_encoding,
                      correlation_id=envelope.correlation_id)
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    r = app.AsyncResult(message.id)
    with pytest.raises(TaskRevokedError, match="expired"):
        await r.get(timeout=5)
    assert runs == 0
    assert await ready_count(amqp, unique_name) == 0


# --- time limits ----------------------------------------------------------------------------


async def test_soft_time_limit_is_raised_inside_the_task(app: Celery, start_worker) -> None:
    @app.task(soft_time_limit=0.2)
    async def careful() -> str:
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.01)  # clean-up may await
            return "cleaned up"
        return "slept"

    r = await careful.delay()
    started = time.monotonic()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await r.get(timeout=5) == "cleaned up"
    assert r.state == states.SUCCESS
    assert time.monotonic() - started < 2.0


async def test_uncaught_soft_time_limit_is_a_failure(app: Celery, start_worker) -> None:
    @app.task
    async def careless() -> str:
        await asyncio.sleep(5)
        return "slept"

    r = await careless.apply_async(soft_time_limit=0.2)  # per message
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(SoftTimeLimitExceeded):
        await r.get(timeout=5)
    assert r.state == states.FAILURE
    assert r.traceback is not None and "SoftTimeLimitExceeded" in r.traceback


async def test_hard_time_limit_cancels_and_worker_carries_on(app: Celery,
                                                             start_worker) -> None:
    cancelled = False

    @app.task(time_limit=0.3)
    async def stuck() -> str:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled = True
            raise
        return "slept"

    @app.task
    async def next_one() -> str:
        return "next"

    r = await stuck.delay()
    r_next = await next_one.delay()
    started = time.monotonic()
    handle = await start_worker(concurrency=1, prefetch_multiplier=1, burst=True)
    assert await handle.wait() == 0
    assert time.monotonic() - started < 3.0
    with pytest.raises(TimeLimitExceeded):
        await r.get(timeout=5)
    assert r.state == states.FAILURE
    assert cancelled
    assert await r_next.get(timeout=5) == "next"


async def test_hard_limit_after_an_ignored_soft_limit(app: Celery, start_worker) -> None:
    soft_seen = False

    @app.task(soft_time_limit=0.2, time_limit=0.6)
    async def stubborn() -> str:
        nonlocal soft_seen
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            soft_seen = True
            await asyncio.sleep(5)  # keeps going past the hard limit
        return "slept"

    r = await stubborn.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(TimeLimitExceeded):
        await r.get(timeout=5)
    assert soft_seen
