"""One consumer session: the deliveries of one AMQP channel, from arrival to settlement.

A delivery is decoded as it arrives (a message that cannot be decoded is rejected at once,
without requeue). Each task then runs in an asyncio task of its own:

* an ``eta`` in the future waits without holding a concurrency slot; the prefetch window is
  widened by one while it waits so it never starves ready messages (Celery does the same).
  An eta beyond ``eta_horizon`` is *parked*: republished to a holding queue whose TTL
  dead-letters it back here, so RabbitMQ's ``consumer_timeout`` never sees it unacked;
* a concurrency slot (semaphore) is taken, the task runs, its result is stored, then the
  delivery is acknowledged: finished prefixes with one ``multiple`` ack per loop turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Callable
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from aio_celery import protocol
from aio_celery.broker import ConsumerChannel, describe_error
from aio_celery.exceptions import MessageDecodeError
from aio_celery.worker.acks import AckTracker
from aio_celery.worker.execution import Settle, TaskRunner
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.stats import Stats

logger = logging.getLogger("aio_celery.worker")

_CHANNEL_GONE = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


def wait_queue_name(queue: str) -> str:
    """The holding queue for far-away etas of ``queue``."""
    return f"{queue}.aio-celery-eta"


class _Frame(enum.Enum):
    ACK = "ack"
    ACK_UPTO = "ack multiple"
    REJECT = "reject"
    REQUEUE = "requeue"


@dataclasses.dataclass
class StopOutcome:
    returned: int = 0
    cancelled: int = 0


class Session:
    """Consumes ``queues`` on one channel and settles every delivery exactly once."""

    def __init__(self, channel: ConsumerChannel, runner: TaskRunner, options: WorkerOptions,
                 stats: Stats, on_task_done: Callable[[], None]) -> None:
        self.channel = channel
        self.runner = runner
        self.options = options
        self.stats = stats
        self._on_task_done = on_task_done
        self.prefetch_count = channel.prefetch_count
        self._slots = asyncio.Semaphore(options.concurrency)
        self._tracker = AckTracker()
        self._waiting: set[asyncio.Task[None]] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._stopping = False
        self._draining = False
        self._held = 0
        self._prefetch_applied = self.prefetch_count
        self._prefetch_task: asyncio.Task[None] | None = None
        self._wait_queues: set[str] = set()
        self._outbox: collections.deque[tuple[_Frame, int]] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._outcome = StopOutcome()

    # --- start and state -----------------------------------------------------------------

    async def start(self, queues: tuple[str, ...]) -> None:
        await self.channel.open()
        for queue in queues:
            await self.channel.declare(queue)
        for queue in queues:
            await self.channel.consume(queue, self._receiver(queue))

    @property
    def consumer_count(self) -> int:
        return self.channel.consumer_count

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running or len(self._tracker))

    async def message_count(self, queue: str) -> int:
        return await self.channel.message_count(queue)

    async def lost(self) -> str:
        """Return why, once the connection or channel closes (for whatever reason)."""
        try:
            return await self.channel.closed()
        except Exception as exc:
            return describe_error(exc)

    def running_tasks(self) -> set[asyncio.Task[None]]:
        return set(self._running)

    # --- deliveries ----------------------------------------------------------------------

    def _receiver(self, queue: str) -> Callable[[DeliveredMessage], Any]:
        async def on_message(raw: DeliveredMessage) -> None:
            self._receive(queue, raw)

        return on_message

    def _receive(self, queue: str, raw: DeliveredMessage) -> None:
        deliver = raw.delivery
        assert isinstance(deliver, aiormq.spec.Basic.Deliver)
        tag = deliver.delivery_tag
        if tag is None:  # pragma: no cover - deliveries always carry a tag
            return
        self._tracker.delivered(tag)
        if self._stopping:
            self._give_back(tag)
            return
        props = raw.header.properties
        try:
            message = protocol.decode(raw.body, props.headers, props.content_type,
                                      props.content_encoding, props.priority, props.reply_to)
        except Exception as exc:  # MessageDecodeError, or a decoder bug: never leave it unsettled
            if not isinstance(exc, MessageDecodeError):
                exc = MessageDecodeError(f"undecodable: {exc!r}", raw.body)
            self.stats.rejected += 1
            logger.error("Rejected a message from queue %s without requeue: %s. It is not a "
                         "Celery protocol v2 JSON task; a dead-letter exchange on the queue "
                         "would keep it for inspection.", queue, exc.summary())
            self._settle(tag, Settle.REJECT)
            return
        # Celery's keys, plus the queue it was consumed from (a retry goes back there).
        delivery_info = {"exchange": deliver.exchange, "routing_key": deliver.routing_key,
                         "priority": props.priority, "redelivered": deliver.redelivered,
                         "queue": queue}
        task = asyncio.create_task(self._handle(queue, raw, message, tag, delivery_info),
                                   name=f"{message.task}[{message.id}]")
        self._waiting.add(task)

    async def _handle(self, queue: str, raw: DeliveredMessage, message: protocol.TaskMessage,
                      tag: int, delivery_info: dict[str, Any]) -> None:
        this = asyncio.current_task()
        assert this is not None
        started = acked = False
        try:
            if message.eta is not None and not await self._wait_for_eta(queue, raw, message,
                                                                          tag):
                return
            async with self._slots:
                if self._draining:
                    self._outcome.returned += 1
                    self._give_back(tag)
                    return
                self._waiting.discard(this)
                self._running.add(this)
                started = True
                if self.runner.acks_early(message):
                    self._settle(tag, Settle.ACK)
                    acked = True
                settle = await self.runner.run(message, delivery_info)
        except Exception:
            # A bug of ours (task errors are handled by the runner). Requeue once; a
            # message that fails like this again is rejected rather than looped.
            settle = Settle.REJECT if delivery_info["redelivered"] else Settle.REQUEUE
            logger.exception("Internal error while handling task %s[%s]: message %s",
                             message.task, message.id,
                             "rejected" if settle is Settle.REJECT else "requeued once")
        except asyncio.CancelledError:
            # Shutdown or connection loss: the message goes back to the queue.
            if started:
                self._outcome.cancelled += 1
            else:
                self._outcome.returned += 1
            if not acked:
                self._give_back(tag)
            return
        finally:
            self._waiting.discard(this)
            self._running.discard(this)
        if not acked:
            self._settle(tag, settle)
        self.stats.finished += 1
        self._on_task_done()

    async def _wait_for_eta(self, queue: str, raw: DeliveredMessage,
                            message: protocol.TaskMessage, tag: int) -> bool:
        """Wait for the eta without a slot; False when the message was parked instead."""
        assert message.eta is not None
        delay = (message.eta - self.runner.app.now()).total_seconds()
        if delay <= 0:
            return True
        if delay > self.options.eta_horizon:
            await self._park(queue, raw, message, delay)
            self._settle(tag, Settle.ACK)
            return False
        self._held += 1
        self._update_prefetch()
        try:
            await asyncio.sleep(delay)
        finally:
            self._held -= 1
            self._update_prefetch()
        return True

    async def _park(self, queue: str, raw: DeliveredMessage, message: protocol.TaskMessage,
                    delay: float) -> None:
        name = wait_queue_name(queue)
        if name not in self._wait_queues:
            await self.channel.declare_wait_queue(name, queue,
                                                  int(self.options.eta_horizon * 1000))
            self._wait_queues.add(name)
        await self.channel.publish_raw(raw.body, raw.header.properties, name)
        logger.info("Task %s[%s] is due in %.0fs, beyond the %.0fs eta horizon: parked in %s "
                    "(the broker hands it back every %.0fs until it is due)", message.task,
                    message.id, delay, self.options.eta_horizon, name,
                    self.options.eta_horizon)

    def _update_prefetch(self) -> None:
        if self._prefetch_task is None or self._prefetch_task.done():
            self._prefetch_task = asyncio.create_task(self._apply_prefetch())

    async def _apply_prefetch(self) -> None:
        # Coalesces bursts of eta arrivals into few basic.qos round trips.
        while self._prefetch_applied != self.prefetch_count + self._held:
            self._prefetch_applied = self.prefetch_count + self._held
            with contextlib.suppress(*_CHANNEL_GONE):
                await self.channel.set_prefetch(self._prefetch_applied)

    # --- settlement ----------------------------------------------------------------------

    def _settle(self, tag: int, settle: Settle) -> None:
        if settle is Settle.ACK:
            self._tracker.finished(tag)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._start_flush)
            return
        self._tracker.settled(tag)
        self._send(_Frame.REQUEUE if settle is Settle.REQUEUE else _Frame.REJECT, tag)

    def _give_back(self, tag: int) -> None:
        self._settle(tag, Settle.REQUEUE)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        upto, singles = self._tracker.take()
        if upto is not None:
            self._send(_Frame.ACK_UPTO, upto)
        for tag in singles:
            self._send(_Frame.ACK, tag)

    def _send(self, frame: _Frame, tag: int) -> None:
        """Queue an ack/reject. One writer sends them strictly in order: an ack with
        ``multiple`` overtaking a single ack of a lower tag would make the broker close the
        channel ("unknown delivery tag")."""
        self._outbox.append((frame, tag))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_frames())

    async def _write_frames(self) -> None:
        channel = self.channel
        while self._outbox:
            frame, tag = self._outbox.popleft()
            try:
                if frame is _Frame.ACK_UPTO:
                    await channel.ack(tag, multiple=True)
                elif frame is _Frame.ACK:
                    await channel.ack(tag)
                else:
                    await channel.reject(tag, requeue=frame is _Frame.REQUEUE)
            except _CHANNEL_GONE:
                # The broker requeues whatever was not settled on a channel that is gone.
                self._outbox.clear()
                return

    async def _settle_everything(self) -> None:
        """Send the last acks and wait until the broker has processed every ack/reject."""
        self._start_flush()
        if self._writer is not None:
            await self._writer
        with contextlib.suppress(*_CHANNEL_GONE):
            await self.channel.barrier()

    # --- stopping ------------------------------------------------------------------------

    def drain(self) -> None:
        """A stop was requested: start no more tasks (running ones carry on). New
        deliveries are still taken until the consumers are cancelled, or they would bounce
        straight back."""
        self._draining = True

    def go_cold(self) -> None:
        """Cancel everything now (from a signal handler: no awaiting here)."""
        self._stopping = True
        for task in (*self._waiting, *self._running):
            task.cancel()

    async def stop(self, timeout: float, cold: bool) -> StopOutcome:
        """Stop consuming, give back what has not started, let running tasks finish for up to
        ``timeout`` seconds (none when cold), cancel the rest, settle all, close."""
        self._stopping = True
        with contextlib.suppress(*_CHANNEL_GONE):
            await self.channel.cancel_consumers()
        for task in list(self._waiting):
            task.cancel()
        if self._running and not cold:
            logger.info("Waiting up to %.0fs for %d running task(s) to finish", timeout,
                        len(self._running))
            await asyncio.wait(set(self._running), timeout=timeout)
        if self._running:
            logger.warning("Cancelling %d task(s) still running: their messages go back to "
                           "the queue", len(self._running))
        for task in list(self._running):
            task.cancel()
        pending = self._waiting | self._running
        if pending:
            await asyncio.wait(pending)
        await self._settle_everything()
        await self.close()
        return self._outcome

    async def abandon(self) -> None:
        """The connection is gone: cancel every task (RabbitMQ requeues their messages)."""
        self._stopping = True
        pending = self._waiting | self._running
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        await self.close()

    async def close(self) -> None:
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
        await self.channel.close()


