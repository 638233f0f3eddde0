"""Celery message protocol v2 (JSON) as pure functions.

No I/O and no aio-pika types: the clock and ids are passed in, and the transport adapter
(:mod:`aio_celery.broker`) turns an :class:`Envelope` into an AMQP message and back.

A task message is three parts:

* AMQP properties: content type/encoding, ``correlation_id`` (the task id), ``reply_to``,
  ``priority``, ``delivery_mode`` 2 and ``expiration`` (ms) when the task expires;
* headers: ``lang``, ``task``, ``id``, ``root_id``, ``parent_id``, ``group``, ``retries``,
  ``eta``, ``expires``, ``timelimit`` and friends;
* body: ``[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]``, where ``chain``
  is a stack of signature dicts with the *last* step first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aio_celery import jsoncodec
from aio_celery.exceptions import MessageDecodeError
from aio_celery.saferepr import saferepr

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
PERSISTENT = 2
#: Celery truncates argsrepr/kwargsrepr to this many characters (``argsrepr_maxsize``,
#: ``kwargsrepr_maxsize``); so do we, ``...`` included, because a header as large as a big
#: argument would exceed RabbitMQ's frame size.
REPR_MAXSIZE = 1024

_REQUIRED_HEADERS = ("task", "id")
_REFUSED_CONTENT_TYPES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "yaml",
    "application/x-msgpack": "msgpack",
}

Signature = dict[str, Any]


@dataclass(slots=True)
class TaskMessage:
    """One task message, as sent or as received, free of any transport type.

    Treat it as immutable (derive a changed copy with ``dataclasses.replace``); it is not
    frozen only because a frozen dataclass of this size costs microseconds per message.
    """

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    shadow: str | None = None
    origin: str | None = None
    #: None means "not said": the worker then follows the task and app settings
    ignore_result: bool | None = None
    replaced_task_nesting: int = 0
    stamped_headers: list[str] | None = None
    stamps: dict[str, Any] = field(default_factory=dict)
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    callbacks: list[Signature] | None = None
    errbacks: list[Signature] | None = None
    chain: list[Signature] | None = None
    chord: Signature | None = None
    priority: int | None = None
    reply_to: str | None = None
    #: headers this module does not interpret, kept so that re-encoding loses nothing
    extra_headers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A task message in wire form: the body bytes plus AMQP headers and properties."""

    body: bytes
    headers: dict[str, Any]
    correlation_id: str
    priority: int | None = None
    reply_to: str | None = None
    #: milliseconds as a decimal string, as AMQP wants it
    expiration: str | None = None
    content_type: str = CONTENT_TYPE
    content_encoding: str = CONTENT_ENCODING
    delivery_mode: int = PERSISTENT


# --- encoding ----------------------------------------------------------------------------

