"""Run one worker as the whole process (the CLI's single-process mode, and each child the
supervisor forks): own event loop, signal handlers, exit code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aio_celery import exitcodes
from aio_celery.app import Celery
from aio_celery.metrics import Recorder
from aio_celery.poison import Guard
from aio_celery.ratelimit import SharedRates
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.worker import Worker, install_signal_handlers

logger = logging.getLogger("aio_celery.worker")


def run_worker(app: Celery, options: WorkerOptions,
               on_tick: Callable[[Worker], None] | None = None,
               guard: Guard | None = None, retire_signal: int | None = None,
               rates: SharedRates | None = None,
               recorder: Recorder | None = None) -> int:
    """Run a worker on a fresh event loop until it stops; return its exit code.

    ``retire_signal``: the signal by which a supervisor asks for a warm stop (see
    :func:`~aio_celery.worker.worker.install_signal_handlers`); None when run alone.
    ``rates``: the supervisor's rate limit buckets (None: this process's own).
    ``recorder``: its metrics (None: off)."""
    try:
        return asyncio.run(_serve(app, options, on_tick, guard, retire_signal, rates,
                                  recorder))
    except Exception:
        logger.exception("Worker crashed")
        return exitcodes.INTERNAL_ERROR


async def _serve(app: Celery, options: WorkerOptions,
                 on_tick: Callable[[Worker], None] | None, guard: Guard | None,
                 retire_signal: int | None, rates: SharedRates | None,
                 recorder: Recorder | None) -> int:
    worker = Worker(app, options, on_tick=on_tick, guard=guard, rates=rates,
                    recorder=recorder)
    install_signal_handlers(worker, retire_signal)
    return await worker.run()
