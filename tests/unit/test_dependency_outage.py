"""The shared retry clock and the two log lines of an outage (aio_celery.worker.outage)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aio_celery.worker.dependency import DependencyOutage


def _outage(**kwargs: float) -> DependencyOutage:
    return DependencyOutage("The thing", "Fix the thing.", errors=(ConnectionError,), **kwargs)


async def test_waiters_try_again_together_with_capped_backoff() -> None:
    outage = _outage(first_delay=0.01, max_delay=0.04)
    loop = asyncio.get_running_loop()
    woke: list[float] = []

    async def waiter() -> None:
        await outage.next_try()
        woke.append(loop.time())

    await asyncio.gather(*(waiter() for _ in range(5)))
    assert len(woke) == 5 and max(woke) - min(woke) < 0.005  # one tick for all
    delays = []
    for _ in range(4):
        start = loop.time()
        await outage.next_try()
        delays.append(loop.time() - start)
    assert delays[0] >= 0.02 * 0.9 and delays[1] >= 0.04 * 0.9
    assert delays[2] < 0.04 * 3 and delays[3] < 0.04 * 3  # capped


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    outage = _outage(first_delay=0.02)
    first = asyncio.ensure_future(outage.next_try())
    second = asyncio.ensure_future(outage.next_try())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert first.cancelled()


async def test_one_line_when_it_fails_and_one_when_it_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    outage = _outage(first_delay=0.01)
    outage.answered()  # not down: nothing to say
    for _ in range(3):
        outage.failed(ConnectionError("refused."))
    await outage.next_try()
    outage.answered()
    outage.answered()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("The thing failed: refused. Finished tasks wait")
    assert lines[0].endswith("Fix the thing.")
    assert "answers again" in lines[1]
    assert not outage.down
