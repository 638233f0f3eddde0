"""The supervisor's part of the Prometheus metrics (``--metrics-port``).

Before the first fork the supervisor creates a private, empty directory for
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``: every process writes
its metrics to files of its own there; each child inherits the variable and imports
prometheus_client after the fork), and binds the listening socket (a port already taken
stops the start, before any child runs). It serves no request itself: the parent owns no
thread or event loop when it forks. A small exporter process of its own, forked like a
child (and forked again if it dies), answers ``/metrics`` with prometheus_client's own
exposition of every process's files (``MultiProcessCollector``). The supervisor writes its
own metrics (children alive, restarts by cause) to the same directory, and marks dead
children so that their gauges leave the sums. The directory is removed at exit.

:class:`NoMetrics` is what the supervisor calls while metrics are off: nothing happens, and
prometheus_client is never imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from supervisor import child as children

logger = logging.getLogger("aio_celery.supervisor")

#: the supervisor's own metrics (the workers' are in aio_celery.metrics.WORKER_METRICS)
SUPERVISOR_METRICS = {
    "aio_celery_children_alive": "gauge",
    "aio_celery_child_restarts_total": "counter",
}

#: why a child was replaced (the ``cause`` label of aio_celery_child_restarts_total)
CRASH = "crash"  # died on a signal, exited with an error, or exited 0 unasked
HEARTBEAT_TIMEOUT = "heartbeat_timeout"  # its event loop stopped beating: killed
STARTUP_TIMEOUT = "startup_timeout"  # not consuming within --startup-timeout: killed
RECYCLED = "recycled"  # --max-tasks-per-child or --max-memory-per-child
ROLLING_RESTART = "rolling_restart"  # SIGHUP
SIGNALLED = "signalled"  # someone else stopped it with a signal sent to it alone
RESTART_CAUSES = (CRASH, HEARTBEAT_TIMEOUT, STARTUP_TIMEOUT, RECYCLED, ROLLING_RESTART,
                  SIGNALLED)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: seconds before an exporter that died is forked again
EXPORTER_RESTART_DELAY = 1.0
#: seconds the exporter gets to exit on SIGTERM at the end
EXPORTER_STOP_GRACE = 2.0


@dataclass(frozen=True)
class MetricsOptions:
    """Where ``/metrics`` is served: ``bind`` is all interfaces by default, as exporters
    do (a pod's port is reached from the Prometheus server's); port 0 picks a free one."""

    port: int
    bind: str = "0.0.0.0"


class NoMetrics:
    """The supervisor's metrics while they are off."""

    def open(self) -> None:
        """Before the first fork: the directory and the listening socket."""

    def fds(self) -> list[int]:
        """Descriptors a worker child must close."""
        return []

    def maintain(self, now: float, handled: Iterable[signal.Signals],
                 close_fds: Iterable[int]) -> None:
        """Fork the exporter if it is not running (and its restart delay is over)."""

    def reaped(self, pid: int, how: str, stopping: bool) -> bool:
        """True if ``pid`` was the exporter (``how`` it exited); it is forked again later
        unless everything is ``stopping`` (a Ctrl-C reaches it too)."""
        return False

    def child_exited(self, pid: int) -> None:
        """A worker child is gone: its gauges leave the sums."""

    def children(self, count: int) -> None:
        """How many worker children are alive."""

    def restarted(self, cause: str) -> None:
        """A child is replaced, for ``cause`` (one of :data:`RESTART_CAUSES`)."""

    def close(self) -> None:
        """Stop the exporter, close the socket, remove the directory."""


class PrometheusMetrics(NoMetrics):
    """The real thing. Inert until :meth:`open`."""

    def __init__(self, options: MetricsOptions) -> None:
        self.options = options
        self.directory = ""
        self.listener: socket.socket | None = None
        self.exporter: int | None = None  # its pid while it runs
        self._exporter_due = 0.0
        self._alive: Any = None
        self._restarts: Any = None
        self._last_count = -1

    @property
    def address(self) -> tuple[str, int]:
        if self.listener is None:
            raise RuntimeError("the metrics address is known once open() has bound it")
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def open(self) -> None:
        """Raises OSError when the address cannot be bound."""
        self.directory = tempfile.mkdtemp(prefix="aio_celery-metrics-")
        # Set before prometheus_client is first imported: it picks its file-backed values
        # at import, here and, through the fork, in every child.
        os.environ[MULTIPROC_ENV] = self.directory
        family = socket.AF_INET6 if ":" in self.options.bind else socket.AF_INET
        self.listener = socket.create_server((self.options.bind, self.options.port),
                                             family=family, backlog=64)
        from prometheus_client import Counter, Gauge

        self._alive = Gauge("aio_celery_children_alive", "Worker processes alive",
                            registry=None, multiprocess_mode="livesum")
        self._restarts = Counter("aio_celery_child_restarts",
                                 "Worker processes replaced, by cause", ["cause"],
                                 registry=None)
        for cause in RESTART_CAUSES:  # every series from the start: rate() needs a zero
            self._restarts.labels(cause)
        host, port = self.address
        logger.info("Metrics on http://%s:%d/metrics (files in %s)", host, port,
                    self.directory)

    def fds(self) -> list[int]:
        return [] if self.listener is None else [self.listener.fileno()]

    def maintain(self, now: float, handled: Iterable[signal.Signals],
                 close_fds: Iterable[int]) -> None:
        if self.exporter is not None or self.listener is None or now < self._exporter_due:
            return
        listener, directory = self.listener, self.directory
        self.exporter = children.fork_process(handled, close_fds,
                                              lambda: _export(listener, directory))
        logger.debug("Started the metrics exporter (pid %d)", self.exporter)

    def reaped(self, pid: int, how: str, stopping: bool) -> bool:
        if pid != self.exporter:
            return False
        self.exporter = None
        if stopping:
            logger.info("The metrics exporter (pid %d) exited: %s", pid, how)
            return True
        self._exporter_due = time.monotonic() + EXPORTER_RESTART_DELAY
        logger.error("The metrics exporter (pid %d) exited (%s): starting it again in %.0fs",
                     pid, how, EXPORTER_RESTART_DELAY)
        return True

    def child_exited(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def children(self, count: int) -> None:
        if count != self._last_count:
            self._last_count = count
            self._alive.set(count)

    def restarted(self, cause: str) -> None:
        self._restarts.labels(cause).inc()

    def close(self) -> None:
        if self.exporter is not None:
            _stop(self.exporter)
            self.exporter = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after the grace; reaped either way."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + EXPORTER_STOP_GRACE
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.02)


class _Orphaned(Exception):
    pass


def _export(listener: socket.socket, directory: str) -> int:
    """The exporter process: serve ``/metrics`` from the directory until killed, or until
    the supervisor is gone."""
    from http.server import ThreadingHTTPServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import MetricsHandler
    from prometheus_client.multiprocess import MultiProcessCollector

    children.set_title("aio_celery metrics exporter")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    parent = os.getppid()

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def service_actions(self) -> None:
            if os.getppid() != parent:  # the supervisor died: nothing left to export
                raise _Orphaned

    server = Server(listener.getsockname()[:2], MetricsHandler.factory(registry),
                    bind_and_activate=False)
    server.socket.close()
    server.socket = listener  # bound and listening since before the first fork
    with contextlib.suppress(_Orphaned):
        server.serve_forever(poll_interval=0.5)
    return 0
