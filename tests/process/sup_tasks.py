"""Tasks for the supervisor tests, run by ``python -m aio_celery worker -c N`` subprocesses.

Started as ``tests.process.sup_tasks:app`` from the repository root; everything comes from
the environment:

    AIO_CELERY_SUP_BROKER    amqp://...
    AIO_CELERY_SUP_BACKEND   redis://.../<db>   (results, and the bookkeeping below)
    AIO_CELERY_SUP_QUEUE     the queue the workers consume; also the Redis key prefix
    AIO_CELERY_SUP_QUEUE_TYPE     if set: ``task_default_queue_type`` ("quorum" for the
                                  cluster test)
    AIO_CELERY_SUP_CHILD_EXIT     if set: every child calls ``os._exit(<value>)`` from its
                                  ``worker_process_init`` receiver (the parent, which only
                                  imports this module, is unaffected)
    AIO_CELERY_SUP_CONTEXT_FAIL   if set: the app context raises (a start-up error)

Bookkeeping (Redis hashes keyed by task id, names prefixed with the queue, see :func:`keys`):
``started`` maps a task to the pid that first started it; when it finishes, ``done`` maps it
to the pid that completed it and ``count`` counts its completions -- so "every task completed
exactly once" and "the killed child's tasks were completed by another process" are checkable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from aio_celery import Celery, signals

QUEUE = os.environ.get("AIO_CELERY_SUP_QUEUE", "aio-celery-sup")

app = Celery("sup_tasks")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_SUP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_SUP_BACKEND", "redis://127.0.0.1:6379/15"),
    task_default_queue=QUEUE,
)
if os.environ.get("AIO_CELERY_SUP_QUEUE_TYPE"):
    app.conf.update(task_default_queue_type=os.environ["AIO_CELERY_SUP_QUEUE_TYPE"])


def keys(queue: str) -> dict[str, str]:
    """The Redis keys the tasks of ``queue`` write (shared with the tests)."""
    return {"started": f"{queue}:started", "done": f"{queue}:done",
            "count": f"{queue}:count", "first": f"{queue}:first-delivery:"}


KEYS = keys(QUEUE)


@signals.worker_process_init.connect
def _maybe_exit(**_: Any) -> None:
    code = os.environ.get("AIO_CELERY_SUP_CHILD_EXIT")
    if code:
        os._exit(int(code))


if os.environ.get("AIO_CELERY_SUP_CONTEXT_FAIL"):
    @app.define_app_context
    @contextlib.asynccontextmanager
    async def _failing_context() -> AsyncIterator[dict[str, Any]]:
        raise RuntimeError("app context refuses to start 5150")
        yield {}  # pragma: no cover


async def _started(task_id: str) -> None:
    await app.backend.client.hsetnx(KEYS["started"], task_id, os.getpid())


async def _done(task_id: str) -> None:
    client = app.backend.client
    await client.hincrby(KEYS["count"], task_id, 1)
    await client.hset(KEYS["done"], task_id, os.getpid())


async def _first_delivery(task_id: str) -> bool:
    """True only the first time a task with this id asks (a Redis flag)."""
    return bool(await app.backend.client.set(KEYS["first"] + task_id, "1", nx=True, ex=3600))


@app.task(name="sup.sleep", bind=True)
async def sleep(self: Any, seconds: float) -> float:
    task_id = str(self.request.id)
    await _started(task_id)
    await asyncio.sleep(seconds)
    await _done(task_id)
    return seconds


@app.task(name="sup.cancellable", bind=True)
async def cancellable(self: Any, seconds: float) -> float:
    """Sleeps; records ``<queue>:cancelled`` -> its pid if CancelledError reaches it (a
    ``revoke --terminate``), then lets it through."""
    task_id = str(self.request.id)
    await _started(task_id)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.shield(app.backend.client.hset(f"{QUEUE}:cancelled", task_id,
                                                     os.getpid()))
        raise
    await _done(task_id)
    return seconds


@app.task(name="sup.noop", bind=True)
async def noop(self: Any) -> None:
    task_id = str(self.request.id)
    await _started(task_id)
    await _done(task_id)


@app.task(name="sup.block", bind=True)
async def block(self: Any, seconds: float) -> str:
    """Blocks the event loop with ``time.sleep`` -- on its first delivery only."""
    task_id = str(self.request.id)
    await _started(task_id)
    if await _first_delivery(task_id):
        time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point
    await _done(task_id)
    return str(os.getpid())


@app.task(name="sup.crash", bind=True)
async def crash(self: Any) -> str:
    """SIGKILLs its own process -- on its first delivery only."""
    task_id = str(self.request.id)
    await _started(task_id)
    if await _first_delivery(task_id):
        os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(10)  # pragma: no cover - the signal arrives first
    await _done(task_id)
    return str(os.getpid())


@app.task(name="sup.block_first", bind=True)
async def block_first(self: Any, seconds: float, times: int) -> str:
    """Blocks the event loop with ``time.sleep`` on its first ``times`` deliveries."""
    task_id = str(self.request.id)
    await _started(task_id)
    delivery = await app.backend.client.incr(KEYS["first"] + "n:" + task_id)
    if delivery <= times:
        time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point
    await _done(task_id)
    return str(os.getpid())
