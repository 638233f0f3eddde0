"""The worker process: consume, execute and acknowledge Celery tasks on one event loop."""

from __future__ import annotations

from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.worker import Worker, install_signal_handlers

__all__ = ["Worker", "WorkerOptions", "install_signal_handlers"]
