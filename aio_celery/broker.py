"""The broker adapter: connect, declare queues like Celery, publish and consume.

The client's publishing (:class:`Broker`) goes through aio-pika; the worker consumes
(:class:`ConsumerChannel`) and publishes (:class:`aio_celery.publisher.WorkerPublisher`) on
connections of our own client (:mod:`aio_celery.amqp.connection`). Everything above this
module deals in :class:`~aio_celery.protocol.Envelope` and
:class:`~aio_celery.protocol.TaskMessage`.

aio-pika is imported when :class:`Broker` first connects: a worker, which never uses it,
does not load it (about 7 MiB of memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aio_celery.amqp.connection import (
    RPC_TIMEOUT,
    AMQPConnection,
    ConnectionClosed,
    DeliveryCallback,
    aio_pika_url,
)
from aio_celery.amqp.deadline import SharedDeadlines
from aio_celery.amqp.wire import EncodedProperties
from aio_celery.config import BROKER_SCHEMES, mask_url, url_problem
from aio_celery.exceptions import BrokerConnectionError, ConfigurationError, PublishRefusedError
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

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
    from aiormq import Channel as RawChannel

logger = logging.getLogger(__name__)

_DEFAULT_EXCHANGE = ""


class Broker:
    """The client's publisher: one AMQP connection (aio-pika) with a confirming channel.

    Inert until :meth:`connect`, or, with ``lazy=True``, until the first publish connects it.
    A lost connection is opened again by the next publish, on the next URL of a
    ``;``-separated ``broker_url`` (``broker_failover_strategy``); a channel the broker
    closed is replaced. Queues are declared once per name and connection.
    """

    def __init__(self, url: str, *, connection_timeout: float = 4.0,
                 publish_timeout: float | None = None, heartbeat: int = 60,
                 max_priority: int | None = None, connection_name: str = "aio_celery",
                 lazy: bool = False, queue_arguments: dict[str, Any] | None = None,
                 failover_strategy: str = "round-robin", plan: QueuePlan | None = None,
                 retry_policy: RetryPolicy | None = None) -> None:
        self.url = url
        self.failover = Failover(url, failover_strategy)
        #: retries of a publish that failed for a reason that may pass (a nack, say)
        self.retry_policy = retry_policy or RetryPolicy()
        #: how queues are declared (``max_priority``/``queue_arguments`` without one)
        self.plan = plan or QueuePlan(max_priority=max_priority, extra_arguments=queue_arguments)
        self.lazy = lazy
        self.connection_timeout = connection_timeout
        self.publish_timeout = publish_timeout
        self.heartbeat = heartbeat
        self.max_priority = max_priority
        self.queue_arguments = queue_arguments
        self.connection_name = connection_name
        #: seconds the broker gets to answer a declaration
        self.rpc_timeout = RPC_TIMEOUT
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        #: aiormq's channel under ``_channel``, kept for the publish path (None: fetch it)
        self._raw: RawChannel | None = None
        #: the bounds of the publishes (broker_publish_timeout), one timer per batch
        self._deadlines = SharedDeadlines()
        self._declared: dict[str, asyncio.Future[AbstractQueue]] = {}
        self._delayed = DelayedDeliveryBindings(self.declare_delayed_delivery)
        self._connecting: asyncio.Future[None] | None = None
        self._connected_once = False
        self._closed = False

    @property
    def connection(self) -> AbstractConnection:
        if self._connection is None:
            raise RuntimeError("broker is not connected: use `async with app.setup():`")
        return self._connection

    async def connect(self) -> None:
        """Open the connection and publisher channel on the first URL of ``broker_url``
        that answers, or raise BrokerConnectionError in time (ConfigurationError for a URL
        that cannot be read: its parsers' errors quote it)."""
        problem = url_problem(self.url, BROKER_SCHEMES, failover=True)
        if problem is not None:
            raise ConfigurationError(f"broker_url {mask_url(self.url)}: {problem}")
        failures = []
        for url in self.failover.order():
            try:
                self._connection, self._channel = await self._open(url)
                self._raw = None
            except BrokerConnectionError as exc:
                failures.append(str(exc))
                continue
            self.failover.using(url)
            self._connected_once = True
            self._declared.clear()  # a new connection declares its queues again
            self._delayed.forget()
            return
        raise BrokerConnectionError(
            f"{'; '.join(failures)}. Check that RabbitMQ runs there and that broker_url has "
            "the right host, port, credentials and vhost.")

    async def _open(self, url: str) -> tuple[AbstractConnection, AbstractChannel]:
        import aio_pika
        import aiormq

        try:
            readable = aio_pika_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"broker_url {mask_url(url)}: {exc}") from None
        try:
            connection = await asyncio.wait_for(
                aio_pika.connect(readable, timeout=self.connection_timeout,
                                 heartbeat=self.heartbeat,
                                 client_properties={"connection_name": self.connection_name}),
                timeout=self.connection_timeout + 1)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerConnectionError(
                f"cannot connect to broker {mask_url(url)} within "
                f"{self.connection_timeout}s: {describe_error(exc)}") from exc
        try:
            channel = await asyncio.wait_for(connection.channel(publisher_confirms=True),
                                             self.connection_timeout)
        except BaseException as exc:
            await connection.close()
            if isinstance(exc, TimeoutError | OSError | aiormq.exceptions.AMQPError):
                raise BrokerConnectionError(f"cannot open a channel on broker "
                                            f"{mask_url(url)}: {describe_error(exc)}") from exc
            raise
        connection.close_callbacks.add(self._on_connection_closed)
        return connection, channel

    def _on_connection_closed(self, connection: Any, exc: BaseException | None) -> None:
        if connection is not self._connection:  # an older one, or closed by close()
            return
        logger.warning("Lost the publisher connection to %s (%s): the next publish opens a "
                       "new one%s", self.failover.masked,
                       describe_error(exc) if exc else "closed",
                       ", trying the next broker URL first" if len(self.failover.urls) > 1
                       else "")
        self.failover.lost()
        self._connection = self._channel = self._raw = None
        self._declared.clear()
        self._delayed.forget()

    async def _publisher_ready(self) -> AbstractChannel:
        """The publisher channel, once (re)opened where needed: lazy mode's first publisher
        connects, the others wait for that; after a failure the next one tries again."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        if self._closed:
            raise RuntimeError("broker is closed: use `async with app.setup():`")
        if not (self.lazy or self._connected_once):
            raise RuntimeError("broker is not connected: use `async with app.setup():`")
        if self._connecting is None or self._connecting.done():
            # An empty context: the connection's background tasks must not carry the
            # first sender's (a task's request, say) for the life of the process.
            self._connecting = asyncio.get_running_loop().create_task(
                self._restore(), context=contextvars.Context())
        await asyncio.shield(self._connecting)
        return self._publisher()

    async def _restore(self) -> None:
        connection = self._connection
        if connection is not None and not connection.is_closed:
            # The broker closed just the channel (a channel error): open another.
            self._channel = await asyncio.wait_for(
                connection.channel(publisher_confirms=True), self.connection_timeout)
            self._raw = None
        else:
            await self.connect()

    async def close(self) -> None:
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            await asyncio.wait([connecting])  # a connection made meanwhile is closed below
            if not connecting.cancelled():
                connecting.exception()  # retrieved: nobody else waits for it now
        connection, self._connection, self._channel = self._connection, None, None
        self._raw = None
        self._declared.clear()
        self._delayed.forget()
        if connection is not None:
            # bounded: a stalled broker never answers connection.close
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connection.close(), self.connection_timeout)

    async def channel(self, prefetch_count: int = 0) -> AbstractChannel:
        """A new channel on this connection (e.g. one for consuming)."""
        channel: AbstractChannel = await self.connection.channel()
        if prefetch_count:
            await channel.set_qos(prefetch_count=prefetch_count)
        return channel

    async def declare_queue(self, name: str,
                            channel: AbstractChannel | None = None) -> AbstractQueue:
        """Declare ``name`` as Celery does: a durable queue bound to a durable direct exchange
        of the same name. Concurrent callers for one name share a single declaration."""
        if channel is not None:
            return await self._declare(name, channel)
        publisher = await self._publisher_ready()
        future = self._declared.get(name)
        if future is None:
            future = asyncio.ensure_future(self._declare(name, publisher))
            self._declared[name] = future
        try:
            return await asyncio.shield(future)
        except BaseException:
            if future.done():
                self._declared.pop(name, None)
            raise

    async def _declare(self, name: str, channel: AbstractChannel) -> AbstractQueue:
        import aio_pika

        timeout = self.rpc_timeout
        declaration = self.plan.queue(name)
        try:
            exchange = await channel.declare_exchange(
                declaration.exchange, aio_pika.ExchangeType(declaration.exchange_type),
                durable=True, timeout=timeout)
            queue: AbstractQueue = await channel.declare_queue(
                name, durable=True, arguments=declaration.arguments, timeout=timeout)
            await queue.bind(exchange, routing_key=declaration.routing_key, timeout=timeout)
        except TimeoutError:
            raise BrokerConnectionError(f"the broker {self.failover.masked} did not answer "
                                        f"the declaration of queue {name!r} within "
                                        f"{timeout:g}s") from None
        return queue

    def delays_natively(self, queue: str) -> bool:
        """Celery's rule: in quorum mode, countdown/eta for a queue whose exchange is not
        direct go through native delayed delivery."""
        return self.plan.quorum_mode and self.plan.queue(queue).delayed_delivery

    async def declare_delayed_delivery(self, queues: tuple[str, ...]) -> None:
        """Declare Celery's ``celery_delayed_*`` topology and bind ``queues`` (each declared
        and able to use it, see :meth:`delays_natively`), on a channel of its own: a refusal
        (a level queue that exists with other arguments, no permission) raises
        :class:`DelayedDeliveryRefused` and leaves the other connections alone."""
        timeout = self.rpc_timeout

        async def declare(channel: Any) -> None:
            topology = delayed_topology(self.plan.delayed_queue_type)
            for exchange in topology.exchanges:
                await channel.exchange_declare(exchange, exchange_type="topic", durable=True,
                                               timeout=timeout)
            for name, arguments in topology.queues:
                await channel.queue_declare(name, durable=True, arguments=arguments,
                                            timeout=timeout)
            for binding in topology.bindings + tuple(
                    b for q in queues for b in delayed_bindings(self.plan.queue(q))):
                bind = channel.exchange_bind if binding.to_exchange else channel.queue_bind
                await bind(binding.destination, binding.source,
                           routing_key=binding.routing_key, timeout=timeout)

        await self._on_own_channel("the native delayed delivery topology", declare,
                                   DelayedDeliveryRefused)

    async def ensure_delayed_delivery(self, queue: str) -> None:
        """Declare the native delayed delivery topology and bind ``queue`` to it, once per
        queue and connection: a worker does it at start-up (as Celery's does), a client
        before its first delayed send (Celery's client does not: with no worker having
        declared it, its message is unroutable and dropped)."""
        await self._delayed.ensure(queue)

    async def declare_holding_queue(self, name: str, target: str, ttl_ms: int) -> None:
        """Declare a holding queue (see :func:`holding_queue_arguments`) on a channel of its
        own that is closed afterwards: a refusal (no configure permission, the queue exists
        with other arguments) closes only that channel, never the worker's consumer
        connection, and raises :class:`HoldingQueueRefused`. Other failures raise
        BrokerConnectionError."""
        quorum = self.plan.queue(target).queue_type == QUORUM

        async def declare(channel: Any) -> None:
            await channel.queue_declare(
                name, durable=True, arguments=holding_queue_arguments(target, ttl_ms, quorum),
                timeout=self.rpc_timeout)

        await self._on_own_channel(f"the holding queue {name!r}", declare, HoldingQueueRefused)

    async def _on_own_channel(self, what: str, declare: Callable[[Any], Awaitable[None]],
                              refused: type[BrokerConnectionError]) -> None:
        """Run ``declare(channel)`` on a new aiormq channel of the publisher's connection,
        closed afterwards: ``refused`` if the broker closes that channel, else
        BrokerConnectionError."""
        import aiormq

        try:
            publisher = _aiormq_channel(
                await (await self._publisher_ready()).get_underlay_channel())
            channel = await publisher.connection.channel(timeout=self.rpc_timeout)
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
            raise BrokerConnectionError(f"cannot open a channel to declare {what}: "
                                        f"{describe_error(exc)}") from exc
        try:
            await declare(channel)
        except aiormq.exceptions.ChannelClosed as exc:
            raise refused(f"the broker refused to declare {what}: "
                          f"{describe_error(exc)}") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
            raise BrokerConnectionError(f"declaring {what} failed: "
                                        f"{describe_error(exc)}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _drop_channel_after_nack(self) -> None:
        """The next publish opens a new channel: RabbitMQ 3.10 went on nacking every publish
        of a channel to a quorum queue whose leader's node was killed, for minutes, while a
        new channel was served within a second of the new leader's election."""
        channel, self._channel, self._raw = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), self.connection_timeout)

    async def _raw_publisher(self) -> RawChannel:
        """aiormq's channel under the publisher channel, (re)opened where needed."""
        raw = _aiormq_channel(await (await self._publisher_ready()).get_underlay_channel())
        self._raw = raw
        return raw

    def _publisher(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("broker is not connected: use `async with app.setup():`")
        return self._channel

    async def publish(self, envelope: Envelope, queue: str, delay: int = 0) -> None:
        """Publish to ``queue`` through the default exchange (as Celery 5 does) and wait for
        the broker's confirm. ``delay`` (whole seconds, see :meth:`delays_natively`): through
        native delayed delivery, to ``celery_delayed_27`` with Celery's routing key. A
        failure that may pass (a nack, a lost connection) is retried as ``retry_policy``
        says (Celery's ``task_publish_retry_policy``).

        Raises :class:`PublishRefusedError` when the broker refuses for good (a channel
        error: the queue exists with other arguments, no permission, ...) and
        :class:`BrokerConnectionError` for what may pass (connection lost or not made, a
        nack, ``broker_publish_timeout`` reached)."""
        import aiormq

        body, properties = envelope.body, EncodedProperties(envelope)
        task_name, task_id = envelope.headers.get("task"), envelope.correlation_id
        del envelope  # the header dict is not needed past this point
        retries = 0
        # One coroutine for the tries (no frame per try): tens of thousands of these wait
        # for their confirms at once.
        while True:
            try:
                declared = self._declared.get(queue)
                if declared is None or not declared.done():
                    await self.declare_queue(queue)  # waits for a declaration under way too
                exchange, routing_key = _DEFAULT_EXCHANGE, queue
                if delay:
                    await self.ensure_delayed_delivery(queue)
                    exchange = FIRST_DELAY_EXCHANGE
                    routing_key = delayed_routing_key(delay, self.plan.queue(queue).routing_key)
                raw = self._raw
                if raw is None or raw.is_closed:  # else no await: the common case
                    raw = await self._raw_publisher()
                with self._deadlines.bound(self.publish_timeout):
                    # While the broker blocks publishing (a resource alarm) the message
                    # stays here: sent, it would only wait in the socket, unconfirmed.
                    await raw.connection.ready()
                    # wait=False: do not hold aiormq's channel lock until the socket
                    # drains; the publisher confirm awaited here proves the broker has it.
                    await raw.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                            properties=properties, wait=False)
                return
            except BrokerConnectionError as exc:  # the connect or a declaration said why
                error = exc
            except _refusals() as exc:
                raise PublishRefusedError(
                    f"the broker {self.failover.masked} refused task {task_name}[{task_id}] "
                    f"for queue {queue!r}: {describe_error(exc)}") from exc
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
                    ConnectionError, TimeoutError) as exc:  # the channel closed: reconnecting
                if isinstance(exc, aiormq.exceptions.DeliveryError):
                    await self._drop_channel_after_nack()
                error = self._unconfirmed(f"task {task_name}[{task_id}]", queue, exc)
            pause = self.retry_policy.pause(retries)
            if pause is None or not _may_retry(error):
                raise error
            retries += 1
            logger.warning("Publishing task %s[%s] failed (%s): retry %d of %d in %.1fs "
                           "(task_publish_retry_policy)", task_name, task_id, _cause(error),
                           retries, self.retry_policy.max_retries, pause)
            await asyncio.sleep(pause)

    def _unconfirmed(self, what: str, queue: str, exc: BaseException) -> BrokerConnectionError:
        why = describe_error(exc)
        if isinstance(exc, TimeoutError):
            why = (f"no confirm within {self.publish_timeout:g}s (broker_publish_timeout),"
                   " or the broker blocked publishing that long (a resource alarm: see "
                   "`rabbitmq-diagnostics alarms`)")
        error = BrokerConnectionError(
            f"publishing {what} to {queue!r} on {self.failover.masked} failed: {why}. The "
            "broker did not confirm it; it may or may not have been queued.")
        error.__cause__ = exc
        return error


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Celery's ``task_publish_retry_policy``: how often, and after which pauses, a client
    publish that failed for a reason that may pass is tried again."""

    max_retries: int = 3
    interval_start: float = 0.0
    interval_step: float = 0.2
    interval_max: float = 0.2

    @classmethod
    def from_settings(cls, retry: bool, policy: dict[str, Any] | None) -> RetryPolicy:
        if not retry:
            return cls(max_retries=0)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(policy or {}) - known
        if unknown:
            raise ConfigurationError(f"task_publish_retry_policy: unknown key(s) "
                                     f"{sorted(unknown)}; known: {sorted(known)}")
        return cls(**(policy or {}))

    def pause(self, retries: int) -> float | None:
        """The pause before the next retry, after ``retries`` of them; None: no more."""
        if retries >= self.max_retries:
            return None
        return min(self.interval_start + retries * self.interval_step, self.interval_max)

    def pauses(self) -> list[float]:
        """The pause before each retry."""
        return [pause for n in range(max(0, self.max_retries))
                if (pause := self.pause(n)) is not None]


def _aiormq_channel(channel: Any) -> RawChannel:
    """aio-pika's underlay channel, which is aiormq's (aio-pika types it loosely)."""
    import aiormq

    if not isinstance(channel, aiormq.Channel):
        raise TypeError(f"expected aio-pika to run on an aiormq channel, got {channel!r}")
    return channel


def _may_retry(exc: BrokerConnectionError) -> bool:
    """A nack, a lost connection or channel: yes. A refusal (the queue exists with other
    arguments, no permission, a refused declaration) will not pass; a publish timeout
    already waited ``broker_publish_timeout`` (and its message may have been queued)."""
    refused = (PublishRefusedError, HoldingQueueRefused, DelayedDeliveryRefused, BrokerRefused)
    timed_out = isinstance(exc.__cause__ or exc.__context__, TimeoutError)
    return not isinstance(exc, refused) and not timed_out


def _cause(exc: BaseException) -> str:
    return describe_error(exc.__cause__) if exc.__cause__ is not None else describe_error(exc)


def _refusals() -> tuple[type[BaseException], ...]:
    """aiormq's channel errors that no retry can fix (aiormq is loaded by then)."""
    import aiormq

    errors = aiormq.exceptions
    return (errors.ChannelPreconditionFailed, errors.ChannelAccessRefused,
            errors.ChannelNotFoundEntity, errors.ChannelLockedResource)


