"""Golden messages: what Celery 5.x really publishes (recorded by tests/messages/capture.py).

For every valid recording, ``protocol.decode`` must read the right fields, and
``protocol.encode`` must give back the very body bytes, headers (in order, argsrepr and
kwargsrepr included) and AMQP properties that Celery wrote. Every invalid recording must be
refused with a :class:`MessageDecodeError` carrying the raw body and a reason that says
what was wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from aio_celery import protocol
from aio_celery.exceptions import MessageDecodeError

MESSAGES = Path(__file__).resolve().parent.parent / "messages"
VALID = sorted(MESSAGES.glob("valid_*.json"))
INVALID = sorted(MESSAGES.glob("invalid_*.json"))
IST = timezone(timedelta(hours=5, minutes=30))


def task_id(case: str) -> str:
    """The fixed ids capture.py gives its tasks."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"aio-celery-golden/{case}"))


def load(name: str) -> dict[str, Any]:
    return json.loads((MESSAGES / f"{name}.json").read_text(encoding="utf-8"))


def raw_body(data: dict[str, Any]) -> bytes:
    if "body_base64" in data:
        return base64.b64decode(data["body_base64"])
    return data["body"].encode("utf-8")


def decode(data: dict[str, Any]) -> protocol.TaskMessage:
    props = data["properties"]
    return protocol.decode(raw_body(data), data["headers"], props["content_type"],
                           props["content_encoding"], priority=props["priority"],
                           reply_to=props["reply_to"])


def decode_named(name: str) -> protocol.TaskMessage:
    return decode(load(name))


def now_for(data: dict[str, Any], message: protocol.TaskMessage) -> datetime:
    """A clock reading at which Celery's ``expiration`` property comes out again: half a
    millisecond more than it said, so truncation to whole ms lands on the same number."""
    expiration = data["properties"]["expiration"]
    if expiration is None:
        return datetime.now(UTC)
    assert message.expires is not None
    return message.expires - timedelta(milliseconds=int(expiration), microseconds=500)


def test_the_recordings_are_there() -> None:
    assert len(VALID) >= 12
    assert len(INVALID) >= 8
    for path in VALID + INVALID:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert data["celery_version"].startswith("5.")
        assert data["case"]


# --- every valid recording -----------------------------------------------------------------

@pytest.fixture(params=VALID, ids=lambda p: p.stem)
def golden(request: pytest.FixtureRequest) -> dict[str, Any]:
    return json.loads(request.param.read_text(encoding="utf-8"))


def test_decode_reads_the_common_fields(golden: dict[str, Any]) -> None:
    message = decode(golden)
    headers, props = golden["headers"], golden["properties"]
    args, kwargs, embed = json.loads(golden["body"])
    assert message.id == headers["id"] == props["correlation_id"]
    assert message.task == headers["task"]
    assert message.args == args
    assert message.kwargs == kwargs
    assert message.root_id == headers["root_id"]
    assert message.parent_id == headers["parent_id"]
    assert message.group == headers["group"]
    assert message.group_index == headers["group_index"]
    assert message.retries == headers["retries"]
    assert message.origin == headers["origin"]
    assert message.ignore_result == headers["ignore_result"]
    assert message.argsrepr == headers["argsrepr"]
    assert message.kwargsrepr == headers["kwargsrepr"]
    assert message.callbacks == embed["callbacks"]
    assert message.errbacks == embed["errbacks"]
    assert message.chain == embed["chain"]
    assert message.chord == embed["chord"]
    assert message.priority == props["priority"]
    assert message.reply_to == props["reply_to"]
    # Celery 5.x writes no header this codec does not know
    assert dict(message.extra_headers) == {}
    for value in (message.eta, message.expires):
        assert value is None or value.utcoffset() is not None


def test_reencode_gives_celerys_body_bytes(golden: dict[str, Any]) -> None:
    message = decode(golden)
    envelope = protocol.encode(message, now_for(golden, message))
    assert envelope.body == golden["body"].encode("utf-8")


