"""The worker's side of rate limits: one waiting line per rate-limited task type.

The limit in force is read from ``app.tasks[name].rate_limit`` (else the app's
``task_default_rate_limit``, read as the worker starts) at every receipt and again each
time a waiting line tries its bucket, so a change made at runtime (the ``rate_limit``
control command sets that attribute) reaches the messages already waiting within
:data:`RECHECK` seconds; the value is compared, and parsed again only when it changed.

Messages of one task type take their tokens in the order they arrived: the head of the
line polls the bucket (shared with the sibling processes, which may take a token first)
and the others queue behind it on an ``asyncio.Lock`` (first come, first served). A
waiting message holds no concurrency slot; :mod:`aio_celery.worker.delivery` decides where
it waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aio_celery.app import Celery
from aio_celery.ratelimit import Bucket, LocalBucket, RateLimit, SharedRates, interval

logger = logging.getLogger("aio_celery.worker")

#: the head of a line sleeps at most this long between two tries, so that a rate changed
#: at runtime (faster, or off) reaches the waiting messages soon
RECHECK = 1.0


class Line:
    """The messages of one task type that wait for a token."""

    def __init__(self, limiter: Limiter, name: str, bucket: Bucket) -> None:
        self._limiter = limiter
        self.name = name
        self._bucket = bucket
        self._turn = asyncio.Lock()
        self.waiting = 0
        self.gap = 0.0  # seconds between tokens in force (0.0: no limit)
        self.spec: RateLimit = None  # the rate_limit the gap was parsed from

    def try_now(self) -> bool:
        """Take a token at once if nobody waits for one before us."""
        if self.waiting or self._turn.locked():
            return False
        return self._take() == 0.0

    def expected_wait(self) -> float:
        """Roughly how long a message that joins the line now would wait."""
        return self.waiting * self.gap + self.gap

    async def wait_turn(self) -> None:
        """Return once this message has its token (or the limit was lifted)."""
        self.waiting += 1
        try:
            async with self._turn:
                # Polled: sibling processes take tokens from the same bucket, and nothing
                # in this process could tell us when they leave one
                while (wait := self._take()) > 0.0:  # noqa: ASYNC110
                    await asyncio.sleep(min(wait, RECHECK))
        finally:
            self.waiting -= 1

    def _take(self) -> float:
        self._limiter.refresh(self)
        if not self.gap:
            return 0.0
        return self._bucket.take(self.gap, self._limiter.clock())


class Limiter:
    """The rate limits of one worker process (None of it exists with
    ``worker_disable_rate_limits``)."""

    def __init__(self, app: Celery, shared: SharedRates | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``shared``: the supervisor's table (the limit holds for all its children
        together); None: this process's own buckets. ``clock``: monotonic seconds, the
        same in every process (CLOCK_MONOTONIC)."""
        self._tasks = app.tasks
        #: read once: the setting is not meant to change while a worker runs (a task's
        #: own rate_limit is, by the rate_limit command)
        self._default: RateLimit = app.conf.settings.task_default_rate_limit
        self._shared = shared
        self.clock = clock
        self._lines: dict[str, Line] = {}
        self._refused: set[str] = set()  # rate_limit values already reported as invalid

    def line(self, name: str) -> Line | None:
        """The line of task type ``name`` if it is rate-limited now; None if not."""
        line = self._lines.get(name)
        if line is None:
            if self._limit_of(name) is None:
                return None  # never limited so far: no line, no bucket
            bucket = self._shared.bucket(name) if self._shared is not None else LocalBucket()
            line = self._lines[name] = Line(self, name, bucket)
        self.refresh(line)
        return line if line.gap else None

    def refresh(self, line: Line) -> None:
        spec = self._limit_of(line.name)
        if spec == line.spec and type(spec) is type(line.spec):
            return
        line.spec = spec
        try:
            line.gap = interval(spec)
        except ValueError as exc:
            line.gap = 0.0
            if repr(spec) not in self._refused:
                self._refused.add(repr(spec))
                logger.error("Task %s: %s; it runs without a rate limit", line.name, exc)
            return
        if line.waiting or line.gap:
            logger.info("Task %s: rate limit %s", line.name,
                        "off" if not line.gap else repr(spec))

    def _limit_of(self, name: str) -> RateLimit:
        task = self._tasks.get(name)
        if task is None:
            return None  # not registered here: it fails at once, unlimited
        own = task.rate_limit
        return own if own is not None else self._default
