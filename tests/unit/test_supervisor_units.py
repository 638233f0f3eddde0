"""The supervisor's pure pieces: sd_notify messages, the status file and the health check,
exit descriptions, heartbeat files, and the crash/exit bookkeeping (no fork, no broker); and
that the supervisor's modules stay light (a subprocess imports them)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from aio_celery import exitcodes
from aio_celery.worker.options import WorkerOptions
from supervisor import arbiter, heartbeat
from supervisor.arbiter import Supervisor, SupervisorOptions, describe_exit
from supervisor.child import STOP_SIGNAL, Child, ChildSpec
from supervisor.notify import Notifier
from supervisor.status import (
    ChildStatus,
    Status,
    check_health,
    default_status_path,
    read_status,
    write_status,
)

ROOT = Path(__file__).resolve().parents[2]


def test_supervisor_modules_do_not_import_aio_pika() -> None:
    """The parent forks its children: it must own no event loop or connection library."""
    code = ("import sys, aio_celery.cli, supervisor, supervisor.arbiter, supervisor.child; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('aio_pika', 'aiormq', 'redis', 'asyncio')); print(heavy); "
            "sys.exit(1 if heavy else 0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- sd_notify ------------------------------------------------------------------------------


@pytest.fixture
def datagram_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2)
    try:
        yield sock
    finally:
        sock.close()


def test_notifier_is_silent_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.address == ""
    assert notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False


def test_notifier_sends_fields_as_one_newline_separated_datagram(
        datagram_socket: socket.socket, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    datagram_socket.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.address == path
    assert notifier.send("READY=1", "MAINPID=4242", "STATUS=2/2 children consuming") is True
    assert datagram_socket.recv(4096) == b"READY=1\nMAINPID=4242\nSTATUS=2/2 children consuming"
    assert notifier.send("STOPPING=1") is True
    assert datagram_socket.recv(4096) == b"STOPPING=1"


def test_notifier_maps_at_sign_to_the_abstract_namespace(
        datagram_socket: socket.socket) -> None:
    name = f"aio-celery-unit-{uuid.uuid4().hex}"
    datagram_socket.bind("\0" + name)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert notifier.address == "\0" + name
    assert notifier.send("WATCHDOG=1") is True
    assert datagram_socket.recv(4096) == b"WATCHDOG=1"


def test_notifier_reports_undeliverable_messages(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert notifier.enabled
    assert notifier.send("READY=1") is False


@pytest.mark.parametrize(("environ", "interval"), [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_systemd_timeout(environ: dict[str, str],
                                                       interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "@x", **environ}).watchdog_interval == interval


# --- status file and health check -----------------------------------------------------------

def _status(**overrides: object) -> Status:
    fields: dict[str, object] = {
        "pid": 100, "state": "running", "target": 2, "heartbeat_timeout": 30.0,
        "updated": 1_000_000.0,
        "children": [ChildStatus(1, 101, "ready", 0.4), ChildStatus(2, 102, "ready", 0.9)]}
    fields.update(overrides)
    return Status(**fields)  # type: ignore[arg-type]


def test_status_round_trips_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    status = _status()
    write_status(str(path), status)
    write_status(str(path), status)  # replacing an existing file
    assert read_status(str(path)) == status
    assert os.listdir(tmp_path) == ["status.json"]
    data = json.loads(path.read_text())
    assert data["children"][1] == {"index": 2, "pid": 102, "state": "ready", "beat_age": 0.9,
                                   "broker_down": None}
    assert data["updated_monotonic"] is None


def test_write_status_to_a_missing_directory_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_status(str(tmp_path / "missing" / "status.json"), _status())
    assert os.listdir(tmp_path) == []


def test_default_status_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIO_CELERY_STATUS_FILE", str(tmp_path / "s.json"))
    assert default_status_path() == str(tmp_path / "s.json")
    monkeypatch.delenv("AIO_CELERY_STATUS_FILE")
    assert default_status_path().endswith(f"aio_celery-{os.getuid()}.status.json")


@pytest.fixture
def status_file(tmp_path: Path) -> Path:
    return tmp_path / "status.json"


def _write(path: Path, status: Status) -> None:
    write_status(str(path), status)


def test_health_ok_when_fresh_and_beating(status_file: Path) -> None:
    _write(status_file, _status())
    assert check_health(str(status_file), ready=False, now=1_000_010.0) == (
        True, "ok: 2 children (1:ready, 2:ready)")
    assert check_health(str(status_file), ready=True, now=1_000_010.0)[0] is True


def test_health_fails_without_a_status_file(status_file: Path) -> None:
    healthy, reason = check_health(str(status_file), ready=False)
    assert not healthy
    assert reason.startswith(f"no supervisor status at {status_file}")


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"pid": 1}',
                                     '{"pid": 1, "state": "running", "target": 1, '
                                     '"heartbeat_timeout": 30, "bogus": 1}'])
def test_health_fails_on_a_garbled_status_file(status_file: Path, content: str) -> None:
    status_file.write_text(content)
    healthy, reason = check_health(str(status_file), ready=False)
    assert not healthy
    assert reason.startswith("no supervisor status")


def test_health_fails_when_the_status_is_stale(status_file: Path) -> None:
    _write(status_file, _status())
    # heartbeat_timeout (30) + 5 seconds of grace
    assert check_health(str(status_file), ready=False, now=1_000_034.0)[0] is True
    healthy, reason = check_health(str(status_file), ready=False, now=1_000_036.0)
    assert not healthy
    assert reason == "supervisor status is 36s old (pid 100 stuck or gone)"


def test_health_ages_the_status_on_the_monotonic_clock(
        status_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(status_file, _status(updated_monotonic=500.0))
    # The wall clock jumped an hour ahead since the write: still fresh.
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0 + 3600)
    assert check_health(str(status_file), ready=False, monotonic_now=501.0)[0] is True
    healthy, reason = check_health(str(status_file), ready=False, monotonic_now=536.0)
    assert not healthy
    assert reason == "supervisor status is 36s old (pid 100 stuck or gone)"


def test_health_fails_while_stopping(status_file: Path) -> None:
    _write(status_file, _status(state="stopping"))
    assert check_health(str(status_file), ready=False, now=1_000_001.0) == (
        False, "supervisor is stopping")


def test_health_names_children_that_do_not_beat(status_file: Path) -> None:
    _write(status_file, _status(children=[ChildStatus(1, 101, "ready", 0.2),
                                          ChildStatus(2, 102, "ready", 31.0)]))
    healthy, reason = check_health(str(status_file), ready=False, now=1_000_001.0)
    assert not healthy
    assert reason == "children not beating: child 2 (pid 102) 31s"


def test_readiness_needs_every_target_child_consuming(status_file: Path) -> None:
    _write(status_file, _status(children=[ChildStatus(1, 101, "ready", 0.2),
                                          ChildStatus(2, 102, "starting", 0.3)]))
    assert check_health(str(status_file), ready=False, now=1_000_001.0)[0] is True
    assert check_health(str(status_file), ready=True, now=1_000_001.0) == (
        False, "1/2 children consuming")
    _write(status_file, _status(target=3))
    assert check_health(str(status_file), ready=True, now=1_000_001.0) == (
        False, "2/3 children consuming")


def test_a_child_waiting_for_the_broker_is_alive_but_not_ready(status_file: Path) -> None:
    _write(status_file, _status(children=[ChildStatus(1, 101, "waiting for broker", 0.2, 95.4),
                                          ChildStatus(2, 102, "waiting for broker", 0.3, 12.0)]))
    assert check_health(str(status_file), ready=False, now=1_000_001.0) == (
        True, "ok: 2 children (1:waiting for broker, 2:waiting for broker)")
    assert check_health(str(status_file), ready=True, now=1_000_001.0) == (
        False, "0/2 children consuming; broker unreachable for 95s (child 1, child 2)")


def test_a_status_file_without_broker_down_still_reads(status_file: Path) -> None:
    status_file.write_text(json.dumps({
        "pid": 1, "state": "running", "target": 1, "heartbeat_timeout": 30, "updated": 5.0,
        "children": [{"index": 1, "pid": 2, "state": "ready", "beat_age": 0.5}]}))
    assert read_status(str(status_file)).children == [ChildStatus(1, 2, "ready", 0.5)]


# --- describe_exit --------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "text"), [
    (0, "exit code 0 (ok)"),
    (exitcodes.RECYCLE, "exit code 6 (recycle)"),
    (exitcodes.BROKER_LOST, "exit code 5 (broker connection lost)"),
    (exitcodes.INTERNAL_ERROR, "exit code 70 (internal error)"),
    (9, "exit code 9 (unknown)"),
    (-signal.SIGKILL, "killed by SIGKILL"),
    (-signal.SIGTERM, "killed by SIGTERM"),
    (-signal.SIGSEGV, "killed by SIGSEGV"),
    (-200, "killed by signal 200"),
    # a child still importing the app when the supervisor asked it to stop
    (-STOP_SIGNAL, "killed by SIGRTMIN+3 (the supervisor's stop request)"),
])
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code) == text


def test_exit_codes_are_distinct_and_named() -> None:
    codes = [exitcodes.OK, exitcodes.UNHEALTHY, exitcodes.USAGE_ERROR, exitcodes.APP_LOAD_ERROR,
             exitcodes.STARTUP_ERROR, exitcodes.BROKER_LOST, exitcodes.RECYCLE,
             exitcodes.CRASH_LOOP, exitcodes.INTERNAL_ERROR]
    assert len(set(codes)) == len(codes)
    for code in codes:
        if code != exitcodes.UNHEALTHY:  # the probe's code: never a process exit to describe
            assert code in exitcodes.NAMES


# --- heartbeat files --------------------------------------------------------------------------

@pytest.fixture
def beat(tmp_path: Path) -> Iterator[heartbeat.HeartbeatFile]:
    beat = heartbeat.HeartbeatFile(str(tmp_path))
    try:
        yield beat
    finally:
        beat.close()


def test_heartbeat_starts_as_starting_and_fresh(beat: heartbeat.HeartbeatFile,
                                                tmp_path: Path) -> None:
    assert Path(beat.path).parent == tmp_path
    assert Path(beat.path).name.startswith("beat-")
    state, age = beat.read()
    assert state == "starting"
    assert 0.0 <= age < 2.0


@pytest.mark.parametrize(("byte", "name"), [(heartbeat.STARTING, "starting"),
                                            (heartbeat.READY, "ready"),
                                            (heartbeat.STOPPING, "stopping"),
                                            (heartbeat.WAITING, "waiting for broker")])
def test_heartbeat_records_the_state(beat: heartbeat.HeartbeatFile, byte: str,
                                     name: str) -> None:
    beat.beat(byte)
    assert beat.read()[0] == name
    assert Path(beat.path).read_bytes()[:1] == byte.encode()


def test_heartbeat_unknown_or_truncated_state_reads_as_starting(
        beat: heartbeat.HeartbeatFile) -> None:
    beat.beat("zebra")  # one byte of state only is written
    assert Path(beat.path).read_bytes()[:1] == b"z"
    assert beat.read()[0] == "starting"
    os.ftruncate(beat.fd, 0)
    assert beat.read() == ("starting", 0.0)


def test_heartbeat_age_is_on_the_monotonic_clock(beat: heartbeat.HeartbeatFile) -> None:
    beat.beat(heartbeat.READY)
    now = time.monotonic()
    state, age = beat.read(now + 42)
    assert state == "ready"
    assert 42.0 <= age < 44.0
    beat.beat(heartbeat.READY)
    assert beat.read()[1] < 1.0
    assert beat.read(now - 100)[1] == 0.0  # never negative


def test_a_wall_clock_step_does_not_age_a_heartbeat(beat: heartbeat.HeartbeatFile,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTP step or ``date -s``: the wall clock and the file's mtime jump by an hour both
    ways; the beat's age does not move (it used to be ``time.time() - st_mtime``)."""
    beat.beat(heartbeat.READY)
    for step in (3600.0, -3600.0):
        wall = time.time()
        monkeypatch.setattr(time, "time", lambda wall=wall, step=step: wall + step)
        os.utime(beat.path, (wall - step, wall - step))
        state, age = beat.read()
        assert (state, age < 1.0) == ("ready", True)
        monkeypatch.undo()


