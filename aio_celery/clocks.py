"""Pure: the Lamport clock of one worker process, Celery's ``app.clock``.

One clock per process orders what the process tells others: every event it sends and
every remote control reply moves it forward, every control request received moves it past
the sender's (kombu's ``LamportClock``). A monitor can then order an event after the
request that caused it. One process's clock lives on one event loop, so it needs no lock
(kombu's has one for threads).
"""

from __future__ import annotations


class LamportClock:
    """A Lamport clock: :meth:`forward` for what this process sends, :meth:`adjust` for
    what it receives with a clock of its sender."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def forward(self) -> int:
        """Advance by one (an event, a reply): the new value, to send along."""
        self.value += 1
        return self.value

    def adjust(self, other: int) -> int:
        """Move past ``other``, a received clock: ``max(value, other) + 1``."""
        self.value = max(self.value, other) + 1
        return self.value
