"""Redis result backend in Celery's exact format (``redis`` is imported lazily).

Writes SET the document with its expiry and PUBLISH it on the key's channel, as Celery does,
and, like Celery, never overwrite a stored SUCCESS (a retry's RETRY landing after the retried
run succeeded, or a redelivered duplicate, must not hide the result); one Lua script does
that atomically for every result finished in the same loop turn. Waiting for a result
subscribes first, reads once, then waits for the channel: one shared pub/sub connection
serves every waiter, and nothing polls.

Chords keep their state under ``celery-taskset-meta-<group_id>`` plus a suffix, with the
Lua scripts of Celery 5.7's Redis backend (``celery/backends/redis.py``), copied verbatim so
that Celery workers and ours can share one chord: ``.s`` the header size, ``.j`` the header
results (a sorted set scored by ``group_index``), ``.d`` the members already counted,
``.t`` the size added at run time, ``.c`` the claim to send the body (then ``done``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from aio_celery import jsoncodec, resultmeta, states
from aio_celery.config import BACKEND_SCHEMES, mask_url, url_problem
from aio_celery.exceptions import BackendConnectionError, BackendError, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

logger = logging.getLogger(__name__)


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


GROUP_KEY_PREFIX = "celery-taskset-meta-"


def group_key(group_id: str, suffix: str = "") -> str:
    """``celery-taskset-meta-<group_id><suffix>``, Celery's key for a group and its chord."""
    if not group_id:
        raise ValueError("a group id is needed")
    return f"{GROUP_KEY_PREFIX}{group_id}{suffix}"


# The three scripts below are Celery 5.7's (celery/backends/redis.py), unchanged: the keys,
# their encodings and the claim protocol must be the same for Celery and aio-celery workers
# to complete each other's chords.

#: Record one header result (once per ``task_id:group_index``), return
#: ``{readycount, totaldiff, size, claimed}``; the part completing the chord claims ``.c``.
CHORD_PART_RETURN_LUA = """
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires, group_expires = tonumber(ARGV[5]), tonumber(ARGV[6])
local claim_expires = tonumber(ARGV[7])
local claim_token = ARGV[8]

-- Prevent late duplicates from recreating chord state after successful cleanup.
local done_marker = redis.call('GET', ckey)
if done_marker == 'done' then
    return {-1, 0, 0, 0}
end

-- Key the check on the task id and header index, so it doesn't merge two
-- header entries that share the task id of a reused frozen signature.
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
    if ordered == '1' then
        redis.call('ZADD', jkey, score, value)
    else
        redis.call('RPUSH', jkey, value)
    end
    redis.call('SADD', dkey, member)
end
local readycount
if ordered == '1' then
    readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
else
    readycount = redis.call('LLEN', jkey)
end
if expires > 0 then
    for _, key in ipairs({jkey, tkey, skey, dkey}) do
        redis.call('EXPIRE', key, expires)
    end
    if group_expires > 0 then
        redis.call('EXPIRE', gkey, group_expires)
    end
end

local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end

return {readycount, totaldiff, size, claimed}
"""

#: Release the claim and delete the chord's data if the token still holds it; then mark
#: ``.c`` as ``done`` so that a late duplicate part cannot start the chord again.
CHORD_CLEANUP_LUA = """
local ckey = KEYS[1]
local jkey = KEYS[2]
local tkey = KEYS[3]
local skey = KEYS[4]
local dkey = KEYS[5]
local token = ARGV[1]
local done_expires = tonumber(ARGV[2])

if redis.call('GET', ckey) == token then
    redis.call('DEL', jkey, tkey, skey, dkey)
    if done_expires and done_expires > 0 then
        redis.call('SET', ckey, 'done', 'EX', done_expires)
    end
    return 1
end
return 0
"""

#: Extend the claim while this worker owns it (or take an expired one back).
CHORD_CLAIM_EXTEND_LUA = """
local ckey, skey = KEYS[1], KEYS[2]
local token = ARGV[1]
local expires = tonumber(ARGV[2])
if redis.call('GET', ckey) == token then
    return redis.call('EXPIRE', ckey, expires)
end
if not redis.call('GET', ckey) and redis.call('EXISTS', skey) == 1 then
    return redis.call('SET', ckey, token, 'EX', expires, 'NX') and 1 or 0
end
return 0
"""