def test_reencode_gives_celerys_headers_in_order(golden: dict[str, Any]) -> None:
    message = decode(golden)
    envelope = protocol.encode(message, now_for(golden, message))
    assert envelope.headers == golden["headers"]
    assert list(envelope.headers) == list(golden["headers"])


def test_reencode_gives_celerys_properties(golden: dict[str, Any]) -> None:
    message = decode(golden)
    envelope = protocol.encode(message, now_for(golden, message))
    props = golden["properties"]
    assert (envelope.content_type, envelope.content_encoding) == ("application/json", "utf-8")
    assert envelope.content_type == props["content_type"]
    assert envelope.content_encoding == props["content_encoding"]
    assert envelope.delivery_mode == props["delivery_mode"] == 2
    assert envelope.correlation_id == props["correlation_id"] == message.id
    assert envelope.priority == props["priority"]
    assert envelope.reply_to == props["reply_to"]
    assert envelope.expiration == props["expiration"]


def test_body_is_ascii_json_sent_through_the_default_exchange(golden: dict[str, Any]) -> None:
    """kombu escapes non-ASCII (so must we) and Celery 5 publishes to the default exchange
    with the queue name as routing key (as aio_celery.broker does)."""
    assert golden["body"].isascii()
    assert golden["delivery_info"]["exchange"] == ""
    assert golden["delivery_info"]["routing_key"].startswith("aio-celery-capture-")


# --- case by case --------------------------------------------------------------------------

def test_send_task_args_kwargs() -> None:
    message = decode_named("valid_send_task_args_kwargs")
    assert message.id == task_id("send_task_args_kwargs")
    assert message.task == "tasks.add"
    assert (message.args, message.kwargs) == ([2, 3], {"z": 4})
    assert message.root_id == message.id
    assert message.parent_id is None
    assert message.eta is None and message.expires is None
    assert message.retries == 0
    assert (message.soft_time_limit, message.time_limit) == (None, None)
    assert message.callbacks is None and message.errbacks is None and message.chain is None
    assert message.ignore_result is None  # app.send_task leaves it unsaid
    assert (message.argsrepr, message.kwargsrepr) == ("(2, 3)", "{'z': 4}")


def test_unicode_and_nested_arguments() -> None:
    message = decode_named("valid_delay_unicode_nested")
    assert message.args == ["héllo wörld ✓ 漢字 🎉",
                            {"nested": {"list": [1, 2.5, None, True], "ü": "ö"}}]
    assert message.kwargs == {"deep": {"a": {"b": {"c": [{"d": "€"}]}}}, "empty": {},
                              "quote": 'say "hi"\n'}
    assert message.ignore_result is False  # Task.apply_async says it


def test_countdown_expires_priority() -> None:
    data = load("valid_countdown_expires_priority")
    message = decode(data)
    assert message.eta is not None and message.expires is not None
    assert message.eta.utcoffset() == timedelta(0)
    assert message.expires.utcoffset() == timedelta(0)
    assert message.eta.isoformat() == data["headers"]["eta"]
    # countdown=30 and expires=60 from (almost) the same clock reading
    assert timedelta(seconds=29) < message.expires - message.eta < timedelta(seconds=31)
    assert message.priority == 5
    assert data["properties"]["expiration"] == "60000"
    # expires=60 seconds: the AMQP expiration is 60000 ms from the moment of sending
    sent_at = message.expires - timedelta(seconds=60)
    assert protocol.encode(message, sent_at).expiration == "60000"
    assert protocol.expiration_ms(message.expires, sent_at) == "60000"


def test_eta_and_expires_keep_a_plus_0530_offset() -> None:
    data = load("valid_eta_offset_0530")
    message = decode(data)
    assert message.eta == datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=IST)
    assert message.eta.utcoffset() == timedelta(hours=5, minutes=30)
    assert message.expires == datetime(2031, 2, 4, 0, 0, tzinfo=IST)
    assert message.expires.utcoffset() == timedelta(hours=5, minutes=30)
    headers = protocol.encode(message, datetime.now(UTC)).headers
    assert headers["eta"] == "2031-02-03T04:05:06.789012+05:30"
    assert headers["expires"] == "2031-02-04T00:00:00+05:30"


