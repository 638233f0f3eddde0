"""Golden tests of what we send: ``Task.retry()`` and a chain, built by our own code with
the ids, clock, origin and reply_to of Celery's recordings (``tests/messages/``), must give
Celery's wire form. The one difference we keep is written out in each test.

The sending paths run for real down to the publisher, which records instead of publishing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aio_celery import Celery, chain, messages, protocol
from aio_celery.protocol import Envelope
from aio_celery.task import Context, current_request, retry_countdown

MESSAGES = Path(__file__).resolve().parent.parent / "messages"


def task_id(case: str) -> str:
    """The fixed ids capture.py gives its tasks."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"aio-celery-golden/{case}"))


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MESSAGES / f"{name}.json").read_text(encoding="utf-8"))
    return data


class Recorder:
    """A publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[Envelope, str, int]] = []

    def delays_natively(self, queue: str) -> bool:
        return False

    async def publish(self, envelope: Envelope, queue: str, delay: int = 0) -> None:
        self.sent.append((envelope, queue, delay))

    async def close(self) -> None:
        pass


class FixedClockApp(Celery):
    def __init__(self, now: datetime, oid: str) -> None:
        super().__init__("golden", set_as_current=False)
        self.fixed_now = now
        self.oid = oid

    def now(self) -> datetime:
        return self.fixed_now


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    yield Recorder()


def headers_as_celery_wrote(envelope: Envelope, data: dict[str, Any]) -> dict[str, Any]:
    """Our headers, with our origin (pid@host of this process) put back to Celery's."""
    assert envelope.headers["origin"].startswith("gen")
    return {**envelope.headers, "origin": data["headers"]["origin"]}


def retry_request(data: dict[str, Any]) -> Context:
    """The request capture.py pushed before calling Celery's ``add.retry(countdown=15)``."""
    return Context(id=task_id("retry"), task="tasks.add", args=[1, 2], kwargs={}, retries=2,
                   root_id=task_id("retry-root"), parent_id=task_id("retry-parent"),
                   delivery_info={"routing_key": data["delivery_info"]["routing_key"]})


def test_build_message_gives_celerys_retry() -> None:
    data = load("valid_retry")
    eta = protocol.parse_datetime(data["headers"]["eta"])
    assert eta is not None
    app = Celery("golden", set_as_current=False)

    def no_new_id() -> str:
        raise AssertionError("a retry keeps its id")

    message, queue = messages.build_message(
        app.conf.settings, "tasks.add", [1, 2], {}, {"countdown": 15},
        now=eta - timedelta(seconds=15), new_id=no_new_id, origin=data["headers"]["origin"],
        reply_to=data["properties"]["reply_to"], retry_of=retry_request(data))
    envelope = protocol.encode(message, eta)
    assert queue == data["delivery_info"]["routing_key"]
    assert envelope.body == data["body"].encode()
    # ignore_result null where Celery writes false: "not said", the worker follows the
    # task's own setting (a Celery worker reads null as false too)
    expected = {**data["headers"], "ignore_result": None}
    assert list(envelope.headers.items()) == list(expected.items())
    assert (envelope.correlation_id, envelope.reply_to, envelope.priority, envelope.expiration) == (
        data["properties"]["correlation_id"], data["properties"]["reply_to"], None, None)


async def test_task_retry_sends_celerys_retry(recorder: Recorder) -> None:
    data = load("valid_retry")
    eta = protocol.parse_datetime(data["headers"]["eta"])
    assert eta is not None
    app = FixedClockApp(eta - timedelta(seconds=15), oid=data["properties"]["reply_to"])

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    token = current_request.set(retry_request(data))
    try:
        with app.publishing_through(recorder):
            await add.retry(countdown=15, throw=False)
    finally:
        current_request.reset(token)
    [(envelope, queue, delay)] = recorder.sent
    assert (queue, delay) == (data["delivery_info"]["routing_key"], 0)
    assert envelope.body == data["body"].encode()
    assert headers_as_celery_wrote(envelope, data) == {**data["headers"], "ignore_result": None}
    assert list(envelope.headers) == list(data["headers"])