def test_heartbeat_carries_how_long_the_broker_is_gone(beat: heartbeat.HeartbeatFile) -> None:
    now = time.monotonic()
    beat.beat(heartbeat.WAITING, broker_lost_since=now - 95)
    reading = beat.read_beat(now)
    assert reading.state == "waiting for broker"
    assert 95.0 <= reading.broker_down < 96.0  # type: ignore[operator]
    beat.beat(heartbeat.READY)
    assert beat.read_beat().broker_down is None


def test_heartbeat_is_shared_through_the_descriptor(beat: heartbeat.HeartbeatFile) -> None:
    # The child writes through the descriptor it inherited; the parent reads its own.
    other_fd = os.open(beat.path, os.O_RDWR)
    other = heartbeat.HeartbeatFile.__new__(heartbeat.HeartbeatFile)
    other.fd = other_fd
    try:
        other.beat(heartbeat.READY)
    finally:
        os.close(other_fd)
    assert beat.read()[0] == "ready"


def test_heartbeat_close_removes_the_file_and_is_idempotent(tmp_path: Path) -> None:
    beat = heartbeat.HeartbeatFile(str(tmp_path))
    beat.close()
    assert not os.path.exists(beat.path)
    beat.close()
    assert os.listdir(tmp_path) == []


# --- the supervisor's bookkeeping (no process is forked) ---------------------------------------

