"""Record the task messages the real Celery 5.x publishes, as golden files (test-only).

Run by hand against a real RabbitMQ (nothing else; no worker, no result backend)::

    .venv/bin/python tests/messages/capture.py [--broker amqp://guest:guest@127.0.0.1:5672//]

Each case publishes with ``celery`` to a temporary queue of its own, reads the message back
raw with py-amqp (``basic_get``), deletes the queue and its exchange, and writes
``valid_<case>.json``::

    {"case": "...", "call": "...", "celery_version": "...", "kombu_version": "...",
     "delivery_info": {"exchange": "", "routing_key": "<queue>"},
     "properties": {content_type, content_encoding, delivery_mode, priority,
                    correlation_id, reply_to, expiration},
     "headers": {...},
     "body": "<the exact body text>"}

It also writes ``invalid_<case>.json`` files: messages aio-celery must refuse, each with an
``expected_error`` substring (two of them, pickle and protocol v1, are also sent by Celery;
the rest are edits of a captured message). A binary body is stored as ``body_base64``.

Task ids are fixed per case so that the files are stable and the tests can name them;
everything else (ids Celery draws for chain steps, times, ``reply_to``, ``origin``) is as
Celery made it during the capture.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import amqp
import celery
import kombu
from celery import Celery, chain, group

HERE = Path(__file__).resolve().parent
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
PROPERTY_NAMES = ("content_type", "content_encoding", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "expiration")


def task_id(case: str) -> str:
    """A stable task id per case."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"aio-celery-golden/{case}"))


def make_app(broker: str, **conf: Any) -> Celery:
    app = Celery("golden", broker=broker, set_as_current=False)
    # confirm_publish: a publish returns once RabbitMQ holds the message, so reading the
    # queue right after it cannot race the publish (it changes nothing in the message)
    app.conf.update(broker_connection_retry_on_startup=True,
                    broker_transport_options={"confirm_publish": True}, **conf)

    @app.task(name="tasks.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.mul", shared=False)
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="tasks.echo", shared=False)
    def echo(*args: Any, **kwargs: Any) -> Any:
        return [args, kwargs]

    @app.task(name="tasks.on_error", shared=False)
    def on_error(failed_task_id: str) -> str:
        return failed_task_id

    return app


# --- the cases ---------------------------------------------------------------------------
# Each sender gets (app, queue) and publishes one or more messages to ``queue``.

Sender = Callable[[Celery, str], None]
CASES: dict[str, tuple[str, str, Sender]] = {}


def case(name: str, description: str, call: str) -> Callable[[Sender], Sender]:
    def register(fn: Sender) -> Sender:
        CASES[name] = (description, call, fn)
        return fn
    return register


@case("send_task_args_kwargs", "app.send_task by name with positional and keyword arguments",
      "app.send_task('tasks.add', args=(2, 3), kwargs={'z': 4}, queue=q, task_id=...)")
def _send_task(app: Celery, q: str) -> None:
    app.send_task("tasks.add", args=(2, 3), kwargs={"z": 4}, queue=q,
                  task_id=task_id("send_task_args_kwargs"))


@case("delay_unicode_nested", "apply_async with unicode text and nested dicts/lists",
      "echo.apply_async(('héllo wörld ✓ 漢字 🎉', {'nested': {...}}), {...}, queue=q)")
def _unicode(app: Celery, q: str) -> None:
    app.tasks["tasks.echo"].apply_async(
        ("héllo wörld ✓ 漢字 🎉", {"nested": {"list": [1, 2.5, None, True], "ü": "ö"}}),
        {"deep": {"a": {"b": {"c": [{"d": "€"}]}}}, "empty": {}, "quote": 'say "hi"\n'},
        queue=q, task_id=task_id("delay_unicode_nested"))


@case("countdown_expires_priority", "countdown=30 (eta header), expires=60 (seconds: header "
      "and AMQP expiration property), priority=5",
      "add.apply_async((1, 2), countdown=30, expires=60, priority=5, queue=q)")
def _countdown(app: Celery, q: str) -> None:
    app.tasks["tasks.add"].apply_async((1, 2), countdown=30, expires=60, priority=5, queue=q,
                                       task_id=task_id("countdown_expires_priority"))


IST = timezone(timedelta(hours=5, minutes=30))


@case("eta_offset_0530", "eta and expires given as datetimes with a +05:30 offset",
      "add.apply_async((1, 2), eta=datetime(2031, 2, 3, 4, 5, 6, 789012, +05:30), "
      "expires=datetime(2031, 2, 4, 0, 0, tzinfo=+05:30), queue=q)")
