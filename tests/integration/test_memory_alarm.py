"""``connection.blocked`` from a real RabbitMQ memory alarm (#8).

A memory alarm blocks every publisher of a node, so it is raised on an extra node
(``scripts/rabbitnode``, AMQP on 5711, see ``rabbit_node``) started once for this module,
never on the shared broker on 5672: ``set_vm_memory_high_watermark`` to almost nothing, and
back to 0.4 in a ``finally``.

What RabbitMQ 3.10 does, seen here: once the alarm is raised, every connection is
*blocking*; a connection that then publishes has that message taken and held, is told
``connection.blocked`` and is no longer read (*blocked*). A connection that only consumes
stays *blocking*: its deliveries and acks go on. So the first publish after the alarm is
sent and waits for its confirm, the later ones wait unsent, each at most
``broker_publish_timeout``; after the alarm, ``connection.unblocked`` and publishing
resumes (the held message is queued then).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Iterator

import pytest
from helpers import eventually
from rabbit_node import RabbitNode, running_node

from aio_celery import Celery, chain, protocol, states
from aio_celery.amqp.connection import AMQPConnection
from aio_celery.exceptions import BrokerConnectionError
from aio_celery.failover import Failover
from aio_celery.publisher import WorkerPublisher
from aio_celery.quorum import QueuePlan

pytestmark = pytest.mark.fault

TIMEOUT = 30.0
#: broker_publish_timeout here: what a publish waits, blocked, before it fails
PUBLISH_TIMEOUT = 2.0
#: how much later than the publish timeout the error may come (two busy cores)
SLACK = 2.0
BLOCKED = "low on memory"
#: closing a blocked connection does not wait for the broker (which reads nothing)
CLOSED_WITHIN = 1.0


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with running_node() as handle:
        yield handle


def alarms(node: RabbitNode) -> list[str]:
    status = json.loads(node.ctl("-t", "10", "status", "--formatter", "json"))
    return [alarm["resource"] for alarm in status["alarms"]]


@contextlib.contextmanager
def memory_alarm(node: RabbitNode) -> Iterator[None]:
    """A memory alarm on ``node`` (a watermark no VM is under) for the ``with`` block; the
    default watermark is set again whatever happens."""
    try:
        node.ctl("set_vm_memory_high_watermark", "0.0000001")
        assert "memory" in alarms(node)
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
    assert "memory" not in alarms(node)


def states_by_name(node: RabbitNode) -> dict[str, str]:
    """The state (running, blocking, blocked) of each connection, by its client's name."""
    return {str(row["client_properties"].get("connection_name")): str(row["state"])
            for row in node.connections("client_properties", "state")}


def unacknowledged(node: RabbitNode, queue: str) -> int | None:
    rows = json.loads(node.ctl("-t", "10", "list_queues", "name", "messages_unacknowledged",
                               "--formatter", "json"))
    return next((int(row["messages_unacknowledged"]) for row in rows
                 if row["name"] == queue), None)


async def unacknowledged_is(node: RabbitNode, queue: str, count: int) -> bool:
    return await asyncio.to_thread(unacknowledged, node, queue) == count


async def published_within(bound: float, publishing: Awaitable[object]) -> BaseException:
    """The error ``publishing`` (an awaitable) fails with, and that it failed in time."""
    started = time.monotonic()
    with pytest.raises((TimeoutError, BrokerConnectionError)) as raised:
        await asyncio.wait_for(publishing, bound + TIMEOUT)
    elapsed = time.monotonic() - started
    assert PUBLISH_TIMEOUT - 0.1 <= elapsed <= bound, elapsed
    return raised.value


@pytest.fixture
def alarm_app(node: RabbitNode, unique_name: str, redis_url: str) -> Celery:
    app = Celery(unique_name)
    app.conf.update(broker_url=node.url(), result_backend=redis_url,
                    task_default_queue=unique_name, broker_publish_timeout=PUBLISH_TIMEOUT)

    @app.task(name="alarm.double")
    async def double(value: int) -> int:
        return 2 * value

    return app


