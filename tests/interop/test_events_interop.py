"""Celery's own event receiver and ``State`` (Flower's model of a fleet) watch OUR worker.

``python -m aio_celery worker -P solo -E --heartbeat-interval 1`` runs tasks that a REAL
Celery client sends; ``app.events.Receiver`` (a ``celeryev.<uuid>`` queue bound with ``#``,
as Flower's) feeds ``celery.events.State`` in a thread. State must see the tasks (name,
args, result, state, runtime, exception) and the worker: alive while it beats, offline at
once after its warm shutdown (worker-offline).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery
import celery.events.state
import pytest
from helpers import AMQP_URL, REDIS_HOST_URL, close_celery_client, wait_until
from workers import OurWorker

from aio_celery import exitcodes

pytestmark = pytest.mark.interop

DEADLINE = 20.0


class Watcher:
    """Celery's ``EventReceiver`` consuming into a ``State`` in a thread of its own."""

    def __init__(self, app: celery.Celery) -> None:
        self.app = app
        self.state = celery.events.state.State()
        #: every event received, as the receiver handed it over
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="celery-events", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(DEADLINE):
            raise AssertionError(f"the receiver did not start: {self._error!r}")

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as connection:
                receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
                receiver.on_consume_ready = lambda *args, **kwargs: self._ready.set()
                self._receiver = receiver
                for _ in receiver.consume(wakeup=False):
                    pass
        except BaseException as exc:  # reported by start() or the assertions
            self._error = exc
            self._ready.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.state.event(event)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)


@pytest.fixture
def client(redis_db: int) -> Iterator[celery.Celery]:
    app = celery.Celery("events-interop", broker=AMQP_URL,
                        backend=f"{REDIS_HOST_URL}/{redis_db}", set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], result_accept_content=["json"])
    yield app
    close_celery_client(app)


def test_celerys_state_sees_our_tasks_and_our_worker(client: celery.Celery, redis_db: int,
                                                      tmp_path: Path, unique_name: str) -> None:
    queue = unique_name  # deleted after the test
    hostname = f"{queue}@interop"
    watcher = Watcher(client)
    watcher.start()
    worker = OurWorker(queue, f"{REDIS_HOST_URL}/{redis_db}", tmp_path, "-E",
                       "--heartbeat-interval", "1", "-n", hostname)
    state = watcher.state
    try:
        worker.wait_ready()
        assert "events:      task events ON, worker events every 1s, to celeryev" in worker.log
        ok = client.send_task("ours.add", (2, 3), queue=queue)
        bad = client.send_task("ours.fail", ("E42", {"k": 1}), queue=queue)
        assert ok.get(timeout=DEADLINE) == 5
        with pytest.raises(Exception, match="E42"):
            bad.get(timeout=DEADLINE)

        def seen(task_id: str, final: str) -> bool:
            task = state.tasks.get(task_id)
            return task is not None and task.state == final and task.name is not None

        wait_until(lambda: seen(ok.id, "SUCCESS") and seen(bad.id, "FAILURE"), DEADLINE,
                   "State sees both tasks finished", worker.diagnostics)
        task = state.tasks[ok.id]
        assert (task.name, task.args, task.kwargs) == ("ours.add", "(2, 3)", "{}")
        assert task.result == "5" and isinstance(task.runtime, float) and task.runtime >= 0
        assert task.received and task.started and task.succeeded
        assert task.worker is not None and task.worker.hostname == hostname
        failed = state.tasks[bad.id]
        assert failed.name == "ours.fail" and "E42" in failed.exception
        assert "Traceback" in failed.traceback

        wait_until(lambda: hostname in state.workers
                   and len(state.workers[hostname].heartbeats) >= 2, DEADLINE,
                   "two heartbeats", worker.diagnostics)
        node = state.workers[hostname]
        assert node.alive and node.freq == 1.0
        assert node.sw_ident == "py-aio-celery" and node.sw_sys
        assert node.pid == worker.process.pid  # -P solo: the worker is the process

        assert worker.stop() == exitcodes.OK
        wait_until(lambda: not state.workers[hostname].alive, 5.0,
                   "the worker offline at once (worker-offline)", worker.diagnostics)
        assert not state.workers[hostname].heartbeats  # cleared by worker-offline
    finally:
        worker.kill()
        watcher.stop()


def test_celerys_enable_events_and_heartbeat_commands_reach_our_worker(
        client: celery.Celery, redis_db: int, tmp_path: Path,
        unique_name: str) -> None:
    """Without -E, as Flower finds a worker: its ``enable_events`` broadcast turns task
    events on, ``heartbeat`` brings one worker-heartbeat at once (freq 5)."""
    queue = unique_name  # deleted after the test
    hostname = f"{queue}@interop"
    watcher = Watcher(client)
    watcher.start()
    worker = OurWorker(queue, f"{REDIS_HOST_URL}/{redis_db}", tmp_path, "-n", hostname)
    state = watcher.state
    try:
        worker.wait_ready()
        before = client.send_task("ours.add", (1, 1), queue=queue)
        assert before.get(timeout=DEADLINE) == 2
        replies = client.control.broadcast("enable_events", destination=[hostname],
                                           reply=True, timeout=DEADLINE, limit=1)
        assert replies == [{hostname: {"ok": "task events enabled"}}]
        client.control.broadcast("heartbeat", destination=[hostname])
        wait_until(lambda: [e for e in list(watcher.events)
                            if e["type"] == "worker-heartbeat" and e["freq"] == 5
                            and e["hostname"] == hostname],
                   DEADLINE, "the requested heartbeat (freq 5)", worker.diagnostics)
        after = client.send_task("ours.add", (2, 2), queue=queue)
        assert after.get(timeout=DEADLINE) == 4
        wait_until(lambda: after.id in state.tasks
                   and state.tasks[after.id].state == "SUCCESS", DEADLINE,
                   "State sees the task sent after enable_events", worker.diagnostics)
        assert before.id not in state.tasks
        assert state.tasks[after.id].name == "ours.add"
        replies = client.control.broadcast("disable_events", destination=[hostname],
                                           reply=True, timeout=DEADLINE, limit=1)
        assert replies == [{hostname: {"ok": "task events disabled"}}]
        assert worker.stop() == exitcodes.OK
    finally:
        worker.kill()
        watcher.stop()
