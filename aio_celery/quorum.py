"""Queue declarations the way Celery 5.5+ makes them, quorum queues and native delayed
delivery included (pure: names, arguments and routing keys; no I/O).

Celery's rules, read from celery 5.7 (``celery/app/amqp.py``, ``celery/utils/quorum_queues.py``)
and kombu 5.7 (``kombu/transport/native_delayed_delivery.py``):

* the default queue is declared with ``x-queue-type: quorum`` when ``task_default_queue_type``
  is ``"quorum"``, bound to an exchange of the same name of type
  ``task_default_exchange_type`` with the queue's name as routing key; any other queue is
  "missing" and declared with ``task_create_missing_queue_type`` and an exchange of type
  ``task_create_missing_queue_exchange_type`` (direct when unset);
* durable, never exclusive or auto-delete (a quorum queue cannot be either);
* ``x-max-priority`` is not a quorum-queue argument (RabbitMQ refuses the declaration): it
  is left out for quorum queues (RabbitMQ 4.x gives quorum queues two priorities without it);
* "quorum mode" is on as soon as one queue is quorum: a client then sends countdown/eta
  through the ``celery_delayed_*`` exchanges, and a worker declares them and binds each
  of its queues whose exchange is not direct (:func:`delayed_topology`, :func:`delayed_bindings`).

:class:`DelayedDeliveryBindings` remembers which queues a publisher has bound to that topology
on its connection (it calls the publisher's declaration; no I/O of its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aio_celery.exceptions import ConfigurationError

CLASSIC = "classic"
QUORUM = "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM)
EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")

#: kombu's native delayed delivery: 28 levels of 2**N seconds, about 8.5 years in all
DELAY_BITS = 28
MAX_LEVEL = DELAY_BITS - 1
DELAYED_DELIVERY_EXCHANGE = "celery_delayed_delivery"
#: where a client publishes a delayed message
FIRST_DELAY_EXCHANGE = f"celery_delayed_{MAX_LEVEL}"
#: the longest delay the levels can express, in whole seconds
MAX_DELAY: int = 2**DELAY_BITS - 1

_DELAY_PREFIX = re.compile(rf"^(?:[01]\.){{{DELAY_BITS}}}")


@dataclasses.dataclass(frozen=True)
class QueueDeclaration:
    """One queue, its exchange (same name) and the binding between them."""

    name: str
    queue_type: str
    exchange_type: str
    arguments: dict[str, Any] | None

    @property
    def exchange(self) -> str:
        return self.name

    @property
    def routing_key(self) -> str:
        return self.name

    @property
    def delayed_delivery(self) -> bool:
        """Native delayed delivery can reach it (Celery skips direct exchanges)."""
        return self.exchange_type != "direct"


@dataclasses.dataclass(frozen=True)
class QueuePlan:
    """How every queue is declared: built once from the settings (:meth:`from_settings`)."""

    default_queue: str = "celery"
    default_queue_type: str = CLASSIC
    default_exchange_type: str = "direct"
    missing_queue_type: str = CLASSIC
    missing_exchange_type: str | None = None
    max_priority: int | None = None
    extra_arguments: Mapping[str, Any] | None = None
    delayed_queue_type: str = QUORUM

    @classmethod
    def from_settings(cls, settings: Any) -> QueuePlan:
        return cls(
            default_queue=settings.task_default_queue,
            default_queue_type=settings.task_default_queue_type,
            default_exchange_type=settings.task_default_exchange_type,
            missing_queue_type=settings.task_create_missing_queue_type,
            missing_exchange_type=settings.task_create_missing_queue_exchange_type,
            max_priority=settings.task_queue_max_priority,
            extra_arguments=settings.task_queue_arguments,
            delayed_queue_type=settings.broker_native_delayed_delivery_queue_type,
        )

    def check(self) -> None:
        """ConfigurationError naming the setting whose value cannot be used."""
        for setting, value, allowed in (
            ("task_default_queue_type", self.default_queue_type, QUEUE_TYPES),
            ("task_create_missing_queue_type", self.missing_queue_type, QUEUE_TYPES),
            ("broker_native_delayed_delivery_queue_type", self.delayed_queue_type,
             QUEUE_TYPES),
            ("task_default_exchange_type", self.default_exchange_type, EXCHANGE_TYPES),
            ("task_create_missing_queue_exchange_type", self.missing_exchange_type or "direct",
             EXCHANGE_TYPES),
        ):
            if value not in allowed:
                raise ConfigurationError(f"{setting}={value!r}: use one of "
                                         f"{', '.join(map(repr, allowed))}")

    @property
    def quorum_mode(self) -> bool:
        """Celery's ``detect_quorum_queues``: some queue is (or will be) a quorum queue."""
        return QUORUM in (self.default_queue_type, self.missing_queue_type)

    def queue(self, name: str) -> QueueDeclaration:
        if name == self.default_queue:
            queue_type, exchange_type = self.default_queue_type, self.default_exchange_type
        else:
            queue_type = self.missing_queue_type
            exchange_type = self.missing_exchange_type or "direct"
        return QueueDeclaration(name, queue_type, exchange_type, self._arguments(queue_type))

    def _arguments(self, queue_type: str) -> dict[str, Any] | None:
        arguments = dict(self.extra_arguments or {})
        if queue_type == QUORUM:
            arguments["x-queue-type"] = QUORUM
        elif self.max_priority:
            arguments["x-max-priority"] = self.max_priority
        return arguments or None


