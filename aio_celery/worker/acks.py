"""Which deliveries of one channel can be acknowledged, and how cheaply.

Delivery tags on a channel count up from 1. When the oldest unsettled deliveries are all
finished, one ``basic.ack(multiple=True)`` settles the whole finished prefix; a finished
delivery behind one still running (or waiting for its eta) is acked on its own, so it does
not hold a prefetch slot. A delivery is never acked before its task finished.
"""

from __future__ import annotations

from collections import OrderedDict


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
