"""The worker's event dispatcher against a publisher that records (no broker): one message
per loop turn for the task events, worker events one per message, a bounded buffer that
drops and counts, and events held while the connection cannot take them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aio_celery.exceptions import BrokerConnectionError, PublishRefusedError
from aio_celery.worker import events as worker_events
from aio_celery.worker.events import EventDispatcher, Heart
from aio_celery.worker.stats import Stats


class RecordingPublisher:
    """What the dispatcher needs of a WorkerPublisher."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.declared: list[tuple[str, str, bool]] = []
        self.refuse: BaseException | None = None
        self.takes = True  # False: blocked or backed up

    async def declare_exchange(self, name: str, kind: str, *, durable: bool = True) -> None:
        await asyncio.sleep(0)
        if self.refuse is not None:
            raise self.refuse
        self.declared.append((name, kind, durable))

    def exchange_ready(self, name: str) -> bool:
        return (name, "topic", True) in self.declared

    def publish_nowait(self, body: bytes, properties: bytes, routing_key: str,
                       exchange: str, *, backlog_limit: int) -> bool:
        assert exchange == "celeryev" and properties
        if not self.takes:
            return False
        self.sent.append((routing_key, json.loads(body)))
        return True


def dispatcher(publisher: RecordingPublisher, stats: Stats | None = None,
               **options: Any) -> EventDispatcher:
    return EventDispatcher("node@test", publisher, stats or Stats(),  # type: ignore[arg-type]
                           task_events=True, now=lambda: 1000.0, pid=7, **options)


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_task_events_of_one_loop_turn_go_in_one_task_multi_message() -> None:
    publisher = RecordingPublisher()
    events = dispatcher(publisher)
    events.task("task-received", {"uuid": "a"})
    events.task("task-started", {"uuid": "a"})
    events.worker("worker-online", 2.0)
    await turns()
    assert publisher.declared == [("celeryev", "topic", True)]
    keys = [key for key, _ in publisher.sent]
    assert keys == ["worker.online", "task.multi"]
    batch = publisher.sent[1][1]
    assert [(e["type"], e["uuid"], e["clock"]) for e in batch] == [
        ("task-received", "a", 1), ("task-started", "a", 2)]
    assert batch[0]["hostname"] == "node@test" and batch[0]["pid"] == 7
    assert publisher.sent[0][1]["clock"] == 3 and publisher.sent[0][1]["freq"] == 2.0

    events.task("task-succeeded", {"uuid": "a"})
    await turns()
    assert publisher.sent[-1][0] == "task.multi" and len(publisher.sent[-1][1]) == 1


async def test_a_large_turn_is_split_into_batches() -> None:
    publisher = RecordingPublisher()
    events = dispatcher(publisher)
    for n in range(worker_events.BATCH_LIMIT + 3):
        events.task("task-started", {"uuid": str(n)})
    await turns()
    assert [len(body) for _, body in publisher.sent] == [worker_events.BATCH_LIMIT, 3]


async def test_events_wait_while_the_connection_cannot_take_them_and_excess_is_dropped() -> None:
    publisher = RecordingPublisher()
    stats = Stats()
    events = dispatcher(publisher, stats, buffer_limit=10)
    publisher.takes = False
    for n in range(25):
        events.task("task-started", {"uuid": str(n)})
    await turns()
    assert (events.buffered, stats.events_dropped, publisher.sent) == (10, 15, [])
    publisher.takes = True
    events.task("task-started", {"uuid": "late"})  # dropped too: the buffer is full
    events.flush()
    assert [e["uuid"] for e in publisher.sent[0][1]] == [str(n) for n in range(10)]
    assert (events.buffered, stats.events_dropped) == (0, 16)


async def test_a_refused_exchange_stops_events_and_counts_them_dropped() -> None:
    publisher = RecordingPublisher()
    publisher.refuse = PublishRefusedError("406 PRECONDITION_FAILED")
    stats = Stats()
    events = dispatcher(publisher, stats)
    events.task("task-started", {"uuid": "a"})
    await turns()
    events.task("task-started", {"uuid": "b"})
    await turns()
    assert publisher.sent == [] and stats.events_dropped == 2 and events.buffered == 0


async def test_an_unreachable_broker_is_tried_again_after_a_pause() -> None:
    publisher = RecordingPublisher()
    publisher.refuse = BrokerConnectionError("connection refused")
    events = dispatcher(publisher)
    events.task("task-started", {"uuid": "a"})
    await turns()
    publisher.refuse = None
    events.task("task-started", {"uuid": "b"})
    await turns()
    assert publisher.sent == [] and events.buffered == 2  # still in the pause
    await events.close(timeout=1.0)  # shutdown: one more try, without the pause
    assert [e["uuid"] for e in publisher.sent[0][1]] == ["a", "b"]


async def test_without_a_publisher_events_are_dropped_and_counted() -> None:
    stats = Stats()
    told: list[int] = []
    events = EventDispatcher("node@test", None, stats, task_events=True,
                             on_dropped=told.append)
    events.task("task-started", {"uuid": "a"})
    events.task("task-started", {"uuid": "b"})
    await turns()
    assert stats.events_dropped == 2 and sum(told) == 2  # the metrics are told too


async def test_the_heart_sends_online_heartbeats_and_offline() -> None:
    publisher = RecordingPublisher()
    events = dispatcher(publisher, load=lambda: (3, 42))
    heart = Heart(events, interval=0.01)
    heart.start()
    await asyncio.sleep(0.05)
    heart.stop()
    await events.close(timeout=1.0)
    types = [body["type"] for _, body in publisher.sent]
    assert types[0] == "worker-online" and types[-1] == "worker-offline"
    assert "worker-heartbeat" in types
    assert all(body["active"] == 3 and body["processed"] == 42 and body["freq"] == 0.01
               for _, body in publisher.sent)
