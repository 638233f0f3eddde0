"""Each child's heartbeat: a small file the child rewrites from its event loop.

The parent creates the file before forking and keeps a descriptor; the child writes one
byte (its state) about once a second from its *event loop*, so a loop blocked by a task
stops the beat. The parent reads the byte and the file's mtime. No thread, no socket.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

#: states a child writes
STARTING = "s"
READY = "r"
STOPPING = "d"
_NAMES = {STARTING: "starting", READY: "ready", STOPPING: "stopping"}


class HeartbeatFile:
    def __init__(self, directory: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix="beat-", dir=directory)
        self.fd = fd
        os.pwrite(fd, STARTING.encode(), 0)

    def beat(self, state: str) -> None:
        """Child side: record ``state`` and, through the write, a fresh mtime."""
        os.pwrite(self.fd, state.encode()[:1], 0)

    def read(self) -> tuple[str, float]:
        """Parent side: ``(state name, seconds since the last beat)``."""
        state = os.pread(self.fd, 1, 0).decode(errors="replace") or STARTING
        age = time.time() - os.fstat(self.fd).st_mtime
        return _NAMES.get(state, "starting"), max(0.0, age)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