def describe_error(exc: BaseException) -> str:
    """A short, human description of a connection error (aiormq's reprs are noisy)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    aiormq = sys.modules.get("aiormq")  # not loaded: the error cannot be one of its own
    if aiormq is not None and isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return "login refused (wrong user or password?)"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def holding_queue_arguments(target: str, ttl_ms: int, quorum: bool = False) -> dict[str, Any]:
    """A holding queue's arguments: messages expire after ``ttl_ms`` and dead-letter back to
    ``target`` (every message has the same TTL, so expiry order is arrival order).

    The queue itself expires (``x-expires``) once unused for twice its TTL plus a minute:
    RabbitMQ 4.3 refuses durable-less, non-exclusive queues, and a durable one must not
    outlive its use. Every park declares it again, which renews that lease, so its last
    message has dead-lettered long before the queue goes.

    For a classic ``target`` the holding queue is classic, and its dead-lettering is
    at-most-once: should ``target`` be unavailable when a message expires, RabbitMQ drops it.
    For a quorum ``target`` (``quorum``) it is a quorum queue that dead-letters at least once
    (``x-dead-letter-strategy: at-least-once``, which needs ``x-overflow: reject-publish``):
    an expired message stays in the holding queue until ``target`` has confirmed it.
    """
    arguments: dict[str, Any] = {
        "x-message-ttl": ttl_ms, "x-dead-letter-exchange": _DEFAULT_EXCHANGE,
        "x-dead-letter-routing-key": target, "x-expires": 2 * ttl_ms + 60_000}
    if quorum:
        arguments.update({"x-queue-type": QUORUM, "x-dead-letter-strategy": "at-least-once",
                          "x-overflow": "reject-publish"})
    return arguments


class HoldingQueueRefused(BrokerConnectionError):
    """The broker refused to declare a holding queue (permissions, other arguments):
    trying again will not help until the operator changes something."""


class DelayedDeliveryRefused(BrokerConnectionError):
    """The broker refused a declaration of the native delayed delivery topology."""


#: AMQP codes with which a broker refuses a connection for good: ACCESS_REFUSED (wrong user
#: or password, no access to the vhost) and NOT_ALLOWED (the vhost does not exist)
REFUSED_CODES = (403, 530)


class BrokerRefused(BrokerConnectionError):
    """The broker answered and refused us: retrying with the same settings cannot help."""


async def connect_first(failover: Failover, *, heartbeat: int, connection_name: str,
                        connection_timeout: float, rpc_timeout: float,
                        publish_timeout: float | None) -> AMQPConnection:
    """An :class:`AMQPConnection` to the first URL of ``failover`` that answers, in its
    order (``broker_failover_strategy``), which is then the URL in use;
    :class:`BrokerRefused` when trying again cannot help (login refused, vhost missing or
    forbidden, an unusable URL, a TLS certificate not trusted), else BrokerConnectionError
    naming each URL tried."""
    failures = []
    for url in failover.order():
        try:
            connection = await _connect(url, heartbeat, connection_name, connection_timeout,
                                        rpc_timeout, publish_timeout)
        except BrokerRefused:
            raise
        except BrokerConnectionError as exc:
            failures.append(str(exc))
            if len(failover.urls) > 1:
                logger.info("%s; trying the next broker URL", exc)
            continue
        failover.using(url)
        return connection
    raise BrokerConnectionError("; ".join(failures))


async def _connect(url: str, heartbeat: int, connection_name: str, connection_timeout: float,
                   rpc_timeout: float, publish_timeout: float | None) -> AMQPConnection:
    try:
        connection = AMQPConnection(url, heartbeat=heartbeat, connection_name=connection_name,
                                    connect_timeout=connection_timeout,
                                    rpc_timeout=rpc_timeout, publish_timeout=publish_timeout)
        await connection.connect()
    except ssl.SSLCertVerificationError as exc:
        # before ValueError, which it also is; the same CA and host name give the same
        # verdict on every try
        raise BrokerRefused(
            f"cannot connect to broker {mask_url(url)}: its TLS certificate is not trusted "
            f"({describe_error(exc)}). Check cafile/capath in broker_url (the CA that signed "
            "the broker's certificate) and that the host name is one the certificate names; "
            "no_verify_ssl=1 turns verification off.") from exc
    except ValueError as exc:
        raise BrokerRefused(f"cannot use broker_url {mask_url(url)}: {exc}") from exc
    except (TimeoutError, OSError) as exc:
        code = getattr(exc, "reply_code", None)
        if code in REFUSED_CODES:
            raise BrokerRefused(
                f"broker {mask_url(url)} refused the connection: "
                f"{describe_error(exc)}. Check the user, password and vhost in "
                "broker_url, and the user's permissions on that vhost.") from exc
        raise BrokerConnectionError(
            f"cannot connect to broker {mask_url(url)}: {describe_error(exc)}") from exc
    return connection


class ConsumerChannel:
    """The worker's side: a dedicated AMQP connection with one channel for consuming.

    Built on :class:`~aio_celery.amqp.connection.AMQPConnection`: deliveries reach ``on_message``
    as they are read, with no per-message task or wrapper objects, and acks are written at
    once, in the order they are made (a ``multiple`` ack can cover many deliveries). It does
    not reconnect by itself: the worker opens a new one and says so in the log, so that a
    delivery tag is never acknowledged on a channel it did not come from.
    """

    def __init__(self, url: str | Failover, *, prefetch_count: int,
                 connection_timeout: float = 4.0, heartbeat: int = 60,
                 max_priority: int | None = None, connection_name: str = "aio_celery worker",
                 queue_arguments: dict[str, Any] | None = None,
                 publish_timeout: float | None = None, rpc_timeout: float = RPC_TIMEOUT,
                 plan: QueuePlan | None = None) -> None:
        #: the broker URL(s) and which one to try next (the worker keeps one across
        #: reconnects, so that a reconnect moves on to the next node)
        self.failover = url if isinstance(url, Failover) else Failover(url)
        self.plan = plan or QueuePlan(max_priority=max_priority, extra_arguments=queue_arguments)
        self.prefetch_count = prefetch_count
        self.publish_timeout = publish_timeout
        self.rpc_timeout = rpc_timeout
        self.connection_timeout = connection_timeout
        self.heartbeat = heartbeat
        self.max_priority = max_priority
        self.queue_arguments = queue_arguments
        self.connection_name = connection_name
        self._connection: AMQPConnection | None = None
        self._consumer_tags: dict[str, str] = {}  # by queue

    @property
    def connection(self) -> AMQPConnection:
        if self._connection is None:
            raise ConnectionClosed("consumer channel is not open")
        return self._connection

    @property
    def is_open(self) -> bool:
        return self._connection is not None and self._connection.is_open

    @property
    def url(self) -> str:
        """The URL connected to (else the first to try)."""
        return self.failover.in_use or self.failover.urls[0]

    async def open(self) -> None:
        """Connect to the first URL of ``broker_url`` that answers, in the order of
        ``broker_failover_strategy``; :class:`BrokerRefused` when trying again cannot help
        (login refused, vhost missing or forbidden, an unusable URL), else
        BrokerConnectionError naming each URL tried."""
        listed = ";".join(self.failover.urls)
        problem = url_problem(listed, BROKER_SCHEMES, failover=True)
        if problem is not None:  # found before trying the URLs that come first
            raise BrokerRefused(f"cannot use broker_url {mask_url(listed)}: {problem}")
        connection = await connect_first(
            self.failover, heartbeat=self.heartbeat, connection_name=self.connection_name,
            connection_timeout=self.connection_timeout, rpc_timeout=self.rpc_timeout,
            publish_timeout=self.publish_timeout)
        self._connection = connection
        # Per consumer, static (as Celery does on quorum queues): global QoS is refused on
        # quorum queues and, by default, by RabbitMQ 4.3 on every queue. Each consumer of
        # this channel may have this many deliveries unacknowledged.
        await connection.qos(self.prefetch_count, global_=False)

    async def closed(self) -> str:
        """Return why, once the connection or the channel is lost or closed (the broker
        closes just the channel on a channel error; that ends this connection too)."""
        return await self.connection.closed()

    async def declare(self, queue: str) -> None:
        """Declare ``queue`` exactly like Celery and the publisher do."""
        connection = self.connection
        declaration = self.plan.queue(queue)
        await connection.exchange_declare(declaration.exchange, declaration.exchange_type,
                                          durable=True)
        await connection.queue_declare(queue, durable=True, arguments=declaration.arguments)
        await connection.queue_bind(queue, declaration.exchange,
                                    routing_key=declaration.routing_key)

    async def message_count(self, queue: str) -> int:
        result = await self.connection.queue_declare(queue, passive=True)
        return int(result.message_count or 0)

    async def consume(self, queue: str, on_message: DeliveryCallback) -> None:
        self._consumer_tags[queue] = await self.connection.consume(queue, on_message)

    @property
    def consumer_count(self) -> int:
        return len(self._consumer_tags) if self.is_open else 0

    async def cancel_consumers(self) -> None:
        """Stop deliveries (prefetched messages stay with us until settled)."""
        tags, self._consumer_tags = self._consumer_tags, {}
        for tag in tags.values():
            if not self.is_open:
                return
            with contextlib.suppress(ConnectionError):
                await self.connection.cancel(tag)

    async def cancel_queue(self, queue: str) -> None:
        """Stop the consumer of ``queue`` (its deliveries so far stay with us)."""
        tag = self._consumer_tags.pop(queue, None)
        if tag is not None and self.is_open:
            await self.connection.cancel(tag)

    def pause_deliveries(self) -> None:
        """Enough deliveries wait to be run: keep the rest as wire bytes for now (the AMQP
        connection *holds* them)."""
        if self._connection is not None:
            self._connection.hold()

    def resume_deliveries(self) -> None:
        if self._connection is not None:
            self._connection.release()

    def ack(self, tag: int, multiple: bool = False) -> None:
        """Acknowledge now (ConnectionClosed, a ConnectionError, if the connection is gone)."""
        self.connection.ack(tag, multiple)

    def reject(self, tag: int, requeue: bool) -> None:
        self.connection.reject(tag, requeue)

    def nack(self, tag: int) -> None:
        """Give a delivery back to its queue (``basic.nack`` with requeue, for returns that
        are not the task's fault: RabbitMQ 4.3 does not count them in x-delivery-count)."""
        self.connection.nack(tag, requeue=True)

    async def barrier(self) -> None:
        """Return once the broker has processed every frame sent so far on this channel (a
        channel is processed in order, so one cheap synchronous round trip proves it)."""
        if self.is_open:
            await self.connection.exchange_declare("amq.direct", "direct", passive=True)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
