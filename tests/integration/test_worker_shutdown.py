"""Warm and cold shutdown, max tasks per child, and a result backend that is down."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from helpers import eventually, ready_count, resolves_to, stays

from aio_celery import Celery, exitcodes, signals, states
from aio_celery.broker import ConsumerChannel

# --- helpers ------------------------------------------------------------------------------


class Tracker:
    """What the long tasks did: started, finished, cancelled (by argument)."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []


def long_task(app: Celery, tracker: Tracker, seconds: float) -> Any:
    @app.task(name="long")
    async def long(i: int) -> int:
        tracker.started.append(i)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            tracker.cancelled.append(i)
            raise
        tracker.finished.append(i)
        return i

    return long


async def _three_running_ten_prefetched(app: Celery, start_worker, amqp: AbstractConnection,
                                        queue: str, seconds: float,
                                        **options: Any) -> tuple[Tracker, list[Any], Any]:
    tracker = Tracker()
    long = long_task(app, tracker, seconds)
    results = [await long.delay(i) for i in range(13)]
    # prefetch 3 x 5 = 15 >= 13: every message is delivered, 3 run, 10 wait for a slot
    handle = await start_worker(concurrency=3, prefetch_multiplier=5, **options)
    await eventually(lambda: len(tracker.started) == 3, what="3 tasks running")
    await eventually(lambda: resolves_to(ready_count(amqp, queue), 0), what="all 13 delivered")
    assert len(tracker.started) == 3
    return tracker, results, handle


# --- warm and cold shutdown -----------------------------------------------------------------


async def test_warm_stop_finishes_running_tasks_and_returns_the_rest(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    tracker, results, handle = await _three_running_ten_prefetched(
        app, start_worker, amqp, unique_name, seconds=1.0)
    started = time.monotonic()
    assert await handle.stop() == exitcodes.OK
    assert 0.5 < time.monotonic() - started < 3.0
    assert sorted(tracker.finished) == sorted(tracker.started)
    assert tracker.cancelled == []
    by_arg = dict(enumerate(results))
    for i in tracker.started:
        assert await by_arg[i].get(timeout=5) == i
    for i in set(by_arg) - set(tracker.started):
        assert (await by_arg[i].refresh()).state == states.PENDING
    assert await ready_count(amqp, unique_name) == 10


async def test_warm_stop_cancels_what_outlives_the_shutdown_timeout(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    tracker = Tracker()
    long = long_task(app, tracker, 30.0)
    results = [await long.delay(i) for i in range(3)]
    handle = await start_worker(concurrency=3, shutdown_timeout=0.5)
    await eventually(lambda: len(tracker.started) == 3, what="3 tasks running")
    started = time.monotonic()
    assert await handle.stop() == exitcodes.OK
    assert 0.4 < time.monotonic() - started < 2.5
    assert sorted(tracker.cancelled) == [0, 1, 2]
    assert tracker.finished == []
    for r in results:
        assert (await r.refresh()).state == states.PENDING
    assert await ready_count(amqp, unique_name) == 3


async def test_cold_stop_returns_every_unfinished_message(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    tracker, results, handle = await _three_running_ten_prefetched(
        app, start_worker, amqp, unique_name, seconds=1.0)
    started = time.monotonic()
    assert await handle.stop(cold=True) == exitcodes.OK
    assert time.monotonic() - started < 0.9, "a cold stop does not wait for tasks"
    assert tracker.finished == []
    assert sorted(tracker.cancelled) == sorted(tracker.started)
    for r in results:
        assert (await r.refresh()).state == states.PENDING
    assert await ready_count(amqp, unique_name) == 13


async def test_second_stop_request_turns_warm_into_cold(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    tracker = Tracker()
    long = long_task(app, tracker, 30.0)
    for i in range(2):
        await long.delay(i)
    handle = await start_worker(concurrency=2)  # default shutdown timeout: 25 s
    await eventually(lambda: len(tracker.started) == 2, what="2 tasks running")
    handle.worker.request_stop()
    await asyncio.sleep(0.1)
    assert not handle.task.done(), "a warm stop waits for running tasks"
    handle.worker.request_stop()
    assert await asyncio.wait_for(handle.task, 2) == exitcodes.OK
    assert sorted(tracker.cancelled) == [0, 1]
    assert await ready_count(amqp, unique_name) == 2


async def test_retire_is_never_counted_as_the_users_signal(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """The supervisor's stop request (``retire``, also with Ctrl-C next to the user's own
    SIGINT) stays warm when repeated and does not make the user's first signal the second:
    only the user's second ``request_stop`` goes cold."""
    tracker = Tracker()
    long = long_task(app, tracker, 30.0)
    for i in range(2):
        await long.delay(i)
    handle = await start_worker(concurrency=2)
    await eventually(lambda: len(tracker.started) == 2, what="2 tasks running")
    handle.worker.retire()
    handle.worker.request_stop()  # the user's first signal
    handle.worker.retire()
    await asyncio.sleep(0.1)
    assert not handle.task.done(), "a warm stop waits for running tasks"
    assert tracker.cancelled == []
    handle.worker.request_stop()  # the user's second signal
    assert await asyncio.wait_for(handle.task, 2) == exitcodes.OK
    assert sorted(tracker.cancelled) == [0, 1]
    assert await ready_count(amqp, unique_name) == 2


@pytest.mark.parametrize("trigger", ["by the task", "as it ends"])
async def test_cold_stop_as_the_next_task_starts_leaves_nothing_unsettled(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        trigger: str) -> None:
    """A cold stop requested in the loop turn in which the next task is started (as a signal
    may arrive just as a task finishes) may cancel that task before it ever ran: its message
    is given back by the worker like any other and counted, not left unsettled (the broker
    only requeued it at close). "by the task": the task's last step schedules the stop;
    "as it ends": a done callback of the task's asyncio task, run just after the session's
    own, which starts the next task."""
    count = 10
    gate = asyncio.Event()
    ran: collections.Counter[int] = collections.Counter()
    done: collections.Counter[int] = collections.Counter()

    @app.task(ignore_result=True)  # nothing to await between the task's end and the next
    async def step(i: int) -> int:
        ran[i] += 1
        if i == 0 and not gate.is_set():
            await gate.wait()
            if trigger == "by the task":
                asyncio.get_running_loop().call_soon(handle.worker.request_stop, True)
        done[i] += 1
        return i

    for i in range(count):
        await step.delay(i)
    handle = await start_worker(concurrency=1, prefetch_multiplier=2 * count)
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 0), timeout=3,
                     what="every message delivered")
    await eventually(lambda: ran[0] == 1, timeout=3, what="the first task running")
    session = handle.worker.session
    if trigger == "as it ends":
        (first,) = session.running_tasks()
        first.add_done_callback(lambda _: handle.worker.request_stop(cold=True))
    gate.set()
    assert await handle.wait(timeout=3) == exitcodes.OK
    finished = handle.worker.stats.finished
    assert finished == sum(done.values()) >= 1
    assert not session.busy, "deliveries left unsettled or tasks left running"
    outcome = session.outcome
    assert outcome.returned + outcome.cancelled == count - finished
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), count - finished),
                     timeout=2, what="the unfinished messages back in the queue")
    # A fresh worker runs the rest: nothing was lost, nothing is done twice.
    again = await start_worker(concurrency=2, burst=True)
    assert await again.wait(timeout=3) == exitcodes.OK
    assert done == collections.Counter(range(count))
    assert await ready_count(amqp, unique_name) == 0


