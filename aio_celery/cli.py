"""The ``aio_celery`` command: a thin layer that parses, configures logging and hands over."""

from __future__ import annotations

import dataclasses
import sys

import click

from aio_celery import exitcodes
from aio_celery.worker.options import WorkerOptions

_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aio-celery")
def main() -> None:
    """aio-celery: run asyncio Celery tasks."""


def _queues(_ctx: click.Context, _param: click.Parameter,
            value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(q.strip() for item in value for q in item.split(",") if q.strip())


@main.command()
@click.argument("app")
@click.option("--concurrency", default=100, show_default=True, type=click.IntRange(min=1),
              help="Tasks running at once in each process.")
@click.option("-Q", "--queues", multiple=True, callback=_queues,
              help="Queues to consume, comma separated (default: task_default_queue).")
@click.option("-l", "--loglevel", default="INFO", show_default=True, type=_LEVELS)
@click.option("-n", "--hostname", default=None, help="Node name (default aio_celery@HOST).")
@click.option("--prefetch-multiplier", type=click.IntRange(min=1), default=None,
              help="Prefetch = this x concurrency (default: worker_prefetch_multiplier).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds running tasks get on warm shutdown (default: "
                   "worker_shutdown_timeout, 25).")
@click.option("--eta-horizon", type=click.FloatRange(min=0.1), default=600.0,
              show_default=True,
              help="Tasks due further away than this many seconds wait on the broker in a "
                   "holding queue instead of in memory.")
@click.option("--max-tasks-per-child", type=click.IntRange(min=0), default=0,
              help="Exit (to be replaced) after this many tasks; 0: never.")
@click.option("--max-memory-per-child", type=click.IntRange(min=0), default=0,
              help="Exit (to be replaced) above this resident memory in KiB; 0: never.")
@click.option("--burst", is_flag=True,
              help="Exit once the queues are empty and no task is running.")
@click.option("--log-config/--no-log-config", default=True, show_default=True,
              help="Configure logging to stderr (turn off to keep your own set-up).")
def worker(app: str, concurrency: int, queues: tuple[str, ...], loglevel: str,
           hostname: str | None, prefetch_multiplier: int | None,
           shutdown_timeout: float | None, eta_horizon: float, max_tasks_per_child: int,
           max_memory_per_child: int, burst: bool, log_config: bool) -> None:
    """Run a worker for APP (module:attribute, e.g. proj.tasks:app)."""
    from aio_celery import logs
    from aio_celery.loader import AppLoadError, load_app
    from aio_celery.worker.process import run_worker

    if log_config:
        logs.configure(loglevel)
    options = WorkerOptions(
        concurrency=concurrency, queues=queues, burst=burst,
        prefetch_multiplier=prefetch_multiplier, shutdown_timeout=shutdown_timeout,
        eta_horizon=eta_horizon, max_tasks=max_tasks_per_child,
        max_memory_kib=max_memory_per_child)
    if hostname:
        options = dataclasses.replace(options, hostname=hostname)
    try:
        application = load_app(app)
    except AppLoadError as exc:
        click.echo(f"Error: cannot load the app: {exc}", err=True)
        sys.exit(exitcodes.APP_LOAD_ERROR)
    sys.exit(run_worker(application, options))