def test_ignore_result() -> None:
    message = decode_named("valid_ignore_result")
    assert message.ignore_result is True
    assert protocol.encode_headers(message)["ignore_result"] is True


def test_time_limits_decode_hard_then_soft() -> None:
    """Celery writes ``timelimit`` as ``[time_limit, soft_time_limit]`` (hard first)."""
    data = load("valid_time_limits")
    assert data["headers"]["timelimit"] == [20, 10]  # soft_time_limit=10, time_limit=20
    message = decode(data)
    assert message.time_limit == 20
    assert message.soft_time_limit == 10


def test_time_limits_encode_hard_then_soft() -> None:
    message = protocol.TaskMessage(id="t1", task="tasks.add", soft_time_limit=10, time_limit=20)
    assert protocol.encode_headers(message)["timelimit"] == [20, 10]


def test_chain_stack_is_last_step_first() -> None:
    message = decode_named("valid_chain")
    assert (message.task, message.args) == ("tasks.add", [1, 2])
    assert message.chain is not None
    assert [(step["task"], step["args"]) for step in message.chain] == [
        ("tasks.mul", [4]), ("tasks.add", [3])]
    # the chain's own task_id names its LAST step (the chain's result), as Celery does it
    assert message.chain[0]["options"]["task_id"] == task_id("chain")
    assert message.id != task_id("chain")
    for step in message.chain:
        assert step["options"]["reply_to"] == message.reply_to
        assert (step["kwargs"], step["immutable"], step["subtask_type"]) == ({}, False, None)


def test_link_and_link_error() -> None:
    message = decode_named("valid_link_link_error")
    assert message.callbacks == [{"task": "tasks.mul", "args": [10], "kwargs": {},
                                  "options": {}, "subtask_type": None, "immutable": False}]
    assert message.errbacks == [{"task": "tasks.on_error", "args": [], "kwargs": {},
                                 "options": {}, "subtask_type": None, "immutable": False}]


def test_group_members() -> None:
    first, second = decode_named("valid_group_0"), decode_named("valid_group_1")
    assert first.group == second.group == task_id("group")
    assert {(first.group_index, tuple(first.args)), (second.group_index, tuple(second.args))} == {
        (0, (1, 1)), (1, (2, 2))}
    assert first.id != second.id
    assert first.root_id == first.id and second.root_id == second.id


def test_large_argument() -> None:
    data = load("valid_large_argument")
    message = decode(data)
    assert message.args == ["x" * 100_000, list(range(2000))]
    assert message.kwargs == {"blob": "y" * 5000}
    # Celery truncates to about 1024 characters (its saferepr overshoots a little) ...
    assert len(data["headers"]["argsrepr"]) < 1100
    assert data["headers"]["argsrepr"].startswith("('xxxxxxxx")
    assert len(data["headers"]["kwargsrepr"]) < 1100
    # ... and our own repr of the same arguments stays within 1024
    ours = protocol.encode_headers(dataclasses.replace(message, argsrepr=None, kwargsrepr=None))
    assert len(ours["argsrepr"]) <= protocol.REPR_MAXSIZE
    assert ours["argsrepr"].startswith("('xxxxxxxx")
    assert len(ours["kwargsrepr"]) <= protocol.REPR_MAXSIZE
    assert ours["kwargsrepr"].startswith("{'blob': 'yyyyyyyy")


