"""The worker's monitoring events on the real RabbitMQ (#10 §1).

A queue of the test's own is bound to ``celeryev`` with ``#`` (as Flower's is); every test
worker has a node name of its own and the tests keep only the messages whose ``hostname``
header is that name (other tests' workers send heartbeats to the same exchange).

* task events (``-E``): received, started, succeeded/failed/retried in ``task.multi``
  batches, with Celery's fields; worker events online, heartbeat, offline, one per
  message, with the properties Celery sends;
* without ``-E`` only worker events, until :meth:`Worker.enable_task_events`;
  :meth:`Worker.send_heartbeat` sends one at once; ``--without-heartbeat`` and no ``-E``:
  nothing at all;
* a broker that blocks the publishing connection (a fake one) or is away does not slow
  the tasks: events wait in a bounded buffer and the rest are dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from helpers import FakeBroker, eventually
from pamqp import commands
from test_worker_publisher import BlockingBroker, envelope_for

from aio_celery import Celery, events
from aio_celery.exceptions import BrokerConnectionError, PublishRefusedError
from aio_celery.failover import Failover
from aio_celery.publisher import WorkerPublisher
from aio_celery.quorum import QueuePlan
from aio_celery.worker import Worker

TIMEOUT = 15.0


@dataclass
class Received:
    routing_key: str
    body: Any
    properties: dict[str, Any]


class EventTap:
    """The events of one node, as a queue bound to ``celeryev`` with ``#`` receives them."""

    def __init__(self, queue: AbstractQueue, hostname: str) -> None:
        self.queue = queue
        self.hostname = hostname
        self.messages: list[Received] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if (message.headers or {}).get("hostname") != self.hostname:
            return
        self.messages.append(Received(
            message.routing_key or "", json.loads(message.body),
            {"content_type": message.content_type,
             "content_encoding": message.content_encoding,
             "delivery_mode": int(message.delivery_mode or 0)}))

    @property
    def events(self) -> list[dict[str, Any]]:
        flat: list[dict[str, Any]] = []
        for message in self.messages:
            flat.extend(message.body if isinstance(message.body, list) else [message.body])
        return flat

    def of(self, type_: str, uuid: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events
                if e["type"] == type_ and (uuid is None or e.get("uuid") == uuid)]


@pytest.fixture
async def tap(channel: AbstractChannel, unique_name: str) -> AsyncIterator[EventTap]:
    exchange = await channel.declare_exchange("celeryev", aio_pika.ExchangeType.TOPIC,
                                              durable=True)
    queue = await channel.declare_queue(f"{unique_name}.celeryev", exclusive=True,
                                        auto_delete=True)
    await queue.bind(exchange, "#")
    tap = EventTap(queue, f"{unique_name}@events-test")
    tag = await queue.consume(tap.on_message, no_ack=True)
    yield tap
    await queue.cancel(tag)


async def test_task_and_worker_events_are_sent_as_celery_sends_them(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], tap: EventTap) -> None:
    @app.task(name="events.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="events.fail")
    async def fail() -> None:
        raise ValueError("boom")

    handle = await start_worker(hostname=tap.hostname, task_events=True,
                                heartbeat_interval=0.5)
    worker: Worker = handle.worker
    ok = await add.delay(2, y=3)
    assert await ok.get(timeout=TIMEOUT) == 5
    failed = await fail.delay()
    with pytest.raises(ValueError):
        await failed.get(timeout=TIMEOUT)
    await eventually(lambda: tap.of("task-failed", failed.id) and tap.of("worker-heartbeat"),
                     TIMEOUT, what="the failure and a heartbeat")
    assert await handle.stop() == 0
    await eventually(lambda: tap.of("worker-offline"), TIMEOUT, what="worker-offline")

    received = tap.of("task-received", ok.id)[0]
    assert received["name"] == "events.add"
    assert (received["args"], received["kwargs"]) == ("(2,)", "{'y': 3}")  # argsrepr
    assert (received["retries"], received["eta"], received["expires"]) == (0, None, None)
    assert received["root_id"] == ok.id and received["parent_id"] is None
    assert tap.of("task-started", ok.id)
    succeeded = tap.of("task-succeeded", ok.id)[0]
    assert succeeded["result"] == "5" and isinstance(succeeded["runtime"], float)
    failure = tap.of("task-failed", failed.id)[0]
    assert failure["exception"] == "ValueError('boom')"
    assert "Traceback" in failure["traceback"] and "boom" in failure["traceback"]

    every = tap.events
    for event in every:
        assert event["hostname"] == tap.hostname
        assert {"type", "timestamp", "utcoffset", "pid", "clock"} <= set(event)
        assert abs(event["timestamp"] - time.time()) < 60
    clocks = [event["clock"] for event in every]
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)  # Lamport, in order
    types = [event["type"] for event in every]
    assert types[0] == "worker-online" and types[-1] == "worker-offline"
    assert types.index("task-received") < types.index("task-started") \
        < types.index("task-succeeded")
    online = every[0]
    assert online["freq"] == 0.5 and online["sw_ident"] == "py-aio-celery"
    assert {"active", "processed", "loadavg", "sw_ver", "sw_sys"} <= set(online)
    assert every[-1]["processed"] == 2 and every[-1]["active"] == 0
    assert worker.stats.events_dropped == 0

    keys = {m.routing_key for m in tap.messages}
    assert keys == {"worker.online", "worker.heartbeat", "worker.offline", "task.multi"}
    for message in tap.messages:
        assert isinstance(message.body, list) == (message.routing_key == "task.multi")
        assert message.properties == {"content_type": "application/json",
                                      "content_encoding": "utf-8", "delivery_mode": 1}


