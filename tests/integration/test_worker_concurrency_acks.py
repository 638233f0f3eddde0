"""The worker against real RabbitMQ and Redis: concurrency, prefetch, late acks, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from helpers import eventually, ready_count, resolves_to, stays

from aio_celery import Celery, states
from aio_celery.exceptions import RemoteTaskError

# --- concurrency and prefetch ---------------------------------------------------------------


async def test_at_most_concurrency_tasks_run_at_once(app: Celery, start_worker) -> None:
    running = 0
    peak = 0

    @app.task
    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.05)
        finally:
            running -= 1
        return i

    results = [await work.delay(i) for i in range(24)]
    handle = await start_worker(concurrency=4, burst=True)
    assert await handle.wait() == 0
    assert peak == 4, f"expected exactly 4 tasks at once at the peak, saw {peak}"
    assert [await r.get(timeout=5) for r in results] == list(range(24))


@pytest.mark.parametrize(("options", "setting", "expected"), [
    ({"concurrency": 2, "prefetch_multiplier": 3}, None, 6),
    ({"concurrency": 3}, 2, 6),  # multiplier from app.conf.worker_prefetch_multiplier
])
async def test_prefetch_is_multiplier_times_concurrency(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        options: dict[str, int], setting: int | None, expected: int) -> None:
    if setting is not None:
        app.conf.update(worker_prefetch_multiplier=setting)
    release = asyncio.Event()
    running = 0

    @app.task
    async def blocked(i: int) -> int:
        nonlocal running
        running += 1
        await release.wait()
        return i

    total = 20
    results = [await blocked.delay(i) for i in range(total)]
    handle = await start_worker(**options)
    try:
        assert handle.worker.session.prefetch_count == expected
        await eventually(lambda: running == options["concurrency"], what="slots filled")
        # The broker hands out exactly `expected` unacked messages and keeps the rest ready.
        await eventually(lambda: resolves_to(ready_count(amqp, unique_name), total - expected),
                         what=f"{total - expected} messages left ready")
        await stays(lambda: resolves_to(ready_count(amqp, unique_name), total - expected))
        assert running == options["concurrency"]
        release.set()
        assert [await r.get(timeout=5) for r in results] == list(range(total))
    finally:
        release.set()
        assert await handle.stop() == 0
    assert await ready_count(amqp, unique_name) == 0


# --- late acknowledgement -------------------------------------------------------------------


async def test_message_unacked_while_running_and_result_stored_before_ack(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """With a prefetch of 1 the broker delivers the second message only once the first is
    acked: so the second task seeing the first's result proves store-then-ack, and the second
    message staying ready while the first runs proves the first is not acked early."""
    release = asyncio.Event()
    first_started = asyncio.Event()

    @app.task
    async def first() -> str:
        first_started.set()
        await release.wait()
        return "first done"

    @app.task
    async def second(first_id: str) -> list[Any]:
        seen = await app.AsyncResult(first_id).refresh()
        return [seen.state, seen.result]

    r1 = await first.delay()
    r2 = await second.delay(r1.id)
    handle = await start_worker(concurrency=1, prefetch_multiplier=1)
    try:
        await asyncio.wait_for(first_started.wait(), 5)
        # The first message is out (unacked), the second one is still ready in the queue.
        await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 1), what="1 ready")
        await stays(lambda: resolves_to(ready_count(amqp, unique_name), 1))
        assert (await r1.refresh()).state == states.PENDING
        release.set()
        assert await r2.get(timeout=5) == [states.SUCCESS, "first done"]
        assert await r1.get(timeout=5) == "first done"
    finally:
        release.set()
        assert await handle.stop() == 0
    assert await ready_count(amqp, unique_name) == 0


async def test_failing_task_stores_failure_and_is_acked(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    calls = 0

    @app.task
    async def boom(x: int) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad value", x)

    @app.task
    async def fine() -> str:
        return "fine"

    r = await boom.delay(7)
    ok = await fine.delay()
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(ValueError, match="bad value") as info:
        await r.get(timeout=5)
    assert info.value.args == ("bad value", 7)
    assert r.state == states.FAILURE
    assert r.traceback is not None
    assert "Traceback (most recent call last)" in r.traceback
    assert 'raise ValueError("bad value", x)' in r.traceback
    assert "ValueError: ('bad value', 7)" in r.traceback
    assert await ok.get(timeout=5) == "fine"
    # Acked: the worker has closed its channel, so an unacked message would be back.
    assert await ready_count(amqp, unique_name) == 0
    assert calls == 1
    # A fresh worker finds nothing to redeliver.
    again = await start_worker(concurrency=1, burst=True)
    assert await again.wait() == 0
    assert calls == 1


async def test_a_tasks_own_cancelled_error_is_a_failure_and_the_backlog_goes_on(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """A CancelledError the task raises itself (it awaited a future someone else cancelled)
    is a failure like any other, not a stop: FAILURE stored, message acked. With one slot and
    a backlog past the 64 ready jobs at which the session holds deliveries, it used to be
    taken for a stop: the message requeued and the slot never handed on (a stalled worker)."""
    backlog = 150
    delivered = asyncio.Event()
    runs = 0
    done: list[int] = []

    @app.task
    async def victim() -> None:
        nonlocal runs
        runs += 1
        await delivered.wait()
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # raises CancelledError, while nobody cancels this task

    @app.task
    async def work(i: int) -> int:
        done.append(i)
        return i

    r = await victim.delay()
    await asyncio.gather(*(work.delay(i) for i in range(backlog)))
    handle = await start_worker(concurrency=1, prefetch_multiplier=2 * backlog)
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 0), timeout=3,
                     what="the whole backlog delivered")
    session = handle.worker.session
    await eventually(lambda: session.ready >= 64, timeout=3,
                     what="64 jobs ready: deliveries held from here on")
    delivered.set()
    await eventually(lambda: len(done) == backlog, timeout=3, what="the whole backlog run")
    stored = await app.backend.get_meta(r.id)
    assert stored is not None
    assert stored["status"] == states.FAILURE
    assert stored["result"]["exc_type"] == "CancelledError"
    assert (await r.refresh()).state == states.FAILURE
    # Rebuilt as RemoteTaskError: raising a real CancelledError would cancel the reader.
    assert isinstance(r.result, RemoteTaskError)
    assert r.result.exc_type == "CancelledError"
    assert await handle.stop(timeout=3) == 0
    # Acked, not requeued: nothing is back in the queue and it ran once.
    assert await ready_count(amqp, unique_name) == 0
    assert runs == 1
    assert sorted(done) == list(range(backlog))


async def test_success_state_and_result_document(app: Celery, start_worker) -> None:
    @app.task
    async def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    r = await add.delay(2, 3)
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await r.get(timeout=5) == {"sum": 5}
    assert r.state == states.SUCCESS
    assert r.traceback is None
    assert r.date_done is not None
    assert await r.successful()
