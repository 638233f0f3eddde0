"""Pure: Celery's monitoring events (what Flower, ``celery events`` and ``celery.events.State``
read), as plain dicts and the bytes and properties of their AMQP messages.

Every event carries ``type, hostname, timestamp, utcoffset, pid, clock`` (Celery's
``Event()`` and ``EventDispatcher._prepare_event``); the builders below add each type's own
fields with Celery 5.7's names and value shapes (``celery/worker/strategy.py``,
``celery/worker/request.py``, ``celery/worker/heartbeat.py``). Nothing here reads a clock,
a pid or the time zone: the caller passes them in (:class:`Stamp`).

Messages: one event per message with the routing key of its type (``task-started`` ->
``task.started``), or a JSON list of task events with the routing key ``task.multi``, as
a Celery worker with an event loop batches them; Celery's receivers take both.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pamqp import commands

from aio_celery import __version__
from aio_celery.protocol import TaskMessage
from aio_celery.saferepr import saferepr

#: Celery's ``event_exchange`` default; a topic exchange, durable, no arguments
EXCHANGE = "celeryev"
EXCHANGE_TYPE = "topic"
#: the routing key of a batch of task events (a JSON list body)
TASK_BATCH_KEY = "task.multi"
#: Celery's ``Task.resultrepr_maxsize``: the longest ``result`` of ``task-succeeded``
RESULT_REPR_MAXSIZE = 1024
#: the longest ``args``/``kwargs`` of ``task-received`` when the message has no
#: ``argsrepr``/``kwargsrepr`` (Celery's ``argsrepr_maxsize``, ``kwargsrepr_maxsize``), and
#: the longest ``exception`` of ``task-failed``/``task-retried`` (unbounded in Celery)
REPR_MAXSIZE = 1024
#: ``delivery_mode`` of events: transient (``EventDispatcher(delivery_mode=1)``)
TRANSIENT = 1
#: the worker's heartbeat interval when none is given (Celery's ``Heart``)
HEARTBEAT_INTERVAL = 2.0
#: ``sw_*`` of worker events. Flower and ``State`` only display them; ``sw_ident`` tells
#: our workers from Celery's in a fleet
SOFTWARE_INFO: dict[str, str] = {
    "sw_ident": "py-aio-celery",
    "sw_ver": __version__,
    "sw_sys": platform.system(),
}

Event = dict[str, Any]


def utcoffset(localtime: time.struct_time | None = None) -> float:
    """Hours WEST of UTC now (UTC+5:30 gives -5.5), Celery 5.7's ``utcoffset()``: receivers
    correct event timestamps with it (``adjust_timestamp``), so its sign matters."""
    struct = localtime if localtime is not None else time.localtime()
    return (time.altzone if struct.tm_isdst else time.timezone) / 3600


@dataclasses.dataclass(frozen=True, slots=True)
class Stamp:
    """What every event of one sender carries; ``timestamp`` and ``clock`` per event."""

    hostname: str
    pid: int
    utcoffset: float


def event(type_: str, stamp: Stamp, timestamp: float, clock: int, **fields: Any) -> Event:
    """One event: the common fields, then the type's own (which never override them)."""
    return {**fields, "hostname": stamp.hostname, "utcoffset": stamp.utcoffset,
            "pid": stamp.pid, "clock": clock, "timestamp": timestamp, "type": type_}


def routing_key(type_: str) -> str:
    """``task-succeeded`` -> ``task.succeeded`` (the topic exchange's routing key)."""
    return type_.replace("-", ".")


def group(type_: str) -> str:
    """``task`` for ``task-received``, ``worker`` for ``worker-heartbeat``."""
    return type_.split("-", 1)[0]


# --- the fields of each type -----------------------------------------------------------------


def received_fields(message: TaskMessage) -> dict[str, Any]:
    """``task-received``: where Flower gets the name, args and kwargs of a task (the message's
    ``argsrepr``/``kwargsrepr``; a message without them gets the repr of the values, which
    Celery leaves empty)."""
    return {
        "uuid": message.id,
        "name": message.task,
        "args": message.argsrepr if message.argsrepr is not None
        else saferepr(message.args, REPR_MAXSIZE),
        "kwargs": message.kwargsrepr if message.kwargsrepr is not None
        else saferepr(message.kwargs, REPR_MAXSIZE),
        "root_id": message.root_id,
        "parent_id": message.parent_id,
        "retries": message.retries,
        "eta": _iso(message.eta),
        "expires": _iso(message.expires),
    }


def succeeded_fields(task_id: str, result: Any, runtime: float) -> dict[str, Any]:
    """``result``: its repr in at most ``RESULT_REPR_MAXSIZE`` characters, built in time
    proportional to that, however large the value (Celery's ``saferepr``)."""
    return {"uuid": task_id, "result": saferepr(result, RESULT_REPR_MAXSIZE),
            "runtime": runtime}


def failed_fields(task_id: str, exc: BaseException, traceback: str) -> dict[str, Any]:
    """``task-failed``, and ``task-retried`` (the same fields: the retry's reason)."""
    return {"uuid": task_id, "exception": saferepr(exc, REPR_MAXSIZE), "traceback": traceback}


def revoked_fields(task_id: str, *, terminated: bool = False, signum: int | None = None,
                   expired: bool = False) -> dict[str, Any]:
    return {"uuid": task_id, "terminated": terminated, "signum": signum, "expired": expired}


def rejected_fields(task_id: str, requeue: bool) -> dict[str, Any]:
    return {"uuid": task_id, "requeue": requeue}


def worker_fields(freq: float, active: int, processed: int,
                  loadavg: Sequence[float]) -> dict[str, Any]:
    """``worker-online``, ``worker-heartbeat``, ``worker-offline``. ``freq`` is what
    ``State`` judges liveness by: alive while the last heartbeat is younger than 2 x freq."""
    return {"freq": freq, "active": active, "processed": processed,
            "loadavg": [round(value, 2) for value in loadavg], **SOFTWARE_INFO}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


# --- messages --------------------------------------------------------------------------------


def encode(payload: Event | list[Event]) -> bytes:
    """The JSON body: one event, or a list of them (a batch)."""
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


def properties(hostname: str) -> bytes:
    """The encoded basic properties of every event message of ``hostname``: JSON, utf-8,
    transient, header ``hostname`` (Celery's ``EventDispatcher.headers``); no id, as
    kombu sends them. Encoded once per sender, so pamqp's generic encoder will do."""
    return bytes(commands.Basic.Properties(
        content_type="application/json", content_encoding="utf-8",
        headers={"hostname": hostname}, delivery_mode=TRANSIENT).marshal())