def format_datetime(value: datetime | None) -> str | None:
    """ISO-8601 with an offset; naive datetimes are taken as UTC (Celery's default)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def encode_body(message: TaskMessage) -> bytes:
    """The JSON body; raises TypeError naming the task when an argument is not serializable."""
    embed = {
        "callbacks": message.callbacks,
        "errbacks": message.errbacks,
        "chain": message.chain,
        "chord": message.chord,
    }
    try:
        return jsoncodec.dumps([message.args, message.kwargs, embed]).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"Cannot send task {message.task!r}: its arguments are not JSON serializable ({exc}). "
            "Pass plain JSON types, datetime, date, time, Decimal, UUID or bytes."
        ) from exc


def encode_headers(message: TaskMessage) -> dict[str, Any]:
    """The protocol v2 headers, in the order Celery writes them."""
    argsrepr = message.argsrepr
    if argsrepr is None:
        argsrepr = saferepr(tuple(message.args), REPR_MAXSIZE)
    kwargsrepr = message.kwargsrepr
    if kwargsrepr is None:
        kwargsrepr = saferepr(message.kwargs, REPR_MAXSIZE)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": message.task,
        "id": message.id,
        "shadow": message.shadow,
        "eta": format_datetime(message.eta),
        "expires": format_datetime(message.expires),
        "group": message.group,
        "group_index": message.group_index,
        "retries": message.retries,
        # Celery's order: hard limit first.
        "timelimit": [message.time_limit, message.soft_time_limit],
        "root_id": message.root_id or message.id,
        "parent_id": message.parent_id,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": message.origin,
        "ignore_result": message.ignore_result,
        "replaced_task_nesting": message.replaced_task_nesting,
        "stamped_headers": message.stamped_headers,
        "stamps": message.stamps,
    }
    headers.update(message.extra_headers)
    return headers


def expiration_ms(expires: datetime | None, now: datetime) -> str | None:
    """The AMQP ``expiration`` property for an absolute expiry time (never negative)."""
    if expires is None:
        return None
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    remaining = (expires - now).total_seconds()
    return str(max(0, int(remaining * 1000)))


def encode(message: TaskMessage, now: datetime) -> Envelope:
    """Turn a task message into its wire form; ``now`` (aware) sets the AMQP expiration."""
    return Envelope(
        body=encode_body(message),
        headers=encode_headers(message),
        correlation_id=message.id,
        priority=message.priority,
        reply_to=message.reply_to,
        expiration=expiration_ms(message.expires, now),
    )


# --- decoding ----------------------------------------------------------------------------

_KNOWN_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
})


def decode(
    body: bytes,
    headers: Mapping[str, Any] | None,
    content_type: str | None,
    content_encoding: str | None = CONTENT_ENCODING,
    priority: int | None = None,
    reply_to: str | None = None,
) -> TaskMessage:
    """Parse a protocol v2 JSON task message; raise :class:`MessageDecodeError` otherwise.

    Never unpickles: any content type but JSON is refused with its name in the reason.
    """
    _check_content_type(body, content_type, content_encoding)
    headers = headers or {}
    for name in _REQUIRED_HEADERS:
        if not isinstance(headers.get(name), str) or not headers[name]:
            hint = " (protocol v1 messages are not supported)" if not headers else ""
            raise MessageDecodeError(f"missing or invalid header {name!r}{hint}", body)
    args, kwargs, embed = _decode_body(body)
    try:
        return _message_from_parts(headers, args, kwargs, embed, priority, reply_to)
    except Exception as exc:
        raise MessageDecodeError(f"invalid header value: {exc!r}", body) from exc


def _check_content_type(body: bytes, content_type: str | None,
                        content_encoding: str | None) -> None:
    if content_type != CONTENT_TYPE:
        name = _REFUSED_CONTENT_TYPES.get(content_type or "", repr(content_type))
        raise MessageDecodeError(
            f"refusing content type {content_type!r} ({name}): only {CONTENT_TYPE} is accepted",
            body,
        )
    if content_encoding and content_encoding.lower().replace("-", "") != "utf8":
        raise MessageDecodeError(f"unsupported content encoding {content_encoding!r}", body)


def _decode_body(body: bytes) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    try:
        payload = jsoncodec.loads(body)
    except Exception as exc:  # bad JSON, a bad kombu tag value, nesting too deep, ...
        raise MessageDecodeError(f"body is not valid JSON: {exc!r}", body) from exc
    if not isinstance(payload, list) or len(payload) != 3:
        raise MessageDecodeError("body is not a [args, kwargs, embed] list", body)
    args, kwargs, embed = payload
    if not isinstance(args, list):
        raise MessageDecodeError("body args is not a list", body)
    if not isinstance(kwargs, dict):
        raise MessageDecodeError("body kwargs is not an object", body)
    if embed is None:
        embed = {}
    if not isinstance(embed, dict):
        raise MessageDecodeError("body embed is not an object", body)
    return args, kwargs, embed


def _message_from_parts(headers: Mapping[str, Any], args: list[Any], kwargs: dict[str, Any],
                        embed: dict[str, Any], priority: int | None,
                        reply_to: str | None) -> TaskMessage:
    soft, hard = _timelimit(headers.get("timelimit"))
    return TaskMessage(
        id=headers["id"],
        task=headers["task"],
        args=args,
        kwargs=kwargs,
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        group=headers.get("group"),
        group_index=headers.get("group_index"),
        retries=int(headers.get("retries") or 0),
        eta=parse_datetime(headers.get("eta")),
        expires=parse_datetime(headers.get("expires")),
        soft_time_limit=soft,
        time_limit=hard,
        shadow=headers.get("shadow"),
        origin=headers.get("origin"),
        ignore_result=headers.get("ignore_result"),
        replaced_task_nesting=int(headers.get("replaced_task_nesting") or 0),
        stamped_headers=headers.get("stamped_headers"),
        stamps=headers.get("stamps") or {},
        argsrepr=headers.get("argsrepr"),
        kwargsrepr=headers.get("kwargsrepr"),
        callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"),
        chain=embed.get("chain"),
        chord=embed.get("chord"),
        priority=priority,
        reply_to=reply_to,
        extra_headers={k: v for k, v in headers.items() if k not in _KNOWN_HEADERS},
    )


def _timelimit(value: Any) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"timelimit must be [hard, soft], got {value!r}")
    hard, soft = value
    return (None if soft is None else float(soft)), (None if hard is None else float(hard))


def parse_datetime(value: Any) -> datetime | None:
    """Parse an ISO-8601 header value; a missing offset means UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        parsed = datetime.fromisoformat(value)
    else:
        raise ValueError(f"expected an ISO-8601 string, got {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed
