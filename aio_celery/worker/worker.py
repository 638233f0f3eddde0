"""One worker process: start-up -> consume/execute/ack -> warm or cold shutdown.

The constructor is inert; :meth:`Worker.run` does everything and returns an exit code from
:mod:`aio_celery.exitcodes`. Signal handlers (or tests) only call :meth:`request_stop` or
:meth:`retire`; the run loop acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import types
from collections.abc import Callable
from typing import TypeVar

from aio_celery import exitcodes, memory, metrics, preflight, signals
from aio_celery.amqp.connection import AMQPConnection
from aio_celery.app import Celery
from aio_celery.backend import RedisBackend
from aio_celery.broker import BrokerRefused, ConsumerChannel, connect_first
from aio_celery.clocks import LamportClock
from aio_celery.config import is_memory_url, mask_url
from aio_celery.control import revoked
from aio_celery.control.mailbox import Mailbox
from aio_celery.exceptions import BrokerConnectionError, ConfigurationError
from aio_celery.failover import Failover
from aio_celery.poison import Guard
from aio_celery.publisher import WorkerPublisher
from aio_celery.quorum import QueuePlan
from aio_celery.ratelimit import SharedRates
from aio_celery.transport import Consuming, WorkerPublishing
from aio_celery.worker.banner import banner
from aio_celery.worker.delivery import Session
from aio_celery.worker.events import EventDispatcher, Heart, RemoteEvents
from aio_celery.worker.execution import TaskRunner
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.outage import Outage
from aio_celery.worker.rates import Limiter
from aio_celery.worker.remote import WorkerNode
from aio_celery.worker.stats import Stats

logger = logging.getLogger("aio_celery.worker")

_T = TypeVar("_T")

#: the broker closes connections with this code when it shuts down (a restart, say)
CONNECTION_FORCED = 320
#: seconds between two samples of the in-flight and prefetched gauges (and two flushes of
#: the per-task counts)
METRICS_SAMPLE_PERIOD = 1.0
#: seconds a shutdown waits for the publishing connection to send worker-offline
EVENTS_CLOSE_TIMEOUT = 2.0


class StartupError(Exception):
    """The worker could not start; the message says why."""


class BrokerOutage(Exception):
    """The broker stayed away for all of ``broker_connection_max_retries``."""


class Worker:
    """Consumes the app's queues and runs its tasks, ``concurrency`` at a time."""

    def __init__(self, app: Celery, options: WorkerOptions | None = None, *,
                 on_tick: Callable[[Worker], None] | None = None,
                 guard: Guard | None = None, rates: SharedRates | None = None,
                 recorder: metrics.Recorder | None = None) -> None:
        """``on_tick(worker)`` is called from the event loop about once a second while the
        worker runs (the supervisor's heartbeat: it proves the loop is not blocked).
        ``guard``: the supervisor's poison guard tables (default: ``x-delivery-count``
        only, for a worker without a supervisor). ``rates``: the supervisor's rate limit
        buckets, shared by its children (default: this process's own). ``recorder``: where
        metrics go (default: nowhere, see :mod:`aio_celery.metrics`)."""
        self.app = app
        self.options = options or WorkerOptions()
        self.metrics = recorder or metrics.Recorder()
        self._on_tick = on_tick
        self._guard = guard or Guard(self.options.max_task_deaths
                                     or app.conf.settings.worker_max_task_deaths)
        self.stats = Stats()
        #: None with worker_disable_rate_limits; kept across sessions (a reconnect does not
        #: refill the buckets)
        self.limiter = None if app.conf.settings.worker_disable_rate_limits else \
            Limiter(app, rates)
        self._stop_requested: asyncio.Event | None = None
        self._cold = False
        self._stop_requests = 0  # request_stop() calls: the second one is cold
        self._exit_code = exitcodes.OK
        self._session: Session | None = None
        #: set when consumers are attached (readiness), cleared when they are not
        self.consuming: asyncio.Event | None = None
        #: ``time.monotonic()`` when the broker became unreachable; None while connected
        self.broker_lost_since: float | None = None
        self._failover: Failover | None = None
        #: the worker's publishing connection (follow-ups, retries, parks), once started
        self.publisher: WorkerPublishing | None = None
        #: task ids revoked by remote control (loaded from the result backend at start)
        self.revoked = revoked.RevokedSet()
        #: this process's remote control mailbox, once consuming tasks
        self.mailbox: Mailbox | None = None
        self._mailbox_task: asyncio.Task[None] | None = None
        #: the queues consumed, once asked for (add_consumer/cancel_consumer change it)
        self._queues: list[str] | None = None
        settings = app.conf.settings
        task_events = self.options.task_events
        #: the process's Lamport clock (Celery's ``app.clock``): its events and its
        #: mailbox's replies move it forward, control requests move it past theirs
        self.clock = LamportClock()
        #: monitoring events of this process's node (``options.hostname``)
        self.events = EventDispatcher(
            self.options.hostname, None, self.stats, exchange=settings.event_exchange,
            task_events=settings.worker_send_task_events if task_events is None
            else task_events, load=self._load, clock=self.clock,
            on_dropped=self.metrics.events_dropped)
        interval = self.options.heartbeat_interval
        self._heart = Heart(self.events, interval) if interval is not None else None
        self._remote_events = RemoteEvents(self.events)

    @property
    def session(self) -> Session | None:
        """The broker session: the one consuming now, a new one after each reconnect (the
        lost one stays here, abandoned, until then); None until the first is open."""
        return self._session

    @property
    def failover(self) -> Failover:
        """The URLs of ``broker_url``, the one in use, and where a reconnect starts."""
        if self._failover is None:
            settings = self.app.conf.settings
            self._failover = Failover(settings.broker_url, settings.broker_failover_strategy)
        return self._failover

    # --- what signal handlers and tests call -------------------------------------------

    def request_stop(self, cold: bool = False, exit_code: int | None = None) -> None:
        """Ask for a warm (or cold) shutdown; a second request makes it cold.

        The user's SIGTERM/SIGINT come here. Stops asked with :meth:`retire` are not
        counted: a user's first signal after one is still warm."""
        if self._stop_requested is not None:
            self._stop_requests += 1
        self._stop(cold or self._stop_requests > 1, exit_code)

    def retire(self, exit_code: int | None = None) -> None:
        """Ask for a warm shutdown that is never counted as the user's signal: the
        supervisor's stop request (:data:`supervisor.child.STOP_SIGNAL`; with Ctrl-C it
        arrives next to the user's own SIGINT), recycling, burst mode, an orphaned child."""
        self._stop(False, exit_code)

    def _stop(self, cold: bool, exit_code: int | None) -> None:
        if self._stop_requested is None:
            return
        if self._session is not None:
            self._session.drain()  # nothing starts from now on, even before _shutdown runs
        if cold:
            self._cold = True
            if self._session is not None:
                self._session.go_cold()
        if exit_code is not None:
            self._exit_code = exit_code
        self._stop_requested.set()

    @property
    def state(self) -> str:
        """``starting``, ``ready`` (consumers attached), ``waiting for broker`` (retrying
        the connection) or ``stopping``."""
        if self._stop_requested_set():
            return "stopping"
        if self.consuming is not None and self.consuming.is_set():
            return "ready"
        if self.broker_lost_since is not None:
            return "waiting for broker"
        return "starting"

    def dump_tasks(self) -> None:
        """Log every task in flight with its stack (SIGUSR1)."""
        tasks = self._session.running_tasks() if self._session is not None else set()
        logger.warning("%d task(s) running in pid %d:", len(tasks), os.getpid())
        for task in sorted(tasks, key=lambda t: t.get_name()):
            stack = "".join(f"    {frame.f_code.co_filename}:{frame.f_lineno} in "
                            f"{frame.f_code.co_name}\n" for frame in _awaited_frames(task))
            logger.warning("  %s\n%s", task.get_name(), stack.rstrip())

    # --- events: what the remote control commands call ------------------------------------

    @property
    def task_events_enabled(self) -> bool:
        return self.events.tasks_on

    def enable_task_events(self) -> None:
        """Send task events from now on (the ``enable_events`` command; Flower sends it
        every 5 s)."""
        self._remote_events.enable_task_events()

    def disable_task_events(self) -> None:
        self._remote_events.disable_task_events()

    def send_heartbeat(self, freq: float) -> None:
        """Send one ``worker-heartbeat`` now (the ``heartbeat`` command, with freq 5)."""
        self._remote_events.send_heartbeat(freq)

    def _load(self) -> tuple[int, int]:
        session = self._session
        return (session.active if session is not None else 0), self.stats.started

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues consumed: ``-Q`` (else ``task_default_queue``), changed at run time
        by remote control's ``add_consumer``/``cancel_consumer``."""
        return tuple(self._queue_list())

    def _queue_list(self) -> list[str]:
        if self._queues is None:
            self._queues = list(self.options.queues
                                or (self.app.conf.settings.task_default_queue,))
        return self._queues

    @property
    def runner(self) -> TaskRunner | None:
        return self._session.runner if self._session is not None else None

    async def add_queue(self, queue: str) -> None:
        """Consume ``queue`` too (declared as the others); kept across reconnects."""
        queues = self._queue_list()
        if queue in queues:
            return
        queues.append(queue)
        if self._session is not None:
            await self._session.add_queue(queue)

    async def cancel_queue(self, queue: str) -> None:
        """Stop consuming ``queue``; what was delivered from it still runs."""
        queues = self._queue_list()
        if queue not in queues:
            return
        queues.remove(queue)
        if self._session is not None:
            await self._session.cancel_queue(queue)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Start, consume until asked to stop (or drained in burst mode), shut down."""
        self._stop_requested = asyncio.Event()
        self.consuming = asyncio.Event()
        background = []
        if self._on_tick:
            background.append(asyncio.ensure_future(self._tick()))
        if self.metrics.enabled:
            background.append(asyncio.ensure_future(self._sample_metrics()))
        try:
            return await self._run()
        finally:
            for task in background:
                task.cancel()
            self.metrics.flush()

    async def _tick(self) -> None:
        while True:
            self._beat()
            await asyncio.sleep(1.0)

    async def _sample_metrics(self) -> None:
        """The gauges are sampled, and the per-task counts written, once a second: the hot
        path only adds to plain dicts (see :class:`aio_celery.metrics.PrometheusRecorder`)."""
        while True:
            session = self._session
            if session is None:
                self.metrics.sample(0, 0)
            else:
                self.metrics.sample(session.running, session.prefetched)
            self.metrics.flush()
            await asyncio.sleep(METRICS_SAMPLE_PERIOD)

    def _beat(self) -> None:
        if self._on_tick is None:
            return
        try:
            self._on_tick(self)
        except Exception:
            logger.exception("Worker tick hook failed")

    async def _run(self) -> int:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._startup(stack)
            except StartupError as exc:
                logger.error("Worker start-up failed: %s", exc)
                return exitcodes.STARTUP_ERROR
            if self._session is None:
                self._beat()  # "stopping": the supervisor tells a requested exit by it
                logger.info("Stopped while waiting for the broker: no task was taken")
                return self._exit_code
            code = await self._consume_until_stopped()
            self._beat()  # as above, even if the shutdown is over before the next tick
            await self._shutdown()
            await signals.worker_process_shutdown.send(sender=self, pid=os.getpid(),
                                                       exitcode=code)
        return code

    async def _startup(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            preflight.check(self.app.conf.settings, self.options)
        except ConfigurationError as exc:
            raise StartupError(f"configuration error: {exc}") from exc
        try:
            # The app's own publisher (aio-pika) stays unconnected here: what this worker
            # and its tasks send goes through self.publisher instead.
            await stack.enter_async_context(self.app.setup(lazy_broker=True))
        except BrokerConnectionError as exc:
            raise StartupError(str(exc)) from exc
        self.publisher = self._new_publisher()
        stack.push_async_callback(self.publisher.close)  # after the session's shutdown
        self.events.publisher = self.publisher
        stack.enter_context(self.app.publishing_through(self.publisher))
        if self.app.conf.settings.result_backend:
            try:
                backend = self.app.backend
                if isinstance(backend, RedisBackend):
                    _ = backend.client  # import redis now, not in the middle of a task
            except ConfigurationError as exc:  # a query parameter redis-py cannot read
                raise StartupError(f"configuration error: {exc}") from exc
        try:
            await stack.enter_async_context(self.app.app_context())
        except Exception as exc:
            logger.exception("The app context (define_app_context) raised")
            raise StartupError(f"app context failed: {exc!r}") from exc
        await signals.worker_process_init.send(sender=self)
        await self._load_revoked()
        session = await self._connect(at_startup=True)
        if session is None:  # stopped while waiting for the broker
            return
        self._session = session
        if self._heart is not None:
            self._heart.start()
        self._start_mailbox(stack)
        if self.options.banner:
            logger.info("%s", banner(self.app, self.options, self.queues,
                                     session.prefetch_count, self.failover,
                                     self.events.tasks_on))
        logger.info("%s ready: consuming %s", self.options.hostname, ", ".join(self.queues))

    async def _load_revoked(self) -> None:
        """The revokes of the last 3 hours, so that a child started after them honours
        them too (see :mod:`aio_celery.control.revoked`)."""
        if not self.app.conf.settings.result_backend:
            return
        backend = self.app.backend
        if not isinstance(backend, RedisBackend):  # memory://: no earlier process to learn from
            return
        now = time.time()
        try:
            self.revoked.merge(await revoked.load(backend.client, now), now)
        except Exception as exc:  # redis' own errors: a start without them, said so
            logger.warning("Could not load the revoked task ids from the result backend "
                           "(%r): revokes sent before this process started are not honoured",
                           exc)

    def _start_mailbox(self, stack: contextlib.AsyncExitStack) -> None:
        if self._in_memory:  # nobody outside this process could send a command
            return
        self.mailbox = Mailbox(WorkerNode(self, self._remote_events),
                               self._control_connection, self.clock)
        self._mailbox_task = asyncio.ensure_future(self.mailbox.run())
        stack.push_async_callback(self._stop_mailbox)

    async def _control_connection(self) -> AMQPConnection:
        settings = self.app.conf.settings
        return await connect_first(
            self.failover.companion(),
            heartbeat=settings.broker_heartbeat,
            connection_name=f"aio_celery worker {self.options.hostname} pid {os.getpid()} "
                            "remote control",
            connection_timeout=settings.broker_connection_timeout,
            rpc_timeout=15.0, publish_timeout=settings.broker_publish_timeout)

    async def _stop_mailbox(self) -> None:
        # Closed first: its loop then ends by itself at its next step. A cancel alone was
        # seen lost (Python 3.11's wait_for, in a connect that completed as it was
        # cancelled), and the loop went on reconnecting while the stop waited for it.
        if self.mailbox is not None:
            await self.mailbox.close()
        task, self._mailbox_task = self._mailbox_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    @property
    def _in_memory(self) -> bool:
        return is_memory_url(self.app.conf.settings.broker_url)

    def _new_publisher(self) -> WorkerPublishing:
        """A second connection, for publishing only (it connects on first use): RabbitMQ
        blocks a publishing connection during a resource alarm, and the consumer's acks
        must not wait behind that. It tries the URLs in the consumer's failover order."""
        settings = self.app.conf.settings
        if self._in_memory:
            return memory.MemoryPublisher(memory.broker_for(settings.broker_url),
                                          plan=QueuePlan.from_settings(settings))
        return WorkerPublisher(
            self.failover.companion(),
            plan=QueuePlan.from_settings(settings),
            connection_timeout=settings.broker_connection_timeout,
            publish_timeout=settings.broker_publish_timeout,
            heartbeat=settings.broker_heartbeat,
            connection_name=f"aio_celery worker {self.options.hostname} pid {os.getpid()} "
                            "publisher")

    def _amqp_channel(self, prefetch: int) -> ConsumerChannel:
        settings = self.app.conf.settings
        return ConsumerChannel(
            self.failover, prefetch_count=prefetch,
            publish_timeout=settings.broker_publish_timeout,
            connection_timeout=settings.broker_connection_timeout,
            heartbeat=settings.broker_heartbeat,
            max_priority=settings.task_queue_max_priority,
            queue_arguments=settings.task_queue_arguments,
            plan=QueuePlan.from_settings(settings),
            connection_name=f"aio_celery worker {self.options.hostname} pid {os.getpid()}",
        )

    async def _open_session(self) -> Session:
        """One attempt: connect, declare, consume (BrokerConnectionError, or BrokerRefused
        when retrying cannot help)."""
        settings = self.app.conf.settings
        prefetch = self.options.prefetch_count(settings.worker_prefetch_multiplier)
        channel: Consuming
        if self._in_memory:
            channel = memory.MemoryConsumer(memory.broker_for(settings.broker_url),
                                            prefetch_count=prefetch,
                                            plan=QueuePlan.from_settings(settings))
        else:
            channel = self._amqp_channel(prefetch)
        runner = TaskRunner(self.app, self.options.hostname, revoked=self.revoked,
                            total=self.stats.total, recorder=self.metrics, events=self.events)
        session = Session(channel, runner, self.options, self.stats,
                          publisher=_set_up(self.publisher, "publisher"),
                          events=self.events,
                          on_task_done=self._on_task_done, guard=self._guard,
                          max_pending_results=settings.worker_max_pending_results,
                          unacked_max_age=self.options.max_age(settings.worker_unacked_max_age),
                          limiter=self.limiter)
        runner.on_waiting = session.task_pending  # a finished task waits: its slot is free
        _set_up(self.consuming, "consuming")
        try:
            await session.start(self.queues, before_consume=self._attaching)
        except BrokerConnectionError:
            await self._failed_session(session)
            raise
        except (ConnectionError, OSError) as exc:
            await self._failed_session(session)
            code = getattr(exc, "reply_code", None)
            if code is not None and code != CONNECTION_FORCED:
                # The broker answered (PRECONDITION_FAILED, ACCESS_REFUSED on a declare...):
                # the same request would get the same answer.
                raise BrokerRefused(f"cannot consume {', '.join(self.queues)}: {exc}") from exc
            raise BrokerConnectionError(f"lost the broker while setting up consumers for "
                                        f"{', '.join(self.queues)}: {exc}") from exc
        except Exception as exc:
            await self._failed_session(session)
            raise BrokerRefused(f"cannot consume {', '.join(self.queues)}: {exc!r}") from exc
        return session

    def _attaching(self) -> None:
        """Right before basic.consume: ready, and say so to the supervisor *now*. The first
        delivery may be a task that blocks the loop before the next tick; the supervisor
        must already see a "ready" beat, so that its ordinary heartbeat timeout applies."""
        _set_up(self.consuming, "consuming").set()
        # Back from an outage as of now: whoever sees "ready" must not also see one lost.
        self.broker_lost_since = None
        self._beat()

    async def _failed_session(self, session: Session) -> None:
        _set_up(self.consuming, "consuming").clear()
        await session.close()

    async def _connect(self, at_startup: bool) -> Session | None:
        """Open a consumer session, retrying with capped backoff while the broker is
        unreachable (``broker_connection_max_retries``; at start-up only with
        ``broker_connection_retry_on_startup``). None once a stop was requested meanwhile.

        Raises StartupError at start-up when the broker refuses us (login, vhost) or retries
        are off or used up; BrokerOutage after start-up when the retries are used up.
        """
        settings = self.app.conf.settings
        retry = settings.broker_connection_retry_on_startup or not at_startup
        outage = Outage(mask_url(settings.broker_url), settings.broker_connection_max_retries)
        while not self._stop_requested_set():
            try:
                session = await self._open_session()
            except BrokerRefused as exc:
                if at_startup:
                    raise StartupError(str(exc)) from exc
                outage.failed(exc)  # e.g. a vhost deleted meanwhile: logged, retried
            except BrokerConnectionError as exc:
                if not retry:
                    raise StartupError(f"{exc} (broker_connection_retry_on_startup is off)") \
                        from exc
                outage.failed(exc)
            else:
                outage.url = self.failover.masked  # the one connected to
                outage.recovered(session.consumer_count, after_loss=not at_startup)
                self.broker_lost_since = None
                return session
            if self.broker_lost_since is None:
                self.broker_lost_since = outage.since
            if outage.exhausted:
                if at_startup:
                    raise StartupError(outage.giving_up())
                raise BrokerOutage(outage.giving_up())
            await self._sleep_unless_stopped(outage.next_delay())
        return None

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        stop_requested = _set_up(self._stop_requested, "_stop_requested")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_requested.wait(), seconds)

    def _on_task_done(self) -> None:
        limit = self.options.max_tasks
        if limit and self.stats.finished >= limit and not self._stop_requested_set():
            logger.info("Reached max tasks per child (%d): finishing and exiting to be "
                        "replaced", limit)
            self.retire(exit_code=exitcodes.RECYCLE)

    def _stop_requested_set(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    async def _consume_until_stopped(self) -> int:
        """Wait for a stop request; reconnect when the broker connection drops."""
        stop_requested = _set_up(self._stop_requested, "_stop_requested")
        # Background watchers that end by requesting a stop themselves.
        watchers = []
        if self.options.burst:
            watchers.append(asyncio.ensure_future(self._drained()))
        if self.options.max_memory_kib:
            watchers.append(asyncio.ensure_future(self._watch_memory()))
        stop = asyncio.ensure_future(stop_requested.wait())
        try:
            while not stop_requested.is_set():
                lost = asyncio.ensure_future(_set_up(self._session, "_session").lost())
                await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)
                if not lost.done():
                    lost.cancel()
                elif not stop_requested.is_set():
                    try:
                        await self._reconnect(lost.result())
                    except BrokerOutage as exc:
                        logger.error("%s: exiting with code %d", exc, exitcodes.BROKER_LOST)
                        return exitcodes.BROKER_LOST
        finally:
            for watcher in (*watchers, stop):
                watcher.cancel()
        return self._exit_code

    async def _reconnect(self, reason: str) -> None:
        """Open a new consumer session (the old one is kept, abandoned, if a stop comes
        first: shutting it down is then quick). BrokerOutage once the retries are used up."""
        old = _set_up(self._session, "_session")
        _set_up(self.consuming, "consuming").clear()
        self.broker_lost_since = time.monotonic()
        self.metrics.broker_reconnecting()
        failover = self.failover
        logger.warning("Lost the broker connection to %s (%s); %d task(s) in flight are "
                       "cancelled and will be redelivered. Reconnecting%s", failover.masked,
                       reason, old.in_flight,
                       ", to the next broker URL first" if len(failover.urls) > 1 else "")
        failover.lost()
        await old.abandon()
        session = await self._connect(at_startup=False)
        if session is not None:
            self._session = session

    async def _drained(self) -> None:
        """Burst mode: stop once nothing is running or waiting and the queues are empty."""
        idle_checks = 0
        while idle_checks < 2:
            await asyncio.sleep(0.05)
            session = _set_up(self._session, "_session")  # a new one after a reconnect
            if session.busy:
                idle_checks = 0
                continue
            counts = [await session.message_count(q) for q in self.queues]
            idle_checks = idle_checks + 1 if not any(counts) and not session.busy else 0
        logger.info("Burst mode: the queues are empty and nothing is running, stopping")
        self.retire()

    async def _watch_memory(self) -> None:
        limit = self.options.max_memory_kib
        while True:
            await asyncio.sleep(1.0)
            rss = resident_kib()
            if rss > limit:
                logger.warning("Resident memory %d KiB exceeds max memory per child (%d KiB): "
                               "finishing and exiting to be replaced", rss, limit)
                self.retire(exit_code=exitcodes.RECYCLE)
                return

    async def _shutdown(self) -> None:
        session = _set_up(self._session, "_session")
        _set_up(self.consuming, "consuming").clear()
        started = time.monotonic()
        timeout = (self.options.shutdown_timeout
                   if self.options.shutdown_timeout is not None
                   else self.app.conf.settings.worker_shutdown_timeout)
        outcome = await session.stop(timeout, cold=self._cold)
        if self._heart is not None:
            self._heart.stop()
        await self.events.close(timeout=EVENTS_CLOSE_TIMEOUT)
        kind = "Cold" if self._cold else "Warm"  # a second signal may have come meanwhile
        logger.info("%s shutdown in %.1fs: %d task(s) finished since start, %d returned to "
                    "the queue unstarted, %d cancelled and returned", kind,
                    time.monotonic() - started, self.stats.finished, outcome.returned,
                    outcome.cancelled)


