"""``python -m aio_celery worker -c N``: the supervisor and its children as real processes.

Real forks, real signals, real RabbitMQ and Redis. Every supervisor runs in a process group
of its own with stderr (its own log and its children's) written to a file; the whole group
is SIGKILLed at the end of the test whatever happened. Signals go to the supervisor's pid
only (as systemd or an operator would send them), or to one child when a test says so.

The tasks (``tests.process.sup_tasks``) record in Redis which pid started and completed each
task id and how often it completed, so that "nothing lost, nothing run twice" is checked
against the ids the test published.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import AMQP_URL, queue_depth

from aio_celery import Celery, exitcodes

ROOT = Path(__file__).resolve().parents[2]
APP_SPEC = "tests.process.sup_tasks:app"
START_DEADLINE = 30.0


# --- helpers ---------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], deadline: float, what: str,
               diagnostics: Callable[[], str] = lambda: "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail at the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline}s waiting until {what}\n{diagnostics()}",
                        pytrace=False)
        time.sleep(0.05)


def sup_env(queue: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {"AIO_CELERY_SUP_BROKER": AMQP_URL, "AIO_CELERY_SUP_BACKEND": redis_url,
            "AIO_CELERY_SUP_QUEUE": queue, **extra}


def child_env(env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    full["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH"), os.environ.get("PYTHONPATH")]))
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        if name not in env:
            full.pop(name, None)
    return full


class Supervised:
    """One ``aio_celery worker -c N`` process (the supervisor) in a process group of its own."""

    def __init__(self, tmp_path: Path, queue: str, redis_url: str, *extra: str,
                 processes: int = 2, concurrency: int = 5, heartbeat_timeout: float = 30,
                 shutdown_timeout: float = 20, env: dict[str, str] | None = None,
                 app_spec: str = APP_SPEC) -> None:
        tag = uuid.uuid4().hex[:8]
        self.log_path = tmp_path / f"supervisor-{tag}.log"
        self.status_path = tmp_path / f"status-{tag}.json"
        self.args = ["worker", "-c", str(processes), "--concurrency", str(concurrency),
                     "-Q", queue, "--status-file", str(self.status_path),
                     "--heartbeat-timeout", str(heartbeat_timeout),
                     "--shutdown-timeout", str(shutdown_timeout), *extra, app_spec]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aio_celery", *self.args], cwd=ROOT,
                env=child_env({**sup_env(queue, redis_url), **(env or {})}),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.pid = self.process.pid

    # -- observation --

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def diagnostics(self) -> str:
        return (f"--- status ---\n{self.status()}\n"
                f"--- supervisor log (tail) ---\n{self.log[-8000:]}")

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def children(self) -> list[dict[str, Any]]:
        status = self.status()
        return [] if status is None else list(status["children"])

    def pids_by_index(self) -> dict[int, int]:
        return {child["index"]: child["pid"] for child in self.children()}

    def all_ready(self, count: int) -> bool:
        """The status file shows ``count`` children, every one consuming."""
        status = self.status()
        if status is None or status["target"] != count or status["state"] != "running":
            return False
        kids = status["children"]
        return len(kids) == count and all(child["state"] == "ready" for child in kids)

    def wait_ready(self, count: int, deadline: float = START_DEADLINE) -> dict[int, int]:
        def ready() -> bool:
            self.assert_running()
            return self.all_ready(count)

        wait_until(ready, deadline, f"{count} children are consuming", self.diagnostics)
        return self.pids_by_index()

    def assert_running(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the supervisor exited with {self.process.returncode}\n"
                        f"{self.diagnostics()}", pytrace=False)

    def wait_for_log(self, pattern: str, deadline: float = START_DEADLINE) -> re.Match[str]:
        regex = re.compile(pattern)
        return wait_until(lambda: regex.search(self.log), deadline,
                          f"the log matches {pattern!r}", self.diagnostics)

    # -- control --

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, deadline: float) -> int:
        try:
            return self.process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor did not exit within {deadline}s\n{self.diagnostics()}",
                        pytrace=False)

    def stop(self, deadline: float = 20) -> int:
        """Warm shutdown (SIGTERM) and the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(deadline)

    def kill(self) -> None:
        """SIGKILL the whole process group (every child included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


class Book:
    """What the tasks of one queue recorded in Redis (see ``sup_tasks``)."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client = client
        # as sup_tasks.keys() (not imported: it would connect receivers in this process)
        self.keys = {"started": f"{queue}:started", "done": f"{queue}:done",
                     "count": f"{queue}:count"}

    def started(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.client.hgetall(self.keys["started"]).items()}

    def done(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.client.hgetall(self.keys["done"]).items()}

    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.client.hgetall(self.keys["count"]).items()}

    def assert_exactly_once(self, ids: list[str]) -> None:
        counts = self.counts()
        assert set(counts) == set(ids), (
            f"lost: {sorted(set(ids) - set(counts))}, unknown: {sorted(set(counts) - set(ids))}")
        twice = {task_id: n for task_id, n in counts.items() if n != 1}
        assert not twice, f"tasks completed more than once: {twice}"
        assert set(self.done()) == set(ids)


