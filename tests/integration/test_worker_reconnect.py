"""The worker survives a lost broker connection, and gives up (BROKER_LOST) only when the
broker stays away for all of ``broker_connection_max_retries`` (for ever by default).

The worker's app talks to RabbitMQ through a :class:`~tcp_proxy.TcpProxy` that the test can
cut or pause; the test's own ``app`` publishes and reads results on the real port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import pytest
from helpers import AMQP_URL
from tcp_proxy import TcpProxy

from aio_celery import Celery, exitcodes

TIMEOUT = 15.0


async def _until(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline}s waiting until {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def worker_app(unique_name: str, redis_url: str, proxy: TcpProxy) -> Celery:
    """An app like ``app`` (same queue and backend) whose broker is the proxy."""
    parts = urlsplit(AMQP_URL)
    application = Celery(unique_name + "-via-proxy", set_as_current=False)
    application.conf.update(
        broker_url=proxy.url(parts.username or "guest", parts.password or "guest",
                             parts.path[1:] or "/"),
        result_backend=redis_url, task_default_queue=unique_name,
        broker_connection_timeout=2.0)

    @application.task(name="reconnect.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @application.task(name="reconnect.slow")
    async def slow(value: str, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return value

    return application


StartWorker = Callable[..., Awaitable[object]]


async def test_worker_reconnects_after_the_connection_is_cut(
        app: Celery, worker_app: Celery, proxy: TcpProxy, start_worker: StartWorker) -> None:
    handle = await start_worker(worker_app, concurrency=4)
    worker = handle.worker  # type: ignore[attr-defined]

    before = await app.send_task("reconnect.add", (1, 2))
    assert await before.get(timeout=TIMEOUT) == 3

    # A task in flight when the connection drops is cancelled and redelivered.
    in_flight = await app.send_task("reconnect.slow", ("survived", 0.5))
    await _until(lambda: worker.session is not None and worker.session.in_flight > 0,
                 TIMEOUT, "the slow task is running")
    old_session, accepted = worker.session, proxy.accepted
    assert proxy.cut() >= 1

    await _until(lambda: worker.session is not old_session and proxy.accepted > accepted
                 and worker.consuming.is_set(), TIMEOUT,
                 "the worker opened a new session through the proxy and consumes")
    assert not handle.task.done()  # type: ignore[attr-defined]

    assert await in_flight.get(timeout=TIMEOUT) == "survived"
    after = [await app.send_task("reconnect.add", (i, i)) for i in range(10)]
    assert [await r.get(timeout=TIMEOUT) for r in after] == [2 * i for i in range(10)]

    # Twice in a row works too (the new session is as good as the first).
    old_session = worker.session
    assert proxy.cut() >= 1
    await _until(lambda: worker.session is not old_session and worker.consuming.is_set(),
                 TIMEOUT, "the worker reconnected a second time")
    again = await app.send_task("reconnect.add", (20, 22))
    assert await again.get(timeout=TIMEOUT) == 42

    assert await handle.stop() == exitcodes.OK  # type: ignore[attr-defined]


async def test_worker_exits_broker_lost_when_the_broker_stays_away(
        app: Celery, worker_app: Celery, proxy: TcpProxy, start_worker: StartWorker) -> None:
    worker_app.conf.broker_connection_max_retries = 2
    handle = await start_worker(worker_app, concurrency=2)
    worker = handle.worker  # type: ignore[attr-defined]
    result = await app.send_task("reconnect.add", (2, 3))
    assert await result.get(timeout=TIMEOUT) == 5

    await proxy.pause()
    started = time.monotonic()
    assert proxy.cut() >= 1

    code = await asyncio.wait_for(asyncio.shield(handle.task),  # type: ignore[attr-defined]
                                  timeout=12)
    elapsed = time.monotonic() - started
    assert code == exitcodes.BROKER_LOST
    assert 0.5 <= elapsed < 12, elapsed  # 3 attempts, about 0.5 s and 1 s apart
    assert not worker.consuming.is_set()


async def test_worker_waits_out_an_outage_for_ever_by_default(
        app: Celery, worker_app: Celery, proxy: TcpProxy, start_worker: StartWorker,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    handle = await start_worker(worker_app, concurrency=2)
    worker = handle.worker  # type: ignore[attr-defined]
    assert worker.app.conf.broker_connection_max_retries is None

    await proxy.pause()
    assert proxy.cut() >= 1
    await _until(lambda: not worker.consuming.is_set(), TIMEOUT,
                 "the worker noticed the lost connection")
    # Sent while the worker is away: waits in the queue for it.
    waiting = await app.send_task("reconnect.add", (3, 4))
    await _until(lambda: "Cannot reach the broker" in caplog.text, TIMEOUT,
                 "a reconnect attempt was refused")
    assert not worker.consuming.is_set()
    assert worker.state == "waiting for broker"
    assert worker.broker_lost_since is not None
    await proxy.resume()

    await _until(worker.consuming.is_set, TIMEOUT, "the worker is back")
    assert worker.state == "ready" and worker.broker_lost_since is None
    # Logged once basic.consume is answered, a moment after "ready" (set right before it).
    await _until(lambda: "Reconnected to amqp://" in caplog.text, TIMEOUT, "the log says so")
    assert await waiting.get(timeout=TIMEOUT) == 7
    assert not handle.task.done()  # type: ignore[attr-defined]
    assert await handle.stop() == exitcodes.OK  # type: ignore[attr-defined]


async def test_worker_started_before_the_broker_waits_for_it(
        app: Celery, worker_app: Celery, proxy: TcpProxy) -> None:
    from aio_celery.worker import Worker, WorkerOptions

    await proxy.pause()
    worker = Worker(worker_app, WorkerOptions(concurrency=2, banner=False))
    task = asyncio.create_task(worker.run())
    try:
        await _until(lambda: worker.state == "waiting for broker", TIMEOUT,
                     "the worker waits for the broker")
        assert not task.done()
        await proxy.resume()
        await _until(lambda: worker.state == "ready", TIMEOUT, "the worker consumes")
        result = await app.send_task("reconnect.add", (4, 5))
        assert await result.get(timeout=TIMEOUT) == 9
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, TIMEOUT) == exitcodes.OK


async def test_no_retry_on_startup_when_turned_off(worker_app: Celery, proxy: TcpProxy,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from aio_celery.worker import Worker, WorkerOptions

    await proxy.pause()
    worker_app.conf.broker_connection_retry_on_startup = False
    worker = Worker(worker_app, WorkerOptions(concurrency=2, banner=False))
    assert await asyncio.wait_for(worker.run(), TIMEOUT) == exitcodes.STARTUP_ERROR
    assert "broker_connection_retry_on_startup is off" in caplog.text


async def test_stop_while_waiting_for_the_broker_at_startup_is_clean(
        worker_app: Celery, proxy: TcpProxy) -> None:
    from aio_celery.worker import Worker, WorkerOptions

    await proxy.pause()
    worker = Worker(worker_app, WorkerOptions(concurrency=2, banner=False))
    task = asyncio.create_task(worker.run())
    await _until(lambda: worker.state == "waiting for broker", TIMEOUT, "waiting")
    worker.request_stop()
    assert await asyncio.wait_for(task, 5) == exitcodes.OK
