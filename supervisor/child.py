"""Forking one child, and what the child does right after the fork.

The parent owns no event loop, thread or connection when it forks. The handled signals are
blocked around ``fork()`` so none is lost or handled by the wrong process in the window;
the child puts every disposition back to the default, unblocks, reseeds ``random``, sets
its title and logging, and only then imports the app and builds its loop and connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aio_celery import exitcodes
from aio_celery.poison import DeathTable, Guard, RunningBoard
from aio_celery.ratelimit import SharedRates
from supervisor import heartbeat

if TYPE_CHECKING:
    from aio_celery.worker.options import WorkerOptions
    from aio_celery.worker.worker import Worker

#: SIGUSR2 makes a child dump every thread's stack (even with its event loop blocked)
DUMP_SIGNAL = signal.SIGUSR2
#: The supervisor asks a child for a warm stop (shutdown, rolling restart, scale-down) with
#: a signal of its own, not SIGTERM: Ctrl-C, systemd's KillMode=control-group, dumb-init and
#: ``tini -g`` signal the whole process group, and a child that got the user's SIGINT and
#: then a forwarded SIGTERM would count two signals and go cold. Nobody sends a real-time
#: signal to a process group, so this one is never mistaken for the user's. Until the worker
#: handles it (a child still importing the app) its default action ends the child.
STOP_SIGNAL = signal.SIGRTMIN + 3


@dataclass
class Child:
    """The parent's record of one child process."""

    index: int
    pid: int
    beat: heartbeat.HeartbeatFile
    started: float = field(default_factory=time.monotonic)
    #: the parent asked it to stop (shutdown, restart, scale-down, stale heartbeat)
    retiring: bool = False
    #: the parent killed it (stale heartbeat): its death is not a crash
    killed: bool = False
    #: why the parent retired or killed it, when it is replaced (see supervisor.metrics)
    restart_cause: str | None = None
    kill_at: float | None = None
    #: it reached "ready" at least once
    was_ready: bool = False
    #: the start-up limit counts from here: the fork, or the end of a wait for the broker
    #: (a child waiting for the broker beats and is not slow to start)
    startup_since: float = field(default_factory=time.monotonic)
    #: its seat on the poison guard's running board (the task ids it runs)
    poison: PoisonSeat | None = None


@dataclass(frozen=True)
class PoisonSeat:
    """Where a child records the tasks it runs, and the deaths table it reads."""

    board: RunningBoard
    seat: int
    deaths: DeathTable


@dataclass(frozen=True)
class ChildSpec:
    """What every child runs."""

    app_spec: str
    worker: WorkerOptions
    loglevel: str
    log_config: bool
    processes: int
    #: the ``-n`` template each child's node name is expanded from
    node_template: str = "aio_celery%I@%h"
    #: record Prometheus metrics (into the supervisor's multiprocess directory)
    metrics: bool = False


def spawn(index: int, spec: ChildSpec, beat: heartbeat.HeartbeatFile,
          handled: Iterable[signal.Signals], close_fds: Iterable[int],
          poison: PoisonSeat, rates: SharedRates) -> int:
    """Fork a child for slot ``index``; returns its pid (in the parent only)."""
    return fork_process(handled, close_fds,
                        lambda: _child_main(index, spec, beat, poison, rates))


def fork_process(handled: Iterable[signal.Signals], close_fds: Iterable[int],
                 main: Callable[[], int]) -> int:
    """Fork a process that resets what it inherited (see the module's docstring), runs
    ``main`` and exits with its code; returns its pid (in the parent only)."""
    handled = list(handled)
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        return pid
    code = exitcodes.INTERNAL_ERROR
    try:
        _reset_after_fork(handled, close_fds)
        code = main()
    except BaseException:  # never let a child return into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def start_validation(spec: ChildSpec, handled: Iterable[signal.Signals]) -> int:
    """Fork a short-lived child that imports the app once and checks its settings: it exits
    0, 3 if the app cannot be loaded or 4 for a configuration error (the parent itself never
    imports it, so that a restarted child loads new code); returns its pid, for the caller
    to reap."""
    handled = list(handled)
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    pid = os.fork()
    if pid == 0:
        code = exitcodes.INTERNAL_ERROR
        try:
            _reset_after_fork(handled, ())
            code = _load_only(spec)
        finally:
            sys.stderr.flush()
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    return pid


