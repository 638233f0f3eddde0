"""The poison guard: a task that kills its worker process is retired after a few deaths.

Classic queues carry no delivery count, so the supervisor keeps the count itself, in two
anonymous shared memory maps (``mmap`` with MAP_SHARED) it creates before forking, so that
every child inherits them. No thread, no socket, no system call per task:

* the **running board**: one *seat* per child, one 64-byte slot per concurrent task. A child
  writes a task id into a free slot of its seat as the task starts and clears the slot when
  it ends (two memory writes per task);
* the **death table**: when a child dies without being asked to, the parent reads its seat
  and counts one death for each task id still in it (with whether it was running alone),
  writes the counts here, and only then clears the seat.

A child consults both only for a message delivered with ``redelivered=True`` (a fresh
message pays nothing):

* its id is still in a sibling's seat: that sibling died (or lost the broker) while running
  it and the parent has not counted it yet, so it waits until the seat is cleared;
* it died before: it runs *isolated* (alone in its child: it starts once the running tasks
  are done and nothing starts while it runs), so that a death while it runs blames it alone;
* it died ``limit`` times, the last time alone: it is *retired* (FAILURE ``WorkerLostError``
  stored, the message rejected without requeue, to the queue's dead-letter exchange).

A death with several tasks running blames each, but none is retired for such a death: an
innocent neighbour of a poison task dies with it once, then runs isolated and succeeds.

On quorum queues RabbitMQ counts returns in the ``x-delivery-count`` header, which outlives
the supervisor: a message returned ``limit`` times runs isolated even when the table has
never seen it, and one isolated death then retires it. What the broker counts depends on
its version (3.x: every return, a dead consumer's included; 4.0.5 too, measured in
tests/rabbitmq4: a ``basic.nack`` return as well as a ``basic.reject``; 4.3 and later, by
their notes: a ``basic.reject``'s return, not a ``basic.nack``'s), so the header alone
makes a task a suspect but never retires it: a death counted here is needed too.

Pure standard library: the supervisor imports this module without aio-pika.
"""

from __future__ import annotations

import enum
import hashlib
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: bytes per slot and per death-table entry: a length byte, the key, two spare/count bytes
ENTRY = 64
#: longest task id kept as is (UTF-8); longer ids are kept as a hash
KEY_MAX = ENTRY - 3
#: death-table entries (the oldest is overwritten first: 256 KiB in all)
DEATH_CAPACITY = 4096
_DEATHS = ENTRY - 2  # death table: the count (saturating at 255)
_ALONE = ENTRY - 1  # death table: 1 if the last death had this task running alone


def task_key(task_id: str) -> bytes:
    """The id as it is stored: a length byte and the UTF-8 id (a hash for a long one)."""
    raw = task_id.encode("utf-8", "surrogatepass")
    if len(raw) > KEY_MAX:
        raw = b"#" + hashlib.sha256(raw).hexdigest().encode()[: KEY_MAX - 1]
    return bytes((len(raw),)) + raw


def key_text(key: bytes) -> str:
    return key[1:].decode("utf-8", "replace")


def _shared(size: int) -> mmap.mmap:
    return mmap.mmap(-1, max(size, mmap.PAGESIZE), flags=mmap.MAP_SHARED,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _find_entry(area: mmap.mmap, key: bytes, start: int = 0, end: int | None = None) -> int:
    """Offset of the entry that holds ``key`` (entries are ENTRY-aligned), or -1."""
    end = len(area) if end is None else end
    offset = area.find(key, start, end)
    while offset >= 0 and offset % ENTRY:  # the bytes matched across two entries
        offset = area.find(key, offset + 1, end)
    return offset


class Verdict(enum.Enum):
    RUN = "run"
    WAIT = "wait"  # a sibling that ran it has died and is not counted yet
    ISOLATE = "isolate"
    RETIRE = "retire"


def judge(deaths: int, alone: bool, delivery_count: int, limit: int) -> Verdict:
    """What to do with a redelivered message, from its death count in the table (and
    whether the last death had it running alone) and its quorum-queue delivery count."""
    if deaths and alone and max(deaths, delivery_count) >= limit:
        return Verdict.RETIRE
    if deaths or delivery_count >= limit:
        return Verdict.ISOLATE
    return Verdict.RUN


def delivery_count(headers: Mapping[str, Any] | None) -> int:
    """RabbitMQ's ``x-delivery-count`` (quorum and stream queues: how often the message
    was returned before); 0 where the queue does not carry it."""
    if not headers:
        return 0
    value = headers.get("x-delivery-count")
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, value)


