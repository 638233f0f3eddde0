"""Tasks for the metrics process test, run by ``python -m aio_celery worker -c 2
--metrics-port ...`` (configured from the environment like ``sup_tasks``). Each records in
Redis (hash ``<queue>:ran``) which pid ran it, so that the test knows both children
counted tasks."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aio_celery import Celery

QUEUE = os.environ.get("AIO_CELERY_SUP_QUEUE", "aio-celery-metrics")

app = Celery("metrics_tasks")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_SUP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_SUP_BACKEND", "redis://127.0.0.1:6379/15"),
    task_default_queue=QUEUE,
)


async def _ran(task_id: str) -> None:
    await app.backend.client.hset(f"{QUEUE}:ran", task_id, os.getpid())


@app.task(name="metrics.ok", bind=True)
async def ok(self: Any, seconds: float) -> None:
    await _ran(str(self.request.id))
    await asyncio.sleep(seconds)


@app.task(name="metrics.fail", bind=True)
async def fail(self: Any, seconds: float) -> None:
    await _ran(str(self.request.id))
    await asyncio.sleep(seconds)
    raise ValueError("fails on purpose")
