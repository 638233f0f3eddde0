"""``Celery``: the application object: settings, task registry, connections, sending."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import socket
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, overload

from aio_celery import messages, protocol
from aio_celery.backend import RedisBackend
from aio_celery.broker import Broker, RetryPolicy
from aio_celery.config import Config, is_memory_url
from aio_celery.exceptions import BackendError
from aio_celery.quorum import MAX_DELAY, QueuePlan
from aio_celery.result import AsyncResult
from aio_celery.result import AsyncResult as _AsyncResult
from aio_celery.task import Context, Task, TaskFunction, current_request

if TYPE_CHECKING:
    from aio_celery.memory import MemoryPublisher
    from aio_celery.publisher import Publishing
    from aio_celery.transport import ResultBackend

AppContextFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]

#: the publisher of the worker running here, for the code it runs (tasks, follow-ups): an
#: app and its publisher, or None (see :meth:`Celery.publishing_through`)
_worker_publisher: contextvars.ContextVar[tuple[Celery, Publishing] | None] = \
    contextvars.ContextVar("aio_celery_worker_publisher", default=None)
_shared_tasks: list[tuple[TaskFunction, dict[str, Any]]] = []
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_current: Celery | None = None


class Celery:
    """An aio-celery application: ``Celery("proj", broker=..., backend=...)``.

    Constructing it does no I/O; ``async with app.setup():`` connects.
    """

    def __init__(self, main: str | None = None, *, broker: str | None = None,
                 backend: str | None = None, set_as_current: bool = True) -> None:
        self.main = main
        self.conf = Config()
        if broker:
            self.conf.update(broker_url=broker)
        if backend:
            self.conf.update(result_backend=backend)
        self.tasks: dict[str, Task] = {}
        self.oid = str(uuid.uuid4())
        self._context_factory: AppContextFactory | None = None
        self._context: dict[str, Any] | None = None
        #: the client's publisher, built when first needed inside setup() (a worker
        #: publishes on its own, so never builds it)
        self._broker: Broker | None = None
        #: the client's publisher under broker_url="memory://", inside setup()
        self._memory: MemoryPublisher | None = None
        self._set_up = False
        self._backend: ResultBackend | None = None
        self.rand = random.Random()
        for fn, options in _shared_tasks:
            self._register(fn, dict(options))
        _apps.add(self)
        if set_as_current:
            self.set_current()

    def __repr__(self) -> str:
        return f"<Celery {self.main or '__main__'}>"

    def set_current(self) -> None:
        global _current
        _current = self

    # --- tasks ---------------------------------------------------------------------------

    @overload
    def task(self, fn: TaskFunction, /) -> Task: ...
    @overload
    def task(self, **options: Any) -> Callable[[TaskFunction], Task]: ...

    def task(self, fn: TaskFunction | None = None, /, **options: Any) -> Any:  # type: ignore[misc]
        """Register an ``async def`` function as a task (``@app.task`` or ``@app.task(...)``)."""
        if fn is not None:
            return self._register(fn, options)
        return lambda f: self._register(f, options)

    def _register(self, fn: TaskFunction, options: dict[str, Any]) -> Task:
        name = options.pop("name", None) or self.gen_task_name(fn)
        task = Task(fn, name=name, app=self, **options)
        self.tasks[name] = task
        return task

    def gen_task_name(self, fn: Callable[..., Any]) -> str:
        """Celery's default name: ``module.function`` (the app's main name for __main__)."""
        module = fn.__module__
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fn.__name__}"

    # --- the app context ------------------------------------------------------------------

    def define_app_context(self, factory: AppContextFactory) -> AppContextFactory:
        """Register an async context manager factory whose yielded dict becomes
        ``app.context`` in each worker process (database pools and the like)."""
        self._context_factory = factory
        return factory

    @property
    def context(self) -> dict[str, Any]:
        if self._context is None:
            raise RuntimeError(
                "app.context is only available inside the app context "
                "(in a worker, or within `async with app.setup(with_context=True)`)")
        return self._context

    @contextlib.asynccontextmanager
    async def app_context(self) -> AsyncIterator[dict[str, Any]]:
        """Enter the context defined with :meth:`define_app_context` (an empty one if none)."""
        if self._context_factory is None:
            self._context = {}
            try:
                yield self._context
            finally:
                self._context = None
            return
        async with self._context_factory() as value:
            self._context = dict(value or {})
            try:
                yield self._context
            finally:
                self._context = None

    # --- connections ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def setup(self, *, with_context: bool = False,
                    lazy_broker: bool = False) -> AsyncIterator[Celery]:
        """Connect to the broker (and, lazily, the result backend) for the block's duration.

        Re-entrant: inside an outer ``setup()`` the existing connections are reused (and left
        open), so a worker can run an app that is already connected. With ``lazy_broker``
        the publisher (:attr:`broker`) is built and connected when something is first sent
        (the worker does this: it consumes and publishes on connections of its own, see
        :meth:`publishing_through`, so it never builds this one).
        """
        if self._set_up:
            if with_context and self._context is None:
                async with self.app_context():
                    yield self
            else:
                yield self
            return
        self._set_up = True
        settings = self.conf.settings
        if settings.result_backend:
            self._backend = _new_backend(settings.result_backend,
                                         settings.result_expires_seconds())
        try:
            if is_memory_url(settings.broker_url):
                from aio_celery.memory import MemoryPublisher, broker_for

                self._memory = MemoryPublisher(broker_for(settings.broker_url),
                                               plan=QueuePlan.from_settings(settings))
            elif not lazy_broker:
                await self._new_broker(lazy=False).connect()
            if with_context:
                async with self.app_context():
                    yield self
            else:
                yield self
        finally:
            self._set_up = False
            await self._close()

    def _new_broker(self, *, lazy: bool) -> Broker:
        settings = self.conf.settings
        self._broker = Broker(
            settings.broker_url,
            connection_timeout=settings.broker_connection_timeout,
            publish_timeout=settings.broker_publish_timeout,
            heartbeat=settings.broker_heartbeat,
            failover_strategy=settings.broker_failover_strategy,
            retry_policy=RetryPolicy.from_settings(settings.task_publish_retry,
                                                   settings.task_publish_retry_policy),
            max_priority=settings.task_queue_max_priority,
            queue_arguments=settings.task_queue_arguments,
            plan=QueuePlan.from_settings(settings),
            connection_name=f"aio_celery {self.main or ''} pid {os.getpid()}".strip(),
            lazy=lazy,
        )
        return self._broker

    async def _close(self) -> None:
        broker, self._broker = self._broker, None
        backend, self._backend = self._backend, None
        self._memory = None
        try:
            if backend is not None:
                await backend.close()
        finally:
            if broker is not None:
                await broker.close()

    @property
    def broker(self) -> Broker:
        """The client's publisher; inside ``setup(lazy_broker=True)`` built on first use, and
        connected by its first publish."""
        if self._broker is None:
            if not self._set_up:
                raise RuntimeError("not connected: use `async with app.setup():` first")
            return self._new_broker(lazy=True)
        return self._broker

    @property
    def publisher(self) -> Publishing:
        """Where this app's messages go: in the code a worker runs (its tasks, their
        follow-ups, retries) the worker's own publisher (see :meth:`publishing_through`),
        elsewhere :attr:`broker`."""
        override = _worker_publisher.get()
        if override is not None and override[0] is self:
            return override[1]
        if self._memory is not None:
            return self._memory
        return self.broker

    @contextlib.contextmanager
    def publishing_through(self, publisher: Publishing) -> Iterator[None]:
        """Within this block, and in the asyncio tasks started from it, this app sends
        through ``publisher``: a worker wraps its run in it, so that what its tasks send
        goes out on the worker's publishing connection, while other code in the same
        process (a test's client, say) keeps :attr:`broker`."""
        token = _worker_publisher.set((self, publisher))
        try:
            yield
        finally:
            _worker_publisher.reset(token)

    @property
    def backend(self) -> ResultBackend:
        """The result backend: a :class:`~aio_celery.backend.RedisBackend`, or the
        in-process store of ``result_backend="memory://"``."""
        if self._backend is None:
            url = self.conf.settings.result_backend
            if not url:
                raise BackendError("no result backend configured: set result_backend")
            self._backend = _new_backend(url, self.conf.settings.result_expires_seconds())
        return self._backend

    def now(self) -> datetime:
        return datetime.now(UTC)

    def AsyncResult(self, task_id: str) -> _AsyncResult:
        return _AsyncResult(task_id, app=self)

    # --- sending -------------------------------------------------------------------------

    async def send_task(self, name: str, args: Any = None, kwargs: dict[str, Any] | None = None,
                        *, _task: Task | None = None, _retry_of: Context | None = None,
                        **options: Any) -> _AsyncResult:
        """Send a task by name (it need not be registered here) and return its result."""
        task = _task if _task is not None else self.tasks.get(name)
        message, queue = self.build_message(name, args, kwargs, options, task=task,
                                            retry_of=_retry_of)
        task_id = message.id
        delay = self._native_delay(message.eta, queue)
        # Only the wire bytes stay alive while the confirm is awaited: thousands of
        # concurrent sends would otherwise each hold a message and its header dict.
        publishing = self.publisher.publish(protocol.encode(message, self.now()), queue, delay)
        del message
        await publishing
        parent = current_request.get()
        result = AsyncResult(task_id, app=self)
        if parent is not None and parent.id is not None and _retry_of is None:
            parent.children.append(result)
        return result

    def _native_delay(self, eta: datetime | None, queue: str) -> int:
        """Whole seconds to send through native delayed delivery, as Celery 5.5+ does in
        quorum mode for a queue whose exchange is not direct; 0: publish to the queue (under
        a second, Celery's ``int(countdown)`` is 0 too: the worker waits for the eta)."""
        if eta is None or not self.publisher.delays_natively(queue):
            return 0
        countdown = int((eta - self.now()).total_seconds())
        return countdown if 1 <= countdown <= MAX_DELAY else 0

    def build_message(self, name: str, args: Any = None, kwargs: Any = None,
                      options: Mapping[str, Any] | None = None, *, task: Task | None = None,
                      retry_of: Context | None = None) -> tuple[protocol.TaskMessage, str]:
        """The message :meth:`send_task` would send, and its queue (see
        :func:`aio_celery.messages.build_message`): this app's settings, clock, ids and
        ``reply_to``, sent from the task running here, if any."""
        return messages.build_message(
            self.conf.settings, name, args, kwargs, options or {}, now=self.now(),
            new_id=_new_id, origin=_origin(), reply_to=self.oid, task=task,
            parent=current_request.get(), retry_of=retry_of)


def _new_id() -> str:
    return str(uuid.uuid4())


def _new_backend(url: str, expires: int | None) -> ResultBackend:
    if is_memory_url(url):
        from aio_celery.memory import backend_for

        return backend_for(url)
    return RedisBackend(url, expires=expires)


_origin_cache: tuple[int, str] | None = None


def _origin() -> str:
    """``gen<pid>@<host>`` like Celery; recomputed after a fork."""
    global _origin_cache
    pid = os.getpid()
    if _origin_cache is None or _origin_cache[0] != pid:
        _origin_cache = (pid, f"gen{pid}@{socket.gethostname()}")
    return _origin_cache[1]


def current_app() -> Celery:
    """The app created (or ``set_current()``-ed) last; a default app when there is none."""
    if _current is None:
        return Celery("default")
    return _current


def shared_task(fn: TaskFunction | None = None, /, **options: Any) -> Any:
    """Register a task on every app, existing and future (``@shared_task``)."""

    def register(f: TaskFunction) -> Task:
        _shared_tasks.append((f, options))
        for app in _apps:
            app._register(f, dict(options))
        name = options.get("name")
        opts = {k: v for k, v in options.items() if k != "name"}
        return Task(f, name=name or _shared_name(f), app=None, **opts)

    return register(fn) if fn is not None else register


def _shared_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__name__}"
