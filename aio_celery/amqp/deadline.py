"""Bounds for many concurrent waits of the same length, with one timer per batch.

``asyncio.timeout()`` costs a timer handle, a copy of the context and a ``Timeout`` object
for each wait. Tens of thousands of publishes awaiting their confirms at once hold that
many (about 0.5 KiB each), and the garbage collector walks them all again and again:
measured, most of the client's publishing time went there. Here the waits that start
within a short window share one ``loop.call_at`` handle, and each wait costs one entry in
a dict. Pure asyncio; imports nothing of aio_celery.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

#: a batch takes joiners for this share of the timeout (at most :data:`MAX_WINDOW`):
#: each wait in it lasts between the timeout and the timeout plus that window
WINDOW_SHARE = 0.1
MAX_WINDOW = 1.0

_UNBOUNDED = contextlib.nullcontext()


class SharedDeadlines:
    """Hands out bounds: ``with deadlines.bound(timeout):`` raises TimeoutError when the
    block still waits after ``timeout`` seconds (and at most a tenth more, up to a second),
    like ``asyncio.timeout(timeout)``; None: no bound. The block must run in a task, and
    a task must not enter a bound of the same batch twice at once."""

    def __init__(self) -> None:
        self._open: _Batch | None = None

    def bound(self, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        if timeout is None:
            return _UNBOUNDED
        loop = asyncio.get_running_loop()
        now = loop.time()
        batch = self._open
        if batch is None or batch.timeout != timeout or now > batch.joinable_until \
                or batch.loop is not loop:
            window = min(max(timeout, 0.0) * WINDOW_SHARE, MAX_WINDOW)
            batch = self._open = _Batch(loop, timeout, now + window)
        return batch


class _Batch:
    """The waits that joined within one window: one deadline, one timer."""

    __slots__ = ("_expired", "_waiting", "joinable_until", "loop", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 joinable_until: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.joinable_until = joinable_until
        #: the tasks inside the block, with how many cancellations each had on entry
        self._waiting: dict[asyncio.Task[object], int] = {}
        self._expired = False
        # The timer starts with the window, so every joiner waits at least ``timeout``.
        loop.call_at(joinable_until + timeout, self._expire)

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a bound must be entered inside a task")
        if self._expired:  # the window is shorter than the timeout: only if timeout <= 0
            raise TimeoutError
        self._waiting[task] = task.cancelling()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        task = asyncio.current_task()
        if task is None:  # __enter__ refused that
            raise RuntimeError("a bound must be left inside the task that entered it")
        cancelling = self._waiting.pop(task)
        # Only the tasks still inside were cancelled by _expire, as asyncio.timeout() does:
        # a cancellation of the task's own (one more than ours) stays a cancellation.
        if self._expired and task.uncancel() <= cancelling \
                and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def _expire(self) -> None:
        self._expired = True
        for task in self._waiting:
            task.cancel()
