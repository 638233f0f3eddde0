"""Task states as stored in Redis, ignore_result, retries and ``self.request``."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from typing import Any

import pytest
import redis.asyncio
from helpers import eventually

from aio_celery import Celery, resultmeta, states
from aio_celery.exceptions import MaxRetriesExceededError, RemoteTaskError

# --- states ---------------------------------------------------------------------------------


async def test_retry_state_is_visible_while_the_retry_is_pending(
        app: Celery, start_worker) -> None:
    @app.task(bind=True)
    async def flaky(self) -> str:
        if self.request.retries == 0:
            await self.retry(countdown=1.0, exc=KeyError("not yet"))
        return "done"

    r = await flaky.delay()
    handle = await start_worker(concurrency=2)
    try:
        async def in_retry() -> bool:
            return (await r.refresh()).state == states.RETRY

        await eventually(in_retry, what="RETRY stored")
        assert isinstance(r.result, KeyError)
        assert r.result.args == ("not yet",)
        assert r.traceback is not None and "KeyError" in r.traceback
        assert r.date_done is None  # not a ready state
        assert await r.get(timeout=5) == "done"
        assert r.state == states.SUCCESS
    finally:
        assert await handle.stop() == 0


@pytest.mark.parametrize("where", ["app", "task"])
async def test_started_state_when_tracking_is_on(app: Celery, start_worker,
                                                 where: str) -> None:
    if where == "app":
        app.conf.update(task_track_started=True)
    release = asyncio.Event()
    options = {"track_started": True} if where == "task" else {}

    @app.task(**options)
    async def slow() -> str:
        await release.wait()
        return "finished"

    r = await slow.delay()
    handle = await start_worker(concurrency=1, hostname="celery@tracker")
    try:
        async def started() -> bool:
            return (await r.refresh()).state == states.STARTED

        await eventually(started, what="STARTED stored")
        assert r.result["hostname"] == "celery@tracker"
        assert isinstance(r.result["pid"], int)
        release.set()
        assert await r.get(timeout=5) == "finished"
        assert r.state == states.SUCCESS
    finally:
        release.set()
        assert await handle.stop() == 0


async def test_no_started_state_by_default(app: Celery, start_worker) -> None:
    release = asyncio.Event()
    running = asyncio.Event()

    @app.task
    async def slow() -> str:
        running.set()
        await release.wait()
        return "finished"

    r = await slow.delay()
    handle = await start_worker(concurrency=1)
    try:
        await asyncio.wait_for(running.wait(), 5)
        await asyncio.sleep(0.1)
        assert (await r.refresh()).state == states.PENDING
        release.set()
        assert await r.get(timeout=5) == "finished"
    finally:
        release.set()
        assert await handle.stop() == 0


async def test_ignore_result_per_task_and_per_message(
        app: Celery, start_worker, redis_client: redis.asyncio.Redis) -> None:
    ran: list[str] = []

    @app.task(ignore_result=True)
    async def quiet(label: str) -> str:
        ran.append(label)
        return label

    @app.task
    async def loud(label: str) -> str:
        ran.append(label)
        return label

    r_task = await quiet.delay("task option")
    r_message = await loud.apply_async(("message option",), ignore_result=True)
    r_override = await quiet.apply_async(("message overrides task",), ignore_result=False)
    r_control = await loud.delay("control")
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    assert sorted(ran) == sorted(["task option", "message option", "message overrides task",
                                  "control"])
    assert await r_control.get(timeout=5) == "control"
    assert await r_override.get(timeout=5) == "message overrides task"
    for r in (r_task, r_message):
        assert await redis_client.exists(resultmeta.result_key(r.id)) == 0
        assert (await r.refresh()).state == states.PENDING


async def test_failure_with_ignore_result_stores_nothing(
        app: Celery, start_worker, redis_client: redis.asyncio.Redis) -> None:
    @app.task(ignore_result=True)
    async def boom() -> None:
        raise RuntimeError("nobody listens")

    r = await boom.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await redis_client.exists(resultmeta.result_key(r.id)) == 0


async def test_a_task_that_calls_sys_exit_fails_and_the_client_survives_its_result(
        app: Celery, start_worker) -> None:
    """``sys.exit(3)`` (or a KeyboardInterrupt, a GeneratorExit) in a task is that task's
    FAILURE: the worker goes on, and the client's ``get()`` raises ``RemoteTaskError``
    instead of exiting (or being killed by SIGINT) itself."""
    @app.task
    async def quits(how: str) -> None:
        await asyncio.sleep(0)
        if how == "exit":
            sys.exit(3)
        raise {"interrupt": KeyboardInterrupt, "generator": GeneratorExit}[how]("why")

    @app.task
    async def after() -> str:
        return "still here"

    hows = ["exit", "interrupt", "generator"]
    failing = [await quits.delay(how) for how in hows]
    handle = await start_worker(concurrency=1)
    assert await (await after.delay()).get(timeout=5) == "still here"
    assert not handle.task.done()
    for how, r in zip(hows, failing, strict=True):
        with pytest.raises(RemoteTaskError) as raised:
            await r.get(timeout=5)
        assert r.state == states.FAILURE
        stored = await app.backend.get_meta(r.id)
        assert stored is not None
        name = {"exit": "SystemExit", "interrupt": "KeyboardInterrupt",
                "generator": "GeneratorExit"}[how]
        assert stored["result"] == {"exc_type": name, "exc_module": "builtins",
                                    "exc_message": [3] if how == "exit" else ["why"]}
        assert raised.value.exc_type == name
        assert isinstance(await r.get(propagate=False), RemoteTaskError)
    assert await handle.stop() == 0


# --- retries --------------------------------------------------------------------------------


async def test_retry_keeps_id_and_counts_retries_until_success(
        app: Celery, start_worker) -> None:
    seen: list[tuple[str | None, int, list[Any]]] = []

    @app.task(bind=True)
    async def flaky(self, x: int) -> str:
        seen.append((self.request.id, self.request.retries, list(self.request.args)))
        if self.request.retries < 2:
            await self.retry(countdown=0.1)
        return f"ok after {self.request.retries}"

    r = await flaky.delay(5)
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    assert await r.get(timeout=5) == "ok after 2"
    assert seen == [(r.id, 0, [5]), (r.id, 1, [5]), (r.id, 2, [5])]


async def test_max_retries_exceeded_stores_max_retries_exceeded_error(
        app: Celery, start_worker) -> None:
    runs = 0

    @app.task(bind=True, max_retries=1)
    async def hopeless(self) -> None:
        nonlocal runs
        runs += 1
        await self.retry(countdown=0.05)

    r = await hopeless.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(MaxRetriesExceededError, match="Can't retry"):
        await r.get(timeout=5)
    assert r.state == states.FAILURE
    assert runs == 2


async def test_max_retries_exceeded_with_exc_stores_that_exception(
        app: Celery, start_worker) -> None:
    runs = 0

    @app.task(bind=True, max_retries=2)
    async def hopeless(self) -> None:
        nonlocal runs
        runs += 1
        await self.retry(exc=LookupError("still gone", runs), countdown=0.05)

    r = await hopeless.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(LookupError) as info:
        await r.get(timeout=5)
    assert info.value.args == ("still gone", 3)
    assert r.state == states.FAILURE
    assert runs == 3


async def test_autoretry_for_retries_then_fails_with_the_original_exception(
        app: Celery, start_worker) -> None:
    attempts: list[int] = []

    @app.task(bind=True, autoretry_for=(ValueError,), retry_backoff=False, retry_jitter=False,
              default_retry_delay=0.1, max_retries=2)
    async def always_bad(self) -> None:
        attempts.append(self.request.retries)
        raise ValueError("nope", self.request.retries)

    r = await always_bad.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(ValueError) as info:
        await r.get(timeout=5)
    assert info.value.args == ("nope", 2)
    assert attempts == [0, 1, 2]


async def test_autoretry_for_succeeds_after_retries(app: Celery, start_worker) -> None:
    attempts: list[tuple[float, int]] = []

    @app.task(bind=True, autoretry_for=(ValueError,), retry_backoff=False, retry_jitter=False,
              default_retry_delay=0.2, max_retries=3)
    async def flaky(self) -> int:
        attempts.append((time.monotonic(), self.request.retries))
        if self.request.retries < 2:
            raise ValueError("transient")
        return self.request.retries

    r = await flaky.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await r.get(timeout=5) == 2
    assert [n for _, n in attempts] == [0, 1, 2]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.15 for gap in gaps), f"default_retry_delay not honoured: {gaps}"


async def test_exception_not_in_autoretry_for_fails_at_once(app: Celery,
                                                            start_worker) -> None:
    runs = 0

    @app.task(autoretry_for=(ValueError,), default_retry_delay=0.05)
    async def other_error() -> None:
        nonlocal runs
        runs += 1
        raise TypeError("not retried")

    r = await other_error.delay()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(TypeError, match="not retried"):
        await r.get(timeout=5)
    assert runs == 1


# --- self.request ---------------------------------------------------------------------------


async def test_request_fields(app: Celery, start_worker, unique_name: str) -> None:
    captured: dict[str, Any] = {}

    @app.task(bind=True)
    async def inner(self, a: int, b: int, k: str = "") -> int:
        req = self.request
        captured.update(
            id=req.id, task=req.task, args=req.args, kwargs=req.kwargs, retries=req.retries,
            root_id=req.root_id, parent_id=req.parent_id,
            routing_key=req.delivery_info.get("routing_key"), hostname=req.hostname,
            is_eager=req.is_eager,
        )
        return a + b

    @app.task(bind=True)
    async def outer(self) -> str:
        child = await inner.apply_async((1, 2), {"k": "v"})
        return child.id

    r = await outer.delay()
    handle = await start_worker(concurrency=2, burst=True, hostname="celery@test-node")
    assert await handle.wait() == 0
    inner_id = await r.get(timeout=5)
    assert await app.AsyncResult(inner_id).get(timeout=5) == 3
    assert captured == {
        "id": inner_id,
        "task": inner.name,
        "args": [1, 2],
        "kwargs": {"k": "v"},
        "retries": 0,
        "root_id": r.id,
        "parent_id": r.id,
        "routing_key": unique_name,
        "hostname": "celery@test-node",
        "is_eager": False,
    }
    # The parent's stored result lists the task it started.
    assert [c.id for c in r.children] == [inner_id]


async def test_a_retry_keeps_queue_priority_expiry_and_time_limits(
        app: Celery, start_worker, unique_name: str) -> None:
    """Like Celery, a retry goes back to the queue it came from, with the same priority,
    expiry and time limits (not to the task's default queue with none of them)."""
    seen: list[dict[str, Any]] = []

    @app.task(name="retry.keeps", bind=True, max_retries=1)
    async def keeps(self) -> str:
        request = self.request
        seen.append({"queue": request.delivery_info["routing_key"],
                     "priority": request.delivery_info["priority"],
                     "expires": request.expires, "timelimit": request.timelimit,
                     "retries": request.retries})
        if request.retries == 0:
            await self.retry(countdown=0)
        return "done"

    other = f"{unique_name}-a"
    result = await keeps.apply_async(queue=other, priority=3, expires=600,
                                     soft_time_limit=50, time_limit=60)
    await start_worker(queues=(other,), concurrency=2)
    assert await result.get(timeout=10) == "done"
    first, second = seen
    assert second["retries"] == 1
    for key in ("queue", "priority", "expires", "timelimit"):
        assert second[key] == first[key], key
    assert second["queue"] == other
    assert second["priority"] == 3
    assert second["timelimit"] == (60.0, 50.0)
    assert second["expires"] is not None