def publish(queue: str, redis_url: str, calls: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    """Send ``(task name, args)`` calls to ``queue``; their ids, in order."""

    async def send() -> list[str]:
        client = Celery("sup-client", set_as_current=False)
        client.conf.update(broker_url=AMQP_URL, result_backend=redis_url,
                           task_default_queue=queue)
        async with client.setup():
            return [(await client.send_task(name, args)).id for name, args in calls]

    return asyncio.run(send())


def sleeps(count: int, seconds: float) -> list[tuple[str, tuple[Any, ...]]]:
    return [("sup.sleep", (seconds,))] * count


def lines_with(text: str, log: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def proc_title(pid: int) -> str:
    return subprocess.run(["ps", "-o", "cmd=", "-p", str(pid)], capture_output=True,
                          text=True, check=False).stdout.strip()


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def health(status_file: Path, *extra: str,
           python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "aio_celery", "health", "--status-file",
         str(status_file), *extra], cwd=ROOT, env=child_env({}), capture_output=True,
        text=True, timeout=30, check=False)


# --- 1. warm shutdown across children, then a burst worker finishes the rest -----------------

def test_sigterm_finishes_running_tasks_in_every_child_and_returns_the_rest(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    ids = publish(unique_name, redis_url, sleeps(60, 2.0))
    # 4 children x 5 running (+5 prefetched each): 20 run at once, 40 wait.
    sup = supervise("--prefetch-multiplier", "2", processes=4, concurrency=5,
                    shutdown_timeout=20)
    pids = sup.wait_ready(4)
    wait_until(lambda: len(book.started()) >= 20, 15, "20 tasks are running", sup.diagnostics)

    sent = time.monotonic()
    sup.signal(signal.SIGTERM)
    in_flight = set(book.started()) - set(book.done())
    assert sup.wait(20) == exitcodes.OK, sup.diagnostics()
    assert time.monotonic() - sent < 10, "the warm shutdown took too long"
    assert len(in_flight) >= 10, f"too few tasks in flight at SIGTERM: {len(in_flight)}"

    started, done = book.started(), book.done()
    # Every task that started finished (none was cancelled) ...
    assert set(started) == set(done), sorted(set(started) - set(done))
    assert in_flight <= set(done)
    # ... in every child ...
    assert set(started.values()) == set(pids.values()), (started, pids)
    # ... and the ones that never started are back in the queue.
    assert queue_depth(unique_name) == len(ids) - len(done)
    assert len(done) < len(ids)

    log = sup.log
    summaries = lines_with("Warm shutdown in", log)
    assert len(summaries) == 4, log
    assert all("0 cancelled" in line for line in summaries), summaries
    assert not lines_with("Cold shutdown", log), log
    assert not lines_with("Shutdown timeout", log), log
    assert "Traceback" not in log, log
    assert "Supervisor exiting with code 0" in log, log
    assert not sup.status_path.exists(), "the status file outlives the supervisor"

    # A second supervisor in burst mode runs the rest and exits once the queue is empty.
    rest = supervise("--burst", "--prefetch-multiplier", "1", processes=2, concurrency=25)
    assert rest.wait(30) == exitcodes.OK, rest.diagnostics()
    book.assert_exactly_once(ids)
    assert queue_depth(unique_name) == 0
    assert len(lines_with("drained its queues", rest.log)) == 2, rest.log


# --- 1b. one stop signal to the whole process group (Ctrl-C, KillMode=control-group) ----------

def stored_status(client: redis.Redis, task_id: str) -> str | None:
    raw = client.get(f"celery-task-meta-{task_id}")
    return None if raw is None else str(json.loads(raw)["status"])


def start_with_tasks_in_both_children(
        supervise: Callable[..., Supervised], queue: str, redis_url: str, book: Book,
        seconds: float) -> tuple[Supervised, list[str]]:
    """2 children x 2 running tasks of ``seconds``: the four ids, all running."""
    ids = publish(queue, redis_url, sleeps(4, seconds))
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=2)
    pids = sup.wait_ready(2)
    wait_until(lambda: len(book.started()) == 4 and set(book.started().values())
               == set(pids.values()), 15, "both children run two tasks", sup.diagnostics)
    return sup, ids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["sigterm-to-the-group", "ctrl-c-to-the-group"])
