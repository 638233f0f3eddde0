"""Every Redis call of the result backend turns a connection error into one
BackendConnectionError that names the masked URL (one guard, not a block per call)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from aio_celery.backend import STORE_RESULTS_LUA, RedisBackend
from aio_celery.exceptions import BackendConnectionError

#: nothing listens on port 1: every call fails to connect at once
URL = "redis://:secretpw@127.0.0.1:1/0"

CALLS: dict[str, Callable[[RedisBackend], Awaitable[object]]] = {
    "get_meta": lambda b: b.get_meta("t"),
    "forget": lambda b: b.forget("t"),
    "wait_for": lambda b: b.wait_for("t", 5.0),
    "script": lambda b: b._script(STORE_RESULTS_LUA, ["k"], [0, "v"]),
    "set_chord_size": lambda b: b.set_chord_size("g", 2),
    "chord_results": lambda b: b.chord_results("g"),
    "get_group_meta": lambda b: b.get_group_meta("g"),
    "drop_chord_size": lambda b: b.drop_chord_size("g"),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_an_unreachable_redis_is_one_error_naming_the_masked_url(call: str) -> None:
    backend = RedisBackend(URL, socket_timeout=2.0)
    try:
        with pytest.raises(BackendConnectionError) as info:
            await CALLS[call](backend)
    finally:
        await backend.close()
    import redis.exceptions  # the library only (no server); unit modules load without it

    text = str(info.value)
    assert "redis://:***@127.0.0.1:1/0 unreachable" in text and "secretpw" not in text
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)


def test_the_guard_lets_other_errors_and_the_waits_timeout_through() -> None:
    backend = RedisBackend(URL)
    with pytest.raises(ValueError, match="not a connection error"), backend._reachable:
        raise ValueError("not a connection error")
    with pytest.raises(TimeoutError, match="waited"), backend._waiting:
        raise TimeoutError("waited")  # asyncio.timeout's: the wait is over, Redis is fine
    with pytest.raises(BackendConnectionError) as info, backend._reachable:
        raise TimeoutError("a socket timeout")  # an OSError elsewhere: unreachable
    assert isinstance(info.value.__cause__, TimeoutError)
