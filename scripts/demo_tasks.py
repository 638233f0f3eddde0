"""Sample tasks for ``scripts/demo`` (broker, backend and queue come from the environment)."""

from __future__ import annotations

import asyncio
import os

from aio_celery import Celery

app = Celery("demo")
app.conf.update(
    broker_url=os.environ.get("AIO_CELERY_DEMO_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("AIO_CELERY_DEMO_REDIS", "redis://127.0.0.1:6379/0"),
    task_default_queue=os.environ.get("AIO_CELERY_DEMO_QUEUE", "aio-celery-demo"),
    result_expires=600,
)


@app.task(name="demo.add")
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0.2)
    return x + y


@app.task(name="demo.mul")
async def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="demo.fail")
async def fail(reason: str) -> None:
    raise ValueError(reason, 42)


@app.task(name="demo.flaky", bind=True, max_retries=3)
async def flaky(self, succeed_on: int) -> str:  # type: ignore[no-untyped-def]
    if self.request.retries < succeed_on:
        await self.retry(countdown=0.2)
    return f"succeeded after {self.request.retries} retries (pid {os.getpid()})"


@app.task(name="demo.whoami", bind=True)
async def whoami(self) -> str:  # type: ignore[no-untyped-def]
    return self.request.hostname or "?"
