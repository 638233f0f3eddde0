"""Chains, links and groups run by the worker; signals; the app context."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

from aio_celery import Celery, chain, exitcodes, group, resultmeta, signals, states
from aio_celery.exceptions import Retry
from aio_celery.worker import Worker, WorkerOptions

# --- canvas ---------------------------------------------------------------------------------


async def test_chain_of_three_steps(app: Celery, start_worker) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def mul(a: int, b: int) -> int:
        return a * b

    last = await chain(add.s(1, 2), add.s(3), mul.s(10)).apply_async()
    handle = await start_worker(concurrency=3, burst=True)
    assert await handle.wait() == 0
    assert await last.get(timeout=5) == 60
    second, first = last.parent, last.parent.parent  # type: ignore[union-attr]
    assert second is not None and first is not None
    assert await first.get(timeout=5) == 3
    assert await second.get(timeout=5) == 6
    # Each step's stored result names the next step as its child, which records its parent.
    assert [c.id for c in first.children] == [second.id]
    assert [c.id for c in second.children] == [last.id]
    assert last.children == []
    await last.refresh()
    assert last._meta is not None and last._meta["parent_id"] == second.id


async def test_chain_stops_at_a_failing_step(app: Celery, start_worker) -> None:
    ran: list[str] = []

    @app.task
    async def step(label: str, *_: Any) -> str:
        ran.append(label)
        if label == "b":
            raise RuntimeError("b broke")
        return label

    last = await chain(step.si("a"), step.si("b"), step.si("c")).apply_async()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert ran == ["a", "b"]
    assert last.parent is not None
    with pytest.raises(RuntimeError, match="b broke"):
        await last.parent.get(timeout=5)
    assert (await last.refresh()).state == states.PENDING


async def test_link_callback_gets_the_result(app: Celery, start_worker) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def mul(a: int, b: int) -> int:
        return a * b

    r = await add.apply_async((1, 2), link=mul.s(10))
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    assert await r.get(timeout=5) == 3
    (callback,) = r.children
    assert await callback.get(timeout=5) == 30


async def test_link_error_gets_the_failed_task_id(app: Celery, start_worker) -> None:
    errbacks: list[str] = []
    callbacks: list[Any] = []

    @app.task
    async def boom() -> None:
        raise ValueError("broken")

    @app.task
    async def on_error(task_id: str) -> str:
        errbacks.append(task_id)
        return task_id

    @app.task
    async def never(value: Any) -> None:
        callbacks.append(value)

    r = await boom.apply_async(link=never.s(), link_error=on_error.s())
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(ValueError, match="broken"):
        await r.get(timeout=5)
    # The errback ran once, with the failed task's id; the link callback never ran.
    assert errbacks == [r.id]
    assert callbacks == []


async def test_group_results(app: Celery, start_worker,
                             redis_client: redis.asyncio.Redis) -> None:
    @app.task(bind=True)
    async def where(self, i: int) -> list[Any]:
        return [i * i, self.request.group, self.request.group_index]

    gr = await group([where.s(i) for i in range(5)]).apply_async()
    handle = await start_worker(concurrency=5, burst=True)
    assert await handle.wait() == 0
    values = await gr.get(timeout=5)
    assert values == [[i * i, gr.id, i] for i in range(5)]
    assert await gr.ready()
    assert await gr.successful()
    for r in gr.results:
        raw = await redis_client.get(resultmeta.result_key(r.id))
        assert raw is not None
        assert resultmeta.decode_meta(raw)["group_id"] == gr.id


# --- signals --------------------------------------------------------------------------------


@contextlib.contextmanager
def connected(*pairs: tuple[signals.Signal, Callable[..., Any]]):
    for signal, receiver in pairs:
        signal.connect(receiver)
    try:
        yield
    finally:
        for signal, receiver in pairs:
            signal.disconnect(receiver)


async def test_signals_receive_the_right_arguments(app: Celery, start_worker) -> None:
    calls: dict[str, list[dict[str, Any]]] = {}

    def sync_receiver(name: str) -> Callable[..., None]:
        def receive(**kwargs: Any) -> None:
            calls.setdefault(name, []).append(kwargs)
        return receive

    def async_receiver(name: str) -> Callable[..., Any]:
        async def receive(**kwargs: Any) -> None:
            await asyncio.sleep(0)
            calls.setdefault(name, []).append(kwargs)
        return receive

    @app.task
    async def ok(x: int) -> int:
        return x * 2

    @app.task
    async def bad(x: int) -> None:
        raise ValueError("bad", x)

    @app.task(bind=True)
    async def again(self) -> str:
        if self.request.retries == 0:
            await self.retry(exc=KeyError("once"), countdown=0.05)
        return "second time"

    with connected((signals.worker_process_init, sync_receiver("init")),
                   (signals.worker_process_shutdown, async_receiver("shutdown")),
                   (signals.task_prerun, async_receiver("prerun")),
                   (signals.task_postrun, sync_receiver("postrun")),
                   (signals.task_success, async_receiver("success")),
                   (signals.task_failure, sync_receiver("failure")),
                   (signals.task_retry, async_receiver("retry"))):
        r_ok = await ok.delay(21)
        r_bad = await bad.apply_async((5,), kwargs={})
        r_again = await again.delay()
        # A multiplier of 2 leaves room in the window for the retry's countdown to wait in
        # memory (with 1 it is parked on the broker, and burst mode does not wait for that).
        handle = await start_worker(concurrency=1, prefetch_multiplier=2, burst=True)
        assert await handle.wait() == 0
    assert await r_ok.get(timeout=5) == 42
    assert await r_again.get(timeout=5) == "second time"
    worker = handle.worker

    assert len(calls["init"]) == 1
    assert calls["init"][0]["sender"] is worker
    assert calls["init"][0]["signal"] is signals.worker_process_init
    assert len(calls["shutdown"]) == 1
    assert calls["shutdown"][0]["sender"] is worker
    assert calls["shutdown"][0]["pid"] == os.getpid()
    assert calls["shutdown"][0]["exitcode"] == exitcodes.OK

    prerun = {c["task_id"]: c for c in calls["prerun"]}
    assert prerun[r_ok.id]["task"] is ok and prerun[r_ok.id]["sender"] is ok
    assert prerun[r_ok.id]["args"] == [21] and prerun[r_ok.id]["kwargs"] == {}
    assert prerun[r_bad.id]["args"] == [5]
    assert len(calls["prerun"]) == 4  # ok, bad, again twice

    postrun = [(c["task_id"], c["state"]) for c in calls["postrun"]]
    assert sorted(postrun) == sorted([(r_ok.id, states.SUCCESS), (r_bad.id, states.FAILURE),
                                      (r_again.id, states.RETRY),
                                      (r_again.id, states.SUCCESS)])
    assert all(c["task"] is app.tasks[c["sender"].name] for c in calls["postrun"])

    success = {c["task_id"]: c for c in calls["success"]}
    assert set(success) == {r_ok.id, r_again.id}
    assert success[r_ok.id]["result"] == 42 and success[r_ok.id]["sender"] is ok
    assert success[r_again.id]["result"] == "second time"

    (failure,) = calls["failure"]
    assert failure["sender"] is bad and failure["task_id"] == r_bad.id
    assert isinstance(failure["exception"], ValueError)
    assert failure["exception"].args == ("bad", 5)
    assert failure["args"] == [5] and failure["kwargs"] == {}
    assert "ValueError: ('bad', 5)" in failure["traceback"]

    (retry,) = calls["retry"]
    assert retry["sender"] is again
    assert retry["request"].id == r_again.id and retry["request"].retries == 0
    assert isinstance(retry["reason"], KeyError)
    assert not isinstance(retry["reason"], Retry)


async def test_failing_receiver_does_not_stop_the_task(
        app: Celery, start_worker, caplog: pytest.LogCaptureFixture) -> None:
    def broken(**_: Any) -> None:
        raise RuntimeError("receiver bug")

    @app.task
    async def ok() -> str:
        return "fine"

    with connected((signals.task_prerun, broken), (signals.task_success, broken)):
        r = await ok.delay()
        handle = await start_worker(concurrency=1, burst=True)
        assert await handle.wait() == 0
    assert await r.get(timeout=5) == "fine"
    logged = [rec for rec in caplog.records if "receiver bug" in str(rec.exc_info)]
    assert len(logged) == 2
    assert broken not in signals.task_prerun.receivers


# --- the app context ------------------------------------------------------------------------


async def test_app_context_is_entered_once_per_worker_run(app: Celery,
                                                          start_worker) -> None:
    entered = 0
    exited = 0
    pool = object()

    @app.define_app_context
    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[dict[str, Any]]:
        nonlocal entered, exited
        entered += 1
        try:
            yield {"pool": pool, "run": entered}
        finally:
            exited += 1

    @app.task
    async def uses_context() -> list[Any]:
        await asyncio.sleep(0.01)
        return [app.context["pool"] is pool, app.context["run"]]

    results = [await uses_context.delay() for _ in range(6)]
    handle = await start_worker(concurrency=3, burst=True)
    assert await handle.wait() == 0
    assert [await r.get(timeout=5) for r in results] == [[True, 1]] * 6
    assert (entered, exited) == (1, 1)
    with pytest.raises(RuntimeError, match="only available inside the app context"):
        _ = app.context

    more = [await uses_context.delay() for _ in range(2)]
    handle = await start_worker(concurrency=3, burst=True)
    assert await handle.wait() == 0
    assert [await r.get(timeout=5) for r in more] == [[True, 2]] * 2
    assert (entered, exited) == (2, 2)


async def test_app_context_failure_is_a_startup_error(
        app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    @app.define_app_context
    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[dict[str, Any]]:
        raise ConnectionRefusedError("database down")
        yield {}  # pragma: no cover

    caplog.set_level(logging.ERROR, logger="aio_celery.worker")
    worker = Worker(app, WorkerOptions(banner=False, burst=True))
    code = await asyncio.wait_for(worker.run(), 10)
    assert code == exitcodes.STARTUP_ERROR
    assert any("database down" in rec.getMessage() for rec in caplog.records)