class RunningBoard:
    """``seats`` x ``slots`` task-id slots in one shared map (created by the parent)."""

    def __init__(self, seats: int, slots: int) -> None:
        self.seats = seats
        self.slots = slots
        self.area = _shared(seats * slots * ENTRY)
        self._free = list(range(seats - 1, -1, -1))

    # parent side
    def assign(self) -> int | None:
        """A free seat for a new child (None: all taken)."""
        return self._free.pop() if self._free else None

    def release(self, seat: int) -> None:
        self.clear(seat)
        self._free.append(seat)

    def running(self, seat: int) -> list[bytes]:
        """The keys in ``seat``'s slots (read after its child died)."""
        keys = []
        base = seat * self.slots * ENTRY
        for offset in range(base, base + self.slots * ENTRY, ENTRY):
            size = self.area[offset]
            if size:
                keys.append(bytes(self.area[offset:offset + 1 + size]))
        return keys

    def clear(self, seat: int) -> None:
        base = seat * self.slots * ENTRY
        self.area[base:base + self.slots * ENTRY] = bytes(self.slots * ENTRY)

    # child side
    def holds(self, key: bytes) -> bool:
        """Some seat has ``key`` in a slot (a task running, or its child's death not yet
        counted)."""
        return _find_entry(self.area, key) >= 0

    def close(self) -> None:
        self.area.close()


class Seat:
    """A child's writer for its own seat: two memory writes per task."""

    def __init__(self, board: RunningBoard, seat: int) -> None:
        self._area = board.area
        base = seat * board.slots * ENTRY
        self._free = list(range(base + (board.slots - 1) * ENTRY, base - 1, -ENTRY))

    def started(self, task_id: str) -> int:
        """Write the task's key into a free slot; its offset (-1 if none is free)."""
        if not self._free:
            return -1
        raw = task_id.encode("utf-8", "surrogatepass")  # task_key(), without a copy
        size = len(raw)
        if size > KEY_MAX:
            raw = task_key(task_id)[1:]
            size = len(raw)
        offset = self._free.pop()
        # The length byte last: a slot is never seen with a partly written id.
        self._area[offset + 1:offset + 1 + size] = raw
        self._area[offset] = size
        return offset

    def finished(self, offset: int) -> None:
        if offset >= 0:
            self._area[offset] = 0
            self._free.append(offset)


@dataclass(frozen=True)
class Death:
    key: bytes
    deaths: int
    alone: bool


class DeathTable:
    """Deaths per task id, written by the parent, read by every child."""

    def __init__(self, capacity: int = DEATH_CAPACITY) -> None:
        self.capacity = capacity
        self.area = _shared(capacity * ENTRY)
        self._index: dict[bytes, int] = {}  # parent side: key -> offset
        self._next = 0  # the ring's next entry to (over)write

    def record(self, keys: list[bytes]) -> list[Death]:
        """Parent: one death for each task that was running in a child that died."""
        alone = len(keys) == 1
        counted = []
        for key in keys:
            offset = self._index.get(key)
            if offset is None:
                offset = self._claim(key)
            deaths = min(255, self.area[offset + _DEATHS] + 1)
            self.area[offset + _ALONE] = int(alone)
            self.area[offset + _DEATHS] = deaths
            counted.append(Death(key, deaths, alone))
        return counted

    def _claim(self, key: bytes) -> int:
        offset = self._next * ENTRY
        self._next = (self._next + 1) % self.capacity
        old = self.area[offset]
        if old:
            self._index.pop(bytes(self.area[offset:offset + 1 + old]), None)
        # Invalidate first, then the key and counts, the length byte last.
        self.area[offset] = 0
        self.area[offset + 1:offset + ENTRY] = bytes(ENTRY - 1)
        self.area[offset + 1:offset + len(key)] = key[1:]
        self.area[offset] = key[0]
        self._index[key] = offset
        return offset

    def lookup(self, key: bytes) -> tuple[int, bool]:
        """``(deaths, last death alone)`` for ``key``; (0, False) if it never died."""
        offset = _find_entry(self.area, key)
        if offset < 0:
            return 0, False
        return self.area[offset + _DEATHS], bool(self.area[offset + _ALONE])

    def close(self) -> None:
        self.area.close()


class Guard:
    """A worker's view of the poison guard (the supervisor's tables, or none in a single
    process worker: then only ``x-delivery-count`` counts)."""

    def __init__(self, limit: int, board: RunningBoard | None = None, seat: int | None = None,
                 deaths: DeathTable | None = None) -> None:
        self.limit = limit
        self._board = board
        self._deaths = deaths
        #: the hot path checks this once per task: None when nothing is recorded
        self.seat = Seat(board, seat) if board is not None and seat is not None else None

    def verdict(self, task_id: str, headers: Mapping[str, Any] | None,
                count_pending: bool = True) -> Verdict:
        """For a redelivered message only. WAIT (only with ``count_pending``) while a
        sibling's slot still holds the id: its death is about to be counted."""
        key = task_key(task_id)
        if count_pending and self._board is not None and self._board.holds(key):
            return Verdict.WAIT
        deaths, alone = self._deaths.lookup(key) if self._deaths is not None else (0, False)
        return judge(deaths, alone, delivery_count(headers), self.limit)

    def deaths(self, task_id: str, headers: Mapping[str, Any] | None) -> int:
        count = self._deaths.lookup(task_key(task_id))[0] if self._deaths is not None else 0
        return max(count, delivery_count(headers))