def test_argsrepr_is_what_celery_writes_for_plain_arguments_that_fit() -> None:
    """Plain values only: for strings holding quotes, newlines or unprintable characters,
    bytes, nesting deeper than three levels and long values, Celery's saferepr writes its
    own text where ours is repr's (the list is in tests/unit/test_saferepr.py)."""
    from celery.utils.saferepr import saferepr as celery_saferepr

    # 100 items: reprlib would abbreviate them, Celery's saferepr and ours do not
    message = protocol.TaskMessage(id="i-1", task="t", args=[list(range(100)), "x"],
                                   kwargs={"rows": [{"id": 1}] * 20})
    headers = protocol.encode_headers(message)
    assert headers["argsrepr"] == celery_saferepr(tuple(message.args), 1024) \
        == repr(tuple(message.args))
    assert headers["kwargsrepr"] == celery_saferepr(message.kwargs, 1024) \
        == repr(message.kwargs)


@pytest.mark.parametrize("name", ["valid_send_task_args_kwargs", "valid_countdown_expires_priority",
                                  "valid_group_0", "valid_group_1", "valid_retry",
                                  "valid_link_link_error", "valid_chain"])
def test_our_own_argsrepr_matches_celerys_for_flat_arguments(name: str) -> None:
    data = load(name)
    message = dataclasses.replace(decode(data), argsrepr=None, kwargsrepr=None)
    headers = protocol.encode_headers(message)
    assert headers["argsrepr"] == data["headers"]["argsrepr"]
    assert headers["kwargsrepr"] == data["headers"]["kwargsrepr"]


def test_retry_shaped_message() -> None:
    data = load("valid_retry")
    message = decode(data)
    assert message.id == task_id("retry")
    assert message.retries == 3  # the request had retries=2
    assert message.root_id == task_id("retry-root")
    assert message.parent_id == task_id("retry-parent")
    assert message.eta is not None and message.eta.utcoffset() == timedelta(0)
    assert message.expires is None
    assert (message.args, message.kwargs) == ([1, 2], {})


def test_one_mib_argument_keeps_argsrepr_small() -> None:
    big = "z" * (1 << 20)
    message = protocol.TaskMessage(id="big", task="tasks.echo",
                                   args=[big, [big, {"k": big}], b"\x00" * (1 << 20)],
                                   kwargs={"big": big, "nested": {"list": [big] * 3}})
    envelope = protocol.encode(message, datetime.now(UTC))
    assert len(envelope.headers["argsrepr"]) <= 1024
    assert len(envelope.headers["kwargsrepr"]) <= 1024
    assert envelope.headers["argsrepr"].startswith("('zzzz")
    assert len(envelope.body) > 3 * (1 << 20)
    assert protocol.decode(envelope.body, envelope.headers, envelope.content_type).args[0] == big


# --- invalid recordings --------------------------------------------------------------------

@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_message_is_refused(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    body = raw_body(data)
    with pytest.raises(MessageDecodeError) as caught:
        decode(data)
    error = caught.value
    assert error.payload == body
    assert data["expected_error"] in error.reason
    assert data["expected_error"] in str(error)
    assert isinstance(error, ValueError)


def test_pickle_is_refused_before_the_body_is_looked_at() -> None:
    data = load("invalid_pickle")
    assert data["properties"]["content_type"] == "application/x-python-serialize"
    with pytest.raises(MessageDecodeError, match="refusing content type"):
        decode(data)


def test_summary_names_reason_and_payload_start() -> None:
    data = load("invalid_missing_task_header")
    with pytest.raises(MessageDecodeError) as caught:
        decode(data)
    summary = caught.value.summary()
    assert "'task'" in summary
    assert f"payload {len(raw_body(data))} bytes" in summary


@pytest.mark.parametrize("body", [
    b'[[{"__type__": "decimal", "__value__": "x"}], {}, {}]',
    b'[[{"__type__": "uuid", "__value__": "not-a-dict"}], {}, {}]',
    b'[[{"__type__": "bytes", "__value__": 5}], {}, {}]',
    b"[[" + b"[" * 100_000 + b"]" * 100_000 + b"], {}, {}]",
])
def test_any_body_the_decoders_choke_on_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(MessageDecodeError) as caught:
        protocol.decode(body, {"task": "t", "id": "1"}, "application/json", "utf-8")
    assert caught.value.payload == body
