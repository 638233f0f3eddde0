"""aio-celery: an asyncio implementation of the Celery protocol.

Send tasks to, and run tasks for, a Celery fleet: Celery protocol v2 messages over
RabbitMQ, results in Celery's Redis backend format.

Names are imported on first use, so that light modules (``aio_celery.exitcodes``, the
health probe) load without pulling in aio-pika.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aio_celery import exceptions, states
    from aio_celery.app import Celery, current_app, shared_task
    from aio_celery.canvas import GroupResult, Signature, chain, chord, group
    from aio_celery.canvas import Signature as signature
    from aio_celery.result import AsyncResult
    from aio_celery.task import Context, Task, current_request, current_task

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncResult": "aio_celery.result",
    "Celery": "aio_celery.app",
    "Context": "aio_celery.task",
    "GroupResult": "aio_celery.canvas",
    "Signature": "aio_celery.canvas",
    "Task": "aio_celery.task",
    "chain": "aio_celery.canvas",
    "chord": "aio_celery.canvas",
    "current_app": "aio_celery.app",
    "current_request": "aio_celery.task",
    "current_task": "aio_celery.task",
    "group": "aio_celery.canvas",
    "shared_task": "aio_celery.app",
    "signature": "aio_celery.canvas:Signature",
    "exceptions": "aio_celery.exceptions:",
    "states": "aio_celery.states:",
}


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'aio_celery' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = module if target.endswith(":") else getattr(module, attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AsyncResult",
    "Celery",
    "Context",
    "GroupResult",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "chord",
    "current_app",
    "current_request",
    "current_task",
    "exceptions",
    "group",
    "shared_task",
    "signature",
    "states",
]
