"""The app's settings: one typed object, with Celery's setting names.

``app.conf.update(broker_url=..., result_backend=...)`` checks every name; an unknown one
is a :class:`~aio_celery.exceptions.ConfigurationError` (a ``ValueError``) that names it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from aio_celery import defaults
from aio_celery.exceptions import ConfigurationError


@dataclasses.dataclass
class Settings:
    """Every setting aio-celery reads, with its default."""

    broker_url: str = "amqp://guest:guest@localhost:5672//"
    #: the type of the ``celery_delayed_*`` queues a worker declares in quorum mode
    broker_native_delayed_delivery_queue_type: str = "quorum"
    #: seconds to wait for the broker to accept a connection
    broker_connection_timeout: float = 4.0
    #: the order in which the URLs of a ``;``-separated ``broker_url`` are tried:
    #: "round-robin" (as written, moving on after a lost one) or "shuffle"
    broker_failover_strategy: str = "round-robin"
    #: seconds a publish may take, queueing, a broker's block (resource alarm) and the
    #: confirm included; then it fails with BrokerConnectionError (None: no limit). It counts
    #: from the call, so keep it large for big concurrent batches
    broker_publish_timeout: float | None = 30.0
    #: a client publish that failed for a reason that may pass (the broker nacked it, as a
    #: quorum queue does while it elects a new leader; the connection was lost) is tried
    #: again, as Celery does; refusals and publish timeouts are not
    task_publish_retry: bool = True
    #: Celery's keys and defaults: max_retries 3, interval_start 0, interval_step 0.2,
    #: interval_max 0.2 (seconds); None: those
    task_publish_retry_policy: dict[str, Any] | None = None
    #: AMQP heartbeat in seconds, as proposed to the broker: the lower non-zero of ours and
    #: the broker's is used (AMQP's rule), so 0 only disables it if the broker's is 0 too
    broker_heartbeat: int = 60
    #: the worker's attempts to get a lost broker connection back (at start-up too, see
    #: below) before it exits BROKER_LOST; None or 0: for ever. Celery's default is 100;
    #: ours is for ever because restarting a worker does not bring a broker back: it only
    #: turns an outage into a crash loop (CrashLoopBackOff) that outlasts the broker's return
    broker_connection_max_retries: int | None = None
    #: a broker that is not up yet when the worker starts is retried like a lost one
    #: (Celery's default); False: exit 4 at once. A refused login or a missing vhost is
    #: exit 4 at once either way
    broker_connection_retry_on_startup: bool = True
    result_backend: str | None = None
    #: Celery's: ``apply_async``/``delay`` of a task (and of its signatures, chains and
    #: groups) run it here and now, returning a ready result (see ``aio_celery.eager``);
    #: ``send_task`` by name still sends, as in Celery
    task_always_eager: bool = False
    #: Celery's: an eagerly run task that fails raises from the call itself
    task_eager_propagates: bool = False
    #: seconds (or a timedelta) a result is kept in Redis; None keeps it forever
    result_expires: float | timedelta | None = 86400.0
    result_serializer: str = "json"
    task_serializer: str = "json"
    accept_content: list[str] = dataclasses.field(default_factory=lambda: ["json"])
    task_default_queue: str = "celery"
    task_default_priority: int | None = None
    #: declare queues with ``x-max-priority`` (Celery's setting of the same name)
    task_queue_max_priority: int | None = None
    #: more ``x-`` arguments every queue is declared with, e.g.
    #: ``{"x-dead-letter-exchange": "dlx"}`` (whoever declares the queue must use the same)
    task_queue_arguments: dict[str, Any] | None = None
    #: "classic" or "quorum" (Celery 5.5+): the default queue's type. A quorum queue is
    #: declared with ``x-queue-type: quorum`` and no ``x-max-priority``; with a non-direct
    #: exchange countdown/eta go through native delayed delivery (see the README)
    task_default_queue_type: str = "classic"
    #: the default queue's exchange type (same name as the queue); native delayed delivery
    #: needs a non-direct one, e.g. "topic"
    task_default_exchange_type: str = "direct"
    task_routes: Any = None
    task_create_missing_queues: bool = True
    #: "classic" or "quorum": the type of every other queue (routed to, or given with -Q)
    task_create_missing_queue_type: str = "classic"
    #: those queues' exchange type (None: direct)
    task_create_missing_queue_exchange_type: str | None = None
    task_ignore_result: bool = False
    task_soft_time_limit: float | None = None
    task_time_limit: float | None = None
    #: aio-celery acknowledges after the task ran by default (Celery's default is False)
    task_acks_late: bool = True
    #: the rate limit of every task that sets none ("10/s", "100/m", "1000/h", a number per
    #: second; None: no limit), per worker (all its processes together)
    task_default_rate_limit: str | int | float | None = None
    task_track_started: bool = False
    #: base for autoretry/``retry()`` without countdown, per task ``default_retry_delay``
    task_default_retry_delay: float = 180.0
    worker_prefetch_multiplier: int = defaults.PREFETCH_MULTIPLIER
    #: accepted for Celery compatibility: Celery turns global QoS off when it finds a quorum
    #: queue; aio-celery never uses global QoS, on any queue type
    worker_detect_quorum_queues: bool = True
    #: seconds running tasks get to finish on warm shutdown (fits a 30 s Kubernetes grace)
    worker_shutdown_timeout: float = defaults.SHUTDOWN_TIMEOUT
    #: a task whose worker process died this many times while it ran is retired: FAILURE
    #: WorkerLostError stored, message rejected to the queue's dead-letter exchange
    worker_max_task_deaths: int = defaults.MAX_TASK_DEATHS
    #: ignore every rate limit (Celery's setting): tasks start as soon as a slot is free
    worker_disable_rate_limits: bool = False
    #: finished tasks that may wait, per worker process, for the result backend or the
    #: broker to take their result, chord part or follow-up messages (their messages stay
    #: unacknowledged meanwhile); no new task starts while this many wait
    worker_max_pending_results: int = defaults.MAX_PENDING_RESULTS
    #: seconds since delivery after which a message still waiting to start (ready, kept
    #: back undecoded, or an eta in memory) is given back to the queue, and a running task that is
    #: still unacknowledged is warned about. RabbitMQ closes the channel (3.x) or cancels
    #: the consumer (4.3+ quorum queues) once a delivery stays unacknowledged past its
    #: ``consumer_timeout`` (30 min by default): keep this below it (25 min fits the
    #: default). None or 0: off (for a broker whose consumer_timeout is off)
    worker_unacked_max_age: float | None = defaults.UNACKED_MAX_AGE
    #: send task events (``task-received``, ``task-succeeded``...) for monitors such as
    #: Flower; the worker's ``-E`` does the same. Worker events (online, heartbeat,
    #: offline) are sent either way unless ``--without-heartbeat``
    worker_send_task_events: bool = False
    #: the topic exchange events are published to (Celery's default)
    event_exchange: str = "celeryev"
    #: accepted for Celery compatibility: events are JSON
    event_serializer: str = "json"
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
_ONLY_JSON = ("task_serializer", "result_serializer", "event_serializer")


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


#: URL schemes of ``broker_url`` (``pyamqp`` is Celery's name for the same protocol)
BROKER_SCHEMES = ("amqp", "amqps", "pyamqp")
#: URL schemes of ``result_backend``
BACKEND_SCHEMES = ("redis", "rediss", "unix")
#: where one URL of a ``;``-separated list (Celery's failover form) begins
_NEXT_URL = re.compile(r";(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")
_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
#: a query parameter whose value is a secret (redis-py's ``password=``, tokens, keys),
#: its value running up to the next parameter (a raw ``&`` or ``#`` in it is masked too)
_SECRET_PARAM = re.compile(
    r"(?i)([?&;][^=&;?#/]*(?:pass|pwd|secret|token|credential|api_?key|access_?key)"
    r"[^=&;?#/]*=).*?(?=[&;][^=&;?#/]*=|$)")


def mask_url(url: str | None) -> str:
    """The URL with every password replaced by ``***`` (for logs and error messages).

    Made to never let a password through rather than to parse: a password may hold
    ``/ # ? @ %`` unencoded (which URL parsers misread), so everything between the user
    name and the *last* ``@`` is masked; so are query parameters such as ``password=``,
    and each URL of a ``;``-separated failover list.
    """
    if not url:
        return ""
    return ";".join(_mask_one(part) for part in _NEXT_URL.split(url))


def _mask_one(url: str) -> str:
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    at = url.rfind("@")
    colon = url.find(":", start, at) if at > start else -1
    if colon != -1:
        url = f"{url[:colon]}:***{url[at:]}"
    return _SECRET_PARAM.sub(r"\1***", url)


#: the scheme of the in-process broker and result backend (aio_celery.memory)
MEMORY_SCHEME = "memory://"


def is_memory_url(url: str | None) -> TypeGuard[str]:
    """``memory://`` (or ``memory://name``): the in-process broker or result backend."""
    return url is not None and url.lstrip().startswith(MEMORY_SCHEME)


