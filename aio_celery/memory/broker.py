"""An in-process broker for ``broker_url="memory://"``: queues, delivery tags, settlement.

It keeps RabbitMQ's rules that the worker relies on: each consumer gets at most
``prefetch_count`` unsettled deliveries; an ack (``multiple`` too), a reject or a nack
settles by delivery tag on the channel the delivery came on, and an unknown tag closes the
channel (PRECONDITION_FAILED, as RabbitMQ does); a nack or ``reject(requeue=True)`` puts
the message back at the head of its queue, marked redelivered; ``reject(requeue=False)``
drops it (there is no dead-letter exchange); a closed channel gives back what it had not
settled. A queue declared with ``x-max-priority`` delivers higher priorities first, as
RabbitMQ does; others are first in, first out. A holding queue (its ``x-message-ttl``)
hands a message back to its target queue after the TTL, on a loop timer. Messages keep
their AMQP properties as wire bytes (encoded and decoded by :mod:`aio_celery.amqp.wire`,
as on the network), so the worker reads them exactly as it reads RabbitMQ's.

Nothing leaves the process and nothing survives it: see the README's list of differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from aio_celery.amqp.reader import Delivery
from aio_celery.amqp.wire import Deliver, decode_properties

__all__ = ["MemoryBroker", "broker_for", "reset"]


@dataclass(slots=True)
class Message:
    body: bytes
    properties: bytes
    priority: int
    routing_key: str
    exchange: str = ""
    redelivered: bool = False


@dataclass(order=True, slots=True)
class _Entry:
    key: tuple[int, int]
    message: Message = field(compare=False)


class _Queue:
    def __init__(self, name: str, prioritized: bool) -> None:
        self.name = name
        self.prioritized = prioritized
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._front = itertools.count(-1, -1)  # requeued messages go before everything
        self.consumers: list[Consumer] = []
        self._turn = 0

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, message: Message, *, front: bool = False) -> None:
        order = next(self._front) if front else next(self._seq)
        rank = -message.priority if self.prioritized else 0
        heapq.heappush(self._heap, _Entry((rank, order), message))

    def pop(self) -> Message:
        return heapq.heappop(self._heap).message

    def next_consumer(self) -> Consumer | None:
        """Round robin over the consumers that can take a delivery now."""
        count = len(self.consumers)
        for step in range(count):
            consumer = self.consumers[(self._turn + step) % count]
            if consumer.can_take():
                self._turn = (self._turn + step + 1) % count
                return consumer
        return None


class Consumer:
    def __init__(self, channel: MemoryChannel, queue: _Queue, tag: str,
                 callback: Callable[[Delivery], None]) -> None:
        self.channel = channel
        self.queue = queue
        self.tag = tag
        self.callback = callback
        self.unsettled = 0

    def can_take(self) -> bool:
        prefetch = self.channel.prefetch_count
        return not self.channel.held and (not prefetch or self.unsettled < prefetch)


class MemoryBroker:
    """The queues of one ``memory://`` URL in this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queues: dict[str, _Queue] = {}
        #: holding queue name -> (target queue, TTL in seconds)
        self._holding: dict[str, tuple[str, float]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._timer_ids = itertools.count()
        #: the loop a dispatch is scheduled on (a test's loop may close with one pending:
        #: the next loop schedules its own)
        self._dispatch_on: asyncio.AbstractEventLoop | None = None
        self._channels: set[MemoryChannel] = set()

    def declare(self, name: str, *, prioritized: bool = False) -> None:
        if name not in self._queues:
            self._queues[name] = _Queue(name, prioritized)

    def declare_holding(self, name: str, target: str, ttl: float) -> None:
        self._holding[name] = (target, ttl)

    def has_queue(self, name: str) -> bool:
        return name in self._queues or name in self._holding

    def message_count(self, name: str) -> int:
        queue = self._queues.get(name)
        return 0 if queue is None else len(queue)

    def publish(self, message: Message) -> bool:
        """Route ``message`` by its routing key (the default exchange: the queue of that
        name); False when no queue took it (unroutable)."""
        name = message.routing_key
        holding = self._holding.get(name)
        if holding is not None:
            target, ttl = holding
            message.routing_key = target
            timer = next(self._timer_ids)
            self._timers[timer] = asyncio.get_running_loop().call_later(
                ttl, self._expire, message, timer)
            return True
        queue = self._queues.get(name)
        if queue is None:
            return False
        queue.put(message)
        self._schedule_dispatch()
        return True

    def _expire(self, message: Message, timer: int) -> None:
        """A holding queue's TTL ran out: dead-lettered to its target, as RabbitMQ does."""
        del self._timers[timer]
        self.publish(message)

    def requeue(self, queue: str, message: Message) -> None:
        target = self._queues.get(queue)
        if target is None:
            return
        message.redelivered = True
        target.put(message, front=True)
        self._schedule_dispatch()

    def attach(self, channel: MemoryChannel) -> None:
        self._channels.add(channel)

    def detach(self, channel: MemoryChannel) -> None:
        self._channels.discard(channel)

    def consume(self, consumer: Consumer) -> None:
        consumer.queue.consumers.append(consumer)
        self._schedule_dispatch()

    def queue(self, name: str) -> _Queue:
        return self._queues[name]

    def cancel(self, consumer: Consumer) -> None:
        with contextlib.suppress(ValueError):
            consumer.queue.consumers.remove(consumer)

    def _schedule_dispatch(self) -> None:
        # Deliveries never reach a callback inside publish() or ack(): on a network they
        # arrive later, and the worker's code is written for that.
        loop = asyncio.get_running_loop()
        if self._dispatch_on is not loop:
            self._dispatch_on = loop
            loop.call_soon(self._dispatch)

    def kick(self) -> None:
        """A consumer may take more now (a settlement, a release)."""
        self._schedule_dispatch()

    def _dispatch(self) -> None:
        self._dispatch_on = None
        for queue in list(self._queues.values()):
            while len(queue):
                consumer = queue.next_consumer()
                if consumer is None:
                    break
                consumer.channel.deliver(consumer, queue.pop())

    def close(self) -> None:
        """Forget every queue and message; cancel the holding queues' timers."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._queues.clear()
        self._holding.clear()


class MemoryChannel:
    """One consumer channel on a :class:`MemoryBroker`: delivery tags and their settlement."""

    def __init__(self, broker: MemoryBroker, prefetch_count: int) -> None:
        self.broker = broker
        self.prefetch_count = prefetch_count
        self.held = False
        self._tags = itertools.count(1)
        self._consumer_tags = itertools.count(1)
        #: delivery tag -> (consumer, message), in delivery order
        self._unsettled: dict[int, tuple[Consumer, Message]] = {}
        self.consumers: dict[str, Consumer] = {}  # by queue
        self._closed: asyncio.Future[str] | None = None

    @property
    def is_open(self) -> bool:
        return self._closed is not None and not self._closed.done()

    def open(self) -> None:
        self._closed = asyncio.get_running_loop().create_future()
        self.broker.attach(self)

    async def closed(self) -> str:
        if self._closed is None:
            raise ConnectionError("memory channel is not open")
        return await asyncio.shield(self._closed)

    def consume(self, queue: str, callback: Callable[[Delivery], None]) -> None:
        self._check_open()
        consumer = Consumer(self, self.broker.queue(queue),
                            f"memory.ctag{next(self._consumer_tags)}", callback)
        self.consumers[queue] = consumer
        self.broker.consume(consumer)

    def cancel(self, queue: str) -> None:
        consumer = self.consumers.pop(queue, None)
        if consumer is not None:
            self.broker.cancel(consumer)

    def deliver(self, consumer: Consumer, message: Message) -> None:
        tag = next(self._tags)
        self._unsettled[tag] = (consumer, message)
        consumer.unsettled += 1
        try:
            properties = decode_properties(message.properties)
        except Exception as exc:  # handed over anyway, as the AMQP reader does
            delivery = Delivery(self._deliver(consumer, tag, message), None, message.body,
                                str(exc))
        else:
            delivery = Delivery(self._deliver(consumer, tag, message), properties,
                                message.body)
        consumer.callback(delivery)

    @staticmethod
    def _deliver(consumer: Consumer, tag: int, message: Message) -> Deliver:
        return Deliver(consumer.tag, tag, message.redelivered, message.exchange,
                       message.routing_key)

    def ack(self, tag: int, multiple: bool = False) -> None:
        self._check_open()
        if tag not in self._unsettled:  # RabbitMQ's rule, ``multiple`` or not
            self._fail(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
            return
        for each in [t for t in self._unsettled if t <= tag] if multiple else [tag]:
            self._settle(each)
        self.broker.kick()

    def reject(self, tag: int, requeue: bool) -> None:
        self._check_open()
        if tag not in self._unsettled:
            self._fail(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
            return
        consumer, message = self._settle(tag)
        if requeue:
            self.broker.requeue(consumer.queue.name, message)
        self.broker.kick()

    def _settle(self, tag: int) -> tuple[Consumer, Message]:
        consumer, message = self._unsettled.pop(tag)
        consumer.unsettled -= 1
        return consumer, message

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.broker.kick()

    def _check_open(self) -> None:
        if not self.is_open:
            raise ConnectionError("memory channel is closed")

    def _fail(self, reason: str) -> None:
        """What RabbitMQ does on a channel error: the channel is closed, its unsettled
        messages go back to their queues."""
        self.close(reason)

    def close(self, reason: str = "closed by the worker") -> None:
        for queue in list(self.consumers):
            self.cancel(queue)
        unsettled, self._unsettled = self._unsettled, {}
        for consumer, message in unsettled.values():
            self.broker.requeue(consumer.queue.name, message)
        self.broker.detach(self)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(reason)


_brokers: dict[str, MemoryBroker] = {}


def broker_for(url: str) -> MemoryBroker:
    """The broker of ``url`` (``memory://`` or ``memory://name``) in this process: a client
    and a worker of the same URL share its queues, as they would share a RabbitMQ vhost."""
    broker = _brokers.get(url)
    if broker is None:
        broker = _brokers[url] = MemoryBroker(url)
    return broker


def reset(url: str | None = None) -> None:
    """Forget the queues (and pending messages) of ``url``, or of every memory broker: a
    test suite calls it between tests (:mod:`aio_celery.testing` does)."""
    for name in [url] if url is not None else list(_brokers):
        broker = _brokers.pop(name, None)
        if broker is not None:
            broker.close()
