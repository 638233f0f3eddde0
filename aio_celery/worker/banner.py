"""The start-up banner: what this worker is connected to and will run (passwords masked)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aio_celery import __version__
from aio_celery.config import mask_url

if TYPE_CHECKING:
    from aio_celery.app import Celery
    from aio_celery.worker.options import WorkerOptions


def banner(app: Celery, options: WorkerOptions, queues: tuple[str, ...],
           prefetch_count: int) -> str:
    settings = app.conf.settings
    tasks = sorted(app.tasks) or ["(none registered)"]
    lines = [
        f"aio-celery {__version__} worker {options.hostname} (pid {os.getpid()})",
        f"  app:         {app.main or '__main__'}",
        f"  broker:      {mask_url(settings.broker_url)}",
        f"  results:     {mask_url(settings.result_backend) or 'disabled'}",
        f"  concurrency: {options.concurrency} (prefetch {prefetch_count})",
        f"  queues:      {', '.join(queues)}",
        "  tasks:",
        *(f"    . {name}" for name in tasks),
    ]
    return "\n".join(lines)
