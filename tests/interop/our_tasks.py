"""aio-celery tasks that a REAL Celery client calls (test-only module).

Run by ``python -m aio_celery worker ... tests.interop.our_tasks:app`` from the repository
root, with ``tests/interop`` on ``PYTHONPATH`` too (for :mod:`shared_exc`). Settings come
from the environment:

    AIO_CELERY_OURS_BROKER        amqp://...
    AIO_CELERY_OURS_BACKEND       redis://.../<db>
    AIO_CELERY_OURS_QUEUE         the queue the worker consumes (task_default_queue)
    AIO_CELERY_OURS_MAX_PRIORITY  optional: task_queue_max_priority
    AIO_CELERY_OURS_QUORUM        optional: a quorum queue with a topic exchange
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from shared_exc import SharedError

from aio_celery import Celery

PREFIX = "ours."

app = Celery("our_tasks")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_OURS_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_OURS_BACKEND", "redis://127.0.0.1:6379/15"),
    task_default_queue=os.environ.get("AIO_CELERY_OURS_QUEUE", "aio-celery-ours"),
)
if os.environ.get("AIO_CELERY_OURS_QUORUM"):
    app.conf.update(task_default_queue_type="quorum", task_default_exchange_type="topic")
if os.environ.get("AIO_CELERY_OURS_MAX_PRIORITY"):
    app.conf.update(task_queue_max_priority=int(os.environ["AIO_CELERY_OURS_MAX_PRIORITY"]))


@app.task(name=PREFIX + "add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name=PREFIX + "mul")
async def mul(x: int, y: int) -> int:
    return x * y


@app.task(name=PREFIX + "echo")
async def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@app.task(name=PREFIX + "length")
async def length(data: str) -> int:
    return len(data)


@app.task(name=PREFIX + "fail")
async def fail(code: str, detail: Any) -> None:
    raise SharedError(code, detail)


@app.task(name=PREFIX + "sleep")
async def sleep(seconds: float, value: Any = None) -> Any:
    await asyncio.sleep(seconds)
    return value


@app.task(name=PREFIX + "when", bind=True)
async def when(self: Any) -> dict[str, Any]:
    """When it ran (epoch seconds), the eta it was given and how it was delivered."""
    eta = self.request.eta
    delivery = self.request.delivery_info or {}
    return {"ran_at": time.time(), "eta": None if eta is None else eta.isoformat(),
            "exchange": delivery.get("exchange"), "routing_key": delivery.get("routing_key")}


@app.task(name=PREFIX + "paced", rate_limit="5/s")
async def paced() -> float:
    """When it started (epoch seconds): at most five a second start in this worker."""
    return time.time()


@app.task(name=PREFIX + "flaky", bind=True)
async def flaky(self: Any, succeed_after: int) -> dict[str, Any]:
    """Retries (0.1 s apart) until it has been retried ``succeed_after`` times."""
    if self.request.retries < succeed_after:
        await self.retry(countdown=0.1)
    return {"retries": self.request.retries, "id": self.request.id}


@app.task(name=PREFIX + "mark")
async def mark(key: str) -> str:
    """Record in Redis that it ran (for tasks whose result is ignored)."""
    await app.backend.client.set(key, "ran", ex=3600)
    return "marked"


@app.task(name=PREFIX + "record", bind=True)
async def record(self: Any, key: str, label: str) -> str:
    """Append ``label`` and the delivery priority to the Redis list ``key``."""
    priority = self.request.delivery_info.get("priority")
    await app.backend.client.rpush(key, f"{label}:{priority}")
    return label
