"""The ``aio_celery`` command: a thin layer that parses, configures logging and hands over."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys

import click

from aio_celery import defaults, exitcodes
from aio_celery.control import nodenames
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
@click.option("-c", "--processes", type=click.IntRange(min=1), default=None,
              help="Worker processes the supervisor forks (default: number of CPUs).")
@click.option("-P", "--pool", type=click.Choice(["processes", "solo"]), default="processes",
              show_default=True,
              help="processes: a supervisor forks --processes children; solo: one worker "
                   "in this process, no supervisor.")
@click.option("--concurrency", default=defaults.CONCURRENCY, show_default=True,
              type=click.IntRange(min=1),
              help="Tasks running at once in each process.")
@click.option("-Q", "--queues", multiple=True, callback=_queues,
              help="Queues to consume, comma separated (default: task_default_queue).")
@click.option("-l", "--loglevel", default="INFO", show_default=True, type=_LEVELS)
@click.option("-n", "--hostname", default=None,
              help="Node name template: %h host, %n its first label, %d its domain, %i the "
                   "child's index (0 alone), %I -INDEX (empty alone). Each child is a node "
                   "of its own; a template without %i/%I gets -INDEX after the name part. "
                   "Default aio_celery%I@%h: aio_celery-1@HOST, aio_celery-2@HOST...")
@click.option("--prefetch-multiplier", type=click.IntRange(min=1), default=None,
              help="Prefetch = this x concurrency (default: worker_prefetch_multiplier).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=None,
              help=f"Seconds running tasks get on warm shutdown (default "
                   f"{defaults.SHUTDOWN_TIMEOUT:g}; with -P solo the app's "
                   f"worker_shutdown_timeout). The supervisor kills children "
                   f"{defaults.WARM_GRACE:g} s after it.")
@click.option("--eta-horizon", type=click.FloatRange(min=0.1), default=defaults.ETA_HORIZON,
              show_default=True,
              help="Tasks due further away than this many seconds wait on the broker (a "
                   "holding queue, or native delayed delivery on quorum queues) instead of "
                   "in memory; so do nearer ones beyond prefetch minus concurrency. Below "
                   "--unacked-max-age.")
@click.option("--unacked-max-age", type=click.FloatRange(min=0), default=None,
              help="Give back a message still waiting to start this many seconds after its "
                   "delivery, and warn about a task running unacknowledged this long; keep "
                   "it below RabbitMQ's consumer_timeout (default: worker_unacked_max_age, "
                   f"{defaults.UNACKED_MAX_AGE:g}; 0: off).")
@click.option("--max-tasks-per-child", type=click.IntRange(min=0), default=0,
              help="Exit (to be replaced) after this many tasks; 0: never.")
@click.option("--max-memory-per-child", type=click.IntRange(min=0), default=0,
              help="Exit (to be replaced) above this resident memory in KiB; 0: never.")
@click.option("--max-task-deaths", type=click.IntRange(min=1), default=None,
              help="Retire a task (FAILURE WorkerLostError, message rejected to the queue's "
                   "dead-letter exchange) after its worker process died this many times "
                   f"while it ran (default: worker_max_task_deaths, "
                   f"{defaults.MAX_TASK_DEATHS}).")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=1),
              default=defaults.HEARTBEAT_TIMEOUT,
              show_default=True,
              help="Kill and replace a child whose event loop has not beaten for this long.")
@click.option("--startup-timeout", type=click.FloatRange(min=1),
              default=defaults.STARTUP_TIMEOUT,
              show_default=True,
              help="Kill and replace a child that has not started consuming this long after "
                   "its start (a hanging app context, say); it counts as a crash. Time spent "
                   "waiting for an unreachable broker does not count.")
@click.option("--status-file", type=click.Path(dir_okay=False), default=None,
              help="Where the supervisor writes its status for `aio_celery health` "
                   "(default: $AIO_CELERY_STATUS_FILE or a per-user temp file).")
@click.option("-E", "--task-events", is_flag=True, default=None,
              help="Send task events (task-received, task-succeeded...) for monitors such "
                   "as Flower (default: worker_send_task_events; the enable_events remote "
                   "control command turns them on too).")
@click.option("--without-heartbeat", is_flag=True,
              help="Send no worker events (worker-online, worker-heartbeat, "
                   "worker-offline): monitors then never see the worker's nodes.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.1),
              default=defaults.HEARTBEAT_INTERVAL,
              show_default=True,
              help="Seconds between worker-heartbeat events (monitors call a node offline "
                   "after twice this without one).")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              envvar="AIO_CELERY_METRICS_PORT", show_envvar=True,
              help="Serve Prometheus metrics of the whole worker (every child and the "
                   "supervisor) at http://<--metrics-bind>:PORT/metrics. Needs the "
                   "[prometheus] extra: pip install 'aio-celery[prometheus]'.")
@click.option("--metrics-bind", default="0.0.0.0", show_default=True,
              envvar="AIO_CELERY_METRICS_BIND", show_envvar=True,
              help="Address /metrics listens on: all interfaces by default, as exporters "
                   "do (Prometheus scrapes the pod from outside); 127.0.0.1 keeps it local.")
@click.option("--burst", is_flag=True,
              help="Exit once the queues are empty and no task is running.")
@click.option("--log-config/--no-log-config", default=True, show_default=True,
              help="Configure logging to stderr (turn off to keep your own set-up).")
def worker(app: str, processes: int | None, pool: str, concurrency: int,
           queues: tuple[str, ...], loglevel: str, hostname: str | None,
           prefetch_multiplier: int | None, shutdown_timeout: float | None,
           eta_horizon: float, unacked_max_age: float | None, max_tasks_per_child: int,
           max_memory_per_child: int,
           max_task_deaths: int | None, heartbeat_timeout: float, startup_timeout: float,
           status_file: str | None, task_events: bool | None, without_heartbeat: bool,
           heartbeat_interval: float, metrics_port: int | None, metrics_bind: str,
           burst: bool, log_config: bool) -> None:
    """Run workers for APP (module:attribute, e.g. proj.tasks:app).

    By default a supervisor forks --processes children, each running up to --concurrency
    tasks on its own event loop. SIGTERM/SIGINT: warm shutdown (also when sent to the whole
    process group, as Ctrl-C is); a second one or SIGQUIT: cold; SIGHUP: rolling restart;
    SIGTTIN/SIGTTOU: one child more/less; SIGUSR1: log running tasks.

    An unreachable broker (at start-up or later) is retried for ever by default (the app's
    broker_connection_max_retries and broker_connection_retry_on_startup); meanwhile the
    children stay alive and `aio_celery health --ready` fails. A refused login or a
    missing vhost exits 4 at once.
    """
    from aio_celery import logs
    from aio_celery.metrics import MetricsUnavailable, require_prometheus_client

    if metrics_port is not None:
        try:
            require_prometheus_client()
        except MetricsUnavailable as exc:
            raise click.UsageError(f"--metrics-port: {exc}") from exc
    metrics = None if metrics_port is None else (metrics_port, metrics_bind)
    if log_config:
        logs.configure(loglevel, label="supervisor" if pool == "processes" else "MainProcess")
    options = WorkerOptions(
        concurrency=concurrency, queues=queues, burst=burst,
        prefetch_multiplier=prefetch_multiplier, shutdown_timeout=shutdown_timeout,
        eta_horizon=eta_horizon, unacked_max_age=unacked_max_age,
        max_tasks=max_tasks_per_child,
        max_memory_kib=max_memory_per_child, max_task_deaths=max_task_deaths,
        task_events=task_events,
        heartbeat_interval=None if without_heartbeat else heartbeat_interval)
    template = hostname or nodenames.DEFAULT_TEMPLATE
    try:
        solo_name = nodenames.expand(template, socket.gethostname())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'-n' / '--hostname'") from None
    if pool == "processes":
        sys.exit(_supervise(app, options, processes, loglevel, log_config,
                            (heartbeat_timeout, startup_timeout), status_file, template,
                            metrics))
    sys.exit(_solo(app, dataclasses.replace(options, hostname=solo_name), metrics))


def _supervise(app: str, options: WorkerOptions, processes: int | None, loglevel: str,
               log_config: bool, timeouts: tuple[float, float], status_file: str | None,
               node_template: str, metrics: tuple[int, str] | None) -> int:
    """``timeouts``: (heartbeat, start-up) in seconds; ``metrics``: (port, bind)."""
    from supervisor import ChildSpec, Supervisor, SupervisorOptions
    from supervisor.metrics import MetricsOptions
    from supervisor.status import default_status_path

    count = processes or os.cpu_count() or 1
    spec = ChildSpec(app_spec=app, worker=options, loglevel=loglevel, log_config=log_config,
                     processes=count, node_template=node_template,
                     metrics=metrics is not None)
    shutdown = options.shutdown_timeout if options.shutdown_timeout is not None \
        else defaults.SHUTDOWN_TIMEOUT
    # Children and supervisor must agree on the bound, or the supervisor would SIGKILL a
    # child in the middle of a longer warm shutdown taken from the app's settings.
    options = dataclasses.replace(options, shutdown_timeout=shutdown)
    return Supervisor(SupervisorOptions(
        spec=spec, processes=count, shutdown_timeout=shutdown,
        heartbeat_timeout=timeouts[0], startup_timeout=timeouts[1],
        status_file=status_file or default_status_path(),
        metrics=None if metrics is None else MetricsOptions(*metrics))).run()


def _solo(app: str, options: WorkerOptions, metrics: tuple[int, str] | None) -> int:
    from aio_celery import preflight
    from aio_celery.exceptions import ConfigurationError
    from aio_celery.loader import AppLoadError, load_app
    from aio_celery.metrics import PrometheusRecorder, serve_solo
    from aio_celery.worker.process import run_worker

    try:
        application = load_app(app)
    except AppLoadError as exc:
        click.echo(f"Error: cannot load the app: {exc}", err=True)
        return exitcodes.APP_LOAD_ERROR
    try:
        preflight.check_command(application.conf.settings)
    except ConfigurationError as exc:
        click.echo(f"Error: configuration error: {exc}", err=True)
        return exitcodes.STARTUP_ERROR
    recorder: PrometheusRecorder | None = None
    if metrics is not None:
        try:
            recorder = serve_solo(*metrics)
        except OSError as exc:
            click.echo(f"Error: cannot serve metrics on {metrics[1]} port {metrics[0]}: {exc}",
                       err=True)
            return exitcodes.STARTUP_ERROR
    return run_worker(application, options, recorder=recorder)


@main.command()
@click.option("--status-file", type=click.Path(dir_okay=False), default=None,
              help="The supervisor's status file (default: as `worker`).")
@click.option("--ready", is_flag=True,
              help="Also require every child to have its consumers attached (readiness).")
def health(status_file: str | None, ready: bool) -> None:
    """Probe a running supervisor (liveness; readiness with --ready); exit 0 if healthy.

    Reads the supervisor's status file only: it imports no app and opens no connection.
    """
    from supervisor.status import check_health, default_status_path

    healthy, reason = check_health(status_file or default_status_path(), ready)
    click.echo(reason, err=not healthy)
    sys.exit(exitcodes.OK if healthy else exitcodes.UNHEALTHY)
