"""The worker subprocesses the interop tests run: OUR worker and a REAL Celery worker.

Imported as ``from workers import ...`` (``tests/interop`` is on ``sys.path``, as for
``celery_tasks`` and ``our_tasks``). Each class starts its process, waits for its ready line
within a deadline, keeps its output for diagnostics, and stops it with SIGTERM (a warm
shutdown) before killing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from helpers import AMQP_URL, kill_process_group, wait_for_exit, wait_for_log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
APP_SPEC = "tests.interop.our_tasks:app"
READY_DEADLINE = 30.0


def _pythonpath(*dirs: Path) -> str:
    return os.pathsep.join(filter(None, [*(str(d) for d in dirs),
                                         os.environ.get("PYTHONPATH")]))


class OurWorker:
    """``python -m aio_celery worker -P solo`` on ``our_tasks.py``, in its own process group,
    stderr kept in a file."""

    def __init__(self, queue: str, backend_url: str, log_dir: Path, *extra: str,
                 max_priority: int | None = None, concurrency: int = 20,
                 quorum: bool = False) -> None:
        """``quorum``: the queue is a quorum queue with a topic exchange (Celery 5.5+'s
        ``task_default_queue_type="quorum"``, ``task_default_exchange_type="topic"``)."""
        self.queue = queue
        self.stderr_path = log_dir / f"our-worker-{uuid.uuid4().hex[:8]}.stderr"
        env = {
            **os.environ,
            "AIO_CELERY_OURS_BROKER": AMQP_URL,
            "AIO_CELERY_OURS_BACKEND": backend_url,
            "AIO_CELERY_OURS_QUEUE": queue,
            "PYTHONPATH": _pythonpath(ROOT, HERE),
            "PYTHONUNBUFFERED": "1",
        }
        if max_priority is not None:
            env["AIO_CELERY_OURS_MAX_PRIORITY"] = str(max_priority)
        if quorum:
            env["AIO_CELERY_OURS_QUORUM"] = "1"
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aio_celery", "worker", "-P", "solo",
                 "--concurrency", str(concurrency), "-Q", queue, *extra, APP_SPEC],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True)

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def diagnostics(self) -> str:
        return f"--- our worker's stderr ---\n{self.log[-8000:]}"

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        wait_for_log(self.process, lambda: self.log, "ready: consuming", deadline,
                     self.diagnostics, who="our worker")

    def stop(self, deadline: float = 20.0) -> int:
        """SIGTERM (warm shutdown) and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return wait_for_exit(self.process, deadline, self.diagnostics,
                             who="our worker (after SIGTERM)")

    def kill(self) -> None:
        kill_process_group(self.process)


class CeleryWorker:
    """``celery -A celery_tasks worker`` (threads pool, no gossip/mingle) on one queue; its
    combined output is kept for diagnostics."""

    def __init__(self, queue: str, backend_url: str, *, quorum: bool = False,
                 concurrency: int = 4) -> None:
        """``quorum``: Celery 5.5+'s quorum mode, a topic exchange (and so native delayed
        delivery, and per-consumer QoS)."""
        self.queue = queue
        self.backend_url = backend_url
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._ended = threading.Event()
        env = {
            **os.environ,
            "AIO_CELERY_INTEROP_BROKER": AMQP_URL,
            "AIO_CELERY_INTEROP_BACKEND": backend_url,
            "AIO_CELERY_INTEROP_QUEUE": queue,
            "PYTHONPATH": _pythonpath(HERE),
            "PYTHONUNBUFFERED": "1",
            **({"AIO_CELERY_INTEROP_QUORUM": "1"} if quorum else {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker",
             "-P", "threads", "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h",
             "-l", "INFO",
             # No --without-heartbeat: its 2 s timer is what wakes the worker's event loop
             # for a shutdown signal (without it, stopping an idle worker takes ~10 s). Task
             # events are off (no -E): it publishes worker events (heartbeats) only.
             "--without-gossip", "--without-mingle"],
            cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
        self._reader = threading.Thread(target=self._read, name="celery-worker-log",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if " ready." in line:
                self._ready.set()
        self._ended.set()
        self._ready.set()  # wake the waiter: the worker is gone

    def diagnostics(self, last: int = 80) -> str:
        return "--- the Celery worker's output ---\n" + "".join(self.lines[-last:])

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        """Wait for the worker's `` ready.`` line; stop it and fail the test if it does not
        come within ``deadline`` seconds or the worker exits first."""
        if not self._ready.wait(deadline) or self._ended.is_set():
            self.stop()
            pytest.fail(f"the Celery worker was not ready within {deadline}s\n"
                        f"{self.diagnostics()}", pytrace=False)

    def stop(self) -> None:
        """SIGTERM (warm shutdown); SIGKILL if it is still running 15 s later."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