def test_one_stop_signal_to_the_process_group_is_one_warm_shutdown(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str, book: Book,
        redis_client: redis.Redis, signum: signal.Signals) -> None:
    """Every child gets the user's signal and the supervisor's stop request: that is one
    warm shutdown, not two signals (cold); every running task finishes and is stored."""
    sup, ids = start_with_tasks_in_both_children(supervise, unique_name, redis_url, book, 2.0)
    assert not book.done()
    os.killpg(sup.pid, signum)
    assert sup.wait(20) == exitcodes.OK, sup.diagnostics()

    book.assert_exactly_once(ids)
    assert {task_id: stored_status(redis_client, task_id) for task_id in ids} == dict.fromkeys(
        ids, "SUCCESS")
    assert queue_depth(unique_name) == 0
    log = sup.log
    summaries = lines_with("Warm shutdown in", log)
    assert len(summaries) == 2, log
    assert all(" 0 cancelled" in line for line in summaries), summaries
    assert not lines_with("Cold shutdown", log), log
    assert "Traceback" not in log, log


def test_a_second_ctrl_c_to_the_process_group_goes_cold(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str, book: Book,
        redis_client: redis.Redis) -> None:
    sup, ids = start_with_tasks_in_both_children(supervise, unique_name, redis_url, book, 60.0)
    os.killpg(sup.pid, signal.SIGINT)
    # Both children began their warm shutdown (the first Ctrl-C was handled by each) ...
    wait_until(lambda: len(lines_with("Waiting up to", sup.log)) == 2, 10,
               "both children wait for their tasks", sup.diagnostics)
    assert sup.process.poll() is None
    sent = time.monotonic()
    os.killpg(sup.pid, signal.SIGINT)  # ... and the second one goes cold
    assert sup.wait(15) == exitcodes.OK, sup.diagnostics()
    assert time.monotonic() - sent < 8, "a cold shutdown is quick"

    assert not book.done()
    assert all(stored_status(redis_client, task_id) is None for task_id in ids)
    assert queue_depth(unique_name) == 4  # every cancelled task's message is back
    log = sup.log
    summaries = lines_with("Cold shutdown in", log)
    assert len(summaries) == 2, log
    assert all("2 cancelled and returned" in line for line in summaries), summaries
    assert "Traceback" not in log, log


# --- 2. a child killed by SIGKILL is replaced and its messages redelivered -------------------

def test_sigkilled_child_is_replaced_and_its_tasks_redelivered(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    ids = publish(unique_name, redis_url, sleeps(10, 1.5))
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=3)
    pids = sup.wait_ready(2)
    wait_until(lambda: set(book.started().values()) == set(pids.values())
               and len(book.started()) >= 6, 15, "both children run tasks", sup.diagnostics)
    victim = pids[1]
    done_before = book.done()
    victims_tasks = {t for t, pid in book.started().items()
                     if pid == victim and t not in done_before}
    assert victims_tasks, "the victim runs nothing: the test would prove nothing"

    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replacement = wait_until(
        lambda: (sup.pids_by_index().get(1) not in (None, victim)
                 and sup.pids_by_index().get(1)), 3.5,
        "the status file shows a replacement for child 1", sup.diagnostics)
    assert time.monotonic() - killed_at < 3.5
    assert sup.pids_by_index()[2] == pids[2], "the other child was disturbed"
    assert alive(replacement)

    wait_until(lambda: len(book.done()) == len(ids), 20, "every task completed",
               sup.diagnostics)
    book.assert_exactly_once(ids)
    done = book.done()
    assert all(done[t] != victim for t in victims_tasks), (victims_tasks, done)
    log = sup.log
    assert re.search(rf"child 1 \(pid {victim}\) killed by SIGKILL", log), log
    assert f"Started child 1 (pid {replacement})" in log, log

    # A task that SIGKILLs its own child (on its first delivery): the same again.
    [crash_id] = publish(unique_name, redis_url, [("sup.crash", ())])
    wait_until(lambda: crash_id in book.done(), 15, "the crashing task completed on redelivery",
               sup.diagnostics)
    crasher = book.started()[crash_id]
    assert book.done()[crash_id] != crasher
    sup.wait_for_log(rf"child \d \(pid {crasher}\) killed by SIGKILL", 5)
    assert book.counts()[crash_id] == 1
    wait_until(lambda: sup.all_ready(2) and crasher not in sup.pids_by_index().values(), 10,
               "the crashed child is replaced", sup.diagnostics)
    assert sup.stop() == exitcodes.OK, sup.diagnostics()


