"""A dependency that finished tasks wait for: the result backend, or the broker for
publishing their follow-up messages.

While it fails, every waiting task tries again on one shared clock, with capped exponential
backoff: they all try in the same event-loop turn (the backend then writes their results in
one round trip) instead of each on its own timer. The log gets one warning when it starts
failing and one line when it answers again, not a line per try per task.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aio_celery import defaults
from aio_celery.worker.backoff import Backoff

logger = logging.getLogger("aio_celery.worker")


class DependencyOutage:
    """The state of one dependency, as the tasks waiting for it see it."""

    def __init__(self, name: str, advice: str, *, errors: tuple[type[Exception], ...],
                 first_delay: float = defaults.RETRY_FIRST_DELAY,
                 max_delay: float = defaults.RETRY_MAX_DELAY) -> None:
        self.name = name
        self.advice = advice
        #: the errors that mean "not now" (anything else is not retried)
        self.errors = errors
        #: tasks waiting for it right now
        self.waiting = 0
        self._since: float | None = None
        self._backoff = Backoff(first_delay, max_delay)
        self._tick: asyncio.Future[None] | None = None

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        """A call failed: the first failure of an outage is logged, the others are not."""
        if self._since is not None:
            return
        self._since = time.monotonic()
        logger.warning("%s failed: %s. Finished tasks wait for it with their messages "
                       "unacknowledged (they do not run again) and try again every %.0fs at "
                       "most. %s", self.name, str(error).rstrip("."), self._backoff.most,
                       self.advice)

    def answered(self) -> None:
        """A call got through: an outage is over."""
        if self._since is None:
            return
        logger.warning("%s answers again after %.0fs: %d finished task(s) that waited are "
                       "being completed", self.name, time.monotonic() - self._since,
                       self.waiting)
        self._since = None
        self._backoff.reset()

    async def next_try(self) -> None:
        """Return at the next shared try (the clock backs off at every round)."""
        if self._tick is None or self._tick.done():
            loop = asyncio.get_running_loop()
            self._tick = loop.create_future()
            loop.call_later(self._backoff.next(), _fire, self._tick)
        await asyncio.shield(self._tick)


def _fire(tick: asyncio.Future[None]) -> None:
    if not tick.done():
        tick.set_result(None)
