"""A REAL Flower 2.2 watches OUR supervised worker (``-c 2 -E``), through its HTTP API.

Flower's model of the fleet is built from our events (``celery.events.State``) and its
worker pages from our remote control (``inspect stats``...): both children must be listed
online, with stats; a finished task with its name, args, result and state; and Flower's
revoke must reach the worker (a countdown task is then skipped at its eta, REVOKED).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery
import pytest
from helpers import AMQP_URL, REDIS_HOST_URL, close_celery_client, wait_until
from workers import OurWorker

from aio_celery import exitcodes

pytestmark = pytest.mark.interop

DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flower:
    """``celery flower`` on a free local port, its unauthenticated API on."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"flower-{uuid.uuid4().hex[:8]}.log"
        env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", f"--broker={AMQP_URL}", "flower",
                 f"--port={self.port}", "--address=127.0.0.1", "--inspect_timeout=3000"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def diagnostics(self) -> str:
        return "--- flower ---\n" + self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=b"",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def answers(self, path: str) -> Any:
        try:
            return self.get(path)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


@pytest.fixture
def client(redis_db: int) -> Iterator[celery.Celery]:
    app = celery.Celery("flower-interop", broker=AMQP_URL,
                        backend=f"{REDIS_HOST_URL}/{redis_db}", set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], result_accept_content=["json"])
    yield app
    close_celery_client(app)


def test_flower_lists_our_nodes_and_tasks_and_revokes(client: celery.Celery, redis_db: int,
                                                      tmp_path: Path, unique_name: str) -> None:
    queue = unique_name  # deleted after the test
    nodes = {f"{queue}-1@flower", f"{queue}-2@flower"}
    flower = Flower(tmp_path)
    # -P processes after OurWorker's -P solo: click keeps the last
    worker = OurWorker(queue, f"{REDIS_HOST_URL}/{redis_db}", tmp_path, "-P", "processes",
                       "-c", "2", "-E", "-n", f"{queue}@flower")

    def diagnostics() -> str:
        return worker.diagnostics() + "\n" + flower.diagnostics()

    try:
        wait_until(lambda: worker.log.count("ready: consuming") >= 2, DEADLINE,
                   "both children consuming", diagnostics)
        wait_until(lambda: flower.answers("/api/workers") is not None, DEADLINE,
                   "Flower's API answering", diagnostics)

        def online() -> bool:
            status = flower.answers("/api/workers?status=true") or {}
            return all(status.get(node) is True for node in nodes)

        wait_until(online, DEADLINE, "Flower shows both nodes online", diagnostics)
        workers = {}

        def with_stats() -> bool:
            nonlocal workers
            workers = flower.answers("/api/workers?refresh=true") or {}
            return all("total" in (workers.get(node) or {}).get("stats", {})
                       for node in nodes)

        wait_until(with_stats, DEADLINE, "stats of both nodes", diagnostics)
        for node in nodes:
            assert "broker" in workers[node]["stats"]

        done = client.send_task("ours.add", (2, 3), queue=queue)
        assert done.get(timeout=DEADLINE) == 5
        task: dict[str, Any] = {}

        def listed() -> bool:
            nonlocal task
            task = (flower.answers("/api/tasks") or {}).get(done.id) or {}
            return task.get("state") == "SUCCESS" and task.get("name") is not None

        wait_until(listed, DEADLINE, "Flower lists the finished task", diagnostics)
        assert (task["name"], task["args"], task["result"]) == ("ours.add", "(2, 3)", "5")
        assert task["worker"] in nodes

        later = client.send_task("ours.add", (4, 4), queue=queue, countdown=4)
        wait_until(lambda: ((flower.answers("/api/tasks") or {}).get(later.id) or {})
                   .get("state") == "RECEIVED", DEADLINE,
                   "the countdown task received, waiting for its eta", diagnostics)
        assert flower.post(f"/api/task/revoke/{later.id}") == {
            "message": f"Revoked '{later.id}'"}
        wait_until(lambda: later.state == "REVOKED", DEADLINE,
                   "the countdown task stored REVOKED", diagnostics)
        wait_until(lambda: ((flower.answers("/api/tasks") or {}).get(later.id) or {})
                   .get("state") == "REVOKED", DEADLINE,
                   "Flower shows it revoked (task-revoked)", diagnostics)
        assert worker.stop(deadline=30) == exitcodes.OK
        wait_until(lambda: not any((flower.answers("/api/workers?status=true") or {})
                                   .get(node) for node in nodes),
                   DEADLINE, "Flower shows both nodes offline", diagnostics)
    finally:
        worker.kill()
        flower.stop()
