"""Chords across implementations, against the REAL Celery package.

* a Celery client's ``celery.chord(...)`` run by OUR worker (``python -m aio_celery worker``
  with ``our_tasks.py``), read back with Celery's ``AsyncResult.get``;
* our ``chord(...)`` run by a REAL Celery worker (``celery_tasks.py``), read back with ours;
* one chord whose header tasks run on both workers: Celery's and our
  ``on_chord_part_return`` share the same Redis keys and Lua scripts, and whichever worker
  finishes the last member sends the body.

Each worker is a subprocess on a queue of its own; both use the run's Redis database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import celery
import celery.exceptions
import celery.result
import pytest
from celery_tasks import InteropError
from helpers import (
    AMQP_URL,
    REDIS_HOST_URL,
    close_celery_client,
    delete_queues_with_prefix,
    wait_until,
)
from shared_exc import SharedError
from workers import CeleryWorker, OurWorker

import aio_celery.exceptions
from aio_celery import AsyncResult, Celery, GroupResult, chord, exitcodes
from aio_celery.backend import group_key

pytestmark = pytest.mark.interop

RESULT_TIMEOUT = 15.0


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def queues() -> Iterator[tuple[str, str]]:
    """(our worker's queue, the Celery worker's queue)."""
    base = f"aio-celery-test-interop-chord-{uuid.uuid4().hex[:8]}"
    yield base + "-a", base + "-b"
    delete_queues_with_prefix(base)


@pytest.fixture(scope="module")
def backend_url(redis_db: int) -> str:
    return f"{REDIS_HOST_URL}/{redis_db}"


@pytest.fixture(scope="module")
def our_worker(queues: tuple[str, str], backend_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[OurWorker]:
    worker = OurWorker(queues[0], backend_url, tmp_path_factory.mktemp("chord-our-worker"))
    try:
        worker.wait_ready()
        yield worker
        assert worker.stop() == exitcodes.OK, worker.diagnostics()
    finally:
        worker.kill()


@pytest.fixture(scope="module")
def celery_worker(queues: tuple[str, str], backend_url: str) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(queues[1], backend_url)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def celery_app(queues: tuple[str, str], backend_url: str) -> Iterator[celery.Celery]:
    """A real Celery client whose default queue is our worker's."""
    app = celery.Celery("interop-chord-caller", broker=AMQP_URL, backend=backend_url,
                        set_as_current=False)
    app.conf.update(task_default_queue=queues[0], task_serializer="json",
                    result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"])
    try:
        yield app
    finally:
        close_celery_client(app)


async def _never_run_here(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("this task runs in a worker subprocess, not here")


@pytest.fixture
async def client(queues: tuple[str, str], redis_url: str) -> AsyncIterator[Celery]:
    """Our client; ``interop.*`` go to the Celery worker, ``ours.*`` to ours."""
    app = Celery("interop-chord-client")
    app.conf.update(broker_url=AMQP_URL, result_backend=redis_url,
                    task_routes={"ours.*": queues[0], "interop.*": queues[1]})
    for name in ("interop.add", "interop.fail", "interop.tsum", "ours.add", "ours.echo",
                 "ours.fail"):
        app.task(name=name)(_never_run_here)
    async with app.setup():
        yield app


def celery_get(result: celery.result.AsyncResult, *workers: Any) -> Any:
    try:
        return result.get(timeout=RESULT_TIMEOUT)
    except celery.exceptions.TimeoutError:
        logs = "\n".join(w.diagnostics() for w in workers)
        pytest.fail(f"no result for {result.id} within {RESULT_TIMEOUT}s\n{logs}",
                    pytrace=False)


async def our_get(result: AsyncResult, *workers: Any) -> Any:
    try:
        return await result.get(timeout=RESULT_TIMEOUT)
    except TimeoutError:
        logs = "\n".join(w.diagnostics() for w in workers)
        pytest.fail(f"no result for {result.id} within {RESULT_TIMEOUT}s\n{logs}",
                    pytrace=False)


# --- a Celery client's chord, run by our worker ----------------------------------------------

def test_celery_chord_run_by_our_worker(celery_app: celery.Celery,
                                        our_worker: OurWorker) -> None:
    header = [celery_app.signature("ours.add", args=(i, i)) for i in range(5)]
    result = celery.chord(header, celery_app.signature("ours.echo", args=("tail",))).apply_async()
    # Celery's chord body gets the header's results first, then its own args.
    assert celery_get(result, our_worker) == {"args": [[0, 2, 4, 6, 8], "tail"], "kwargs": {}}
    assert isinstance(result.parent, celery.result.GroupResult)
    assert celery_get(result.parent, our_worker) == [0, 2, 4, 6, 8]
    # Our worker cleans up as Celery's does (just after sending the body).
    gid = result.parent.id
    redis_client = celery_app.backend.client
    wait_until(lambda: redis_client.get(group_key(gid, ".c")) == b"done", RESULT_TIMEOUT,
               "the chord is marked done", our_worker.diagnostics)
    assert redis_client.exists(*(group_key(gid, s) for s in (".s", ".j", ".d", ".t"))) == 0


def test_celery_chord_order_follows_the_header(celery_app: celery.Celery,
                                               our_worker: OurWorker) -> None:
    # ours.sleep(seconds, value): the first member finishes last.
    header = [celery_app.signature("ours.sleep", args=(0.05 * (5 - i), f"v{i}"))
              for i in range(6)]
    result = celery.chord(header)(celery_app.signature("ours.echo"))
    assert celery_get(result, our_worker) == {
        "args": [[f"v{i}" for i in range(6)]], "kwargs": {}}


def test_celery_chord_with_a_chain_in_the_header(celery_app: celery.Celery,
                                                 our_worker: OurWorker) -> None:
    header = [
        celery.chain(celery_app.signature("ours.add", args=(1, 2)),
                     celery_app.signature("ours.mul", args=(10,))),
        celery_app.signature("ours.add", args=(5, 5)),
    ]
    result = celery.chord(header, celery_app.signature("ours.echo")).apply_async()
    assert celery_get(result, our_worker) == {"args": [[30, 10]], "kwargs": {}}


def test_celery_chord_with_a_failing_member(celery_app: celery.Celery,
                                            our_worker: OurWorker) -> None:
    failing = celery_app.signature("ours.fail", args=("E7", "detail"))
    header = [celery_app.signature("ours.add", args=(1, 1)), failing]
    result = celery.chord(header, celery_app.signature("ours.echo")).apply_async()
    # Celery's get() raises a failed parent's exception first (the header member's)...
    with pytest.raises(SharedError):
        celery_get(result, our_worker)
    # ...and the body's own result is the ChordError our worker stored.
    body = celery_app.AsyncResult(result.id)
    with pytest.raises(celery.exceptions.ChordError) as caught:
        celery_get(body, our_worker)
    failed_id = result.parent.results[1].id
    assert str(caught.value) == (
        f"Dependency {failed_id} raised SharedError('E7', 'detail')")
    assert body.state == "FAILURE"


# --- our chord, run by a Celery worker -------------------------------------------------------

async def test_our_chord_run_by_a_celery_worker(client: Celery,
                                                celery_worker: CeleryWorker) -> None:
    add, tsum = client.tasks["interop.add"], client.tasks["interop.tsum"]
    result = await chord([add.s(i, i) for i in range(5)], tsum.s("tail")).apply_async()
    assert await our_get(result, celery_worker) == {
        "sum": 20, "values": [0, 2, 4, 6, 8], "rest": ["tail"]}
    header = result.parent
    assert isinstance(header, GroupResult)
    assert await header.get(timeout=RESULT_TIMEOUT) == [0, 2, 4, 6, 8]


async def test_our_chord_with_a_failing_member_on_a_celery_worker(
        client: Celery, celery_worker: CeleryWorker) -> None:
    add, fail, tsum = (client.tasks[f"interop.{n}"] for n in ("add", "fail", "tsum"))
    result = await chord([add.s(1, 1), fail.s("E9", [1])], tsum.s()).apply_async()
    header = result.parent
    assert isinstance(header, GroupResult)
    # Stored under celery.exceptions, read back as our mirrored class.
    with pytest.raises(aio_celery.exceptions.ChordError) as caught:
        await our_get(result, celery_worker)
    assert str(caught.value) == (
        f"Dependency {header.results[1].id} raised InteropError('E9', [1])")
    with pytest.raises(InteropError):
        await header.results[1].get(timeout=RESULT_TIMEOUT)


# --- one chord, both workers -----------------------------------------------------------------

@pytest.mark.parametrize("body", ["interop.tsum", "ours.echo"])
async def test_one_chord_across_both_workers(client: Celery, queues: tuple[str, str],
                                             our_worker: OurWorker,
                                             celery_worker: CeleryWorker, body: str) -> None:
    ours, theirs = client.tasks["ours.add"], client.tasks["interop.add"]
    header = [ours.s(0, 1), theirs.s(1, 1), ours.s(1, 2), theirs.s(2, 2), ours.s(2, 3)]
    # The worker that completes the chord sends the body with ITS routes (as in Celery):
    # give the body its queue, since either worker may send it.
    queue = queues[0] if body.startswith("ours.") else queues[1]
    result = await chord(header, client.tasks[body].s().set(queue=queue)).apply_async()
    value = await our_get(result, our_worker, celery_worker)
    values = [1, 2, 3, 4, 5]
    if body == "interop.tsum":
        assert value == {"sum": 15, "values": values, "rest": []}
    else:
        assert value == {"args": [values], "kwargs": {}}


# --- the shared Redis protocol -----------------------------------------------------------------
