"""Queue declarations and native delayed delivery, pure: checked against the real Celery 5.7
and kombu 5.7 (their own functions and declarations are the oracle)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import celery
import pytest
from kombu.transport import native_delayed_delivery as kombu_delayed

from aio_celery.config import Settings
from aio_celery.exceptions import ConfigurationError
from aio_celery.quorum import (
    DELAYED_DELIVERY_EXCHANGE,
    FIRST_DELAY_EXCHANGE,
    MAX_DELAY,
    DelayedDeliveryBindings,
    QueuePlan,
    delayed_bindings,
    delayed_routing_key,
    delayed_topology,
    park_countdown,
)
from aio_celery.worker.delivery import holding_ttl, wait_queue_name


@pytest.mark.parametrize("countdown", [1, 2, 3, 59, 600, 3600, 86400, 2**27, MAX_DELAY])
@pytest.mark.parametrize("routing_key", ["celery", "a.b", "#.x"])
def test_routing_key_is_kombus(countdown: int, routing_key: str) -> None:
    assert delayed_routing_key(countdown, routing_key) == \
        kombu_delayed.calculate_routing_key(countdown, routing_key)


def test_routing_key_replaces_the_prefix_a_retry_carries() -> None:
    rng = random.Random(8)
    for _ in range(200):
        first, second = rng.randrange(1, MAX_DELAY), rng.randrange(1, MAX_DELAY)
        retried = delayed_routing_key(second, delayed_routing_key(first, "q"))
        assert retried == kombu_delayed.calculate_routing_key(
            second, kombu_delayed.calculate_routing_key(first, "q"))
        assert retried == delayed_routing_key(second, "q")


@pytest.mark.parametrize("bad", [0, -1, MAX_DELAY + 1])
def test_routing_key_refuses_what_the_levels_cannot_express(bad: int) -> None:
    with pytest.raises(ValueError):
        delayed_routing_key(bad, "q")


def test_park_countdown_never_early() -> None:
    assert park_countdown(0.01) == 1
    assert park_countdown(1.0) == 1
    assert park_countdown(1.2) == 2
    assert park_countdown(10**12) == MAX_DELAY


class RecordingChannel:
    """What kombu's declare functions send, recorded from its Exchange/Queue calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def prepare_queue_arguments(self, arguments: dict[str, Any], **kw: Any) -> dict[str, Any]:
        assert not any(kw.values())  # no expires/ttl/max-length/priority keywords
        return arguments

    def exchange_declare(self, exchange: str, type: str, durable: bool, **kw: Any) -> None:
        self.calls.append(("exchange", exchange, type, durable))

    def queue_declare(self, queue: str, durable: bool, arguments: Any, **kw: Any) -> Any:
        self.calls.append(("queue", queue, durable, arguments))
        return (queue, 0, 0)

    def queue_bind(self, queue: str, exchange: str, routing_key: str, **kw: Any) -> None:
        self.calls.append(("bind", queue, exchange, routing_key, False))

    def exchange_bind(self, destination: str, source: str, routing_key: str, **kw: Any) -> None:
        self.calls.append(("bind", destination, source, routing_key, True))


class RecordingConnection:
    def __init__(self) -> None:
        self.recording = RecordingChannel()

    def channel(self) -> RecordingChannel:
        return self.recording


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_delayed_topology_is_kombus(queue_type: str) -> None:
    connection = RecordingConnection()
    kombu_delayed.declare_native_delayed_delivery_exchanges_and_queues(
        connection, queue_type)  # type: ignore[arg-type]
    calls = connection.recording.calls
    topology = delayed_topology(queue_type)
    assert {c[1] for c in calls if c[0] == "exchange"} == set(topology.exchanges)
    assert all(c[2] == "topic" and c[3] for c in calls if c[0] == "exchange")
    assert [(c[1], c[3]) for c in calls if c[0] == "queue"] == list(topology.queues)
    assert all(c[2] for c in calls if c[0] == "queue")  # durable
    assert [c[1:] for c in calls if c[0] == "bind"] == [
        (b.destination, b.source, b.routing_key, b.to_exchange) for b in topology.bindings]
    assert topology.exchanges[0] == FIRST_DELAY_EXCHANGE
    assert topology.exchanges[-1] == DELAYED_DELIVERY_EXCHANGE


def test_queue_bindings_are_kombus() -> None:
    app = celery.Celery("t", set_as_current=False)
    app.conf.update(task_default_queue="work", task_default_queue_type="quorum",
                    task_default_exchange_type="topic")
    connection = RecordingConnection()
    kombu_delayed.bind_queue_to_native_delayed_delivery_exchange(
        connection, app.amqp.queues["work"])  # type: ignore[arg-type]
    plan = QueuePlan(default_queue="work", default_queue_type="quorum",
                     default_exchange_type="topic")
    assert [c[1:] for c in connection.recording.calls if c[0] == "bind"] == [
        (b.destination, b.source, b.routing_key, b.to_exchange)
        for b in delayed_bindings(plan.queue("work"))]