def _eta_offset(app: Celery, q: str) -> None:
    app.tasks["tasks.add"].apply_async(
        (1, 2), eta=datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=IST),
        expires=datetime(2031, 2, 4, 0, 0, tzinfo=IST), queue=q,
        task_id=task_id("eta_offset_0530"))


@case("ignore_result", "ignore_result=True", "add.apply_async((1, 2), ignore_result=True)")
def _ignore_result(app: Celery, q: str) -> None:
    app.tasks["tasks.add"].apply_async((1, 2), ignore_result=True, queue=q,
                                       task_id=task_id("ignore_result"))


@case("time_limits", "soft_time_limit=10 and time_limit=20 (header timelimit is [hard, soft])",
      "add.apply_async((1, 2), soft_time_limit=10, time_limit=20, queue=q)")
def _time_limits(app: Celery, q: str) -> None:
    app.tasks["tasks.add"].apply_async((1, 2), soft_time_limit=10, time_limit=20, queue=q,
                                       task_id=task_id("time_limits"))


@case("chain", "a three-step chain: the first step is sent, the others ride in the body's "
      "chain stack, last step first",
      "chain(add.s(1, 2), add.s(3), mul.s(4)).apply_async(queue=q)")
def _chain(app: Celery, q: str) -> None:
    add, mul = app.tasks["tasks.add"], app.tasks["tasks.mul"]
    chain(add.s(1, 2), add.s(3), mul.s(4)).apply_async(queue=q, task_id=task_id("chain"))


@case("link_link_error", "link (callback) and link_error (errback) signatures in the body",
      "add.apply_async((1, 2), link=mul.s(10), link_error=on_error.s(), queue=q)")
def _link(app: Celery, q: str) -> None:
    add, mul, on_error = (app.tasks[n] for n in ("tasks.add", "tasks.mul", "tasks.on_error"))
    add.apply_async((1, 2), link=mul.s(10), link_error=on_error.s(), queue=q,
                    task_id=task_id("link_link_error"))


@case("group", "a two-task group: each message has the group id and its group_index",
      "group(add.s(1, 1), add.s(2, 2)).apply_async(queue=q)")
def _group(app: Celery, q: str) -> None:
    add = app.tasks["tasks.add"]
    group(add.s(1, 1), add.s(2, 2)).apply_async(queue=q, task_id=task_id("group"))


@case("large_argument", "a 100 KB string argument: argsrepr is truncated to 1024 characters",
      "echo.apply_async(('x' * 100_000, list(range(2000))), {'blob': 'y' * 5000}, queue=q)")
def _large(app: Celery, q: str) -> None:
    app.tasks["tasks.echo"].apply_async(("x" * 100_000, list(range(2000))), {"blob": "y" * 5000},
                                        queue=q, task_id=task_id("large_argument"))


@case("retry", "what Task.retry() publishes: same id, retries+1, root/parent kept, countdown",
      "add.push_request(id=..., retries=2, ...); add.retry(countdown=15, throw=False)")
def _retry(app: Celery, q: str) -> None:
    add = app.tasks["tasks.add"]
    add.push_request(
        id=task_id("retry"), args=[1, 2], kwargs={}, retries=2, called_directly=False,
        is_eager=False, root_id=task_id("retry-root"), parent_id=task_id("retry-parent"),
        delivery_info={"exchange": "", "routing_key": q, "priority": None},
        reply_to=None, correlation_id=task_id("retry"))
    try:
        add.retry(countdown=15, throw=False)
    finally:
        add.pop_request()


@case("pickle", "a pickle message (task_serializer='pickle'); aio-celery must refuse it",
      "add.apply_async((1, 2), serializer='pickle', queue=q)")
def _pickle(app: Celery, q: str) -> None:
    app.tasks["tasks.add"].apply_async((1, 2), serializer="pickle", queue=q,
                                       task_id=task_id("pickle"))


@case("protocol_v1", "a protocol v1 message (task_protocol=1); aio-celery must refuse it",
      "Celery(task_protocol=1): add.apply_async((1, 2), queue=q)")
def _protocol_v1(app: Celery, q: str) -> None:
    app.tasks["tasks.add"].apply_async((1, 2), queue=q, task_id=task_id("protocol_v1"))


# --- recording ---------------------------------------------------------------------------

def amqp_connection(broker: str) -> amqp.Connection:
    parts = urlsplit(broker)
    connection = amqp.Connection(f"{parts.hostname}:{parts.port or 5672}",
                                 userid=parts.username or "guest",
                                 password=parts.password or "guest",
                                 virtual_host=parts.path[1:] or "/")
    connection.connect()
    return connection


