"""The supervisor's status file, and the health probe that reads it.

The supervisor rewrites a small JSON document about once a second; ``aio_celery health``
answers from it without importing the app or touching the broker (a cheap probe for
Kubernetes' liveness and readiness checks).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any


def default_status_path() -> str:
    """``$AIO_CELERY_STATUS_FILE``, else a per-user file in the temp directory."""
    configured = os.environ.get("AIO_CELERY_STATUS_FILE")
    if configured:
        return configured
    return os.path.join(tempfile.gettempdir(), f"aio_celery-{os.getuid()}.status.json")


@dataclass
class ChildStatus:
    index: int
    pid: int
    #: starting, ready (consuming), waiting for broker, or stopping
    state: str
    #: seconds since the child's event loop last beat
    beat_age: float
    #: seconds the child has been without a broker connection (None: connected)
    broker_down: float | None = None


@dataclass
class Status:
    pid: int
    state: str
    target: int
    heartbeat_timeout: float
    updated: float = field(default_factory=time.time)
    children: list[ChildStatus] = field(default_factory=list)
    #: ``time.monotonic()`` of the write (CLOCK_MONOTONIC is system-wide on Linux, so the
    #: probe ages the file on it: a wall-clock step does not make it look stale)
    updated_monotonic: float | None = None


def write_status(path: str, status: Status) -> None:
    """Replace the file atomically (readers never see half a document)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".status-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(asdict(status), out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: str) -> Status:
    with open(path, encoding="utf-8") as source:
        data: dict[str, Any] = json.load(source)
    children = [ChildStatus(**child) for child in data.pop("children", [])]
    return Status(children=children, **data)


def check_health(path: str, ready: bool, now: float | None = None,
                 monotonic_now: float | None = None) -> tuple[bool, str]:
    """``(healthy, one-line reason)``: alive means the supervisor wrote its status lately
    and every child beats; ``ready`` also asks that every child has its consumers attached.
    A child waiting for the broker beats: it is alive but not ready (restarting it would
    not bring the broker back)."""
    try:
        status = read_status(path)
    except (OSError, ValueError, TypeError) as exc:
        return False, f"no supervisor status at {path}: {exc}"
    if status.updated_monotonic is not None:
        age = (time.monotonic() if monotonic_now is None else monotonic_now) \
            - status.updated_monotonic
    else:  # written by an older supervisor
        age = (time.time() if now is None else now) - status.updated
    if age > status.heartbeat_timeout + 5:
        return False, f"supervisor status is {age:.0f}s old (pid {status.pid} stuck or gone)"
    if status.state != "running":
        return False, f"supervisor is {status.state}"
    late = [c for c in status.children if c.beat_age > status.heartbeat_timeout]
    if late:
        names = ", ".join(f"child {c.index} (pid {c.pid}) {c.beat_age:.0f}s" for c in late)
        return False, f"children not beating: {names}"
    if ready:
        consuming = sum(1 for c in status.children if c.state == "ready")
        if consuming < status.target:
            return False, f"{consuming}/{status.target} children consuming{_waiting(status)}"
    summary = ", ".join(f"{c.index}:{c.state}" for c in status.children)
    return True, f"ok: {len(status.children)} children ({summary})"


def _waiting(status: Status) -> str:
    """``; broker unreachable for 95s (child 1, child 2)`` while children wait for it."""
    down = [c for c in status.children if c.broker_down is not None]
    if not down:
        return ""
    names = ", ".join(f"child {c.index}" for c in down)
    return f"; broker unreachable for {max(c.broker_down or 0.0 for c in down):.0f}s ({names})"
