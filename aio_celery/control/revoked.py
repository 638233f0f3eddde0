"""The ids revoked by ``celery control revoke``: what a worker process skips.

Celery keeps at most 50,000 ids for 3 hours in each worker (``CELERY_WORKER_REVOKES_MAX``,
``CELERY_WORKER_REVOKE_EXPIRES``), in memory, and exchanges them with its peers at start-up
(mingle's ``hello``). Each of our children is a node and gets every revoke through its own
mailbox; so that a child started later (a restart, ``pool_grow``, a new pod) still honours
the recent ones, every revoke is also written to the Redis result backend, a sorted set
``aio-celery-revoked`` (score: the revoke's time), trimmed to the same 50,000 ids and
3 hours, and read by each child as it starts. Without a Redis result backend revokes live
only in the children running when they arrive.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aio_celery import resultmeta, states
from aio_celery.exceptions import TaskRevokedError

logger = logging.getLogger(__name__)

MAX_IDS = 50_000
EXPIRES = 10_800.0
#: the sorted set in the result backend's Redis database
REDIS_KEY = "aio-celery-revoked"


class RevokedSet:
    """Ids with the time they were revoked, oldest first; at most ``maxlen`` for ``expires``
    seconds (the clock is passed in)."""

    def __init__(self, maxlen: int = MAX_IDS, expires: float = EXPIRES) -> None:
        self.maxlen = maxlen
        self.expires = expires
        self._ids: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, task_id: str, now: float) -> None:
        self._ids.pop(task_id, None)
        self._ids[task_id] = now
        self.purge(now)

    def merge(self, items: Iterable[tuple[str, float]], now: float) -> None:
        """Add ids revoked earlier (their own times), keeping the order by time."""
        merged = dict(self._ids)
        merged.update(items)
        self._ids = collections.OrderedDict(sorted(merged.items(), key=lambda kv: kv[1]))
        self.purge(now)

    def purge(self, now: float) -> None:
        ids = self._ids
        while ids and (len(ids) > self.maxlen or next(iter(ids.values())) < now - self.expires):
            ids.popitem(last=False)

    def revoked(self, task_id: str, now: float) -> bool:
        at = self._ids.get(task_id)
        return at is not None and at >= now - self.expires

    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def revoked_meta(task_id: str, now: datetime) -> dict[str, Any]:
    """The result Celery stores for a task revoked before it ran."""
    return resultmeta.build_meta(task_id, states.REVOKED,
                                 resultmeta.exception_to_dict(TaskRevokedError("revoked")),
                                 now=now)


async def persist(client: Any, task_ids: Iterable[str], now: float) -> None:
    """Add ``task_ids`` to the shared set and trim it (one transaction)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.zadd(REDIS_KEY, {task_id: now for task_id in task_ids})
        pipe.zremrangebyscore(REDIS_KEY, "-inf", now - EXPIRES)
        pipe.zremrangebyrank(REDIS_KEY, 0, -MAX_IDS - 1)
        pipe.expire(REDIS_KEY, int(EXPIRES))
        await pipe.execute()


async def load(client: Any, now: float) -> list[tuple[str, float]]:
    """The ids revoked in the last :data:`EXPIRES` seconds, with their times."""
    rows = await client.zrangebyscore(REDIS_KEY, now - EXPIRES, "+inf", withscores=True)
    return [(k.decode() if isinstance(k, bytes) else str(k), float(v)) for k, v in rows]
