"""Each child's heartbeat: a small file the child rewrites from its event loop.

The parent creates the file before forking and keeps a descriptor; about once a second the
child writes, from its *event loop*, one record: its state, the time of the beat and, while
the broker is away, since when. A loop blocked by a task stops the beat. No thread, no
socket.

The times are ``time.monotonic()`` (CLOCK_MONOTONIC on Linux: one clock for the whole
system, so parent and child agree on it) and never the file's mtime against the wall clock:
an NTP step or a manual ``date -s`` must not make every child look dead (or alive).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import time
from typing import NamedTuple

#: states a child writes
STARTING = "s"
READY = "r"
STOPPING = "d"
#: beating, but without a broker connection (at start-up or after losing it)
WAITING = "w"
_NAMES = {STARTING: "starting", READY: "ready", STOPPING: "stopping",
          WAITING: "waiting for broker"}

#: state byte, padding, beat time, broker lost since (0.0: connected); one pwrite
_RECORD = struct.Struct("<c7xdd")


class Beat(NamedTuple):
    """What the parent reads: the state's name, seconds since the last beat, and seconds
    the child has been without the broker (None while connected)."""

    state: str
    age: float
    broker_down: float | None


class HeartbeatFile:
    def __init__(self, directory: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix="beat-", dir=directory)
        self.fd = fd
        self.beat(STARTING)  # the start-up limit counts from here

    def beat(self, state: str, broker_lost_since: float | None = None) -> None:
        """Child side: record ``state`` now (and since when, on the monotonic clock, the
        broker has been away)."""
        os.pwrite(self.fd, _RECORD.pack(state.encode()[:1] or b"?", time.monotonic(),
                                        broker_lost_since or 0.0), 0)

    def read(self, now: float | None = None) -> tuple[str, float]:
        """Parent side: ``(state name, seconds since the last beat)``."""
        beat = self.read_beat(now)
        return beat.state, beat.age

    def read_beat(self, now: float | None = None) -> Beat:
        now = time.monotonic() if now is None else now
        raw = self._read_record()
        if raw is None:  # not a whole record (truncated): starting, so the start-up limit holds
            return Beat("starting", 0.0, None)
        state, stamp, lost_since = _RECORD.unpack(raw)
        name = _NAMES.get(state.decode(errors="replace"), "starting")
        down = max(0.0, now - lost_since) if lost_since else None
        return Beat(name, max(0.0, now - stamp), down)

    def _read_record(self) -> bytes | None:
        # The child's pwrite is not atomic against our pread: read until two reads agree
        # (a torn record would give a wild time, and a wild age kills a healthy child).
        previous = os.pread(self.fd, _RECORD.size, 0)
        for _ in range(3):
            current = os.pread(self.fd, _RECORD.size, 0)
            if current == previous:
                break
            previous = current
        return previous if len(previous) == _RECORD.size else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
