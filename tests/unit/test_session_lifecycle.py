"""A consumer session's lifecycle (aio_celery.worker.delivery.State): one state, moved
forward in one place, checked even under ``python -O``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aio_celery.worker.delivery import _TRANSITIONS, Session, State
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.stats import Stats


class LifecycleChannel:
    """Records what the session does to its channel, in order."""

    prefetch_count = 10

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def cancel_consumers(self) -> None:
        self.calls.append(("cancel_consumers", 0))

    def nack(self, tag: int) -> None:
        self.calls.append(("nack", tag))

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag))

    def resume_deliveries(self) -> None:
        self.calls.append(("resume_deliveries", 0))

    async def barrier(self) -> None:
        self.calls.append(("barrier", 0))

    async def close(self) -> None:
        self.calls.append(("close", 0))


def make_session(channel: LifecycleChannel) -> Session:
    return Session(channel, runner=None, options=WorkerOptions(concurrency=10),  # type: ignore[arg-type]
                   stats=Stats(), on_task_done=lambda: None,
                   publisher=None)  # type: ignore[arg-type]  # nothing is published here


def test_the_lifecycle_only_moves_forward() -> None:
    assert set(_TRANSITIONS) == set(State)
    for state, following in _TRANSITIONS.items():
        assert all(later > state for later in following), state
    assert not _TRANSITIONS[State.CLOSED]


async def test_a_warm_stop_goes_through_every_state_in_order() -> None:
    channel = LifecycleChannel()
    session = make_session(channel)
    assert session.state is State.RUNNING
    session.drain()
    assert session.state is State.DRAINING
    session.acks.delivered(1)
    session._give_back_when_stopped(1)  # draining: given back at once
    assert channel.calls == [("nack", 1)]
    await session.stop(timeout=1.0, cold=False)
    assert session.state is State.CLOSED
    assert channel.calls[1:] == [("cancel_consumers", 0), ("resume_deliveries", 0),
                                 ("barrier", 0), ("close", 0)]


async def test_what_comes_back_while_stopping_waits_for_the_consumers_to_be_cancelled() -> None:
    channel = LifecycleChannel()
    session = make_session(channel)
    session.go_cold()
    session.drain()  # a drain after a cold stop does not move the session back
    assert session.state is State.STOPPING
    for tag in (1, 2):
        session.acks.delivered(tag)
        session._give_back_when_stopped(tag)
    assert channel.calls == []  # the broker would hand them straight back
    await session.stop(timeout=1.0, cold=True)
    assert channel.calls[:3] == [("cancel_consumers", 0), ("nack", 1), ("nack", 2)]
    assert session.state is State.CLOSED


async def test_a_session_that_failed_to_start_closes_from_running() -> None:
    channel = LifecycleChannel()
    session = make_session(channel)
    await session.close()
    await session.close()  # closing twice is harmless
    assert session.state is State.CLOSED
    session.drain()
    session.go_cold()
    assert session.state is State.CLOSED


def test_an_illegal_transition_is_refused() -> None:
    session = make_session(LifecycleChannel())
    with pytest.raises(RuntimeError, match="no transition from RUNNING to DETACHED"):
        session._enter(State.DETACHED)
    assert session.state is State.RUNNING


def test_the_transition_check_survives_python_optimizations() -> None:
    script = (
        "from aio_celery.worker.delivery import Session, State\n"
        "from aio_celery.worker.options import WorkerOptions\n"
        "from aio_celery.worker.stats import Stats\n"
        "class C:\n    prefetch_count = 1\n"
        "s = Session(C(), None, WorkerOptions(concurrency=1), Stats(), lambda: None,"
        " publisher=None)\n"
        "s._enter(State.CLOSED)\n"
        "try:\n    s._enter(State.DRAINING)\nexcept RuntimeError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "session: no transition from CLOSED to DRAINING"
