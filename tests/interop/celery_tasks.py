"""Celery tasks for the interop tests, run by a REAL Celery worker (test-only module).

The worker is started as ``python -m celery -A celery_tasks worker ...`` with this folder on
``PYTHONPATH``; the broker, result backend and queue come from the environment:

    AIO_CELERY_INTEROP_BROKER   amqp://...
    AIO_CELERY_INTEROP_BACKEND  redis://.../<db>
    AIO_CELERY_INTEROP_QUEUE    the queue the worker consumes
    AIO_CELERY_INTEROP_QUORUM   optional: a quorum queue with a topic exchange

The tests import this module too, for :class:`InteropError`: a failure stored by the worker
names the module ``celery_tasks``, so both sides must import it under that name.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from celery import Celery

PREFIX = "interop."

app = Celery(
    "celery_tasks",
    broker=os.environ.get("AIO_CELERY_INTEROP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("AIO_CELERY_INTEROP_BACKEND", "redis://127.0.0.1:6379/15"),
    set_as_current=False,
)
app.conf.update(
    task_default_queue=os.environ.get("AIO_CELERY_INTEROP_QUEUE", "aio-celery-interop"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=True,
    # no pidbox queue left behind on the broker (the tests never use remote control)
    worker_enable_remote_control=False,
)
if os.environ.get("AIO_CELERY_INTEROP_QUORUM"):
    app.conf.update(task_default_queue_type="quorum", task_default_exchange_type="topic")


class InteropError(Exception):
    """A custom failure with two arguments."""

    def __init__(self, code: str, detail: Any) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


@app.task(name=PREFIX + "add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name=PREFIX + "mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name=PREFIX + "echo")
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@app.task(name=PREFIX + "digest")
def digest(data: str, **kwargs: Any) -> dict[str, Any]:
    return {"length": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest(),
            "kwargs": kwargs}


@app.task(name=PREFIX + "fail")
def fail(code: str, detail: Any) -> None:
    raise InteropError(code, detail)


@app.task(name=PREFIX + "divide")
def divide(x: int, y: int) -> float:
    return x / y


@app.task(name=PREFIX + "on_error")
def on_error(failed_task_id: str) -> str:
    """An old-style errback: Celery calls it with the failed task's id."""
    return f"errback for {failed_task_id}"


@app.task(name=PREFIX + "introspect", bind=True)
def introspect(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """What the Celery worker understood of the message it ran."""
    request = self.request
    delivery = request.delivery_info or {}
    return {
        "id": request.id,
        "task": request.task,
        "args": list(args),
        "kwargs": kwargs,
        "retries": request.retries,
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "group": request.group,
        "group_index": request.group_index,
        "eta": None if request.eta is None else str(request.eta),
        "expires": None if request.expires is None else str(request.expires),
        "timelimit": list(request.timelimit) if request.timelimit else None,
        "priority": delivery.get("priority"),
        "routing_key": delivery.get("routing_key"),
        "origin": request.origin,
        "reply_to": request.reply_to,
        "correlation_id": request.correlation_id,
    }


@app.task(name=PREFIX + "tsum")
def tsum(values: list[Any], *rest: Any) -> dict[str, Any]:
    """A chord body: the header's results (first argument, as Celery passes them)."""
    return {"sum": sum(values), "values": values, "rest": list(rest)}
