"""The supervisor's main loop: small, synchronous, no asyncio, never imports aio-pika.

Signal handlers only put the signal number on a queue; the loop takes them off, reaps
children, checks heartbeats, keeps the number of children at the target and reports to
systemd and to the status file. Every decision is logged on one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from aio_celery import defaults, exitcodes
from aio_celery.ratelimit import SharedRates
from supervisor import child as children
from supervisor import heartbeat
from supervisor import metrics as restarts
from supervisor.deaths import DeathCounter
from supervisor.exits import (
    CrashWindow,
    ExitVerdict,
    classify_exit,
    describe_exit,
    exit_log_line,
    restart_cause,
)
from supervisor.metrics import MetricsOptions, NoMetrics, PrometheusMetrics
from supervisor.notify import Notifier
from supervisor.status import ChildStatus, Status, write_status

logger = logging.getLogger("aio_celery.supervisor")

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)
#: the signals that stop the supervisor (warm, or cold for SIGQUIT)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: how long the loop sleeps when nothing happens (signals wake it at once)
TICK = 0.25
#: seconds a cold shutdown waits before SIGKILL
COLD_GRACE = 5.0
#: seconds a warm shutdown waits beyond the shutdown timeout before SIGKILL
WARM_GRACE = defaults.WARM_GRACE
#: seconds between the stack-dump signal and SIGKILL for a child with a stale heartbeat
DUMP_GRACE = 0.5


@dataclass(frozen=True)
class SupervisorOptions:
    """How the parent runs its children (each child's own options are in ``spec``)."""

    spec: children.ChildSpec
    processes: int
    shutdown_timeout: float = defaults.SHUTDOWN_TIMEOUT
    heartbeat_timeout: float = defaults.HEARTBEAT_TIMEOUT
    #: a child gets this long from fork (or from the end of a wait for the broker) to
    #: consuming; one that takes longer is killed, and that counts as a crash
    startup_timeout: float = defaults.STARTUP_TIMEOUT
    #: more crashes than this within ``crash_window`` seconds: stop and exit CRASH_LOOP
    max_crashes: int = 10
    crash_window: float = 60.0
    status_file: str | None = None
    #: serve Prometheus metrics (None: off)
    metrics: MetricsOptions | None = None


class Supervisor:
    """Forks, watches and replaces worker children. Inert until :meth:`run`."""

    def __init__(self, options: SupervisorOptions, metrics: NoMetrics | None = None) -> None:
        """``metrics``: what records the children's exits and restarts (default: nothing is
        recorded). When ``options.metrics`` is set, :meth:`run` replaces it with the
        Prometheus recorder it serves."""
        self.options = options
        self.target = options.processes
        self.children: dict[int, children.Child] = {}  # by pid
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping: str | None = None  # None, "warm" or "cold"
        self._stop_deadline = 0.0
        self._exit_code = exitcodes.OK
        #: the crash-loop cap and the respawn backoff
        self.crashes = CrashWindow(options.max_crashes, options.crash_window)
        self._restart_queue: list[int] = []  # pids to replace one by one (SIGHUP)
        self._replacing: tuple[int, int] | None = None  # (old pid, new pid)
        self._ever_ready = False
        self._announced_ready = False
        self._last_status = ""
        self._next_watchdog = 0.0
        self._next_report = 0.0
        self._beat_dir = ""
        self._drained_slots: set[int] = set()  # burst mode: children done for good
        # The poison guard's shared maps: created before the first fork, so every child
        # inherits them (see aio_celery.poison).
        self._poison: DeathCounter | None = None
        # The rate limits' buckets, shared likewise: a limit holds for all the children
        # together, as Celery's for all the processes of one worker (aio_celery.ratelimit).
        self._rates: SharedRates | None = None
        self._metrics = metrics if metrics is not None else NoMetrics()
        self.notifier = Notifier()

    @property
    def stopping(self) -> str | None:
        """None while running; "warm" or "cold" once a shutdown began."""
        return self._stopping

    @property
    def exit_code(self) -> int:
        """What :meth:`run` returns (OK unless something stopped it with an error)."""
        return self._exit_code

    # --- signals: record only ---------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.put_nowait(signum)

    def _install_handlers(self) -> None:
        for signum in HANDLED:
            signal.signal(signum, self._on_signal)

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        spec = self.options.spec
        self._install_handlers()
        self._retitle()
        code = self._validate_app()
        if code is None:
            return exitcodes.OK
        if code != exitcodes.OK:
            what = "cannot start" if code == exitcodes.STARTUP_ERROR else "could not be loaded"
            logger.error("The app %s %s (see above): no child started, exiting with code %d",
                         spec.app_spec, what, code)
            return code
        if not self._open_metrics():
            return exitcodes.STARTUP_ERROR
        self._beat_dir = tempfile.mkdtemp(prefix="aio_celery-beats-")
        # Seats for a rolling restart's extra child and some scaling up; beyond that a
        # child gets a board of its own (its siblings then cannot see what it ran).
        self._poison = DeathCounter(2 * self.target + 2, spec.worker.concurrency)
        self._rates = SharedRates()
        logger.info("Supervisor pid %d starting %d children for %s", os.getpid(), self.target,
                    spec.app_spec)
        try:
            while self._step():
                pass
        finally:
            self._kill_all(signal.SIGKILL)
            self.reap()
            self._metrics.close()
            self._cleanup()
        logger.info("Supervisor exiting with code %d (%s)", self._exit_code,
                    exitcodes.NAMES.get(self._exit_code, "?"))
        return self._exit_code

    def _open_metrics(self) -> bool:
        """Before the first child: the metrics' directory and socket (False: cannot)."""
        options = self.options.metrics
        if options is None:
            return True
        metrics = PrometheusMetrics(options)
        try:
            metrics.open()
        except OSError as exc:
            metrics.close()
            logger.error("Cannot serve metrics on %s port %d (--metrics-bind, "
                         "--metrics-port): %s; no child started", options.bind, options.port,
                         exc)
            return False
        self._metrics = metrics
        return True

    def _validate_app(self) -> int | None:
        """Load the app once in a short-lived child and return its exit code; None when a
        stop was requested meanwhile (an import can take long, and a pod being deleted
        must not wait for it)."""
        pid = children.start_validation(self.options.spec, HANDLED)
        later: list[int] = []  # SIGHUP, SIGTTIN, ...: acted upon once children run
        try:
            return self._wait_for_validation(pid, later)
        finally:
            for signum in later:
                self._signals.put_nowait(signum)

    def _wait_for_validation(self, pid: int, later: list[int]) -> int | None:
        stop: int | None = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                # Ctrl-C reaches the whole process group: the loading child died of the
                # same stop signal; that is a stop, not an app that cannot be loaded.
                return None if stop is not None and code < 0 else code
            if stop is not None:
                logger.info("%s while the app was loading: stopping before any child started",
                            signal.Signals(stop).name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            try:
                signum = self._signals.get(timeout=TICK)  # SIGCHLD wakes it at once
            except queue.Empty:
                continue
            if signum in STOP_SIGNALS:
                stop = signum
            elif signum != signal.SIGCHLD:
                later.append(signum)

    def _step(self) -> bool:
        """One turn of the loop; False once everything has stopped."""
        self._dispatch_signals(timeout=TICK)
        self.reap()
        now = time.monotonic()
        if self._stopping:
            if not self.children:
                return False
            self._kill_due(now)
            if now >= self._stop_deadline:
                logger.warning("Shutdown timeout: killing %d child(ren) still running",
                               len(self.children))
                self._kill_all(signal.SIGKILL)
                self._stop_deadline = now + COLD_GRACE
        else:
            self.check_heartbeats(now)
            self._maintain(now)
            self._metrics.maintain(now, HANDLED, self._beat_fds())
        self._metrics.children(len(self.children))
        self._report(now)
        return True

    def _dispatch_signals(self, timeout: float) -> None:
        try:
            signum = self._signals.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle_signal(signum)
            try:
                signum = self._signals.get_nowait()
            except queue.Empty:
                return

    def _handle_signal(self, signum: int) -> None:
        actions: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self._warm_or_cold,
            signal.SIGINT: self._warm_or_cold,
            signal.SIGQUIT: lambda: self.stop("cold"),
            signal.SIGHUP: self._rolling_restart,
            signal.SIGTTIN: lambda: self._scale(+1),
            signal.SIGTTOU: lambda: self._scale(-1),
            signal.SIGUSR1: self._forward_dump,
            signal.SIGCHLD: lambda: None,  # the loop reaps on every turn
        }
        action = actions.get(signum)
        if action is not None:
            action()

    # --- shutdown ------------------------------------------------------------------------

    def _warm_or_cold(self) -> None:
        self.stop("cold" if self._stopping else "warm")

    def stop(self, kind: str, exit_code: int | None = None) -> None:
        """Begin a warm or cold shutdown of every child."""
        if exit_code is not None:
            self._exit_code = exit_code
        if self._stopping in ("cold", kind):
            return
        self._stopping = kind
        self.notifier.send("STOPPING=1", f"STATUS={kind} shutdown")
        if kind == "warm":
            timeout = self.options.shutdown_timeout
            logger.info("Warm shutdown: %d child(ren) finish their tasks (up to %.0fs)",
                        len(self.children), timeout)
            self._stop_deadline = time.monotonic() + timeout + WARM_GRACE
            # Not SIGTERM: a child may get the user's signal too (Ctrl-C, a group-wide
            # stop) and must not count ours as the user's second one (see STOP_SIGNAL).
            for record in list(self.children.values()):
                if not record.retiring and not record.killed:
                    _kill(record.pid, children.STOP_SIGNAL)
        else:
            logger.info("Cold shutdown: %d child(ren) cancel their tasks now (messages go "
                        "back to the queue)", len(self.children))
            self._stop_deadline = time.monotonic() + COLD_GRACE
            self._signal_all(signal.SIGQUIT)
        for record in self.children.values():
            record.retiring = True

    # --- children come and go ------------------------------------------------------------

    def _spawn(self, index: int) -> int:
        beat = heartbeat.HeartbeatFile(self._beat_dir)
        others = [*self._beat_fds(), *self._metrics.fds()]
        spec = self.options.spec
        if spec.processes != self.target:  # scaled: new children are "i/<current target>"
            spec = dataclasses.replace(spec, processes=self.target)
        if self._poison is None or self._rates is None:
            raise RuntimeError("Supervisor spawned a child before run() set it up")
        poison = self._poison.take_seat()
        try:
            pid = children.spawn(index, spec, beat, HANDLED, others, poison, self._rates)
        except BaseException:
            self._poison.free_seat(poison)
            raise
        self.children[pid] = children.Child(index=index, pid=pid, beat=beat, poison=poison)
        logger.info("Started child %d (pid %d)", index, pid)
        return pid

    def _beat_fds(self) -> list[int]:
        return [record.beat.fd for record in self.children.values()]

    def reap(self) -> None:
        """Collect every process that exited (without waiting), and act on each of our
        children's exits: log it, count a crash, record its restart cause unless everything
        is stopping. The loop calls this once a turn."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self._metrics.reaped(pid, describe_exit(code), bool(self._stopping)):
                continue
            record = self.children.pop(pid, None)
            if record is None:
                # As PID 1 in a container we inherit orphans: reap them too.
                logger.debug("Reaped process %d (not one of ours)", pid)
                continue
            last_state = record.beat.read()[0]
            record.beat.close()
            if self._poison is not None:
                self._poison.count_deaths(record, stopping=bool(self._stopping))
            self._metrics.child_exited(pid)
            cause = self._on_child_exit(record, code, last_state)
            if cause is not None and not self._stopping:
                self._metrics.restarted(cause)

    def _on_child_exit(self, record: children.Child, code: int,
                       last_state: str) -> str | None:
        """Act on the verdict on a child's exit (see :func:`supervisor.exits.classify_exit`
        for ``last_state``). Returns why it is replaced (a restart cause of
        :mod:`supervisor.metrics`), None if it is not."""
        if self._replacing is not None and record.pid in self._replacing:
            self._replacing = None
        verdict = classify_exit(code, last_state, asked_to_stop=record.retiring or record.killed,
                                burst=self.options.spec.worker.burst,
                                ever_ready=self._ever_ready)
        line = exit_log_line(verdict, record.index, record.pid, code)
        logger.log(line.level, line.msg, *line.args)
        if verdict is ExitVerdict.DRAINED:
            self._drained_slots.add(record.index)
            if len(self._drained_slots) >= self.target and not self.children:
                self.stop("warm")
        elif verdict is ExitVerdict.STARTUP_FAILED:
            # Every child would fail the same way: stop, and exit with the child's code.
            self.stop("warm", exit_code=code)
        elif verdict.is_crash:
            self._record_crash()
        return restart_cause(verdict, record.restart_cause)

    def _record_crash(self) -> None:
        crash = self.crashes.record()
        if crash.give_up:
            logger.error("%d crashes within %.0fs: giving up, stopping everything (exit %d) "
                         "so that systemd or Kubernetes can take over", crash.count,
                         self.crashes.window, exitcodes.CRASH_LOOP)
            self.stop("warm", exit_code=exitcodes.CRASH_LOOP)
        elif crash.delay:
            logger.warning("%d crashes within %.0fs: next child starts in %.1fs", crash.count,
                           self.crashes.window, crash.delay)

    def _maintain(self, now: float) -> None:
        """Fill empty slots (respecting crash backoff) and drive a rolling restart."""
        if self.crashes.may_respawn(now):
            for index in self.missing_slots():
                self._spawn(index)
        self._advance_restart()
        self._kill_due(now)

    def _kill_due(self, now: float) -> None:
        """SIGKILL children whose stack dump grace (stale heartbeat) is over."""
        for record in list(self.children.values()):
            if record.kill_at is not None and now >= record.kill_at:
                _kill(record.pid, signal.SIGKILL)
                record.kill_at = None

    def missing_slots(self) -> list[int]:
        """The slots (1 to the target) a new child should fill now."""
        # A child that stops by itself (max tasks or memory, a signal of its own) is
        # replaced as soon as it says so, not when it exits; in burst mode it stops because
        # its queues are drained, and is not replaced at all.
        early = not self.options.spec.worker.burst
        serving = {record.index for record in self.children.values()
                   if not record.retiring and not record.killed
                   and not (early and record.beat.read()[0] == "stopping")}
        return [index for index in range(1, self.target + 1)
                if index not in serving and index not in self._drained_slots]

    # --- heartbeats ----------------------------------------------------------------------

    def check_heartbeats(self, now: float) -> None:
        """Kill a child whose loop stopped beating, or that beats but never starts
        consuming. Ages are on the monotonic clock (see :mod:`supervisor.heartbeat`); the
        loop calls this once a turn with its ``now``."""
        for record in list(self.children.values()):
            if record.killed:
                continue
            state, age = record.beat.read(now)
            if state == "ready" and not record.was_ready:
                record.was_ready = True
                self._ever_ready = True
            if state == "waiting for broker":
                # Alive and retrying: the broker is late, not the child. Its start-up
                # limit counts again from when the broker is back.
                record.startup_since = now
            starting = state == "starting" and not record.was_ready
            limit = (max(self.options.startup_timeout, self.options.heartbeat_timeout)
                     if starting else self.options.heartbeat_timeout)
            if now - record.started > limit and age > limit:
                self._kill_stale(record, now, f"missed its heartbeat for {age:.0f}s (a task "
                                              "blocking the event loop?)",
                                 restarts.HEARTBEAT_TIMEOUT)
            elif starting and now - record.startup_since > self.options.startup_timeout:
                # Beating but never consuming (app context or broker hanging): a rolling
                # restart waiting for it would wait for ever. A start that keeps failing
                # like this is a crash loop, so it counts toward the cap.
                self._kill_stale(record, now, "did not start consuming within "
                                              f"{self.options.startup_timeout:.0f}s "
                                              "(--startup-timeout)",
                                 restarts.STARTUP_TIMEOUT)
                self._record_crash()

    def _kill_stale(self, record: children.Child, now: float, why: str, cause: str) -> None:
        logger.error("child %d (pid %d) %s: dumping its stack, then killing it; its "
                     "unacknowledged messages go back to the queue", record.index, record.pid,
                     why)
        record.killed = True
        record.restart_cause = cause
        _kill(record.pid, children.DUMP_SIGNAL)
        record.kill_at = now + DUMP_GRACE

    # --- operator signals ----------------------------------------------------------------

    def _rolling_restart(self) -> None:
        self._restart_queue = [pid for pid, record in self.children.items()
                               if not record.retiring and not record.killed]
        logger.info("SIGHUP: restarting %d child(ren) one by one with fresh code",
                    len(self._restart_queue))

    def _advance_restart(self) -> None:
        if self._replacing is not None:
            old_pid, new_pid = self._replacing
            new = self.children.get(new_pid)
            if new is None:  # the replacement died: the crash logic handles it
                self._replacing = None
            elif new.beat.read()[0] == "ready":
                old = self.children.get(old_pid)
                if old is not None:
                    old.retiring = True
                    old.restart_cause = restarts.ROLLING_RESTART
                    _kill(old_pid, children.STOP_SIGNAL)
                self._replacing = None
            return
        while self._restart_queue:
            old_pid = self._restart_queue.pop(0)
            old = self.children.get(old_pid)
            if old is None or old.retiring or old.killed or old.beat.read()[0] == "stopping":
                continue  # already on its way out (and already replaced)
            new_pid = self._spawn(old.index)
            self._replacing = (old_pid, new_pid)
            return

    def _retitle(self) -> None:
        children.set_title(
            f"aio_celery supervisor [{self.options.spec.app_spec}] {self.target} children")

    def _scale(self, delta: int) -> None:
        self.target = max(1, self.target + delta)
        logger.info("%s: now %d children", "SIGTTIN" if delta > 0 else "SIGTTOU", self.target)
        self._retitle()
        for record in self.children.values():
            if record.index > self.target and not record.retiring:
                record.retiring = True
                _kill(record.pid, children.STOP_SIGNAL)

    def _forward_dump(self) -> None:
        logger.info("SIGUSR1: asking %d child(ren) to log their running tasks",
                    len(self.children))
        self._signal_all(signal.SIGUSR1)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.children):
            _kill(pid, signum)

    def _kill_all(self, signum: int) -> None:
        for record in self.children.values():
            record.killed = True
        self._signal_all(signum)

    # --- reporting -----------------------------------------------------------------------

    def _report(self, now: float) -> None:
        if now < self._next_report and not self._stopping:
            return
        self._next_report = now + 1.0
        beats = [(record, record.beat.read_beat(now)) for record in self.children.values()]
        states = [(record, beat.state, beat.age) for record, beat in beats]
        ready = sum(1 for _, state, _ in states if state == "ready")
        if not self._announced_ready and not self._stopping and ready >= self.target:
            self._announced_ready = True
            logger.info("All %d children are consuming", ready)
            self.notifier.send("READY=1", f"MAINPID={os.getpid()}")
        summary = f"{ready}/{self.target} children consuming"
        if any(state == "waiting for broker" for _, state, _ in states):
            summary += ", waiting for the broker"
        if summary != self._last_status:
            self._last_status = summary
            self.notifier.send(f"STATUS={summary}")
        healthy = all(age <= self.options.heartbeat_timeout for _, _, age in states)
        interval = self.notifier.watchdog_interval
        if interval and healthy and now >= self._next_watchdog:
            self.notifier.send("WATCHDOG=1")
            self._next_watchdog = now + interval
        if self.options.status_file:
            status = Status(
                pid=os.getpid(), state="stopping" if self._stopping else "running",
                target=self.target, heartbeat_timeout=self.options.heartbeat_timeout,
                children=[ChildStatus(record.index, record.pid, beat.state, round(beat.age, 2),
                                      _rounded(beat.broker_down))
                          for record, beat in sorted(beats, key=lambda b: b[0].index)],
                updated_monotonic=now)
            try:
                write_status(self.options.status_file, status)
            except OSError as exc:
                logger.warning("Cannot write the status file %s: %s",
                               self.options.status_file, exc)

    def _cleanup(self) -> None:
        for record in self.children.values():
            record.beat.close()
        for tables in (self._poison, self._rates):
            if tables is not None:
                tables.close()
        if self._beat_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._beat_dir)
        if self.options.status_file:
            with contextlib.suppress(OSError):
                os.unlink(self.options.status_file)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
