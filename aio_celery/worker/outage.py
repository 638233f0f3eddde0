"""One stretch of time without the broker: retry pacing, the retry limit, and its log lines.

The worker retries for as long as ``broker_connection_max_retries`` allows (for ever by
default) with a capped, jittered backoff. It logs the first failure, then one warning every
:data:`REPORT_EVERY` seconds saying how long the broker has been gone, not a line per
attempt (those are DEBUG): an outage of an hour is about 120 lines per process, not 700.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from aio_celery.worker.backoff import Backoff

logger = logging.getLogger("aio_celery.worker")
#: seconds between two "still unreachable" warnings
REPORT_EVERY = 30.0


class Outage:
    """Counts failed attempts to reach the broker and says when to try again."""

    def __init__(self, url: str, max_retries: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url  # masked
        self.max_retries = max_retries or None  # Celery: 0 or None retry for ever
        self.attempts = 0
        self._clock = clock
        self.since = clock()
        #: a broker that is back is found within its longest wait
        self._backoff = Backoff()
        self._next_report = self.since + REPORT_EVERY

    @property
    def exhausted(self) -> bool:
        return self.max_retries is not None and self.attempts > self.max_retries

    @property
    def down_for(self) -> float:
        return self._clock() - self.since

    def failed(self, error: BaseException) -> None:
        """Record a failed attempt and log it as the pacing above says."""
        self.attempts += 1
        now = self._clock()
        if self.attempts == 1:
            limit = "for ever" if self.max_retries is None else \
                f"up to {self.max_retries} times (broker_connection_max_retries)"
            logger.warning("Cannot reach the broker: %s. Retrying every few seconds (at most "
                           "%.0fs apart) %s; not ready (no task is taken) meanwhile", error,
                           self._backoff.most, limit)
        elif now >= self._next_report:
            self._next_report = now + REPORT_EVERY
            logger.warning("The broker %s has been unreachable for %.0fs (%d attempts, the "
                           "last: %s); still retrying", self.url, now - self.since,
                           self.attempts, error)
        else:
            logger.debug("Broker connection attempt %d failed: %s", self.attempts, error)

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (jittered: workers that lost the same
        broker at the same moment do not all come back in step)."""
        return self._backoff.next() * random.uniform(0.75, 1.0)

    def recovered(self, consumers: int, after_loss: bool) -> None:
        if after_loss or self.attempts:
            logger.info("Reconnected to %s after %.0fs (%d failed attempt(s)): %d consumer(s) "
                        "attached again", self.url, self.down_for, self.attempts, consumers)

    def giving_up(self) -> str:
        return (f"Could not reach the broker {self.url} in {self.attempts} attempts over "
                f"{self.down_for:.0f}s (broker_connection_max_retries={self.max_retries})")
