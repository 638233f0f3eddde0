"""Acks and rejects reach the channel in the order they were decided.

An ``ack(multiple=True)`` overtaking a single ack of a lower tag makes RabbitMQ close the
channel with "unknown delivery tag"; this pins the single in-order writer that prevents it.
"""

from __future__ import annotations

import asyncio
import random

from aio_celery.worker.delivery import Session
from aio_celery.worker.execution import Settle
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.stats import Stats


class SlowChannel:
    """Records frames; each send yields to the loop a random number of times, like a full
    aiormq write queue does."""

    prefetch_count = 10

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.rng = random.Random(7)

    async def _yield(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)

    async def ack(self, tag: int, multiple: bool = False) -> None:
        await self._yield()
        self.frames.append(("ack", tag, multiple))

    async def reject(self, tag: int, requeue: bool) -> None:
        await self._yield()
        self.frames.append(("reject", tag, requeue))

    async def barrier(self) -> None:
        await self._yield()


def make_session(channel: SlowChannel) -> Session:
    return Session(channel, runner=None, options=WorkerOptions(concurrency=10),  # type: ignore[arg-type]
                   stats=Stats(), on_task_done=lambda: None)


async def test_frames_keep_their_order_across_flushes() -> None:
    channel = SlowChannel()
    session = make_session(channel)
    for tag in range(1, 201):
        session._tracker.delivered(tag)
    # Finish out of order so that flushes mix single acks, rejects and multiple acks.
    order = list(range(1, 201))
    random.Random(3).shuffle(order)
    for position, tag in enumerate(order):
        settle = Settle.REJECT if tag % 17 == 0 else Settle.ACK
        session._settle(tag, settle)
        if position % 7 == 0:
            await asyncio.sleep(0)  # let a flush happen mid-way
    await session._settle_everything()

    settled: set[int] = set()
    for kind, tag, flag in channel.frames:
        if kind == "ack" and flag:
            settled |= set(range(1, tag + 1))
        else:
            assert tag not in settled, f"{kind} {tag} after a multiple ack covered it"
            settled.add(tag)
    assert settled == set(range(1, 201))


async def test_the_writer_sends_frames_in_submission_order() -> None:
    from aio_celery.worker.delivery import _Frame

    channel = SlowChannel()
    session = make_session(channel)
    sent = [(_Frame.ACK, 5), (_Frame.REJECT, 1), (_Frame.ACK_UPTO, 9), (_Frame.REQUEUE, 12),
            (_Frame.ACK, 11)] * 20
    for frame, tag in sent:
        session._send(frame, tag)
        await asyncio.sleep(0)
    await session._settle_everything()
    expected = [("ack", 5, False), ("reject", 1, False), ("ack", 9, True),
                ("reject", 12, True), ("ack", 11, False)] * 20
    assert channel.frames == expected
