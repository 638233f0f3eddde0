"""Rate limits in a worker on the real broker: the rate is kept, a task waiting for its
token holds no concurrency slot and lets other tasks pass, a flood beyond the prefetch
window is parked instead of filling it, and warm shutdown and the aging sweep give the
waiting ones back; the poison guard is unaffected."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractConnection
from helpers import eventually, ready_count, resolves_to

from aio_celery import Celery, exitcodes, states
from aio_celery.exceptions import WorkerLostError
from aio_celery.poison import DeathTable, Guard, task_key
from aio_celery.worker import Worker, WorkerOptions
from aio_celery.worker.delivery import wait_queue_name

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def holding_queues(amqp: AbstractConnection, unique_name: str) -> AsyncIterator[None]:
    """Parks go to the test queue's holding queues (a power of two seconds, or the
    horizon): deleted at the end."""
    yield
    channel = await amqp.channel()
    try:
        for ttl in (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600):
            await channel.queue_delete(wait_queue_name(unique_name, ttl))
    finally:
        await channel.close()


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


class Starts:
    """When each run started (monotonic), by label."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def order(self) -> list[str]:
        return sorted(self.at, key=self.at.__getitem__)


# --- the rate -------------------------------------------------------------------------------


async def test_thirty_at_ten_per_second_take_about_three_seconds(
        app: Celery, start_worker) -> None:
    """A full bucket lets the first one start at once, then one token every 0.1 s: the
    30th starts 2.9 s after the first token at the soonest. All 30 wait in memory
    (prefetch 40 - concurrency 10 leaves room for 30)."""
    starts = Starts()

    @app.task(rate_limit="10/s")
    async def limited(i: int) -> int:
        starts.at[str(i)] = time.monotonic()
        return i

    results = [await limited.delay(i) for i in range(30)]
    began = time.monotonic()  # before the worker exists: no token before this
    handle = await start_worker(concurrency=10, burst=True)
    assert await handle.wait(timeout=30) == 0
    assert [await r.get(timeout=5) for r in results] == list(range(30))
    last = max(starts.at.values())
    assert last - began >= 2.9  # the token math: 29 intervals after the first token
    assert last - began < 2.9 + 3.0  # generous, for a loaded machine
    first_second = [at for at in starts.at.values() if at - began < 1.0]
    assert len(first_second) <= 11  # the first token and at most ten more in a second


async def test_a_task_without_a_limit_passes_the_waiting_ones(
        app: Celery, start_worker) -> None:
    """One slot. Eight messages of a task limited to 2/s arrive first, two of an unlimited
    task behind them: the unlimited ones run at once, because the limited ones wait for
    their tokens without holding the slot."""
    starts = Starts()

    @app.task(rate_limit="2/s")
    async def limited(i: int) -> str:
        starts.at[f"limited-{i}"] = time.monotonic()
        return "limited"

    @app.task
    async def free(i: int) -> str:
        starts.at[f"free-{i}"] = time.monotonic()
        return "free"

    limited_results = [await limited.delay(i) for i in range(8)]
    free_results = [await free.delay(i) for i in range(2)]
    began = time.monotonic()
    handle = await start_worker(concurrency=1, prefetch_multiplier=10, burst=True)
    assert await handle.wait(timeout=30) == 0
    assert all([await r.get(timeout=5) == "free" for r in free_results])
    assert all([await r.get(timeout=5) == "limited" for r in limited_results])
    order = starts.order()
    assert order.index("free-1") < order.index("limited-2"), order
    assert starts.at["free-1"] - began < 1.0, "the unlimited task waited behind the limited"
    assert starts.at["limited-7"] - began >= 7 * 0.5


async def test_a_flood_beyond_the_window_is_parked_and_others_pass(
        app: Celery, start_worker, holding_queues: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """prefetch 3, one slot: room for 2 waiting in memory. Twelve limited messages at 2/s
    then two unlimited ones: the limited ones whose token is a second or more away are
    parked (republished to a holding queue, acked), so the window never fills with them
    and the unlimited ones arrive and run at once; every limited one still runs, at the
    rate."""
    starts = Starts()

    @app.task(rate_limit="2/s")
    async def limited(i: int) -> int:
        starts.at[f"limited-{i}"] = time.monotonic()
        return i

    @app.task
    async def free(i: int) -> int:
        starts.at[f"free-{i}"] = time.monotonic()
        return i

    limited_results = [await limited.delay(i) for i in range(12)]
    free_results = [await free.delay(i) for i in range(2)]
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="aio_celery.worker"):
        handle = await start_worker(concurrency=1, prefetch_multiplier=3)
        try:
            assert [await r.get(timeout=10) for r in free_results] == [0, 1]
            assert max(starts.at[f"free-{i}"] for i in range(2)) - began < 2.0
            assert [await r.get(timeout=40) for r in limited_results] == list(range(12))
        finally:
            assert await handle.stop() == 0
    limited_starts = sorted(at for label, at in starts.at.items()
                            if label.startswith("limited"))
    assert limited_starts[-1] - began >= 11 * 0.5  # the token math, parks or not
    assert _logged(caplog, ": parked in")


async def test_a_rate_changed_at_runtime_reaches_the_waiting_ones(
        app: Celery, start_worker) -> None:
    """What the ``rate_limit`` control command does: set the task's attribute. Messages
    already waiting for a 1/m token go at the new rate."""
    starts = Starts()

    @app.task(rate_limit="1/m")
    async def limited(i: int) -> int:
        starts.at[str(i)] = time.monotonic()
        return i

    results = [await limited.delay(i) for i in range(4)]
    handle = await start_worker(concurrency=4)
    try:
        await eventually(lambda: len(starts.at) == 1, what="the first one runs")
        await asyncio.sleep(0.3)
        assert len(starts.at) == 1
        limited.rate_limit = "20/s"
        changed = time.monotonic()
        assert [await r.get(timeout=5) for r in results] == [0, 1, 2, 3]
        assert max(starts.at.values()) - changed < 1.0 + 1.0  # RECHECK, and some load
    finally:
        assert await handle.stop() == 0