def test_a_child_stopped_by_a_signal_of_its_own_finishes_and_is_replaced_no_crash(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    """``kill <child pid>`` (SIGTERM to one child, not the supervisor): the child finishes
    its tasks, exits 0 through its own shutdown, and is replaced; an exit 0 like this is no
    crash (one without a shutdown, a task's os._exit(0), is)."""
    ids = publish(unique_name, redis_url, sleeps(4, 1.5))
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=2)
    pids = sup.wait_ready(2)
    wait_until(lambda: len(book.started()) == 4, 15, "both children run tasks", sup.diagnostics)
    victim = pids[1]
    os.kill(victim, signal.SIGTERM)
    sup.wait_for_log(rf"child 1 \(pid {victim}\) stopped on a signal sent to it", 15)
    wait_until(lambda: sup.pids_by_index().get(1) not in (None, victim), 10,
               "child 1 replaced", sup.diagnostics)
    wait_until(lambda: len(book.done()) == len(ids), 15, "every task completed",
               sup.diagnostics)
    book.assert_exactly_once(ids)  # the victim finished its own: nothing ran twice
    assert "a crash" not in sup.log and "crashes within" not in sup.log, sup.log
    assert sup.stop() == exitcodes.OK, sup.diagnostics()


# --- 3. children that cannot start --------------------------------------------------------------

def test_app_context_failing_in_every_child_stops_with_startup_error(
        supervise: Callable[..., Supervised]) -> None:
    started = time.monotonic()
    sup = supervise(processes=2, env={"AIO_CELERY_SUP_CONTEXT_FAIL": "1"})
    assert sup.wait(20) == exitcodes.STARTUP_ERROR, sup.diagnostics()
    assert time.monotonic() - started < 20
    log = sup.log
    assert "app context refuses to start 5150" in log, log
    assert "failed to start" in log and "no child ever started" in log, log
    assert "Supervisor exiting with code 4" in log, log
    assert "crashes within" not in log, log  # no restart loop


def test_children_crashing_on_every_start_make_the_supervisor_give_up(
        supervise: Callable[..., Supervised]) -> None:
    """Every child exits with code 9 in ``worker_process_init`` (only the children: the
    parent's validation import is unaffected). The supervisor must give up in bounded time
    so that systemd or Kubernetes can take over."""
    started = time.monotonic()
    sup = supervise(processes=4, env={"AIO_CELERY_SUP_CHILD_EXIT": "9"})
    sup.wait_for_log(r"exit code 9", 15)
    code = sup.wait(20)
    assert code in (exitcodes.CRASH_LOOP, exitcodes.STARTUP_ERROR), sup.diagnostics()
    assert time.monotonic() - started < 22
    log = sup.log
    assert "giving up" in log or "failed to start" in log, log
    assert not lines_with("ready: consuming", log), log


def test_app_failing_to_import_exits_without_starting_children(
        supervise: Callable[..., Supervised], tmp_path: Path) -> None:
    module = f"broken_sup_tasks_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{module}.py").write_text(
        "raise RuntimeError('the tasks module is broken 8086')\n", encoding="utf-8")
    sup = supervise(processes=2, app_spec=f"{module}:app", env={"PYTHONPATH": str(code_dir)})
    assert sup.wait(20) == exitcodes.APP_LOAD_ERROR, sup.diagnostics()
    log = sup.log
    assert "RuntimeError: the tasks module is broken 8086" in log, log
    assert "could not be loaded" in log, log
    assert "Started child" not in log, log
    assert not sup.status_path.exists()


@pytest.mark.parametrize("pool", ["processes", "solo"])
def test_a_configuration_error_is_one_line_and_exit_4(
        supervise: Callable[..., Supervised], tmp_path: Path, pool: str) -> None:
    """result_backend set without redis-py installed: one clear line naming the fix, exit 4
    at once; not a traceback in every child and a crash loop (exit 7)."""
    module = f"no_redis_tasks_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{module}.py").write_text(
        "import os, sys\n"
        "sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "from aio_celery import Celery\n"
        "app = Celery('no_redis')\n"
        "app.conf.update(broker_url=os.environ['AIO_CELERY_SUP_BROKER'],\n"
        "                result_backend='redis://:s3cr3t@127.0.0.1:6379/0')\n",
        encoding="utf-8")
    started = time.monotonic()
    sup = supervise("-P", pool, processes=2, app_spec=f"{module}:app",
                    env={"PYTHONPATH": str(code_dir)})
    assert sup.wait(20) == exitcodes.STARTUP_ERROR, sup.diagnostics()
    assert time.monotonic() - started < 10, "a crash loop, or a slow one"
    log = sup.log
    errors = lines_with("pip install 'aio-celery[redis]'", log)
    assert len(errors) == 1, log
    assert "result_backend" in errors[0] and "configuration error" in errors[0], errors
    assert "Traceback" not in log, log
    assert "s3cr3t" not in log, log
    assert "Started child" not in log and "crashes within" not in log, log
    assert "ready: consuming" not in log, log


