"""Soft and hard time limits for one coroutine.

asyncio can only deliver ``CancelledError`` into a task. To raise
:class:`~aio_celery.exceptions.SoftTimeLimitExceeded` *inside* the task's coroutine (where the
user can catch it and clean up, as in Celery), the coroutine is driven through
:class:`_Interruptible`: at the soft limit the task is cancelled, and the wrapper turns that
one cancellation into ``SoftTimeLimitExceeded`` thrown at the coroutine's current ``await``.
At the hard limit the task is cancelled for real and the caller gets
:class:`~aio_celery.exceptions.TimeLimitExceeded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

from aio_celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded


class _Interruptible:
    """Awaitable that drives ``coro`` and can throw an exception at its next resumption."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self.pending: BaseException | None = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> _Interruptible:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if isinstance(typ, BaseException) else (val if val is not None else typ())
        if isinstance(exc, asyncio.CancelledError) and self.pending is not None:
            exc, self.pending = self.pending, None
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # this cancellation was ours, and is now consumed
        return self._coro.throw(exc)

    def close(self) -> None:
        self._coro.close()


async def run_with_limits(coro: Coroutine[Any, Any, Any], soft: float | None,
                          hard: float | None) -> Any:
    """Await ``coro`` in a task of its own, enforcing the soft and hard limits (seconds)."""
    if not soft and not hard:
        return await coro
    return await _Limited(coro, soft, hard).run()


class _Limited:
    def __init__(self, coro: Coroutine[Any, Any, Any], soft: float | None,
                 hard: float | None) -> None:
        self.driver = _Interruptible(coro)
        self.soft = soft
        self.hard = hard
        self.hard_hit = False
        self.task: asyncio.Future[Any] | None = None

    async def _drive(self) -> Any:
        return await self.driver

    def _soft_limit(self) -> None:
        if self.task is not None and not self.task.done():
            self.driver.pending = SoftTimeLimitExceeded(
                f"soft time limit ({self.soft}s) exceeded")
            self.task.cancel()

    def _hard_limit(self) -> None:
        if self.task is not None and not self.task.done():
            self.hard_hit = True
            self.driver.pending = None
            self.task.cancel()

    async def run(self) -> Any:
        loop = asyncio.get_running_loop()
        self.task = asyncio.ensure_future(self._drive())
        handles = [loop.call_later(limit, fire) for limit, fire in
                   ((self.soft, self._soft_limit), (self.hard, self._hard_limit)) if limit]
        try:
            # Awaiting the task directly: cancelling the caller cancels the task as well.
            return await self.task
        except asyncio.CancelledError:
            if self.hard_hit:
                raise TimeLimitExceeded(f"time limit ({self.hard}s) exceeded") from None
            raise
        finally:
            for handle in handles:
                handle.cancel()
