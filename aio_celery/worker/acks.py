"""Which deliveries of one channel can be acknowledged, and how cheaply.

Delivery tags on a channel count up from 1. When the oldest unsettled deliveries are all
finished, one ``basic.ack(multiple=True)`` settles the whole finished prefix; a finished
delivery behind one still running (or waiting for its eta) is acked on its own, so it does
not hold a prefetch slot. A delivery is never acked before its task finished.

:class:`AckTracker` is the bookkeeping; :class:`Acks` writes what it decides to the channel,
in the order it was decided and each tag once: an ``ack(multiple=True)`` overtaking a single
ack of a lower tag, or a tag settled twice, makes RabbitMQ close the channel with "unknown
delivery tag".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from typing import Protocol

from aio_celery.worker.execution import Settle

#: a channel that is gone: the broker requeues whatever was not settled on it
_CHANNEL_GONE = (ConnectionError,)


class AckTracker:
    """Bookkeeping only (no I/O): the worker asks :meth:`take` what to send."""

    def __init__(self) -> None:
        # Unsettled tags in delivery order; OrderedDict pops from the front in O(1).
        self._unsettled: OrderedDict[int, None] = OrderedDict()
        self._finished: set[int] = set()

    def __len__(self) -> int:
        """How many deliveries are neither acked nor rejected yet."""
        return len(self._unsettled)

    def delivered(self, tag: int) -> None:
        self._unsettled[tag] = None

    def finished(self, tag: int) -> None:
        """The task of ``tag`` is done: it may be acked at the next :meth:`take`."""
        if tag in self._unsettled:
            self._finished.add(tag)

    def settled(self, tag: int) -> None:
        """``tag`` was rejected or returned on its own: forget it."""
        self._unsettled.pop(tag, None)
        self._finished.discard(tag)

    def take(self) -> tuple[int | None, list[int]]:
        """``(multiple_upto, singles)``: ack every tag up to ``multiple_upto`` at once, then
        each of ``singles``. Both are forgotten here, so each ack is sent once."""
        upto = None
        finished = self._finished
        unsettled = self._unsettled
        while unsettled:
            head = next(iter(unsettled))
            if head not in finished:
                break
            unsettled.popitem(last=False)
            finished.remove(head)
            upto = head
        singles = sorted(finished)
        for tag in singles:
            del unsettled[tag]
        finished.clear()
        return upto, singles


class SettlingChannel(Protocol):
    """What :class:`Acks` writes to (a :class:`aio_celery.transport.Consuming` is one)."""

    def ack(self, tag: int, multiple: bool = False) -> None: ...

    def reject(self, tag: int, requeue: bool) -> None: ...

    def nack(self, tag: int) -> None: ...

    async def barrier(self) -> None: ...


class Acks:
    """Settles the deliveries of one channel: rejects and returns are written at once, acks
    once per loop turn (the finished prefix in one frame)."""

    def __init__(self, channel: SettlingChannel) -> None:
        self.channel = channel
        self._tracker = AckTracker()
        self._flush_scheduled = False

    def __len__(self) -> int:
        """How many deliveries are neither acked nor rejected yet."""
        return len(self._tracker)

    def delivered(self, tag: int) -> None:
        self._tracker.delivered(tag)

    def settle(self, tag: int, settle: Settle) -> None:
        """Ack (at the end of this loop turn), reject, or give back (at once) ``tag``."""
        if settle is Settle.ACK:
            self._tracker.finished(tag)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
            return
        self._tracker.settled(tag)
        with contextlib.suppress(*_CHANNEL_GONE):
            if settle is Settle.REQUEUE:  # not the message's fault: not counted on 4.3
                self.channel.nack(tag)
            else:
                self.channel.reject(tag, requeue=False)

    def flush(self) -> None:
        """Ack what finished since the last flush: the finished prefix in one frame."""
        self._flush_scheduled = False
        upto, singles = self._tracker.take()
        try:
            if upto is not None:
                self.channel.ack(upto, multiple=True)
            for tag in singles:
                self.channel.ack(tag)
        except _CHANNEL_GONE:
            pass  # the broker requeues whatever was not settled on a channel that is gone

    async def settle_everything(self) -> None:
        """Send the last acks and wait until the broker has processed every ack/reject."""
        self.flush()
        with contextlib.suppress(*_CHANNEL_GONE):
            await self.channel.barrier()
