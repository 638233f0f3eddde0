"""Prometheus metrics of one worker process: a recorder the worker calls at each event.

:class:`Recorder` records nothing: it is what a worker runs with unless metrics are on, so
the hot path costs a method call and ``prometheus_client`` (the ``[prometheus]`` extra) is
never imported. :class:`PrometheusRecorder` counts into ``prometheus_client`` metrics; under
the supervisor they live in its multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, set by
the supervisor before the first fork), which the supervisor's exporter process serves as
one ``/metrics`` for the whole worker (see :mod:`supervisor.metrics`).

Labels stay bounded: ``task`` is a name registered in the app, or :data:`UNKNOWN_TASK`;
``outcome`` is one of :data:`OUTCOMES`.
"""

from __future__ import annotations

import bisect
import datetime
import importlib.util
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: the ``task`` label of messages whose task is not registered (or that cannot be decoded)
UNKNOWN_TASK = "unknown"

SUCCEEDED = "succeeded"
FAILED = "failed"
RETRIED = "retried"
#: unregistered task, or a message that is not a Celery task: rejected without requeue
REJECTED = "rejected"
#: expired before it started
REVOKED = "revoked"
#: the poison guard retired it (its worker process died too often while it ran)
RETIRED = "retired"
#: a bug of ours while handling it (logged with a traceback)
INTERNAL_ERROR = "internal_error"
OUTCOMES = (SUCCEEDED, FAILED, RETRIED, REJECTED, REVOKED, RETIRED, INTERNAL_ERROR)

#: seconds: tasks run from a millisecond to hours
RUNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0, 900.0, 3600.0)
#: seconds: a task waits from nothing (an idle worker) to a whole backlog's drain
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                      3600.0)

#: every metric a worker process exports, by name as it appears on ``/metrics`` (counters
#: with their ``_total``); the supervisor's own are in :mod:`supervisor.metrics`
WORKER_METRICS = {
    "aio_celery_tasks_total": "counter",
    "aio_celery_task_runtime_seconds": "histogram",
    "aio_celery_task_queue_wait_seconds": "histogram",
    "aio_celery_tasks_in_flight": "gauge",
    "aio_celery_tasks_prefetched": "gauge",
    "aio_celery_broker_reconnects_total": "counter",
    "aio_celery_result_store_retries_total": "counter",
    "aio_celery_events_dropped_total": "counter",
}

INSTALL_HINT = "pip install 'aio-celery[prometheus]'"


class MetricsUnavailable(RuntimeError):
    """Metrics were asked for, but prometheus_client is not installed."""


def require_prometheus_client() -> None:
    """Raise MetricsUnavailable, naming the extra to install, unless prometheus_client is
    importable. Does not import it: the supervisor must first set its multiprocess
    directory."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise MetricsUnavailable(f"metrics need prometheus_client: {INSTALL_HINT}")


class Recorder:
    """Records nothing: the worker's recorder while metrics are off."""

    enabled = False

    def task_started(self, name: str, arrived: float, eta: datetime.datetime | None,
                     clock: Callable[[], datetime.datetime]) -> None:
        """A task starts: it waited since its delivery (``arrived``, on
        ``time.monotonic()``), or since its ``eta`` if it has one (``clock``: the app's)."""

    def task_done(self, name: str, outcome: str, runtime: float | None) -> None:
        """A message was handled with ``outcome``; ``runtime``: its body ran that long."""

    def sample(self, in_flight: int, prefetched: int) -> None:
        """The session's tasks running, and delivered but not started (about once a
        second)."""

    def broker_reconnecting(self) -> None:
        """The consumer connection was lost: the worker reconnects."""

    def result_store_retried(self) -> None:
        """A finished task tried again to write to the result backend."""

    def events_dropped(self, count: int = 1) -> None:
        """Monitoring events (task and worker) that could not be sent and were dropped."""

    def flush(self) -> None:
        """Write what was recorded since the last flush to the metrics."""


