"""``python -m aio_celery worker`` as a real process: signals, exit codes, error messages.

Each worker runs in its own process group with stderr written to a file; whatever a test
leaves running is killed (the whole group) in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import redis
from helpers import AMQP_URL, WorkerProcess, queue_depth, wait_until

from aio_celery import Celery, exitcodes
from aio_celery.resultmeta import result_key

APP_SPEC = "tests.process.proc_tasks:app"
STARTED_PREFIX = "aio-celery-test-proc-started-"  # as in proc_tasks.py
TASK_NAME = "proc.sleep"


# --- helpers ---------------------------------------------------------------------------------

def proc_env(queue: str, redis_url: str, broker: str = AMQP_URL) -> dict[str, str]:
    return {"AIO_CELERY_PROC_BROKER": broker, "AIO_CELERY_PROC_BACKEND": redis_url,
            "AIO_CELERY_PROC_QUEUE": queue}


def publish(queue: str, redis_url: str, count: int, seconds: float) -> list[str]:
    """Send ``count`` ``proc.sleep`` tasks to ``queue`` with our client; their ids."""

    async def send() -> list[str]:
        client = Celery("proc-client", set_as_current=False)
        client.conf.update(broker_url=AMQP_URL, result_backend=redis_url,
                           task_default_queue=queue)
        async with client.setup():
            return [(await client.send_task(TASK_NAME, (seconds, i))).id
                    for i in range(count)]

    return asyncio.run(send())


def stored(client: redis.Redis, task_id: str) -> dict[str, object] | None:
    raw = client.get(result_key(task_id))
    return None if raw is None else json.loads(raw)


def started_ids(client: redis.Redis, ids: list[str]) -> set[str]:
    return {task_id for task_id in ids if client.exists(STARTED_PREFIX + task_id)}


def lines_with(text: str, log: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def start_busy_worker(spawn: Callable[..., WorkerProcess], queue: str, redis_url: str,
                      redis_client: redis.Redis, count: int, seconds: float,
                      *extra: str) -> tuple[WorkerProcess, list[str]]:
    """``count`` tasks published, a concurrency-2 worker running two of them and holding the
    rest prefetched (the queue itself is empty)."""
    ids = publish(queue, redis_url, count, seconds)
    worker = spawn("worker", "-P", "solo", "--concurrency", "2", "-Q", queue, *extra, APP_SPEC,
                   env=proc_env(queue, redis_url))
    worker.wait_for_log("ready: consuming")
    wait_until(lambda: len(started_ids(redis_client, ids)) == 2, 15,
                "two tasks are running", worker.diagnostics)
    wait_until(lambda: queue_depth(queue) == 0, 15,
                "the worker prefetched every message", worker.diagnostics)
    return worker, ids


# --- the worker publishes on its own client ----------------------------------------------------

def test_the_worker_never_loads_aio_pika_nor_builds_a_client_broker(
        spawn: Callable[..., WorkerProcess], unique_name: str, redis_url: str,
        redis_client: redis.Redis) -> None:
    async def send() -> str:
        client = Celery("proc-client", set_as_current=False)
        client.conf.update(broker_url=AMQP_URL, result_backend=redis_url,
                           task_default_queue=unique_name)
        async with client.setup():
            return (await client.send_task("proc.sends")).id

    task_id = asyncio.run(send())
    worker = spawn("worker", "-P", "solo", "--burst", "-Q", unique_name, APP_SPEC,
                   env=proc_env(unique_name, redis_url))
    assert worker.wait(30) == exitcodes.OK, worker.diagnostics()
    document = stored(redis_client, task_id)
    assert document is not None and document["status"] == "SUCCESS", worker.diagnostics()
    before, after, sent_id, client_brokers = document["result"]  # type: ignore[misc]
    assert (before, after) == (False, False)
    assert client_brokers == 0
    sent = stored(redis_client, str(sent_id))
    assert sent is not None and sent["result"] == "sent by proc.sends", worker.diagnostics()


# --- warm shutdown ---------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_warm_shutdown_finishes_running_tasks_and_returns_the_rest(
        signum: int, spawn: Callable[..., WorkerProcess], unique_name: str, redis_url: str,
        redis_client: redis.Redis) -> None:
    worker, ids = start_busy_worker(spawn, unique_name, redis_url, redis_client, 6, 1.0,
                                    "--shutdown-timeout", "20")
    running = started_ids(redis_client, ids)

    worker.signal(signum)
    assert worker.wait(20) == exitcodes.OK, worker.diagnostics()

    # The two running tasks finished and stored their results ...
    for task_id in running:
        meta = stored(redis_client, task_id)
        assert meta is not None and meta["status"] == "SUCCESS", (task_id, meta)
    # ... and the four prefetched ones never started and are back in the queue.
    unstarted = [task_id for task_id in ids if task_id not in running]
    assert started_ids(redis_client, ids) == running
    assert all(stored(redis_client, task_id) is None for task_id in unstarted)
    assert queue_depth(unique_name) == 4

    log = worker.stderr
    summary = lines_with("Warm shutdown", log)
    assert len(summary) == 1, log
    assert "4 returned to the queue unstarted" in summary[0], summary
    assert "0 cancelled" in summary[0], summary
    assert not lines_with("Cold shutdown", log), log
    assert "Traceback" not in log, log


def test_warm_shutdown_timeout_cancels_tasks_that_run_too_long(
        spawn: Callable[..., WorkerProcess], unique_name: str, redis_url: str,
        redis_client: redis.Redis) -> None:
    worker, ids = start_busy_worker(spawn, unique_name, redis_url, redis_client, 3, 60.0,
                                    "--shutdown-timeout", "0.5")
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == exitcodes.OK, worker.diagnostics()
    assert 0.4 <= time.monotonic() - sent < 8

    assert all(stored(redis_client, task_id) is None for task_id in ids)
    assert queue_depth(unique_name) == 3
    summary = lines_with("Warm shutdown", worker.stderr)
    assert len(summary) == 1, worker.stderr
    assert "1 returned to the queue unstarted, 2 cancelled and returned" in summary[0], summary


# --- cold shutdown ---------------------------------------------------------------------------

def test_second_sigterm_during_warm_shutdown_goes_cold(
        spawn: Callable[..., WorkerProcess], unique_name: str, redis_url: str,
        redis_client: redis.Redis) -> None:
    worker, ids = start_busy_worker(spawn, unique_name, redis_url, redis_client, 4, 60.0,
                                    "--shutdown-timeout", "60")
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("Waiting up to", deadline=10)
    assert worker.process.poll() is None  # warm: it waits for the 60 s tasks

    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == exitcodes.OK, worker.diagnostics()
    assert time.monotonic() - sent < 5, "cold shutdown is not quick"

    assert all(stored(redis_client, task_id) is None for task_id in ids)
    assert queue_depth(unique_name) == 4  # the two cancelled and the two unstarted
    log = worker.stderr
    summary = lines_with("Cold shutdown", log)
    assert len(summary) == 1, log
    assert "2 cancelled and returned" in summary[0], summary
    assert not lines_with("Warm shutdown", log), log


def test_sigquit_is_a_cold_shutdown(spawn: Callable[..., WorkerProcess], unique_name: str,
                                    redis_url: str, redis_client: redis.Redis) -> None:
    worker, ids = start_busy_worker(spawn, unique_name, redis_url, redis_client, 3, 60.0,
                                    "--shutdown-timeout", "60")
    sent = time.monotonic()
    worker.signal(signal.SIGQUIT)
    assert worker.wait(10) == exitcodes.OK, worker.diagnostics()
    assert time.monotonic() - sent < 5, "cold shutdown is not quick"

    assert all(stored(redis_client, task_id) is None for task_id in ids)
    assert queue_depth(unique_name) == 3
    log = worker.stderr
    assert len(lines_with("Cold shutdown", log)) == 1, log
    assert not lines_with("Warm shutdown", log), log


# --- start-up errors ---------------------------------------------------------------------------
# The same exit codes and messages with the supervisor (the default) and with -P solo. Those
# before any server (an app that cannot be loaded): tests/unit/test_worker_startup_errors.py.

POOLS = pytest.mark.parametrize("pool", ["processes", "solo"])


@POOLS
def test_wrong_broker_password_is_a_startup_error_without_the_password(
        pool: str, spawn: Callable[..., WorkerProcess], unique_name: str,
        redis_url: str) -> None:
    parts = urlsplit(AMQP_URL)
    password = "Wr0ng-p4ssw0rd-" + uuid.uuid4().hex[:6]
    host = f"{parts.hostname}:{parts.port or 5672}"
    bad_url = f"amqp://{parts.username or 'guest'}:{password}@{host}{parts.path or '/'}"
    started = time.monotonic()
    worker = spawn("worker", "-P", pool, "-Q", unique_name, APP_SPEC,
                   env=proc_env(unique_name, redis_url, broker=bad_url))
    assert worker.wait(30) == exitcodes.STARTUP_ERROR, worker.diagnostics()
    assert time.monotonic() - started < 20
    output = worker.stderr + worker.stdout
    assert password not in output, output
    assert "***" in worker.stderr, worker.stderr
    assert "start-up failed" in worker.stderr, worker.stderr


@POOLS
def test_the_command_refuses_memory_urls(pool: str, spawn: Callable[..., WorkerProcess],
                                         unique_name: str) -> None:
    worker = spawn("worker", "-P", pool, "-Q", unique_name, APP_SPEC,
                   env=proc_env(unique_name, "memory://", broker="memory://"))
    assert worker.wait(30) == exitcodes.STARTUP_ERROR, worker.diagnostics()
    assert "memory:// lives in one process" in worker.stderr, worker.stderr
    assert "aio_celery.testing.worker" in worker.stderr, worker.stderr
