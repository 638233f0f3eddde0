"""Redis goes away while tasks run: a finished task keeps its result and its message until
Redis is back, and never runs again (issue #9, section 4).

The worker's app reaches Redis through a :class:`~tcp_proxy.TcpProxy` that the test cuts
and pauses (the shared Redis itself is never stopped); the test reads results and counts
runs on the real Redis port.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractConnection
from helpers import AMQP_URL, eventually, ready_count, stays
from tcp_proxy import TcpProxy

from aio_celery import Celery, exitcodes, states
from aio_celery.poison import DeathTable, Guard, task_key
from aio_celery.worker import Worker, WorkerOptions

#: how long Redis stays away in the long test (the issue asks for 30 s)
OUTAGE_SECONDS = 30.0


@pytest.fixture
async def proxied_app(unique_name: str, redis_db: int,
                      redis_proxy: TcpProxy) -> AsyncIterator[Celery]:
    """An app on the test's queue whose result backend is the proxy."""
    application = Celery(unique_name + "-redis-proxy", set_as_current=False)
    application.conf.update(
        broker_url=AMQP_URL, task_default_queue=unique_name,
        result_backend=f"redis://127.0.0.1:{redis_proxy.port}/{redis_db}")
    async with application.setup():
        yield application


def _outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    messages = [r.getMessage() for r in caplog.records if r.name == "aio_celery.worker"]
    down = [m for m in messages if m.startswith("The result backend") and " failed: " in m]
    back = [m for m in messages if m.startswith("The result backend") and "answers again" in m]
    return len(down), len(back)


async def test_a_30s_redis_outage_runs_each_task_once_and_stores_every_result(
        proxied_app: Celery, redis_proxy: TcpProxy, start_worker,
        amqp: AbstractConnection, unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery")
    runs: collections.Counter[int] = collections.Counter()
    release = asyncio.Event()

    @proxied_app.task
    async def work(i: int) -> int:
        runs[i] += 1
        if i < 4:  # the first ones are in flight when Redis goes
            await release.wait()
        else:
            await asyncio.sleep(0.2)
        return i * 10

    results = [await work.delay(i) for i in range(12)]
    handle = await start_worker(proxied_app, concurrency=4, burst=True)
    await eventually(lambda: len(runs) == 4, what="four tasks in flight")
    redis_proxy.cut()
    await redis_proxy.pause()
    release.set()
    # Every task runs during the outage (no bound is reached), once, and none is acked.
    await eventually(lambda: len(runs) == 12, timeout=10, what="all twelve tasks run")
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 12, timeout=10, what="twelve results wait")
    # The rest of the outage: Redis refuses, nothing runs again, nothing is acked.
    await stays(lambda: max(runs.values()) == 1 and handle.worker.stats.finished == 0,
                duration=OUTAGE_SECONDS - 2)
    assert _outage_lines(caplog) == (1, 0)

    await redis_proxy.resume()
    assert await handle.wait(timeout=30) == exitcodes.OK
    assert runs == collections.Counter(range(12)), "a task ran more than once"
    for i, result in enumerate(results):
        meta = await proxied_app.backend.get_meta(result.id)
        assert meta is not None and meta["status"] == states.SUCCESS, (i, meta)
        assert meta["result"] == i * 10
    assert await ready_count(amqp, unique_name) == 0  # every message acked, none requeued
    assert _outage_lines(caplog) == (1, 1)


async def test_no_new_task_starts_while_max_pending_results_wait(
        proxied_app: Celery, redis_proxy: TcpProxy, start_worker, amqp: AbstractConnection,
        unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery")
    proxied_app.conf.update(worker_max_pending_results=2)
    runs: list[int] = []

    @proxied_app.task
    async def work(i: int) -> int:
        runs.append(i)
        return i

    results = [await work.delay(i) for i in range(5)]
    await redis_proxy.pause()  # refused from the start
    handle = await start_worker(proxied_app, concurrency=1, burst=True)
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 2, what="two results waiting")
    # The slot is free, three messages are there, and still none starts.
    await stays(lambda: runs == [0, 1] and session.free_slots == 1, duration=1.5)
    assert any("worker_max_pending_results" in r.getMessage() for r in caplog.records)

    await redis_proxy.resume()
    assert await handle.wait(timeout=20) == exitcodes.OK
    assert runs == [0, 1, 2, 3, 4]
    assert [(await r.refresh()).state for r in results] == [states.SUCCESS] * 5
    assert await ready_count(amqp, unique_name) == 0


