"""A REAL Celery worker runs tasks that aio-celery sends, and each side reads the other's
results.

One ``celery worker`` subprocess (``-P threads``, no gossip/mingle) is started for
the module on a queue of its own, with the run's Redis database as result backend; its tasks
live in ``celery_tasks.py`` next to this file. Our client publishes with ``delay``,
``apply_async``, ``send_task``, chains, groups and links; our ``AsyncResult`` reads what the
worker stored. The other way round, a Celery client reads results that we store.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import celery
import celery.exceptions
import celery.result
import pytest
from celery_tasks import InteropError
from helpers import AMQP_URL, REDIS_HOST_URL, delete_queues_with_prefix
from workers import CeleryWorker

from aio_celery import Celery, chain, exceptions, group, resultmeta, states
from aio_celery.task import Task

pytestmark = pytest.mark.interop

RESULT_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def worker_queue() -> Iterator[str]:
    name = f"aio-celery-test-interop-worker-{uuid.uuid4().hex[:8]}"
    yield name
    delete_queues_with_prefix(name)


@pytest.fixture(scope="module")
def celery_worker(worker_queue: str, redis_db: int) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(worker_queue, f"{REDIS_HOST_URL}/{redis_db}")
    worker.wait_ready()
    try:
        yield worker
    finally:
        worker.stop()


async def _never_run_here(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("this task runs in the Celery worker, not here")


TASK_NAMES = ("add", "mul", "echo", "digest", "fail", "divide", "on_error", "introspect")


@pytest.fixture
async def client(celery_worker: CeleryWorker, redis_url: str) -> AsyncIterator[Celery]:
    """Our app, sending to the worker's queue; the worker's tasks are registered by name."""
    assert celery_worker.backend_url == redis_url
    app = Celery("interop-client")
    app.conf.update(broker_url=AMQP_URL, result_backend=redis_url,
                    task_default_queue=celery_worker.queue)
    for name in TASK_NAMES:
        app.task(name=f"interop.{name}")(_never_run_here)
    async with app.setup():
        yield app


def task(app: Celery, name: str) -> Task:
    return app.tasks[f"interop.{name}"]


@pytest.fixture
def celery_client(redis_url: str) -> Iterator[celery.Celery]:
    """A real Celery app that only reads results from the run's Redis database."""
    app = celery.Celery("interop-reader", broker=AMQP_URL, backend=redis_url,
                        set_as_current=False)
    app.conf.update(result_serializer="json", accept_content=["json"])
    try:
        yield app
    finally:
        app.close()


# --- a Celery worker runs what we send ---------------------------------------------------------

async def test_delay_positional_args(client: Celery) -> None:
    result = await task(client, "add").delay(2, 3)
    assert await result.get(timeout=RESULT_TIMEOUT) == 5
    assert await result.successful()
    assert result.state == states.SUCCESS


async def test_apply_async_kwargs(client: Celery) -> None:
    result = await task(client, "add").apply_async(kwargs={"x": 40, "y": 2})
    assert await result.get(timeout=RESULT_TIMEOUT) == 42


async def test_send_task_by_name_unicode_and_nested(client: Celery) -> None:
    args = ["héllo wörld ✓ 漢字 🎉", {"nested": {"list": [1, 2.5, None, True], "ü": "ö"}}]
    kwargs = {"deep": {"a": {"b": {"c": [{"d": "€"}]}}}, "empty": {}, "quote": 'say "hi"\n'}
    result = await client.send_task("interop.echo", args=args, kwargs=kwargs)
    assert await result.get(timeout=RESULT_TIMEOUT) == {"args": args, "kwargs": kwargs}


async def test_one_mib_argument(client: Celery) -> None:
    import hashlib

    data = ("0123456789abcdef✓" * 65536)[: 1 << 20]
    result = await task(client, "digest").delay(data, tag="big")
    assert await result.get(timeout=RESULT_TIMEOUT) == {
        "length": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest(),
        "kwargs": {"tag": "big"}}


