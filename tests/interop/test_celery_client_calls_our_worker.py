"""A REAL Celery client calls tasks that OUR worker runs, and reads the results with
Celery's own ``AsyncResult.get``.

One ``python -m aio_celery worker -P solo`` subprocess (tasks in ``our_tasks.py`` next to this
file) consumes a queue of its own for the whole module; the Celery client publishes with
``send_task``/``apply_async``/``chain``. The priority test starts a second worker on a
priority queue (``<queue>-high``) that the Celery client declared first.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import celery
import celery.exceptions
import celery.result
import pytest
import redis
from helpers import (
    AMQP_URL,
    REDIS_HOST_URL,
    close_celery_client,
    delete_queues_with_prefix,
    queue_depth,
    wait_until,
)
from shared_exc import SharedError
from workers import OurWorker

from aio_celery import exitcodes
from aio_celery.resultmeta import result_key

pytestmark = pytest.mark.interop

RESULT_TIMEOUT = 15.0


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def queue() -> Iterator[str]:
    name = f"aio-celery-test-interop-ours-{uuid.uuid4().hex[:8]}"
    yield name
    delete_queues_with_prefix(name)  # the queue and <queue>-high


@pytest.fixture(scope="module")
def backend_url(redis_db: int) -> str:
    return f"{REDIS_HOST_URL}/{redis_db}"


@pytest.fixture(scope="module")
def our_worker(queue: str, backend_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[OurWorker]:
    worker = OurWorker(queue, backend_url, tmp_path_factory.mktemp("our-worker"))
    try:
        worker.wait_ready()
        yield worker
        code = worker.stop()
        assert code == exitcodes.OK, worker.diagnostics()
        assert "Warm shutdown" in worker.log
    finally:
        worker.kill()


def make_celery_client(name: str, queue: str, backend_url: str,
                       **settings: Any) -> celery.Celery:
    app = celery.Celery(name, broker=AMQP_URL, backend=backend_url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_serializer="json",
                    result_serializer="json", accept_content=["json", "pickle"],
                    result_accept_content=["json"], **settings)
    return app


@pytest.fixture(scope="module")
def celery_app(queue: str, backend_url: str) -> Iterator[celery.Celery]:
    """The real Celery client (pickle allowed on its side, for the pickle test)."""
    app = make_celery_client("interop-caller", queue, backend_url)
    try:
        yield app
    finally:
        close_celery_client(app)


def get(result: celery.result.AsyncResult, worker: OurWorker,
        timeout: float = RESULT_TIMEOUT) -> Any:
    """Celery's ``get``; a timeout fails with our worker's log."""
    try:
        return result.get(timeout=timeout)
    except celery.exceptions.TimeoutError:
        pytest.fail(f"no result for {result.id} within {timeout}s\n{worker.diagnostics()}",
                    pytrace=False)


def settle(celery_app: celery.Celery, worker: OurWorker) -> None:
    """Run one task to completion: what the worker received before it is handled by now."""
    assert get(celery_app.send_task("ours.add", (1, 1)), worker) == 2


# --- arguments and results -------------------------------------------------------------------

def test_send_task_args_kwargs_unicode_nested(celery_app: celery.Celery,
                                              our_worker: OurWorker) -> None:
    args = ["héllo wörld ✓ 漢字 🎉", {"nested": {"list": [1, 2.5, None, True], "ü": "ö"}}]
    kwargs = {"deep": {"a": {"b": {"c": [{"d": "€"}]}}}, "empty": {}, "quote": 'say "hi"\n'}
    result = celery_app.send_task("ours.echo", args=args, kwargs=kwargs)
    assert get(result, our_worker) == {"args": args, "kwargs": kwargs}
    assert result.state == "SUCCESS"
    assert result.successful()


def test_apply_async_positional_and_keyword(celery_app: celery.Celery,
                                            our_worker: OurWorker) -> None:
    add = celery_app.signature("ours.add")
    assert get(add.apply_async((2, 3)), our_worker) == 5
    assert get(celery_app.send_task("ours.add", kwargs={"x": 40, "y": 2}), our_worker) == 42


def test_one_mib_string_argument(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    data = ("0123456789abcdef✓" * 65536)[: 1 << 20]
    result = celery_app.send_task("ours.length", args=(data,))
    assert get(result, our_worker) == 1 << 20


def test_custom_exception_is_rebuilt_by_celery(celery_app: celery.Celery,
                                               our_worker: OurWorker) -> None:
    detail = {"why": "ünïcode", "n": [1, 2]}
    result = celery_app.send_task("ours.fail", args=("E42", detail))
    with pytest.raises(SharedError) as caught:
        get(result, our_worker)
    assert type(caught.value) is SharedError
    assert caught.value.args == ("E42", detail)
    assert result.state == "FAILURE"
    assert result.failed()
    assert result.traceback is not None and "SharedError" in result.traceback


def test_get_while_the_task_is_still_running(celery_app: celery.Celery,
                                             our_worker: OurWorker) -> None:
    started = time.monotonic()
    result = celery_app.send_task("ours.sleep", args=(1.0, "slept"))
    assert result.state == "PENDING"
    assert get(result, our_worker) == "slept"
    assert time.monotonic() - started >= 0.9
    assert result.state == "SUCCESS"


# --- timing ----------------------------------------------------------------------------------

def test_countdown(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    sent = time.time()
    result = celery_app.send_task("ours.when", countdown=1)
    info = get(result, our_worker)
    assert info["ran_at"] - sent >= 0.95
    eta = datetime.fromisoformat(info["eta"])
    assert timedelta(seconds=0.9) < eta - datetime.fromtimestamp(sent, UTC) < timedelta(
        seconds=2)


def test_a_rate_limited_task_called_by_celery_keeps_its_rate(
        celery_app: celery.Celery, our_worker: OurWorker) -> None:
    """``ours.paced`` is declared with ``rate_limit="5/s"``: eight calls from Celery's
    client start at least 0.2 s apart in all (the first one finds the bucket full and may
    start a few milliseconds after its token: 0.05 s for that)."""
    results = [celery_app.send_task("ours.paced") for _ in range(8)]
    started = sorted(get(result, our_worker) for result in results)
    assert started[-1] - started[0] >= 7 * 0.2 - 0.05, started
    assert started[-1] - started[0] < 7 * 0.2 + 4.0, started  # a loaded machine


def test_eta_with_a_plus_0530_offset(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    eta = datetime.now(india) + timedelta(seconds=1.2)
    result = celery_app.send_task("ours.when", eta=eta)
    info = get(result, our_worker)
    assert info["ran_at"] >= eta.timestamp() - 0.05
    assert datetime.fromisoformat(info["eta"]) == eta


def test_retry_twice_then_succeed(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    result = celery_app.send_task("ours.flaky", args=(2,))
    assert get(result, our_worker) == {"retries": 2, "id": result.id}
    assert result.state == "SUCCESS"


def test_expired_task_is_revoked(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    result = celery_app.send_task("ours.add", args=(1, 2),
                                  expires=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(celery.exceptions.TaskRevokedError):
        get(result, our_worker)
    assert result.state == "REVOKED"


# --- canvas ----------------------------------------------------------------------------------

def test_chain(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    workflow = celery.chain(celery_app.signature("ours.add", args=(1, 2)),
                            celery_app.signature("ours.mul", args=(10,)))
    result = workflow.apply_async()
    assert get(result, our_worker) == 30  # (1 + 2) * 10
    assert result.parent is not None
    assert get(result.parent, our_worker) == 3


# --- what must not run or not be stored ------------------------------------------------------

def test_ignore_result_stores_nothing(celery_app: celery.Celery, our_worker: OurWorker,
                                      redis_client: redis.Redis) -> None:
    key = f"aio-celery-test-interop-mark-{uuid.uuid4().hex}"
    result = celery_app.send_task("ours.mark", args=(key,), ignore_result=True)
    wait_until(lambda: redis_client.get(key) == b"ran", RESULT_TIMEOUT, "the task ran",
                our_worker.diagnostics)
    wait_until(lambda: f"ours.mark[{result.id}] succeeded" in our_worker.log, RESULT_TIMEOUT,
                "the worker finished the task", our_worker.diagnostics)
    settle(celery_app, our_worker)
    assert not redis_client.exists(result_key(result.id))


def test_unknown_task_name(celery_app: celery.Celery, our_worker: OurWorker) -> None:
    result = celery_app.send_task("ours.no_such_task", args=(1,))
    with pytest.raises(celery.exceptions.NotRegistered) as caught:
        get(result, our_worker)
    assert "ours.no_such_task" in str(caught.value)
    assert result.state == "FAILURE"


def test_pickle_message_is_rejected_without_requeue(
        celery_app: celery.Celery, our_worker: OurWorker, redis_client: redis.Redis) -> None:
    marker = f"pk{uuid.uuid4().hex[:10]}"
    result = celery_app.send_task("ours.echo", args=(marker,), serializer="pickle")

    def rejections() -> list[str]:
        return [line for line in our_worker.log.splitlines() if marker in line]

    wait_until(lambda: bool(rejections()), RESULT_TIMEOUT,
                "the worker logs the rejected pickle message", our_worker.diagnostics)
    line = rejections()[0]
    assert "pickle" in line and "without requeue" in line, line
    settle(celery_app, our_worker)  # a requeued message would have come back by now
    assert len(rejections()) == 1, rejections()
    assert queue_depth(our_worker.queue) == 0
    assert not redis_client.exists(result_key(result.id))
    assert result.state == "PENDING"


# --- priority queue --------------------------------------------------------------------------

def test_priority_queue_declared_by_both_sides(
        queue: str, backend_url: str, redis_client: redis.Redis,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The Celery client declares ``x-max-priority=10`` and publishes first; our worker
    declares the same queue with the same setting and gets the messages by priority."""
    high = queue + "-high"
    key = f"aio-celery-test-interop-order-{uuid.uuid4().hex}"
    client = make_celery_client("interop-priority", high, backend_url,
                                task_queue_max_priority=10)
    worker: OurWorker | None = None
    try:
        sent = [client.send_task("ours.record", args=(key, f"low{i}"), priority=1)
                for i in range(3)]
        sent += [client.send_task("ours.record", args=(key, f"high{i}"), priority=9)
                 for i in range(3)]
        # Celery's client publishes without confirms: the queue may count them a moment later.
        wait_until(lambda: queue_depth(high) == 6, RESULT_TIMEOUT, "six messages queued",
                   lambda: f"queue depth {queue_depth(high)}")
        # One at a time, so that the broker's priority order is the execution order.
        worker = OurWorker(high, backend_url, tmp_path_factory.mktemp("priority-worker"),
                           "--prefetch-multiplier", "1", max_priority=10, concurrency=1)
        worker.wait_ready()
        assert [get(r, worker) for r in sent] == [
            "low0", "low1", "low2", "high0", "high1", "high2"]
        assert [item.decode() for item in redis_client.lrange(key, 0, -1)] == [
            "high0:9", "high1:9", "high2:9", "low0:1", "low1:1", "low2:1"]
        # The queue now also carries our worker's declaration: Celery still publishes to it.
        assert get(client.send_task("ours.add", (4, 5), priority=5), worker) == 9
        assert worker.stop() == exitcodes.OK, worker.diagnostics()
        assert "PRECONDITION_FAILED" not in worker.log
    finally:
        if worker is not None:
            worker.kill()
        close_celery_client(client)