async def test_without_task_events_only_worker_events_until_enabled(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], tap: EventTap) -> None:
    @app.task(name="events.echo")
    async def echo(value: int) -> int:
        return value

    handle = await start_worker(hostname=tap.hostname, heartbeat_interval=0.3)
    worker: Worker = handle.worker
    assert not worker.task_events_enabled
    first = await echo.delay(1)
    assert await first.get(timeout=TIMEOUT) == 1
    await eventually(lambda: len(tap.of("worker-heartbeat")) >= 2, TIMEOUT,
                     what="heartbeats after the first task")
    assert not [e for e in tap.events if e["type"].startswith("task-")]
    assert tap.of("worker-heartbeat")[-1]["processed"] == 1

    worker.enable_task_events()
    assert worker.task_events_enabled
    second = await echo.delay(2)
    assert await second.get(timeout=TIMEOUT) == 2
    await eventually(lambda: tap.of("task-succeeded", second.id), TIMEOUT,
                     what="task events once enabled")
    assert not tap.of("task-received", first.id)

    worker.send_heartbeat(5)
    await eventually(lambda: [e for e in tap.of("worker-heartbeat") if e["freq"] == 5],
                     TIMEOUT, what="the requested heartbeat")
    worker.disable_task_events()
    third = await echo.delay(3)
    assert await third.get(timeout=TIMEOUT) == 3
    assert await handle.stop() == 0
    await eventually(lambda: tap.of("worker-offline"), TIMEOUT, what="worker-offline")
    assert not tap.of("task-received", third.id)


async def test_without_heartbeat_and_task_events_nothing_is_sent(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], tap: EventTap) -> None:
    @app.task(name="events.quiet")
    async def quiet() -> str:
        return "ok"

    handle = await start_worker(hostname=tap.hostname, heartbeat_interval=None)
    worker: Worker = handle.worker
    assert await (await quiet.delay()).get(timeout=TIMEOUT) == "ok"
    assert await handle.stop() == 0
    await asyncio.sleep(0.3)  # what was sent would be here by now
    assert tap.messages == []
    assert worker.publisher is not None and worker.publisher.connection is None  # never used


async def test_worker_send_task_events_and_event_exchange_settings(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], channel: AbstractChannel,
        unique_name: str) -> None:
    exchange_name = f"{unique_name}-events"
    app.conf.update(worker_send_task_events=True, event_exchange=exchange_name)

    @app.task(name="events.setting")
    async def setting() -> int:
        return 7

    try:
        handle = await start_worker(hostname=f"{unique_name}@settings")
        # Declared as Celery's receivers declare it; the worker declares it the same way
        # (whichever came second would fail with 406 PRECONDITION_FAILED otherwise).
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "task.#")
        result = await setting.delay()
        assert await result.get(timeout=TIMEOUT) == 7
        message = await queue.get(timeout=TIMEOUT, fail=False)
        deadline = time.monotonic() + TIMEOUT
        while message is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            message = await queue.get(fail=False)
        assert message is not None and message.routing_key == "task.multi"
        assert message.headers == {"hostname": f"{unique_name}@settings"}
        assert {event["uuid"] for event in json.loads(message.body)} == {result.id}
        assert await handle.stop() == 0
    finally:
        await channel.exchange_delete(exchange_name)