#: Store and publish result documents (KEYS, with ARGV[1] the expiry in seconds, 0 for none,
#: then one document per key), skipping a key whose stored document says SUCCESS. Celery
#: checks the same with a GET before its SET; here no other write can come in between.
STORE_RESULTS_LUA = """
local expires = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    -- pcall: a key of another type is overwritten (as SET does), not an error for the batch
    local current = redis.pcall('GET', key)
    local succeeded = false
    if type(current) == 'string' then
        local ok, meta = pcall(cjson.decode, current)
        succeeded = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
    end
    if not succeeded then
        local value = ARGV[i + 1]
        if expires > 0 then
            redis.call('SET', key, value, 'EX', expires)
        else
            redis.call('SET', key, value)
        end
        redis.call('PUBLISH', key, value)
    end
end
return 0
"""

#: Store and publish one document (KEYS[1]; ARGV[1] the expiry, 0 for none; ARGV[2] the
#: document) only while no document is stored or its status is one of ARGV[3...]; 1 if
#: stored. A revoke marks a waiting task REVOKED with it: a worker that runs the task may
#: store its outcome (terminated, or a result) at the same moment, and must win.
STORE_IF_STATUS_LUA = """
local current = redis.pcall('GET', KEYS[1])
if type(current) == 'string' then
    local ok, meta = pcall(cjson.decode, current)
    if not ok or type(meta) ~= 'table' then
        return 0
    end
    local allowed = false
    for i = 3, #ARGV do
        if meta['status'] == ARGV[i] then
            allowed = true
        end
    end
    if not allowed then
        return 0
    end
end
local expires = tonumber(ARGV[1])
if expires > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', expires)
else
    redis.call('SET', KEYS[1], ARGV[2])
end
redis.call('PUBLISH', KEYS[1], ARGV[2])
return 1
"""

_SCRIPT_SHAS = {script: hashlib.sha1(script.encode()).hexdigest()
                for script in (CHORD_PART_RETURN_LUA, CHORD_CLEANUP_LUA, CHORD_CLAIM_EXTEND_LUA,
                               STORE_RESULTS_LUA, STORE_IF_STATUS_LUA)}


