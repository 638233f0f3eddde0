"""Rate limits: Celery's ``rate_limit`` strings and the token buckets that enforce them.

Celery gives each rate-limited task type a kombu ``TokenBucket(rate, capacity=1)``: one
token, refilled at ``rate`` tokens a second, and a task starts only when it can take the
token. That is a *cell rate* with no burst, so one number per task type says it all: the
*theoretical arrival time* (TAT), the moment the next token is whole (the GCRA form of
the same bucket). A task may take it when ``TAT <= now``; taking it moves the TAT to
``max(TAT, now) + 1/rate``. An idle bucket is full (one token), as kombu's.

Celery's limit holds per worker instance, for all its pool processes together, so the
supervisor keeps one TAT per task type in a table its children share (:class:`SharedRates`,
created before the first fork, like the poison guard's maps). A take is a read-modify-write
of two numbers under ``fcntl.lockf`` on the table's file: a POSIX record lock that the
kernel releases when its holder dies, so a child killed in the middle cannot block its
siblings; it is paid only by rate-limited tasks. A worker without a supervisor
(``-P solo``, tests) uses a :class:`LocalBucket` per task type.

Pure standard library, clock passed in: the supervisor imports this module without
aio-pika, and tests drive the buckets with a fake clock.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import tempfile
from typing import Protocol

#: seconds per unit of Celery's ``celery.utils.time.rate()`` (a bare number: per second)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

RateLimit = str | int | float | None


def parse_rate(value: RateLimit) -> float:
    """Tokens per second for a ``rate_limit`` as Celery reads it: ``"10/s"``, ``"100/m"``,
    ``"1000/h"``, a number or a bare number string (per second). 0 means no limit, and so
    do None and "" (Celery's ``rate()``). ValueError for anything else."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ValueError(f"rate limit {value!r}: not a rate")
    if isinstance(value, int | float):
        number, unit = float(value), "s"
    elif isinstance(value, str):
        amount, _, unit = value.strip().partition("/")
        unit = unit.strip() or "s"
        if unit not in _UNITS:
            raise ValueError(f"rate limit {value!r}: the unit after '/' must be s, m or h")
        try:
            number = float(amount)
        except ValueError:
            raise ValueError(f"rate limit {value!r}: {amount!r} is not a number") from None
    else:
        raise ValueError(f"rate limit {value!r}: use a string like '10/s', '100/m', "
                         "'1000/h' or a number (per second)")
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"rate limit {value!r}: must be a finite number >= 0")
    return number / _UNITS[unit]


def interval(value: RateLimit) -> float:
    """Seconds between two tokens for ``value`` (see :func:`parse_rate`); 0.0: no limit."""
    per_second = parse_rate(value)
    return 1.0 / per_second if per_second else 0.0


def take(tat: float, gap: float, now: float) -> tuple[float, float]:
    """One attempt at a bucket whose next token is whole at ``tat``, refilled every
    ``gap`` seconds: ``(wait, new_tat)``. ``wait`` 0.0: the token is taken; else the
    seconds until it is whole (nothing taken)."""
    if tat <= now:
        return 0.0, now + gap
    return tat - now, tat


def rescale(tat: float, old_gap: float, new_gap: float, now: float) -> float:
    """The TAT after the rate changed: the part of a token still missing is kept, so the
    next token comes as if the new rate had always been in force (Celery builds a new, full
    bucket instead: a change would then let one task through at once, and children that
    see a broadcast change one after the other would each let one through)."""
    if tat <= now or old_gap <= 0:
        return tat
    return now + (tat - now) * new_gap / old_gap


class Bucket(Protocol):
    def take(self, gap: float, now: float) -> float:
        """Take a token: 0.0 if taken, else the seconds until one may be whole (another
        process may take it first). ``gap``: seconds between tokens in force now."""
        ...


class LocalBucket:
    """One task type's bucket in one process."""

    def __init__(self) -> None:
        self._tat = float("-inf")  # full
        self._gap = 0.0

    def take(self, gap: float, now: float) -> float:
        if gap != self._gap:
            self._tat = rescale(self._tat, self._gap, gap, now)
            self._gap = gap
        wait, self._tat = take(self._tat, gap, now)
        return wait


#: one table entry: the task name's digest, its TAT and the gap it was taken with
_ENTRY = struct.Struct("<16sdd")
#: entries in the shared table (32 bytes each: 128 KiB); more task types with a rate limit
#: than that fall back to a bucket in each process (see SharedRates.bucket)
CAPACITY = 4096
_EMPTY = bytes(16)


def _digest(name: str) -> bytes:
    key = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return key if key != _EMPTY else b"\x01" + key[1:]


def _shared_file(size: int) -> int:
    """A file descriptor for ``size`` bytes of shared memory that has a file, for lockf
    (an anonymous map has none): a memfd on Linux, an unlinked temporary file elsewhere."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aio_celery-rates", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        handle, path = tempfile.mkstemp(prefix="aio_celery-rates-")
        os.unlink(path)
        fd = handle
    os.ftruncate(fd, size)
    return fd


class SharedRates:
    """The TATs of every rate-limited task type, shared by a supervisor's children.

    Made by the supervisor before it forks; each child inherits the map and the file
    descriptor and takes tokens through :meth:`bucket`. Linear probing over name digests
    (entries are never removed: a task type's entry lives as long as the supervisor)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._fd = _shared_file(capacity * _ENTRY.size)
        self.area = mmap.mmap(self._fd, capacity * _ENTRY.size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._offsets: dict[str, int] = {}  # this process's cache: name -> entry offset

    def bucket(self, name: str) -> Bucket:
        """The shared bucket of task type ``name``; a bucket of this process alone if the
        table is full."""
        offset = self._offsets.get(name)
        if offset is None:
            with self._locked():
                offset = self._claim(_digest(name))
            if offset < 0:
                return LocalBucket()
            self._offsets[name] = offset
        return _SharedBucket(self, offset)

    def _claim(self, key: bytes) -> int:
        start = int.from_bytes(key[:8], "little") % self.capacity
        for step in range(self.capacity):
            offset = (start + step) % self.capacity * _ENTRY.size
            found = self.area[offset:offset + 16]
            if found == key:
                return offset
            if found == _EMPTY:
                _ENTRY.pack_into(self.area, offset, key, float("-inf"), 0.0)
                return offset
        return -1

    def take(self, offset: int, gap: float, now: float) -> float:
        with self._locked():
            key, tat, old_gap = _ENTRY.unpack_from(self.area, offset)
            if gap != old_gap:
                tat = rescale(tat, old_gap, gap, now)
            wait, tat = take(tat, gap, now)
            _ENTRY.pack_into(self.area, offset, key, tat, gap)
        return wait

    def _locked(self) -> _Lock:
        return _Lock(self._fd)

    def close(self) -> None:
        self.area.close()
        os.close(self._fd)


class _Lock:
    """The whole table, locked with a POSIX record lock (per process, so siblings exclude
    each other although they share the descriptor; released by the kernel if the holder
    dies). Held for a few microseconds: a take never waits while holding it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class _SharedBucket:
    def __init__(self, table: SharedRates, offset: int) -> None:
        self._table = table
        self._offset = offset

    def take(self, gap: float, now: float) -> float:
        return self._table.take(self._offset, gap, now)