CASES: list[dict[str, Any]] = [
    {},
    {"task_default_queue_type": "quorum"},
    {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"},
    {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum",
     "task_create_missing_queue_exchange_type": "topic"},
    {"task_create_missing_queue_type": "quorum"},
    {"task_queue_max_priority": 10},
]


@pytest.mark.parametrize("settings", CASES, ids=[str(sorted(c.items())) for c in CASES])
@pytest.mark.parametrize("name", ["work", "other"])
def test_queues_are_declared_like_celerys(settings: dict[str, Any], name: str) -> None:
    app = celery.Celery("t", set_as_current=False)
    app.conf.update(task_default_queue="work", **settings)
    theirs = app.amqp.queues[name]
    ours = QueuePlan.from_settings(Settings(task_default_queue="work", **settings)).queue(name)
    assert ours.arguments == (theirs.queue_arguments or None)
    assert (ours.exchange, ours.exchange_type) == (theirs.exchange.name, theirs.exchange.type)
    assert ours.routing_key == theirs.routing_key
    assert theirs.durable and not theirs.exclusive and not theirs.auto_delete


def test_quorum_queues_get_no_max_priority() -> None:
    """Celery would add x-max-priority to a quorum queue too, and RabbitMQ refuses that
    declaration: quorum queues have no such argument."""
    plan = QueuePlan(default_queue="work", default_queue_type="quorum", max_priority=10)
    assert plan.queue("work").arguments == {"x-queue-type": "quorum"}
    assert plan.queue("other").arguments == {"x-max-priority": 10}


def test_quorum_mode_and_native_delays() -> None:
    assert not QueuePlan().quorum_mode
    assert QueuePlan(missing_queue_type="quorum").quorum_mode
    plan = QueuePlan(default_queue="work", default_queue_type="quorum")
    assert plan.quorum_mode and not plan.queue("work").delayed_delivery
    assert QueuePlan(default_queue="work", default_exchange_type="topic").queue(
        "work").delayed_delivery


@pytest.mark.parametrize(("setting", "value"), [
    ("task_default_queue_type", "stream"), ("task_create_missing_queue_type", "Quorum"),
    ("broker_native_delayed_delivery_queue_type", "lazy"),
    ("task_default_exchange_type", "x-delayed"),
    ("task_create_missing_queue_exchange_type", "Topic")])
def test_unusable_types_name_the_setting(setting: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        QueuePlan.from_settings(Settings(**{setting: value})).check()


@pytest.mark.parametrize(("remaining", "ttl"), [
    (0.2, 1), (1.0, 1), (1.9, 1), (2.0, 2), (3.5, 2), (100, 64), (599, 512), (600, 512),
    (601, 600), (86400, 600)])
def test_holding_ttl_is_a_power_of_two_not_past_the_eta(remaining: float, ttl: float) -> None:
    assert holding_ttl(remaining, 600.0) == ttl


# --- DelayedDeliveryBindings: the publishers' bookkeeping -------------------------------------

async def test_delayed_delivery_is_declared_once_per_queue_and_connection() -> None:
    declared: list[tuple[str, ...]] = []
    release = asyncio.Event()

    async def declare(queues: tuple[str, ...]) -> None:
        declared.append(queues)
        await release.wait()

    bindings = DelayedDeliveryBindings(declare)
    waiting = [asyncio.ensure_future(bindings.ensure("a")) for _ in range(3)]
    waiting.append(asyncio.ensure_future(bindings.ensure("b")))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*waiting)
    await bindings.ensure("a")
    assert declared == [("a",), ("b",)]  # concurrent callers shared one declaration

    bindings.forget()  # a new connection declares again
    await bindings.ensure("a")
    assert declared == [("a",), ("b",), ("a",)]


async def test_a_failed_delayed_delivery_declaration_is_tried_again() -> None:
    attempts: list[tuple[str, ...]] = []

    async def declare(queues: tuple[str, ...]) -> None:
        attempts.append(queues)
        if len(attempts) == 1:
            raise ConnectionError("refused")

    bindings = DelayedDeliveryBindings(declare)
    with pytest.raises(ConnectionError, match="refused"):
        await bindings.ensure("a")
    await bindings.ensure("a")
    await bindings.ensure("a")
    assert attempts == [("a",), ("a",)]


def test_each_eta_horizon_has_a_holding_queue_of_its_own() -> None:
    """The TTL is fixed when a queue is first declared: another --eta-horizon must not try
    to declare the same queue with another TTL (RabbitMQ would close the channel)."""
    assert wait_queue_name("q", 600.0) == "q.aio-celery-hold-600000ms"
    assert wait_queue_name("q", 1.5) == "q.aio-celery-hold-1500ms"
    assert wait_queue_name("q", 12345.66) != wait_queue_name("q", 12345.74)  # TTLs differ