def drain(channel: amqp.Channel, queue: str) -> list[amqp.Message]:
    messages = []
    while (message := channel.basic_get(queue=queue, no_ack=True)) is not None:
        messages.append(message)
    return messages


def record(message: amqp.Message) -> dict[str, Any]:
    props = message.properties
    body = message.body
    entry: dict[str, Any] = {
        "delivery_info": {"exchange": message.delivery_info.get("exchange"),
                          "routing_key": message.delivery_info.get("routing_key")},
        "properties": {name: props.get(name) for name in PROPERTY_NAMES},
        "headers": dict(props.get("application_headers") or {}),
    }
    raw = body if isinstance(body, bytes) else body.encode("utf-8")
    try:
        entry["body"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["body_base64"] = base64.b64encode(raw).decode("ascii")
    return entry


def capture(broker: str, name: str) -> list[dict[str, Any]]:
    description, call, sender = CASES[name]
    conf: dict[str, Any] = {}
    if name == "pickle":
        conf = {"accept_content": ["json", "pickle"]}
    elif name == "protocol_v1":
        conf = {"task_protocol": 1}
    app = make_app(broker, **conf)
    queue = f"aio-celery-capture-{name}-{uuid.uuid4().hex[:8]}"
    connection = amqp_connection(broker)
    channel = connection.channel()
    try:
        sender(app, queue)
        messages = drain(channel, queue)
    finally:
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
        connection.close()
        app.close()
    if not messages:
        raise RuntimeError(f"case {name}: Celery published nothing to {queue}")
    return [{"case": description, "call": call, "celery_version": celery.__version__,
             "kombu_version": kombu.__version__, **record(m)} for m in messages]


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(HERE.parent.parent)}")


def invalid_from(base: dict[str, Any], description: str, expected_error: str,
                 **changes: Any) -> dict[str, Any]:
    """An edit of a captured valid message: ``headers``/``properties`` are merged in, the
    names in ``drop_headers`` removed, ``body`` replaced."""
    data = copy.deepcopy(base)
    data["case"] = description
    data["call"] = "edited from valid_send_task_args_kwargs.json by capture.py"
    data["expected_error"] = expected_error
    for name in changes.pop("drop_headers", ()):
        del data["headers"][name]
    data["headers"].update(changes.pop("headers", {}))
    data["properties"].update(changes.pop("properties", {}))
    if "body" in changes:
        data["body"] = changes.pop("body")
    if changes:
        raise TypeError(f"unknown changes {sorted(changes)}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    options = parser.parse_args(argv)

    captured = {name: capture(options.broker, name) for name in CASES}
    for name, messages in captured.items():
        if name in ("pickle", "protocol_v1"):
            continue
        for index, data in enumerate(messages):
            suffix = f"_{index}" if len(messages) > 1 else ""
            write(HERE / f"valid_{name}{suffix}.json", data)

    pickled = captured["pickle"][0]
    pickled["expected_error"] = "pickle"
    write(HERE / "invalid_pickle.json", pickled)
    v1 = captured["protocol_v1"][0]
    v1["expected_error"] = "protocol v1"
    write(HERE / "invalid_protocol_v1.json", v1)

    base = captured["send_task_args_kwargs"][0]
    invalid = {
        "bad_json": invalid_from(base, "the body is cut short: not JSON", "not valid JSON",
                                 body=base["body"][:-7]),
        "body_not_3_list": invalid_from(base, "the body is a 2-list (no embed part)",
                                        "[args, kwargs, embed]", body='[[2, 3], {"z": 4}]'),
        "body_is_object": invalid_from(base, "the body is a JSON object, not a list",
                                       "[args, kwargs, embed]",
                                       body='{"args": [2, 3], "kwargs": {}}'),
        "args_not_list": invalid_from(base, "args is a string", "args is not a list",
                                      body='["2, 3", {}, {}]'),
        "missing_task_header": invalid_from(base, "the task header is missing", "'task'",
                                            drop_headers=["task"]),
        "missing_id_header": invalid_from(base, "the id header is missing", "'id'",
                                          drop_headers=["id"]),
        "yaml_content_type": invalid_from(
            base, "a YAML message (content type application/x-yaml)", "yaml",
            properties={"content_type": "application/x-yaml"},
            body="- [2, 3]\n- {z: 4}\n- {callbacks: null, errbacks: null, chain: null, "
                 "chord: null}\n"),
        "bad_timelimit_header": invalid_from(base, "timelimit is not a pair", "timelimit",
                                             headers={"timelimit": [1, 2, 3]}),
    }
    for name, data in invalid.items():
        write(HERE / f"invalid_{name}.json", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
