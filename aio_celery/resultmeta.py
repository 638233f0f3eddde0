"""Celery's result document, as pure functions.

A result lives under ``celery-task-meta-<id>`` as JSON::

    {"status": "SUCCESS", "result": 3, "traceback": null, "children": [],
     "date_done": "2026-01-01T00:00:00.000000+00:00", "task_id": "<id>"}

plus ``parent_id``/``group_id`` when set. A failure's ``result`` is
``{"exc_type", "exc_message": [*exc.args], "exc_module"}``.
"""

from __future__ import annotations

import builtins
import sys
from datetime import datetime
from typing import Any

from aio_celery import exceptions, jsoncodec, states

KEY_PREFIX = "celery-task-meta-"

#: Our exceptions that share a name with ``celery.exceptions`` are stored under Celery's
#: module, so that a Celery client rebuilds its own class, and read back as ours.
_CELERY_MODULE = "celery.exceptions"
_MIRRORED = {
    cls.__name__: cls
    for cls in (
        exceptions.NotRegistered,
        exceptions.MaxRetriesExceededError,
        exceptions.TaskRevokedError,
        exceptions.SoftTimeLimitExceeded,
        exceptions.TimeLimitExceeded,
        exceptions.Retry,
        exceptions.TimeoutError,
        exceptions.ChordError,
        exceptions.WorkerLostError,
    )
}


def result_key(task_id: str) -> str:
    return f"{KEY_PREFIX}{task_id}"


def build_meta(task_id: str, status: str, result: Any, *, now: datetime,
               traceback: str | None = None, children: list[Any] | None = None,
               parent_id: str | None = None, group_id: str | None = None) -> dict[str, Any]:
    """The document Celery's Redis backend stores; ``date_done`` only for ready states."""
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": children or [],
        "date_done": now.isoformat() if status in states.READY_STATES else None,
    }
    if group_id:
        meta["group_id"] = group_id
    if parent_id:
        meta["parent_id"] = parent_id
    meta["task_id"] = task_id
    return meta


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Serialize a result document; a result that is not JSON raises TypeError."""
    return jsoncodec.dumps(meta).encode()


def decode_meta(raw: bytes | str) -> dict[str, Any]:
    meta = jsoncodec.loads(raw)
    if not isinstance(meta, dict) or "status" not in meta:
        raise ValueError(f"not a Celery result document: {raw[:200]!r}")
    return meta


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """A failure as Celery's JSON backend stores it; arguments that are not JSON become
    their ``repr`` so that storing a failure never fails."""
    cls = type(exc)
    module = cls.__module__
    if module == exceptions.__name__ and _MIRRORED.get(cls.__name__) is cls:
        module = _CELERY_MODULE
    return {
        "exc_type": cls.__qualname__,
        "exc_message": [_json_safe(arg) for arg in exc.args],
        "exc_module": module,
    }


def _json_safe(value: Any) -> Any:
    try:
        jsoncodec.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def exception_from_dict(data: Any) -> Exception:
    """Rebuild a stored failure: the real class when its module is already imported and it
    is an :class:`Exception` class, else a :class:`RemoteTaskError` carrying type and message.

    Modules are never imported on behalf of stored data, and a stored ``BaseException``
    that is not an ``Exception`` (``SystemExit`` from a task that called ``sys.exit()``,
    ``KeyboardInterrupt``, ``GeneratorExit``, ``CancelledError``, ...) is never rebuilt:
    raising it would exit or kill the process that reads the result.
    """
    if not isinstance(data, dict) or "exc_type" not in data:
        return exceptions.RemoteTaskError("UnknownError", None, data)
    exc_type = str(data["exc_type"])
    module = data.get("exc_module")
    module = None if module is None else str(module)
    message = data.get("exc_message", [])
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)
    cls = _find_exception_class(exc_type, module)
    if cls is not None:
        try:
            exc = cls(*args)
        except Exception:  # a constructor with another signature
            pass
        else:
            if isinstance(exc, Exception):  # a __new__ may return anything
                return exc
    return exceptions.RemoteTaskError(exc_type, module, *args)


def _find_exception_class(exc_type: str, module: str | None) -> type[Exception] | None:
    if module == _CELERY_MODULE and exc_type in _MIRRORED:
        return _MIRRORED[exc_type]
    owner: Any = builtins if module in (None, "builtins") else sys.modules.get(str(module))
    if owner is None:
        return None
    for part in exc_type.split("."):
        owner = getattr(owner, part, None)
    if isinstance(owner, type) and issubclass(owner, Exception):
        return owner
    return None