async def test_task_revoked_for_a_revoked_a_terminated_and_an_expired_task(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], tap: EventTap) -> None:
    started = asyncio.Event()

    @app.task(name="events.long")
    async def long() -> None:
        started.set()
        await asyncio.sleep(60)

    handle = await start_worker(hostname=tap.hostname, task_events=True, concurrency=2)
    worker: Worker = handle.worker
    revoked_id = f"revoked-{time.time_ns()}"
    worker.revoked.add(revoked_id, time.time())
    skipped = await long.apply_async(task_id=revoked_id)
    expired = await long.apply_async(expires=-1.0)
    running = await long.delay()
    await asyncio.wait_for(started.wait(), TIMEOUT)
    assert worker.runner is not None and worker.runner.terminate(running.id)
    await eventually(lambda: len(tap.of("task-revoked")) == 3, TIMEOUT,
                     what="three task-revoked events")
    by_id = {e["uuid"]: (e["terminated"], e["signum"], e["expired"])
             for e in tap.of("task-revoked")}
    assert by_id == {skipped.id: (False, None, False), expired.id: (False, None, True),
                     running.id: (True, None, False)}
    assert await handle.stop() == 0


async def test_events_go_on_after_the_publishing_connection_is_lost(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], tap: EventTap,
        proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    new_publisher = Worker._new_publisher

    def through_proxy(self: Worker) -> WorkerPublisher:
        publisher = new_publisher(self)
        publisher.failover = Failover(proxy.url())
        return publisher

    monkeypatch.setattr(Worker, "_new_publisher", through_proxy)
    handle = await start_worker(hostname=tap.hostname, heartbeat_interval=0.2)
    await eventually(lambda: tap.of("worker-heartbeat"), TIMEOUT, what="a heartbeat")
    assert proxy.cut() == 1
    seen = len(tap.of("worker-heartbeat"))
    await eventually(lambda: len(tap.of("worker-heartbeat")) > seen + 2 and
                     proxy.open_connections == 1, TIMEOUT,
                     what="heartbeats again, on a new connection")
    assert await handle.stop() == 0


# --- a broker that cannot take events does not slow the tasks -------------------------------

async def _away_url() -> str:
    """A port where nothing listens."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return f"amqp://guest:guest@127.0.0.1:{port}/"


@pytest.mark.parametrize("broker", ["blocked", "away"])
async def test_a_blocked_or_absent_broker_does_not_slow_tasks_events_are_dropped(
        app: Celery, start_worker: Callable[..., Awaitable[Any]], broker: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake: FakeBroker | None = None
    if broker == "blocked":
        fake = BlockingBroker()
        await fake.start()
        url = f"amqp://guest:guest@127.0.0.1:{fake.port}/"
    else:
        url = await _away_url()
    new_publisher = Worker._new_publisher

    def elsewhere(self: Worker) -> WorkerPublisher:
        publisher = new_publisher(self)
        publisher.failover = Failover(url)
        return publisher

    monkeypatch.setattr(Worker, "_new_publisher", elsewhere)
    app.conf.update(result_backend=None)
    count = 600

    @app.task(name="events.noop")
    async def noop(n: int) -> None:
        pass

    try:
        handle = await start_worker(task_events=True, heartbeat_interval=0.2, concurrency=50)
        worker: Worker = handle.worker
        worker.events.buffer_limit = 100
        started = time.monotonic()
        for n in range(count):
            await noop.delay(n)
        await eventually(lambda: worker.stats.finished == count, 30.0,
                         what="every task finished")
        elapsed = time.monotonic() - started
        assert worker.stats.events_dropped >= 3 * count - 100
        assert worker.events.buffered <= 100
        assert await handle.stop() == 0
    finally:
        if fake is not None:
            await fake.close()
    if fake is not None:
        assert fake.methods(commands.Exchange.Declare)  # it got that far, then blocked
        assert not fake.methods(commands.Basic.Publish)
    # No task waited for an event: the whole drain took no longer than the tasks alone
    # would on a loaded machine (a waiting publish would take broker_publish_timeout).
    assert elapsed < 20.0


async def test_an_event_the_broker_refuses_does_not_make_a_follow_up_refused(
        app: Celery, amqp_url: str, unique_name: str) -> None:
    """An event sent to an exchange deleted meanwhile closes the publishing channel (404):
    a follow-up awaiting its confirm then was lost with the channel, to be sent again, not
    refused for good (which would fail its task)."""
    publisher = WorkerPublisher(Failover(amqp_url), plan=QueuePlan(), publish_timeout=TIMEOUT)
    try:
        await publisher.publish(envelope_for(app, unique_name), unique_name)  # connected
        assert publisher.publish_nowait(b"{}", events.properties("x@y"), "worker.heartbeat",
                                        f"{unique_name}-no-such-exchange",
                                        backlog_limit=1 << 20)
        with pytest.raises(BrokerConnectionError) as lost:
            await publisher.publish(envelope_for(app, unique_name), unique_name)
        assert not isinstance(lost.value, PublishRefusedError)
        assert "404" in str(lost.value) or "closed" in str(lost.value)
        await publisher.publish(envelope_for(app, unique_name), unique_name)  # reconnects
    finally:
        await publisher.close()