def _supervisor(processes: int = 2, **options: object) -> Supervisor:
    spec = ChildSpec(app_spec="proj.tasks:app", worker=WorkerOptions(), loglevel="INFO",
                     log_config=False, processes=processes)
    sup = Supervisor(SupervisorOptions(spec=spec, processes=processes, **options))  # type: ignore[arg-type]
    sup.notifier = Notifier({})
    return sup


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fake ``time.monotonic`` for the arbiter (``clock.now`` is the time)."""
    fake = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(arbiter, "time", SimpleNamespace(monotonic=lambda: fake.now,
                                                         time=time.time))
    return fake


def _record(tmp_path: Path, index: int, pid: int) -> Child:
    return Child(index=index, pid=pid, beat=heartbeat.HeartbeatFile(str(tmp_path)))


def test_recycled_or_retired_children_are_not_crashes(tmp_path: Path, clock: SimpleNamespace,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    sup = _supervisor()
    caplog.set_level(logging.INFO, logger="aio_celery.supervisor")
    sup._on_child_exit(_record(tmp_path, 1, 11), exitcodes.RECYCLE, "ready")
    retiring = _record(tmp_path, 2, 12)
    retiring.retiring = True
    sup._on_child_exit(retiring, -signal.SIGKILL, "ready")
    killed = _record(tmp_path, 2, 13)
    killed.killed = True
    sup._on_child_exit(killed, -signal.SIGKILL, "ready")
    assert not sup._crashes and sup._stopping is None
    assert "child 1 (pid 11) recycled (exit code 6 (recycle)): replacing it" in caplog.text
    assert "child 2 (pid 12) exited: killed by SIGKILL" in caplog.text


def test_sigkill_is_a_crash_with_an_out_of_memory_hint(
        tmp_path: Path, clock: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    sup = _supervisor()
    sup._on_child_exit(_record(tmp_path, 1, 21), -signal.SIGKILL, "ready")
    assert len(sup._crashes) == 1 and sup._stopping is None
    assert "child 1 (pid 21) killed by SIGKILL: out of memory?" in caplog.text
    assert sup._respawn_at <= clock.now  # the first crash is replaced at once


def test_startup_error_before_any_child_was_ready_stops_with_that_code(
        tmp_path: Path, clock: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    sup = _supervisor()
    sup._on_child_exit(_record(tmp_path, 1, 31), exitcodes.STARTUP_ERROR, "ready")
    assert sup._stopping == "warm"
    assert sup._exit_code == exitcodes.STARTUP_ERROR
    assert "failed to start" in caplog.text


def test_startup_error_after_a_child_was_ready_is_only_a_crash(
        tmp_path: Path, clock: SimpleNamespace) -> None:
    sup = _supervisor()
    sup._ever_ready = True
    sup._on_child_exit(_record(tmp_path, 1, 41), exitcodes.STARTUP_ERROR, "ready")
    assert sup._stopping is None and len(sup._crashes) == 1


def test_crash_backoff_grows(clock: SimpleNamespace) -> None:
    sup = _supervisor()
    delays = []
    for _ in range(4):
        sup._record_crash()
        delays.append(round(sup._respawn_at - clock.now, 3))
    assert delays[0] <= 0.0
    assert delays[1:] == [0.5, 1.0, 2.0]


def test_more_crashes_than_the_cap_within_the_window_stop_with_crash_loop(
        clock: SimpleNamespace) -> None:
    sup = _supervisor(max_crashes=3, crash_window=60.0)
    for _ in range(3):
        sup._record_crash()
        clock.now += 1
    assert sup._stopping is None
    sup._record_crash()
    assert sup._stopping == "warm" and sup._exit_code == exitcodes.CRASH_LOOP


def test_crashes_outside_the_window_are_forgotten(clock: SimpleNamespace) -> None:
    sup = _supervisor(max_crashes=3, crash_window=10.0)
    for _ in range(3):
        sup._record_crash()
        clock.now += 6
    sup._record_crash()
    assert sup._stopping is None
    assert len(sup._crashes) == 2


def _simulate_crash_loop(sup: Supervisor, clock: SimpleNamespace, processes: int,
                         start_to_crash: float, horizon: float) -> float | None:
    """Children that die ``start_to_crash`` seconds after every start, as the main loop
    would see them (reap, record the crash, respawn once the backoff allows, every TICK).
    Returns the seconds until the supervisor gave up, or None within ``horizon``."""
    began = clock.now
    dies_at = {index: clock.now + start_to_crash for index in range(1, processes + 1)}
    while clock.now - began < horizon:
        clock.now += arbiter.TICK
        for index, when in list(dies_at.items()):
            if when <= clock.now:
                del dies_at[index]
                sup._record_crash()
                if sup._stopping:
                    return clock.now - began
        if clock.now >= sup._respawn_at:
            for index in range(1, processes + 1):
                dies_at.setdefault(index, clock.now + start_to_crash)
    return None


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_children_crashing_at_every_start_are_detected_within_the_crash_window(
        clock: SimpleNamespace, processes: int) -> None:
    """``max_crashes`` (10) crashes within ``crash_window`` (60 s) must stay reachable for a
    child that dies 0.5 s after each start, whatever the number of children: otherwise the
    supervisor retries forever and never exits CRASH_LOOP for systemd/Kubernetes to act."""
    sup = _supervisor(processes=processes)
    gave_up_after = _simulate_crash_loop(sup, clock, processes, start_to_crash=0.5,
                                         horizon=300.0)
    assert gave_up_after is not None, (
        f"with {processes} child(ren) crashing on every start the supervisor never gave up "
        f"in 300 s ({len(sup._crashes)} crashes in the window at the end)")
    assert gave_up_after <= sup.options.crash_window
    assert sup._exit_code == exitcodes.CRASH_LOOP


# --- heartbeat checks: monotonic ages, start-up limit, waiting for the broker ----------------

@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The signals the arbiter sends (recorded instead of sent)."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(arbiter, "_kill", lambda pid, signum: sent.append((pid, signum)))
    return sent


def test_a_wall_clock_step_kills_no_child(tmp_path: Path, kills: list[tuple[int, int]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sup = _supervisor(heartbeat_timeout=3.0)
    record = _record(tmp_path, 1, 11)
    record.started -= 100  # long since started
    sup.children[record.pid] = record
    record.beat.beat(heartbeat.READY)
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 3600)  # the wall clock jumps an hour
    os.utime(record.beat.path, (wall - 3600, wall - 3600))
    sup._check_heartbeats(time.monotonic())
    assert kills == []
    assert not record.killed
    # ... while a beat that really is old (on the monotonic clock) is noticed.
    sup._check_heartbeats(time.monotonic() + 4)
    assert kills == [(11, signal.SIGUSR2)]
    assert record.killed


def test_a_child_waiting_for_the_broker_is_not_killed_for_a_slow_start(
        tmp_path: Path, kills: list[tuple[int, int]],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aio_celery.supervisor")
    sup = _supervisor(startup_timeout=10.0, heartbeat_timeout=3.0)
    record = _record(tmp_path, 1, 11)
    sup.children[record.pid] = record
    # Forked two minutes ago, waiting for the broker since, beating all along.
    record.started -= 120
    record.startup_since -= 120
    record.beat.beat(heartbeat.WAITING, broker_lost_since=time.monotonic() - 120)
    sup._check_heartbeats(time.monotonic())
    assert kills == []
    # The broker is back: the child declares its queues; the start-up limit counts from the
    # end of the wait, not from the fork.
    record.beat.beat(heartbeat.STARTING)
    sup._check_heartbeats(time.monotonic())
    assert kills == []
    assert sup._crashes == deque()
    record.startup_since -= 11  # ... and 11 s later it still does not consume
    record.beat.beat(heartbeat.STARTING)
    sup._check_heartbeats(time.monotonic())
    assert kills == [(11, signal.SIGUSR2)]
    assert "did not start consuming within 10s" in caplog.text


def test_a_child_killed_for_a_slow_start_counts_as_a_crash(
        tmp_path: Path, kills: list[tuple[int, int]],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aio_celery.supervisor")
    sup = _supervisor(startup_timeout=5.0, heartbeat_timeout=3.0)
    record = _record(tmp_path, 1, 11)
    sup.children[record.pid] = record
    record.started -= 6
    record.startup_since -= 6
    record.beat.beat(heartbeat.STARTING)  # beating, never consuming
    sup._check_heartbeats(time.monotonic())
    assert kills == [(11, signal.SIGUSR2)]
    assert len(sup._crashes) == 1
    assert "did not start consuming within 5s (--startup-timeout)" in caplog.text


def test_a_stopping_child_is_replaced_early_except_in_burst_mode(tmp_path: Path) -> None:
    """A child that says "stopping" (recycling) gets its replacement before it exits; in
    burst mode a stopping child has drained its queues and must not get one (it used to, when
    its exit was reaped one loop turn after a sibling's)."""
    normal = _supervisor()
    burst_spec = ChildSpec(app_spec="proj.tasks:app", worker=WorkerOptions(burst=True),
                           loglevel="INFO", log_config=False, processes=2)
    burst = Supervisor(SupervisorOptions(spec=burst_spec, processes=2))
    for sup in (normal, burst):
        for index in (1, 2):
            record = _record(tmp_path, index, 100 + index)
            record.beat.beat(heartbeat.READY if index == 1 else heartbeat.STOPPING)
            sup.children[record.pid] = record
    assert normal._missing_slots() == [2]
    assert burst._missing_slots() == []
