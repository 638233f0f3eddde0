"""The app's settings: one typed object, with Celery's setting names.

``app.conf.update(broker_url=..., result_backend=...)`` checks every name; an unknown one
is a :class:`~aio_celery.exceptions.ConfigurationError` (a ``ValueError``) that names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aio_celery.exceptions import ConfigurationError

#: A router: ``(name, args, kwargs, options, task=None, **kw) -> dict | str | None``
RouterFn = Callable[..., Any]


@dataclasses.dataclass
class Settings:
    """Every setting aio-celery reads, with its default."""

    broker_url: str = "amqp://guest:guest@localhost:5672//"
    #: seconds to wait for the broker to accept a connection
    broker_connection_timeout: float = 4.0
    #: seconds a publish may take, queueing and confirm included (None: no limit, like
    #: aio-pika; a limit counts from the call, so keep it large for big concurrent batches)
    broker_publish_timeout: float | None = None
    #: AMQP heartbeat in seconds (0 disables it)
    broker_heartbeat: int = 60
    result_backend: str | None = None
    #: seconds (or a timedelta) a result is kept in Redis; None keeps it forever
    result_expires: float | timedelta | None = 86400.0
    result_serializer: str = "json"
    task_serializer: str = "json"
    accept_content: list[str] = dataclasses.field(default_factory=lambda: ["json"])
    task_default_queue: str = "celery"
    task_default_priority: int | None = None
    #: declare queues with ``x-max-priority`` (Celery's setting of the same name)
    task_queue_max_priority: int | None = None
    task_routes: Any = None
    task_create_missing_queues: bool = True
    task_ignore_result: bool = False
    task_soft_time_limit: float | None = None
    task_time_limit: float | None = None
    #: aio-celery acknowledges after the task ran by default (Celery's default is False)
    task_acks_late: bool = True
    task_track_started: bool = False
    #: base for autoretry/``retry()`` without countdown, per task ``default_retry_delay``
    task_default_retry_delay: float = 180.0
    worker_prefetch_multiplier: int = 4
    #: seconds running tasks get to finish on warm shutdown (fits a 30 s Kubernetes grace)
    worker_shutdown_timeout: float = 25.0
    #: finished tasks that may wait, per worker process, for the result backend or the
    #: broker to take their result, chord part or follow-up messages (their messages stay
    #: unacknowledged meanwhile); no new task starts while this many wait
    worker_max_pending_results: int = 1000
    timezone: str = "UTC"
    enable_utc: bool = True

    def result_expires_seconds(self) -> int | None:
        """``result_expires`` as whole seconds for SETEX (None: keep forever)."""
        value = self.result_expires
        if value is None:
            return None
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
        return max(1, int(seconds)) if seconds > 0 else None


_FIELDS = {f.name for f in dataclasses.fields(Settings)}
_ONLY_JSON = ("task_serializer", "result_serializer")


class Config(Mapping[str, Any]):
    """``app.conf``: attribute and mapping access to :class:`Settings`, checked updates."""

    def __init__(self) -> None:
        self._settings = Settings()

    @property
    def settings(self) -> Settings:
        return self._settings

    def update(self, mapping: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        """Set several settings at once; unknown names raise before anything changes."""
        values = {**(mapping or {}), **kwargs}
        unknown = sorted(set(values) - _FIELDS)
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}; "
                f"known settings: {', '.join(sorted(_FIELDS))}"
            )
        for name in _ONLY_JSON:
            if name in values and values[name] != "json":
                raise ConfigurationError(f"{name}={values[name]!r}: aio-celery speaks JSON only")
        for name, value in values.items():
            setattr(self._settings, name, value)

    def config_from_object(self, obj: Any) -> None:
        """Take every known lowercase setting defined on ``obj`` (a module or object)."""
        self.update({name: getattr(obj, name) for name in _FIELDS if hasattr(obj, name)})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._settings, name)
        except AttributeError:
            raise AttributeError(f"unknown setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.update({name: value})

    def __getitem__(self, name: str) -> Any:
        if name not in _FIELDS:
            raise KeyError(name)
        return getattr(self._settings, name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_FIELDS))

    def __len__(self) -> int:
        return len(_FIELDS)


def first_set(*values: Any) -> Any:
    """The first value that is not None (explicit option > task option > app setting)."""
    return next((v for v in values if v is not None), None)


def mask_url(url: str | None) -> str:
    """The URL with its password replaced by ``***`` (for logs and error messages)."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
