"""Several broker URLs (Celery's ``;``-separated failover form) and the order to try them in.

``broker_url="amqp://node1//;amqp://node2//;amqp://node3//"`` lists the nodes of one
RabbitMQ cluster. A connection attempt tries them one after the other until one answers;
after a lost connection the next attempt starts with another node than the one just lost.
``broker_failover_strategy`` picks the order: ``round-robin`` (the order written, carrying
on after the node in use) or ``shuffle`` (a random order each time, so that many workers
spread over the nodes; the node just lost still comes last). No I/O here.
"""

from __future__ import annotations

import random

from aio_celery.config import mask_url, split_urls
from aio_celery.exceptions import ConfigurationError

#: the values of ``broker_failover_strategy`` (Celery's names)
STRATEGIES = ("round-robin", "shuffle")


class Failover:
    """The URLs of ``broker_url``, the one in use, and where the next attempt starts."""

    def __init__(self, url: str, strategy: str = "round-robin",
                 rng: random.Random | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"broker_failover_strategy={strategy!r}: use one of "
                             f"{', '.join(map(repr, STRATEGIES))}")
        self.urls = tuple(split_urls(url))
        self.strategy = strategy
        self._rng = rng or random.Random()
        self._in_use: int | None = None
        self._lost: int | None = None
        #: the failover of the process's main connection, for a companion's first try
        self._leader: Failover | None = None

    @property
    def in_use(self) -> str | None:
        """The URL of the open (or last opened) connection; None before the first."""
        return None if self._in_use is None else self.urls[self._in_use]

    @property
    def masked(self) -> str:
        """For logs: the URL in use (password masked), else the whole list."""
        if self.in_use is not None:
            return mask_url(self.in_use)
        return mask_url(";".join(self.urls))

    def companion(self) -> Failover:
        """The same URLs and strategy for another connection of the same process (its
        publisher, its mailbox): it tries the URL in use here first, rather than a node
        this one had to leave."""
        other = Failover(";".join(self.urls), self.strategy, self._rng)
        other._leader = self
        return other

    def order(self) -> list[str]:
        """The URLs to try, in order, for the next connection (each once): after a loss,
        moving on from the node lost; else the URL in use (if any) first."""
        count = len(self.urls)
        indices = list(range(count))
        if self.strategy == "shuffle":
            self._rng.shuffle(indices)
            if self._lost is not None:  # move on: the node just lost comes last
                indices.remove(self._lost)
                indices.append(self._lost)
        elif self._lost is not None:  # round-robin: carry on after the node just lost
            start = (self._lost + 1) % count
            indices = indices[start:] + indices[:start]
        preferred = self._in_use
        if preferred is None and self._leader is not None:
            preferred = self._leader._in_use
        if self._lost is None and preferred is not None:
            indices.remove(preferred)
            indices.insert(0, preferred)
        return [self.urls[i] for i in indices]

    def using(self, url: str) -> None:
        """A connection to ``url`` (one of :attr:`urls`) is open."""
        self._in_use = self.urls.index(url)
        self._lost = None

    def lost(self) -> None:
        """The connection in use was lost: the next :meth:`order` moves on from it."""
        if self._in_use is not None:
            self._lost = self._in_use
