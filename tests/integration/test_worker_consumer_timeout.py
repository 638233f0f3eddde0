"""RabbitMQ's consumer_timeout: unstarted messages are given back before they age past
``worker_unacked_max_age``; a long run is warned about once.

The broker tests lower RabbitMQ's consumer_timeout to 5 s. RabbitMQ 3.10 reads it once per
channel, as the channel opens, and checks it on the channel's tick (``channel_tick_interval``,
60 s by default, read again at every tick), so: the tick is lowered to 0.5 s for the test,
and the timeout only while the test's workers open their channels (other tests run against
the same broker meanwhile). Both are restored, exactly as they were, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from helpers import eventually, rabbitmqctl

from aio_celery import Celery

#: RabbitMQ's consumer_timeout while the workers open their channels, and its tick
BROKER_TIMEOUT_MS = 5000
TICK_MS = 500
#: the task that outlives the broker's timeout (acknowledged as it starts: a task running
#: unacknowledged that long would close the channel whatever the worker does)
LONG_RUN = 7.0
#: the worker's bound, well below the broker's 5 s (given back between 1.8 and 2 s)
MAX_AGE = 2.0


# --- the broker's consumer_timeout, lowered for a moment ------------------------------------


async def _rabbit_env(expression: str) -> str:
    """``rabbitmqctl eval`` on the broker under test (the node that is restored, too)."""
    return (await asyncio.to_thread(rabbitmqctl, "eval", expression)).strip()


async def _get(key: str) -> str:
    return await _rabbit_env(f"application:get_env(rabbit, {key}).")


async def _set(key: str, value: str) -> None:
    await _rabbit_env(f"application:set_env(rabbit, {key}, {value}).")


async def _restore(key: str, old: str) -> None:
    """Put back what ``_get`` read: ``{ok,Value}``, or unset it if it was ``undefined``."""
    found = re.fullmatch(r"\{ok,(.+)\}", old)
    if found:
        await _set(key, found.group(1))
    elif old == "undefined":
        await _rabbit_env(f"application:unset_env(rabbit, {key}).")
    else:
        raise RuntimeError(f"cannot restore rabbit's {key} from {old!r}")


Lowered = Callable[[], AbstractAsyncContextManager[None]]


@pytest.fixture
async def broker_timeout() -> AsyncIterator[Lowered]:
    """``async with broker_timeout(): <open the workers' channels>``: channels opened inside
    get a 5 s consumer_timeout, checked every 0.5 s until the test ends."""
    old_timeout, old_tick = await asyncio.gather(_get("consumer_timeout"),
                                                 _get("channel_tick_interval"))
    for key, old in (("consumer_timeout", old_timeout), ("channel_tick_interval", old_tick)):
        value = re.fullmatch(r"\{ok,(\d+)\}", old)
        if value and int(value.group(1)) <= 10 * BROKER_TIMEOUT_MS:
            # another run's lowered value (or a test broker set up that way): restoring it
            # afterwards would make it permanent
            pytest.fail(f"rabbit's {key} is {old} already: is another run lowering it?")

    @contextlib.asynccontextmanager
    async def lowered() -> AsyncIterator[None]:
        await _set("consumer_timeout", str(BROKER_TIMEOUT_MS))
        try:
            yield
        finally:
            await _restore("consumer_timeout", old_timeout)

    try:
        await _set("channel_tick_interval", str(TICK_MS))
        yield lowered
    finally:
        try:
            await _restore("consumer_timeout", old_timeout)
        finally:
            await _restore("channel_tick_interval", old_tick)


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [rec for rec in caplog.records if text in rec.getMessage()]


def _tasks(app: Celery, ran: list[tuple[str, str, float]]) -> tuple[Any, Any]:
    """A long task acknowledged as it starts (it notes when in ``ran``), and short ones
    (acknowledged after they run) that note which worker ran them and when."""

    @app.task(acks_late=False, bind=True)
    async def long_task(self: Any) -> str:
        ran.append(("long", self.request.hostname, time.monotonic()))
        await asyncio.sleep(LONG_RUN)
        return "long done"

    @app.task(bind=True)
    async def short_task(self: Any, label: str) -> str:
        ran.append((label, self.request.hostname, time.monotonic()))
        return label

    return long_task, short_task


# --- the broker's timeout, for real -------------------------------------------------------


async def test_without_the_sweep_the_broker_closes_the_channel(
        app: Celery, start_worker, broker_timeout: Lowered,
        caplog: pytest.LogCaptureFixture) -> None:
    """The set-up bites: unstarted messages behind a long task outlive the broker's 5 s, and
    RabbitMQ closes the channel (the long task is cancelled with it)."""
    caplog.set_level(logging.INFO, logger="aio_celery")
    long_task, short_task = _tasks(app, [])
    await long_task.delay()
    for i in range(3):
        await short_task.delay(f"short-{i}")
    async with broker_timeout():
        await start_worker(concurrency=1, prefetch_multiplier=4, unacked_max_age=0)
    await eventually(lambda: _logged(caplog, "Lost the broker connection"),
                     timeout=BROKER_TIMEOUT_MS / 1000 + 3 * TICK_MS / 1000 + 1,
                     what="the broker's consumer_timeout")
    (lost,) = _logged(caplog, "Lost the broker connection")
    assert "PRECONDITION_FAILED" in lost.getMessage()
    assert "timed out" in lost.getMessage()


async def test_unstarted_messages_go_back_in_time_and_run_once_after_the_long_task(
        app: Celery, start_worker, broker_timeout: Lowered,
        caplog: pytest.LogCaptureFixture) -> None:
    """One worker, one slot: the short tasks prefetched behind the long one are given back
    before the broker's timeout, come straight back (no other consumer) and are given back
    again, about once per max age each, until the slot is free; the channel stays open."""
    caplog.set_level(logging.INFO, logger="aio_celery")
    ran: list[tuple[str, str, float]] = []
    long_task, short_task = _tasks(app, ran)
    long_result = await long_task.delay()
    shorts = [await short_task.delay(f"short-{i}") for i in range(5)]
    async with broker_timeout():
        started = time.monotonic()
        await start_worker(concurrency=1, prefetch_multiplier=4, unacked_max_age=MAX_AGE,
                           eta_horizon=1.0)
    assert await long_result.get(timeout=LONG_RUN + 5) == "long done"
    assert [await r.get(timeout=5) for r in shorts] == [f"short-{i}" for i in range(5)]
    shorts_ran = [(label, at) for label, _, at in ran if label != "long"]
    assert sorted(label for label, _ in shorts_ran) == [f"short-{i}" for i in range(5)]
    assert all(at - started >= LONG_RUN - 0.5 for _, at in shorts_ran), "a slot was free?"
    assert not _logged(caplog, "Lost the broker connection")
    returns = [rec.args[0] for rec in _logged(caplog, "Gave back")]  # type: ignore[index]
    # 4 prefetched messages given back every ~1.8-2 s while the long task runs 7 s
    assert len(returns) >= 3
    assert sum(returns) <= 4 * (int(LONG_RUN / (MAX_AGE * 0.9)) + 1)


async def test_messages_held_back_undecoded_go_back_in_time_too(
        app: Celery, start_worker, broker_timeout: Lowered,
        caplog: pytest.LogCaptureFixture) -> None:
    """A prefetch of 100 with one slot: 64 messages wait decoded, the rest is held back
    undecoded in the connection (back-pressure); those age too and go back in time."""
    caplog.set_level(logging.INFO, logger="aio_celery")
    ran: list[tuple[str, str, float]] = []
    long_task, short_task = _tasks(app, ran)
    long_result = await long_task.delay()
    shorts = [await short_task.delay(f"short-{i}") for i in range(110)]
    async with broker_timeout():
        await start_worker(concurrency=1, prefetch_multiplier=100, unacked_max_age=MAX_AGE,
                           eta_horizon=1.0)
    assert await long_result.get(timeout=LONG_RUN + 5) == "long done"
    for r in shorts:
        await r.get(timeout=10)
    labels = [label for label, _, _ in ran if label != "long"]
    assert sorted(labels) == sorted(f"short-{i}" for i in range(110))
    assert not _logged(caplog, "Lost the broker connection")
    returns = [rec.args[0] for rec in _logged(caplog, "Gave back")]  # type: ignore[index]
    assert max(returns) > 64, "nothing held back was given back"


async def test_unstarted_messages_go_to_a_free_worker(
        app: Celery, start_worker, broker_timeout: Lowered,
        caplog: pytest.LogCaptureFixture) -> None:
    """A second worker with free slots consumes the same queue: what the busy one gives
    back runs there, while the long task still runs, and each short task runs once."""
    caplog.set_level(logging.INFO, logger="aio_celery")
    ran: list[tuple[str, str, float]] = []
    long_task, short_task = _tasks(app, ran)
    long_result = await long_task.delay()
    shorts = [await short_task.delay(f"short-{i}") for i in range(6)]
    async with broker_timeout():
        busy = await start_worker(concurrency=1, prefetch_multiplier=4,
                                  unacked_max_age=MAX_AGE, eta_horizon=1.0,
                                  hostname="busy@test")
        # the busy one has taken the long task and 4 short ones before the free one starts
        await eventually(lambda: ran, timeout=2, what="the long task")
        await start_worker(concurrency=2, prefetch_multiplier=4, unacked_max_age=MAX_AGE,
                           eta_horizon=1.0, hostname="free@test")
    assert [await r.get(timeout=LONG_RUN + 5) for r in shorts] == \
        [f"short-{i}" for i in range(6)]
    (long_started, *shorts_ran) = ran
    assert long_started[:2] == ("long", "busy@test")
    assert sorted(label for label, _, _ in shorts_ran) == [f"short-{i}" for i in range(6)]
    on_free = [at for _, host, at in shorts_ran if host == "free@test"]
    assert on_free and min(on_free) - long_started[2] < LONG_RUN - 1, \
        "nothing given back ran on the free worker while the long task ran"
    assert await long_result.get(timeout=LONG_RUN + 5) == "long done"
    assert _logged(caplog, "Gave back")
    assert not _logged(caplog, "Lost the broker connection")
    assert busy.worker.state == "ready"


# --- a long run is warned about once -----------------------------------------------------


async def test_a_task_running_past_the_max_age_is_warned_about_once(
        app: Celery, start_worker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery")

    @app.task
    async def slow() -> str:
        await asyncio.sleep(1.2)
        return "slow"

    @app.task(acks_late=False)
    async def slow_acked_early() -> str:  # acknowledged already: nothing to warn about
        await asyncio.sleep(1.2)
        return "early"

    @app.task
    async def quick() -> str:
        return "quick"

    late = await slow.delay()
    early = await slow_acked_early.delay()
    fast = await quick.delay()
    handle = await start_worker(concurrency=3, unacked_max_age=0.5, eta_horizon=0.2,
                                burst=True)
    assert await handle.wait(timeout=10) == 0
    assert [await r.get(timeout=5) for r in (late, early, fast)] == ["slow", "early", "quick"]
    warnings = _logged(caplog, "has run unacknowledged")
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert f"slow[{late.id}]" in text
    assert "consumer_timeout" in text and "x-consumer-timeout" in text
    assert "acks_late=False" in text
    assert warnings[0].levelno == logging.WARNING
    assert not _logged(caplog, "Gave back")

