"""Parking far etas when the broker will not take them: a nacked park backs off and stays
unacknowledged, a holding queue the broker refuses to declare is one error and in-memory
waiting (never a reconnect loop).

The broker's refusals are real: a policy that makes the holding queue reject publishes
(nacks), and a vhost whose user may not configure holding queues (``rabbitmqctl``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractConnection
from helpers import AMQP_URL, eventually, rabbitmqctl, ready_count, resolves_to

from aio_celery import Celery
from aio_celery.publisher import WorkerPublisher
from aio_celery.worker.delivery import wait_queue_name


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [rec for rec in caplog.records if text in rec.getMessage()]


# --- a nacked park ----------------------------------------------------------------------------

@pytest.fixture
def rejecting_holding_queues(unique_name: str) -> Iterator[str]:
    """A policy under which the test's holding queues nack every publish (max-length 0,
    overflow reject-publish); its name, for the test to remove it early."""
    name = f"{unique_name}-reject"
    rabbitmqctl("set_policy", "--apply-to", "queues", name,
                f"^{unique_name}\\.aio-celery-hold", json.dumps(
                    {"max-length": 0, "overflow": "reject-publish"}))
    try:
        yield name
    finally:
        rabbitmqctl("clear_policy", name, check=False)


async def test_a_nacked_park_backs_off_and_keeps_the_message(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        rejecting_holding_queues: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    parking = wait_queue_name(unique_name, 1.0)
    ran: list[str] = []

    @app.task
    async def later() -> str:
        ran.append("ran")
        return "on time"

    result = await later.apply_async(countdown=30)
    handle = await start_worker(concurrency=1, eta_horizon=1.0)
    try:
        await eventually(lambda: len(_logged(caplog, "could not be parked")) >= 3, timeout=10,
                         what="three attempts to park")
        # Backing off: 1 s, 2 s, 4 s apart, not a redelivery loop.
        attempts = [rec.created for rec in _logged(caplog, "could not be parked")]
        assert attempts[2] - attempts[0] >= 2.5, attempts
        assert "tried again in 1s" in _logged(caplog, "could not be parked")[0].getMessage()
        assert not _logged(caplog, ": parked in")
        # Kept unacknowledged by the worker: neither queue has it ready, nothing ran.
        assert await ready_count(amqp, unique_name) == 0
        assert await ready_count(amqp, parking) == 0
        assert handle.worker.stats.rejected == 0
        assert ran == []

        rabbitmqctl("clear_policy", rejecting_holding_queues)
        await eventually(lambda: resolves_to(ready_count(amqp, parking), 1), timeout=15,
                         what="the message parked once the broker takes it")
        assert len(_logged(caplog, ": parked in")) == 1
        assert await ready_count(amqp, unique_name) == 0
        assert ran == []
    finally:
        assert await handle.stop() == 0
        channel = await amqp.channel()
        await channel.queue_delete(parking)
        await channel.close()
    assert ran == []  # still due in about 30 s: it waits in the holding queue
    assert result.id


async def test_a_returned_park_is_not_parked_and_the_original_stays(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The holding queue is missing when the copy is published (deleted right after its
    declaration, say): RabbitMQ returns the mandatory copy, so the original is not acked."""
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    parking = wait_queue_name(unique_name, 1.0)
    declare = WorkerPublisher.declare_holding_queue

    async def not_declared(self: WorkerPublisher, name: str, target: str, ttl_ms: int) -> None:
        return None

    monkeypatch.setattr(WorkerPublisher, "declare_holding_queue", not_declared)

    @app.task
    async def later() -> str:
        return "later"

    await later.apply_async(countdown=30)
    handle = await start_worker(concurrency=1, eta_horizon=1.0)
    try:
        await eventually(lambda: len(_logged(caplog, "could not be parked")) >= 1, timeout=10,
                         what="a park returned by the broker")
        message = _logged(caplog, "could not be parked")[0].getMessage()
        assert "returned" in message and "NO_ROUTE" in message, message
        assert await ready_count(amqp, unique_name) == 0  # held unacked by the worker
        assert not _logged(caplog, ": parked in")

        monkeypatch.setattr(WorkerPublisher, "declare_holding_queue", declare)
        await eventually(lambda: resolves_to(ready_count(amqp, parking), 1), timeout=15,
                         what="the message parked once the holding queue exists")
        assert await ready_count(amqp, unique_name) == 0
    finally:
        assert await handle.stop() == 0
        channel = await amqp.channel()
        await channel.queue_delete(parking)
        await channel.close()