def _set_up(value: _T | None, name: str) -> _T:
    """``value``, which run() sets up before anything uses it: None is a bug of ours."""
    if value is None:
        raise RuntimeError(f"Worker.{name} used before Worker.run() set it up")
    return value


def _awaited_frames(task: asyncio.Task[None]) -> list[types.FrameType]:
    """The frames of ``task``'s coroutine and of each coroutine it awaits, outermost first
    (``Task.get_stack()`` has only the outermost frame of a suspended task)."""
    frames: list[types.FrameType] = []
    coro: object = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def resident_kib() -> int:
    """This process's resident set size in KiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)


def install_signal_handlers(worker: Worker, retire_signal: int | None = None) -> None:
    """SIGTERM/SIGINT: warm shutdown (the second one: cold); SIGQUIT: cold; SIGUSR1: log
    the running tasks; ``retire_signal`` (the supervisor's stop request): warm shutdown
    that a repeated request never turns cold.

    The handlers only record the request; the worker's run loop acts on it.
    """
    import signal

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    loop.add_signal_handler(signal.SIGQUIT, lambda: worker.request_stop(cold=True))
    loop.add_signal_handler(signal.SIGUSR1, worker.dump_tasks)
    if retire_signal is not None:
        loop.add_signal_handler(retire_signal, worker.retire)
