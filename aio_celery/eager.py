"""Eager execution: Celery's ``Task.apply`` and ``task_always_eager``.

The task body runs here, in the caller's asyncio task, and the result comes back already
ready (:class:`EagerResult`): no broker, no result backend, no worker. As in Celery,
``countdown``, ``eta``, ``expires``, queues, priorities and time limits are ignored, a
``retry()`` runs the task again at once (same id, ``retries + 1``), ``link`` callbacks
and the steps of a chain run eagerly after it, ``link_error`` callbacks get the task id,
and the ``task_prerun``/``task_postrun``/``task_success``/``task_failure``/``task_retry``
signals are sent. Nothing is stored. With ``throw`` (``task_eager_propagates``) a failure
is raised by the call itself; otherwise it is kept in the result, and ``get()`` raises it.
"""

from __future__ import annotations

import socket
import traceback as tb_module
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aio_celery import signals, states
from aio_celery.exceptions import Retry
from aio_celery.result import AsyncResult
from aio_celery.task import Context, current_request, current_task

if TYPE_CHECKING:
    from aio_celery.app import Celery
    from aio_celery.canvas import Signature
    from aio_celery.task import Task


class EagerResult(AsyncResult):
    """A result that was ready when it was made: reads never go to a result backend."""

    def __init__(self, id: str, value: Any, state: str, *, traceback: str | None = None,
                 app: Celery | None = None, parent: AsyncResult | None = None) -> None:
        super().__init__(id, app=app, parent=parent)
        self._value = value
        self._meta = {"status": state, "result": None, "traceback": traceback,
                      "children": [], "date_done": datetime.now(UTC).isoformat()}

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"

    @property
    def result(self) -> Any:
        """The return value, or the exception itself (not a copy rebuilt from JSON)."""
        return self._value

    info = result

    async def refresh(self) -> EagerResult:
        return self

    async def forget(self) -> None:
        """Nothing was stored: there is nothing to delete."""


async def apply(task: Task, args: Any = None, kwargs: dict[str, Any] | None = None, *,
                task_id: str | None = None, retries: int = 0, throw: bool | None = None,
                link: Any = None, link_error: Any = None, chain: Any = None,
                **options: Any) -> EagerResult:
    """Run ``task`` here and now (see the module docstring); ``options`` a worker would act
    on (countdown, queue, ...) are accepted and ignored, as Celery does."""
    app = task.app
    if throw is None:
        throw = app.conf.settings.task_eager_propagates
    task_id = task_id or str(uuid.uuid4())
    args, kwargs = list(args or ()), dict(kwargs or {})
    while True:
        request = _request(task, task_id, args, kwargs, retries, link, link_error, chain,
                           options)
        state, value, tb = await _run(task, request)
        if isinstance(value, _Again):
            args, kwargs, retries = value.args, value.kwargs, retries + 1
            continue
        break
    if state == states.SUCCESS:
        await _follow(app, request, value)
    else:
        for errback in _signatures(app, link_error):
            await errback.apply_async((task_id,))
        if throw:
            raise value
    return EagerResult(task_id, value, state, traceback=tb, app=app)


class _Again:
    """What a retry asks for: the same task again with these arguments."""

    def __init__(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs


def _request(task: Task, task_id: str, args: list[Any], kwargs: dict[str, Any],
             retries: int, link: Any, link_error: Any, chain: Any,
             options: dict[str, Any]) -> Context:
    parent = current_request.get()
    parent_id = parent.id if parent is not None else None
    root_id = (parent.root_id or parent.id) if parent is not None else None
    return Context(
        id=task_id, task=task.name, args=args, kwargs=kwargs, retries=retries,
        root_id=root_id or task_id, parent_id=parent_id, hostname=socket.gethostname(),
        ignore_result=bool(options.get("ignore_result", task.ignore_result)),
        timelimit=(task.time_limit, task.soft_time_limit),
        callbacks=[dict(sig) for sig in _as_list(link)] or None,
        errbacks=[dict(sig) for sig in _as_list(link_error)] or None,
        chain=list(chain) if chain else None,
        delivery_info={"is_eager": True, "priority": options.get("priority"),
                       "routing_key": options.get("queue")},
        is_eager=True,
    )


async def _run(task: Task, request: Context) -> tuple[str, Any, str | None]:
    """The body with its signals; returns the state, the value (or exception, or
    :class:`_Again`) and the traceback of a failure."""
    request_token = current_request.set(request)
    task_token = current_task.set(task)
    try:
        await signals.task_prerun.send(sender=task, task_id=request.id, task=task,
                                       args=request.args, kwargs=request.kwargs)
        state, value, tb = await _body(task, request)
        await signals.task_postrun.send(sender=task, task_id=request.id, task=task,
                                        args=request.args, kwargs=request.kwargs, state=state)
        return state, value, tb
    finally:
        current_task.reset(task_token)
        current_request.reset(request_token)


async def _body(task: Task, request: Context) -> tuple[str, Any, str | None]:
    try:
        value = await task(*request.args, **request.kwargs)
    except Exception as exc:
        outcome = await _autoretry(task, exc)
        if isinstance(outcome, Retry):
            await signals.task_retry.send(sender=task, request=request,
                                          reason=outcome.exc or outcome)
            again = outcome.sig if isinstance(outcome.sig, _Again) else _Again(
                request.args, request.kwargs)
            return states.RETRY, again, None
        tb = "".join(tb_module.format_exception(outcome))
        await signals.task_failure.send(sender=task, task_id=request.id, exception=outcome,
                                        args=request.args, kwargs=request.kwargs,
                                        traceback=tb)
        return states.FAILURE, outcome, tb
    await signals.task_success.send(sender=task, result=value, task_id=request.id)
    return states.SUCCESS, value, None


async def _autoretry(task: Task, exc: Exception) -> BaseException:
    if isinstance(exc, Retry) or not isinstance(exc, task.autoretry_for):
        return exc
    try:
        return await task.retry(exc=exc, throw=False)
    except Exception as final:  # max retries exceeded
        return final


def retry_signal(args: list[Any], kwargs: dict[str, Any]) -> _Again:
    """What ``Task.retry()`` puts in the :class:`Retry` it raises in an eager run."""
    return _Again(args, kwargs)


async def _follow(app: Celery, request: Context, value: Any) -> None:
    """The next chain step and the ``link`` callbacks, eagerly, with the result."""
    if request.chain:
        from aio_celery.canvas import Signature

        stack = list(request.chain)
        step = Signature(stack.pop(), app=app)
        await step.apply_async((value,), chain=stack or None)
    for callback in _signatures(app, request.callbacks):
        await callback.apply_async((value,))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, dict):  # a Signature is a dict: one callback
        return [value]
    return list(value)


def _signatures(app: Celery, value: Any) -> Iterable[Signature]:
    from aio_celery.canvas import Signature

    for item in _as_list(value):
        yield item if isinstance(item, Signature) else Signature(item, app=app)
