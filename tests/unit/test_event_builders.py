"""Celery's monitoring events as :mod:`aio_celery.events` builds them: golden dicts, and the
same dicts as Celery's own ``Event()`` builds from the same fields."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import celery.events
import pytest

from aio_celery import __version__, events
from aio_celery.amqp.wire import decode_properties
from aio_celery.protocol import TaskMessage

STAMP = events.Stamp("aio_celery-1@vm", 4242, -5.5)
TS = 1_790_000_000.25


def test_every_event_has_the_common_fields() -> None:
    assert events.event("task-started", STAMP, TS, 7, uuid="id-1") == {
        "type": "task-started", "hostname": "aio_celery-1@vm", "timestamp": TS,
        "utcoffset": -5.5, "pid": 4242, "clock": 7, "uuid": "id-1"}


def test_the_event_is_what_celerys_event_and_prepare_event_build() -> None:
    fields = events.succeeded_fields("id-1", {"a": 1}, 0.25)
    ours = events.event("task-succeeded", STAMP, TS, 9, **fields)
    theirs = celery.events.Event("task-succeeded", hostname=STAMP.hostname,
                                 utcoffset=STAMP.utcoffset, pid=STAMP.pid, clock=9,
                                 timestamp=TS, **fields)
    assert ours == theirs


def test_task_received_takes_argsrepr_and_kwargsrepr_from_the_message() -> None:
    message = TaskMessage(id="id-1", task="proj.add", args=[2], kwargs={"y": 3},
                          root_id="root", parent_id="parent", retries=2,
                          eta=datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC),
                          argsrepr="(2,)", kwargsrepr="{'y': 3}")
    assert events.received_fields(message) == {
        "uuid": "id-1", "name": "proj.add", "args": "(2,)", "kwargs": "{'y': 3}",
        "root_id": "root", "parent_id": "parent", "retries": 2,
        "eta": "2026-12-02T03:04:05+00:00", "expires": None}


def test_task_received_reprs_the_values_when_the_message_has_no_reprs() -> None:
    message = TaskMessage(id="id-1", task="proj.add", args=[2, "x"], kwargs={"y": None})
    fields = events.received_fields(message)
    assert (fields["args"], fields["kwargs"]) == ("[2, 'x']", "{'y': None}")
    assert (fields["eta"], fields["expires"], fields["retries"]) == (None, None, 0)


def test_task_succeeded_has_the_result_repr_and_a_float_runtime() -> None:
    assert events.succeeded_fields("id-1", [1, "two"], 0.5) == {
        "uuid": "id-1", "result": "[1, 'two']", "runtime": 0.5}


def test_a_long_result_repr_is_cut_to_1024_characters() -> None:
    result = events.succeeded_fields("id-1", "a" * 5000, 0.1)["result"]
    assert result == repr("a" * 5000)[:1021] + "..."


def test_a_huge_result_is_not_reprd_whole() -> None:
    huge = list(range(5_000_000))  # repr() of it takes about half a second
    started = time.perf_counter()
    result = events.succeeded_fields("id-1", huge, 0.1)["result"]
    assert time.perf_counter() - started < 0.05
    assert result == repr(huge[:300])[:1021] + "..."


def test_the_values_without_reprs_in_the_message_are_reprd_bounded() -> None:
    message = TaskMessage(id="id-1", task="proj.add", args=[list(range(1_000_000))],
                          kwargs={"blob": "y" * 10_000_000})
    fields = events.received_fields(message)
    assert fields["args"] == repr([list(range(300))])[:1021] + "..."
    assert fields["kwargs"] == "{'blob': '" + "y" * 1011 + "..."


def test_a_huge_exception_is_reprd_bounded() -> None:
    fields = events.failed_fields("id-1", ValueError("x" * 10_000_000), "Traceback...\n")
    assert fields["exception"] == "ValueError('" + "x" * 1009 + "..."


def test_a_repr_that_raises_does_not_escape() -> None:
    class Bad:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert events.succeeded_fields("id-1", Bad(), 0.1)["result"] == \
        "<unrepresentable Bad: RuntimeError('no')>"


def test_task_failed_and_retried_have_the_exception_repr_and_traceback() -> None:
    assert events.failed_fields("id-1", ValueError("boom"), "Traceback...\n") == {
        "uuid": "id-1", "exception": "ValueError('boom')", "traceback": "Traceback...\n"}


def test_task_revoked_and_rejected() -> None:
    assert events.revoked_fields("id-1", expired=True) == {
        "uuid": "id-1", "terminated": False, "signum": None, "expired": True}
    assert events.revoked_fields("id-1", terminated=True, signum=15) == {
        "uuid": "id-1", "terminated": True, "signum": 15, "expired": False}
    assert events.rejected_fields("id-1", requeue=True) == {"uuid": "id-1", "requeue": True}


def test_worker_fields() -> None:
    fields = events.worker_fields(2.0, 3, 120, (0.5, 0.25, 0.125))
    assert fields == {"freq": 2.0, "active": 3, "processed": 120,
                      "loadavg": [0.5, 0.25, 0.12], "sw_ident": "py-aio-celery",
                      "sw_ver": __version__, "sw_sys": fields["sw_sys"]}
    assert fields["sw_sys"]  # platform.system(): "Linux" here


@pytest.mark.parametrize(("isdst", "expected"), [(0, time.timezone / 3600),
                                                 (1, time.altzone / 3600)])
def test_utcoffset_is_hours_west_of_utc_as_celery_computes_it(isdst: int,
                                                               expected: float) -> None:
    from celery.utils.time import utcoffset as celery_utcoffset

    struct = time.struct_time((2026, 12, 2, 3, 4, 5, 2, 336, isdst))
    assert events.utcoffset(struct) == expected
    assert events.utcoffset(struct) == celery_utcoffset(localtime=lambda: struct)


def test_routing_keys_and_groups() -> None:
    assert events.routing_key("task-succeeded") == "task.succeeded"
    assert events.routing_key("worker-heartbeat") == "worker.heartbeat"
    assert events.group("task-received") == "task"
    assert events.group("worker-offline") == "worker"


def test_a_batch_is_a_json_list_and_one_event_a_json_object() -> None:
    one = events.event("task-started", STAMP, TS, 1, uuid="a")
    assert json.loads(events.encode(one)) == one
    assert json.loads(events.encode([one, one])) == [one, one]


def test_the_message_properties_are_celerys() -> None:
    decoded = decode_properties(events.properties("aio_celery-1@vm"))
    assert decoded.content_type == "application/json"
    assert decoded.content_encoding == "utf-8"
    assert decoded.delivery_mode == 1
    assert decoded.headers == {"hostname": "aio_celery-1@vm"}
    assert decoded.correlation_id is None and decoded.priority is None
