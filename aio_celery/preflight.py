"""What a worker checks before it starts: settings it cannot use and libraries they need.

Each problem is a :class:`~aio_celery.exceptions.ConfigurationError` of one line that names
the setting and the fix. The supervisor runs the check once, in the child that validates
the app before any worker starts, so that a misconfigured app stops everything with exit
code 4 (``STARTUP_ERROR``) instead of a traceback in every child and a crash loop; each
worker runs it again at its own start-up (also with ``-P solo``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aio_celery.broker import RetryPolicy
from aio_celery.config import (
    BACKEND_SCHEMES,
    BROKER_SCHEMES,
    Settings,
    is_memory_url,
    mask_url,
    split_urls,
    url_problem,
)
from aio_celery.exceptions import ConfigurationError
from aio_celery.failover import STRATEGIES
from aio_celery.quorum import QueuePlan
from aio_celery.ratelimit import parse_rate

if TYPE_CHECKING:
    from aio_celery.worker.options import WorkerOptions


def check(settings: Settings, options: WorkerOptions | None = None) -> None:
    """Raise ConfigurationError for the first problem found; return if there is none.
    ``options``: the worker's, checked together with the settings they complete."""
    if is_memory_url(settings.broker_url):
        _check_memory("broker_url", settings.broker_url)
    else:
        _check_url("broker_url", settings.broker_url, BROKER_SCHEMES, failover=True)
    if settings.broker_failover_strategy not in STRATEGIES:
        raise ConfigurationError(
            f"broker_failover_strategy={settings.broker_failover_strategy!r}: use one of "
            f"{', '.join(map(repr, STRATEGIES))}")
    QueuePlan.from_settings(settings).check()
    RetryPolicy.from_settings(settings.task_publish_retry, settings.task_publish_retry_policy)
    try:
        parse_rate(settings.task_default_rate_limit)
    except ValueError as exc:
        raise ConfigurationError(f"task_default_rate_limit: {exc}") from None
    if options is not None:
        _check_max_age(settings, options)
    if is_memory_url(settings.result_backend):
        _check_memory("result_backend", settings.result_backend)
    elif settings.result_backend:
        _check_url("result_backend", settings.result_backend, BACKEND_SCHEMES)
        try:
            import redis.asyncio  # noqa: F401 - loaded now, not in the middle of a task
        except ImportError:
            raise ConfigurationError(
                "result_backend is set but redis-py cannot be imported: "
                "pip install 'aio-celery[redis]' (or unset result_backend)") from None


def check_command(settings: Settings) -> None:
    """What the ``aio-celery worker`` command refuses besides :func:`check`: memory://,
    whose queues no other process can publish to (aio_celery.testing runs it in-process)."""
    for setting in ("broker_url", "result_backend"):
        if is_memory_url(getattr(settings, setting)):
            raise ConfigurationError(
                f"{setting} memory:// lives in one process: a worker started by the command "
                "could never see a task; run it in your tests with aio_celery.testing.worker")


def _check_url(setting: str, url: object, schemes: tuple[str, ...], *,
               failover: bool = False) -> None:
    if not isinstance(url, str):
        raise ConfigurationError(f"{setting} must be a URL string, not {type(url).__name__}")
    problem = url_problem(url, schemes, failover=failover)
    if problem is not None:
        raise ConfigurationError(f"{setting} {mask_url(url)}: {problem}")


def _check_memory(setting: str, url: str) -> None:
    if len(split_urls(url)) > 1:
        raise ConfigurationError(f"{setting}: memory:// is a single in-process broker; it "
                                 "cannot be part of a failover list")


def _check_max_age(settings: Settings, options: WorkerOptions) -> None:
    from aio_celery.worker import aging

    value = settings.worker_unacked_max_age
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or value < 0):
        raise ConfigurationError(f"worker_unacked_max_age must be a number of seconds (0 or "
                                 f"None: off), not {value!r}")
    problem = aging.problem(options.max_age(value), options.eta_horizon)
    if problem is not None:
        raise ConfigurationError(problem)