async def test_chain_sends_celerys_first_step(recorder: Recorder) -> None:
    data = load("valid_chain")
    recorded = json.loads(data["body"])
    later_ids = [step["options"]["task_id"] for step in reversed(recorded[2]["chain"])]
    first_id = data["headers"]["id"]
    app = FixedClockApp(datetime.now().astimezone(), oid=data["properties"]["reply_to"])

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    queue = data["delivery_info"]["routing_key"]
    steps = chain(add.s(1, 2).set(task_id=first_id), add.s(3).set(task_id=later_ids[0]),
                  mul.s(4))
    with app.publishing_through(recorder):
        result = await steps.apply_async(queue=queue, task_id=task_id("chain"))
    assert later_ids[1] == task_id("chain") == result.id
    assert result.parent is not None and result.parent.id == later_ids[0]
    assert result.parent.parent is not None and result.parent.parent.id == first_id
    [(envelope, sent_to, _)] = recorder.sent
    assert sent_to == queue
    assert headers_as_celery_wrote(envelope, data) == {**data["headers"], "ignore_result": None}
    assert list(envelope.headers) == list(data["headers"])
    assert envelope.correlation_id == first_id
    assert envelope.reply_to == data["properties"]["reply_to"]
    # Celery copies its reply_to into every later step; we leave it out, and the worker
    # that sends the step puts its own app's in (a Celery worker does the same)
    for step in recorded[2]["chain"]:
        del step["options"]["reply_to"]
    assert json.loads(envelope.body) == recorded
    assert envelope.body == json.dumps(recorded).encode()


def build(options: dict[str, Any] | None = None, kwargs: Any = None,
          ) -> tuple[protocol.TaskMessage, str]:
    return messages.build_message(
        Celery("unit", set_as_current=False).conf.settings, "tasks.add", [1], kwargs,
        options or {}, now=datetime.now().astimezone(), new_id=lambda: "new-id",
        origin="gen1@host", reply_to="oid")


@pytest.mark.parametrize("kwargs", [[("x", 1)], "x=1", 42])
def test_kwargs_must_be_a_mapping(kwargs: Any) -> None:
    """As Celery's ``as_task_v2`` says: a list of pairs was once turned into a dict."""
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        build(kwargs=kwargs)


def test_unknown_options_are_refused_and_celerys_transport_options_ignored() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['countdwn'\]"):
        build({"countdwn": 3})
    message, queue = build({"serializer": "json", "routing_key": "x", "retry": True})
    assert (message.id, queue, message.kwargs) == ("new-id", "celery", {})
    assert messages.unknown_options({"root_id": "r", "queue": "q"}) == {"root_id"}


async def test_retry_without_countdown_waits_task_default_retry_delay(
        recorder: Recorder) -> None:
    """The task's ``default_retry_delay`` wins; without one, the app's setting (it was
    documented but never read: every retry waited 180 s)."""
    now = datetime.now().astimezone()
    app = FixedClockApp(now, oid="oid")
    app.conf.update(task_default_retry_delay=7)

    @app.task(name="tasks.plain")
    async def plain() -> None:
        pass

    @app.task(name="tasks.own", default_retry_delay=2)
    async def own() -> None:
        pass

    assert (plain.retry_delay, own.retry_delay) == (7.0, 2.0)
    assert retry_countdown(plain, 0, lambda low, high: high) == 7.0
    for task in (plain, own):
        token = current_request.set(Context(id=f"id-{task.name}", task=task.name))
        try:
            with app.publishing_through(recorder):
                await task.retry(throw=False)
        finally:
            current_request.reset(token)
    etas = [protocol.parse_datetime(envelope.headers["eta"]) for envelope, _, _ in recorder.sent]
    assert etas == [now + timedelta(seconds=7), now + timedelta(seconds=2)]
