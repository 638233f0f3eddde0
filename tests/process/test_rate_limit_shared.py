"""A rate limit holds for all the children of one supervisor together (Celery's limit is
per worker instance, for all its pool processes), through the table the supervisor shares
with them (``aio_celery.ratelimit.SharedRates``). Real forks, RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis
from helpers import AMQP_URL
from test_supervisor import Supervised, wait_until

from aio_celery import Celery

APP_SPEC = "tests.process.rate_tasks:app"

COUNT = 15
GAP = 0.2  # rate_tasks.RATE, "5/s"


def _send(queue: str, redis_url: str, count: int) -> None:
    async def send() -> None:
        client = Celery("rate-client", set_as_current=False)
        client.conf.update(broker_url=AMQP_URL, result_backend=redis_url, task_default_queue=queue)
        async with client.setup():
            for _ in range(count):
                await client.send_task("rate.tick")

    asyncio.run(send())


def test_two_children_share_one_bucket_per_task_type(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str) -> None:
    """Both children get messages (round robin) and run them, yet together they start one
    every 0.2 s: 15 starts span at least 14 x 0.2 s (each child alone at 5/s, or the rate
    divided between them only on paper, would be done in half that)."""
    sup = supervise(processes=2, concurrency=10)
    sup.wait_ready(2)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        _send(unique_name, redis_url, COUNT)
        key = f"{unique_name}:ticks"
        wait_until(lambda: client.llen(key) == COUNT, 30, f"{COUNT} ticks", sup.diagnostics)
        ticks = [line.split() for line in client.lrange(key, 0, -1)]
    finally:
        client.close()
    starts = sorted(float(at) for at, _ in ticks)
    pids = {pid for _, pid in ticks}
    assert len(pids) == 2, (pids, sup.diagnostics())
    # Tokens come GAP apart at the soonest; a start follows its token, the first one by
    # a few milliseconds at most (it found the bucket full): 0.05 s for that lag.
    span = starts[-1] - starts[0]
    assert span >= (COUNT - 1) * GAP - 0.05, (starts, sup.diagnostics())
    assert span < (COUNT - 1) * GAP + 4.0, (starts, sup.diagnostics())  # a loaded machine
    assert sup.stop() == 0, sup.diagnostics()
