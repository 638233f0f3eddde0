"""The worker's publisher: its own AMQP client on a second connection.

A worker publishes follow-ups (chain steps, callbacks, retries, ``send_task`` from its
tasks), parks far etas, and declares holding queues and the native delayed delivery
topology. It does so on a connection of its own, never the one it consumes on: RabbitMQ
blocks a publishing connection under a resource alarm (it stops reading its socket), and
the consumer's acks must keep flowing meanwhile. Both connections are
:class:`~aio_celery.amqp.connection.AMQPConnection`, so a worker process never loads
aio-pika; the client side (:class:`~aio_celery.broker.Broker`) keeps it.

:class:`Publishing` is what sending needs of a publisher (``app.send_task``, canvas,
``retry()``); both :class:`~aio_celery.broker.Broker` and :class:`WorkerPublisher` have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Protocol

from aio_celery.amqp.connection import RPC_TIMEOUT, AMQPConnection, Nacked
from aio_celery.amqp.wire import encode_properties
from aio_celery.broker import (
    DelayedDeliveryRefused,
    HoldingQueueRefused,
    connect_first,
    describe_error,
    holding_queue_arguments,
)
from aio_celery.exceptions import BrokerConnectionError, PublishRefusedError
from aio_celery.failover import Failover
from aio_celery.protocol import Envelope
from aio_celery.quorum import (
    FIRST_DELAY_EXCHANGE,
    QUORUM,
    DelayedDeliveryBindings,
    QueuePlan,
    delayed_bindings,
    delayed_routing_key,
    delayed_topology,
)

logger = logging.getLogger(__name__)

#: channel errors that no retry fixes: ACCESS_REFUSED, NOT_FOUND, RESOURCE_LOCKED,
#: PRECONDITION_FAILED (a queue that exists with other arguments)
CHANNEL_REFUSALS = (403, 404, 405, 406)


class Publishing(Protocol):
    """What sending a task needs of a publisher."""

    def delays_natively(self, queue: str) -> bool: ...

    async def publish(self, envelope: Envelope, queue: str, delay: int = 0) -> None: ...

    async def close(self) -> None: ...


class WorkerPublisher:
    """Publishing for a worker process, on one :class:`AMQPConnection` of its own.

    Connects on first use, on the URLs of ``broker_url`` in ``failover``'s order (the
    consumer's ``broker_failover_strategy``). Our connection has a single channel, so a
    channel error (a declaration or publish the broker refuses) closes the whole
    publishing connection: whatever else waited for a confirm on it fails with
    BrokerConnectionError (and is retried by its owner), and the next use opens a new
    connection, moving on to the next URL. That costs a reconnect per refusal, which is
    acceptable here and only here: nothing is consumed or acknowledged on this connection.
    Refusals are rare and remembered where they would repeat (the worker's session does
    not declare a refused holding queue again).
    """

    def __init__(self, failover: Failover, *, plan: QueuePlan,
                 connection_timeout: float = 4.0, publish_timeout: float | None = None,
                 heartbeat: int = 60, connection_name: str = "aio_celery worker publisher",
                 rpc_timeout: float = RPC_TIMEOUT) -> None:
        self.failover = failover
        self.plan = plan
        self.connection_timeout = connection_timeout
        self.publish_timeout = publish_timeout
        self.heartbeat = heartbeat
        self.connection_name = connection_name
        self.rpc_timeout = rpc_timeout
        self._connection: AMQPConnection | None = None
        self._connecting: asyncio.Future[AMQPConnection] | None = None
        #: declarations made on the open connection (a new connection makes them again)
        self._declared: dict[str, asyncio.Future[None]] = {}
        self._delayed = DelayedDeliveryBindings(self.declare_delayed_delivery)
        self._exchanges: dict[str, asyncio.Future[None]] = {}
        self._closed = False

    @property
    def connection(self) -> AMQPConnection | None:
        """The open connection, if any (for tests and diagnostics)."""
        connection = self._connection
        return connection if connection is not None and connection.is_open else None

    # --- connecting -----------------------------------------------------------------------

    async def _ready(self) -> AMQPConnection:
        """The open connection; the first caller after none (or a lost one) connects, the
        others wait for that attempt (BrokerConnectionError if it fails)."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._closed:
            raise BrokerConnectionError("the worker's publisher is closed")
        if connection is not None:
            self._lost(connection)
        if self._connecting is None or self._connecting.done():
            # An empty context: the connection's callbacks must not carry the first
            # sender's (a task's request) for the life of the process.
            self._connecting = asyncio.get_running_loop().create_task(
                self._connect(), context=contextvars.Context())
            # retrieved here too: its waiters may all have been cancelled meanwhile
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    def _lost(self, connection: AMQPConnection) -> None:
        self._connection = None
        self._declared.clear()
        self._delayed.forget()
        self._exchanges.clear()
        ended = connection.ended_reason
        logger.warning("The worker's publishing connection to %s ended (%s): the next "
                       "publish opens a new one%s", self.failover.masked, ended,
                       ", trying the next broker URL first" if len(self.failover.urls) > 1
                       else "")
        self.failover.lost()

    async def _connect(self) -> AMQPConnection:
        # A refused login is BrokerRefused (a BrokerConnectionError): the consumer's
        # connection gets the same answer and stops the worker.
        connection = await connect_first(
            self.failover, heartbeat=self.heartbeat, connection_name=self.connection_name,
            connection_timeout=self.connection_timeout, rpc_timeout=self.rpc_timeout,
            publish_timeout=self.publish_timeout)
        self._connection = connection
        return connection

    async def close(self) -> None:
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            await asyncio.wait([connecting])
        connection, self._connection = self._connection, None
        self._declared.clear()
        self._delayed.forget()
        self._exchanges.clear()
        if connection is not None:
            await connection.close(timeout=self.connection_timeout)

    # --- declarations -----------------------------------------------------------------------

    def delays_natively(self, queue: str) -> bool:
        """Celery's rule: in quorum mode, countdown/eta for a queue whose exchange is not
        direct go through native delayed delivery."""
        return self.plan.quorum_mode and self.plan.queue(queue).delayed_delivery

    async def declare_queue(self, name: str) -> None:
        """Declare ``name`` as Celery does, once per name and connection (concurrent callers
        share one declaration). ConnectionClosed, TimeoutError, OSError as the connection
        raises them."""
        future = self._declared.get(name)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.ensure_future(self._declare(name))
            self._declared[name] = future
        await asyncio.shield(future)

    async def _declare(self, name: str) -> None:
        connection = await self._ready()
        declaration = self.plan.queue(name)
        await connection.exchange_declare(declaration.exchange, declaration.exchange_type,
                                          durable=True)
        await connection.queue_declare(name, durable=True, arguments=declaration.arguments)
        await connection.queue_bind(name, declaration.exchange,
                                    routing_key=declaration.routing_key)

    async def declare_exchange(self, name: str, kind: str, *, durable: bool = True) -> None:
        """Declare an exchange once per connection (concurrent callers share one
        declaration); BrokerConnectionError, or PublishRefusedError if the broker refuses
        it (one that exists with another type: that closes this connection)."""
        async def declare(connection: AMQPConnection) -> None:
            await connection.exchange_declare(name, kind, durable=durable)

        future = self._exchanges.get(name)
        # A declaration made on a connection lost since is made again (on a new one).
        if future is None or (future.done() and (future.cancelled()
                                                 or future.exception() is not None
                                                 or self.connection is None)):
            future = asyncio.ensure_future(self._declaring(f"the exchange {name!r}", declare,
                                                           PublishRefusedError))
            self._exchanges[name] = future
        await asyncio.shield(future)

    def exchange_ready(self, name: str) -> bool:
        """The connection is open and ``name`` was declared on it."""
        future = self._exchanges.get(name)
        return self.connection is not None and future is not None and future.done() \
            and not future.cancelled() and future.exception() is None

    async def declare_delayed_delivery(self, queues: tuple[str, ...]) -> None:
        """Declare Celery's ``celery_delayed_*`` topology and bind ``queues`` to it:
        :class:`DelayedDeliveryRefused` if the broker refuses (that closes this publishing
        connection, never the consumer's), else BrokerConnectionError."""
        async def declare(connection: AMQPConnection) -> None:
            topology = delayed_topology(self.plan.delayed_queue_type)
            for exchange in topology.exchanges:
                await connection.exchange_declare(exchange, "topic", durable=True)
            for name, arguments in topology.queues:
                await connection.queue_declare(name, durable=True, arguments=arguments)
            for binding in topology.bindings + tuple(
                    b for q in queues for b in delayed_bindings(self.plan.queue(q))):
                bind = connection.exchange_bind if binding.to_exchange \
                    else connection.queue_bind
                await bind(binding.destination, binding.source, binding.routing_key)

        await self._declaring("the native delayed delivery topology", declare,
                              DelayedDeliveryRefused)

    async def ensure_delayed_delivery(self, queue: str) -> None:
        """The delayed delivery topology, declared with ``queue`` bound, once per queue and
        connection."""
        await self._delayed.ensure(queue)

    async def declare_holding_queue(self, name: str, target: str, ttl_ms: int) -> None:
        """Declare a holding queue (see :func:`~aio_celery.broker.holding_queue_arguments`):
        :class:`HoldingQueueRefused` if the broker refuses (which closes this publishing
        connection, never the consumer's: the caller must remember the refusal rather than
        declare again), else BrokerConnectionError."""
        quorum = self.plan.queue(target).queue_type == QUORUM

        async def declare(connection: AMQPConnection) -> None:
            await connection.queue_declare(
                name, durable=True, arguments=holding_queue_arguments(target, ttl_ms, quorum))

        await self._declaring(f"the holding queue {name!r}", declare, HoldingQueueRefused)

    async def _declaring(self, what: str, declare: _Declare,
                         refused: type[BrokerConnectionError]) -> None:
        connection = await self._ready()
        try:
            await declare(connection)
        except (ConnectionError, OSError, TimeoutError) as exc:
            if getattr(exc, "reply_code", None) in CHANNEL_REFUSALS:
                raise refused(f"the broker refused to declare {what}: "
                              f"{describe_error(exc)}") from exc
            raise BrokerConnectionError(f"declaring {what} failed: "
                                        f"{describe_error(exc)}") from exc

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, envelope: Envelope, queue: str, delay: int = 0) -> None:
        """Publish to ``queue`` through the default exchange (``delay`` whole seconds: through
        native delayed delivery) and wait for the confirm, as
        :meth:`aio_celery.broker.Broker.publish` does, with its errors:
        :class:`PublishRefusedError` for a channel error that no retry fixes (the queue
        exists with other arguments, no permission...), BrokerConnectionError otherwise
        (no connection, a nack, ``broker_publish_timeout`` reached)."""
        body, properties = envelope.body, encode_properties(envelope)
        task_name, task_id = envelope.headers.get("task"), envelope.correlation_id
        del envelope  # the header dict is not needed past this point
        what = f"task {task_name}[{task_id}]"
        try:
            await self._publish(body, properties, queue, delay)
        except BrokerConnectionError:
            raise  # connecting or a declaration said what went wrong already
        except (ConnectionError, OSError, TimeoutError) as exc:
            if isinstance(exc, Nacked):
                await self._drop_after_nack()
            raise self._error(what, queue, exc) from exc

    async def _drop_after_nack(self) -> None:
        """A nack (a quorum queue without a leader, say) is answered on a new connection:
        RabbitMQ 3.10 went on nacking every publish of the old channel to a quorum queue
        whose leader's node was killed, for minutes, while a new channel was served within
        a second of the new leader's election."""
        connection, self._connection = self._connection, None
        self._declared.clear()
        self._delayed.forget()
        self._exchanges.clear()
        if connection is not None:
            logger.info("The broker nacked a publish: the next one opens a new publishing "
                        "connection")
            with contextlib.suppress(Exception):
                await connection.close()

    async def _publish(self, body: bytes, properties: bytes, queue: str, delay: int) -> None:
        connection = await self._ready()
        declared = self._declared.get(queue)
        if declared is None or not declared.done() or declared.exception() is not None:
            await self.declare_queue(queue)
        exchange, routing_key = "", queue
        if delay:
            await self.ensure_delayed_delivery(queue)
            exchange = FIRST_DELAY_EXCHANGE
            routing_key = delayed_routing_key(delay, self.plan.queue(queue).routing_key)
        await connection.publish(body, properties, routing_key, exchange)

    async def publish_raw(self, body: bytes, properties: bytes, routing_key: str,
                          exchange: str = "") -> None:
        """Publish a received message's body and encoded properties again, mandatory and
        confirmed (a park): :class:`~aio_celery.amqp.connection.Returned` if no queue took
        it, ConnectionClosed if the broker nacked it or the connection is gone,
        BrokerConnectionError if none could be opened."""
        connection = await self._ready()
        try:
            await connection.publish(body, properties, routing_key, exchange, mandatory=True)
        except Nacked:
            await self._drop_after_nack()
            raise

    def publish_nowait(self, body: bytes, properties: bytes, routing_key: str,
                       exchange: str, *, backlog_limit: int) -> bool:
        """Publish without a confirm if that can be done at once: False (nothing sent)
        without an open connection, while the broker blocks publishing (a resource alarm),
        or while more than ``backlog_limit`` bytes wait to be written (a slow broker).
        Declare ``exchange`` first (:meth:`declare_exchange`): a publish to a missing one
        closes the connection."""
        connection = self.connection
        if connection is None or connection.blocked is not None \
                or connection.write_backlog > backlog_limit:
            return False
        connection.publish_unconfirmed(body, properties, routing_key, exchange)
        return True

    def _error(self, what: str, queue: str, exc: BaseException) -> BrokerConnectionError:
        if getattr(exc, "reply_code", None) in CHANNEL_REFUSALS:
            return PublishRefusedError(f"the broker {self.failover.masked} refused {what} for "
                                       f"queue {queue!r}: {describe_error(exc)}")
        why = describe_error(exc)
        if isinstance(exc, TimeoutError):  # the connection's text says blocked or unconfirmed
            why = (f"{exc or 'timed out'} (broker_publish_timeout; the broker blocks "
                   "publishing during a resource alarm: see `rabbitmq-diagnostics alarms`)")
        return BrokerConnectionError(
            f"publishing {what} to {queue!r} on {self.failover.masked} failed: {why}. The "
            "broker did not confirm it; it may or may not have been queued.")


def _retrieve(future: asyncio.Future[AMQPConnection]) -> None:
    if not future.cancelled():
        future.exception()


class _Declare(Protocol):
    async def __call__(self, connection: AMQPConnection, /) -> None: ...

