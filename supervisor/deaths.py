"""The parent's side of the poison guard: seats on the running board, deaths counted.

The supervisor creates one :class:`DeathCounter` before its first fork, so that every
child inherits the two shared maps (see :mod:`aio_celery.poison`). It hands each new child a
seat, and when a child dies it counts one death for every task still in that child's seat,
*then* clears the seat: a sibling that got one of those messages back waits while the id
is on the board, so it reads the new count once the seat is clear.
"""

from __future__ import annotations

import logging

from aio_celery.poison import Death, DeathTable, RunningBoard, key_text
from supervisor import child as children

logger = logging.getLogger("aio_celery.supervisor")

#: task ids named in the log line about a child that died while running them
BLAME_SHOWN = 10


class DeathCounter:
    """The running board (``seats`` seats of ``slots`` tasks) and the death table."""

    def __init__(self, seats: int, slots: int) -> None:
        self.board = RunningBoard(seats, slots)
        self.deaths = DeathTable()

    def take_seat(self) -> children.PoisonSeat:
        """A seat for a new child. Beyond the board's seats a child gets a board of its
        own: its deaths are still counted, but its siblings cannot see what it runs."""
        board, seat = self.board, self.board.assign()
        if seat is None:
            board, seat = RunningBoard(1, self.board.slots), 0
        return children.PoisonSeat(board, seat, self.deaths)

    def free_seat(self, poison: children.PoisonSeat) -> None:
        """Clear the seat for the next child (a board of its own is closed instead)."""
        poison.board.release(poison.seat)
        if poison.board is not self.board:
            poison.board.close()

    def count_deaths(self, record: children.Child, stopping: bool) -> list[Death]:
        """After ``record``'s child died: one death for every task it was still running,
        then free its seat. Nothing is counted while the supervisor stops: its own SIGKILL
        at the shutdown timeout may have ended those tasks. Returns the deaths counted."""
        poison = record.poison
        if poison is None:
            return []
        counted: list[Death] = []
        keys = poison.board.running(poison.seat)
        if keys and not stopping:
            # Counted before the seat is cleared: a sibling that got one of these messages
            # back waits until the seat is clear, then reads the count.
            counted = self.deaths.record(keys)
            _blame(record, counted)
        self.free_seat(poison)
        record.poison = None
        return counted

    def close(self) -> None:
        self.board.close()
        self.deaths.close()


def _blame(record: children.Child, counted: list[Death]) -> None:
    shown = ", ".join(f"{key_text(d.key)} (death {d.deaths})" for d in counted[:BLAME_SHOWN])
    more = f" and {len(counted) - BLAME_SHOWN} more" if len(counted) > BLAME_SHOWN else ""
    what = "alone" if len(counted) == 1 else \
        f"{len(counted)} tasks, each of which runs alone when redelivered"
    logger.warning("child %d (pid %d) died while running %s: %s%s", record.index,
                   record.pid, what, shown, more)
