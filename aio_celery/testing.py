"""Test your tasks with a real worker in the test's own event loop, on ``memory://``.

::

    app = Celery("proj", broker="memory://", backend="memory://")

    async def test_add():
        async with aio_celery.testing.worker(app):
            result = await add.delay(1, 2)
            assert await result.get(timeout=5) == 3

:func:`worker` runs :class:`aio_celery.worker.Worker` itself (acks, retries and their
countdowns, eta, chains, groups, chords, time limits, signals, the app context), without
RabbitMQ, Redis or redis-py. The pytest fixtures are in :mod:`aio_celery.pytest_plugin`
(this module does not import pytest). The differences from RabbitMQ are listed in the
README ("Testing without a broker").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aio_celery import exitcodes, memory
from aio_celery.app import Celery
from aio_celery.config import is_memory_url
from aio_celery.worker import Worker, WorkerOptions

__all__ = ["WorkerFailed", "reset", "worker"]


class WorkerFailed(RuntimeError):
    """The in-process worker did not start, or stopped with an exit code other than 0."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.asynccontextmanager
async def worker(app: Celery, *, concurrency: int = 10, queues: tuple[str, ...] = (),
                 shutdown_timeout: float = 10.0, **options: Any) -> AsyncIterator[Worker]:
    """Start a worker for ``app`` in this event loop, consuming once this returns; the
    block's end stops it warm (running tasks may finish within ``shutdown_timeout``).

    ``app`` must use ``broker_url="memory://"``; the client side (``delay``,
    ``result.get()``) is set up for the block too. ``options``: any other
    :class:`~aio_celery.worker.WorkerOptions` field. :class:`WorkerFailed` if the worker
    cannot start or ends with an error.
    """
    if not is_memory_url(app.conf.settings.broker_url):
        raise ValueError("aio_celery.testing.worker needs broker_url='memory://' (got another "
                         "broker: run a real worker against it instead)")
    options = {"hostname": "testing@memory", "banner": False, "heartbeat_interval": None,
               **options}
    running = Worker(app, WorkerOptions(concurrency=concurrency, queues=queues,
                                        shutdown_timeout=shutdown_timeout, **options))
    async with app.setup():
        task = asyncio.ensure_future(running.run())
        await asyncio.sleep(0)  # run() creates its events before its first await
        if running.consuming is None:
            raise RuntimeError("the worker did not start its run")
        consuming = asyncio.ensure_future(running.consuming.wait())
        await asyncio.wait([task, consuming], return_when=asyncio.FIRST_COMPLETED)
        # On memory:// nothing in the worker's start-up after "consuming" waits for I/O:
        # by now its session is in place too.
        consuming.cancel()
        if task.done():
            code = task.result()
            raise WorkerFailed(f"the in-process worker did not start (exit code {code}; "
                               "its log says why)", code)
        try:
            yield running
        finally:
            running.request_stop()
            code = await task
        if code != exitcodes.OK:
            raise WorkerFailed(f"the in-process worker exited with code {code}", code)


def reset() -> None:
    """Forget every ``memory://`` queue and result (between tests)."""
    memory.reset()
