"""aio-celery: an asyncio implementation of the Celery protocol.

Send tasks to, and run tasks for, a Celery fleet: Celery protocol v2 messages over
RabbitMQ, results in Celery's Redis backend format.
"""

from __future__ import annotations

from aio_celery import exceptions, states
from aio_celery.app import Celery, current_app, shared_task
from aio_celery.canvas import GroupResult, Signature, chain, group
from aio_celery.result import AsyncResult
from aio_celery.task import Context, Task, current_request, current_task

__version__ = "0.1.0"

signature = Signature

__all__ = [
    "AsyncResult",
    "Celery",
    "Context",
    "GroupResult",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "current_app",
    "current_request",
    "current_task",
    "exceptions",
    "group",
    "shared_task",
    "signature",
    "states",
]
