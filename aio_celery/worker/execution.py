"""Run one decoded task message and decide how to settle it.

Order of events, as in Celery: expiry check, STARTED (if tracked), ``task_prerun``, the task
under its time limits, then on success the next chain step and callbacks are sent, the
result is stored (with those ``children``), a chord header task reports its part (see
:mod:`aio_celery.worker.chord`), and only then the message is acknowledged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aio_celery import resultmeta, signals, states
from aio_celery.app import Celery
from aio_celery.canvas import Signature, send_signature
from aio_celery.config import first_set
from aio_celery.exceptions import (
    BackendError,
    NotRegistered,
    Retry,
    TaskRevokedError,
    WorkerLostError,
)
from aio_celery.protocol import TaskMessage
from aio_celery.result import result_tuple
from aio_celery.task import Context, Task, current_request, current_task, retry_countdown
from aio_celery.worker import chord
from aio_celery.worker.limits import run_with_limits

logger = logging.getLogger("aio_celery.worker")

#: how long a result that cannot be stored is retried before the message is requeued
STORE_RETRY_SECONDS = 10.0


class Settle(enum.Enum):
    """What to do with the message once the task is over."""

    ACK = "ack"
    REJECT = "reject"  # dead-letter it: never requeue a message that cannot run here
    REQUEUE = "requeue"  # give it back: it will run again (at-least-once)


class TaskRunner:
    """Executes task messages for one app in one worker process."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        settings = app.conf.settings
        self._has_backend = bool(settings.result_backend)
        self._ignore_default = settings.task_ignore_result
        self._track_started = settings.task_track_started

    async def run(self, message: TaskMessage, delivery_info: dict[str, Any]) -> Settle:
        task = self.app.tasks.get(message.task)
        if task is None:
            return await self._unknown(message)
        if message.expires is not None and self.app.now() >= message.expires:
            return await self._expired(task, message)
        request = self._context(message, delivery_info)
        request_token = current_request.set(request)
        task_token = current_task.set(task)
        try:
            return await self._execute(task, request, message)
        finally:
            current_task.reset(task_token)
            current_request.reset(request_token)

    def _context(self, message: TaskMessage, delivery_info: dict[str, Any]) -> Context:
        return Context(
            id=message.id, task=message.task, args=message.args, kwargs=message.kwargs,
            retries=message.retries, eta=message.eta, expires=message.expires,
            root_id=message.root_id, parent_id=message.parent_id, group=message.group,
            group_index=message.group_index, delivery_info=delivery_info,
            hostname=self.hostname, reply_to=message.reply_to, correlation_id=message.id,
            ignore_result=bool(message.ignore_result),
            timelimit=(message.time_limit, message.soft_time_limit), origin=message.origin,
            callbacks=message.callbacks, errbacks=message.errbacks, chain=message.chain,
            chord=message.chord,
        )

    def acks_early(self, message: TaskMessage) -> bool:
        """True when the message is to be acknowledged as the task starts (``acks_late``
        False on the task, or ``task_acks_late`` False in the app): at-most-once."""
        task = self.app.tasks.get(message.task)
        choice = task.acks_late if task is not None else None
        if choice is None:
            choice = self.app.conf.settings.task_acks_late
        return not choice

    def _ignores_result(self, task: Task, message: TaskMessage) -> bool:
        if not self._has_backend:
            return True
        for choice in (message.ignore_result, task.ignore_result):
            if choice is not None:
                return bool(choice)
        return self._ignore_default

    async def _execute(self, task: Task, request: Context, message: TaskMessage) -> Settle:
        settings = self.app.conf.settings
        ignore = self._ignores_result(task, message)
        track = task.track_started if task.track_started is not None else self._track_started
        if track and not ignore:
            await self._store(message, states.STARTED, {"pid": os.getpid(),
                                                        "hostname": self.hostname})
        if signals.task_prerun.receivers:  # hot path: no coroutine when unused
            await signals.task_prerun.send(sender=task, task_id=message.id, task=task,
                                           args=message.args, kwargs=message.kwargs)
        soft = first_set(message.soft_time_limit, task.soft_time_limit,
                      settings.task_soft_time_limit)
        hard = first_set(message.time_limit, task.time_limit, settings.task_time_limit)
        started = time.monotonic()
        outcome: BaseException | None = None
        try:
            value = await run_with_limits(task(*message.args, **message.kwargs), soft, hard)
        except Exception as exc:
            outcome = await self._autoretry(task, request, exc)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise  # a stop or a lost connection: the session gives the message back
            outcome = exc  # the task's own (it awaited something cancelled): a failure
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt, GeneratorExit raised by the task body (it
            # called sys.exit(), say) are its failure: they must not end the worker
            # (asyncio re-raises the first two out of the event loop). Our own stop
            # requests reach a task as cancellation, never as these.
            outcome = exc
        runtime = time.monotonic() - started
        if outcome is None:
            settle = await self._on_success(task, request, message, value, ignore, runtime)
            state = states.SUCCESS
        elif isinstance(outcome, Retry):
            settle = await self._on_retry(task, message, outcome, ignore)
            state = states.RETRY
        else:
            settle = await self._on_failure(task, message, outcome, ignore, runtime)
            state = states.FAILURE
        if signals.task_postrun.receivers:  # hot path: no coroutine when unused
            await signals.task_postrun.send(sender=task, task_id=message.id, task=task,
                                            args=message.args, kwargs=message.kwargs, state=state)
        return settle

    async def _autoretry(self, task: Task, request: Context, exc: Exception) -> BaseException:
        """Send the retry for an ``autoretry_for`` exception; returns the outcome: ``exc``
        itself when it is not one, the Retry sent, or the final failure."""
        if isinstance(exc, Retry) or not isinstance(exc, task.autoretry_for):
            return exc
        countdown = retry_countdown(task, request.retries, self.app.rand.uniform)
        try:
            return await task.retry(exc=exc, countdown=countdown, throw=False)
        except Exception as final:  # max retries exceeded: the original exception
            return final

    async def _on_success(self, task: Task, request: Context, message: TaskMessage,
                          value: Any, ignore: bool, runtime: float) -> Settle:
        await self._send_followers(message, value)
        if logger.isEnabledFor(logging.INFO):
            logger.info("Task %s[%s] succeeded in %.3fs: %s", task.name, message.id, runtime,
                        _short(value))
        if not ignore:
            children = [result_tuple(child) for child in request.children]
            if not await self._store(message, states.SUCCESS, value, children=children):
                return Settle.REQUEUE
        if not await self._chord_part(message, states.SUCCESS, value):
            return Settle.REQUEUE
        if signals.task_success.receivers:  # hot path: no coroutine when unused
            await signals.task_success.send(sender=task, result=value, task_id=message.id)
        return Settle.ACK

    async def _send_followers(self, message: TaskMessage, value: Any) -> None:
        """The next chain step (last of the stack) and ``link`` callbacks get the result."""
        if message.chain:
            stack = list(message.chain)
            step = Signature(stack.pop(), app=self.app)
            if "chord" in step.options:  # the last step of a chain in a chord header
                await send_signature(self.app, step.clone((value,)), chain=stack or None,
                                     add_to_parent=True, lenient=True)
            else:
                await step.apply_async((value,), chain=stack or None)
        for callback in message.callbacks or ():
            await Signature(callback, app=self.app).apply_async((value,))

    async def _on_retry(self, task: Task, message: TaskMessage, retry: Retry,
                        ignore: bool) -> Settle:
        logger.info("Task %s[%s] retry: %s", task.name, message.id, retry)
        if not ignore:
            reason = retry.exc if retry.exc is not None else retry
            if not await self._store(message, states.RETRY,
                                     resultmeta.exception_to_dict(reason),
                                     traceback_text=_format_tb(reason)):
                return Settle.REQUEUE
        await signals.task_retry.send(sender=task, request=current_request.get(),
                                      reason=retry.exc or retry)
        return Settle.ACK

    async def _on_failure(self, task: Task, message: TaskMessage, exc: BaseException,
                          ignore: bool, runtime: float) -> Settle:
        tb = _format_tb(exc)
        logger.error("Task %s[%s] raised unexpected: %r (after %.3fs)\n%s", task.name,
                     message.id, exc, runtime, tb.rstrip())
        for errback in message.errbacks or ():
            try:
                await Signature(errback, app=self.app).apply_async((message.id,))
            except Exception:
                logger.exception("Task %s[%s]: could not send errback %r", task.name,
                                 message.id, errback.get("task"))
        error = resultmeta.exception_to_dict(exc)
        if not ignore and not await self._store(message, states.FAILURE, error,
                                                traceback_text=tb):
            return Settle.REQUEUE
        if not await self._chord_part(message, states.FAILURE, error):
            return Settle.REQUEUE
        if not await self._fail_chord_steps(message, error, tb):
            return Settle.REQUEUE
        await signals.task_failure.send(sender=task, task_id=message.id, exception=exc,
                                        args=message.args, kwargs=message.kwargs,
                                        traceback=tb)
        return Settle.ACK

    async def _unknown(self, message: TaskMessage) -> Settle:
        logger.error(
            "Received unregistered task of type %r (id %s): rejected without requeue. "
            "Is the module that defines it imported by the worker's app? Known tasks: %s",
            message.task, message.id, ", ".join(sorted(self.app.tasks)) or "none")
        if self._has_backend and not message.ignore_result:
            await self._store(message, states.FAILURE,
                              resultmeta.exception_to_dict(NotRegistered(message.task)))
        await signals.task_unknown.send(sender=None, name=message.task, id=message.id)
        return Settle.REJECT

    async def _expired(self, task: Task, message: TaskMessage) -> Settle:
        logger.info("Task %s[%s] expired at %s: not run, stored as REVOKED", task.name,
                    message.id, message.expires)
        error = resultmeta.exception_to_dict(TaskRevokedError("expired"))
        if not self._ignores_result(task, message):
            await self._store(message, states.REVOKED, error)
        if not await self._chord_part(message, states.REVOKED, error):
            return Settle.REQUEUE
        await signals.task_revoked.send(sender=task, request=message, expired=True)
        return Settle.ACK

    async def retire(self, message: TaskMessage, delivery_info: dict[str, Any],
                     deaths: int) -> Settle:
        """The poison guard's end for a task that killed its worker process ``deaths`` times:
        not run again; FAILURE ``WorkerLostError`` stored (and errbacks and the chord told,
        as for any failure); the message rejected without requeue."""
        arguments = self.app.conf.settings.task_queue_arguments or {}
        exchange = arguments.get("x-dead-letter-exchange")
        if exchange is None:
            where = ("dropped unless the queue has a dead-letter exchange (set by a policy, "
                     "or task_queue_arguments={'x-dead-letter-exchange': ...})")
        else:
            key = arguments.get("x-dead-letter-routing-key", delivery_info["routing_key"])
            where = f"dead-lettered to exchange {exchange!r} with routing key {key!r}"
        logger.error("Task %s[%s] retired: its worker process died %d times while it ran "
                     "(worker_max_task_deaths); stored as FAILURE WorkerLostError, message "
                     "rejected from queue %s without requeue: %s", message.task, message.id,
                     deaths, delivery_info["queue"], where)
        error = resultmeta.exception_to_dict(WorkerLostError(
            f"Worker exited prematurely: the process died {deaths} times while running "
            f"{message.task}[{message.id}]; retired, not run again"))
        task = self.app.tasks.get(message.task)
        ignore = self._ignores_result(task, message) if task is not None else (
            not self._has_backend or bool(message.ignore_result))
        for errback in message.errbacks or ():
            try:
                await Signature(errback, app=self.app).apply_async((message.id,))
            except Exception:
                logger.exception("Task %s[%s]: could not send errback %r", message.task,
                                 message.id, errback.get("task"))
        if not ignore and not await self._store(message, states.FAILURE, error):
            return Settle.REQUEUE  # retired again when it comes back (it never runs)
        if not await self._chord_part(message, states.FAILURE, error):
            return Settle.REQUEUE
        return Settle.REJECT

    async def _chord_part(self, message: TaskMessage, state: str, result: Any) -> bool:
        """For a chord header task: Celery's ``on_chord_part_return`` (whether or not the
        result itself is stored). False if the backend stayed unreachable: the message is
        then requeued, and the part is counted once however often it comes back."""
        if not message.chord or not message.group:
            return True
        return await self._report_part(message.task, message.id, message.group,
                                       message.group_index, message.chord, state, result)

    async def _report_part(self, name: str, task_id: str, group_id: str,
                           group_index: int | None, body: dict[str, Any], state: str,
                           result: Any) -> bool:
        if not self._has_backend:
            logger.error("Task %s[%s] is part of chord %s but no result_backend is "
                         "configured: the chord cannot complete", name, task_id, group_id)
            return True
        token = uuid.uuid4().hex  # the same for every attempt: a claim we took is ours

        async def report() -> None:
            await chord.on_chord_part_return(
                self.app, task_id=task_id, group_id=group_id, group_index=group_index,
                body=body, state=state, result=result, claim_token=token)

        return await self._with_backend_retries(name, task_id, "chord part", report)

    async def _fail_chord_steps(self, message: TaskMessage, error: dict[str, Any],
                                tb: str) -> bool:
        """A chain in a chord header failed before its last step: that step (the chord's
        member) is stored as failed and reports its part, as Celery's ``_fail_chain``
        does, so that the chord does not wait for it forever."""
        for step in message.chain or ():
            options = step.get("options") or {}
            task_id, group_id = options.get("task_id"), options.get("group_id")
            if "chord" not in options or not task_id or not group_id or not self._has_backend:
                continue
            meta = resultmeta.build_meta(task_id, states.FAILURE, error, now=self.app.now(),
                                         traceback=tb, parent_id=options.get("parent_id"),
                                         group_id=group_id)
            if not await self._store_meta(message, meta):
                return False
            if not await self._report_part(str(step.get("task")), task_id, group_id,
                                           options.get("group_index"), options["chord"],
                                           states.FAILURE, error):
                return False
        return True

    async def _with_backend_retries(self, name: str, task_id: str, what: str,
                                    operation: Callable[[], Awaitable[None]]) -> bool:
        """Run ``operation``, retrying for a while if the backend is down; False if it never
        got through."""
        deadline = time.monotonic() + STORE_RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                await operation()
                return True
            except BackendError as exc:
                if time.monotonic() + delay > deadline:
                    logger.error("Task %s[%s]: %s not recorded (%s); the message goes back to "
                                 "the queue", name, task_id, what, exc)
                    return False
                logger.warning("Task %s[%s]: result backend error (%s), retrying in %.1fs",
                               name, task_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _store(self, message: TaskMessage, state: str, result: Any, *,
                     traceback_text: str | None = None,
                     children: list[Any] | None = None) -> bool:
        """Store a result, retrying for a while if the backend is down; False if it never
        got through (the caller then keeps the message for redelivery)."""
        meta = resultmeta.build_meta(message.id, state, result, now=self.app.now(),
                                     traceback=traceback_text, children=children,
                                     parent_id=message.parent_id, group_id=message.group)
        try:
            resultmeta.encode_meta(meta)
        except (TypeError, ValueError) as exc:
            meta = resultmeta.build_meta(
                message.id, states.FAILURE,
                resultmeta.exception_to_dict(TypeError(f"result is not JSON serializable: {exc}")),
                now=self.app.now(), parent_id=message.parent_id, group_id=message.group)
        return await self._store_meta(message, meta)

    async def _store_meta(self, message: TaskMessage, meta: dict[str, Any]) -> bool:
        deadline = time.monotonic() + STORE_RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                await self.app.backend.store(meta)
                return True
            except BackendError as exc:
                if time.monotonic() + delay > deadline:
                    logger.error(
                        "Task %s[%s]: result %s not stored (%s); the message goes back to the "
                        "queue and the task will run again once the backend answers",
                        message.task, message.id, meta["status"], exc)
                    return False
                logger.warning("Task %s[%s]: result backend error (%s), retrying in %.1fs",
                               message.task, message.id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