class PrometheusRecorder(Recorder):
    """Counts into prometheus_client metrics, registered in ``registry`` (None: in no
    registry, as in the supervisor's children, whose multiprocess files are what is
    exported).

    Per-task events are gathered in plain dicts and written to the metrics by
    :meth:`flush` (the worker calls it every second, and as it exits): in multiprocess
    mode each write takes a lock, a ``getpid()`` and an mmap store, some 5 us for a
    counter and 13 for a histogram observation, which would more than double what the
    worker itself spends on a no-op task."""

    enabled = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._tasks = Counter("aio_celery_tasks", "Task messages handled, by outcome",
                              ["task", "outcome"], registry=registry)
        self._runtime = Histogram("aio_celery_task_runtime_seconds",
                                  "Time task bodies ran (succeeded, failed or retried)",
                                  ["task"], registry=registry, buckets=RUNTIME_BUCKETS)
        self._waited = Histogram(
            "aio_celery_task_queue_wait_seconds",
            "Time from delivery to this worker (or from the eta, for a task with one) to the "
            "task's start", ["task"], registry=registry, buckets=QUEUE_WAIT_BUCKETS)
        self._in_flight = Gauge("aio_celery_tasks_in_flight",
                                "Tasks running (or finished, waiting for the result backend "
                                "or the broker), their messages not yet acknowledged",
                                registry=registry, multiprocess_mode="livesum")
        self._prefetched = Gauge("aio_celery_tasks_prefetched",
                                 "Messages delivered, not started (waiting for a slot, their "
                                 "eta or their rate limit)", registry=registry,
                                 multiprocess_mode="livesum")
        self._reconnects = Counter("aio_celery_broker_reconnects",
                                   "Consumer connections lost to the broker and reopened",
                                   registry=registry)
        self._store_retries = Counter("aio_celery_result_store_retries",
                                      "Writes to the result backend tried again", registry=registry)
        self._dropped = Counter("aio_celery_events_dropped", "Monitoring events dropped",
                                registry=registry)
        # since the last flush: counts by (task, outcome); observations by task
        self._counts: dict[tuple[str, str], int] = {}
        self._runtimes: dict[str, _Observed] = {}
        self._waits: dict[str, _Observed] = {}

    def task_started(self, name: str, arrived: float, eta: datetime.datetime | None,
                     clock: Callable[[], datetime.datetime]) -> None:
        waited = ((clock() - eta).total_seconds() if eta is not None
                  else time.monotonic() - arrived)
        observed = self._waits.get(name)
        if observed is None:
            observed = self._waits[name] = _Observed(QUEUE_WAIT_BUCKETS)
        observed.add(max(0.0, waited))

    def task_done(self, name: str, outcome: str, runtime: float | None) -> None:
        key = (name, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
        if runtime is not None:
            observed = self._runtimes.get(name)
            if observed is None:
                observed = self._runtimes[name] = _Observed(RUNTIME_BUCKETS)
            observed.add(runtime)

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (name, outcome), count in counts.items():
            self._tasks.labels(name, outcome).inc(count)
        for histogram, gathered in ((self._runtime, self._runtimes),
                                    (self._waited, self._waits)):
            for name, observed in gathered.items():
                observed.write_to(histogram.labels(name))
        self._runtimes, self._waits = {}, {}

    def sample(self, in_flight: int, prefetched: int) -> None:
        self._in_flight.set(in_flight)
        self._prefetched.set(prefetched)

    def broker_reconnecting(self) -> None:
        self._reconnects.inc()

    def result_store_retried(self) -> None:
        self._store_retries.inc()

    def events_dropped(self, count: int = 1) -> None:
        self._dropped.inc(count)


class _Observed:
    """Observations of one histogram child since the last flush: a count per bucket (the
    last one for +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # value <= bound
        self.total += value

    def write_to(self, child: Any) -> None:
        """prometheus_client has no bulk observe(): a histogram child keeps its sum and a
        (non-cumulative) count per bucket as values, which are added to here, as observe()
        does (tests/unit/test_metrics_units.py checks the result against observe())."""
        child._sum.inc(self.total)
        for value, count in zip(child._buckets, self.counts, strict=True):
            if count:
                value.inc(count)


def serve_solo(port: int, bind: str) -> PrometheusRecorder:
    """``-P solo``: serve ``/metrics`` from a thread of this process (it never forks) with
    prometheus_client's default registry (so the app's own metrics and the process
    collector are there too); returns the recorder for the worker. OSError if the address
    cannot be bound."""
    from prometheus_client import REGISTRY, start_http_server

    start_http_server(port, bind, registry=REGISTRY)
    logging.getLogger("aio_celery.worker").info("Metrics on http://%s:%d/metrics", bind, port)
    return PrometheusRecorder(REGISTRY)
