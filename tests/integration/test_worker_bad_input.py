"""Messages the worker cannot run are rejected without requeue, once, and the worker goes on.

The invalid messages are the ones captured from real Celery clients in ``tests/messages``.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from helpers import publish_raw, ready_count

from aio_celery import Celery, signals, states
from aio_celery.exceptions import MessageDecodeError, NotRegistered

MESSAGES = Path(__file__).parent.parent / "messages"
INVALID = sorted(p.stem for p in MESSAGES.glob("invalid_*.json"))


def body_of(capture: dict[str, Any]) -> bytes:
    if "body_base64" in capture:
        return base64.b64decode(capture["body_base64"])
    return str(capture["body"]).encode("utf-8")


def rejections(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [rec for rec in caplog.records
            if rec.name == "aio_celery.worker" and rec.levelno == logging.ERROR
            and "Rejected a message" in rec.getMessage()]


def test_the_captured_invalid_messages_are_there() -> None:
    assert len(INVALID) >= 4
    assert {"invalid_pickle", "invalid_bad_json", "invalid_body_is_object",
            "invalid_missing_task_header"} <= set(INVALID)


@pytest.mark.parametrize("case", INVALID)
async def test_captured_invalid_message_is_rejected_once_and_work_goes_on(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture, case: str) -> None:
    capture = json.loads((MESSAGES / f"{case}.json").read_text())
    props = capture["properties"]
    await app.broker.declare_queue(unique_name)
    await publish_raw(amqp, unique_name, body_of(capture),
                      headers=capture["headers"], content_type=props["content_type"],
                      content_encoding=props["content_encoding"],
                      correlation_id=props["correlation_id"])

    @app.task
    async def good(i: int) -> int:
        return i

    after = [await good.delay(i) for i in range(3)]
    caplog.set_level(logging.INFO, logger="aio_celery.worker")
    handle = await start_worker(concurrency=1, prefetch_multiplier=1, burst=True)
    assert await handle.wait() == 0
    assert [await r.get(timeout=5) for r in after] == [0, 1, 2]
    (logged,) = rejections(caplog)
    assert "without requeue" in logged.getMessage()
    assert capture["expected_error"] in logged.getMessage()
    assert handle.worker.stats.rejected == 1
    # Rejected, not requeued: the queue is empty once the worker has closed its channel.
    assert await ready_count(amqp, unique_name) == 0
    # ... and no result was invented for it.
    if props["correlation_id"]:
        assert (await app.AsyncResult(props["correlation_id"]).refresh()).state == \
            states.PENDING


@pytest.mark.parametrize(("label", "body", "headers", "content_type", "reason"), [
    ("pickle", b"\x80\x04\x95\x00", {"task": "t", "id": "x"},
     "application/x-python-serialize", "pickle"),
    ("bad json", b'[[1, 2], {}, {"callbacks": nu', {"task": "t", "id": "x"},
     "application/json", "not valid JSON"),
    ("wrong shape", b'{"args": [1, 2]}', {"task": "t", "id": "x"},
     "application/json", "[args, kwargs, embed]"),
    ("kwargs not object", b"[[1], [2], {}]", {"task": "t", "id": "x"},
     "application/json", "kwargs is not an object"),
    ("missing task header", b"[[1], {}, {}]", {"id": "x"}, "application/json", "'task'"),
    ("no headers", b"[[1], {}, {}]", None, "application/json", "protocol v1"),
    ("no content type", b"[[1], {}, {}]", {"task": "t", "id": "x"}, None, "content type"),
])
async def test_handmade_bad_message_is_rejected_once(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture, label: str, body: bytes,
        headers: dict[str, Any] | None, content_type: str | None, reason: str) -> None:
    runs = 0

    @app.task
    async def good() -> str:
        nonlocal runs
        runs += 1
        return "good"

    before = await good.delay()
    await publish_raw(amqp, unique_name, body, headers=headers, content_type=content_type)
    after = await good.delay()
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    assert await before.get(timeout=5) == "good"
    assert await after.get(timeout=5) == "good"
    assert runs == 2
    (logged,) = rejections(caplog)
    assert reason in logged.getMessage(), label
    assert await ready_count(amqp, unique_name) == 0


async def test_unknown_task_is_rejected_and_not_registered_is_stored(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    @app.task
    async def known() -> str:
        return "known"

    r = await app.send_task("nobody.registered.this", [1, 2])
    after = await known.delay()
    handle = await start_worker(concurrency=1, prefetch_multiplier=1, burst=True)
    assert await handle.wait() == 0
    with pytest.raises(NotRegistered) as info:
        await r.get(timeout=5)
    assert info.value.args == ("nobody.registered.this",)
    assert r.state == states.FAILURE
    assert await after.get(timeout=5) == "known"
    logged = [rec for rec in caplog.records
              if "unregistered task" in rec.getMessage() and rec.levelno == logging.ERROR]
    assert len(logged) == 1, "rejected once, never redelivered"
    assert "nobody.registered.this" in logged[0].getMessage()
    assert known.name in logged[0].getMessage()  # the known tasks are listed
    assert await ready_count(amqp, unique_name) == 0


async def test_a_rejected_message_sends_task_rejected(
        app: Celery, start_worker, amqp: AbstractConnection, unique_name: str) -> None:
    """As Celery's consumer does for a message it cannot read: ``message`` is the delivery,
    ``exc`` the reason."""
    heard: list[dict[str, Any]] = []

    def listen(**kwargs: Any) -> None:
        heard.append(kwargs)

    @app.task
    async def good() -> str:
        return "good"

    body = b'[[1, 2], {}, {"callbacks": nu'
    await app.broker.declare_queue(unique_name)
    await publish_raw(amqp, unique_name, body, headers={"task": "t", "id": "x"},
                      content_type="application/json")
    after = await good.delay()
    signals.task_rejected.connect(listen)
    try:
        handle = await start_worker(concurrency=1, burst=True)
        assert await handle.wait() == 0
    finally:
        signals.task_rejected.disconnect(listen)
    assert await after.get(timeout=5) == "good"
    (call,) = heard
    assert call["signal"] is signals.task_rejected
    assert isinstance(call["exc"], MessageDecodeError)
    assert "not valid JSON" in str(call["exc"])
    assert call["message"].body == body
    assert call["sender"] is handle.worker.session
