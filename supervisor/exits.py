"""What a child's exit means, and when crashes add up to a crash loop.

The supervisor's loop reaps a child and asks two questions, answered here without I/O:

* :func:`classify_exit`: was it a crash, a recycle, a stop we asked for, a start that
  failed before any child ever worked? (:class:`ExitVerdict`); :func:`exit_log_line` says
  it in one log line and :func:`restart_cause` names it for the restart metric;
* :class:`CrashWindow`: with this crash, how long until the next child may start (the
  backoff), or is it time to give up and exit CRASH_LOOP so that systemd or Kubernetes
  takes over?

The loop then acts on the answers (stop, respawn, log); see :mod:`supervisor.arbiter`.
"""

from __future__ import annotations

import enum
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aio_celery import exitcodes
from supervisor import child as children
from supervisor import metrics as restarts

#: the longest wait between crashes and the next start, whatever the crash count
MAX_BACKOFF = 30.0
#: the wait after the second crash in the window (it doubles with each further crash)
FIRST_BACKOFF = 0.5


class ExitVerdict(enum.Enum):
    """What a child's exit means to the supervisor."""

    #: the supervisor asked it to stop or killed it (shutdown, rolling restart, scale-down,
    #: stale heartbeat): whatever its exit code, nothing went wrong that we did not know
    RETIRED = "retired"
    #: it stopped itself to be replaced (--max-tasks-per-child, --max-memory-per-child)
    RECYCLED = "recycled"
    #: burst mode: it drained its queues; its slot stays empty
    DRAINED = "drained"
    #: someone else signalled it and it went through its shutdown: replaced, no crash
    SIGNALLED = "signalled"
    #: it exited 0 without going through a shutdown (a task called ``os._exit(0)``)
    UNASKED = "unasked"
    #: it could not load the app or start, and no child ever started: stop everything,
    #: since every child would fail the same way
    STARTUP_FAILED = "startup failed"
    #: it died on a signal or exited with an error
    CRASHED = "crashed"

    @property
    def is_crash(self) -> bool:
        """It counts toward the crash-loop cap and the respawn backoff."""
        return self in (ExitVerdict.UNASKED, ExitVerdict.CRASHED)


def classify_exit(code: int, last_state: str, *, asked_to_stop: bool, burst: bool,
                  ever_ready: bool) -> ExitVerdict:
    """The verdict on a child's exit.

    ``code``: as from ``os.waitstatus_to_exitcode`` (negative: the signal that killed it).
    ``last_state``: what it last wrote to its heartbeat file ("stopping" once its shutdown
    began, whoever asked for it). ``asked_to_stop``: the supervisor retired or killed it.
    ``burst``: the children drain their queues and exit 0. ``ever_ready``: some child of
    this supervisor has consumed at least once (then a start-up error is a crash like
    another: the app can start, something passing went wrong).
    """
    if asked_to_stop:
        return ExitVerdict.RETIRED
    if code == exitcodes.RECYCLE:
        return ExitVerdict.RECYCLED
    if code == exitcodes.OK and burst:
        return ExitVerdict.DRAINED
    if code == exitcodes.OK:
        # A signal sent to the child itself (kill <pid>), or the user's group-wide stop
        # that reached it before ours: a shutdown it went through, not a crash.
        return ExitVerdict.SIGNALLED if last_state == "stopping" else ExitVerdict.UNASKED
    if code in (exitcodes.APP_LOAD_ERROR, exitcodes.STARTUP_ERROR) and not ever_ready:
        return ExitVerdict.STARTUP_FAILED
    return ExitVerdict.CRASHED


def restart_cause(verdict: ExitVerdict, retired_cause: str | None) -> str | None:
    """Why the child is replaced (a restart cause of :mod:`supervisor.metrics`), None if
    it is not. ``retired_cause``: the cause the supervisor noted when it retired or killed
    the child (None for a shutdown or scale-down: nothing replaces it)."""
    causes = {
        ExitVerdict.RETIRED: retired_cause,
        ExitVerdict.RECYCLED: restarts.RECYCLED,
        ExitVerdict.SIGNALLED: restarts.SIGNALLED,
        ExitVerdict.UNASKED: restarts.CRASH,
        ExitVerdict.CRASHED: restarts.CRASH,
    }
    return causes.get(verdict)


