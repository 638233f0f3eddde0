"""A follow-up message (chain step, callback, ``retry()``) that cannot be published never
loses the task's message and never runs the task again (issue #9, section 3).

A refusal for good (PRECONDITION_FAILED) is stored as the task's FAILURE, naming the step
and the cause; a broker that is away for a while (the worker's publishing connection cut
through a :class:`~tcp_proxy.TcpProxy`) is waited for, with the task's message
unacknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from helpers import AMQP_URL, eventually, ready_count, stays
from tcp_proxy import TcpProxy

from aio_celery import Celery, Task, chain, exitcodes, states
from aio_celery.exceptions import PublishRefusedError
from aio_celery.failover import Failover
from aio_celery.publisher import WorkerPublisher
from aio_celery.worker import Worker


def _worker_lines(caplog: pytest.LogCaptureFixture, text: str,
                  level: int = logging.WARNING) -> list[str]:
    """The worker's log lines with ``text``, but for the publisher's note that its
    connection ended (with the refusal's reason), which the next use of that connection
    writes: a heartbeat event's may come before the test ends."""
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("aio_celery") and r.levelno >= level and text in r.getMessage()
            and "publishing connection" not in r.getMessage()]


async def test_a_refused_chain_step_is_stored_as_failure_naming_it(
        app: Celery, start_worker, channel: AbstractChannel, amqp: AbstractConnection,
        unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """The next step's queue exists with other arguments: declaring it is refused
    (PRECONDITION_FAILED). The first task ran once, its FAILURE names the step and the
    cause, its message is acknowledged, and the refusal is logged once."""
    other = f"{unique_name}-other"
    await channel.declare_queue(other, durable=True, arguments={"x-max-priority": 7})
    runs: collections.Counter[str] = collections.Counter()

    @app.task
    async def first() -> int:
        runs["first"] += 1
        return 1

    @app.task(queue=other)
    async def second(value: int) -> int:
        runs["second"] += 1
        return value + 1

    last = await chain(first.s(), second.s()).apply_async()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait(timeout=15) == exitcodes.OK
    assert runs == {"first": 1}
    assert last.parent is not None
    with pytest.raises(PublishRefusedError, match=r"chain step .*second.*PRECONDITION_FAILED"):
        await last.parent.get(timeout=5)
    # The step that will never run is failed too, so that waiting for the chain ends.
    with pytest.raises(PublishRefusedError, match="PRECONDITION_FAILED"):
        await last.get(timeout=5)
    assert await ready_count(amqp, unique_name) == 0
    assert await ready_count(amqp, other) == 0
    assert len(_worker_lines(caplog, "PRECONDITION_FAILED")) == 1


async def test_a_refused_link_callback_fails_the_task_but_not_the_chain_step_already_sent(
        app: Celery, start_worker, channel: AbstractChannel, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    other = f"{unique_name}-other"
    await channel.declare_queue(other, durable=True, arguments={"x-max-priority": 7})
    runs: collections.Counter[str] = collections.Counter()

    @app.task
    async def first() -> int:
        runs["first"] += 1
        return 1

    @app.task
    async def second(value: int) -> int:
        runs["second"] += 1
        return value + 1

    @app.task(queue=other)
    async def audit(value: int) -> None:
        runs["audit"] += 1

    last = await chain(first.s().set(link=audit.s()), second.s()).apply_async()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait(timeout=15) == exitcodes.OK
    assert runs == {"first": 1, "second": 1}
    assert await last.get(timeout=5) == 2  # the step was sent before the refusal
    assert last.parent is not None
    with pytest.raises(PublishRefusedError, match=r"link callback .*audit"):
        await last.parent.get(timeout=5)
    assert len(_worker_lines(caplog, "PRECONDITION_FAILED")) == 1


async def events_connected(handle: Any) -> None:
    """Wait for the publishing connection that worker-online opened at start: the cut
    must find it open (one still in its handshake would slip past the cut)."""
    publisher = handle.worker.publisher
    await eventually(lambda: publisher.exchange_ready("celeryev"), 10.0,
                     what="the publishing connection open, the event exchange declared")


@pytest.fixture
def publishing_via_proxy(app: Celery, proxy: TcpProxy,
                         monkeypatch: pytest.MonkeyPatch) -> Celery:
    """The test's app, whose workers publish (on their second connection, connected on
    first send) through the proxy, while their consumer connects to RabbitMQ directly."""
    parts = urlsplit(AMQP_URL)
    url = proxy.url(parts.username or "guest", parts.password or "guest",
                    parts.path[1:] or "/")
    new_publisher = Worker._new_publisher

    def via_proxy(self: Worker) -> WorkerPublisher:
        publisher = new_publisher(self)
        publisher.failover = Failover(url)
        return publisher

    monkeypatch.setattr(Worker, "_new_publisher", via_proxy)
    app.conf.update(broker_connection_timeout=1.0, broker_publish_timeout=2.0)
    return app


async def test_a_chain_step_waits_for_the_broker_and_the_first_task_runs_once(
        publishing_via_proxy: Celery, proxy: TcpProxy, start_worker,
        amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    app = publishing_via_proxy
    caplog.set_level(logging.INFO, logger="aio_celery")
    runs: collections.Counter[str] = collections.Counter()
    release = asyncio.Event()

    @app.task
    async def first() -> int:
        runs["first"] += 1
        await release.wait()
        return 1

    @app.task
    async def second(value: int) -> int:
        runs["second"] += 1
        return value + 1

    last = await chain(first.s(), second.s()).apply_async()
    handle = await start_worker(app, concurrency=2, burst=True)
    await events_connected(handle)
    await eventually(lambda: runs["first"] == 1, what="the first step running")
    proxy.cut()
    await proxy.pause()
    release.set()  # the step is sent while the publisher's connection is down
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 1, timeout=10, what="the step waiting")
    # The outage goes on (connections refused): the task does not run again.
    await stays(lambda: runs == {"first": 1} and session.pending_results == 1, duration=3)
    await proxy.resume()
    assert await handle.wait(timeout=30) == exitcodes.OK
    assert runs == {"first": 1, "second": 1}
    assert await last.get(timeout=5) == 2
    assert await ready_count(amqp, unique_name) == 0
    assert len(_worker_lines(caplog, "Publishing follow-up messages")) == 2  # down, back


async def test_a_retry_that_cannot_be_published_is_sent_after_the_body_without_rerunning_it(
        publishing_via_proxy: Celery, proxy: TcpProxy, start_worker,
        amqp: AbstractConnection, unique_name: str) -> None:
    app = publishing_via_proxy
    runs: list[int] = []
    release = asyncio.Event()

    @app.task(bind=True)
    async def flaky(self: Task) -> str:
        runs.append(self.request.retries)
        if self.request.retries == 0:
            await release.wait()
            await self.retry(countdown=0)
        return "done"

    result = await flaky.delay()
    handle = await start_worker(app, concurrency=2, burst=True)
    await events_connected(handle)
    await eventually(lambda: runs == [0], what="the first run")
    proxy.cut()
    await proxy.pause()
    release.set()
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 1, timeout=10, what="the retry waiting")
    await proxy.resume()
    assert await handle.wait(timeout=30) == exitcodes.OK
    assert runs == [0, 1]
    assert await result.get(timeout=5) == "done"
    assert (await result.refresh()).state == states.SUCCESS
    assert await ready_count(amqp, unique_name) == 0




async def test_a_link_error_waits_for_the_broker_and_the_failed_task_runs_once(
        publishing_via_proxy: Celery, proxy: TcpProxy, start_worker,
        amqp: AbstractConnection, unique_name: str) -> None:
    app = publishing_via_proxy
    runs: collections.Counter[str] = collections.Counter()
    release = asyncio.Event()

    @app.task
    async def boom() -> None:
        runs["boom"] += 1
        await release.wait()
        raise ValueError("broken")

    @app.task
    async def on_error(task_id: str) -> str:
        runs["on_error"] += 1
        return task_id

    result = await boom.apply_async(link_error=on_error.s())
    handle = await start_worker(app, concurrency=2, burst=True)
    await events_connected(handle)
    await eventually(lambda: runs["boom"] == 1, what="the task running")
    proxy.cut()
    await proxy.pause()
    release.set()
    session = handle.worker.session
    await eventually(lambda: session.pending_results == 1, timeout=10, what="the errback waiting")
    await proxy.resume()
    assert await handle.wait(timeout=30) == exitcodes.OK
    assert runs == {"boom": 1, "on_error": 1}
    with pytest.raises(ValueError, match="broken"):
        await result.get(timeout=5)
    assert await ready_count(amqp, unique_name) == 0