@pytest.mark.parametrize("pool", ["processes", "solo"])
def test_an_eta_horizon_past_the_unacked_max_age_is_one_line_and_exit_4(
        supervise: Callable[..., Supervised], pool: str) -> None:
    """An eta in memory could outlive worker_unacked_max_age (given back before it is
    due): refused before any child starts."""
    sup = supervise("-P", pool, "--eta-horizon", "900", "--unacked-max-age", "600",
                    processes=2)
    assert sup.wait(20) == exitcodes.STARTUP_ERROR, sup.diagnostics()
    log = sup.log
    errors = lines_with("--eta-horizon (900s) must be below worker_unacked_max_age (600s)", log)
    assert len(errors) == 1, log
    assert "configuration error" in errors[0] and "consumer_timeout" in errors[0], errors
    assert "Traceback" not in log, log
    assert "Started child" not in log and "ready: consuming" not in log, log


@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-to-the-supervisor", "ctrl-c-to-the-process-group"])
def test_a_stop_while_the_app_is_loading_stops_at_once(
        supervise: Callable[..., Supervised], tmp_path: Path, signum: signal.Signals,
        to_group: bool) -> None:
    """A pod deleted while a slow app import runs must not wait for the import; Ctrl-C
    (which reaches the importing child too) is a stop, not an app that failed to load."""
    module = f"slow_sup_tasks_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    started = tmp_path / "import-started"
    (code_dir / f"{module}.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(started)!r}).write_text('yes')\n"
        "time.sleep(60)\n", encoding="utf-8")
    sup = supervise(processes=2, app_spec=f"{module}:app", env={"PYTHONPATH": str(code_dir)})
    wait_until(started.exists, START_DEADLINE, "the app import started", sup.diagnostics)
    began = time.monotonic()
    if to_group:
        os.killpg(sup.pid, signum)
    else:
        sup.signal(signum)
    assert sup.wait(10) == exitcodes.OK, sup.diagnostics()
    assert time.monotonic() - began < 3, "the supervisor waited for the import"
    log = sup.log
    assert "could not be loaded" not in log, log
    assert "Started child" not in log, log
    with pytest.raises(ProcessLookupError):  # the importing child is gone too
        os.killpg(sup.pid, 0)


def test_children_still_importing_the_app_stop_at_the_supervisors_request(
        supervise: Callable[..., Supervised], tmp_path: Path) -> None:
    """Before a child handles the supervisor's stop signal (it is importing the app), the
    signal's default action ends it, as SIGTERM's did."""
    module = f"slow_children_tasks_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    # The supervisor's validation child imports it first and quickly; the children slowly.
    (code_dir / f"{module}.py").write_text(
        "import os, pathlib, time\n"
        f"marks = pathlib.Path({str(marks)!r})\n"
        "if (marks / 'validated').exists():\n"
        "    (marks / f'child-{os.getpid()}').write_text('importing')\n"
        "    time.sleep(60)\n"
        "(marks / 'validated').write_text('yes')\n"
        "from aio_celery import Celery\n"
        "app = Celery('slow_children')\n", encoding="utf-8")
    sup = supervise(processes=2, app_spec=f"{module}:app", env={"PYTHONPATH": str(code_dir)})
    wait_until(lambda: len(list(marks.glob("child-*"))) == 2, START_DEADLINE,
               "both children are importing the app", sup.diagnostics)
    began = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == exitcodes.OK, sup.diagnostics()
    assert time.monotonic() - began < 3, "the supervisor waited for the imports"
    log = sup.log
    stopped = lines_with("exited: killed by SIGRTMIN+3 (the supervisor's stop request)", log)
    assert len(stopped) == 2, log
    assert "Shutdown timeout" not in log and "Traceback" not in log, log


# --- 4. SIGHUP: rolling restart under load ------------------------------------------------------

