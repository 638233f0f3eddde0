"""Tasks for the shared rate limit test, run by ``python -m aio_celery worker -c N``.

Started as ``tests.process.rate_tasks:app`` from the repository root; from the environment:
``AIO_CELERY_SUP_BROKER``, ``AIO_CELERY_SUP_BACKEND`` and ``AIO_CELERY_SUP_QUEUE`` (as
``sup_tasks``). Each start of ``rate.tick`` appends ``<monotonic clock> <pid>`` to the Redis
list ``<queue>:ticks`` (CLOCK_MONOTONIC is the same in every process of the machine).
"""

from __future__ import annotations

import os
import time

from aio_celery import Celery

QUEUE = os.environ.get("AIO_CELERY_SUP_QUEUE", "aio-celery-rates")
#: the rate the test checks: for every child of one worker together
RATE = "5/s"

app = Celery("rate_tasks")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_SUP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_SUP_BACKEND", "redis://127.0.0.1:6379/15"),
    task_default_queue=QUEUE,
)


@app.task(name="rate.tick", rate_limit=RATE)
async def tick() -> int:
    started = time.monotonic()
    await app.backend.client.rpush(f"{QUEUE}:ticks", f"{started} {os.getpid()}")
    return os.getpid()