# --- native delayed delivery ----------------------------------------------------------------


def level_name(level: int) -> str:
    return f"celery_delayed_{level}"


@dataclasses.dataclass(frozen=True)
class Binding:
    """``destination`` (a queue, or an exchange when ``to_exchange``) bound to ``source``."""

    destination: str
    source: str
    routing_key: str
    to_exchange: bool


@dataclasses.dataclass(frozen=True)
class DelayedTopology:
    """kombu's ``declare_native_delayed_delivery_exchanges_and_queues``, in its order."""

    exchanges: tuple[str, ...]  # all topic, durable
    queues: tuple[tuple[str, dict[str, Any]], ...]  # durable
    bindings: tuple[Binding, ...]


def delayed_topology(queue_type: str = QUORUM) -> DelayedTopology:
    exchanges: list[str] = []
    queues: list[tuple[str, dict[str, Any]]] = []
    bindings: list[Binding] = []
    for level in range(MAX_LEVEL, -1, -1):
        name = level_name(level)
        arguments: dict[str, Any] = {
            "x-queue-type": queue_type,
            "x-overflow": "reject-publish",
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": level_name(level - 1) if level else
            DELAYED_DELIVERY_EXCHANGE,
        }
        if queue_type == QUORUM:
            arguments["x-dead-letter-strategy"] = "at-least-once"
        exchanges.append(name)
        queues.append((name, arguments))
        bindings.append(Binding(name, name, "*." * (MAX_LEVEL - level) + "1.#", False))
    for level in range(MAX_LEVEL, 0, -1):
        bindings.append(Binding(level_name(level - 1), level_name(level),
                                "*." * (MAX_LEVEL - level) + "0.#", True))
    exchanges.append(DELAYED_DELIVERY_EXCHANGE)
    bindings.append(Binding(DELAYED_DELIVERY_EXCHANGE, level_name(0),
                            "*." * MAX_LEVEL + "0.#", True))
    return DelayedTopology(tuple(exchanges), tuple(queues), tuple(bindings))


def delayed_bindings(queue: QueueDeclaration) -> tuple[Binding, Binding]:
    """kombu's ``bind_queue_to_native_delayed_delivery_exchange`` for one queue: its
    exchange bound to ``celery_delayed_delivery``, and the queue to its exchange, both with
    ``#.<routing key>``."""
    key = queue.routing_key if queue.routing_key.startswith("#") else f"#.{queue.routing_key}"
    return (Binding(queue.exchange, DELAYED_DELIVERY_EXCHANGE, key, True),
            Binding(queue.name, queue.exchange, key, False))


def delayed_routing_key(countdown: int, routing_key: str) -> str:
    """kombu's ``calculate_routing_key``: the 28 bits of ``countdown`` seconds as 28
    dot-separated digits, then the routing key (a delay prefix it carries already, from a
    retry, is replaced)."""
    if countdown < 1:
        raise ValueError("countdown must be a positive number")
    if not routing_key:
        raise ValueError("routing_key must be non-empty")
    if countdown > MAX_DELAY:
        raise ValueError(f"countdown {countdown}s is beyond native delayed delivery's "
                         f"{MAX_DELAY}s")
    routing_key = _DELAY_PREFIX.sub("", routing_key, count=1)
    return ".".join(f"{countdown:0{DELAY_BITS}b}") + f".{routing_key}"


def park_countdown(remaining: float) -> int:
    """Whole seconds for a worker's own park: rounded up (never early), at least 1."""
    return min(MAX_DELAY, max(1, math.ceil(remaining)))


class DelayedDeliveryBindings:
    """Which queues have the delayed delivery topology declared and bound on a publisher's
    current connection (the bookkeeping both publishers share; the declaring is theirs,
    ``declare((queue,))``). Each queue is declared once per connection: concurrent callers
    share one declaration, a failed one is tried again by the next caller, and
    :meth:`forget` (the connection is gone) starts over."""

    def __init__(self, declare: Callable[[tuple[str, ...]], Awaitable[None]]) -> None:
        self._declare = declare
        self._queues: dict[str, asyncio.Future[None]] = {}

    async def ensure(self, queue: str) -> None:
        future = self._queues.get(queue)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.ensure_future(self._declare((queue,)))
            self._queues[queue] = future
        await asyncio.shield(future)

    def forget(self) -> None:
        self._queues.clear()
