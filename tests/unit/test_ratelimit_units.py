"""Rate limits without a broker: Celery's rate strings (checked against Celery's own
``rate()``), the token bucket (against kombu's ``TokenBucket`` on a fake clock), the table
the supervisor's children share (across real forks), and the worker's waiting lines."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import Iterator

import kombu.utils.limits
import pytest
from celery.utils.time import rate as celery_rate

from aio_celery import Celery
from aio_celery.ratelimit import (
    LocalBucket,
    SharedRates,
    interval,
    parse_rate,
    rescale,
    take,
)
from aio_celery.worker.rates import Limiter


@pytest.fixture
def table() -> Iterator[SharedRates]:
    rates = SharedRates(capacity=8)
    yield rates
    rates.close()


def _in_child(action: object) -> int:
    """Run ``action()`` in a forked child; its exit code (0 if it returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            action()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# --- rate strings -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["10/s", "100/m", "1000/h", "0.5/s", "2/h", "7", "7/",
                                   "1.5", 10, 2.5, 0, "0", "0/m", None, ""])
def test_rates_read_as_celery_reads_them(value: object) -> None:
    assert parse_rate(value) == pytest.approx(celery_rate(value))  # type: ignore[arg-type]


def test_interval_is_the_time_between_two_tokens() -> None:
    assert interval("10/s") == pytest.approx(0.1)
    assert interval("100/m") == pytest.approx(0.6)
    assert interval("1000/h") == pytest.approx(3.6)
    assert interval(4) == pytest.approx(0.25)
    assert interval(None) == interval("0/s") == 0.0  # no limit


@pytest.mark.parametrize("value", ["10/d", "ten/s", "/s", "-1/s", "inf", "nan/m", True,
                                   [10], "1/s/s"])
def test_a_rate_celery_would_refuse_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        parse_rate(value)  # type: ignore[arg-type]


def test_a_task_with_a_bad_rate_limit_is_refused_at_declaration() -> None:
    app = Celery("rates")

    async def job() -> None:
        return None

    with pytest.raises(ValueError, match=r"task 'job'.*rate limit '5/week'"):
        app.task(name="job", rate_limit="5/week")(job)
    assert app.task(name="ok", rate_limit="5/m")(job).rate_limit == "5/m"


# --- the bucket ---------------------------------------------------------------------------


def test_one_token_then_one_per_interval() -> None:
    bucket = LocalBucket()
    assert bucket.take(0.1, now=50.0) == 0.0  # an idle bucket is full
    assert bucket.take(0.1, now=50.0) == pytest.approx(0.1)
    assert bucket.take(0.1, now=50.06) == pytest.approx(0.04)  # a failed try takes nothing
    assert bucket.take(0.1, now=50.1) == 0.0
    assert bucket.take(0.1, now=51.0) == 0.0
    assert bucket.take(0.1, now=51.05) == pytest.approx(0.05)  # capacity 1: no burst
    assert bucket.take(0.1, now=51.1) == 0.0


def test_thirty_messages_at_ten_per_second_take_two_point_nine_seconds() -> None:
    bucket, now, starts = LocalBucket(), 0.0, []
    while len(starts) < 30:
        wait = bucket.take(0.1, now)
        if wait == 0.0:
            starts.append(now)
        now += wait
    assert starts[-1] - starts[0] == pytest.approx(2.9)