@dataclass(frozen=True)
class LogLine:
    """A log call kept as data: ``logger.log(line.level, line.msg, *line.args)``."""

    level: int
    msg: str
    args: tuple[object, ...]

    def text(self) -> str:
        return self.msg % self.args


def exit_log_line(verdict: ExitVerdict, index: int, pid: int, code: int) -> LogLine:
    """The one line the supervisor logs about child ``index`` (``pid``) exiting."""
    name = f"child {index} (pid {pid})"
    cause = describe_exit(code)
    if verdict is ExitVerdict.RETIRED:
        return LogLine(logging.INFO, "%s exited: %s", (name, cause))
    if verdict is ExitVerdict.RECYCLED:
        return LogLine(logging.INFO, "%s recycled (%s): replacing it", (name, cause))
    if verdict is ExitVerdict.DRAINED:
        return LogLine(logging.INFO, "%s drained its queues (burst mode): not replaced",
                       (name,))
    if verdict is ExitVerdict.SIGNALLED:
        return LogLine(logging.WARNING, "%s stopped on a signal sent to it, not by the "
                       "supervisor (%s): replacing it", (name, cause))
    if verdict is ExitVerdict.UNASKED:
        return LogLine(logging.ERROR, "%s exited by itself (%s) without being asked to: "
                       "a crash", (name, cause))
    if verdict is ExitVerdict.STARTUP_FAILED:
        return LogLine(logging.ERROR, "%s failed to start (%s) and no child ever started: "
                       "stopping, check the error above", (name, cause))
    # The kernel's OOM killer sends SIGKILL; nobody else here does unasked.
    hint = ": out of memory?" if code == -signal.SIGKILL else ""
    return LogLine(logging.ERROR, "%s %s%s", (name, cause, hint))


def describe_exit(code: int) -> str:
    """``exit code 5 (broker connection lost)`` or ``killed by SIGKILL``."""
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    return f"exit code {code} ({exitcodes.NAMES.get(code, 'unknown')})"


def _signal_name(signum: int) -> str:
    """``SIGTERM``, ``SIGRTMIN+3 (the supervisor's stop request)`` or ``signal 99``."""
    if signum == children.STOP_SIGNAL:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN} (the supervisor's stop request)"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class Crash:
    """The answer to one recorded crash."""

    #: crashes within the window, this one included
    count: int
    #: seconds before the next child may start (0: at once)
    delay: float
    #: more than ``max_crashes`` within the window: stop and exit CRASH_LOOP
    give_up: bool


class CrashWindow:
    """The crashes of the last ``window`` seconds, on an injected monotonic clock.

    The first crash in the window is replaced at once; each further one doubles the wait
    before the next start (0.5 s, 1 s, 2 s, ...). More than ``max_crashes`` within the
    window gives up: a child that fails at every start is a job for whoever restarts the
    whole service, not for an endless loop here.
    """

    def __init__(self, max_crashes: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_crashes = max_crashes
        self.window = window
        self._clock = clock
        self._times: deque[float] = deque()
        self._respawn_at = 0.0

    @property
    def count(self) -> int:
        """Crashes recorded within the window as of the last :meth:`record`."""
        return len(self._times)

    @property
    def respawn_at(self) -> float:
        """No child starts before this time (on the clock)."""
        return self._respawn_at

    def may_respawn(self, now: float) -> bool:
        return now >= self._respawn_at

    def record(self) -> Crash:
        """Count one crash now: the backoff it adds, or that it is time to give up."""
        now = self._clock()
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        count = len(self._times)
        if count > self.max_crashes:
            return Crash(count, 0.0, give_up=True)
        # Cap the backoff so that more than max_crashes crashes still fit in the window:
        # otherwise children that crash at every start are retried forever.
        cap = min(MAX_BACKOFF, self.window / (2 * (self.max_crashes + 1)))
        delay = 0.0 if count == 1 else min(cap, FIRST_BACKOFF * 2 ** (count - 2))
        self._respawn_at = max(self._respawn_at, now + delay)
        return Crash(count, delay, give_up=False)
