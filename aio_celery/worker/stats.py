"""Counters of one worker process (read by logs now, by metrics and remote control later)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class Stats:
    #: tasks whose message was settled after running (any outcome)
    finished: int = 0
    #: messages rejected because they could not be decoded
    rejected: int = 0
    #: tasks started (Celery's ``processed`` of worker heartbeats)
    started: int = 0
    #: monitoring events dropped: the broker was away, blocked or slow, or refused the
    #: event exchange (see :mod:`aio_celery.worker.events`)
    events_dropped: int = 0
    #: tasks started, by name (``inspect stats``' ``total``)
    total: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