async def test_worker_disable_rate_limits_ignores_them(app: Celery, start_worker) -> None:
    app.conf.update(worker_disable_rate_limits=True)
    starts = Starts()

    @app.task(rate_limit="1/m")
    async def limited(i: int) -> int:
        starts.at[str(i)] = time.monotonic()
        return i

    results = [await limited.delay(i) for i in range(5)]
    handle = await start_worker(concurrency=5, burst=True)
    assert await handle.wait(timeout=10) == 0
    assert [await r.get(timeout=5) for r in results] == list(range(5))
    assert max(starts.at.values()) - min(starts.at.values()) < 1.0


async def test_task_default_rate_limit_applies_to_tasks_without_one(
        app: Celery, start_worker) -> None:
    app.conf.update(task_default_rate_limit="5/s")
    starts = Starts()

    @app.task
    async def job(i: int) -> int:
        starts.at[str(i)] = time.monotonic()
        return i

    results = [await job.delay(i) for i in range(6)]
    began = time.monotonic()
    handle = await start_worker(concurrency=6, burst=True)
    assert await handle.wait(timeout=20) == 0
    assert [await r.get(timeout=5) for r in results] == list(range(6))
    assert max(starts.at.values()) - began >= 5 * 0.2


# --- giving back ----------------------------------------------------------------------------


async def test_warm_shutdown_gives_the_waiting_ones_back_unrun(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """Three wait for 1/m tokens while one runs: a warm stop lets the running one finish
    and gives the three back at once (it never waits for their tokens); they run later,
    in a worker with the limit lifted."""
    ran: list[int] = []

    @app.task(rate_limit="1/m")
    async def limited(i: int) -> int:
        await asyncio.sleep(0.5)
        ran.append(i)
        return i

    results = [await limited.delay(i) for i in range(4)]
    handle = await start_worker(concurrency=4)
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 0),
                     what="all 4 delivered")
    await asyncio.sleep(0.1)  # the first one is running
    stopping = time.monotonic()
    assert await handle.stop() == exitcodes.OK
    assert time.monotonic() - stopping < 5.0  # the running one's 0.5 s, not a token's 60
    assert ran == [0]
    assert await ready_count(amqp, unique_name) == 3
    for result in results[1:]:
        assert (await result.refresh()).state == states.PENDING

    limited.rate_limit = None
    handle = await start_worker(concurrency=4, burst=True)
    assert await handle.wait(timeout=10) == 0
    assert sorted(ran) == [0, 1, 2, 3]
    assert [await r.get(timeout=5) for r in results] == [0, 1, 2, 3]


async def test_the_aging_sweep_gives_back_a_message_that_waited_too_long_for_its_token(
        app: Celery, start_worker, holding_queues: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Etas that fall due together and then wait for 1/m tokens in memory (in the places
    they already hold): past worker_unacked_max_age (1 s) they are given back, not left
    to RabbitMQ's consumer_timeout; back again, they are parked until their token."""
    ran: list[int] = []

    @app.task(rate_limit="1/m")
    async def limited(i: int) -> int:
        ran.append(i)
        return i

    results = [await limited.apply_async((i,), countdown=0.2) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="aio_celery.worker"):
        handle = await start_worker(concurrency=1, prefetch_multiplier=4, eta_horizon=0.5,
                                    unacked_max_age=1.0)
        try:
            await eventually(lambda: len(ran) == 1, what="the first one due runs")
            await eventually(lambda: _logged(caplog, "waiting for their eta or rate limit"),
                             timeout=5, what="the waiting ones given back")
            await eventually(lambda: _logged(caplog, ": parked in"), timeout=5,
                             what="parked once back")
            assert len(ran) == 1
            refreshed = [await r.refresh() for r in results]
            assert sum(r.state == states.PENDING for r in refreshed) == 2
            assert not _logged(caplog, "Lost the broker connection")
        finally:
            assert await handle.stop() == 0


async def test_a_task_the_poison_guard_retires_takes_no_token(
        app: Celery, amqp: AbstractConnection, unique_name: str) -> None:
    """A redelivered message that died three times is retired without running: it neither
    waits for a token nor takes one, so the next message of its type (limited to 1/m)
    finds the bucket full and runs at once."""
    ran: list[str] = []

    @app.task(name="limited", rate_limit="1/m", bind=True)
    async def limited(self: object) -> str:
        ran.append(str(self.request.id))  # type: ignore[attr-defined]
        return "ran"

    poison = await limited.delay()
    channel = await amqp.channel()  # taken unacknowledged, then back: redelivered
    box = await channel.get_queue(unique_name, ensure=False)
    await box.get(no_ack=False)
    await channel.close()
    innocent = await limited.delay()
    deaths = DeathTable(capacity=16)
    try:
        for _ in range(3):
            deaths.record([task_key(poison.id)])  # three deaths alone
        worker = Worker(app, WorkerOptions(concurrency=2, burst=True, banner=False),
                        guard=Guard(3, None, None, deaths))
        assert await asyncio.wait_for(worker.run(), 10) == 0
    finally:
        deaths.close()
    assert ran == [innocent.id]
    assert await innocent.get(timeout=5) == "ran"
    with pytest.raises(WorkerLostError):
        await poison.get(timeout=5)
