"""The worker process: consume, execute and acknowledge Celery tasks on one event loop.

``Worker`` and ``install_signal_handlers`` are imported on first use, so that
``aio_celery.worker.options`` can be read without loading aio-pika (the supervisor does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aio_celery.worker.options import WorkerOptions

if TYPE_CHECKING:
    from aio_celery.worker.worker import Worker, install_signal_handlers


def __getattr__(name: str) -> Any:
    if name in ("Worker", "install_signal_handlers"):
        from aio_celery.worker import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'aio_celery.worker' has no attribute {name!r}")


__all__ = ["Worker", "WorkerOptions", "install_signal_handlers"]
