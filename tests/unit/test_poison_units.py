"""The poison guard's pure pieces: the shared running board and death table (real shared
maps, read across a real fork), the verdict, ``x-delivery-count``, and the counting logic
played out without processes: a poison task among innocent neighbours."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aio_celery.poison import (
    KEY_MAX,
    DeathTable,
    Guard,
    RunningBoard,
    Seat,
    Verdict,
    delivery_count,
    judge,
    key_text,
    task_key,
)
from supervisor import heartbeat
from supervisor.child import Child
from supervisor.deaths import DeathCounter


@pytest.fixture
def board() -> Iterator[RunningBoard]:
    table = RunningBoard(seats=3, slots=4)
    yield table
    table.close()


@pytest.fixture
def deaths() -> Iterator[DeathTable]:
    table = DeathTable(capacity=8)
    yield table
    table.close()


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


# --- keys -------------------------------------------------------------------------------------

def test_a_uuid_is_kept_as_is() -> None:
    task_id = str(uuid.uuid4())
    key = task_key(task_id)
    assert key[0] == len(task_id) and key_text(key) == task_id


def test_a_long_id_is_kept_as_a_hash_that_fits_a_slot() -> None:
    long_id = "x" * 500
    key = task_key(long_id)
    assert len(key) - 1 <= KEY_MAX and key_text(key).startswith("#")
    assert key == task_key(long_id) and key != task_key("x" * 501)
    assert len(task_key("é" * 40)) - 1 <= KEY_MAX  # 80 bytes of UTF-8: hashed too


# --- the running board ------------------------------------------------------------------------

def test_a_seat_records_what_runs_and_forgets_what_ended(board: RunningBoard) -> None:
    seat_no = board.assign()
    assert seat_no is not None
    seat = Seat(board, seat_no)
    a, b = task_key("a-task"), task_key("b-task")
    slot_a, slot_b = seat.started("a-task"), seat.started("b-task")
    assert sorted(board.running(seat_no)) == sorted([a, b])
    assert board.holds(a) and board.holds(b)
    seat.finished(slot_a)
    assert board.running(seat_no) == [b] and not board.holds(a)
    seat.finished(slot_b)
    assert board.running(seat_no) == []


def test_a_long_id_is_written_as_its_key(board: RunningBoard) -> None:
    long_id = "L" * 200
    Seat(board, 0).started(long_id)
    assert board.running(0) == [task_key(long_id)] and board.holds(task_key(long_id))


def test_a_full_seat_records_nothing_more(board: RunningBoard) -> None:
    seat = Seat(board, 0)
    slots = [seat.started(f"t{i}") for i in range(4)]
    assert all(slot >= 0 for slot in slots)
    assert seat.started("fifth") == -1
    seat.finished(-1)  # nothing to clear
    assert len(board.running(0)) == 4


def test_seats_are_apart_and_reused(board: RunningBoard) -> None:
    seats = [board.assign(), board.assign(), board.assign()]
    assert seats == [0, 1, 2] and board.assign() is None
    Seat(board, 1).started("in-seat-1")
    assert board.running(0) == [] and board.running(2) == []
    board.release(1)
    assert board.running(1) == [] and not board.holds(task_key("in-seat-1"))
    assert board.assign() == 1


def test_a_child_writes_and_the_parent_reads_across_fork(board: RunningBoard) -> None:
    """MAP_SHARED: what a forked child writes is what its parent reads after its death."""
    task_id = str(uuid.uuid4())

    def child() -> None:
        seat = Seat(board, 2)
        seat.started(task_id)
        seat.finished(seat.started("ended"))
        os._exit(0)  # dies with the task running, as a poison task would make it

    assert _in_child(child) == 0
    assert board.running(2) == [task_key(task_id)]


def test_holds_ignores_bytes_that_match_across_two_slots(board: RunningBoard) -> None:
    seat = Seat(board, 0)
    seat.started("a\x02cd")  # holds the bytes of task_key("cd"), one byte in
    assert not board.holds(task_key("cd"))
    seat.started("cd")
    assert board.holds(task_key("cd"))


# --- the death table --------------------------------------------------------------------------

def test_deaths_count_up_and_remember_whether_the_task_ran_alone(deaths: DeathTable) -> None:
    poison, neighbour = task_key("poison"), task_key("neighbour")
    first = deaths.record([poison, neighbour])
    assert [(d.deaths, d.alone) for d in first] == [(1, False), (1, False)]
    assert deaths.lookup(poison) == (1, False)
    deaths.record([poison])
    assert deaths.lookup(poison) == (2, True)
    assert deaths.lookup(neighbour) == (1, False)
    assert deaths.lookup(task_key("never-died")) == (0, False)


def test_the_oldest_entries_make_room(deaths: DeathTable) -> None:
    keys = [task_key(f"task-{i}") for i in range(10)]  # capacity 8
    for key in keys:
        deaths.record([key])
    assert deaths.lookup(keys[0]) == (0, False) and deaths.lookup(keys[1]) == (0, False)
    assert all(deaths.lookup(key) == (1, True) for key in keys[2:])
    deaths.record([keys[9]])  # counted in place, not a new entry
    assert deaths.lookup(keys[9]) == (2, True) and deaths.lookup(keys[2]) == (1, True)


def test_counts_saturate(deaths: DeathTable) -> None:
    key = task_key("immortal-poison")
    for _ in range(300):
        deaths.record([key])
    assert deaths.lookup(key) == (255, True)


def test_a_child_forked_earlier_reads_counts_written_later(deaths: DeathTable) -> None:
    read, write = os.pipe()
    go_read, go_write = os.pipe()
    key = task_key("counted-after-fork")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.read(go_read, 1)  # wait until the parent has counted
        ok = deaths.lookup(key) == (1, True)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    deaths.record([key])
    os.write(go_write, b"x")
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    for fd in (read, go_read, go_write):
        os.close(fd)


# --- the verdict ------------------------------------------------------------------------------

@pytest.mark.parametrize(("deaths_", "alone", "count", "limit", "verdict"), [
    (0, False, 0, 3, Verdict.RUN),  # given back by a shutdown, or prefetched by a dead child
    (1, False, 0, 3, Verdict.ISOLATE),  # died with others: runs alone next time
    (1, True, 0, 3, Verdict.ISOLATE),
    (2, True, 0, 3, Verdict.ISOLATE),
    (3, True, 0, 3, Verdict.RETIRE),
    (3, False, 0, 3, Verdict.ISOLATE),  # never retired for a death shared with others
    (9, False, 0, 3, Verdict.ISOLATE),
    (1, True, 0, 1, Verdict.RETIRE),
    (1, False, 0, 1, Verdict.ISOLATE),
    # quorum queues: the broker's count outlives the supervisor
    (0, False, 2, 3, Verdict.RUN),
    (0, False, 3, 3, Verdict.ISOLATE),  # returned 3 times, unknown here: runs alone
    (1, True, 3, 3, Verdict.RETIRE),  # ... and one death alone retires it
    (1, False, 5, 3, Verdict.ISOLATE),
])
def test_judge(deaths_: int, alone: bool, count: int, limit: int, verdict: Verdict) -> None:
    assert judge(deaths_, alone, count, limit) is verdict


@pytest.mark.parametrize(("headers", "count"), [
    (None, 0), ({}, 0), ({"x-delivery-count": 4}, 4), ({"x-delivery-count": 0}, 0),
    ({"x-delivery-count": -1}, 0), ({"x-delivery-count": "4"}, 0),
    ({"x-delivery-count": True}, 0), ({"id": "x"}, 0),
])
def test_delivery_count(headers: dict[str, object] | None, count: int) -> None:
    assert delivery_count(headers) == count


def test_guard_waits_while_a_sibling_still_shows_the_task(board: RunningBoard,
                                                          deaths: DeathTable) -> None:
    guard = Guard(3, board, 0, deaths)
    Seat(board, 1).started("t")  # the sibling in seat 1 ran it and died
    assert guard.verdict("t", None) is Verdict.WAIT
    assert guard.verdict("t", None, count_pending=False) is Verdict.RUN
    deaths.record(board.running(1))  # the parent counts, then clears the seat
    board.release(1)
    assert guard.verdict("t", None) is Verdict.ISOLATE
    assert guard.deaths("t", {"x-delivery-count": 2}) == 2


def test_a_worker_without_supervisor_reads_only_the_delivery_count() -> None:
    guard = Guard(3)
    assert guard.seat is None
    assert guard.verdict("t", None) is Verdict.RUN
    assert guard.verdict("t", {"x-delivery-count": 3}) is Verdict.ISOLATE


# --- the counting logic, played out -----------------------------------------------------------

def _play(limit: int, concurrency: int, innocents: int, seed: int) -> dict[str, object]:
    """One child at a time takes messages from a queue (redelivered ones meet the guard)
    and runs up to ``concurrency`` of them at once, the isolated ones alone; whenever the
    poison runs, the child dies with everything it was running, and the parent counts."""
    rng = random.Random(seed)
    board, table = RunningBoard(2, concurrency), DeathTable()
    queue = [(f"innocent-{i}", False) for i in range(innocents)]
    queue.insert(rng.randrange(len(queue) // 2), ("poison", False))
    runs: dict[str, int] = {}
    done: set[str] = set()
    retired: list[str] = []
    try:
        while queue:
            seat_no = board.assign()
            assert seat_no is not None
            guard = Guard(limit, board, seat_no, table)
            batch: list[str] = []
            isolated = False
            while queue and len(batch) < concurrency and not isolated:
                task_id, redelivered = queue[0]
                verdict = guard.verdict(task_id, None) if redelivered else Verdict.RUN
                if verdict is Verdict.RETIRE:
                    queue.pop(0)
                    retired.append(task_id)
                    continue
                if verdict is Verdict.ISOLATE:
                    if batch:
                        break  # it waits until the running ones are done
                    isolated = True
                queue.pop(0)
                batch.append(task_id)
            assert guard.seat is not None
            for task_id in batch:
                guard.seat.started(task_id)
                runs[task_id] = runs.get(task_id, 0) + 1
            if "poison" in batch:  # the child dies: everything it ran comes back
                table.record(board.running(seat_no))
                queue[:0] = [(task_id, True) for task_id in batch]
            else:
                done.update(batch)
            board.release(seat_no)
    finally:
        board.close()
        table.close()
    return {"runs": runs, "done": done, "retired": retired}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(("limit", "concurrency"), [(3, 5), (2, 3), (1, 4), (5, 10)])
def test_the_poison_runs_limit_times_and_no_innocent_is_retired(
        seed: int, limit: int, concurrency: int) -> None:
    outcome = _play(limit, concurrency, innocents=30, seed=seed)
    runs = outcome["runs"]
    assert isinstance(runs, dict)
    assert outcome["retired"] == ["poison"]
    # It died alongside its neighbours once, then alone until the limit (at least twice
    # for a limit of 1: a death shared with others never retires).
    assert runs["poison"] == max(limit, 2)
    assert outcome["done"] == {f"innocent-{i}" for i in range(30)}
    assert max(n for task_id, n in runs.items() if task_id != "poison") <= 2


# --- the supervisor's side (supervisor.deaths) -------------------------------------------------

@pytest.fixture
def counter() -> Iterator[DeathCounter]:
    tables = DeathCounter(seats=6, slots=3)
    yield tables
    tables.close()


def _child(counter: DeathCounter, tmp_path: Path, pid: int) -> Child:
    return Child(index=1, pid=pid, beat=heartbeat.HeartbeatFile(str(tmp_path)),
                 poison=counter.take_seat())


def test_a_dead_childs_running_tasks_are_counted_before_its_seat_is_freed(
        counter: DeathCounter, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = _child(counter, tmp_path, 101)
    assert record.poison is not None
    seat = Seat(record.poison.board, record.poison.seat)
    seat.started("poison-id")
    seat.finished(seat.started("finished-id"))
    seat.started("neighbour-id")
    counted = counter.count_deaths(record, stopping=False)
    assert [(key_text(d.key), d.deaths, d.alone) for d in counted] == [
        ("poison-id", 1, False), ("neighbour-id", 1, False)]
    assert counter.deaths.lookup(task_key("poison-id")) == (1, False)
    assert counter.deaths.lookup(task_key("finished-id")) == (0, False)
    assert not counter.board.holds(task_key("poison-id")), "the seat was not cleared"
    assert record.poison is None
    assert ("child 1 (pid 101) died while running 2 tasks, each of which runs alone when "
            "redelivered: poison-id (death 1), neighbour-id (death 1)") in caplog.text

    alone = _child(counter, tmp_path, 102)
    assert alone.poison is not None
    Seat(alone.poison.board, alone.poison.seat).started("poison-id")
    counter.count_deaths(alone, stopping=False)
    assert counter.deaths.lookup(task_key("poison-id")) == (2, True)
    assert "child 1 (pid 102) died while running alone: poison-id (death 2)" in caplog.text


def test_the_blame_names_ten_tasks_and_counts_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    counter = DeathCounter(seats=2, slots=12)
    try:
        record = _child(counter, tmp_path, 103)
        assert record.poison is not None
        seat = Seat(record.poison.board, record.poison.seat)
        for n in range(12):
            seat.started(f"t{n}")
        assert len(counter.count_deaths(record, stopping=False)) == 12
    finally:
        counter.close()
    assert "t9 (death 1) and 2 more" in caplog.text and "t10" not in caplog.text


def test_nothing_is_counted_while_the_supervisor_stops(counter: DeathCounter,
                                                       tmp_path: Path) -> None:
    record = _child(counter, tmp_path, 201)
    assert record.poison is not None
    Seat(record.poison.board, record.poison.seat).started("long-task")
    # our own SIGKILL at the shutdown timeout ended it
    assert counter.count_deaths(record, stopping=True) == []
    assert counter.deaths.lookup(task_key("long-task")) == (0, False)
    assert not counter.board.holds(task_key("long-task"))
    assert record.poison is None


def test_a_child_without_a_seat_counts_nothing(counter: DeathCounter, tmp_path: Path) -> None:
    record = Child(index=1, pid=202, beat=heartbeat.HeartbeatFile(str(tmp_path)))
    assert counter.count_deaths(record, stopping=False) == []


def test_children_beyond_the_seats_get_a_board_of_their_own(counter: DeathCounter,
                                                            tmp_path: Path) -> None:
    records = [_child(counter, tmp_path, 300 + n) for n in range(7)]  # 6 seats
    extra = records[-1].poison
    assert extra is not None and extra.board is not counter.board
    assert extra.board.slots == counter.board.slots
    Seat(extra.board, extra.seat).started("x")
    counter.count_deaths(records[-1], stopping=False)
    assert counter.deaths.lookup(task_key("x")) == (1, True)
    assert extra.board.area.closed
    for record in records[:-1]:
        counter.count_deaths(record, stopping=False)
    assert counter.board.assign() is not None


def test_a_seat_freed_after_a_failed_fork_is_taken_again(counter: DeathCounter) -> None:
    seats = [counter.take_seat() for _ in range(6)]
    counter.free_seat(seats[2])
    again = counter.take_seat()
    assert again.board is counter.board and again.seat == seats[2].seat
    assert again.deaths is counter.deaths