async def test_the_worker_reads_our_headers(client: Celery, celery_worker: CeleryWorker) -> None:
    result = await task(client, "introspect").apply_async((1, "two"), {"three": 3})
    info = await result.get(timeout=RESULT_TIMEOUT)
    assert info["id"] == info["correlation_id"] == info["root_id"] == result.id
    assert info["task"] == "interop.introspect"
    assert (info["args"], info["kwargs"]) == ([1, "two"], {"three": 3})
    assert info["parent_id"] is None
    assert info["retries"] == 0
    assert info["eta"] is None and info["expires"] is None
    assert info["routing_key"] == celery_worker.queue
    assert info["reply_to"] == client.oid
    assert info["origin"].startswith(f"gen{os.getpid()}@")


async def test_time_limits_reach_the_worker_as_hard_then_soft(client: Celery) -> None:
    """Celery reads the ``timelimit`` header as ``[time_limit, soft_time_limit]``."""
    result = await task(client, "introspect").apply_async(soft_time_limit=50, time_limit=100)
    info = await result.get(timeout=RESULT_TIMEOUT)
    assert info["timelimit"] == [100, 50]


async def test_countdown(client: Celery) -> None:
    sent = datetime.now(UTC)
    started = time.monotonic()
    result = await task(client, "introspect").apply_async(("later",), countdown=1)
    info = await result.get(timeout=RESULT_TIMEOUT)
    assert time.monotonic() - started >= 0.9
    assert info["args"] == ["later"]
    eta = datetime.fromisoformat(info["eta"])
    assert timedelta(seconds=0.9) < eta - sent < timedelta(seconds=2)


async def test_expires_reaches_the_worker(client: Celery) -> None:
    result = await task(client, "introspect").apply_async(expires=120)
    info = await result.get(timeout=RESULT_TIMEOUT)
    expires = datetime.fromisoformat(info["expires"])
    assert timedelta(seconds=110) < expires - datetime.now(UTC) <= timedelta(seconds=120)


async def test_expired_before_its_eta_is_revoked(client: Celery) -> None:
    """The worker holds the message until its eta, finds it expired and stores REVOKED."""
    result = await task(client, "introspect").apply_async(countdown=1, expires=0.5)
    with pytest.raises(exceptions.TaskRevokedError):
        await result.get(timeout=RESULT_TIMEOUT)
    assert result.state == states.REVOKED


# --- failures come back as their classes ---------------------------------------------------

async def test_custom_exception_with_two_args(client: Celery) -> None:
    result = await task(client, "fail").delay("E42", {"why": "ünïcode", "n": [1, 2]})
    with pytest.raises(InteropError) as caught:
        await result.get(timeout=RESULT_TIMEOUT)
    assert type(caught.value) is InteropError
    assert caught.value.args == ("E42", {"why": "ünïcode", "n": [1, 2]})
    assert result.state == states.FAILURE
    assert result.traceback is not None and "InteropError" in result.traceback
    assert await result.failed()


async def test_builtin_exception(client: Celery) -> None:
    result = await task(client, "divide").delay(1, 0)
    with pytest.raises(ZeroDivisionError):
        await result.get(timeout=RESULT_TIMEOUT)
    assert isinstance(await result.get(timeout=RESULT_TIMEOUT, propagate=False),
                      ZeroDivisionError)


# --- canvas ----------------------------------------------------------------------------------

async def test_chain_runs_in_order(client: Celery) -> None:
    add, mul = task(client, "add"), task(client, "mul")
    result = await chain(add.s(1, 2), add.s(3), mul.s(4)).apply_async()
    assert await result.get(timeout=RESULT_TIMEOUT) == 24  # ((1 + 2) + 3) * 4
    assert result.parent is not None and result.parent.parent is not None
    assert await result.parent.get(timeout=RESULT_TIMEOUT) == 6
    assert await result.parent.parent.get(timeout=RESULT_TIMEOUT) == 3


async def test_chain_task_id_names_the_last_step(client: Celery) -> None:
    """In Celery ``chain(...).apply_async(task_id=X)`` gives X to the chain's result, i.e.
    its last step (see tests/messages/valid_chain.json)."""
    add, mul = task(client, "add"), task(client, "mul")
    chain_id = str(uuid.uuid4())
    result = await chain(add.s(1, 2), mul.s(10)).apply_async(task_id=chain_id)
    assert result.id == chain_id
    assert await client.AsyncResult(chain_id).get(timeout=RESULT_TIMEOUT) == 30