async def test_cold_stop_does_not_bounce_the_prefetched_messages(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are given back once the consumers are cancelled: given back before, RabbitMQ
    hands them straight back to the same consumer, which gives them back again, and so on
    until the cancel is through (several rejects per message)."""
    concurrency, multiplier = 4, 50
    prefetch = concurrency * multiplier  # 200, of 400 messages
    rejects: collections.Counter[bool] = collections.Counter()  # requeue -> count
    reject, nack = ConsumerChannel.reject, ConsumerChannel.nack

    def counting(self: ConsumerChannel, tag: int, requeue: bool) -> None:
        rejects[requeue] += 1
        reject(self, tag, requeue)

    def counting_nacks(self: ConsumerChannel, tag: int) -> None:
        rejects[True] += 1  # a return (basic.nack with requeue)
        nack(self, tag)

    monkeypatch.setattr(ConsumerChannel, "reject", counting)
    monkeypatch.setattr(ConsumerChannel, "nack", counting_nacks)
    tracker = Tracker()
    long = long_task(app, tracker, 30.0)
    await asyncio.gather(*(long.delay(i) for i in range(2 * prefetch)))
    handle = await start_worker(concurrency=concurrency, prefetch_multiplier=multiplier)
    await eventually(lambda: len(tracker.started) == concurrency, timeout=3,
                     what="the first tasks running")
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), prefetch), timeout=3,
                     what="the prefetch window delivered")
    assert await handle.stop(cold=True, timeout=3) == exitcodes.OK
    assert rejects[False] == 0
    # About one each (a cancelled task's message given back before the consumer cancel is
    # through may still bring one more delivery per slot, given back as it arrives).
    assert rejects[True] == prefetch, \
        f"{rejects[True]} returns for {prefetch} prefetched messages"
    assert sorted(tracker.cancelled) == sorted(tracker.started)
    assert len(tracker.started) == concurrency  # nothing else ran
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 2 * prefetch),
                     timeout=2, what="every message back in the queue")


# --- max tasks per child --------------------------------------------------------------------


async def test_max_tasks_exits_with_recycle_after_that_many(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    ran: list[int] = []

    @app.task
    async def quick(i: int) -> int:
        ran.append(i)
        await asyncio.sleep(0.02)
        return i

    results = [await quick.delay(i) for i in range(12)]
    handle = await start_worker(concurrency=1, max_tasks=5)
    assert await handle.wait(timeout=10) == exitcodes.RECYCLE
    assert len(ran) == 5, f"ran {len(ran)} tasks with max_tasks=5: {ran}"
    assert handle.worker.stats.finished == 5
    assert [await results[i].get(timeout=5) for i in ran] == ran
    for i in set(range(12)) - set(ran):
        assert (await results[i].refresh()).state == states.PENDING
    assert await ready_count(amqp, unique_name) == 12 - 5


async def test_max_tasks_starts_nothing_once_reached(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """With concurrency 3 the tasks already running when the 5th one is done may finish too,
    but no task starts after that. "Done" is marked by a sync task_postrun receiver: nothing
    awaits between it and the worker counting the task as finished."""
    events: list[tuple[str, int]] = []

    def on_postrun(args: list[Any], **_: Any) -> None:
        events.append(("done", args[0]))

    @app.task
    async def quick(i: int) -> int:
        events.append(("start", i))
        await asyncio.sleep(0.02 + 0.01 * (i % 3))
        return i

    for i in range(15):
        await quick.delay(i)
    signals.task_postrun.connect(on_postrun)
    try:
        handle = await start_worker(concurrency=3, max_tasks=5)
        assert await handle.wait(timeout=10) == exitcodes.RECYCLE
    finally:
        signals.task_postrun.disconnect(on_postrun)
    done_at = [n for n, (kind, _) in enumerate(events) if kind == "done"]
    late_starts = [i for kind, i in events[done_at[4]:] if kind == "start"]
    assert late_starts == [], f"started after the 5th task was done: {late_starts}"
    started = [i for kind, i in events if kind == "start"]
    assert 5 <= len(started) <= 5 + 3 - 1
    assert handle.worker.stats.finished == len(started)
    assert await ready_count(amqp, unique_name) == 15 - len(started)


# --- the result backend is down -------------------------------------------------------------


@pytest.fixture
async def dead_backend_app(unique_name: str, amqp_url: str) -> AsyncIterator[Celery]:
    application = Celery(f"{unique_name}-dead", set_as_current=False)
    application.conf.update(broker_url=amqp_url, result_backend="redis://127.0.0.1:1/0",
                            task_default_queue=unique_name)
    async with application.setup():
        yield application


async def test_result_not_stored_keeps_the_message_and_the_task_does_not_run_again(
        app: Celery, dead_backend_app: Celery, start_worker, amqp: AbstractConnection,
        unique_name: str) -> None:
    runs: list[str] = []

    @dead_backend_app.task
    async def job() -> str:
        runs.append("job")
        return "done"

    @dead_backend_app.task
    async def boom() -> None:
        runs.append("boom")
        raise ValueError("also not storable")

    await job.delay()
    await boom.delay()
    handle = await start_worker(dead_backend_app, concurrency=1, shutdown_timeout=0.5)
    session = handle.worker.session
    # Both ran on the one slot: the first gave it up while its result waits.
    await eventually(lambda: session.pending_results == 2, what="both results waiting")
    # A few of the backend's retry rounds: nothing runs again.
    await stays(lambda: sorted(runs) == ["boom", "job"], duration=1.5)
    assert handle.worker.stats.finished == 0
    assert await handle.stop() == exitcodes.OK
    # Only the shutdown gives the messages back (after the shutdown timeout).
    assert await ready_count(amqp, unique_name) == 2


async def test_ignored_result_is_acked_without_the_backend(
        app: Celery, dead_backend_app: Celery, start_worker, amqp: AbstractConnection,
        unique_name: str) -> None:
    runs = 0

    @dead_backend_app.task(ignore_result=True)
    async def job() -> str:
        nonlocal runs
        runs += 1
        return "done"

    @dead_backend_app.task
    async def other() -> str:
        nonlocal runs
        runs += 1
        return "done"

    await job.delay()
    await other.apply_async(ignore_result=True)
    handle = await start_worker(dead_backend_app, concurrency=1, burst=True)
    assert await handle.wait() == exitcodes.OK
    assert runs == 2
    assert await ready_count(amqp, unique_name) == 0
