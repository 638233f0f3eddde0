"""memory://: the broker's delivery rules, the result store, the testing helpers."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from aio_celery import Celery, memory, preflight, resultmeta, states, testing
from aio_celery.amqp.reader import Delivery
from aio_celery.amqp.wire import encode_properties
from aio_celery.config import Settings
from aio_celery.exceptions import ConfigurationError
from aio_celery.memory.broker import MemoryBroker, MemoryChannel, Message
from aio_celery.memory.transport import MemoryConsumer, MemoryPublisher
from aio_celery.protocol import Envelope
from aio_celery.pytest_plugin import celery_worker, celery_worker_concurrency
from aio_celery.quorum import QueuePlan
from aio_celery.worker import Worker

__all__ = ["celery_worker", "celery_worker_concurrency"]  # fixtures used from the plugin


def _message(n: int, priority: int = 0) -> Message:
    envelope = Envelope(body=str(n).encode(), headers={"n": n}, correlation_id=str(n),
                        priority=priority)
    return Message(envelope.body, encode_properties(envelope), priority, "q")


class _Consumed:
    def __init__(self, broker: MemoryBroker, prefetch: int = 0) -> None:
        self.channel = MemoryChannel(broker, prefetch)
        self.channel.open()
        self.got: list[Delivery] = []

    def consume(self, queue: str = "q") -> None:
        self.channel.consume(queue, self.got.append)

    def bodies(self) -> list[bytes]:
        return [d.body for d in self.got]


async def _turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    broker = MemoryBroker("memory://unit")
    broker.declare("q")
    yield broker
    broker.close()


async def test_deliveries_keep_the_wire_properties_and_respect_prefetch(
        broker: MemoryBroker) -> None:
    for n in range(5):
        assert broker.publish(_message(n))
    consumer = _Consumed(broker, prefetch=2)
    consumer.consume()
    assert consumer.got == []  # never inside the call: deliveries come on a later turn
    await _turn()
    assert consumer.bodies() == [b"0", b"1"]
    first = consumer.got[0]
    assert first.properties is not None and first.properties.headers == {"n": 0}
    assert [d.deliver.delivery_tag for d in consumer.got] == [1, 2]
    consumer.channel.ack(2, multiple=True)
    await _turn()
    assert consumer.bodies() == [b"0", b"1", b"2", b"3"]
    assert broker.message_count("q") == 1


async def test_requeue_puts_back_at_the_head_marked_redelivered(broker: MemoryBroker) -> None:
    for n in range(3):
        broker.publish(_message(n))
    consumer = _Consumed(broker, prefetch=1)
    consumer.consume()
    await _turn()
    consumer.channel.reject(1, requeue=True)
    await _turn()
    again = consumer.got[-1]
    assert again.body == b"0" and again.deliver.redelivered
    consumer.channel.reject(again.deliver.delivery_tag, requeue=False)  # dropped
    await _turn()
    consumer.channel.ack(consumer.got[-1].deliver.delivery_tag)
    await _turn()
    assert consumer.bodies() == [b"0", b"0", b"1", b"2"]
    consumer.channel.ack(consumer.got[-1].deliver.delivery_tag)
    assert broker.message_count("q") == 0


async def test_an_unknown_tag_closes_the_channel_and_gives_everything_back(
        broker: MemoryBroker) -> None:
    broker.publish(_message(0))
    consumer = _Consumed(broker)
    consumer.consume()
    await _turn()
    consumer.channel.ack(99)
    assert "PRECONDITION_FAILED" in await consumer.channel.closed()
    assert broker.message_count("q") == 1
    with pytest.raises(ConnectionError):
        consumer.channel.ack(1)
    other = _Consumed(broker)
    other.consume()
    await _turn()
    assert other.got[0].deliver.redelivered


async def test_held_channel_gets_nothing_until_released(broker: MemoryBroker) -> None:
    consumer = _Consumed(broker)
    consumer.consume()
    consumer.channel.hold()
    broker.publish(_message(0))
    await _turn()
    assert consumer.got == []
    consumer.channel.release()
    await _turn()
    assert consumer.bodies() == [b"0"]


async def test_priority_queue_delivers_higher_priorities_first() -> None:
    broker = MemoryBroker("memory://prio")
    broker.declare("q", prioritized=True)
    for n, priority in enumerate([0, 9, 5]):
        broker.publish(_message(n, priority))
    consumer = _Consumed(broker)
    consumer.consume()
    await _turn()
    assert consumer.bodies() == [b"1", b"2", b"0"]


async def test_holding_queue_hands_back_after_its_ttl(broker: MemoryBroker) -> None:
    publisher = MemoryPublisher(broker, plan=QueuePlan())
    await publisher.declare_holding_queue("q.hold", "q", 50)
    consumer = _Consumed(broker)
    consumer.consume()
    envelope = Envelope(body=b"x", headers={}, correlation_id="x")
    await publisher.publish_raw(envelope.body, encode_properties(envelope), "q.hold")
    await _turn()
    assert consumer.got == []
    await asyncio.sleep(0.1)
    assert consumer.bodies() == [b"x"]
    with pytest.raises(Exception, match="NO_ROUTE"):
        await publisher.publish_raw(b"y", encode_properties(envelope), "nowhere")


async def test_consumer_close_requeues_and_counts(broker: MemoryBroker) -> None:
    consumer = MemoryConsumer(broker, prefetch_count=5, plan=QueuePlan())
    await consumer.open()
    got: list[Delivery] = []
    await consumer.consume("q", got.append)
    assert consumer.consumer_count == 1
    broker.publish(_message(1))
    await _turn()
    assert len(got) == 1 and await consumer.message_count("q") == 0
    await consumer.close()
    assert consumer.consumer_count == 0
    assert await consumer.message_count("q") == 1


# --- result store ----------------------------------------------------------------------


def _meta(task_id: str, status: str, result: object = None) -> dict[str, object]:
    return resultmeta.build_meta(task_id, status, result, now=datetime.now(UTC))


async def test_results_follow_the_redis_backends_rules() -> None:
    backend = memory.MemoryBackend()
    assert await backend.get_meta("t") is None
    waiting = asyncio.ensure_future(backend.wait_for("t", 5))
    await backend.store(_meta("t", states.STARTED))
    await _turn()
    assert not waiting.done()  # only a ready state wakes a waiter
    await backend.store(_meta("t", states.SUCCESS, 3))
    assert (await waiting)["result"] == 3
    await backend.store(_meta("t", states.FAILURE, "late"))
    assert (await backend.get_meta("t") or {})["result"] == 3  # a SUCCESS stays
    assert not await backend.store_if_status(_meta("t", states.REVOKED), [states.PENDING])
    assert await backend.store_if_status(_meta("u", states.REVOKED), [states.STARTED])
    with pytest.raises(TypeError):
        await backend.store(_meta("v", states.SUCCESS, object()))
    with pytest.raises(TimeoutError):
        await backend.wait_for("never", 0.05)
    await backend.forget("t")
    assert await backend.get_meta("t") is None


async def test_chord_parts_are_counted_once_and_claimed_once() -> None:
    backend = memory.MemoryBackend()
    await backend.set_chord_size("g", 2)
    first = await backend.chord_part_return("g", "a", 1, "A", claim_expires=60,
                                            claim_token="w1")
    again = await backend.chord_part_return("g", "a", 1, "A", claim_expires=60,
                                            claim_token="w1")
    assert (first.readycount, again.readycount, first.claimed) == (1, 1, False)
    last = await backend.chord_part_return("g", "b", 0, "B", claim_expires=60,
                                           claim_token="w2")
    assert last.complete and last.total == 2
    late = await backend.chord_part_return("g", "b", 0, "B", claim_expires=60,
                                           claim_token="w3")
    assert not late.claimed
    assert await backend.chord_results("g") == ["B", "A"]  # group_index order
    assert not await backend.chord_claim_extend("g", "w3", 60)
    assert await backend.chord_claim_extend("g", "w2", 60)
    assert not await backend.chord_cleanup("g", "w1", 60)
    assert await backend.chord_cleanup("g", "w2", 60)
    done = await backend.chord_part_return("g", "b", 0, "B", claim_expires=60,
                                           claim_token="w4")
    assert done.readycount == -1 and not done.claimed


# --- settings and helpers ----------------------------------------------------------------


def test_preflight_accepts_memory_and_refuses_it_in_a_failover_list() -> None:
    preflight.check(Settings(broker_url="memory://", result_backend="memory://"))
    with pytest.raises(ConfigurationError, match="failover"):
        preflight.check(Settings(broker_url="memory://;amqp://localhost//"))


@pytest.fixture
def celery_app() -> Iterator[Celery]:
    app = Celery("plugin", broker="memory://", backend="memory://", set_as_current=False)
    yield app
    memory.reset()


async def test_the_plugin_fixture_runs_a_worker(celery_app: Celery,
                                                celery_worker: Worker) -> None:
    @celery_app.task(bind=True, default_retry_delay=0.2)
    async def add(self: object, x: int, y: int) -> int:
        if self.request.retries == 0:  # type: ignore[attr-defined]
            await self.retry()  # type: ignore[attr-defined]
        return x + y

    assert celery_worker.session is not None and celery_worker.session.consumer_count == 1
    started = asyncio.get_running_loop().time()
    result = await add.delay(1, 2)
    assert await result.get(timeout=5) == 3
    assert asyncio.get_running_loop().time() - started >= 0.2  # the countdown was kept
    assert celery_worker.stats.finished == 2


async def test_an_eta_beyond_the_horizon_is_parked_and_comes_back(
        celery_app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery.worker")

    @celery_app.task
    async def later() -> str:
        return "on time"

    async with celery_app.setup():
        result = await later.apply_async(countdown=2.2)
        eta = datetime.now(UTC) + timedelta(seconds=2.2)
        async with testing.worker(celery_app, concurrency=1, eta_horizon=1.0):
            assert await result.get(timeout=5) == "on time"
            assert datetime.now(UTC) >= eta - timedelta(seconds=0.1)
    assert any("parked in" in record.getMessage() for record in caplog.records)


async def test_the_helper_needs_memory_and_reports_a_failed_start() -> None:
    app = Celery("elsewhere", broker="amqp://guest:guest@127.0.0.1:1//",
                 set_as_current=False)
    with pytest.raises(ValueError, match="memory://"):
        async with testing.worker(app):
            pass
    app.conf.update(broker_url="memory://")

    @app.define_app_context
    def broken() -> AsyncIterator[None]:
        raise RuntimeError("no database")

    with pytest.raises(testing.WorkerFailed) as failed:
        async with testing.worker(app):
            pass
    assert failed.value.exit_code == 4


def test_memory_needs_neither_redis_nor_aio_pika_nor_pytest() -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from aio_celery import Celery, testing

        app = Celery("alone", broker="memory://", backend="memory://")

        @app.task
        async def add(x, y):
            return x + y

        async def main():
            async with testing.worker(app):
                return await (await add.delay(1, 2)).get(timeout=5)

        assert asyncio.run(main()) == 3
        print(sorted(m for m in ("redis", "aio_pika", "pytest") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_multiple_ack_of_a_settled_tag_closes_the_channel(broker: MemoryBroker) -> None:
    for n in range(2):
        broker.publish(_message(n))
    consumer = _Consumed(broker)
    consumer.consume()
    await _turn()
    consumer.channel.ack(2)
    consumer.channel.ack(2, multiple=True)  # RabbitMQ: the tag itself must be unsettled
    assert "unknown delivery tag 2" in await consumer.channel.closed()
    assert broker.message_count("q") == 1  # tag 1 went back


def test_a_new_event_loop_gets_deliveries_after_one_closed_midway() -> None:
    broker = MemoryBroker("memory://loops")
    broker.declare("q")

    async def publish_and_leave() -> None:
        broker.publish(_message(0))  # its dispatch is scheduled, never run on this loop
        asyncio.get_running_loop().stop()

    async def consume() -> list[bytes]:
        consumer = _Consumed(broker)
        consumer.consume()
        await _turn()
        return consumer.bodies()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(publish_and_leave())
    loop.close()
    assert asyncio.run(consume()) == [b"0"]
    broker.close()


async def test_a_stop_gives_every_unfinished_message_back(celery_app: Celery) -> None:
    started = asyncio.Event()

    @celery_app.task
    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    async with celery_app.setup():
        sent = [await slow.delay() for _ in range(3)]
        async with testing.worker(celery_app, concurrency=1, shutdown_timeout=0.2) as worker:
            await asyncio.wait_for(started.wait(), 5)
            assert worker.session is not None and worker.session.running == 1
        queue = celery_app.conf.settings.task_default_queue
        assert memory.broker_for("memory://").message_count(queue) == 3
        for result in sent:
            await result.refresh()
        assert {result.state for result in sent} == {states.PENDING}  # none ran to the end
