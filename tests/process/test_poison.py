"""The poison guard with the real supervisor: a task that kills its worker process is
retired after ``worker_max_task_deaths`` (3) deaths, while the innocent tasks that ran next
to it are redelivered and complete (``aio_celery.poison``).

Real forks, real RabbitMQ (a classic queue with a dead-letter exchange, and a quorum one,
whose ``x-delivery-count`` RabbitMQ 3.x raises at every return) and Redis; the supervisor
runs as in ``test_supervisor`` (whose ``Supervised`` starts it).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from helpers import AMQP_URL, amqp_connection, queue_depth
from test_supervisor import Supervised, lines_with, wait_until

from aio_celery import Celery
from aio_celery.exceptions import WorkerLostError

APP_SPEC = "tests.process.poison_tasks:app"


@pytest.fixture
def dead_letters(unique_name: str) -> str:
    """The queue the test queue dead-letters to (declared before any worker runs)."""
    name = f"{unique_name}-dlx"
    with amqp_connection() as connection:
        channel = connection.channel()
        channel.queue_declare(name, durable=True, auto_delete=False)
        channel.close()
    return name


@pytest.fixture
def runs(redis_url: str, unique_name: str) -> Iterator[Callable[[str], dict[str, int]]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def read(what: str) -> dict[str, int]:
        return {k: int(v) for k, v in client.hgetall(f"{unique_name}:{what}").items()}

    try:
        yield read
    finally:
        client.close()


def client_app(queue: str, redis_url: str, queue_type: str = "classic") -> Celery:
    """A client that declares the queue as the workers do (with its dead-letter exchange)."""
    client = Celery("poison-client", set_as_current=False)
    client.conf.update(broker_url=AMQP_URL, result_backend=redis_url, task_default_queue=queue,
                       task_default_queue_type=queue_type,
                       task_queue_arguments={"x-dead-letter-exchange": "",
                                             "x-dead-letter-routing-key": f"{queue}-dlx"})
    return client


def publish(queue: str, redis_url: str, calls: list[tuple[str, tuple[Any, ...]]],
            queue_type: str = "classic") -> list[str]:
    async def send() -> list[str]:
        async with client_app(queue, redis_url, queue_type).setup() as client:
            return [(await client.send_task(name, args)).id for name, args in calls]

    return asyncio.run(send())


def dead_lettered_ids(queue: str) -> list[str]:
    with amqp_connection() as connection:
        channel = connection.channel()
        ids = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            ids.append(message.headers["id"])
        channel.close()
    return ids


def results(redis_url: str, queue: str, ids: list[str]) -> list[Any]:
    """``AsyncResult(id).get()`` for each id: the value, or the exception it raises."""

    async def fetch() -> list[Any]:
        outcomes: list[Any] = []
        async with client_app(queue, redis_url).setup() as client:
            for task_id in ids:
                try:
                    outcomes.append(await client.AsyncResult(task_id).get(timeout=5))
                except Exception as exc:
                    outcomes.append(exc)
        return outcomes

    return asyncio.run(fetch())


EXIT = "exited by itself (exit code 0 (ok)) without being asked to: a crash"


@pytest.mark.parametrize(("task", "death", "queue_type"), [
    ("poison.exit", EXIT, "classic"),
    ("poison.segfault", "killed by SIGSEGV", "classic"),
    ("poison.exit", EXIT, "quorum"),
], ids=["exit", "segfault", "exit-quorum"])
def test_a_task_that_kills_its_process_is_retired_after_three_deaths(
        task: str, death: str, queue_type: str, supervise: Callable[..., Supervised],
        unique_name: str, redis_url: str, dead_letters: str,
        runs: Callable[[str], dict[str, int]]) -> None:
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=4,
                    env={"AIO_CELERY_SUP_QUEUE_TYPE": queue_type})
    sup.wait_ready(2)
    # Innocent tasks fill both children; the poison starts next to them and exits its
    # process while they run.
    innocents = publish(unique_name, redis_url, [("poison.ok", (1.0,))] * 6, queue_type)
    wait_until(lambda: len(runs("runs")) >= 6, 15, "the innocent tasks run", sup.diagnostics)
    [poison] = publish(unique_name, redis_url, [(task, (0.3,))], queue_type)
    innocents += publish(unique_name, redis_url, [("poison.ok", (0.5,))] * 10, queue_type)

    wait_until(lambda: queue_depth(dead_letters) == 1, 40, "the poison is dead-lettered",
               sup.diagnostics)
    wait_until(lambda: set(runs("done")) == set(innocents), 30, "every innocent task is done",
               sup.diagnostics)
    assert runs("runs")[poison] == 3, sup.diagnostics()
    assert dead_lettered_ids(dead_letters) == [poison]
    assert queue_depth(unique_name) == 0

    *values, failure = results(redis_url, unique_name, [*innocents, poison])
    assert values == innocents
    assert isinstance(failure, WorkerLostError), failure
    assert "died 3 times" in str(failure)

    log = sup.log
    retired = lines_with(f"Task {task}[{poison}] retired", log)
    assert len(retired) == 1, log
    assert "died 3 times" in retired[0] and f"queue {unique_name}" in retired[0]
    assert f"dead-lettered to exchange '' with routing key '{dead_letters}'" in retired[0]
    # Each death was a crash, blamed on what ran.
    assert len(lines_with(death, log)) == 3, log
    blamed = lines_with("died while running", log)
    assert len(blamed) == 3, log
    assert all(f"{poison} (death {n})" in line for n, line in enumerate(blamed, 1)), blamed
    # The first death took innocent tasks with it; they ran again (alone) and completed,
    # and no innocent task was ever blamed twice.
    assert "died while running alone" not in blamed[0], blamed
    neighbours = [task_id for task_id in innocents if f"{task_id} (death 1)" in blamed[0]]
    assert neighbours, blamed
    assert all(runs("runs")[task_id] == 2 for task_id in neighbours)
    assert max(runs("runs")[task_id] for task_id in innocents) <= 2
    assert "died while running alone" in blamed[1] and "died while running alone" in blamed[2]
    assert sup.stop() == 0, sup.diagnostics()


def test_a_task_that_blocks_the_loop_is_retired_after_three_heartbeat_kills(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str,
        dead_letters: str, runs: Callable[[str], dict[str, int]]) -> None:
    sup = supervise("--prefetch-multiplier", "1", processes=2, concurrency=3,
                    heartbeat_timeout=2)
    sup.wait_ready(2)
    innocents = publish(unique_name, redis_url, [("poison.ok", (0.5,))] * 4)
    [poison] = publish(unique_name, redis_url, [("poison.block", (120.0,))])
    innocents += publish(unique_name, redis_url, [("poison.ok", (0.2,))] * 6)

    wait_until(lambda: queue_depth(dead_letters) == 1, 60, "the poison is dead-lettered",
               sup.diagnostics)
    wait_until(lambda: set(runs("done")) == set(innocents), 30, "every innocent task is done",
               sup.diagnostics)
    assert runs("runs")[poison] == 3, sup.diagnostics()
    assert dead_lettered_ids(dead_letters) == [poison]
    [failure] = results(redis_url, unique_name, [poison])
    assert isinstance(failure, WorkerLostError), failure

    log = sup.log
    assert len(lines_with(f"Task poison.block[{poison}] retired", log)) == 1, log
    assert len(re.findall(r"missed its heartbeat", log)) == 3, log
    assert "crashes within" not in log, log
    assert sup.stop() == 0, sup.diagnostics()
