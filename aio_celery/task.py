"""``Task``: a registered coroutine function plus the options Celery gives a task."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aio_celery.config import first_set
from aio_celery.exceptions import (
    BrokerConnectionError,
    MaxRetriesExceededError,
    PublishRefusedError,
    Retry,
)
from aio_celery.ratelimit import parse_rate

if TYPE_CHECKING:
    from aio_celery.app import Celery
    from aio_celery.canvas import Signature
    from aio_celery.eager import EagerResult
    from aio_celery.result import AsyncResult


@dataclasses.dataclass
class Context:
    """``self.request``: what the worker knows about the task it is running."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = dataclasses.field(default_factory=list)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    delivery_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    hostname: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    ignore_result: bool = False
    #: ``(hard, soft)`` as in Celery
    timelimit: tuple[float | None, float | None] = (None, None)
    origin: str | None = None
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    #: results of tasks this task started (e.g. the next step of its chain)
    children: list[AsyncResult] = dataclasses.field(default_factory=list)
    is_eager: bool = False
    #: messages ``retry()`` could not publish (the broker was unreachable): the worker
    #: sends them once the task body is over
    unsent: list[Unsent] | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class Unsent:
    """A message that could not be published yet, and how to try again."""

    #: what it is, for the log ("retry of tasks.add[<id>]")
    what: str
    send: Callable[[], Awaitable[Any]]
    error: BaseException


#: The request of the task running in the current asyncio task (None outside tasks).
current_request: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "aio_celery_current_request", default=None)
#: The Task object running in the current asyncio task.
current_task: contextvars.ContextVar[Task | None] = contextvars.ContextVar(
    "aio_celery_current_task", default=None)

_EMPTY_CONTEXT = Context()

TaskFunction = Callable[..., Awaitable[Any]]