class ChordPart(NamedTuple):
    """What :meth:`RedisBackend.chord_part_return` found after recording a part."""

    #: header results recorded so far; -1 when the chord was already completed
    readycount: int
    #: the chord's size (header size plus ``.t``), None when ``.s`` is gone or never set
    total: int | None
    #: True for the one part that must now send the body
    claimed: bool

    @property
    def complete(self) -> bool:
        return self.claimed and self.total is not None and self.readycount == self.total


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
        self._batch: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._writers: set[asyncio.Future[None]] = set()
        self._reachable = _Reachable(self)
        # asyncio's timeout is an OSError too: it is not "unreachable"
        self._waiting = _Reachable(self, let_through=(TimeoutError,))

    @property
    def client(self) -> Redis:
        if self._client is None:
            try:
                import redis.asyncio
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ConfigurationError(
                    "result_backend needs redis-py: pip install 'aio-celery[redis]'") from exc
            problem = url_problem(self.url, BACKEND_SCHEMES)
            if problem is not None:  # redis-py's own errors may quote the password
                raise ConfigurationError(f"result_backend {mask_url(self.url)}: {problem}")
            try:
                self._client = redis.asyncio.Redis.from_url(
                    self.url, socket_timeout=self.socket_timeout,
                    socket_connect_timeout=self.socket_timeout)
            except ValueError as exc:  # names a query parameter, never its value
                raise ConfigurationError(f"result_backend {mask_url(self.url)}: {exc}") from None
        return self._client

    async def close(self) -> None:
        if self._writers:  # results still on their way to Redis
            await asyncio.wait(set(self._writers))
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
        """Write and publish one result document (``meta["task_id"]`` names it), unless
        the task's stored result is already a SUCCESS; returns once Redis has it.

        Results stored in the same event-loop turn share one round trip (a busy worker
        finishes many tasks per turn), each still SET with its expiry and PUBLISHed.
        """
        key = resultmeta.result_key(meta["task_id"])
        value = resultmeta.encode_meta(meta)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._batch.append((key, value, future))
        if len(self._batch) == 1:
            loop.call_soon(self._write_batch)
        await future

    def _write_batch(self) -> None:
        batch, self._batch = self._batch, []
        writer = asyncio.ensure_future(self._write(batch))
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)

    async def _write(self, batch: list[tuple[str, bytes, asyncio.Future[None]]]) -> None:
        error: BaseException | None = None
        try:
            await self._script(STORE_RESULTS_LUA, [key for key, _, _ in batch],
                               [self.expires or 0, *(value for _, value, _ in batch)])
        except BackendConnectionError as exc:
            error = exc
        except Exception as exc:  # READONLY, OOM, ...: retried by the worker like an outage
            error = BackendError(f"result backend {mask_url(self.url)} refused the write: "
                                 f"{exc!r}")
        for _, _, future in batch:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def store_if_status(self, meta: dict[str, Any], statuses: Iterable[str]) -> bool:
        """Write and publish ``meta`` only while the task has no stored document or one whose
        status is in ``statuses``, in one step (no write can come between the check and
        the write); True if it was written."""
        stored = await self._script(
            STORE_IF_STATUS_LUA, [resultmeta.result_key(meta["task_id"])],
            [self.expires or 0, resultmeta.encode_meta(meta), *statuses])
        return bool(stored)

    async def get_meta(self, task_id: str) -> dict[str, Any] | None:
        """The stored document, or None when there is none (PENDING)."""
        with self._reachable:
            raw = await self.client.get(resultmeta.result_key(task_id))
        return None if raw is None else resultmeta.decode_meta(raw)

    async def forget(self, task_id: str) -> None:
        with self._reachable:
            await self.client.delete(resultmeta.result_key(task_id))

    async def wait_for(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        """The document once the task is ready; raises asyncio.TimeoutError."""
        if self._subscriber is None:
            self._subscriber = _Subscriber(self)
        with self._waiting:
            return await self._subscriber.wait(task_id, timeout)


    # --- chords (Celery 5.7's keys and scripts) --------------------------------------------

    async def _script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        import redis.exceptions

        client = self.client
        sha = _SCRIPT_SHAS[script]
        with self._reachable:
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                await client.script_load(script)
                return await client.evalsha(sha, len(keys), *keys, *args)

    async def set_chord_size(self, group_id: str, size: int) -> None:
        """Before the header is sent: ``.s`` = the header size (kept as long as results),
        and no claim left from an earlier run of the same group id (Celery's
        ``set_chord_size``)."""
        with self._reachable:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(group_key(group_id, ".c"))
                pipe.set(group_key(group_id, ".s"), size, ex=self.expires or None)
                await pipe.execute()

    async def chord_part_return(self, group_id: str, task_id: str, group_index: int | None,
                                encoded: str, *, claim_expires: int,
                                claim_token: str) -> ChordPart:
        """Record one header task's ``[1, id, state, result]`` (JSON) atomically, once."""
        keys = [group_key(group_id, suffix) for suffix in (".j", ".t", ".s", ".d", "", ".c")]
        expires = self.expires or 0
        score = "+inf" if group_index is None else group_index
        readycount, totaldiff, size, claimed = await self._script(
            CHORD_PART_RETURN_LUA, keys,
            [task_id, encoded, 1, score, expires, expires, claim_expires, claim_token])
        total = None if size is None else int(size) + int(totaldiff or 0)
        return ChordPart(int(readycount), total, bool(claimed))

    async def chord_results(self, group_id: str) -> list[bytes | str]:
        """The header results recorded for a chord, in ``group_index`` order."""
        with self._reachable:
            return [item for item in await self.client.zrange(group_key(group_id, ".j"), 0, -1)
                    if isinstance(item, (bytes, str))]

    async def get_group_meta(self, group_id: str) -> dict[str, Any] | None:
        """A group saved under ``celery-taskset-meta-<id>`` (``{"result": tuple}``), if any."""
        with self._reachable:
            raw = await self.client.get(group_key(group_id))
        if raw is None:
            return None
        value = jsoncodec.loads(raw)
        return value if isinstance(value, dict) else None

    async def chord_claim_extend(self, group_id: str, claim_token: str, expires: int) -> bool:
        keys = [group_key(group_id, ".c"), group_key(group_id, ".s")]
        return bool(await self._script(CHORD_CLAIM_EXTEND_LUA, keys, [claim_token, expires]))

    async def chord_cleanup(self, group_id: str, claim_token: str, done_expires: int) -> bool:
        keys = [group_key(group_id, suffix) for suffix in (".c", ".j", ".t", ".s", ".d")]
        return bool(await self._script(CHORD_CLEANUP_LUA, keys, [claim_token, done_expires]))

    async def drop_chord_size(self, group_id: str) -> None:
        """After a chord failed: a late copy of a header task cannot fail it again."""
        with self._reachable:
            await self.client.delete(group_key(group_id, ".s"))



class _Reachable:
    """``with backend._reachable:`` around Redis calls: a connection error (redis-py's, or
    an OSError) leaves it as a :class:`BackendConnectionError` that names the masked URL;
    ``let_through`` errors and every other exception pass unchanged."""

    __slots__ = ("_backend", "_let_through")

    def __init__(self, backend: RedisBackend,
                 let_through: tuple[type[BaseException], ...] = ()) -> None:
        self._backend = backend
        self._let_through = let_through

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is None or isinstance(exc, self._let_through):
            return
        if isinstance(exc, _redis_errors()):
            raise self._backend._unreachable(exc) from exc


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
        #: per channel: resolved when Redis confirms the SUBSCRIBE (every waiter of the
        #: channel awaits it before its GET, so no PUBLISH can fall in between)
        self._confirmed: dict[str, asyncio.Future[None]] = {}

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        key = resultmeta.result_key(task_id)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(future)
        try:
            async with asyncio.timeout(timeout):
                await self._subscribe(key)
                # Read once subscribed: a result stored in between is not missed.
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
        """Subscribe to ``key`` (once for all its waiters) and wait for Redis to confirm."""
        async with self._lock:
            confirmed = self._confirmed.get(key)
            if confirmed is None:
                confirmed = asyncio.get_running_loop().create_future()
                self._confirmed[key] = confirmed
                if self._pubsub is None:
                    self._pubsub = self._backend.client.pubsub()
                await self._pubsub.subscribe(key)
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._read(self._pubsub))
        await asyncio.shield(confirmed)

    async def _unsubscribe(self, key: str) -> None:
        async with self._lock:
            if key in self._waiters:
                return  # a new waiter came meanwhile and uses the subscription
            confirmed = self._confirmed.pop(key, None)
            if confirmed is not None and not confirmed.done():
                confirmed.cancel()
            if self._pubsub is not None:
                with contextlib.suppress(*_redis_errors()):
                    await self._pubsub.unsubscribe(key)

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while self._waiters:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "message":
                    self._deliver(message["channel"], message["data"])
                elif message["type"] == "subscribe":
                    self._confirm(message["channel"])
        except _redis_errors() as exc:
            # The connection is gone: the next waiter opens a new one.
            self._pubsub = None
            self._fail_all(exc)

    def _deliver(self, channel: bytes | str, data: bytes) -> None:
        key = _text(channel)
        try:
            meta = resultmeta.decode_meta(data)
        except Exception:  # the reader must survive whatever is published
            logger.warning("Ignoring a malformed result published on %s", key)
            return
        status = meta.get("status")
        if not isinstance(status, str) or status not in states.READY_STATES:
            return
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result(meta)

    def _confirm(self, channel: bytes | str) -> None:
        key = _text(channel)
        confirmed = self._confirmed.get(key)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)

    def _fail_all(self, exc: BaseException) -> None:
        confirmations, self._confirmed = self._confirmed, {}
        for confirmed in confirmations.values():
            if not confirmed.done():
                confirmed.set_exception(self._backend._unreachable(exc))
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


def _text(channel: bytes | str) -> str:
    """A pub/sub channel name as text (redis-py gives bytes unless decoding responses)."""
    return channel.decode() if isinstance(channel, bytes) else channel
