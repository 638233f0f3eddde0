"""A Redis database of the benchmark's own, for the drain results variant."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .harness import mask

DEFAULT_REDIS = "redis://127.0.0.1:6379"
#: tests/conftest.py claims an empty Redis database with this key (taking the highest free
#: one from 15 down); the benchmark claims its own the same way, from 1 up
REDIS_CLAIM_KEY = "aio-celery-test-run"


@asynccontextmanager
async def claimed_redis_db(url: str) -> AsyncIterator[str]:
    """A Redis database of our own for the run, flushed afterwards: the one ``url`` names
    (``/N``), else the lowest empty one from 1 up. It must be empty and is claimed with the
    key the test suite claims its databases with, so that a test run on the same server
    never picks it (nor we one of theirs): flushing it cannot wipe anybody else's data."""
    from urllib.parse import urlsplit, urlunsplit

    import redis.asyncio

    parts = urlsplit(url)
    named = parts.path.strip("/")
    token = f"aio-celery-bench pid {os.getpid()}"
    for db in [int(named)] if named else range(1, 16):
        db_url = urlunsplit(parts._replace(path=f"/{db}"))
        client = redis.asyncio.Redis.from_url(db_url)
        try:
            if await client.dbsize() == 0 and await client.set(REDIS_CLAIM_KEY, token, nx=True,
                                                                ex=3600):
                try:
                    yield db_url
                finally:
                    if await client.get(REDIS_CLAIM_KEY) == token.encode():
                        await client.flushdb()
                return
        finally:
            await client.aclose()
    raise RuntimeError(f"no empty Redis database for the results variant at {mask(url)}"
                       + (" (it must be empty: it is flushed afterwards)" if named else ""))
