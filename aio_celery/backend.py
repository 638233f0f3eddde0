"""Redis result backend in Celery's exact format (``redis`` is imported lazily).

Writes use SETEX (or SET when results never expire) and PUBLISH on the key's channel in one
MULTI/EXEC, as Celery does. Waiting for a result subscribes first, reads once, then waits
for the channel: one shared pub/sub connection serves every waiter, and nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aio_celery import resultmeta, states
from aio_celery.config import mask_url
from aio_celery.exceptions import BackendConnectionError, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

logger = logging.getLogger(__name__)


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class RedisBackend:
    """Stores and reads Celery result documents. Inert until first used."""

    def __init__(self, url: str, *, expires: int | None = 86400,
                 socket_timeout: float = 5.0) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                f"result_backend {mask_url(url)!r}: only redis:// backends are supported")
        self.url = url
        self.expires = expires
        self.socket_timeout = socket_timeout
        self._client: Redis | None = None
        self._subscriber: _Subscriber | None = None

    @property
    def client(self) -> Redis:
        if self._client is None:
            try:
                import redis.asyncio
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ConfigurationError(
                    "result_backend needs redis-py: pip install 'aio-celery[redis]'") from exc
            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout)
        return self._client

    async def close(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await subscriber.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _unreachable(self, exc: BaseException) -> BackendConnectionError:
        return BackendConnectionError(
            f"result backend {mask_url(self.url)} unreachable: {exc}. "
            "Check that Redis runs there and that result_backend is right.")

    async def store(self, meta: dict[str, Any]) -> None:
        """Write and publish one result document (``meta["task_id"]`` names it)."""
        key = resultmeta.result_key(meta["task_id"])
        value = resultmeta.encode_meta(meta)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, value, ex=self.expires or None)
                pipe.publish(key, value)
                await pipe.execute()
        except _redis_errors() as exc:
            raise self._unreachable(exc) from exc

    async def get_meta(self, task_id: str) -> dict[str, Any] | None:
        """The stored document, or None when there is none (PENDING)."""
        try:
            raw = await self.client.get(resultmeta.result_key(task_id))
        except _redis_errors() as exc:
            raise self._unreachable(exc) from exc
        return None if raw is None else resultmeta.decode_meta(raw)

    async def forget(self, task_id: str) -> None:
        try:
            await self.client.delete(resultmeta.result_key(task_id))
        except _redis_errors() as exc:
            raise self._unreachable(exc) from exc

    async def wait_for(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        """The document once the task is ready; raises asyncio.TimeoutError."""
        if self._subscriber is None:
            self._subscriber = _Subscriber(self)
        try:
            return await self._subscriber.wait(task_id, timeout)
        except TimeoutError:
            raise  # asyncio's timeout is an OSError too: it is not "unreachable"
        except _redis_errors() as exc:
            raise self._unreachable(exc) from exc


class _Subscriber:
    """One pub/sub connection shared by every ``wait_for``; channels come and go with their
    waiters."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        #: one (un)subscribe at a time: concurrent first calls would each open a connection
        self._lock = asyncio.Lock()

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        key = resultmeta.result_key(task_id)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(future)
        try:
            async with asyncio.timeout(timeout):
                if len(waiters) == 1:
                    await self._subscribe(key)
                # Read after subscribing: a result stored in between is not missed.
                meta = await self._backend.get_meta(task_id)
                if meta is not None and meta["status"] in states.READY_STATES:
                    return meta
                return await future
        finally:
            waiters.discard(future)
            if not waiters:
                del self._waiters[key]
                await self._unsubscribe(key)

    async def _subscribe(self, key: str) -> None:
        async with self._lock:
            if self._pubsub is None:
                self._pubsub = self._backend.client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(key)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(self._pubsub))

    async def _unsubscribe(self, key: str) -> None:
        async with self._lock:
            if self._pubsub is not None and key not in self._waiters:
                with contextlib.suppress(*_redis_errors()):
                    await self._pubsub.unsubscribe(key)

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while self._waiters:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    self._deliver(message["channel"], message["data"])
        except _redis_errors() as exc:
            # The connection is gone: the next waiter opens a new one.
            self._pubsub = None
            self._fail_all(exc)

    def _deliver(self, channel: bytes | str, data: bytes) -> None:
        key = channel.decode() if isinstance(channel, bytes) else channel
        try:
            meta = resultmeta.decode_meta(data)
        except ValueError:
            logger.warning("Ignoring a malformed result published on %s", key)
            return
        if meta.get("status") not in states.READY_STATES:
            return
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result(meta)

    def _fail_all(self, exc: BaseException) -> None:
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(self._backend._unreachable(exc))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_redis_errors()):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(*_redis_errors()):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
