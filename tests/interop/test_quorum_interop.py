"""Quorum queues with the REAL Celery 5.7, both ways (``task_default_queue_type="quorum"``,
a topic exchange, so countdown/eta travel through native delayed delivery):

* a Celery client declares the quorum queue first; OUR worker (prefetch 80, so no global
  QoS: RabbitMQ would refuse it a quorum consumer) runs its plain tasks, and its countdown
  tasks, which the Celery client sends to ``celery_delayed_27`` (our worker declared that
  topology and bound the queue at start-up, as a Celery worker does);
* OUR client sends plain and countdown tasks to a REAL Celery worker on a quorum queue.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import celery
import celery.exceptions
import celery.result
import pytest
from helpers import AMQP_URL, REDIS_HOST_URL, close_celery_client, delete_queues_with_prefix
from workers import CeleryWorker, OurWorker

from aio_celery import Celery, exitcodes

pytestmark = pytest.mark.interop

RESULT_TIMEOUT = 15.0
QUORUM = {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"}


@pytest.fixture(scope="module")
def backend_url(redis_db: int) -> str:
    return f"{REDIS_HOST_URL}/{redis_db}"


# --- a Celery client, our worker ------------------------------------------------------------


@pytest.fixture(scope="module")
def ours_queue() -> Iterator[str]:
    name = f"aio-celery-test-quorum-ours-{uuid.uuid4().hex[:8]}"
    yield name
    delete_queues_with_prefix(name)


@pytest.fixture(scope="module")
def celery_client(ours_queue: str, backend_url: str) -> Iterator[celery.Celery]:
    app = celery.Celery("quorum-caller", broker=AMQP_URL, backend=backend_url,
                        set_as_current=False)
    app.conf.update(task_default_queue=ours_queue, task_serializer="json",
                    result_serializer="json", accept_content=["json"], **QUORUM)
    try:
        yield app
    finally:
        close_celery_client(app)


@pytest.fixture(scope="module")
def our_worker(ours_queue: str, backend_url: str, celery_client: celery.Celery,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[OurWorker]:
    # Celery declares the queue first, as its own worker or client would.
    with celery_client.connection_for_write() as connection:
        celery_client.amqp.queues[ours_queue](connection.default_channel).declare()
    worker = OurWorker(ours_queue, backend_url, tmp_path_factory.mktemp("our-worker"),
                       quorum=True)
    try:
        worker.wait_ready()
        yield worker
        code = worker.stop()
        assert code == exitcodes.OK, worker.diagnostics()
    finally:
        worker.kill()


def get(result: celery.result.AsyncResult, worker: OurWorker) -> Any:
    try:
        return result.get(timeout=RESULT_TIMEOUT)
    except celery.exceptions.TimeoutError:
        pytest.fail(f"no result for {result.id} within {RESULT_TIMEOUT}s\n"
                    f"{worker.diagnostics()}", pytrace=False)


def test_our_worker_runs_celerys_tasks_on_a_quorum_queue_celery_declared(
        celery_client: celery.Celery, our_worker: OurWorker) -> None:
    results = [celery_client.send_task("ours.add", (i, i)) for i in range(40)]
    assert [get(r, our_worker) for r in results] == [2 * i for i in range(40)]
    assert "x-queue-type" not in our_worker.log  # no 406 inequivalent arg
    assert "NOT_IMPLEMENTED" not in our_worker.log  # no 540 for global QoS


def test_celerys_countdown_reaches_our_worker_through_native_delayed_delivery(
        celery_client: celery.Celery, our_worker: OurWorker) -> None:
    sent = time.time()
    result = celery_client.send_task("ours.when", countdown=2)
    now = celery_client.send_task("ours.add", (1, 2))
    assert get(now, our_worker) == 3
    assert not result.ready()  # waiting in the celery_delayed_* levels, not in the queue
    ran = get(result, our_worker)
    assert ran["eta"] is not None
    assert ran["ran_at"] >= sent + 1.9, ran
    # It came out of the delayed levels: the last hop's exchange, the routing key's bits.
    assert ran["exchange"] == "celery_delayed_0", ran
    assert ran["routing_key"] == "0." * 26 + "1.0." + our_worker.queue, ran


# --- our client, a Celery worker ------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_queue() -> Iterator[str]:
    name = f"aio-celery-test-quorum-celery-{uuid.uuid4().hex[:8]}"
    yield name
    delete_queues_with_prefix(name)


@pytest.fixture(scope="module")
def celery_worker(celery_queue: str, backend_url: str) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(celery_queue, backend_url, quorum=True)
    worker.wait_ready()
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
async def client(celery_worker: CeleryWorker, redis_url: str) -> AsyncIterator[Celery]:
    app = Celery("quorum-client", set_as_current=False)
    app.conf.update(broker_url=AMQP_URL, result_backend=redis_url,
                    task_default_queue=celery_worker.queue, **QUORUM)
    async with app.setup():
        yield app


async def test_a_celery_worker_runs_our_tasks_on_a_quorum_queue(
        client: Celery, celery_worker: CeleryWorker) -> None:
    results = [await client.send_task("interop.add", (i, 1)) for i in range(20)]
    try:
        assert [await r.get(timeout=RESULT_TIMEOUT) for r in results] == \
            [i + 1 for i in range(20)]
    except TimeoutError:
        pytest.fail(celery_worker.diagnostics(), pytrace=False)


async def test_our_countdown_reaches_a_celery_worker_through_native_delayed_delivery(
        client: Celery, celery_worker: CeleryWorker) -> None:
    sent = time.time()
    result = await client.send_task("interop.introspect", countdown=2)
    try:
        seen = await result.get(timeout=RESULT_TIMEOUT)
    except TimeoutError:
        pytest.fail(celery_worker.diagnostics(), pytrace=False)
    done = time.time()
    assert seen["eta"] is not None
    # Celery's worker saw it come out of the delayed levels: the routing key keeps the bits.
    assert seen["routing_key"].endswith("." + celery_worker.queue), seen
    assert seen["routing_key"].count(".") >= 28, seen
    assert done >= sent + 1.9
