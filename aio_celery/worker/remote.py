"""The worker process as a remote control node: what :mod:`aio_celery.control.commands`
asks of it, answered from the worker, its session and its runner.

Each process is a node of its own (its name from ``-n``, see
:mod:`aio_celery.control.nodenames`): ``inspect active`` lists the tasks of each child
under the child's name, and a revoke reaches every child through its own mailbox.
Requests that concern the whole worker (``shutdown``, ``pool_grow``, ``pool_shrink``) are
passed to the supervisor as the signals it already handles (SIGTERM, SIGTTIN, SIGTTOU);
a worker run alone (``-P solo``) stops itself and cannot grow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import time
from typing import TYPE_CHECKING, Any

from aio_celery import states
from aio_celery.backend import RedisBackend
from aio_celery.config import Settings, mask_url
from aio_celery.control import info, revoked
from aio_celery.control.commands import EventsControl
from aio_celery.control.wire import error
from aio_celery.exceptions import BackendError
from aio_celery.quorum import QueuePlan

if TYPE_CHECKING:
    from aio_celery.worker.worker import Worker

logger = logging.getLogger("aio_celery.worker")

#: states a revoke overwrites with REVOKED at once (Celery 5.7's ``_revoke``)
_REVOCABLE = frozenset({states.PENDING, states.RECEIVED, states.RETRY, "REJECTED"})
#: Celery's ``HIDDEN_SETTINGS``: the settings ``inspect conf`` shows as ``********``
_HIDDEN = re.compile("API|TOKEN|KEY|SECRET|PASS|PROFANITIES_LIST|SIGNATURE|DATABASE|"
                     "BEAT_DBURI", re.IGNORECASE)


class NoEvents:
    """A node without an event dispatcher (the worker gives its own): says so in each
    reply (Celery answers ``event dispatcher unavailable`` when it has none)."""

    def enable_task_events(self) -> dict[str, str]:
        return error("event dispatcher unavailable")

    def disable_task_events(self) -> dict[str, str]:
        return error("event dispatcher unavailable")

    def send_heartbeat(self, freq: float) -> None:
        logger.debug("Heartbeat requested by remote: no event dispatcher")


class WorkerNode:
    """:class:`aio_celery.control.commands.Node` for one worker process. ``events``: the
    event dispatcher's side of ``enable_events``/``disable_events``/``heartbeat``
    (:class:`NoEvents` until there is one)."""

    def __init__(self, worker: Worker, events: EventsControl | None = None) -> None:
        self.worker = worker
        self.app = worker.app
        self.nodename = worker.options.hostname
        self.events: EventsControl = events or NoEvents()
        self.started = time.monotonic()

    # --- inspect ------------------------------------------------------------------------

    def active(self, safe: bool) -> list[dict[str, Any]]:
        runner = self.worker.runner
        if runner is None:
            return []
        return [info.request_info(a.message, a.delivery_info, hostname=self.nodename,
                                  worker_pid=os.getpid(), time_start=a.time_start,
                                  acknowledged=a.acknowledged, safe=safe)
                for a in list(runner.active.values())]

    def _waiting(self, safe: bool, scheduled: bool) -> list[dict[str, Any]]:
        session = self.worker.session
        if session is None:
            return []
        entries = session.scheduled() if scheduled else session.reserved()
        result = []
        for message, delivery_info in entries:
            request = info.request_info(message, delivery_info, hostname=self.nodename,
                                        worker_pid=None, time_start=None, acknowledged=False,
                                        safe=safe)
            result.append(info.scheduled_info(message, request) if scheduled else request)
        return result

    def reserved(self, safe: bool) -> list[dict[str, Any]]:
        return self._waiting(safe, scheduled=False)

    def scheduled(self, safe: bool) -> list[dict[str, Any]]:
        return self._waiting(safe, scheduled=True)

    def stats(self) -> dict[str, Any]:
        worker = self.worker
        settings = self.app.conf.settings
        failover = worker.failover
        url = failover.in_use or failover.urls[0]
        session = worker.session
        return {
            "total": dict(worker.stats.total),
            "pid": os.getpid(),
            "clock": str(self.clock()),
            "uptime": int(time.monotonic() - self.started),
            "pool": {"implementation": "aio_celery.asyncio",
                     "max-concurrency": worker.options.concurrency,
                     "processes": [os.getpid()],
                     "max-tasks-per-child": worker.options.max_tasks or "N/A",
                     "timeouts": [settings.task_soft_time_limit or 0,
                                  settings.task_time_limit or 0]},
            "broker": info.broker_info(
                url, connect_timeout=settings.broker_connection_timeout,
                heartbeat=float(settings.broker_heartbeat),
                failover_strategy=settings.broker_failover_strategy,
                alternates=[mask_url(u) for u in failover.urls if u != url]),
            "prefetch_count": session.prefetch_count if session is not None else 0,
            "rusage": info.rusage(),
        }

    def active_queues(self) -> list[dict[str, Any]]:
        plan = QueuePlan.from_settings(self.app.conf.settings)
        return [info.queue_info(queue, plan.queue(queue)) for queue in self.worker.queues]

    def revoked(self) -> list[str]:
        return self.worker.revoked.ids()

    def conf(self) -> dict[str, Any]:
        """The settings that differ from their defaults, hidden as Celery hides them
        (``filter_hidden_settings``), URLs without passwords."""
        settings, default = self.app.conf.settings, Settings()
        result = {}
        for field in dataclasses.fields(Settings):
            value = getattr(settings, field.name)
            if value == getattr(default, field.name):
                continue
            if _HIDDEN.search(field.name):
                value = "********"
            elif isinstance(value, str) and "://" in value:
                value = mask_url(value)
            result[field.name] = value
        return result

    def hello(self, from_node: str, revoked_ids: list[str]) -> dict[str, Any] | None:
        """A starting Celery worker's mingle: take its revoked ids, give ours."""
        if from_node == self.nodename:
            return None
        now = time.time()
        self.worker.revoked.merge(((task_id, now) for task_id in revoked_ids
                                   if not self.worker.revoked.revoked(task_id, now)), now)
        return {"revoked": self.worker.revoked.ids(), "clock": self.clock()}

    def clock(self) -> int:
        return self.worker.clock.value

    # --- control ------------------------------------------------------------------------

    async def revoke(self, task_ids: list[str], terminate: bool) -> list[str]:
        now = time.time()
        worker = self.worker
        for task_id in task_ids:
            worker.revoked.add(task_id, now)
        if task_ids:
            logger.info("Tasks flagged as revoked: %s", ", ".join(task_ids))
        runner = worker.runner
        running = set(runner.active) if runner is not None else set()
        if self.app.conf.settings.result_backend and task_ids:
            await self._record_revoke(task_ids, running, now)
        if not terminate or runner is None:
            return []
        return [task_id for task_id in task_ids if runner.terminate(task_id)]

    async def _record_revoke(self, task_ids: list[str], running: set[str],
                             now: float) -> None:
        backend = self.app.backend
        if isinstance(backend, RedisBackend):  # memory://: no later process to tell
            try:
                await revoked.persist(backend.client, task_ids, now)
            except Exception as exc:  # redis' own errors: the revoke still holds here
                logger.warning("Could not persist revoked ids for later children: %r", exc)
        for task_id in task_ids:
            if task_id in running:
                continue
            try:
                # A sibling child may be running it (Celery's prefork worker knows all its
                # tasks; our children don't): its outcome, stored at the same time, wins.
                await backend.store_if_status(revoked.revoked_meta(task_id, self.app.now()),
                                              _REVOCABLE)
            except (BackendError, OSError) as exc:
                logger.warning("Failed to mark task %s as revoked in backend: %s",
                               task_id, exc)

    def shutdown(self) -> None:
        parent = self.worker.options.supervisor_pid
        if parent:
            logger.warning("Got shutdown from remote: asking the supervisor (pid %d) for a "
                           "warm shutdown", parent)
            os.kill(parent, signal.SIGTERM)
        else:
            logger.warning("Got shutdown from remote")
            self.worker.request_stop()

    def resize_pool(self, delta: int) -> str | None:
        parent = self.worker.options.supervisor_pid
        if not parent:
            return "the pool cannot change size without the supervisor (-P processes)"
        if delta == 0:
            return None
        signum = signal.SIGTTIN if delta > 0 else signal.SIGTTOU
        for _ in range(abs(delta)):
            os.kill(parent, signum)
        return None

    async def add_consumer(self, queue: str) -> None:
        await self.worker.add_queue(queue)

    async def cancel_consumer(self, queue: str) -> None:
        await self.worker.cancel_queue(queue)
