"""Unacknowledged deliveries age: RabbitMQ's ``consumer_timeout``.

RabbitMQ times every delivery from the moment it sends it until it is acknowledged. Past
the queue's consumer timeout (``consumer_timeout`` in rabbitmq.conf, 30 min by default; per
queue since RabbitMQ 3.11.15 with the ``x-consumer-timeout`` argument or a ``consumer-timeout``
policy) it closes the whole channel (3.x: ``PRECONDITION_FAILED - delivery acknowledgement
on channel 1 timed out``) or, on 4.3+ quorum queues, cancels the consumer. For this worker
that is a lost connection: every running task is cancelled and redelivered, and the same
thing happens again half an hour later.

With acks after the task and a prefetch of 4 x concurrency, a message can wait unstarted
behind long tasks for that long. So every delivery is stamped (monotonic clock) as it
arrives, and a periodic sweep, not per-message work, compares the stamps with
``worker_unacked_max_age``:

* a message still waiting to start (in the ready queue, kept back undecoded while
  deliveries are paused (back-pressure), or waiting in memory for its eta or its rate limit's token)
  is given back to the queue
  before it gets that old. RabbitMQ hands it to a consumer with room, another worker if one
  is free; if none is, it comes back here with a fresh stamp and is given back again one
  max age later: one return per prefetched message per max age (with the defaults, 3
  messages per 25 min for each slot-blocked worker with concurrency 1), never a loop;
* a task *running* that long cannot be given back: it is logged once, with what to do.

Messages kept back undecoded carry no stamp: they all arrived after the pause began
(deliveries come in order and the socket is read without pause until then), so they are
stamped with the pause's start when they are finally handed over (until the next sweep),
and a sweep that finds the pause as old as its cut-off resumes deliveries, pauses none
until the next sweep (what is still in the socket is as old) and gives them back then.
A delivery still in the socket when a resume is followed by a new pause is stamped with
the new pause's start: that happens only while tasks start (the ready queue moves), so it
is near the front of the line by then.
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol, TypeVar

logger = logging.getLogger("aio_celery.worker")

#: the sweep runs every max age / SWEEP_FRACTION seconds, at most every MAX_SWEEP_PERIOD
SWEEP_FRACTION = 10
MAX_SWEEP_PERIOD = 60.0


class Stamped(Protocol):
    @property
    def arrived(self) -> float: ...


def sweep_period(max_age: float) -> float:
    """Seconds between sweeps. A message is given back at the last sweep before it reaches
    ``max_age``: between ``max_age - period`` and ``max_age`` after it arrived."""
    return min(MAX_SWEEP_PERIOD, max_age / SWEEP_FRACTION)


_Job = TypeVar("_Job", bound=Stamped)


def take_aged(ready: collections.deque[_Job], cutoff: float) -> list[_Job]:
    """Remove and return the jobs that arrived at or before ``cutoff``, keeping the order
    of the rest (etas that fell due join the ready queue late, with their old stamp, so the
    queue is not sorted by arrival)."""
    if not any(job.arrived <= cutoff for job in ready):
        return []
    aged = [job for job in ready if job.arrived <= cutoff]
    kept = [job for job in ready if job.arrived > cutoff]
    ready.clear()
    ready.extend(kept)
    return aged


def problem(max_age: float | None, eta_horizon: float) -> str | None:
    """Why these two settings cannot work together, in one line; None if they can."""
    if max_age is None or eta_horizon < max_age:
        return None
    return (f"--eta-horizon ({eta_horizon:g}s) must be below worker_unacked_max_age "
            f"({max_age:g}s): an eta within the horizon waits in this worker's memory, "
            "unacknowledged, and would be given back before it is due. Lower --eta-horizon, "
            "or raise worker_unacked_max_age (--unacked-max-age) while keeping it below "
            "RabbitMQ's consumer_timeout")


def log_returned(count: int, waiting: int, max_age: float, running: int,
                 concurrency: int) -> None:
    etas = f" ({waiting} of them waiting for their eta or rate limit)" if waiting else ""
    logger.warning(
        "Gave back %d message(s) that waited unstarted%s for nearly worker_unacked_max_age "
        "(%.0fs) while %d of %d slots ran: RabbitMQ hands them to a free consumer, or back "
        "here. Left unacknowledged past RabbitMQ's consumer_timeout they would close this "
        "worker's channel and cancel every running task.", count, etas, max_age, running,
        concurrency)


def warn_running(task: str, task_id: str, queue: str, age: float, max_age: float) -> None:
    logger.warning(
        "Task %s[%s] from queue %s has run unacknowledged for %.0fs (worker_unacked_max_age "
        "%.0fs). When a delivery stays unacknowledged past RabbitMQ's consumer_timeout (30 "
        "min by default) RabbitMQ closes the channel (3.x) or cancels the consumer (4.3+ "
        "quorum queues): every task running in this worker process is then cancelled and "
        "runs again. A running task cannot be given back: raise the timeout for this queue "
        "above its longest run (the x-consumer-timeout queue argument or a consumer-timeout "
        "policy on RabbitMQ 3.11.15+, consumer_timeout in rabbitmq.conf), or acknowledge such "
        "tasks early (acks_late=False).", task, task_id, queue, age, max_age)


def warn_pending(task: str, task_id: str, queue: str, age: float, max_age: float) -> None:
    logger.warning(
        "Task %s[%s] from queue %s finished but its result or follow-up messages still wait "
        "for the result backend or the broker, unacknowledged for %.0fs "
        "(worker_unacked_max_age %.0fs). If that outlasts RabbitMQ's consumer_timeout, "
        "RabbitMQ closes the channel and the task runs again once Redis and the broker are "
        "back: bring the result backend back, or raise consumer_timeout for long outages.",
        task, task_id, queue, age, max_age)