def test_sighup_replaces_children_one_by_one_without_losing_tasks(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    ids = publish(unique_name, redis_url, sleeps(56, 0.5))
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=2)
    old = sup.wait_ready(2)
    wait_until(lambda: len(book.done()) >= 4, 15, "tasks are flowing", sup.diagnostics)

    sup.signal(signal.SIGHUP)
    remaining = len(ids) - len(book.done())
    assert remaining >= 30, "too little work left for a restart under load"
    most = 0

    def replaced() -> bool:
        nonlocal most
        sup.assert_running()
        kids = sup.children()
        most = max(most, len(kids))
        pids = {child["pid"] for child in kids}
        return sup.all_ready(2) and not pids & set(old.values())

    wait_until(replaced, 25, "both children are replaced", sup.diagnostics)
    new = sup.pids_by_index()
    assert set(new) == {1, 2}
    # new 1, then new 2 once new 1 consumes; the old ones finish their tasks meanwhile
    assert most <= 4, f"{most} children at once"

    wait_until(lambda: len(book.done()) == len(ids), 30, "every task completed",
               sup.diagnostics)
    book.assert_exactly_once(ids)
    # Old and new children both completed a good share of the tasks.
    by_new = sum(1 for pid in book.done().values() if pid in new.values())
    by_old = sum(1 for pid in book.done().values() if pid in old.values())
    assert by_new >= 5 and by_old >= 5 and by_new + by_old == len(ids), (by_new, by_old)

    log = sup.log
    assert "SIGHUP: restarting 2 child(ren) one by one" in log, log
    # One by one: an old child is stopped only once its replacement consumes, and the second
    # replacement starts only then.
    def position(pattern: str) -> int:
        found = re.search(pattern, log)
        assert found is not None, (pattern, log)
        return found.start()

    new_1_ready = position(rf" {new[1]}\] aio_celery\.worker: \S+ ready: consuming")
    new_2_ready = position(rf" {new[2]}\] aio_celery\.worker: \S+ ready: consuming")
    assert position(rf"Started child 1 \(pid {new[1]}\)") < new_1_ready
    assert new_1_ready < position(rf"Started child 2 \(pid {new[2]}\)") < new_2_ready
    assert new_1_ready < position(rf" {old[1]}\] aio_celery\.worker: Warm shutdown in")
    assert new_2_ready < position(rf" {old[2]}\] aio_celery\.worker: Warm shutdown in")
    for index in (1, 2):
        assert re.search(rf"child {index} \(pid {old[index]}\) exited: exit code 0", log), log
    assert "crashes within" not in log and "Traceback" not in log, log
    assert alive(sup.pid) and sup.status()["pid"] == sup.pid
    assert sup.stop() == exitcodes.OK, sup.diagnostics()


# --- 5. --max-tasks-per-child ---------------------------------------------------------------

