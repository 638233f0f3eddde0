"""One Lamport clock per worker process (Celery's ``app.clock``): the remote control mailbox
moves it past each request's clock and forward for each reply, the event dispatcher
forward for each event, so an event sent after a request carries a later clock. The
mailbox runs here on a fake connection that hands it deliveries (no broker)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from kombu.clocks import LamportClock as KombuClock

from aio_celery import Celery
from aio_celery.amqp.connection import Delivery
from aio_celery.amqp.wire import Deliver, Properties, decode_properties
from aio_celery.clocks import LamportClock
from aio_celery.control.mailbox import Mailbox
from aio_celery.worker.events import EventDispatcher
from aio_celery.worker.stats import Stats

PING = json.loads((Path(__file__).resolve().parents[1] / "messages"
                   / "pidbox_request_ping.json").read_text())
DEADLINE = 5.0


def test_forward_and_adjust_as_kombus_clock() -> None:
    ours, kombus = LamportClock(), KombuClock()
    for step in ("forward", 5, "forward", 2, 2, "forward", 40, "forward"):
        if step == "forward":
            assert ours.forward() == kombus.forward()
        else:
            assert ours.adjust(int(step)) == kombus.adjust(int(step))
    assert ours.value == kombus.value == 42


class PingNode:
    """Enough of a node for ``ping``."""

    def __init__(self) -> None:
        self.nodename = "w1@h1"  # matched by the recorded request's pattern w*@h?
        self.app = Celery("clock-test")


class FakeConnection:
    """What the mailbox uses of an AMQPConnection: declares succeed, ``consume`` keeps
    the callback (the test delivers through it), ``publish`` records the replies."""

    def __init__(self) -> None:
        self.deliver: Any = None
        self.replies: list[tuple[bytes, bytes]] = []
        self.replied = asyncio.Event()
        self._closed = asyncio.Event()
        self.is_open = True

    async def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def queue_declare(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def consume(self, queue: str, callback: Any, *, no_ack: bool) -> None:
        self.deliver = callback

    async def publish(self, body: bytes, properties: bytes, routing_key: str,
                      exchange: str) -> None:
        self.replies.append((body, properties))
        self.replied.set()

    async def closed(self) -> str:
        await self._closed.wait()
        return "closed by the test"

    async def close(self) -> None:
        self.is_open = False
        self._closed.set()


def ping_request(clock: int) -> Delivery:
    properties = Properties(content_type=PING["content_type"],
                            content_encoding=PING["content_encoding"],
                            headers={**PING["headers"], "clock": clock})
    deliver = Deliver(consumer_tag="ctag", delivery_tag=1, redelivered=False,
                      exchange="celery.pidbox", routing_key="")
    return Delivery(deliver, properties, PING["body"].encode())


class RecordingPublisher:
    """What the event dispatcher needs of a WorkerPublisher: the events sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def declare_exchange(self, name: str, kind: str, *, durable: bool = True) -> None:
        pass

    def exchange_ready(self, name: str) -> bool:
        return True

    def publish_nowait(self, body: bytes, properties: bytes, routing_key: str,
                       exchange: str, *, backlog_limit: int) -> bool:
        self.sent.append(json.loads(body))
        return True


@pytest.fixture
async def mailbox_and_events() -> Any:
    clock = LamportClock()
    connection = FakeConnection()

    async def connect() -> FakeConnection:
        return connection

    mailbox = Mailbox(PingNode(), connect, clock)  # type: ignore[arg-type]
    publisher = RecordingPublisher()
    dispatcher = EventDispatcher("w1@h1", publisher, Stats(),  # type: ignore[arg-type]
                                 task_events=True, clock=clock)
    running = asyncio.ensure_future(mailbox.run())
    await asyncio.wait_for(mailbox.consuming.wait(), DEADLINE)
    try:
        yield connection, dispatcher, publisher, clock
    finally:
        await mailbox.close()
        await asyncio.wait_for(running, DEADLINE)


async def test_an_event_after_a_control_request_has_a_later_clock(
        mailbox_and_events: Any) -> None:
    connection, dispatcher, publisher, clock = mailbox_and_events
    dispatcher.task("task-started", {"uuid": "before"})
    connection.deliver(ping_request(clock=500))
    await asyncio.wait_for(connection.replied.wait(), DEADLINE)
    dispatcher.task("task-started", {"uuid": "after"})
    await asyncio.sleep(0)  # the flush at the end of the loop turn

    before, after = [event for batch in publisher.sent for event in batch]
    (body, properties), = connection.replies
    reply_clock = (decode_properties(properties).headers or {})["clock"]
    assert json.loads(body) == {"w1@h1": {"ok": "pong"}}
    assert before["clock"] == 1
    assert 500 < reply_clock < after["clock"] == clock.value


async def test_a_request_with_an_older_clock_still_moves_the_clock_forward(
        mailbox_and_events: Any) -> None:
    connection, _, _, clock = mailbox_and_events
    clock.value = 1000  # events sent already
    connection.deliver(ping_request(clock=3))
    await asyncio.wait_for(connection.replied.wait(), DEADLINE)
    assert clock.value == 1002  # past the request (1001), then the reply (1002)


async def test_the_worker_process_has_one_clock_for_events_and_remote_control() -> None:
    from aio_celery.control import commands
    from aio_celery.worker.options import WorkerOptions
    from aio_celery.worker.remote import WorkerNode
    from aio_celery.worker.worker import Worker

    # never connected: the URL only shows in the stats
    worker = Worker(Celery("clock-test", broker="amqp://guest@localhost:5672//"),
                    WorkerOptions())
    assert worker.events.clock is worker.clock
    worker.events.worker("worker-heartbeat", 2.0)  # clock 1 (dropped: no publisher)
    worker.clock.adjust(41)
    node = WorkerNode(worker)
    assert await commands.dispatch(node, "clock", {}) == {"clock": 42}
    assert node.stats()["clock"] == "42"
