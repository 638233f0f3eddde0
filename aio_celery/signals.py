"""Hooks with Celery's names: ``@task_prerun.connect`` and friends.

Receivers may be plain functions or coroutine functions; they are called with keyword
arguments as in Celery (``sender``, ``task_id``, ``task``, ``args``, ``kwargs``, ...).
An exception in a receiver is logged and does not stop the task or the worker.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Receiver = Callable[..., Any]


class Signal:
    """A named hook that receivers connect to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: list[Receiver] = []

    def __repr__(self) -> str:
        return f"<Signal: {self.name} ({len(self.receivers)} receivers)>"

    def connect(self, receiver: Receiver) -> Receiver:
        """Add a receiver (usable as a decorator)."""
        if receiver not in self.receivers:
            self.receivers.append(receiver)
        return receiver

    def disconnect(self, receiver: Receiver) -> None:
        if receiver in self.receivers:
            self.receivers.remove(receiver)

    async def send(self, sender: Any = None, **kwargs: Any) -> None:
        """Call every receiver in order; await the coroutine ones."""
        for receiver in list(self.receivers):
            try:
                outcome = receiver(sender=sender, signal=self, **kwargs)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                logger.exception("Signal %s: receiver %r raised", self.name, receiver)


worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
task_unknown = Signal("task_unknown")
task_rejected = Signal("task_rejected")
