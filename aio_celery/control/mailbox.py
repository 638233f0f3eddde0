"""A worker process's pidbox: its own node's mailbox, consumed on a connection of its own.

Why not the consumer's connection: that one is held back (deliveries left on the wire)
while enough tasks wait for a slot, which is exactly when ``inspect active`` or
``revoke --terminate`` matter; and a refused exclusive declare closes the channel, which
would take the task consumers down with it. Here a lost or refused connection only
restarts this loop: the mailbox is declared again on each new connection.

The mailbox is Celery 5.7's: ``<nodename>.celery.pidbox``, exclusive, auto-delete,
``x-expires`` 10 s, ``x-message-ttl`` 300 s, bound to the fanout ``celery.pidbox``,
consumed without acks. A process restarted under the same name while the broker still
holds its predecessor's connection gets ``405 RESOURCE_LOCKED``; it retries, quickly at
first, until that connection is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aio_celery.amqp.connection import AMQPConnection, Delivery
from aio_celery.clocks import LamportClock
from aio_celery.control import commands, wire

logger = logging.getLogger(__name__)

RESOURCE_LOCKED = 405
#: the backoff between attempts while the name is locked, and after other failures
_LOCKED_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)
_FAILED_DELAYS = (1.0, 2.0, 5.0, 10.0)


class Mailbox:
    """Runs ``node``'s commands as requests arrive; :meth:`run` until cancelled."""

    def __init__(self, node: commands.Node,
                 connect: Callable[[], Awaitable[AMQPConnection]],
                 clock: LamportClock | None = None) -> None:
        """``connect()``: a new open connection. ``clock``: the process's Lamport clock
        (its events' too), moved past each request's and forward for each reply, as
        kombu's ``Node`` moves ``app.clock`` (none: one of its own)."""
        self.node = node
        self._connect = connect
        self.clock = clock if clock is not None else LamportClock()
        self._connection: AMQPConnection | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._reply_declared = False
        #: set while the mailbox is consumed (for tests and readiness)
        self.consuming = asyncio.Event()
        self._closed = False

    @property
    def queue(self) -> str:
        return wire.queue_name(self.node.nodename)

    async def run(self) -> None:
        """Until :meth:`close` (or cancelled): consume, and after a lost connection or a
        refused declare, connect and declare again."""
        locked = failed = 0
        while not self._closed:
            try:
                connection = await self._open()
            except (ConnectionError, OSError, TimeoutError) as exc:
                if self._closed:
                    return
                if getattr(exc, "reply_code", None) == RESOURCE_LOCKED:
                    delay = _LOCKED_DELAYS[min(locked, len(_LOCKED_DELAYS) - 1)]
                    locked += 1
                    log = logger.info if locked == 1 else logger.debug
                    log("Mailbox %s is still held by a connection that is closing (405 "
                        "RESOURCE_LOCKED): retrying", self.queue)
                else:
                    delay = _FAILED_DELAYS[min(failed, len(_FAILED_DELAYS) - 1)]
                    failed += 1
                    # once per outage: the worker's own log already tells the broker's story
                    log = logger.warning if failed == 1 else logger.debug
                    log("Remote control mailbox %s unavailable: %s; retrying", self.queue,
                        exc)
                await asyncio.sleep(delay)
                continue
            if failed:
                logger.info("Remote control mailbox %s consumed again", self.queue)
            locked = failed = 0
            reason = await connection.closed()
            self.consuming.clear()
            if self._closed:
                return
            logger.warning("Remote control connection lost (%s): declaring mailbox %s again",
                           reason, self.queue)

    async def _open(self) -> AMQPConnection:
        connection = await self._connect()
        if self._closed:
            await connection.close()
            raise ConnectionError("the mailbox is closed")
        self._connection = connection
        self._reply_declared = False
        try:
            await connection.exchange_declare(wire.EXCHANGE, "fanout", durable=False)
            await connection.queue_declare(self.queue, durable=False, exclusive=True,
                                           auto_delete=True, arguments=wire.QUEUE_ARGUMENTS)
            await connection.queue_bind(self.queue, wire.EXCHANGE, routing_key="")
            await connection.consume(self.queue, self._received, no_ack=True)
        except BaseException:
            await connection.close()
            raise
        self.consuming.set()
        return connection

    async def close(self) -> None:
        self._closed = True
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)
        connection, self._connection = self._connection, None
        self.consuming.clear()
        if connection is not None:
            await connection.close()

    def _received(self, delivery: Delivery) -> None:
        props = delivery.properties
        try:
            request = wire.parse(delivery.body, props.content_type if props else None,
                                 props.headers if props else None)
        except wire.BadRequest as exc:
            logger.warning("Ignored a remote control message: %s", exc)
            return
        self.clock.adjust(request.clock)
        if not wire.addressed_to(request, self.node.nodename):
            return
        task = asyncio.create_task(self._handle(request), name=f"control {request.method}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, request: wire.Request) -> None:
        logger.debug("Remote control: %s %s", request.method, request.arguments)
        try:
            result = await commands.dispatch(self.node, request.method, request.arguments)
        except Exception as exc:
            if isinstance(exc, KeyError) and request.method not in commands.COMMANDS:
                logger.error("No such control command: %s", request.method)
            else:
                logger.exception("Control command %s failed", request.method)
            result = wire.error(repr(exc))
        if request.reply_to is None or result is commands.NO_REPLY:
            return
        await self._reply(request, request.reply_to, result)

    async def _reply(self, request: wire.Request, reply_to: tuple[str, str],
                     result: object) -> None:
        exchange, routing_key = reply_to
        connection = self._connection
        if connection is None or not connection.is_open:
            return  # the requester gets no answer from us, as from a node that is down
        clock = self.clock.forward()
        try:
            if not self._reply_declared:
                await connection.exchange_declare(exchange, "direct", durable=False)
                self._reply_declared = True
            await connection.publish(wire.encode_reply(self.node.nodename, result),
                                     wire.reply_properties(request.ticket, clock),
                                     routing_key, exchange)
        except (ConnectionError, OSError, TimeoutError) as exc:
            logger.warning("Could not reply to remote control %s: %s", request.method, exc)
