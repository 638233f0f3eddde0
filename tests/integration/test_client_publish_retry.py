"""A client publish that fails for a reason that may pass is tried again, as Celery's
``task_publish_retry_policy`` says: here the broker nacks it (a policy of max-length 0 with
overflow reject-publish on the test's queue, as a quorum queue nacks while it elects a new
leader), then stops nacking."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from aio_pika.abc import AbstractConnection
from helpers import eventually, rabbitmqctl, ready_count, resolves_to

from aio_celery import Celery
from aio_celery.broker import RetryPolicy
from aio_celery.exceptions import BrokerConnectionError, PublishRefusedError


@pytest.fixture
def nacking(unique_name: str) -> Iterator[str]:
    """The test's queue nacks every publish until the policy (its name) is cleared."""
    name = f"{unique_name}-nack"
    rabbitmqctl("set_policy", "--apply-to", "queues", name, f"^{unique_name}$",
                json.dumps({"max-length": 0, "overflow": "reject-publish"}))
    try:
        yield name
    finally:
        rabbitmqctl("clear_policy", name, check=False)


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "(task_publish_retry_policy)" in
            r.getMessage()]


async def test_a_nacked_publish_is_retried_and_lands_once(
        app: Celery, amqp: AbstractConnection, unique_name: str, nacking: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aio_celery.broker")
    app.broker.retry_policy = RetryPolicy(max_retries=50, interval_step=0.2, interval_max=0.2)
    sending = asyncio.create_task(app.send_task("anything", queue=unique_name))
    await eventually(lambda: retries_logged(caplog), timeout=10, what="a retry after a nack")
    assert not sending.done()
    rabbitmqctl("clear_policy", nacking)
    result = await asyncio.wait_for(sending, 20)
    await eventually(lambda: resolves_to(ready_count(amqp, unique_name), 1), timeout=5,
                     what="the message in the queue")
    assert result.id
    assert "nack" in retries_logged(caplog)[0].lower(), retries_logged(caplog)


async def test_without_task_publish_retry_a_nack_fails_at_once(
        app: Celery, unique_name: str, nacking: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aio_celery.broker")
    app.broker.retry_policy = RetryPolicy.from_settings(False, None)
    with pytest.raises(BrokerConnectionError, match=r"(?i)nack"):
        await app.send_task("anything", queue=unique_name)
    assert not retries_logged(caplog)


async def test_a_refused_publish_is_not_retried(
        app: Celery, amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aio_celery.broker")
    channel = await amqp.channel()  # the queue exists with other arguments: 406 for good
    await channel.declare_queue(unique_name, durable=True, arguments={"x-max-priority": 3})
    await channel.close()
    with pytest.raises(PublishRefusedError):
        await app.send_task("anything", queue=unique_name)
    assert not retries_logged(caplog)