def test_same_decisions_as_kombus_token_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's bucket, ``TokenBucket(rate, capacity=1)``, on the same fake clock and the
    same random tries (a seeded run: the same one every time)."""
    clock = [1000.0]
    monkeypatch.setattr(kombu.utils.limits, "monotonic", lambda: clock[0])
    rng = random.Random(10)
    for per_second in (10.0, 1 / 60, 3.7):
        theirs = kombu.utils.limits.TokenBucket(per_second, capacity=1)
        ours = LocalBucket()
        for _ in range(500):
            clock[0] += rng.expovariate(per_second * rng.choice((0.5, 1, 4)))
            expected = theirs.expected_time(1)
            took = theirs.can_consume(1)
            wait = ours.take(1 / per_second, clock[0])
            assert (wait == 0.0) == took, (per_second, clock[0])
            if not took:
                assert wait == pytest.approx(expected, rel=1e-6)


def test_take_moves_the_next_token_from_now_or_from_when_it_was_due() -> None:
    assert take(float("-inf"), 2.0, 10.0) == (0.0, 12.0)
    assert take(10.0, 2.0, 10.0) == (0.0, 12.0)
    assert take(12.0, 2.0, 10.5) == (1.5, 12.0)


def test_a_changed_rate_keeps_the_part_of_the_token_still_missing() -> None:
    # 1/h taken at t=0: at t=900 three quarters of the token are missing
    assert rescale(3600.0, 3600.0, 0.1, now=900.0) == pytest.approx(900.075)
    assert rescale(5.0, 1.0, 10.0, now=6.0) == 5.0  # a full bucket stays full
    bucket = LocalBucket()
    assert bucket.take(3600.0, now=0.0) == 0.0
    assert bucket.take(3600.0, now=900.0) == pytest.approx(2700.0)
    assert bucket.take(0.1, now=900.0) == pytest.approx(0.075)  # the faster rate, at once
    assert bucket.take(0.1, now=900.075) == 0.0


# --- the table the children share --------------------------------------------------------


def test_a_token_taken_in_one_process_is_gone_for_the_others(table: SharedRates) -> None:
    assert _in_child(lambda: _assert(table.bucket("tasks.send").take(1.0, 100.0) == 0.0)) == 0
    assert table.bucket("tasks.send").take(1.0, 100.5) == pytest.approx(0.5)
    assert table.bucket("tasks.other").take(1.0, 100.5) == 0.0  # a bucket per task type
    assert _in_child(lambda: _assert(table.bucket("tasks.send").take(1.0, 101.0) == 0.0)) == 0


def test_a_child_killed_while_it_holds_the_lock_blocks_nobody(table: SharedRates) -> None:
    def die_holding_it() -> None:
        table._locked().__enter__()
        os._exit(9)

    assert _in_child(die_holding_it) == 9
    assert table.bucket("tasks.send").take(1.0, 5.0) == 0.0


def test_a_full_table_falls_back_to_a_bucket_per_process(table: SharedRates) -> None:
    names = [f"tasks.t{i}" for i in range(table.capacity + 1)]
    for name in names[:-1]:
        assert table.bucket(name).take(1.0, 0.0) == 0.0
    assert table.bucket(names[-1]).take(1.0, 0.0) == 0.0
    assert isinstance(table.bucket(names[-1]), LocalBucket)
    for name in names[:-1]:  # the shared ones are still found (and still empty)
        assert table.bucket(name).take(1.0, 0.5) == pytest.approx(0.5)


def test_siblings_taking_at_once_never_exceed_the_rate(table: SharedRates) -> None:
    """Two children hammer one shared bucket (20 ms per token) on the real clock, each
    noting the clock reading each token was taken at: merged, no two are closer than
    20 ms (the lock makes the read-modify-write whole), and both children took some."""
    gap, duration = 0.02, 1.0
    read_fd, write_fd = os.pipe()
    start = time.monotonic() + 0.2  # both start together, after both forks

    def hammer() -> None:
        bucket = table.bucket("tasks.shared")
        while time.monotonic() < start:
            pass
        taken = []
        while (now := time.monotonic()) < start + duration:
            if bucket.take(gap, now) == 0.0:
                taken.append(repr(now))
        os.write(write_fd, (" ".join(taken) + "\n").encode())

    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                hammer()
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        per_child = [[float(at) for at in line.split()] for line in pipe.read().splitlines()]
    assert len(per_child) == 2 and all(per_child), per_child
    taken = sorted(at for times in per_child for at in times)
    closest = min(b - a for a, b in itertools.pairwise(taken))
    assert closest >= gap - 1e-9, closest
    assert len(taken) <= duration / gap + 1  # 51: the first token, then one per 20 ms


def _assert(condition: bool) -> None:
    if not condition:
        raise AssertionError


# --- the worker's lines -------------------------------------------------------------------


@pytest.fixture
def rated_app() -> Celery:
    app = Celery("rates")

    async def job() -> None:
        return None

    app.task(name="limited", rate_limit="10/s")(job)
    app.task(name="free")(job)
    app.task(name="off", rate_limit=0)(job)
    return app


def test_a_line_only_for_a_task_that_is_limited_now(rated_app: Celery) -> None:
    limiter = Limiter(rated_app, clock=lambda: 0.0)
    assert limiter.line("free") is None
    assert limiter.line("off") is None
    assert limiter.line("unknown.task") is None
    line = limiter.line("limited")
    assert line is not None and line.gap == pytest.approx(0.1)
    rated_app.conf.update(task_default_rate_limit="2/s")
    limiter = Limiter(rated_app, clock=lambda: 0.0)  # the default is read as it starts
    free = limiter.line("free")
    assert free is not None and free.gap == pytest.approx(0.5)
    assert limiter.line("off") is None  # its own 0 wins over the default


def test_a_rate_changed_at_runtime_is_seen_at_the_next_receipt(rated_app: Celery) -> None:
    clock = [0.0]
    limiter = Limiter(rated_app, clock=lambda: clock[0])
    line = limiter.line("limited")
    assert line is not None and line.try_now() and not line.try_now()
    rated_app.tasks["limited"].rate_limit = "1/m"  # what the rate_limit command does
    assert limiter.line("limited") is line and line.gap == pytest.approx(60.0)
    rated_app.tasks["limited"].rate_limit = "0"
    assert limiter.line("limited") is None
    rated_app.tasks["limited"].rate_limit = "100/s"
    clock[0] = 0.01  # 90% of the token taken at 0 is still missing: 9 ms at 100/s
    assert limiter.line("limited") is line and not line.try_now()
    clock[0] = 0.0195
    assert line.try_now()


def test_an_invalid_rate_set_at_runtime_is_logged_once_and_lifts_the_limit(
        rated_app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    limiter = Limiter(rated_app, clock=lambda: 0.0)
    assert limiter.line("limited") is not None
    rated_app.tasks["limited"].rate_limit = "many/s"
    with caplog.at_level(logging.ERROR, logger="aio_celery.worker"):
        assert limiter.line("limited") is None
        assert limiter.line("limited") is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'many' is not a number" in errors[0].getMessage()


async def test_waiting_messages_take_their_tokens_in_arrival_order(rated_app: Celery) -> None:
    rated_app.tasks["limited"].rate_limit = "50/s"
    limiter = Limiter(rated_app)
    line = limiter.line("limited")
    assert line is not None and line.try_now()
    order: list[int] = []

    async def wait(i: int) -> None:
        await line.wait_turn()
        order.append(i)

    started = time.monotonic()
    waiters = [asyncio.create_task(wait(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert line.waiting == 5 and not line.try_now()  # a newcomer does not jump the line
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]
    assert time.monotonic() - started >= 5 * 0.02 - 0.005
    assert line.waiting == 0


async def test_a_cancelled_waiter_lets_the_next_one_through(rated_app: Celery) -> None:
    rated_app.tasks["limited"].rate_limit = "1/m"
    limiter = Limiter(rated_app)
    line = limiter.line("limited")
    assert line is not None and line.try_now()
    first = asyncio.create_task(line.wait_turn())
    second = asyncio.create_task(line.wait_turn())
    await asyncio.sleep(0.01)
    first.cancel()
    rated_app.tasks["limited"].rate_limit = None  # lifted: the waiting one goes at once
    await asyncio.wait_for(second, timeout=2.0)  # RECHECK: within a second
    assert first.cancelled() and line.waiting == 0
