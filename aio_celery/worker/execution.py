"""Run one decoded task message and decide how to settle it.

Order of events, as in Celery: expiry check, STARTED (if tracked), ``task_prerun``, the task
under its time limits, then on success the next chain step and callbacks are sent, the
result is stored (with those ``children``), a chord header task reports its part (see
:mod:`aio_celery.worker.chord`), and only then the message is acknowledged.

A finished task never runs again because the result backend or the broker is away: if a
result, a chord part or a follow-up message (chain step, callback, errback, a ``retry()``
that could not be published) does not get through, the task waits for it, in order, with
its message unacknowledged; it tells the session (:attr:`TaskRunner.on_waiting`), which
frees its concurrency slot and bounds how many may wait (``worker_max_pending_results``).
Only a shutdown gives such a message back. A publish the broker refuses for good
(PRECONDITION_FAILED, ACCESS_REFUSED, NOT_FOUND) is not retried: the task's result is then
a FAILURE naming the follow-up and the cause. Intermediate states (STARTED, RETRY) are
tried once: the next state replaces them anyway.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import logging
import os
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aio_celery import events as wire_events
from aio_celery import metrics, resultmeta, signals, states
from aio_celery.app import Celery
from aio_celery.canvas import Signature, send_signature
from aio_celery.config import first_set
from aio_celery.control.revoked import RevokedSet
from aio_celery.exceptions import (
    BackendError,
    BrokerConnectionError,
    NotRegistered,
    PublishRefusedError,
    Retry,
    TaskRevokedError,
    WorkerLostError,
)
from aio_celery.protocol import TaskMessage
from aio_celery.result import result_tuple
from aio_celery.saferepr import saferepr
from aio_celery.task import Context, Task, current_request, current_task, retry_countdown
from aio_celery.worker import chord
from aio_celery.worker.dependency import DependencyOutage
from aio_celery.worker.events import EventDispatcher
from aio_celery.worker.limits import run_with_limits
from aio_celery.worker.stats import Stats

logger = logging.getLogger("aio_celery.worker")


class Settle(enum.Enum):
    """What to do with the message once the task is over."""

    ACK = "ack"
    REJECT = "reject"  # dead-letter it: never requeue a message that cannot run here
    REQUEUE = "requeue"  # give it back: it will run again (at-least-once)


@dataclasses.dataclass(slots=True)
class Active:
    """A task whose body runs now (what ``inspect active`` lists and ``revoke
    --terminate`` cancels)."""

    message: TaskMessage
    delivery_info: dict[str, Any]
    time_start: float  # time.time()
    acknowledged: bool
    task: asyncio.Task[Any]
    terminating: bool = False


class TaskRunner:
    """Executes task messages for one app in one worker process."""

    def __init__(self, app: Celery, hostname: str, *,
                 revoked: RevokedSet | None = None,
                 total: collections.Counter[str] | None = None,
                 recorder: metrics.Recorder | None = None,
                 events: EventDispatcher | None = None) -> None:
        """``events``: where the task events go (none: a dispatcher that is off)."""
        self.app = app
        self.hostname = hostname
        self.metrics = recorder or metrics.Recorder()
        self.events = events if events is not None else EventDispatcher(hostname, None,
                                                                        Stats())
        #: ids revoked by remote control: skipped when they come to run
        self.revoked = revoked if revoked is not None else RevokedSet()
        #: the tasks whose body runs now, by id
        self.active: dict[str, Active] = {}
        #: tasks started, by name (``inspect stats``' ``total``)
        self.total: collections.Counter[str] = total if total is not None \
            else collections.Counter()
        #: told of each revoked task skipped, terminated or expired: (task id, terminated,
        #: expired); by default it sends the task-revoked event
        self.on_revoked: Callable[[str, bool, bool], None] = self._announce_revoked
        settings = app.conf.settings
        self._has_backend = bool(settings.result_backend)
        self._ignore_default = settings.task_ignore_result
        self._track_started = settings.task_track_started
        #: called from a finished task's own asyncio task when it starts waiting for the
        #: backend or the broker (at most once per task counts): the session frees its slot
        self.on_waiting: Callable[[], None] = _nothing
        self.backend_outage = DependencyOutage(
            "The result backend",
            f"No new task starts while worker_max_pending_results "
            f"({settings.worker_max_pending_results}) wait; a warm shutdown waits for them "
            "up to its timeout, then returns their messages to the queue.",
            errors=(BackendError,))
        self.broker_outage = DependencyOutage(
            "Publishing follow-up messages (chain steps, callbacks, retries)",
            "Check that RabbitMQ runs and accepts publishes (a disk or memory alarm blocks "
            "them).", errors=(BrokerConnectionError,))

    async def run(self, message: TaskMessage, delivery_info: dict[str, Any]) -> Settle:
        task = self.app.tasks.get(message.task)
        if task is None:
            return await self._unknown(message)
        if message.expires is not None and self.app.now() >= message.expires:
            return await self._expired(task, message)
        if self.is_revoked(message.id):
            return await self.skip_revoked(message)
        self.total[message.task] += 1
        if self.events.tasks_on:
            self.events.task("task-started", {"uuid": message.id})
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

    def label(self, name: str) -> str:
        """The metrics' ``task`` label for ``name``: registered names only, so that a
        stream of made-up names cannot grow the label set."""
        return name if name in self.app.tasks else metrics.UNKNOWN_TASK

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
            await self._store_passing(message, states.STARTED, {"pid": os.getpid(),
                                                                "hostname": self.hostname})
        if signals.task_prerun.receivers:  # hot path: no coroutine when unused
            await signals.task_prerun.send(sender=task, task_id=message.id, task=task,
                                           args=message.args, kwargs=message.kwargs)
        soft = first_set(message.soft_time_limit, task.soft_time_limit,
                      settings.task_soft_time_limit)
        hard = first_set(message.time_limit, task.time_limit, settings.task_time_limit)
        started = time.monotonic()
        outcome: BaseException | None = None
        active = self.active[message.id] = Active(
            message, request.delivery_info or {}, time.time(), self.acks_early(message),
            asyncio.current_task())  # type: ignore[arg-type]
        try:
            value = await run_with_limits(task(*message.args, **message.kwargs), soft, hard)
        except Exception as exc:
            outcome = await self._autoretry(task, request, exc)
        except asyncio.CancelledError as exc:
            if _being_cancelled() and not active.terminating:
                raise  # a stop or a lost connection: the session gives the message back
            outcome = exc  # terminated, or the task's own (it awaited something cancelled)
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt, GeneratorExit raised by the task body (it
            # called sys.exit(), say) are its failure: they must not end the worker
            # (asyncio re-raises the first two out of the event loop). Our own stop
            # requests reach a task as cancellation, never as these.
            outcome = exc
        finally:
            if self.active.get(message.id) is active:
                del self.active[message.id]
        if active.terminating:  # even if the body swallowed the CancelledError
            return await self._terminated(task, message, ignore)
        runtime = time.monotonic() - started
        settle, state = await self._conclude(task, request, message, outcome,
                                             None if outcome is not None else value, ignore,
                                             runtime)
        self.metrics.task_done(task.name, _OUTCOMES[state], runtime)
        if signals.task_postrun.receivers:  # hot path: no coroutine when unused
            await signals.task_postrun.send(sender=task, task_id=message.id, task=task,
                                            args=message.args, kwargs=message.kwargs, state=state)
        return settle

    async def _conclude(self, task: Task, request: Context, message: TaskMessage,
                        outcome: BaseException | None, value: Any, ignore: bool,
                        runtime: float) -> tuple[Settle, str]:
        """Send the follow-ups, record the outcome; returns how to settle, and the state."""
        refused: PublishRefusedError | None = None
        chain_lost = False  # the chain's next step will never be sent
        if request.unsent:  # retry() could not publish: sent now that the body is over
            refused = await self._send_unsent(task, message, request)
            chain_lost = refused is not None  # the retry carried the chain
        if outcome is None and refused is None and (message.chain or message.callbacks):
            refused, chain_lost = await self._send_followers(task, message, value)
        if refused is not None:
            outcome = refused
        if outcome is None:
            settle = await self._on_success(task, request, message, value, ignore, runtime)
            state = states.SUCCESS
        elif isinstance(outcome, Retry):
            settle = await self._on_retry(task, message, outcome, ignore)
            state = states.RETRY
        else:
            settle = await self._on_failure(task, message, outcome, ignore, runtime,
                                            logged=refused is not None, chain_lost=chain_lost)
            state = states.FAILURE
        return settle, state

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

    # --- follow-up messages ----------------------------------------------------------------

    async def _send_unsent(self, task: Task, message: TaskMessage,
                           request: Context) -> PublishRefusedError | None:
        """Publish what ``retry()`` handed over; returns the refusal, if any (it becomes
        the task's outcome)."""
        unsent, request.unsent = request.unsent or [], None
        for item in unsent:
            try:
                await self._publish(message, item.what, item.send, item.error)
            except PublishRefusedError as exc:
                logger.error("Task %s[%s]: %s; the task is stored as failed and its message "
                             "acknowledged (nothing retries a refusal)", task.name,
                             message.id, exc)
                return exc
        return None

    async def _send_followers(self, task: Task, message: TaskMessage,
                              value: Any) -> tuple[PublishRefusedError | None, bool]:
        """The next chain step (last of the stack) and ``link`` callbacks get the result.
        Returns the refusal if the broker refused one for good (the rest is not sent), and
        whether that left the chain's next step unsent."""
        chain_sent = not message.chain
        try:
            if message.chain:
                stack = list(message.chain)
                step = _with_id(Signature(stack.pop(), app=self.app))
                rest = stack or None
                if "chord" in step.options:  # the last step of a chain in a chord header
                    send = functools.partial(send_signature, self.app, step.clone((value,)),
                                             chain=rest, add_to_parent=True, lenient=True)
                else:
                    send = functools.partial(step.apply_async, (value,), chain=rest)
                await self._publish(message, f"chain step {_label(step)}", send)
                chain_sent = True
            for callback in message.callbacks or ():
                sig = _with_id(Signature(callback, app=self.app))
                await self._publish(message, f"link callback {_label(sig)}",
                                    functools.partial(sig.apply_async, (value,)))
        except PublishRefusedError as exc:
            logger.error("Task %s[%s] succeeded, but %s; the task is stored as failed and "
                         "its message acknowledged (nothing retries a refusal)", task.name,
                         message.id, exc)
            return exc, not chain_sent
        return None, False

    async def _publish(self, message: TaskMessage, what: str,
                       send: Callable[[], Awaitable[Any]],
                       error: BaseException | None = None) -> None:
        """Publish a follow-up; while the broker cannot take it, the task waits and tries
        again (its message stays unacknowledged). A refusal for good raises
        PublishRefusedError naming ``what``. ``error``: the first try failed already."""
        try:
            if error is None:
                try:
                    await send()
                    return
                except PublishRefusedError:
                    raise
                except BrokerConnectionError as exc:
                    error = exc
                finally:
                    if error is None and self.broker_outage.down:
                        self.broker_outage.answered()
            await self._until_through(self.broker_outage, error, message.task, message.id,
                                      what, send)
        except PublishRefusedError as exc:
            raise PublishRefusedError(f"{what} could not be published: {exc}") from exc

    # --- outcomes ----------------------------------------------------------------------------

    async def _on_success(self, task: Task, request: Context, message: TaskMessage,
                          value: Any, ignore: bool, runtime: float) -> Settle:
        if logger.isEnabledFor(logging.INFO):
            logger.info("Task %s[%s] succeeded in %.3fs: %s", task.name, message.id, runtime,
                        _short(value))
        if not ignore:
            children = [result_tuple(child) for child in request.children]
            await self._store(message, states.SUCCESS, value, children=children)
        await self._chord_part(message, states.SUCCESS, value)
        if self.events.tasks_on:
            self.events.task("task-succeeded",
                             wire_events.succeeded_fields(message.id, value, runtime))
        if signals.task_success.receivers:  # hot path: no coroutine when unused
            await signals.task_success.send(sender=task, result=value, task_id=message.id)
        return Settle.ACK

    async def _on_retry(self, task: Task, message: TaskMessage, retry: Retry,
                        ignore: bool) -> Settle:
        logger.info("Task %s[%s] retry: %s", task.name, message.id, retry)
        if not ignore:
            reason = retry.exc if retry.exc is not None else retry
            await self._store_passing(message, states.RETRY,
                                      resultmeta.exception_to_dict(reason),
                                      traceback_text=_format_tb(reason))
        if self.events.tasks_on:
            reason = retry.exc if retry.exc is not None else retry
            self.events.task("task-retried", wire_events.failed_fields(
                message.id, reason, _format_tb(reason)))
        await signals.task_retry.send(sender=task, request=current_request.get(),
                                      reason=retry.exc or retry)
        return Settle.ACK

    async def _on_failure(self, task: Task, message: TaskMessage, exc: BaseException,
                          ignore: bool, runtime: float, *, logged: bool = False,
                          chain_lost: bool = False) -> Settle:
        """``logged``: a follow-up was refused (and logged); ``chain_lost``: the chain's
        next step was not sent, so every later step with an id is stored as failed too, or
        nothing would ever complete the chain (Celery's ``mark_as_failure`` does so)."""
        tb = _format_tb(exc)
        if not logged:
            logger.error("Task %s[%s] raised unexpected: %r (after %.3fs)\n%s", task.name,
                         message.id, exc, runtime, tb.rstrip())
        await self._send_errbacks(message)
        error = resultmeta.exception_to_dict(exc)
        if not ignore:
            await self._store(message, states.FAILURE, error, traceback_text=tb)
        await self._chord_part(message, states.FAILURE, error)
        await self._fail_chain_steps(message, error, tb, every_step=chain_lost)
        if self.events.tasks_on:
            self.events.task("task-failed", wire_events.failed_fields(message.id, exc, tb))
        await signals.task_failure.send(sender=task, task_id=message.id, exception=exc,
                                        args=message.args, kwargs=message.kwargs,
                                        traceback=tb)
        return Settle.ACK

    async def _send_errbacks(self, message: TaskMessage) -> None:
        """``link_error`` callbacks get the task id (waiting while the broker is away; one
        the broker refuses is logged and skipped)."""
        for errback in message.errbacks or ():
            sig = _with_id(Signature(errback, app=self.app))
            try:
                await self._publish(message, f"link_error {_label(sig)}",
                                    functools.partial(sig.apply_async, (message.id,)))
            except PublishRefusedError as refusal:
                logger.error("Task %s[%s]: %s (not sent)", message.task, message.id, refusal)
            except Exception:
                logger.exception("Task %s[%s]: could not send errback %r", message.task,
                                 message.id, errback.get("task"))

    async def _unknown(self, message: TaskMessage) -> Settle:
        logger.error(
            "Received unregistered task of type %r (id %s): rejected without requeue. "
            "Is the module that defines it imported by the worker's app? Known tasks: %s",
            message.task, message.id, ", ".join(sorted(self.app.tasks)) or "none")
        if self._has_backend and not message.ignore_result:
            await self._store(message, states.FAILURE,
                              resultmeta.exception_to_dict(NotRegistered(message.task)))
        if self.events.tasks_on:  # Celery's: no traceback
            self.events.task("task-failed", {"uuid": message.id,
                                             "exception": f"NotRegistered({message.task!r})"})
        await signals.task_unknown.send(sender=None, name=message.task, id=message.id)
        self.metrics.task_done(metrics.UNKNOWN_TASK, metrics.REJECTED, None)
        return Settle.REJECT

    async def _expired(self, task: Task, message: TaskMessage) -> Settle:
        logger.info("Task %s[%s] expired at %s: not run, stored as REVOKED", task.name,
                    message.id, message.expires)
        error = resultmeta.exception_to_dict(TaskRevokedError("expired"))
        if not self._ignores_result(task, message):
            await self._store(message, states.REVOKED, error)
        await self._chord_part(message, states.REVOKED, error)
        self.on_revoked(message.id, False, True)
        await signals.task_revoked.send(sender=task, request=message, expired=True)
        self.metrics.task_done(task.name, metrics.REVOKED, None)
        return Settle.ACK

    def _announce_revoked(self, task_id: str, terminated: bool, expired: bool) -> None:
        """The task-revoked event (no ``signum``: a terminated task's coroutine is
        cancelled, no signal is sent)."""
        if self.events.tasks_on:
            self.events.task("task-revoked", wire_events.revoked_fields(
                task_id, terminated=terminated, expired=expired))

    def is_revoked(self, task_id: str) -> bool:
        # hot path: checked twice per message; an empty set costs no clock read
        return bool(self.revoked) and self.revoked.revoked(task_id, time.time())

    async def skip_revoked(self, message: TaskMessage) -> Settle:
        """A revoked task that came to run (at its receipt or its eta): not run, REVOKED
        stored, to be acknowledged."""
        logger.info("Discarding revoked task: %s[%s]", message.task, message.id)
        await self._revoked(message, "revoked", terminated=False)
        return Settle.ACK

    def terminate(self, task_id: str) -> bool:
        """Cancel the running body of ``task_id`` (CancelledError raised at its current
        await); its run then stores REVOKED and acknowledges it. False if it does not run."""
        active = self.active.get(task_id)
        if active is None or active.task.done():
            return False
        active.terminating = True
        active.task.cancel()
        return True

    async def _terminated(self, task: Task, message: TaskMessage, ignore: bool) -> Settle:
        current = asyncio.current_task()
        if current is not None:
            while current.cancelling():
                current.uncancel()  # the cancellation was the terminate: consumed here
        logger.info("Terminated task %s[%s]: stored as REVOKED", message.task, message.id)
        await self._revoked(message, "terminated", terminated=True, store=not ignore)
        return Settle.ACK

    async def _revoked(self, message: TaskMessage, reason: str, *, terminated: bool,
                       store: bool | None = None) -> None:
        task = self.app.tasks.get(message.task)
        error = resultmeta.exception_to_dict(TaskRevokedError(reason))
        if store is None:
            store = task is not None and not self._ignores_result(task, message)
        if store:
            await self._store(message, states.REVOKED, error)
        await self._chord_part(message, states.REVOKED, error)
        self.metrics.task_done(self.label(message.task), metrics.REVOKED, None)
        self.on_revoked(message.id, terminated, False)
        await signals.task_revoked.send(sender=task, request=message, terminated=terminated,
                                        signum=None, expired=False)

    async def retire(self, message: TaskMessage, delivery_info: dict[str, Any],
                     deaths: int) -> Settle:
        """The poison guard's end for a task that killed its worker process ``deaths`` times:
        not run again; FAILURE ``WorkerLostError`` stored (and errbacks and the chord told,
        as for any failure; each waits while Redis or the broker is away); the message
        rejected without requeue."""
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
        lost = WorkerLostError(
            f"Worker exited prematurely: the process died {deaths} times while running "
            f"{message.task}[{message.id}]; retired, not run again")
        error = resultmeta.exception_to_dict(lost)
        if self.events.tasks_on:
            self.events.task("task-failed", wire_events.failed_fields(message.id, lost, ""))
        task = self.app.tasks.get(message.task)
        ignore = self._ignores_result(task, message) if task is not None else (
            not self._has_backend or bool(message.ignore_result))
        await self._send_errbacks(message)
        if not ignore:
            await self._store(message, states.FAILURE, error)
        await self._chord_part(message, states.FAILURE, error)
        self.metrics.task_done(self.label(message.task), metrics.RETIRED, None)
        return Settle.REJECT

    # --- chords ------------------------------------------------------------------------------

    async def _chord_part(self, message: TaskMessage, state: str, result: Any) -> None:
        """For a chord header task: Celery's ``on_chord_part_return`` (whether or not the
        result itself is stored). Waits while the backend is unreachable; a part is
        counted once however often it is reported."""
        if not message.chord or not message.group:
            return
        await self._report_part(message.task, message.id, message.group,
                                message.group_index, message.chord, state, result)

    async def _report_part(self, name: str, task_id: str, group_id: str,
                           group_index: int | None, body: dict[str, Any], state: str,
                           result: Any) -> None:
        if not self._has_backend:
            logger.error("Task %s[%s] is part of chord %s but no result_backend is "
                         "configured: the chord cannot complete", name, task_id, group_id)
            return
        token = uuid.uuid4().hex  # the same for every attempt: a claim we took is ours

        async def report() -> None:
            await chord.on_chord_part_return(
                self.app, task_id=task_id, group_id=group_id, group_index=group_index,
                body=body, state=state, result=result, claim_token=token)

        await self._record(name, task_id, "chord part", report)

    async def _fail_chain_steps(self, message: TaskMessage, error: dict[str, Any], tb: str,
                                every_step: bool) -> None:
        """The steps of the chain after a failed task will not run. A chord member among
        them (the last step of a chain in a chord header) is stored as failed and reports
        its part, as Celery's ``_fail_chain`` does, so that the chord does not wait for it
        forever; with ``every_step`` every step with an id is stored as failed."""
        if not self._has_backend:
            return
        for step in message.chain or ():
            options = step.get("options") or {}
            task_id, group_id = options.get("task_id"), options.get("group_id")
            member = "chord" in options and bool(group_id)
            if not task_id or not (member or every_step):
                continue
            meta = resultmeta.build_meta(task_id, states.FAILURE, error, now=self.app.now(),
                                         traceback=tb, parent_id=options.get("parent_id"),
                                         group_id=group_id)
            await self._record(str(step.get("task")), task_id, "result",
                               self.app.backend.store, meta)
            if member:
                await self._report_part(str(step.get("task")), task_id, str(group_id),
                                        options.get("group_index"), options["chord"],
                                        states.FAILURE, error)

    # --- the result backend ------------------------------------------------------------------

    def _meta(self, message: TaskMessage, state: str, result: Any,
              traceback_text: str | None, children: list[Any] | None) -> dict[str, Any]:
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
        return meta

    async def _store(self, message: TaskMessage, state: str, result: Any, *,
                     traceback_text: str | None = None,
                     children: list[Any] | None = None) -> None:
        """Store a final result; while the backend is unreachable the task waits for it."""
        meta = self._meta(message, state, result, traceback_text, children)
        await self._record(message.task, message.id, "result", self.app.backend.store, meta)

    async def _store_passing(self, message: TaskMessage, state: str, result: Any, *,
                             traceback_text: str | None = None) -> None:
        """Store an intermediate state (STARTED, RETRY) if the backend answers: tried once,
        since the next state replaces it anyway."""
        meta = self._meta(message, state, result, traceback_text, None)
        try:
            await self.app.backend.store(meta)
        except BackendError as exc:
            self.backend_outage.failed(exc)
            logger.debug("Task %s[%s]: state %s not stored (%s)", message.task, message.id,
                         state, exc)

    async def _record(self, name: str, task_id: str, what: str,
                      operation: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a backend write; while the backend is unreachable, the task waits for it."""
        outage = self.backend_outage
        try:
            await operation(*args)
        except BackendError as exc:
            await self._until_through(outage, exc, name, task_id, what, operation, *args)
            return
        if outage.down:
            outage.answered()

    async def _until_through(self, outage: DependencyOutage, error: BaseException, name: str,
                             task_id: str, what: str,
                             operation: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Try ``operation`` again at each of the outage's tries until it gets through (a
        PublishRefusedError is not retried). The task is over: the session frees its slot."""
        self.on_waiting()
        outage.failed(error)
        logger.debug("Task %s[%s]: %s waits for %s (%s)", name, task_id, what, outage.name,
                     error)
        outage.waiting += 1
        try:
            while True:
                await outage.next_try()
                if outage is self.backend_outage:
                    self.metrics.result_store_retried()
                try:
                    await operation(*args)
                except PublishRefusedError:
                    raise
                except outage.errors as exc:
                    outage.failed(exc)
                    continue
                outage.answered()
                return
        finally:
            outage.waiting -= 1


#: a task's final state -> the metrics' outcome label
_OUTCOMES = {states.SUCCESS: metrics.SUCCEEDED, states.FAILURE: metrics.FAILED,
             states.RETRY: metrics.RETRIED}


def _nothing() -> None:
    pass


def _with_id(sig: Signature) -> Signature:
    """The signature with a task id, so that every try sends the same task."""
    if not sig["options"].get("task_id"):
        sig.set(task_id=str(uuid.uuid4()))
    return sig


def _label(sig: Signature) -> str:
    return f"{sig.name}[{sig['options'].get('task_id')}]"


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _short(value: Any, limit: int = 200) -> str:
    """The result in the log line, built in time bounded by ``limit``."""
    return saferepr(value, limit)