class Task:
    """A task: call ``await task.delay(...)`` to send it, ``await task(...)`` to run it here."""

    #: Celery's defaults
    max_retries: int | None = 3
    #: seconds before a retry sent without countdown or eta, and between autoretries
    #: without backoff; None: the app's ``task_default_retry_delay`` (180, Celery's)
    default_retry_delay: float | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    ignore_result: bool | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    queue: str | None = None
    priority: int | None = None
    acks_late: bool | None = None
    track_started: bool | None = None
    #: Celery's: at most this many of these tasks start per second, minute or hour in one
    #: worker (all its processes together): "10/s", "100/m", "1000/h", or a number (per
    #: second); None: ``task_default_rate_limit``; 0: no limit (see the README). The
    #: ``rate_limit`` control command sets it at run time
    rate_limit: str | int | float | None = None

    def __init__(self, fn: TaskFunction, *, name: str, app: Celery | None = None,
                 bind: bool = False, **options: Any) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"task {name!r}: {fn!r} must be an `async def` function")
        for key, value in options.items():
            if not hasattr(Task, key) or key.startswith("_"):
                raise TypeError(f"task {name!r}: unknown task option {key!r}")
            single = key == "autoretry_for" and isinstance(value, type)  # =KeyError
            setattr(self, key, (value,) if single else value)
        if self.rate_limit is not None:
            try:
                parse_rate(self.rate_limit)
            except ValueError as exc:
                raise ValueError(f"task {name!r}: {exc}") from None
        self.fn = fn
        self.name = name
        self.bind = bind
        self._app = app
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    @property
    def app(self) -> Celery:
        if self._app is None:
            from aio_celery.app import current_app

            return current_app()
        return self._app

    @property
    def retry_delay(self) -> float:
        """``default_retry_delay``, or the app's ``task_default_retry_delay``."""
        return float(first_set(self.default_retry_delay,
                               self.app.conf.settings.task_default_retry_delay))

    @property
    def request(self) -> Context:
        """The running task's request (an empty one outside a worker)."""
        return current_request.get() or _EMPTY_CONTEXT

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body here, in this process (no message is sent)."""
        if self.bind:
            return await self.fn(self, *args, **kwargs)
        return await self.fn(*args, **kwargs)

    # delay() and apply_async() hand back send_task's coroutine rather than being coroutines
    # around it: one coroutine less to hold while tens of thousands await their confirms.

    def delay(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, AsyncResult]:
        """Send the task with these arguments (shortcut for ``apply_async``); await it."""
        app = self.app
        if app.conf.settings.task_always_eager:
            return self.apply(args, kwargs)
        return app.send_task(self.name, args, kwargs, _task=self)

    def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None,
                    **options: Any) -> Coroutine[Any, Any, AsyncResult]:
        """Send the task; await it. Options: countdown, eta, expires, queue, priority,
        task_id, ignore_result, headers, soft_time_limit, time_limit, link, link_error, ...

        With ``task_always_eager`` it runs here instead (:meth:`apply`), as in Celery."""
        app = self.app
        if app.conf.settings.task_always_eager:
            return self.apply(args, kwargs, **options)
        return app.send_task(self.name, args, kwargs, _task=self, **options)

    def apply(self, args: Any = None, kwargs: dict[str, Any] | None = None, *,
              task_id: str | None = None, retries: int = 0, throw: bool | None = None,
              **options: Any) -> Coroutine[Any, Any, EagerResult]:
        """Run the task here and now and return a result that is already ready (Celery's
        ``Task.apply``; see :mod:`aio_celery.eager`). ``throw`` (default:
        ``task_eager_propagates``) raises a failure from this call."""
        from aio_celery import eager

        return eager.apply(self, args, kwargs, task_id=task_id, retries=retries, throw=throw,
                           **options)

    def signature(self, args: Any = None, kwargs: dict[str, Any] | None = None,
                  **options: Any) -> Signature:
        from aio_celery.canvas import Signature

        return Signature(self.name, args, kwargs, options=options, app=self._app)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature with these arguments (a chain prepends the previous result)."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a chain does not add the previous result."""
        return self.signature(args, kwargs).set(immutable=True)

    async def retry(self, args: Any = None, kwargs: dict[str, Any] | None = None,
                    exc: BaseException | None = None, throw: bool = True,
                    eta: datetime | None = None, countdown: float | None = None,
                    max_retries: int | None = None, **options: Any) -> Retry:
        """Send this task again with the same id and ``retries + 1``, then raise
        :class:`Retry` (or return it with ``throw=False``).

        Past ``max_retries`` raises ``exc`` when given, else MaxRetriesExceededError.

        If the broker cannot be reached (connection lost, a nack, a publish timeout), the
        retry is still raised (or returned) as if it had been sent: the message is handed
        to the worker (``request.unsent``), which publishes it once this run is over,
        trying again with backoff while the task's own message stays unacknowledged. The
        body has done its work up to here, so it must not run again just because the
        broker was away for a moment; and retrying in here would count against the task's
        time limits and hold its concurrency slot. A refusal that no retry can fix
        (:class:`~aio_celery.exceptions.PublishRefusedError`) is raised here: the task
        fails with it.
        """
        request = self.request
        if request.id is None:
            raise RuntimeError(f"{self.name}.retry() called outside a running task")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} "
                f"kwargs:{request.kwargs}")
        if eta is None and countdown is None:
            countdown = self.retry_delay
        if request.is_eager:  # Task.apply runs it again at once: Celery ignores the delay
            return _eager_retry(self, args, kwargs, exc, eta or countdown, throw)
        send = functools.partial(
            self.app.send_task,
            self.name,
            request.args if args is None else args,
            request.kwargs if kwargs is None else kwargs,
            _task=self,
            _retry_of=request,
            countdown=countdown,
            eta=eta,
            **options,
        )
        try:
            await send()
        except PublishRefusedError:
            raise
        except BrokerConnectionError as error:
            if not request.delivery_info:  # not run by a worker: nobody would send it later
                raise
            unsent = Unsent(f"retry of {self.name}[{request.id}]", send, error)
            request.unsent = [*(request.unsent or ()), unsent]
        when: Any = eta if eta is not None else countdown
        retry = Retry(exc=exc, when=when)
        if throw:
            raise retry
        return retry

    async def update_state(self, task_id: str | None = None, state: str | None = None,
                           meta: Any = None) -> None:
        """Store a custom state (e.g. progress) for this or another task."""
        from aio_celery import resultmeta

        task_id = task_id or self.request.id
        if task_id is None or state is None:
            raise ValueError("update_state needs a task_id (or a running task) and a state")
        await self.app.backend.store(resultmeta.build_meta(
            task_id, state, meta, now=self.app.now()))


def _eager_retry(task: Task, args: Any, kwargs: dict[str, Any] | None,
                 exc: BaseException | None, when: Any, throw: bool) -> Retry:
    from aio_celery.eager import retry_signal

    request = task.request
    again = retry_signal(list(request.args if args is None else args),
                         dict(request.kwargs if kwargs is None else kwargs))
    retry = Retry(exc=exc, when=when, sig=again)
    if throw:
        raise retry
    return retry


def retry_countdown(task: Task, retries: int, rand: Callable[[float, float], float]) -> float:
    """The delay before autoretry number ``retries + 1`` (Celery's exponential backoff with
    full jitter when ``retry_backoff`` is set, else the task's :attr:`~Task.retry_delay`)."""
    if not task.retry_backoff:
        return task.retry_delay
    factor = 1.0 if task.retry_backoff is True else float(task.retry_backoff)
    countdown = min(task.retry_backoff_max, factor * (2 ** retries))
    if task.retry_jitter:
        countdown = rand(0, countdown)
    return max(0.0, float(countdown))
