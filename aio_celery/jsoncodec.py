"""JSON as Celery (kombu) writes it, including kombu's tagged types.

kombu encodes a few non-JSON types as ``{"__type__": tag, "__value__": value}``; both sides
must agree on the tags so that a ``datetime`` argument sent by Celery arrives as a
``datetime`` here and the other way round.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

_TAG = "__type__"
_VALUE = "__value__"


def _tagged(tag: str, value: Any) -> dict[str, Any]:
    return {_TAG: tag, _VALUE: value}


def _encode_bytes(value: bytes) -> dict[str, Any]:
    try:
        return _tagged("bytes", value.decode("utf-8"))
    except UnicodeDecodeError:
        return _tagged("base64", base64.b64encode(value).decode("ascii"))


# Order matters: datetime is a subclass of date.
_ENCODERS: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (datetime, lambda o: _tagged("datetime", o.isoformat())),
    (date, lambda o: _tagged("date", o.isoformat())),
    (time, lambda o: _tagged("time", o.isoformat())),
    (Decimal, lambda o: _tagged("decimal", str(o))),
    (uuid.UUID, lambda o: _tagged("uuid", {"hex": o.hex})),
    (bytes, _encode_bytes),
)

_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": lambda v: datetime.fromisoformat(v).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(**v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("ascii")),
}


def _default(obj: Any) -> Any:
    reducer = getattr(obj, "__json__", None)
    if reducer is not None:
        return reducer()
    for kind, encode in _ENCODERS:
        if isinstance(obj, kind):
            return encode(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 2 and _TAG in obj and _VALUE in obj:
        decoder = _DECODERS.get(obj[_TAG])
        if decoder is None:
            raise ValueError(f"unsupported tagged JSON type {obj[_TAG]!r}")
        return decoder(obj[_VALUE])
    return obj


_encoder = json.JSONEncoder(default=_default)


def dumps(obj: Any) -> str:
    """Serialize like kombu's ``json.dumps`` (same separators, ASCII only, tagged types)."""
    return _encoder.encode(obj)


def loads(data: bytes | str) -> Any:
    """Parse JSON; tagged kombu values become their Python types."""
    # The object hook costs a Python call per object: skip it when no tag can be present.
    marker = b'"__type__"' if isinstance(data, bytes) else '"__type__"'
    if marker in data:  # type: ignore[operator]
        return json.loads(data, object_hook=_object_hook)
    return json.loads(data)
