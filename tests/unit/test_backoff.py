"""The one backoff every retry of a failed dependency paces itself with."""

from __future__ import annotations

from aio_celery import defaults
from aio_celery.worker.backoff import Backoff


def test_doubles_up_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_the_default_pacing_is_the_shared_one() -> None:
    backoff = Backoff()
    waits = [backoff.next() for _ in range(6)]
    assert waits[0] == defaults.RETRY_FIRST_DELAY and waits[-1] == defaults.RETRY_MAX_DELAY
