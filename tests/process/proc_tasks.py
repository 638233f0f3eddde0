"""Tasks for the worker-process tests, run by ``python -m aio_celery worker`` subprocesses.

Started as ``tests.process.proc_tasks:app`` from the repository root; the broker, result
backend and queue come from the environment:

    AIO_CELERY_PROC_BROKER   amqp://...
    AIO_CELERY_PROC_BACKEND  redis://.../<db>
    AIO_CELERY_PROC_QUEUE    the queue the worker consumes
"""

from __future__ import annotations

import asyncio
import os

from aio_celery import Celery

#: a task writes ``STARTED_PREFIX + <task id>`` to Redis when it starts running
STARTED_PREFIX = "aio-celery-test-proc-started-"

app = Celery("proc_tasks")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_PROC_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_PROC_BACKEND", "redis://127.0.0.1:6379/15"),
    task_default_queue=os.environ.get("AIO_CELERY_PROC_QUEUE", "aio-celery-proc"),
)


@app.task(name="proc.sleep", bind=True)
async def sleep(self, seconds: float, value: object = None) -> object:
    await app.backend.client.set(STARTED_PREFIX + str(self.request.id), "1", ex=3600)
    await asyncio.sleep(seconds)
    return value


@app.task(name="proc.sends")
async def sends() -> list[object]:
    """Whether aio-pika (or aiormq) was loaded before this task sent one, whether it is
    after (neither should be: a worker publishes on its own client), the id of the one
    it sent, and how many client publishers (``aio_celery.broker.Broker``) exist in this
    process (none should: the app builds its own only on a first client publish)."""
    import gc
    import sys

    from aio_celery.broker import Broker

    def loaded() -> bool:
        return "aio_pika" in sys.modules or "aiormq" in sys.modules

    before = loaded()
    sent = await sleep.delay(0, "sent by proc.sends")
    brokers = sum(isinstance(thing, Broker) for thing in gc.get_objects())
    return [before, loaded(), sent.id, brokers]
