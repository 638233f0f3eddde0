"""The supervisor's pure pieces: sd_notify messages, the status file and the health check,
exit descriptions, heartbeat files, the verdict on a child's exit and the crash window (no
fork, no broker), the heartbeat checks (on ``sleep`` processes); and
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from aio_celery import exitcodes
from aio_celery.worker.options import WorkerOptions
from supervisor import arbiter, heartbeat
from supervisor import metrics as restarts
from supervisor.arbiter import Supervisor, SupervisorOptions
from supervisor.child import STOP_SIGNAL, Child, ChildSpec
from supervisor.exits import (
    Crash,
    CrashWindow,
    ExitVerdict,
    classify_exit,
    describe_exit,
    exit_log_line,
    restart_cause,
)
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


# --- the supervisor (constructed, never run: no process is forked) -------------------------

def _supervisor(processes: int = 2, **options: object) -> Supervisor:
    spec = ChildSpec(app_spec="proj.tasks:app", worker=WorkerOptions(), loglevel="INFO",
                     log_config=False, processes=processes)
    sup = Supervisor(SupervisorOptions(spec=spec, processes=processes, **options))  # type: ignore[arg-type]
    sup.notifier = Notifier({})
    return sup


def _record(tmp_path: Path, index: int, pid: int) -> Child:
    return Child(index=index, pid=pid, beat=heartbeat.HeartbeatFile(str(tmp_path)))


# --- the verdict on a child's exit (supervisor.exits) -----------------------------------------

def _verdict(code: int, last_state: str = "ready", *, asked_to_stop: bool = False,
             burst: bool = False, ever_ready: bool = False) -> ExitVerdict:
    return classify_exit(code, last_state, asked_to_stop=asked_to_stop, burst=burst,
                         ever_ready=ever_ready)


def test_recycled_or_retired_children_are_not_crashes() -> None:
    recycled = _verdict(exitcodes.RECYCLE)
    retired = _verdict(-signal.SIGKILL, asked_to_stop=True)  # retiring, or killed by us
    assert (recycled, retired) == (ExitVerdict.RECYCLED, ExitVerdict.RETIRED)
    assert not recycled.is_crash and not retired.is_crash
    assert exit_log_line(recycled, 1, 11, exitcodes.RECYCLE).text() == \
        "child 1 (pid 11) recycled (exit code 6 (recycle)): replacing it"
    assert exit_log_line(retired, 2, 12, -signal.SIGKILL).text() == \
        "child 2 (pid 12) exited: killed by SIGKILL"
    assert restart_cause(recycled, None) == restarts.RECYCLED
    # Retired: the cause the supervisor noted (None: shut down or scaled down, not replaced)
    assert restart_cause(retired, restarts.HEARTBEAT_TIMEOUT) == restarts.HEARTBEAT_TIMEOUT
    assert restart_cause(retired, None) is None


def test_whatever_the_code_a_child_we_stopped_is_retired() -> None:
    for code in (exitcodes.OK, exitcodes.RECYCLE, exitcodes.STARTUP_ERROR, -signal.SIGKILL):
        assert _verdict(code, "stopping", asked_to_stop=True) is ExitVerdict.RETIRED


def test_sigkill_is_a_crash_with_an_out_of_memory_hint() -> None:
    verdict = _verdict(-signal.SIGKILL)
    assert verdict is ExitVerdict.CRASHED and verdict.is_crash
    line = exit_log_line(verdict, 1, 21, -signal.SIGKILL)
    assert (line.level, line.text()) == (
        logging.ERROR, "child 1 (pid 21) killed by SIGKILL: out of memory?")
    assert exit_log_line(verdict, 1, 21, -signal.SIGSEGV).text() == \
        "child 1 (pid 21) killed by SIGSEGV"
    assert restart_cause(verdict, None) == restarts.CRASH


def test_startup_error_before_any_child_was_ready_stops_with_that_code() -> None:
    for code in (exitcodes.STARTUP_ERROR, exitcodes.APP_LOAD_ERROR):
        verdict = _verdict(code)
        assert verdict is ExitVerdict.STARTUP_FAILED and not verdict.is_crash
        assert restart_cause(verdict, None) is None  # nothing replaces it: all stop
    assert exit_log_line(ExitVerdict.STARTUP_FAILED, 1, 31, exitcodes.STARTUP_ERROR).text() \
        == ("child 1 (pid 31) failed to start (exit code 4 (start-up error)) and no child "
            "ever started: stopping, check the error above")


def test_startup_error_after_a_child_was_ready_is_only_a_crash() -> None:
    verdict = _verdict(exitcodes.STARTUP_ERROR, ever_ready=True)
    assert verdict is ExitVerdict.CRASHED and verdict.is_crash


def test_other_error_codes_are_crashes_even_before_any_child_was_ready() -> None:
    for code in (exitcodes.BROKER_LOST, exitcodes.INTERNAL_ERROR, 9, -signal.SIGSEGV):
        assert _verdict(code) is ExitVerdict.CRASHED


def test_a_child_exiting_0_by_itself_is_a_crash() -> None:
    verdict = _verdict(exitcodes.OK, "ready")
    assert verdict is ExitVerdict.UNASKED and verdict.is_crash
    assert restart_cause(verdict, None) == restarts.CRASH
    line = exit_log_line(verdict, 2, 401, exitcodes.OK)
    assert (line.level, line.text()) == (
        logging.ERROR, "child 2 (pid 401) exited by itself (exit code 0 (ok)) without being "
        "asked to: a crash")


def test_a_child_exiting_0_after_its_own_shutdown_is_no_crash() -> None:
    """Signalled directly (kill <pid>), or reached by the user's group-wide stop before
    the supervisor acted on its own copy: the child went through its shutdown (its last beat
    says "stopping"), so its exit 0 is no crash; it is replaced."""
    verdict = _verdict(exitcodes.OK, "stopping")
    assert verdict is ExitVerdict.SIGNALLED and not verdict.is_crash
    assert restart_cause(verdict, None) == restarts.SIGNALLED
    line = exit_log_line(verdict, 2, 402, exitcodes.OK)
    assert (line.level, line.text()) == (
        logging.WARNING, "child 2 (pid 402) stopped on a signal sent to it, not by the "
        "supervisor (exit code 0 (ok)): replacing it")


def test_in_burst_mode_exit_0_means_drained_and_not_replaced() -> None:
    for last_state in ("ready", "stopping"):
        verdict = _verdict(exitcodes.OK, last_state, burst=True)
        assert verdict is ExitVerdict.DRAINED and not verdict.is_crash
        assert restart_cause(verdict, None) is None
    assert exit_log_line(ExitVerdict.DRAINED, 3, 7, exitcodes.OK).text() == \
        "child 3 (pid 7) drained its queues (burst mode): not replaced"
    # A crash in burst mode is still a crash
    assert _verdict(-signal.SIGKILL, burst=True) is ExitVerdict.CRASHED


# --- the crash window: backoff and the crash-loop cap -----------------------------------------

class FakeClock:
    """A monotonic clock that moves only when told (``clock.now``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_crash_is_replaced_at_once() -> None:
    clock = FakeClock()
    window = CrashWindow(max_crashes=10, window=60.0, clock=clock)
    assert window.record() == Crash(count=1, delay=0.0, give_up=False)
    assert window.respawn_at <= clock.now and window.may_respawn(clock.now)


def test_crash_backoff_grows() -> None:
    clock = FakeClock()
    window = CrashWindow(max_crashes=10, window=60.0, clock=clock)
    delays = []
    for _ in range(4):
        crash = window.record()
        assert window.respawn_at == clock.now + crash.delay  # the clock stands still here
        delays.append(crash.delay)
    assert delays == [0.0, 0.5, 1.0, 2.0]
    assert not window.may_respawn(clock.now + 1.9) and window.may_respawn(clock.now + 2.0)


def test_the_backoff_is_capped_so_that_the_cap_stays_reachable() -> None:
    # window / (2 * (max_crashes + 1)) = 60 / 22: under the doubling from the 4th crash on
    window = CrashWindow(max_crashes=10, window=60.0, clock=FakeClock())
    delays = [window.record().delay for _ in range(10)]
    assert delays[:4] == [0.0, 0.5, 1.0, 2.0]
    assert delays[4:] == [60.0 / 22] * 6


def test_more_crashes_than_the_cap_within_the_window_give_up() -> None:
    clock = FakeClock()
    window = CrashWindow(max_crashes=3, window=60.0, clock=clock)
    for _ in range(3):
        assert not window.record().give_up
        clock.now += 1
    crash = window.record()
    assert crash.give_up and crash.count == 4


def test_crashes_outside_the_window_are_forgotten() -> None:
    clock = FakeClock()
    window = CrashWindow(max_crashes=3, window=10.0, clock=clock)
    for _ in range(3):
        window.record()
        clock.now += 6
    assert not window.record().give_up
    assert window.count == 2


def _simulate_crash_loop(window: CrashWindow, clock: FakeClock, processes: int,
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
                if window.record().give_up:
                    return clock.now - began
        if window.may_respawn(clock.now):
            for index in range(1, processes + 1):
                dies_at.setdefault(index, clock.now + start_to_crash)
    return None


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_children_crashing_at_every_start_are_detected_within_the_crash_window(
        processes: int) -> None:
    """``max_crashes`` (10) crashes within ``crash_window`` (60 s) must stay reachable for a
    child that dies 0.5 s after each start, whatever the number of children: otherwise the
    supervisor retries forever and never exits CRASH_LOOP for systemd/Kubernetes to act."""
    options = _supervisor(processes=processes).options  # the defaults
    clock = FakeClock()
    window = CrashWindow(options.max_crashes, options.crash_window, clock=clock)
    gave_up_after = _simulate_crash_loop(window, clock, processes, start_to_crash=0.5,
                                         horizon=300.0)
    assert gave_up_after is not None, (
        f"with {processes} child(ren) crashing on every start the supervisor never gave up "
        f"in 300 s ({window.count} crashes in the window at the end)")
    assert gave_up_after <= options.crash_window


# --- heartbeat checks: monotonic ages, start-up limit, waiting for the broker ----------------
# The children are real processes (``sleep``): a stale one gets the stack-dump signal, whose
# default action ends a process that does not handle it.

@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process to stand for a child; its exit tells which signal the supervisor sent."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _signalled_with(process: subprocess.Popen[bytes]) -> int:
    """The signal that ended ``process`` (it must end within seconds)."""
    return -process.wait(timeout=5)


def test_a_wall_clock_step_kills_no_child(tmp_path: Path, sleeper: subprocess.Popen[bytes],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sup = _supervisor(heartbeat_timeout=3.0)
    record = _record(tmp_path, 1, sleeper.pid)
    record.started -= 100  # long since started
    sup.children[record.pid] = record
    record.beat.beat(heartbeat.READY)
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 3600)  # the wall clock jumps an hour
    os.utime(record.beat.path, (wall - 3600, wall - 3600))
    sup.check_heartbeats(time.monotonic())
    assert not record.killed
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.2)
    # ... while a beat that really is old (on the monotonic clock) is noticed.
    sup.check_heartbeats(time.monotonic() + 4)
    assert record.killed
    assert _signalled_with(sleeper) == signal.SIGUSR2


def test_a_child_waiting_for_the_broker_is_not_killed_for_a_slow_start(
        tmp_path: Path, sleeper: subprocess.Popen[bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aio_celery.supervisor")
    sup = _supervisor(startup_timeout=10.0, heartbeat_timeout=3.0)
    record = _record(tmp_path, 1, sleeper.pid)
    sup.children[record.pid] = record
    # Forked two minutes ago, waiting for the broker since, beating all along.
    record.started -= 120
    record.startup_since -= 120
    record.beat.beat(heartbeat.WAITING, broker_lost_since=time.monotonic() - 120)
    sup.check_heartbeats(time.monotonic())
    assert not record.killed
    # The broker is back: the child declares its queues; the start-up limit counts from the
    # end of the wait, not from the fork.
    record.beat.beat(heartbeat.STARTING)
    sup.check_heartbeats(time.monotonic())
    assert not record.killed
    assert sup.crashes.count == 0
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.2)
    record.startup_since -= 11  # ... and 11 s later it still does not consume
    record.beat.beat(heartbeat.STARTING)
    sup.check_heartbeats(time.monotonic())
    assert record.killed
    assert _signalled_with(sleeper) == signal.SIGUSR2
    assert "did not start consuming within 10s" in caplog.text


def test_a_child_killed_for_a_slow_start_counts_as_a_crash(
        tmp_path: Path, sleeper: subprocess.Popen[bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aio_celery.supervisor")
    sup = _supervisor(startup_timeout=5.0, heartbeat_timeout=3.0)
    record = _record(tmp_path, 1, sleeper.pid)
    sup.children[record.pid] = record
    record.started -= 6
    record.startup_since -= 6
    record.beat.beat(heartbeat.STARTING)  # beating, never consuming
    sup.check_heartbeats(time.monotonic())
    assert _signalled_with(sleeper) == signal.SIGUSR2
    assert sup.crashes.count == 1
    assert "did not start consuming within 5s (--startup-timeout)" in caplog.text


def test_too_many_slow_starts_make_the_supervisor_give_up_with_crash_loop(
        tmp_path: Path, sleeper: subprocess.Popen[bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    sup = _supervisor(startup_timeout=5.0, heartbeat_timeout=3.0, max_crashes=0)
    record = _record(tmp_path, 1, sleeper.pid)
    sup.children[record.pid] = record
    record.started -= 6
    record.startup_since -= 6
    sup.check_heartbeats(time.monotonic())
    assert _signalled_with(sleeper) == signal.SIGUSR2
    assert (sup.stopping, sup.exit_code) == ("warm", exitcodes.CRASH_LOOP)
    assert "1 crashes within 60s: giving up, stopping everything (exit 7)" in caplog.text


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
    assert normal.missing_slots() == [2]
    assert burst.missing_slots() == []