async def test_chord_part_waits_for_redis_and_completes_the_chord(
        proxied_app: Celery, redis_proxy: TcpProxy, start_worker) -> None:
    from aio_celery import chord

    runs: collections.Counter[str] = collections.Counter()
    release = asyncio.Event()

    @proxied_app.task
    async def part(i: int) -> int:
        runs[f"part{i}"] += 1
        await release.wait()
        return i

    @proxied_app.task
    async def total(values: list[int]) -> int:
        runs["total"] += 1
        return sum(values)

    result = await chord([part.s(i) for i in range(3)], total.s()).apply_async()
    handle = await start_worker(proxied_app, concurrency=3, burst=True)
    await eventually(lambda: len(runs) == 3, what="the header running")
    redis_proxy.cut()
    await redis_proxy.pause()
    release.set()
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 3, what="three parts waiting")
    await redis_proxy.resume()
    assert await handle.wait(timeout=20) == exitcodes.OK
    assert runs == {"part0": 1, "part1": 1, "part2": 1, "total": 1}
    assert (await proxied_app.backend.get_meta(result.id) or {}).get("result") == 3


async def test_a_warm_shutdown_gives_waiting_results_their_time(
        proxied_app: Celery, redis_proxy: TcpProxy, start_worker, amqp: AbstractConnection,
        unique_name: str) -> None:
    """Redis comes back within the shutdown timeout: the results are stored and the
    messages acknowledged, not returned."""
    runs: list[int] = []

    @proxied_app.task
    async def work(i: int) -> int:
        runs.append(i)
        return i

    results = [await work.delay(i) for i in range(3)]
    await redis_proxy.pause()
    handle = await start_worker(proxied_app, concurrency=3, shutdown_timeout=15)
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 3, what="three results waiting")
    stopping = asyncio.ensure_future(handle.stop())
    await stays(lambda: not stopping.done(), duration=0.5)
    await redis_proxy.resume()
    assert await stopping == exitcodes.OK
    assert sorted(runs) == [0, 1, 2]
    assert [(await r.refresh()).state for r in results] == [states.SUCCESS] * 3
    assert await ready_count(amqp, unique_name) == 0


async def test_finished_tasks_waiting_for_redis_do_not_hold_back_an_isolated_suspect(
        proxied_app: Celery, redis_proxy: TcpProxy, amqp: AbstractConnection,
        unique_name: str) -> None:
    """A redelivered task that died before runs alone: it waits for the *running* tasks.
    Tasks whose body is over and that only wait for Redis are not running any more: the
    suspect starts while Redis is still away (it used to wait for Redis to come back)."""
    started: list[str] = []

    @proxied_app.task(name="mark", bind=True)
    async def mark(self: object) -> None:
        started.append(str(self.request.id))  # type: ignore[attr-defined]

    innocent = [await mark.delay() for _ in range(2)]
    suspect = await mark.delay()
    channel = await amqp.channel()  # take all three unacked, then give them back: redelivered
    queue = await channel.get_queue(unique_name, ensure=False)
    for _ in range(3):
        await queue.get(no_ack=False)
    await channel.close()
    deaths = DeathTable(capacity=16)
    deaths.record([task_key(suspect.id), task_key("a-neighbour")])  # died with another
    await redis_proxy.pause()
    worker = Worker(proxied_app, WorkerOptions(concurrency=5, burst=True, banner=False),
                    guard=Guard(3, None, None, deaths))
    run = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: suspect.id in started, timeout=5,
                         what="the suspect started while two results wait for Redis")
        assert set(started) == {r.id for r in innocent} | {suspect.id}
        await redis_proxy.resume()
        assert await asyncio.wait_for(run, 30) == exitcodes.OK
    finally:
        if not run.done():
            worker.request_stop(cold=True)
            await asyncio.wait_for(run, 10)
        deaths.close()
    assert [(await r.refresh()).state for r in (*innocent, suspect)] == [states.SUCCESS] * 3


async def test_a_result_waiting_past_the_unacked_max_age_is_warned_about_as_waiting(
        proxied_app: Celery, redis_proxy: TcpProxy, start_worker,
        caplog: pytest.LogCaptureFixture) -> None:
    """The aging sweep warns about deliveries unacknowledged for worker_unacked_max_age. A
    task that finished and only waits for Redis gets the warning that fits it (bring the
    backend back), not the one for a long run (raise consumer_timeout or ack early)."""
    caplog.set_level(logging.WARNING, logger="aio_celery.worker")

    @proxied_app.task
    async def quick() -> int:
        return 1

    await redis_proxy.pause()
    handle = await start_worker(proxied_app, concurrency=2, unacked_max_age=1.0,
                                eta_horizon=0.5)
    await quick.delay()
    await eventually(lambda: any("finished but its result or follow-up messages still wait"
                                 in r.getMessage() for r in caplog.records),
                     timeout=5, what="the waiting result warned about")
    assert not any("has run unacknowledged" in r.getMessage() for r in caplog.records)
    await redis_proxy.resume()
    assert await handle.stop(timeout=20) == exitcodes.OK
