"""``memory://`` behind the worker's seams (:mod:`aio_celery.transport`).

:class:`MemoryConsumer` is the worker's consumer channel and :class:`MemoryPublisher` the
publisher of both the worker and the client (``app.broker``), on one
:class:`~aio_celery.memory.broker.MemoryBroker` per URL. Queues are declared as Celery
declares them (:class:`~aio_celery.quorum.QueuePlan`: ``x-max-priority`` gives priority
order); native delayed delivery is never used (countdowns wait in the worker, or in a
holding queue, exactly as with a classic RabbitMQ queue). Monitoring events are accepted
and dropped: nothing can listen to them.
"""

from __future__ import annotations

from collections.abc import Callable

from aio_celery.amqp.connection import Returned
from aio_celery.amqp.reader import Delivery
from aio_celery.amqp.wire import decode_properties, encode_properties
from aio_celery.config import is_memory_url
from aio_celery.memory.broker import MemoryBroker, MemoryChannel, Message
from aio_celery.protocol import Envelope
from aio_celery.quorum import QueuePlan

__all__ = ["MemoryConsumer", "MemoryPublisher", "is_memory_url"]

class MemoryConsumer:
    """The worker's consumer channel on a memory broker (see ``ConsumerChannel``)."""

    def __init__(self, broker: MemoryBroker, *, prefetch_count: int, plan: QueuePlan) -> None:
        self.broker = broker
        self.prefetch_count = prefetch_count
        self.plan = plan
        self._channel: MemoryChannel | None = None

    @property
    def channel(self) -> MemoryChannel:
        if self._channel is None:
            raise ConnectionError("memory consumer channel is not open")
        return self._channel

    @property
    def consumer_count(self) -> int:
        channel = self._channel
        return len(channel.consumers) if channel is not None and channel.is_open else 0

    async def open(self) -> None:
        self._channel = MemoryChannel(self.broker, self.prefetch_count)
        self._channel.open()

    async def closed(self) -> str:
        return await self.channel.closed()

    async def declare(self, queue: str) -> None:
        declare(self.broker, self.plan, queue)

    async def message_count(self, queue: str) -> int:
        return self.broker.message_count(queue)

    async def consume(self, queue: str, on_message: Callable[[Delivery], None]) -> None:
        self.channel.consume(queue, on_message)

    async def cancel_consumers(self) -> None:
        channel = self._channel
        if channel is not None:
            for queue in list(channel.consumers):
                channel.cancel(queue)

    async def cancel_queue(self, queue: str) -> None:
        if self._channel is not None:
            self._channel.cancel(queue)

    def pause_deliveries(self) -> None:
        if self._channel is not None:
            self._channel.hold()

    def resume_deliveries(self) -> None:
        if self._channel is not None:
            self._channel.release()

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.channel.ack(tag, multiple)

    def reject(self, tag: int, requeue: bool) -> None:
        self.channel.reject(tag, requeue)

    def nack(self, tag: int) -> None:
        self.channel.reject(tag, requeue=True)

    async def barrier(self) -> None:
        """Settlements take effect at once here: nothing to wait for."""

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


class MemoryPublisher:
    """Sends to a memory broker: the worker's publisher and the client's ``app.broker``."""

    def __init__(self, broker: MemoryBroker, *, plan: QueuePlan) -> None:
        self.broker = broker
        self.plan = plan

    async def connect(self) -> None:
        """Nothing to connect to (the client's ``setup()`` calls it)."""

    def delays_natively(self, queue: str) -> bool:
        return False

    async def declare_queue(self, name: str) -> None:
        declare(self.broker, self.plan, name)

    async def publish(self, envelope: Envelope, queue: str, delay: int = 0) -> None:
        """Into ``queue`` (declared first, as the AMQP publishers do); ``delay`` is always
        0 here (no native delayed delivery)."""
        declare(self.broker, self.plan, queue)
        self.broker.publish(Message(envelope.body, encode_properties(envelope),
                                    envelope.priority or 0, queue))

    async def publish_raw(self, body: bytes, properties: bytes, routing_key: str,
                          exchange: str = "") -> None:
        priority = decode_properties(properties).priority or 0
        if not self.broker.publish(Message(body, properties, priority, routing_key, exchange)):
            raise Returned(f"NO_ROUTE: no queue {routing_key!r} in {self.broker.name}")

    def publish_nowait(self, body: bytes, properties: bytes, routing_key: str,
                       exchange: str, *, backlog_limit: int) -> bool:
        """Events: dropped (nothing consumes them in memory), reported as sent."""
        return True

    async def declare_exchange(self, name: str, kind: str, *, durable: bool = True) -> None:
        """Exchanges exist only for events here, which are dropped."""

    def exchange_ready(self, name: str) -> bool:
        return True

    async def declare_holding_queue(self, name: str, target: str, ttl_ms: int) -> None:
        self.broker.declare_holding(name, target, ttl_ms / 1000)

    async def declare_delayed_delivery(self, queues: tuple[str, ...]) -> None:
        """Never needed: :meth:`delays_natively` is False."""

    async def close(self) -> None:
        """The queues stay: they belong to the broker (see ``memory.reset``)."""


def declare(broker: MemoryBroker, plan: QueuePlan, queue: str) -> None:
    arguments = plan.queue(queue).arguments or {}
    broker.declare(queue, prioritized="x-max-priority" in arguments)
