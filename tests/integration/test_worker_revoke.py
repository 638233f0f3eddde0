"""Revoke inside one worker process: skipped at receipt, REVOKED stored in Celery's format,
``task_revoked`` sent, the message acked; ``terminate`` cancels the running coroutine and
frees its slot; revokes persisted in Redis reach a process started later."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from helpers import eventually, ready_count

from aio_celery import Celery, signals, states
from aio_celery.control import revoked as revoked_ids
from aio_celery.exceptions import TaskRevokedError
from aio_celery.worker.remote import WorkerNode


@pytest.fixture
def revoked_signals() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append({"task": getattr(sender, "name", None), **kwargs})

    signals.task_revoked.connect(receiver)
    try:
        yield seen
    finally:
        signals.task_revoked.disconnect(receiver)


def node_of(handle: Any) -> WorkerNode:
    mailbox = handle.worker.mailbox
    assert mailbox is not None
    node = mailbox.node
    assert isinstance(node, WorkerNode)
    return node


async def test_a_revoked_task_is_skipped_at_receipt(
        app: Celery, start_worker: Any, unique_name: str, amqp: AbstractConnection,
        revoked_signals: list[dict[str, Any]]) -> None:
    ran: list[str] = []

    @app.task(name=f"{unique_name}.job")
    async def job() -> None:
        ran.append("ran")

    handle = await start_worker(concurrency=2, hostname=f"{unique_name}@test")
    task_id = str(uuid.uuid4())
    assert await node_of(handle).revoke([task_id], terminate=False) == []
    stored = await app.backend.get_meta(task_id)  # it was PENDING: REVOKED at once
    assert stored is not None and stored["status"] == states.REVOKED
    result = await job.apply_async(task_id=task_id)
    await eventually(lambda: revoked_signals, what="task_revoked sent")
    meta = await app.backend.get_meta(task_id)
    assert meta is not None and meta["status"] == states.REVOKED
    assert meta["result"] == {"exc_type": "TaskRevokedError", "exc_message": ["revoked"],
                              "exc_module": "celery.exceptions"}
    assert isinstance(await asyncio.wait_for(result.get(propagate=False), 5),
                      TaskRevokedError)
    assert revoked_signals[0]["terminated"] is False
    assert revoked_signals[0]["expired"] is False
    assert ran == []
    await handle.stop()
    assert await ready_count(amqp, unique_name) == 0  # acked, not given back


async def test_terminate_cancels_the_running_coroutine_and_frees_its_slot(
        app: Celery, start_worker: Any, unique_name: str,
        revoked_signals: list[dict[str, Any]]) -> None:
    started = asyncio.Event()
    seen: list[str] = []

    @app.task(name=f"{unique_name}.long")
    async def long() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    @app.task(name=f"{unique_name}.short")
    async def short() -> str:
        return "next"

    handle = await start_worker(concurrency=1, hostname=f"{unique_name}@test")
    running = await long.delay()
    await asyncio.wait_for(started.wait(), 10)
    node = node_of(handle)
    assert [entry["id"] for entry in node.active(safe=True)] == [running.id]
    assert await node.revoke([running.id], terminate=True) == [running.id]
    assert isinstance(await asyncio.wait_for(running.get(propagate=False), 10),
                      TaskRevokedError)
    meta = await app.backend.get_meta(running.id)
    assert meta is not None and meta["result"]["exc_message"] == ["terminated"]
    assert seen == ["cancelled inside"]
    assert revoked_signals[0]["terminated"] is True
    nxt = await short.delay()  # concurrency 1: the slot was freed
    assert await asyncio.wait_for(nxt.get(), 10) == "next"
    assert node.active(safe=True) == []
    assert await handle.stop() == 0


async def test_a_process_started_later_loads_the_persisted_revokes(
        app: Celery, start_worker: Any, unique_name: str) -> None:
    first = await start_worker(concurrency=1, hostname=f"{unique_name}-a@test")
    task_id = f"persisted-{uuid.uuid4()}"
    await node_of(first).revoke([task_id], terminate=False)
    await first.stop()
    later = await start_worker(concurrency=1, hostname=f"{unique_name}-b@test")
    assert task_id in later.worker.revoked.ids()
    score = await app.backend.client.zscore(revoked_ids.REDIS_KEY, task_id)
    assert score is not None
    await later.stop()


async def test_hello_exchanges_revoked_ids_with_a_starting_celery_worker(
        app: Celery, start_worker: Any, unique_name: str) -> None:
    handle = await start_worker(concurrency=1, hostname=f"{unique_name}@test")
    node = node_of(handle)
    ours, theirs = f"ours-{uuid.uuid4()}", f"theirs-{uuid.uuid4()}"
    await node.revoke([ours], terminate=False)
    reply = node.hello("celery@elsewhere", [theirs])
    assert reply is not None
    # (revokes of the run's other tests, loaded from Redis at start, come first)
    assert reply["revoked"][-2:] == [ours, theirs]
    assert isinstance(reply["clock"], int)
    assert handle.worker.runner.is_revoked(theirs)
    assert node.hello(f"{unique_name}@test", ["x"]) is None  # its own hello
    await handle.stop()


async def test_conf_shows_the_changed_settings_without_passwords(
        app: Celery, start_worker: Any, unique_name: str) -> None:
    handle = await start_worker(concurrency=1, hostname=f"{unique_name}@test")
    conf = node_of(handle).conf()
    assert conf["task_default_queue"] == unique_name
    assert conf["broker_url"].startswith("amqp://guest:***@")
    assert "worker_prefetch_multiplier" not in conf  # a default
    await handle.stop()