# --- a holding queue the broker refuses to declare --------------------------------------------

@pytest.fixture
def restricted_vhost() -> Iterator[str]:
    """A vhost and user that may configure anything but queues named like holding queues;
    the broker URL for it. Both are deleted afterwards, whatever happens."""
    tag = uuid.uuid4().hex[:8]
    vhost, user, password = f"aio-celery-test-{tag}", f"aio-celery-test-{tag}", "pw-" + tag
    try:
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("add_user", user, password)
        rabbitmqctl("set_permissions", "-p", vhost, user, "^(?!.*aio-celery-hold).*", ".*",
                    ".*")
        parts = urlsplit(AMQP_URL)
        yield f"amqp://{user}:{password}@{parts.hostname}:{parts.port or 5672}/{vhost}"
    finally:
        rabbitmqctl("delete_user", user, check=False)
        rabbitmqctl("delete_vhost", vhost, check=False)


@pytest.fixture
async def restricted_app(restricted_vhost: str, unique_name: str,
                         redis_url: str) -> AsyncIterator[Celery]:
    application = Celery(unique_name + "-restricted", set_as_current=False)
    application.conf.update(broker_url=restricted_vhost, result_backend=redis_url,
                            task_default_queue=unique_name)
    async with application.setup():
        yield application


async def test_a_refused_holding_queue_is_one_error_and_etas_wait_in_memory(
        restricted_app: Celery, start_worker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aio_celery.worker")

    @restricted_app.task(name="parking.later")
    async def later(label: str) -> str:
        return label

    sent = time.monotonic()
    first = await later.apply_async(("first",), countdown=2.5)
    second = await later.apply_async(("second",), countdown=3.0)
    handle = await start_worker(restricted_app, concurrency=2, eta_horizon=1.0)
    try:
        assert await first.get(timeout=10) == "first"
        assert await second.get(timeout=10) == "second"
        assert time.monotonic() - sent >= 2.4, "ran before its eta"
        refused = _logged(caplog, "refused to declare the holding queue")
        assert len(refused) == 1, [rec.getMessage() for rec in refused]
        assert "ACCESS_REFUSED" in refused[0].getMessage() or "403" in refused[0].getMessage()
        assert refused[0].levelno == logging.ERROR
        assert len(_logged(caplog, "waits in memory")) == 1 + 1
        # The consumer connection was never lost over it: no reconnect, no redelivery.
        assert not _logged(caplog, "Lost the broker connection")
        assert handle.worker.consuming.is_set()
    finally:
        assert await handle.stop() == 0


async def test_an_eta_waiting_in_memory_goes_back_before_it_ages_and_runs_once(
        restricted_app: Celery, start_worker, caplog: pytest.LogCaptureFixture) -> None:
    """No holding queue, so an eta beyond the horizon waits in memory, unacknowledged: it
    is given back before worker_unacked_max_age (RabbitMQ's consumer_timeout would close
    the channel), comes back, waits again, and runs once when it is due."""
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    ran: list[float] = []

    @restricted_app.task(name="parking.much_later")
    async def much_later() -> str:
        ran.append(time.monotonic())
        return "due"

    sent = time.monotonic()
    result = await much_later.apply_async(countdown=3.0)
    handle = await start_worker(restricted_app, concurrency=1, eta_horizon=0.5,
                                unacked_max_age=1.0)
    try:
        assert await result.get(timeout=10) == "due"
        assert len(ran) == 1 and ran[0] - sent >= 2.9
        given_back = _logged(caplog, "Gave back 1 message(s) that waited unstarted (1 of "
                                     "them waiting for their eta or rate limit)")
        assert 2 <= len(given_back) <= 4  # once per 0.9-1 s while it waited 3 s
        assert not _logged(caplog, "Lost the broker connection")
    finally:
        assert await handle.stop() == 0
