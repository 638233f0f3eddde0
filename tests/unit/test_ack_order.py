"""Acks and rejects reach the channel in the order they were decided, each tag once.

An ``ack(multiple=True)`` overtaking a single ack of a lower tag, or acking a tag twice,
makes RabbitMQ close the channel with "unknown delivery tag". These are the frames of
:class:`aio_celery.worker.acks.Acks`, which a session settles every delivery through.
"""

from __future__ import annotations

import asyncio
import random

from aio_celery.worker.acks import Acks
from aio_celery.worker.execution import Settle


class RecordingChannel:
    """Records the frames written to it, in order."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", tag, multiple))

    def reject(self, tag: int, requeue: bool) -> None:
        self.frames.append(("reject", tag, requeue))

    def nack(self, tag: int) -> None:
        self.frames.append(("nack", tag, True))

    async def barrier(self) -> None:
        await asyncio.sleep(0)


async def test_frames_keep_their_order_across_flushes() -> None:
    channel = RecordingChannel()
    acks = Acks(channel)
    for tag in range(1, 201):
        acks.delivered(tag)
    # Finish out of order so that flushes mix single acks, rejects and multiple acks.
    order = list(range(1, 201))
    random.Random(3).shuffle(order)
    for position, tag in enumerate(order):
        settle = Settle.REJECT if tag % 17 == 0 else Settle.ACK
        acks.settle(tag, settle)
        if position % 7 == 0:
            await asyncio.sleep(0)  # let a flush happen mid-way
    await acks.settle_everything()

    settled: set[int] = set()
    for kind, tag, flag in channel.frames:
        if kind == "ack" and flag:
            settled |= set(range(1, tag + 1))
        else:
            assert tag not in settled, f"{kind} {tag} after a multiple ack covered it"
            settled.add(tag)
    assert settled == set(range(1, 201))


async def test_a_finished_prefix_is_acked_in_one_frame_and_stragglers_alone() -> None:
    channel = RecordingChannel()
    acks = Acks(channel)
    for tag in range(1, 11):
        acks.delivered(tag)
    for tag in (1, 2, 3, 5, 9):
        acks.settle(tag, Settle.ACK)
    acks.settle(4, Settle.REQUEUE)  # written at once, before the batched acks
    await asyncio.sleep(0)  # the flush runs once per loop turn
    assert channel.frames == [("nack", 4, True), ("ack", 5, True), ("ack", 9, False)]
    assert len(acks) == 4  # 6, 7, 8 and 10: still running
