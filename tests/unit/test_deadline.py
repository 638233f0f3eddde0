"""SharedDeadlines: asyncio.timeout()'s behaviour, with one timer per batch of waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from aio_celery.amqp.deadline import MAX_WINDOW, WINDOW_SHARE, SharedDeadlines


async def wait_bounded(deadlines: SharedDeadlines, timeout: float | None,
                       waiting: asyncio.Future[None]) -> None:
    with deadlines.bound(timeout):
        await waiting


def count_timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The deadlines of the timers SharedDeadlines asks the running loop for from now on
    (not those of asyncio.sleep and the like)."""
    loop = asyncio.get_running_loop()
    asked: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> asyncio.TimerHandle:
        if type(getattr(callback, "__self__", None)).__module__ == SharedDeadlines.__module__:
            asked.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    return asked


async def test_a_wait_that_ends_in_time_is_left_alone() -> None:
    deadlines = SharedDeadlines()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, done.set_result, None)
    await wait_bounded(deadlines, 1.0, done)


async def test_a_wait_past_its_timeout_raises_timeout_error_in_bounds() -> None:
    deadlines = SharedDeadlines()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await wait_bounded(deadlines, 0.2, never)
    waited = time.monotonic() - started
    assert 0.2 <= waited < 0.2 * (1 + WINDOW_SHARE) + 0.15  # the window, plus load
    assert never.cancelled()


async def test_many_waits_started_together_share_one_timer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    deadlines = SharedDeadlines()
    timers = count_timers(monkeypatch)
    loop = asyncio.get_running_loop()
    # a window of 0.1 s: time enough to start them all even on a loaded machine
    waits = [asyncio.ensure_future(wait_bounded(deadlines, 1.0, loop.create_future()))
             for _ in range(500)]
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(result, TimeoutError) for result in results)
    assert len(timers) == 1


async def test_a_wait_after_the_window_gets_a_batch_and_timer_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    deadlines = SharedDeadlines()
    timers = count_timers(monkeypatch)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(wait_bounded(deadlines, 0.3, loop.create_future()))
    await asyncio.sleep(0.3 * WINDOW_SHARE + 0.01)  # past the first one's window
    second = asyncio.ensure_future(wait_bounded(deadlines, 0.3, loop.create_future()))
    other_timeout = asyncio.ensure_future(wait_bounded(deadlines, 0.5, loop.create_future()))
    for wait in (first, second, other_timeout):
        with pytest.raises(TimeoutError):
            await wait
    assert len(timers) == 3
    assert timers[1] - timers[0] >= 0.3 * WINDOW_SHARE


def test_the_window_is_a_tenth_of_the_timeout_and_at_most_a_second() -> None:
    async def deadline_of(timeout: float, monkeypatch: pytest.MonkeyPatch) -> float:
        timers = count_timers(monkeypatch)
        start = asyncio.get_running_loop().time()
        SharedDeadlines().bound(timeout)
        (deadline,) = timers
        return deadline - start

    with pytest.MonkeyPatch.context() as monkeypatch:
        assert asyncio.run(deadline_of(2.0, monkeypatch)) == pytest.approx(2.2, abs=0.05)
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert asyncio.run(deadline_of(30.0, monkeypatch)) == \
            pytest.approx(30 + MAX_WINDOW, abs=0.05)


async def test_no_timeout_means_no_bound_and_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    deadlines = SharedDeadlines()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.05, done.set_result, None)
    timers = count_timers(monkeypatch)
    await wait_bounded(deadlines, None, done)
    assert timers == []


async def test_a_cancellation_of_the_waits_own_stays_a_cancellation() -> None:
    deadlines = SharedDeadlines()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    wait = asyncio.ensure_future(wait_bounded(deadlines, 5.0, never))
    await asyncio.sleep(0.01)
    wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait


async def test_a_cancellation_racing_the_deadline_stays_a_cancellation() -> None:
    """Cancelled by the deadline and by its owner before it could run again: the owner's
    cancellation wins, as with asyncio.timeout()."""
    deadlines = SharedDeadlines()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    owner_cancels: list[asyncio.Future[None]] = []
    # runs when the deadline cancels ``never``, before the waiting task wakes up
    never.add_done_callback(lambda _: owner_cancels[0].cancel())
    wait = asyncio.ensure_future(wait_bounded(deadlines, 0.05, never))
    owner_cancels.append(wait)
    with pytest.raises(asyncio.CancelledError):
        await wait
    assert wait.cancelled()


async def test_the_wait_that_ended_is_not_cancelled_by_its_batchs_deadline() -> None:
    deadlines = SharedDeadlines()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    await wait_bounded(deadlines, 0.05, done)
    # the batch's timer fires now with nobody inside: this task is not cancelled
    await asyncio.sleep(0.2)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
