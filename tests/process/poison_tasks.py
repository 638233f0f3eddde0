"""Tasks for the poison-guard tests, run by ``python -m aio_celery worker -c N``.

Started as ``tests.process.poison_tasks:app`` from the repository root; from the
environment: ``AIO_CELERY_SUP_BROKER``, ``AIO_CELERY_SUP_BACKEND`` and ``AIO_CELERY_SUP_QUEUE``
(as ``sup_tasks``), and ``AIO_CELERY_SUP_QUEUE_TYPE`` (classic by default). The queue is
declared with a dead-letter exchange: the default exchange, routing key ``<queue>-dlx`` (the
test declares that queue).

Every run of every task is counted in the Redis hash ``<queue>:runs`` (task id -> runs); an
innocent task's completion in ``<queue>:done``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aio_celery import Celery

QUEUE = os.environ.get("AIO_CELERY_SUP_QUEUE", "aio-celery-poison")

app = Celery("poison_tasks")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_SUP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_SUP_BACKEND", "redis://127.0.0.1:6379/15"),
    task_default_queue=QUEUE,
    task_queue_arguments={"x-dead-letter-exchange": "",
                          "x-dead-letter-routing-key": f"{QUEUE}-dlx"},
    task_default_queue_type=os.environ.get("AIO_CELERY_SUP_QUEUE_TYPE", "classic"),
)


async def _ran(task_id: str) -> None:
    await app.backend.client.hincrby(f"{QUEUE}:runs", task_id, 1)


@app.task(name="poison.ok", bind=True)
async def ok(self: Any, seconds: float) -> str:
    task_id = str(self.request.id)
    await _ran(task_id)
    await asyncio.sleep(seconds)
    await app.backend.client.hincrby(f"{QUEUE}:done", task_id, 1)
    return task_id


@app.task(name="poison.exit", bind=True)
async def exit_process(self: Any, after: float) -> None:
    """Ends its worker process with exit code 0 (as if it called a C library's exit)."""
    await _ran(str(self.request.id))
    await asyncio.sleep(after)
    os._exit(0)


@app.task(name="poison.segfault", bind=True)
async def segfault(self: Any, after: float) -> None:
    """Crashes its worker process with SIGSEGV (as a broken C extension would)."""
    import ctypes

    await _ran(str(self.request.id))
    await asyncio.sleep(after)
    ctypes.string_at(0)  # reads address 0


@app.task(name="poison.block", bind=True)
async def block(self: Any, seconds: float) -> None:
    """Blocks the event loop until the supervisor's heartbeat check kills the process."""
    await _ran(str(self.request.id))
    time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point