async def test_group_members_know_their_group(client: Celery) -> None:
    introspect = task(client, "introspect")
    group_result = await group(introspect.s(index) for index in range(3)).apply_async()
    infos = await group_result.get(timeout=RESULT_TIMEOUT)
    assert [info["args"] for info in infos] == [[0], [1], [2]]
    assert [info["group"] for info in infos] == [group_result.id] * 3
    assert [info["group_index"] for info in infos] == [0, 1, 2]


async def test_link_callback(client: Celery) -> None:
    callback_id = str(uuid.uuid4())
    callback = task(client, "mul").s(10).set(task_id=callback_id)
    result = await task(client, "add").apply_async((1, 2), link=callback)
    assert await result.get(timeout=RESULT_TIMEOUT) == 3
    assert await client.AsyncResult(callback_id).get(timeout=RESULT_TIMEOUT) == 30


async def test_link_error_errback(client: Celery) -> None:
    errback_id = str(uuid.uuid4())
    errback = task(client, "on_error").s().set(task_id=errback_id)
    result = await task(client, "fail").apply_async(("E1", None), link_error=errback)
    with pytest.raises(InteropError):
        await result.get(timeout=RESULT_TIMEOUT)
    assert await client.AsyncResult(errback_id).get(timeout=RESULT_TIMEOUT) == (
        f"errback for {result.id}")


# --- a Celery client reads what we store ---------------------------------------------------

async def test_our_store_emits_no_deprecation_warning(client: Celery) -> None:
    """pytest turns warnings into errors: storing a result must not warn (redis-py 8
    deprecates SETEX; ``SET key value EX seconds`` is the same command)."""
    task_id = str(uuid.uuid4())
    await client.backend.store(resultmeta.build_meta(task_id, states.SUCCESS, 1,
                                                     now=client.now()))
    assert await client.AsyncResult(task_id).get(timeout=RESULT_TIMEOUT) == 1


async def test_celery_reads_our_success(client: Celery, celery_client: celery.Celery) -> None:
    task_id = str(uuid.uuid4())
    value = {"answer": 42, "text": "ünïcode ✓", "list": [1, None, 2.5]}
    await client.backend.store(resultmeta.build_meta(task_id, states.SUCCESS, value,
                                                     now=client.now()))
    theirs = celery.result.AsyncResult(task_id, app=celery_client)
    assert await asyncio.to_thread(theirs.get, timeout=RESULT_TIMEOUT) == value
    assert theirs.state == "SUCCESS"
    assert theirs.date_done is not None


async def test_celery_reads_our_failure(client: Celery, celery_client: celery.Celery) -> None:
    task_id = str(uuid.uuid4())
    failure = resultmeta.exception_to_dict(ValueError("a", 1))
    await client.backend.store(resultmeta.build_meta(
        task_id, states.FAILURE, failure, now=client.now(), traceback="Traceback: ..."))
    theirs = celery.result.AsyncResult(task_id, app=celery_client)
    with pytest.raises(ValueError) as caught:
        await asyncio.to_thread(theirs.get, timeout=RESULT_TIMEOUT)
    assert type(caught.value) is ValueError
    assert caught.value.args == ("a", 1)
    assert theirs.state == "FAILURE"
    assert theirs.traceback == "Traceback: ..."


async def test_celery_reads_our_custom_failure(client: Celery,
                                               celery_client: celery.Celery) -> None:
    task_id = str(uuid.uuid4())
    failure = resultmeta.exception_to_dict(InteropError("E7", {"k": [1]}))
    await client.backend.store(resultmeta.build_meta(task_id, states.FAILURE, failure,
                                                     now=client.now()))
    theirs = celery.result.AsyncResult(task_id, app=celery_client)
    with pytest.raises(InteropError) as caught:
        await asyncio.to_thread(theirs.get, timeout=RESULT_TIMEOUT)
    assert caught.value.args == ("E7", {"k": [1]})


async def test_celery_reads_our_revoked(client: Celery, celery_client: celery.Celery) -> None:
    task_id = str(uuid.uuid4())
    failure = resultmeta.exception_to_dict(exceptions.TaskRevokedError("expired"))
    await client.backend.store(resultmeta.build_meta(task_id, states.REVOKED, failure,
                                                     now=client.now()))
    theirs = celery.result.AsyncResult(task_id, app=celery_client)
    with pytest.raises(celery.exceptions.TaskRevokedError):
        await asyncio.to_thread(theirs.get, timeout=RESULT_TIMEOUT)