def test_max_tasks_per_child_recycles_children(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    ids = publish(unique_name, redis_url, sleeps(24, 0.2))
    sup = supervise("--max-tasks-per-child", "5", "--prefetch-multiplier", "1", processes=2,
                    concurrency=2)
    wait_until(lambda: len(book.done()) == len(ids), 40, "every task completed",
               sup.diagnostics)
    book.assert_exactly_once(ids)
    completers = set(book.done().values())
    assert len(completers) >= 4, f"only {len(completers)} processes ran the tasks"

    log = sup.log
    recycled = lines_with("recycled (exit code 6 (recycle)): replacing it", log)
    assert len(recycled) >= 2, log
    assert lines_with("Reached max tasks per child (5)", log), log
    assert "crashes within" not in log, log
    # Each process completed at most 5 + (concurrency - 1) tasks before leaving.
    per_pid: dict[int, int] = {}
    for pid in book.done().values():
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert max(per_pid.values()) <= 6, per_pid
    sup.wait_ready(2, 15)
    assert sup.stop() == exitcodes.OK, sup.diagnostics()


# --- 6. a task blocking the event loop ----------------------------------------------------------

def test_child_with_blocked_loop_is_dumped_killed_and_replaced(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=2,
                    heartbeat_timeout=3)
    sup.wait_ready(2)
    [block_id] = publish(unique_name, redis_url, [("sup.block", (60.0,))])
    blocked = wait_until(lambda: book.started().get(block_id), 10, "the blocking task started",
                         sup.diagnostics)
    others = publish(unique_name, redis_url, sleeps(8, 0.3))

    sup.wait_for_log(rf"\(pid {blocked}\) missed its heartbeat", 10)
    wait_until(lambda: not alive(blocked), 5, "the blocked child is dead", sup.diagnostics)
    wait_until(lambda: sup.all_ready(2) and blocked not in sup.pids_by_index().values(), 15,
               "a replacement consumes", sup.diagnostics)

    # The blocking task's message went back to the queue and ran again (without blocking).
    wait_until(lambda: len(book.done()) == len(others) + 1, 20, "every task completed",
               sup.diagnostics)
    book.assert_exactly_once([block_id, *others])
    assert book.done()[block_id] != blocked

    log = sup.log
    assert re.search(rf"child \d \(pid {blocked}\) exited: killed by SIGKILL", log), log
    # faulthandler's dump of every thread of the blocked child, the task's frame included
    assert "Current thread" in log or "Thread 0x" in log, log
    assert re.search(r'File ".*sup_tasks\.py", line \d+ in block', log), log
    assert "crashes within" not in log, log
    assert sup.stop() == exitcodes.OK, sup.diagnostics()


# --- 7. systemd notifications ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_watchdog_stopping(
        kind: str, supervise: Callable[..., Supervised], tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if kind == "path":
            address = str(tmp_path / "notify.sock")
            sock.bind(address)
        else:
            address = f"@aio-celery-test-notify-{uuid.uuid4().hex}"
            sock.bind("\0" + address[1:])
        sock.settimeout(0.2)
        messages: list[tuple[float, str]] = []

        def receive_until(predicate: Callable[[], bool], deadline: float, what: str) -> None:
            def poll() -> bool:
                with contextlib.suppress(TimeoutError):
                    data = sock.recv(4096)
                    messages.append((time.monotonic(), data.decode()))
                return predicate()

            wait_until(poll, deadline, what, lambda: f"{messages}\n{sup.diagnostics()}")

        def with_field(field: str) -> list[tuple[float, str]]:
            return [(t, m) for t, m in messages if field in m.split("\n")]

        sup = supervise(processes=2, env={"NOTIFY_SOCKET": address,
                                          "WATCHDOG_USEC": "2000000"})
        receive_until(lambda: bool(with_field("READY=1")), START_DEADLINE, "READY=1")
        # READY=1 comes once all children consume, with the supervisor's pid.
        assert len(lines_with("ready: consuming", sup.log)) == 2, sup.log
        ready_at, ready = with_field("READY=1")[0]
        assert f"MAINPID={sup.pid}" in ready.split("\n"), ready
        receive_until(lambda: len(with_field("WATCHDOG=1")) >= 3, 6, "three WATCHDOG=1 pings")
        pings = [t for t, _ in with_field("WATCHDOG=1")]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.7 <= gap <= 2.0 for gap in gaps), gaps  # WATCHDOG_USEC/2 = 1 s
        assert any(m.startswith("STATUS=") and "2/2 children consuming" in m
                   for _, m in messages), messages

        sup.signal(signal.SIGTERM)
        receive_until(lambda: bool(with_field("STOPPING=1")), 10, "STOPPING=1")
        assert sup.wait(20) == exitcodes.OK, sup.diagnostics()
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append((time.monotonic(), sock.recv(4096).decode()))
        assert len(with_field("READY=1")) == 1, messages
        stopping_at = with_field("STOPPING=1")[0][0]
        assert stopping_at > ready_at
        assert not [m for t, m in with_field("READY=1") if t > stopping_at]


# --- 8. aio_celery health -------------------------------------------------------------------------

def test_health_probe_follows_the_supervisor(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book, tmp_path: Path) -> None:
    sup = supervise(processes=2, concurrency=2, shutdown_timeout=20)
    sup.wait_ready(2)

    alive_probe = health(sup.status_path, python_flags=("-X", "importtime"))
    assert alive_probe.returncode == exitcodes.OK, alive_probe.stderr[-3000:]
    # importtime lines name every imported module: no app, no aio-pika, no redis
    imported = {line.rsplit("|", 1)[-1].strip() for line in alive_probe.stderr.splitlines()
                if line.startswith("import time:")}
    assert "aio_celery.cli" in imported
    heavy = {name for name in imported
             if name.split(".")[0] in ("aio_pika", "aiormq", "redis", "tests", "amqp")}
    assert not heavy, heavy
    ready_probe = health(sup.status_path, "--ready")
    assert ready_probe.returncode == exitcodes.OK, ready_probe.stderr
    assert "ok: 2 children" in ready_probe.stdout, ready_probe.stdout

    # During a warm shutdown (a task still running) the probe fails: "stopping".
    [task_id] = publish(unique_name, redis_url, sleeps(1, 2.5))
    wait_until(lambda: task_id in book.started(), 10, "the task runs", sup.diagnostics)
    sup.signal(signal.SIGTERM)
    wait_until(lambda: (sup.status() or {}).get("state") == "stopping", 5,
               "the status says stopping", sup.diagnostics)
    stopping = health(sup.status_path)
    assert stopping.returncode == exitcodes.UNHEALTHY, stopping
    assert "stopping" in stopping.stderr, stopping.stderr
    assert sup.wait(20) == exitcodes.OK, sup.diagnostics()
    assert task_id in book.done()

    gone = health(sup.status_path)
    assert gone.returncode == exitcodes.UNHEALTHY, gone
    assert "no supervisor status" in gone.stderr, gone.stderr

    # A status file nobody updates any more (the supervisor hung or was SIGKILLed).
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({
        "pid": 1, "state": "running", "target": 1, "heartbeat_timeout": 30,
        "updated": time.time() - 120,
        "children": [{"index": 1, "pid": 2, "state": "ready", "beat_age": 0.5}]}))
    stale_probe = health(stale)
    assert stale_probe.returncode == exitcodes.UNHEALTHY, stale_probe
    assert "old" in stale_probe.stderr, stale_probe.stderr


