"""The start-up banner: what this worker is connected to and will run (passwords masked)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aio_celery import __version__
from aio_celery.config import mask_url

if TYPE_CHECKING:
    from aio_celery.app import Celery
    from aio_celery.failover import Failover
    from aio_celery.worker.options import WorkerOptions


def banner(app: Celery, options: WorkerOptions, queues: tuple[str, ...],
           prefetch_count: int, failover: Failover | None = None,
           task_events: bool = False) -> str:
    """``failover``: the broker URL in use, out of those of ``broker_url``;
    ``task_events``: whether task events are on now."""
    settings = app.conf.settings
    tasks = sorted(app.tasks) or ["(none registered)"]
    broker = mask_url(settings.broker_url) if failover is None else failover.masked
    if failover is not None and len(failover.urls) > 1:
        broker += f" (1 of {len(failover.urls)} URLs, failover {failover.strategy})"
    lines = [
        f"aio-celery {__version__} worker {options.hostname} (pid {os.getpid()})",
        f"  app:         {app.main or '__main__'}",
        f"  broker:      {broker}",
        f"  results:     {mask_url(settings.result_backend) or 'disabled'}",
        f"  concurrency: {options.concurrency} (prefetch {prefetch_count})",
        f"  queues:      {', '.join(queues)}",
        f"  events:      {_events(options, task_events, settings.event_exchange)}",
        "  tasks:",
        *(f"    . {name}" for name in tasks),
    ]
    return "\n".join(lines)


def _events(options: WorkerOptions, task_events: bool, exchange: str) -> str:
    interval = options.heartbeat_interval
    worker = f"worker events every {interval:g}s" if interval is not None \
        else "no worker events (--without-heartbeat)"
    tasks = "task events ON" if task_events else "task events OFF (-E to monitor tasks)"
    return f"{tasks}, {worker}, to {exchange}"