async def test_the_worker_goes_on_acking_while_its_publisher_is_blocked(
        node: RabbitNode, alarm_app: Celery, unique_name: str, start_worker,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = alarm_app
    double = app.tasks["alarm.double"]
    firsts = collections.Counter[int]()

    @app.task(name="alarm.first")
    async def first(value: int) -> int:
        firsts[value] += 1
        return value + 1

    async with app.setup():
        waiting = [await double.delay(n) for n in range(1, 6)]
        # its next step goes out on the worker's publishing connection
        last = await chain(first.s(20), double.s()).apply_async()
        with memory_alarm(node):
            # A worker started during the alarm consumes and acks: its consumer
            # connection never publishes, so the broker goes on reading it.
            handle = await start_worker(app, concurrency=4)
            for n, result in enumerate(waiting, 1):
                assert await result.get(timeout=TIMEOUT) == 2 * n
            await eventually(lambda: unacknowledged_is(node, unique_name, 1),
                             TIMEOUT, what="the five doubles acked, the chain's first not")

            # The chain's next step waits, its message unacked, and is tried again; the
            # first step does not run again.
            publisher = handle.worker.publisher
            assert publisher is not None
            await eventually(lambda: publisher.connection is not None
                             and publisher.connection.blocked == BLOCKED,
                             TIMEOUT, what="the worker's publisher told it is blocked")
            assert "The broker blocked publishing on this connection (low on memory" \
                in caplog.text
            assert (await last.refresh()).state == states.PENDING
            by_name = await asyncio.to_thread(states_by_name, node)
            consumer = next(name for name in by_name
                            if name.startswith("aio_celery worker")
                            and not name.endswith("publisher"))
            assert by_name[consumer] == "blocking", by_name
            assert by_name[consumer + " publisher"] == "blocked", by_name

        assert await last.get(timeout=TIMEOUT) == 42
        assert firsts == {20: 1}
        assert "unblocked publishing on this connection (low on memory cleared)" \
            in caplog.text
        await eventually(lambda: unacknowledged_is(node, unique_name, 0),
                         TIMEOUT, what="every delivery acked")
        assert await handle.stop() == 0


async def test_each_publisher_waits_for_the_alarm_at_most_its_publish_timeout(
        node: RabbitNode, alarm_app: Celery, unique_name: str) -> None:
    app = alarm_app
    double = app.tasks["alarm.double"]
    lean = AMQPConnection(node.url(), connection_name=f"{unique_name} lean",
                          publish_timeout=PUBLISH_TIMEOUT)
    worker_side = WorkerPublisher(Failover(node.url()), plan=QueuePlan(),
                                  publish_timeout=PUBLISH_TIMEOUT,
                                  connection_name=f"{unique_name} publisher")
    envelope = protocol.encode(app.build_message(
        "alarm.double", [7], {}, {"queue": unique_name})[0], app.now())
    async with app.setup():
        await lean.connect()
        await lean.queue_declare(unique_name)
        try:
            with memory_alarm(node):
                # Our client: the first publish is sent and held, the broker says it
                # blocks; the next is not sent. Each fails after the timeout, naming it.
                for _ in range(2):
                    error = await published_within(PUBLISH_TIMEOUT + SLACK, lean.publish(
                        b"held", b"\x00\x00", unique_name))
                    assert f"blocked by the broker ({BLOCKED})" in str(error)
                assert lean.blocked == BLOCKED
                assert lean.unconfirmed == 1

                # The worker's publisher: the same, with the hint; closing it (a worker's
                # shutdown) does not wait for a close-ok the broker would not read.
                error = await published_within(PUBLISH_TIMEOUT + SLACK,
                                               worker_side.publish(envelope, unique_name))
                assert isinstance(error, BrokerConnectionError)
                assert "resource alarm" in str(error)
                assert worker_side.connection is not None
                assert worker_side.connection.blocked == BLOCKED

                # The client (aio-pika): the same bound, the same hint, no retry.
                error = await published_within(PUBLISH_TIMEOUT + SLACK, double.delay(99))
                assert isinstance(error, BrokerConnectionError)
                assert "the broker blocked publishing that long" in str(error)

                by_name = await asyncio.to_thread(states_by_name, node)
                assert by_name[f"{unique_name} lean"] == "blocked", by_name
                assert by_name[f"{unique_name} publisher"] == "blocked", by_name
                started = time.monotonic()
                await worker_side.close()
                assert time.monotonic() - started < CLOSED_WITHIN

            # The alarm is over: unblocked, publishing again; the held message is queued.
            await eventually(lambda: lean.blocked is None, TIMEOUT, what="lean unblocked")
            await asyncio.wait_for(lean.publish(b"after", b"\x00\x00", unique_name),
                                   TIMEOUT)
            assert lean.unconfirmed == 0  # the held message's confirm came first
            await asyncio.wait_for(double.delay(50), TIMEOUT)
        finally:
            await worker_side.close()
            await lean.close()