def split_urls(url: str) -> list[str]:
    """The URLs of a ``;``-separated failover list (Celery's form), blanks around them
    dropped; a single URL gives a list of one."""
    return [part.strip() for part in _NEXT_URL.split(url)]


def url_problem(url: str, schemes: tuple[str, ...], *, failover: bool = False) -> str | None:
    """Why ``url`` is not a readable URL with one of ``schemes``, in words that never quote
    it (it may hold a password); None when it is fine. With ``failover`` it may be a
    ``;``-separated list of such URLs (``broker_url``); each is checked."""
    urls = split_urls(url)
    if len(urls) > 1:
        if not failover:
            return "a ;-separated list of URLs (failover) is not supported here: give one URL"
        for number, one in enumerate(urls, 1):
            problem = url_problem(one, schemes)
            if problem is not None:
                return f"URL {number} of {len(urls)}: {problem}"
        return None
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        found = f"{scheme}://" if sep and _SCHEME.fullmatch(scheme + sep) else "something else"
        return f"it must start with {' or '.join(s + '://' for s in schemes)}, not {found}"
    try:
        _ = urlsplit(url).port  # raises for a port that is not a number
    except ValueError:
        return ("its port is not a number: a password with / # ? @ % in it must be "
                "percent-encoded (urllib.parse.quote(password, safe=''))")
    return None
