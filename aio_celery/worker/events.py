"""The worker's event dispatcher and heartbeat: Celery's monitoring events, fire-and-forget.

Events must never slow the tasks, so nothing on a task's path awaits them:

* a task event is built (:mod:`aio_celery.events`) and appended to a buffer; the first one
  of a loop turn schedules one flush for the end of that turn, which sends every task
  event of the turn as one ``task.multi`` message (a JSON list, as a Celery worker with an
  event loop batches them) and each worker event as a message of its own;
* a flush writes to the worker's publishing connection without waiting for a confirm
  (:meth:`~aio_celery.publisher.WorkerPublisher.publish_nowait`). While that connection is
  not open (or ``celeryev`` not declared on it yet) a background task opens it and
  declares the exchange, with a growing pause after a failure; while the broker blocks it
  (a resource alarm) or the socket does not take what was written, events wait in the
  buffer. The buffer is bounded: what does not fit is dropped and counted
  (``Stats.events_dropped``); Flower only misses those events.

Worker events (``worker-online``, ``worker-heartbeat`` every ``interval``,
``worker-offline``) are sent while heartbeats are on, task events while
:attr:`EventDispatcher.tasks_on` is set (``-E``, or the ``enable_events`` control command).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from aio_celery import events
from aio_celery.clocks import LamportClock
from aio_celery.control.wire import ok
from aio_celery.exceptions import BrokerConnectionError, PublishRefusedError
from aio_celery.transport import WorkerPublishing
from aio_celery.worker.backoff import Backoff
from aio_celery.worker.stats import Stats

logger = logging.getLogger("aio_celery.worker")

#: events kept while they cannot be sent (no connection, a blocked or slow broker); more
#: are dropped. About 300 bytes each.
BUFFER_LIMIT = 10_000
#: task events in one ``task.multi`` message at most
BATCH_LIMIT = 500
#: bytes the publishing connection may have waiting to be written before events wait
BACKLOG_LIMIT = 1 << 20
#: pause after a failed attempt to open the connection or declare the exchange, doubling
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

#: ``() -> (active, processed)``: tasks running now, tasks started so far
Load = Callable[[], tuple[int, int]]


class EventDispatcher:
    """Builds, buffers and sends one worker process's events (node ``hostname``)."""

    def __init__(self, hostname: str, publisher: WorkerPublishing | None, stats: Stats, *,
                 exchange: str = events.EXCHANGE, task_events: bool = False,
                 load: Load = lambda: (0, 0), buffer_limit: int = BUFFER_LIMIT,
                 backlog_limit: int = BACKLOG_LIMIT, now: Callable[[], float] = time.time,
                 pid: int | None = None, clock: LamportClock | None = None,
                 on_dropped: Callable[[int], None] = lambda count: None) -> None:
        """Inert: nothing is sent before the first event. ``publisher`` None: events are
        built and dropped (counted), for a worker without a publishing connection.
        ``clock``: the process's Lamport clock, which its remote control mailbox moves
        too (none: one of its own). ``on_dropped(count)``: told of drops too (the
        metrics)."""
        self.hostname = hostname
        self.publisher = publisher
        self.stats = stats
        self.exchange = exchange
        #: the single check on a task's path: task events are built only while it is set
        self.tasks_on = task_events
        self.load = load
        self.on_dropped = on_dropped
        self.buffer_limit = buffer_limit
        self.backlog_limit = backlog_limit
        self.clock = clock if clock is not None else LamportClock()
        self._now = now
        self._stamp = events.Stamp(hostname, pid if pid is not None else os.getpid(),
                                   events.utcoffset())
        self._properties = events.properties(hostname)
        self._tasks: list[events.Event] = []
        self._workers: list[events.Event] = []
        self._flush_scheduled = False
        self._preparing: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._retry = Backoff(RETRY_FIRST, RETRY_MAX)
        self._refused = False

    # --- building ------------------------------------------------------------------------

    def task(self, type_: str, fields: dict[str, Any]) -> None:
        """Queue a task event (callers check :attr:`tasks_on` first: that is the cheap
        part when events are off)."""
        if len(self._tasks) + len(self._workers) >= self.buffer_limit:
            self._dropped(1)
            return
        self._tasks.append(events.event(type_, self._stamp, self._now(), self.clock.forward(),
                                        **fields))
        self._schedule()

    def worker(self, type_: str, freq: float) -> None:
        """Queue a worker event with the process's load."""
        if len(self._tasks) + len(self._workers) >= self.buffer_limit:
            self._dropped(1)
            return
        active, processed = self.load()
        # Taken again at each heartbeat rather than per event: a DST change is seen
        # within one interval, and task events cost no localtime() call.
        self._stamp = dataclasses.replace(self._stamp, utcoffset=events.utcoffset())
        self._workers.append(events.event(
            type_, self._stamp, self._now(), self.clock.forward(),
            **events.worker_fields(freq, active, processed, os.getloadavg())))
        self._schedule()

    @property
    def buffered(self) -> int:
        return len(self._tasks) + len(self._workers)

    # --- sending -------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what is buffered if the connection takes it now; else make it ready in the
        background (events wait, bounded, meanwhile)."""
        self._flush_scheduled = False
        if not self._tasks and not self._workers:
            return
        publisher = self.publisher
        if publisher is None or self._refused:
            self._drop_all()
            return
        if not publisher.exchange_ready(self.exchange):
            self._prepare(publisher)
            return
        while self._workers:
            first = self._workers[0]
            if not self._send(publisher, events.encode(first),
                              events.routing_key(first["type"])):
                return
            self._workers.pop(0)
        while self._tasks:
            batch = self._tasks[:BATCH_LIMIT]
            if not self._send(publisher, events.encode(batch), events.TASK_BATCH_KEY):
                return
            del self._tasks[:len(batch)]

    def _send(self, publisher: WorkerPublishing, body: bytes, routing_key: str) -> bool:
        try:
            return publisher.publish_nowait(body, self._properties, routing_key,
                                            self.exchange, backlog_limit=self.backlog_limit)
        except ConnectionError:  # lost in the meantime: the next flush reconnects
            return False

    def _drop_all(self) -> None:
        if self.buffered:
            self._dropped(self.buffered)
        self._tasks.clear()
        self._workers.clear()

    def _dropped(self, count: int) -> None:
        self.stats.events_dropped += count
        self.on_dropped(count)

    def _prepare(self, publisher: WorkerPublishing) -> None:
        """Open the publishing connection and declare the exchange, in the background (at
        most one attempt at a time, none during the pause after a failure)."""
        if self._preparing is not None or time.monotonic() < self._retry_at:
            return
        # An empty context: the attempt must not carry a task's request along.
        self._preparing = asyncio.get_running_loop().create_task(
            self._declare(publisher), name="declare the event exchange",
            context=contextvars.Context())

    async def _declare(self, publisher: WorkerPublishing) -> None:
        try:
            await publisher.declare_exchange(self.exchange, events.EXCHANGE_TYPE, durable=True)
        except PublishRefusedError as exc:
            self._refused = True
            logger.error("%s: this worker sends no monitoring events (is %r declared with "
                         "another type? Celery's is a durable topic exchange)", exc,
                         self.exchange)
            self._drop_all()
        except BrokerConnectionError as exc:
            retry_in = self._retry.next()
            self._retry_at = time.monotonic() + retry_in
            logger.debug("Events wait for the publishing connection (%s): next try in %.0fs",
                         exc, retry_in)
        else:
            self._retry.reset()
            self.flush()
        finally:
            self._preparing = None

    async def close(self, timeout: float) -> None:
        """Send what is buffered, waiting up to ``timeout`` seconds for the connection and
        the exchange (worker-offline at shutdown); what is still buffered then is dropped."""
        publisher = self.publisher
        if publisher is not None and not self._refused and self.buffered:
            self._retry_at = 0.0
            self.flush()
            if self._preparing is not None:
                await asyncio.wait([self._preparing], timeout=timeout)
            self.flush()
        if self._preparing is not None:
            self._preparing.cancel()
        self._drop_all()


class Heart:
    """``worker-online``, then ``worker-heartbeat`` every ``interval`` seconds, then
    ``worker-offline`` (Celery's ``Heart``)."""

    def __init__(self, dispatcher: EventDispatcher,
                 interval: float = events.HEARTBEAT_INTERVAL) -> None:
        self.dispatcher = dispatcher
        self.interval = interval
        self._beating: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._beating is None:
            self.dispatcher.worker("worker-online", self.interval)
            self._beating = asyncio.get_running_loop().create_task(
                self._beat(), name="worker heartbeat", context=contextvars.Context())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.dispatcher.worker("worker-heartbeat", self.interval)

    def stop(self) -> None:
        """Stop beating and queue ``worker-offline`` (sent by the dispatcher's close)."""
        if self._beating is not None:
            self._beating.cancel()
            self._beating = None
            self.dispatcher.worker("worker-offline", self.interval)


class RemoteEvents:
    """Remote control's side of the events (``EventsControl`` of
    :mod:`aio_celery.control.commands`): ``enable_events``, ``disable_events`` and
    ``heartbeat``, with Celery's replies."""

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.dispatcher = dispatcher

    def enable_task_events(self) -> dict[str, str]:
        if self.dispatcher.tasks_on:
            return ok("task events already enabled")  # Flower's every 5 s: no log line
        self.dispatcher.tasks_on = True
        logger.info("Events of group {task} enabled by remote.")
        return ok("task events enabled")

    def disable_task_events(self) -> dict[str, str]:
        if not self.dispatcher.tasks_on:
            return ok("task events already disabled")
        self.dispatcher.tasks_on = False
        logger.info("Events of group {task} disabled by remote.")
        return ok("task events disabled")

    def send_heartbeat(self, freq: float) -> None:
        self.dispatcher.worker("worker-heartbeat", freq)