def _reset_after_fork(handled: list[signal.Signals], close_fds: Iterable[int]) -> None:
    for signum in (*handled, STOP_SIGNAL):  # SIG_IGN would survive from our own parent
        signal.signal(signum, signal.SIG_DFL)
    # Until the worker installs its handler, a forwarded SIGUSR1 (dump tasks) must not kill
    # a child that is still importing the app.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    random.seed()
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _load_only(spec: ChildSpec) -> int:
    """Load the app and check its settings: 0, or the code the supervisor exits with."""
    from aio_celery import logs, preflight
    from aio_celery.exceptions import ConfigurationError
    from aio_celery.loader import AppLoadError, load_app

    if spec.log_config:
        logs.configure(spec.loglevel, label="supervisor")
    try:
        app = load_app(spec.app_spec)
    except AppLoadError as exc:
        sys.stderr.write(f"Error: cannot load the app: {exc}\n")
        return exitcodes.APP_LOAD_ERROR
    try:
        preflight.check(app.conf.settings, spec.worker)
        preflight.check_command(app.conf.settings)
    except ConfigurationError as exc:
        sys.stderr.write(f"Error: configuration error: {exc}\n")
        return exitcodes.STARTUP_ERROR
    return exitcodes.OK


def _child_main(index: int, spec: ChildSpec, beat: heartbeat.HeartbeatFile,
                poison: PoisonSeat, rates: SharedRates) -> int:
    from aio_celery import logs
    from aio_celery.loader import AppLoadError, load_app
    from aio_celery.worker.process import run_worker

    label = f"child {index}/{spec.processes}"
    set_title(f"aio_celery {label} [{spec.app_spec}]")
    if spec.log_config:
        logs.configure(spec.loglevel, label=label)
    faulthandler.register(DUMP_SIGNAL, all_threads=True)
    try:
        app = load_app(spec.app_spec)
    except AppLoadError as exc:
        sys.stderr.write(f"Error: cannot load the app: {exc}\n")
        return exitcodes.APP_LOAD_ERROR
    from aio_celery.control import nodenames

    # Each child is a remote control node of its own: a name of its own (see nodenames).
    options = dataclasses.replace(
        spec.worker, supervisor_pid=os.getppid(),
        hostname=nodenames.for_child(spec.node_template, socket.gethostname(), index))
    guard = Guard(options.max_task_deaths or app.conf.settings.worker_max_task_deaths,
                  poison.board, poison.seat, poison.deaths)
    recorder = None
    if spec.metrics:
        from aio_celery.metrics import PrometheusRecorder

        recorder = PrometheusRecorder()  # in no registry: the exporter reads the files
    return run_worker(app, options, on_tick=_ticker(beat, os.getppid()), guard=guard,
                      retire_signal=STOP_SIGNAL, rates=rates, recorder=recorder)


def _ticker(beat: heartbeat.HeartbeatFile, parent: int) -> Callable[[Worker], None]:
    states = {"starting": heartbeat.STARTING, "ready": heartbeat.READY,
              "stopping": heartbeat.STOPPING, "waiting for broker": heartbeat.WAITING}

    def tick(worker: Worker) -> None:
        beat.beat(states[worker.state], worker.broker_lost_since)
        if os.getppid() != parent and worker.state != "stopping":
            # Orphaned (the supervisor died): stop consuming rather than run unsupervised.
            worker.retire()

    return tick


def set_title(title: str) -> None:
    """The process title shown by ps/top (setproctitle)."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        pass
