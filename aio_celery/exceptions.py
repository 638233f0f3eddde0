"""Every exception aio-celery raises on purpose.

    AioCeleryError
    ├── ConfigurationError (ValueError)          unknown setting, bad option value
    ├── MessageDecodeError (ValueError)          not a Celery protocol v2 JSON message
    ├── BrokerConnectionError (ConnectionError)  RabbitMQ unreachable or refused us
    │   └── PublishRefusedError                  a publish refused for good (channel error)
    ├── BackendError                             the result backend is missing or failed
    │   └── BackendConnectionError (ConnectionError)
    ├── TimeoutError (builtins.TimeoutError)     AsyncResult.get(timeout=...) ran out
    ├── NotRegistered (KeyError)                 a task name the worker does not know
    ├── Retry                                    raised by Task.retry() to end the current run
    ├── MaxRetriesExceededError                  retry() past max_retries
    ├── TaskRevokedError                         the task was revoked (e.g. it expired)
    ├── SoftTimeLimitExceeded                    raised inside a task at its soft time limit
    ├── TimeLimitExceeded                        stored when a task hits its hard time limit
    ├── ChordError                               a chord member failed: the body did not run
    ├── WorkerLostError                          the task killed its worker process: retired
    └── RemoteTaskError                          a failure whose class is not known here

The class names mirror ``celery.exceptions`` so that failures stored by either side are
rebuilt as the matching class where one exists here.
"""

from __future__ import annotations

import builtins
from typing import Any


class AioCeleryError(Exception):
    """Root of the exceptions raised by aio-celery itself."""


class ConfigurationError(AioCeleryError, ValueError):
    """A setting or option has a name or value aio-celery cannot use."""


class MessageDecodeError(AioCeleryError, ValueError):
    """A message is not a Celery protocol v2 JSON task message.

    ``reason`` says what was wrong; ``payload`` keeps the raw body so that it can be logged
    or dead-lettered untouched.
    """

    def __init__(self, reason: str, payload: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.payload = payload

    def summary(self, limit: int = 120) -> str:
        """One line: the reason plus the start of the payload."""
        head = self.payload[:limit]
        more = "..." if len(self.payload) > limit else ""
        return f"{self.reason} (payload {len(self.payload)} bytes: {head!r}{more})"


class BrokerConnectionError(AioCeleryError, ConnectionError):
    """The broker could not be reached, or refused the connection."""


class PublishRefusedError(BrokerConnectionError):
    """The broker refused a publish for good: a channel error such as PRECONDITION_FAILED
    (the target queue exists with other arguments), ACCESS_REFUSED or NOT_FOUND. Trying
    again will not help; the other errors of :class:`BrokerConnectionError` are transient."""


class BackendError(AioCeleryError):
    """The result backend is not configured or failed."""


class BackendConnectionError(BackendError, ConnectionError):
    """The result backend could not be reached."""


class TimeoutError(AioCeleryError, builtins.TimeoutError):
    """The operation timed out (e.g. ``AsyncResult.get(timeout=...)``)."""


class NotRegistered(AioCeleryError, KeyError):
    """The task is not registered with this app."""

    def __str__(self) -> str:
        return f"Task of kind {self.args[0]!r} never registered, please make sure it's imported."


class Retry(AioCeleryError):
    """Raised by ``Task.retry()``: the task was sent again and this run ends here."""

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: Any = None, sig: Any = None) -> None:
        super().__init__(message, exc, when)
        self.message = message
        self.exc = exc
        self.when = when
        #: in an eager run (``Task.apply``), what to run again (Celery's ``Retry.sig``)
        self.sig = sig

    def __str__(self) -> str:
        if self.message:
            return self.message
        reason = f": {self.exc!r}" if self.exc is not None else ""
        when = f" in {self.when}s" if isinstance(self.when, (int, float)) else (
            f" at {self.when}" if self.when is not None else "")
        return f"Retry{when}{reason}"


class MaxRetriesExceededError(AioCeleryError):
    """The task was asked to retry more often than ``max_retries`` allows."""


class TaskRevokedError(AioCeleryError):
    """The task was revoked and did not run (for example because it expired)."""


class SoftTimeLimitExceeded(AioCeleryError):
    """The task ran past its soft time limit."""


class TimeLimitExceeded(AioCeleryError):
    """The task ran past its hard time limit and was cancelled."""


class ChordError(AioCeleryError):
    """A task of a chord's header failed (or expired), so the chord's body did not run."""


class WorkerLostError(AioCeleryError):
    """The worker process died while running the task, often enough that the task was
    retired instead of being run again (see the poison guard, :mod:`aio_celery.poison`)."""


class RemoteTaskError(AioCeleryError):
    """A stored failure whose exception class is unknown or not importable here.

    ``exc_type`` and ``exc_module`` name the original class; ``args`` are its arguments.
    """

    def __init__(self, exc_type: str, exc_module: str | None, *args: Any) -> None:
        super().__init__(*args)
        self.exc_type = exc_type
        self.exc_module = exc_module

    def __str__(self) -> str:
        where = f"{self.exc_module}." if self.exc_module else ""
        message = ", ".join(str(a) for a in self.args)
        return f"{where}{self.exc_type}: {message}"


__all__ = [
    "AioCeleryError",
    "BackendConnectionError",
    "BackendError",
    "BrokerConnectionError",
    "ChordError",
    "ConfigurationError",
    "MaxRetriesExceededError",
    "MessageDecodeError",
    "NotRegistered",
    "PublishRefusedError",
    "RemoteTaskError",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "WorkerLostError",
]
