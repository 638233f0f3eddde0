"""Celery's remote control (pidbox) on the wire: pure, no I/O.

A request is a JSON object published to the fanout exchange ``celery.pidbox``; every node's
mailbox ``<nodename>.celery.pidbox`` gets a copy. It runs on a node when its
``destination`` names the node, else when ``pattern`` matches the name with ``matcher``
(``glob``, the default, or ``pcre``), else everywhere (``kombu/pidbox.py``
``Node.handle_message``). With ``reply_to`` the node publishes ``{nodename: result}`` to
``reply_to["exchange"]`` (direct, ``reply.celery.pidbox``) with ``reply_to["routing_key"]``,
headers ``ticket`` (the request's) and ``clock`` (``Mailbox._publish_reply``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from typing import Any

from pamqp import commands

#: the request exchange (fanout) and the reply exchange (direct), both non-durable
EXCHANGE = "celery.pidbox"
REPLY_EXCHANGE = "reply.celery.pidbox"
#: a mailbox's arguments as Celery 5.7 declares it (control_queue_expires 10 s,
#: control_queue_ttl 300 s); exclusive and auto-delete
QUEUE_ARGUMENTS = {"x-expires": 10000, "x-message-ttl": 300000}


def queue_name(nodename: str) -> str:
    return f"{nodename}.celery.pidbox"


class BadRequest(ValueError):
    """Not a control request we can read (the text says why)."""


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    arguments: dict[str, Any]
    destination: tuple[str, ...] = ()
    pattern: str | None = None
    matcher: str | None = None
    ticket: str | None = None
    #: (exchange, routing key) of the reply; None: the sender wants none
    reply_to: tuple[str, str] | None = None
    clock: int = 0


def parse(body: bytes, content_type: str | None, headers: dict[str, Any] | None) -> Request:
    """The request in a pidbox message (JSON only, as kombu's Mailbox accepts by default)."""
    if content_type not in (None, "", "application/json"):
        raise BadRequest(f"content type {content_type!r} (only application/json is read)")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise BadRequest("body is not an object with a method")
    arguments = data.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise BadRequest("arguments is not an object")
    reply_to = data.get("reply_to")
    route = None
    if isinstance(reply_to, dict) and reply_to.get("routing_key"):
        route = (str(reply_to.get("exchange") or REPLY_EXCHANGE), str(reply_to["routing_key"]))
    destination = data.get("destination") or ()
    if isinstance(destination, str):
        destination = (destination,)
    clock = (headers or {}).get("clock") or 0
    return Request(method=data["method"], arguments=arguments,
                   destination=tuple(str(d) for d in destination),
                   pattern=data.get("pattern"), matcher=data.get("matcher"),
                   ticket=data.get("ticket"), reply_to=route,
                   clock=clock if isinstance(clock, int) else 0)


def addressed_to(request: Request, nodename: str) -> bool:
    """Whether ``nodename`` runs ``request`` (kombu's rule; an unknown matcher: no)."""
    if request.destination:
        return nodename in request.destination
    if request.pattern and request.matcher:
        return matches(nodename, request.pattern, request.matcher)
    return True


def matches(nodename: str, pattern: str, matcher: str) -> bool:
    """kombu.matcher: ``glob`` is fnmatch (case sensitive on POSIX), ``pcre`` re.match."""
    if matcher == "glob":
        return fnmatch.fnmatch(nodename, pattern)
    if matcher == "pcre":
        try:
            return re.match(pattern, nodename) is not None
        except re.error:
            return False
    return False


def encode_reply(nodename: str, result: Any) -> bytes:
    """The reply body; values JSON cannot carry become their ``str`` (as a Celery reply
    of a set or datetime would fail to serialize, we send something readable instead)."""
    return json.dumps({nodename: result}, default=str).encode()


def reply_properties(ticket: str | None, clock: int) -> bytes:
    """Content header properties of a reply: JSON, transient, ``ticket`` and ``clock``."""
    return commands.Basic.Properties(
        content_type="application/json", content_encoding="utf-8", delivery_mode=1,
        headers={"ticket": ticket, "clock": clock}).marshal()


def error(text: str) -> dict[str, str]:
    return {"error": text}


def ok(text: str) -> dict[str, str]:
    return {"ok": text}