# --- 9/10. titles, SIGUSR1, SIGTTIN/SIGTTOU ----------------------------------------------------

def test_titles_task_dump_and_scaling(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        book: Book) -> None:
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=2)
    pids = sup.wait_ready(2)

    assert proc_title(sup.pid) == f"aio_celery supervisor [{APP_SPEC}] 2 children"
    for index, pid in pids.items():
        assert proc_title(pid) == f"aio_celery child {index}/2 [{APP_SPEC}]"

    # SIGUSR1: every child logs the tasks it is running.
    ids = publish(unique_name, redis_url, sleeps(2, 3.0))
    wait_until(lambda: len(book.started()) == 2, 10, "two tasks run", sup.diagnostics)
    sup.signal(signal.SIGUSR1)
    for task_id in ids:
        sup.wait_for_log(rf"sup\.sleep\[{task_id}\]", 5)
    running_pids = set(book.started().values())
    for pid in running_pids:
        sup.wait_for_log(rf"task\(s\) running in pid {pid}:", 5)
    assert "SIGUSR1: asking 2 child(ren) to log their running tasks" in sup.log
    # Checked at the end (so that the scaling below is tested whatever happens here):
    later: list[str] = []
    # The dump shows where each task is, i.e. the task function's own frame.
    dumped_in_task = re.findall(r"sup_tasks\.py:\d+ in sleep", sup.log)
    if len(dumped_in_task) != 2:
        later.append(f"the SIGUSR1 dump does not show the tasks' frames:\n"
                     f"{chr(10).join(lines_with('', sup.log)[-12:])}")

    # SIGTTIN: one child more.
    sup.signal(signal.SIGTTIN)
    grown = sup.wait_ready(3, 15)
    assert {index: grown[index] for index in (1, 2)} == pids, "existing children changed"
    third = grown[3]
    assert "SIGTTIN: now 3 children" in sup.log
    for pid, title in ((sup.pid, f"aio_celery supervisor [{APP_SPEC}] 3 children"),
                       (third, f"aio_celery child 3/3 [{APP_SPEC}]")):
        if proc_title(pid) != title:
            later.append(f"after SIGTTIN pid {pid} is titled {proc_title(pid)!r}, "
                         f"not {title!r}")

    # SIGTTOU: one child fewer -- the highest index leaves, the others stay.
    sup.signal(signal.SIGTTOU)
    wait_until(lambda: sup.all_ready(2) and sup.pids_by_index() == pids and not alive(third),
               15, "the third child left", sup.diagnostics)
    log = sup.log
    assert "SIGTTOU: now 2 children" in log, log
    assert re.search(rf"child 3 \(pid {third}\) exited: exit code 0", log), log

    assert proc_title(sup.pid) == f"aio_celery supervisor [{APP_SPEC}] 2 children"

    # The scaling did not disturb the running tasks; then a warm stop.
    assert sup.stop() == exitcodes.OK, sup.diagnostics()
    book.assert_exactly_once(ids)
    assert not later, "\n".join(later)


def test_children_of_a_dead_supervisor_stop_by_themselves(
        supervise: Callable[..., Supervised]) -> None:
    """SIGKILL to the supervisor: its children notice (from their heartbeat loop) and shut
    down warm instead of consuming unsupervised."""
    sup = supervise(processes=2)
    pids = list(sup.wait_ready(2).values())
    os.kill(sup.pid, signal.SIGKILL)
    sup.process.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in pids), 15,
               "the orphaned children exit", sup.diagnostics)
    assert len(lines_with("Warm shutdown", sup.log)) == 2, sup.diagnostics()
