"""Remote control, the pure parts: node name templates, the pidbox wire format (requests
recorded from the real Celery 5.7 client, ``tests/messages/pidbox_request_*.json``), the
commands' replies, and the revoked set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from aio_celery import Celery
from aio_celery.amqp import wire as amqpwire
from aio_celery.control import commands, info, nodenames, wire
from aio_celery.control.revoked import RevokedSet
from aio_celery.protocol import TaskMessage
from aio_celery.quorum import QueuePlan

MESSAGES = Path(__file__).resolve().parents[1] / "messages"


def recorded(name: str) -> wire.Request:
    record = json.loads((MESSAGES / f"pidbox_request_{name}.json").read_text())
    return wire.parse(record["body"].encode(), record["content_type"], record["headers"])


# --- node names ----------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "index", "expected"), [
    ("aio_celery%I@%h", None, "aio_celery@vm.example.com"),
    ("aio_celery%I@%h", 2, "aio_celery-2@vm.example.com"),
    ("w%i@%n", 3, "w3@vm"),
    ("w%i@%n", None, "w0@vm"),
    ("worker@%d", 1, "worker@example.com"),
    ("100%%@%h", None, "100%@vm.example.com"),
    ("justaname", None, "justaname@vm.example.com"),
])
def test_expand_templates_like_celery(template: str, index: int | None,
                                      expected: str) -> None:
    assert nodenames.expand(template, "vm.example.com", index) == expected


def test_expand_refuses_an_unknown_key_naming_it() -> None:
    with pytest.raises(ValueError, match="%x"):
        nodenames.expand("w%x@%h", "vm")


@pytest.mark.parametrize(("template", "expected"), [
    ("aio_celery%I@%h", "aio_celery-2@vm"),  # the default
    ("aio_celery@vm", "aio_celery-2@vm"),   # no index: appended to the name part
    ("pod-a@%h", "pod-a-2@vm"),
    ("w%i@%h", "w2@vm"),
    ("solo", "solo-2@vm"),
    ("w%%i@%h", "w%i-2@vm"),  # an escaped %i is no index
])
def test_every_child_gets_a_distinct_name(template: str, expected: str) -> None:
    assert nodenames.for_child(template, "vm", 2) == expected
    assert nodenames.for_child(template, "vm", 1) != nodenames.for_child(template, "vm", 2)


# --- requests, as the real Celery client sends them ----------------------------------------

def test_recorded_active_request() -> None:
    request = recorded("active")
    assert request.method == "active"
    assert request.arguments == {"safe": True}
    assert request.destination == ("nobody@nowhere",)
    assert request.reply_to is not None and request.reply_to[0] == wire.REPLY_EXCHANGE
    assert request.ticket and request.clock == 1


def test_recorded_revoke_request() -> None:
    request = recorded("revoke")
    assert request.arguments == {"task_id": ["id-1", "id-2"], "terminate": True,
                                 "signal": "SIGKILL"}


def test_recorded_pattern_request_matches_by_glob() -> None:
    request = recorded("ping")
    assert (request.pattern, request.matcher, request.destination) == ("w*@h?", "glob", ())
    assert wire.addressed_to(request, "worker-1@h1")
    assert not wire.addressed_to(request, "worker-1@host")


@pytest.mark.parametrize(("request_fields", "node", "runs"), [
    ({}, "a@h", True),
    ({"destination": ("a@h", "b@h")}, "a@h", True),
    ({"destination": ("b@h",)}, "a@h", False),
    # a destination wins over a pattern, as in kombu
    ({"destination": ("b@h",), "pattern": "a*", "matcher": "glob"}, "a@h", False),
    ({"pattern": r"a-\d@h", "matcher": "pcre"}, "a-1@h", True),
    ({"pattern": r"a-\d@h", "matcher": "pcre"}, "b-1@h", False),
    ({"pattern": "(", "matcher": "pcre"}, "a@h", False),  # a broken regex matches nothing
    ({"pattern": "a*", "matcher": "nosuch"}, "a@h", False),
    ({"pattern": "b*"}, "a@h", True),  # a pattern without a matcher is ignored (kombu)
])
def test_addressed_to(request_fields: dict[str, Any], node: str, runs: bool) -> None:
    request = wire.Request(method="ping", arguments={}, **request_fields)
    assert wire.addressed_to(request, node) is runs


@pytest.mark.parametrize(("body", "content_type"), [
    (b"not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b'{"arguments": {}}', "application/json"),
    (b'{"method": "ping", "arguments": [1]}', "application/json"),
    (b'{"method": "ping"}', "application/x-python-serialize"),
])
def test_unreadable_requests_are_refused(body: bytes, content_type: str) -> None:
    with pytest.raises(wire.BadRequest):
        wire.parse(body, content_type, {})


def test_reply_body_and_properties() -> None:
    body = wire.encode_reply("a@h", {"ok": "pong"})
    assert json.loads(body) == {"a@h": {"ok": "pong"}}
    props = amqpwire.decode_properties(wire.reply_properties("t-1", 7))
    assert props.content_type == "application/json"
    assert props.delivery_mode == 1
    assert props.headers == {"ticket": "t-1", "clock": 7}


# --- commands -----------------------------------------------------------------------------

class FakeNode:
    """Only what the commands under test read; each records its calls."""

    def __init__(self) -> None:
        self.nodename = "a@h"
        self.app = Celery("fake")
        self.calls: list[tuple[str, Any]] = []

        @self.app.task(name="t.limited")
        async def limited() -> None:
            pass

        @self.app.task(name="celery.builtin_like")
        async def builtin() -> None:
            pass

    async def revoke(self, task_ids: list[str], terminate: bool) -> list[str]:
        self.calls.append(("revoke", (task_ids, terminate)))
        return [t for t in task_ids if t == "running"] if terminate else []

    def resize_pool(self, delta: int) -> str | None:
        self.calls.append(("resize", delta))
        return None if delta != 99 else "too many"

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))


def run(method: str, node: Any, **arguments: Any) -> Any:
    return asyncio.run(commands.dispatch(node, method, arguments))


def test_ping() -> None:
    assert run("ping", FakeNode()) == {"ok": "pong"}


def test_unknown_command_is_a_key_error_as_in_kombu() -> None:
    with pytest.raises(KeyError) as info:
        run("nosuch", FakeNode())
    assert repr(info.value) == "KeyError('nosuch')"  # the error text Celery replies with


def test_revoke_replies_with_the_id_set_like_celery_5_7() -> None:
    node = FakeNode()
    assert run("revoke", node, task_id="x") == {"ok": "tasks {'x'} flagged as revoked"}
    assert node.calls == [("revoke", (["x"], False))]


def test_revoke_terminate_replies() -> None:
    node = FakeNode()
    assert run("revoke", node, task_id=["running", "gone"], terminate=True,
               signal="SIGKILL") == {"ok": "terminate: running"}
    assert run("revoke", node, task_id="gone", terminate=True) == \
        {"ok": "terminate: tasks unknown"}
    assert run("terminate", node, signal="SIGTERM", task_id="running") == \
        {"ok": "terminate: running"}


def test_rate_limit_sets_the_tasks_attribute() -> None:
    node = FakeNode()
    assert run("rate_limit", node, task_name="t.limited", rate_limit="10/m") == \
        {"ok": "new rate limit set successfully"}
    assert node.app.tasks["t.limited"].rate_limit == "10/m"
    assert "t.limited [rate_limit=10/m]" in run("registered", node)
    assert run("rate_limit", node, task_name="t.limited", rate_limit=None) == \
        {"ok": "rate limit disabled successfully"}
    assert node.app.tasks["t.limited"].rate_limit is None
    assert run("rate_limit", node, task_name="nope", rate_limit="1/s") == \
        {"error": "unknown task"}
    assert run("rate_limit", node, task_name="t.limited",
               rate_limit="1/x")["error"].startswith("Invalid rate limit string: ")


def test_time_limit_sets_both_limits() -> None:
    node = FakeNode()
    assert run("time_limit", node, task_name="t.limited", soft=5, hard=10) == \
        {"ok": "time limits set successfully"}
    task = node.app.tasks["t.limited"]
    assert (task.soft_time_limit, task.time_limit) == (5, 10)
    assert run("time_limit", node, task_name="nope") == {"error": "unknown task"}


def test_registered_hides_celery_builtins_unless_asked() -> None:
    node = FakeNode()
    shown = run("registered", node)  # (shared tasks of other tests' apps may show too)
    assert "t.limited" in shown and "celery.builtin_like" not in shown
    assert shown == sorted(shown)
    assert "celery.builtin_like" in run("registered", node, builtins=True)


def test_pool_resizing_and_shutdown_go_to_the_node() -> None:
    node = FakeNode()
    assert run("pool_grow", node, n=2) == {"ok": "pool will grow"}
    assert run("pool_shrink", node) == {"ok": "pool will shrink"}
    assert run("pool_grow", node, n=99) == {"error": "too many"}
    assert run("shutdown", node) is commands.NO_REPLY
    assert node.calls == [("resize", 2), ("resize", -1), ("resize", 99), ("shutdown", None)]


# --- the revoked set --------------------------------------------------------------------------

def test_revoked_ids_expire() -> None:
    revoked = RevokedSet(maxlen=10, expires=100.0)
    revoked.add("a", now=1000.0)
    assert revoked.revoked("a", now=1099.0)
    assert not revoked.revoked("a", now=1101.0)
    revoked.add("b", now=1101.0)  # purges a
    assert revoked.ids() == ["b"]


def test_revoked_set_keeps_the_newest_maxlen() -> None:
    revoked = RevokedSet(maxlen=3, expires=100.0)
    for i in range(5):
        revoked.add(f"id{i}", now=float(i))
    assert revoked.ids() == ["id2", "id3", "id4"]


def test_merge_orders_by_time_and_trims() -> None:
    revoked = RevokedSet(maxlen=3, expires=100.0)
    revoked.add("new", now=50.0)
    revoked.merge([("old", 10.0), ("mid", 30.0), ("older", 5.0), ("expired", -60.0)], now=50.0)
    assert revoked.ids() == ["old", "mid", "new"]


# --- the shapes of inspect replies, against kombu's and Celery's own ------------------------

def test_broker_info_has_kombus_keys_and_no_password() -> None:
    from kombu import Connection

    url = "amqp://user:s3cret@rabbit.example:5673/vhost"
    ours = info.broker_info(url, connect_timeout=4.0, heartbeat=60.0,
                            failover_strategy="round-robin", alternates=[])
    theirs = Connection(url).info()
    assert set(ours) == set(theirs) - {"password"}  # Celery's stats drop it too
    for key in ("hostname", "userid", "virtual_host", "port", "insist", "ssl"):
        assert ours[key] == theirs[key], key
    assert "s3cret" not in json.dumps(ours)


def test_request_info_has_celerys_keys() -> None:
    from celery.worker.request import Request as CeleryRequest

    message = TaskMessage(id="i-1", task="t.add", args=[1, 2], kwargs={"x": 3},
                          argsrepr="(1, 2)", kwargsrepr="{'x': 3}")
    delivery = {"exchange": "", "routing_key": "q", "priority": 0, "redelivered": False,
                "queue": "q"}
    plain = info.request_info(message, delivery, hostname="a@h", worker_pid=12,
                              time_start=1.5, acknowledged=False, safe=False)
    # the keys Celery's Request.info() returns, read from its code
    celery_keys = next(c for c in CeleryRequest.info.__code__.co_consts
                       if isinstance(c, tuple) and "worker_pid" in c)
    assert list(plain) == list(celery_keys)
    assert (plain["args"], plain["kwargs"]) == ([1, 2], {"x": 3})
    assert plain["delivery_info"] == {"exchange": "", "routing_key": "q", "priority": 0,
                                      "redelivered": False}
    safe = info.request_info(message, delivery, hostname="a@h", worker_pid=12,
                             time_start=1.5, acknowledged=True, safe=True)
    assert (safe["args"], safe["kwargs"]) == ("(1, 2)", "{'x': 3}")
    unrepr = TaskMessage(id="i-2", task="t.add", args=[1], kwargs={})
    assert info.request_info(unrepr, delivery, hostname="a@h", worker_pid=None,
                             time_start=None, acknowledged=False, safe=True)["args"] == "[1]"
    huge = TaskMessage(id="i-3", task="t.add", args=[list(range(1_000_000))], kwargs={})
    args = info.request_info(huge, delivery, hostname="a@h", worker_pid=None, time_start=None,
                             acknowledged=False, safe=True)["args"]
    assert args == repr([list(range(300))])[:1021] + "..."


def test_queue_info_has_kombus_keys() -> None:
    from kombu import Exchange, Queue

    plan = QueuePlan(max_priority=10)
    ours = info.queue_info("q", plan.queue("q"))
    theirs = Queue("q", Exchange("q"), "q",
                   queue_arguments={"x-max-priority": 10}).as_dict(recurse=True)
    assert set(ours) == set(theirs)
    assert set(ours["exchange"]) == set(theirs["exchange"])
    assert ours["max_priority"] == 10 and ours["queue_arguments"] == {"x-max-priority": 10}
