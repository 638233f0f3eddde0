"""Capped exponential backoff: the pacing of every retry of a dependency that failed (the
broker the worker consumes from, the result backend, the broker it publishes to)."""

from __future__ import annotations

from aio_celery import defaults


class Backoff:
    """The next wait: ``first``, then twice as long each time, never above ``most``;
    :meth:`reset` once the dependency answers again."""

    __slots__ = ("_next", "first", "most")

    def __init__(self, first: float = defaults.RETRY_FIRST_DELAY,
                 most: float = defaults.RETRY_MAX_DELAY) -> None:
        self.first = first
        self.most = most
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.most)
        return delay

    def reset(self) -> None:
        self._next = self.first
