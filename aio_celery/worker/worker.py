"""One worker process: start-up -> consume/execute/ack -> warm or cold shutdown.

The constructor is inert; :meth:`Worker.run` does everything and returns an exit code from
:mod:`aio_celery.exitcodes`. Signal handlers (or tests) only call :meth:`request_stop`;
the run loop acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import types
from collections.abc import Callable

from aio_celery import exitcodes, signals
from aio_celery.app import Celery
from aio_celery.broker import ConsumerChannel
from aio_celery.config import mask_url
from aio_celery.exceptions import BrokerConnectionError
from aio_celery.worker.banner import banner
from aio_celery.worker.delivery import Session
from aio_celery.worker.execution import TaskRunner
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.stats import Stats

logger = logging.getLogger("aio_celery.worker")


class StartupError(Exception):
    """The worker could not start; the message says why."""


class Worker:
    """Consumes the app's queues and runs its tasks, ``concurrency`` at a time."""

    def __init__(self, app: Celery, options: WorkerOptions | None = None, *,
                 on_tick: Callable[[Worker], None] | None = None) -> None:
        """``on_tick(worker)`` is called from the event loop about once a second while the
        worker runs (the supervisor's heartbeat: it proves the loop is not blocked)."""
        self.app = app
        self.options = options or WorkerOptions()
        self._on_tick = on_tick
        self.stats = Stats()
        self._stop_requested: asyncio.Event | None = None
        self._cold = False
        self._exit_code = exitcodes.OK
        self._session: Session | None = None
        #: set when consumers are attached (readiness), cleared when they are not
        self.consuming: asyncio.Event | None = None

    # --- what signal handlers and tests call -------------------------------------------

    def request_stop(self, cold: bool = False, exit_code: int | None = None) -> None:
        """Ask for a warm (or cold) shutdown; a second request makes it cold."""
        if self._stop_requested is None:
            return
        if self._session is not None:
            self._session.drain()  # nothing starts from now on, even before _shutdown runs
        if self._stop_requested.is_set() or cold:
            self._cold = True
            if self._session is not None:
                self._session.go_cold()
        if exit_code is not None:
            self._exit_code = exit_code
        self._stop_requested.set()

    @property
    def state(self) -> str:
        """``starting``, ``ready`` (consumers attached) or ``stopping``."""
        if self._stop_requested_set():
            return "stopping"
        if self.consuming is not None and self.consuming.is_set():
            return "ready"
        return "starting"

    def dump_tasks(self) -> None:
        """Log every task in flight with its stack (SIGUSR1)."""
        tasks = self._session.running_tasks() if self._session is not None else set()
        logger.warning("%d task(s) running in pid %d:", len(tasks), os.getpid())
        for task in sorted(tasks, key=lambda t: t.get_name()):
            stack = "".join(f"    {frame.f_code.co_filename}:{frame.f_lineno} in "
                            f"{frame.f_code.co_name}\n" for frame in _awaited_frames(task))
            logger.warning("  %s\n%s", task.get_name(), stack.rstrip())

    @property
    def queues(self) -> tuple[str, ...]:
        return self.options.queues or (self.app.conf.settings.task_default_queue,)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Start, consume until asked to stop (or drained in burst mode), shut down."""
        self._stop_requested = asyncio.Event()
        self.consuming = asyncio.Event()
        ticker = asyncio.ensure_future(self._tick()) if self._on_tick else None
        try:
            return await self._run()
        finally:
            if ticker is not None:
                ticker.cancel()

    async def _tick(self) -> None:
        assert self._on_tick is not None
        while True:
            try:
                self._on_tick(self)
            except Exception:
                logger.exception("Worker tick hook failed")
            await asyncio.sleep(1.0)

    async def _run(self) -> int:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._startup(stack)
            except StartupError as exc:
                logger.error("Worker start-up failed: %s", exc)
                return exitcodes.STARTUP_ERROR
            code = await self._consume_until_stopped()
            await self._shutdown()
            await signals.worker_process_shutdown.send(sender=self, pid=os.getpid(),
                                                       exitcode=code)
        return code

    async def _startup(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            await stack.enter_async_context(self.app.setup(lazy_broker=True))
        except BrokerConnectionError as exc:
            raise StartupError(str(exc)) from exc
        try:
            await stack.enter_async_context(self.app.app_context())
        except Exception as exc:
            logger.exception("The app context (define_app_context) raised")
            raise StartupError(f"app context failed: {exc!r}") from exc
        if self.app.conf.settings.result_backend:
            _ = self.app.backend.client  # import redis now, not in the middle of a task
        await signals.worker_process_init.send(sender=self)
        self._session = await self._open_session(StartupError)
        if self.options.banner:
            logger.info("%s", banner(self.app, self.options, self.queues,
                                     self._session.prefetch_count))
        logger.info("%s ready: consuming %s", self.options.hostname, ", ".join(self.queues))

    async def _open_session(self, error: type[Exception]) -> Session:
        settings = self.app.conf.settings
        prefetch = self.options.prefetch_count(settings.worker_prefetch_multiplier)
        channel = ConsumerChannel(
            settings.broker_url, prefetch_count=prefetch,
            connection_timeout=settings.broker_connection_timeout,
            heartbeat=settings.broker_heartbeat,
            max_priority=settings.task_queue_max_priority,
            connection_name=f"aio_celery worker {self.options.hostname} pid {os.getpid()}",
        )
        runner = TaskRunner(self.app, self.options.hostname)
        session = Session(channel, runner, self.options, self.stats,
                          on_task_done=self._on_task_done,
                          max_pending_results=settings.worker_max_pending_results)
        runner.on_waiting = session.task_pending  # a finished task waits: its slot is free
        try:
            await session.start(self.queues)
        except (BrokerConnectionError, ConnectionError, OSError) as exc:
            await session.close()
            raise error(str(exc)) from exc
        except Exception as exc:
            await session.close()
            raise error(f"cannot consume {', '.join(self.queues)}: {exc!r}") from exc
        assert self.consuming is not None
        self.consuming.set()
        return session

    def _on_task_done(self) -> None:
        limit = self.options.max_tasks
        if limit and self.stats.finished >= limit and not self._stop_requested_set():
            logger.info("Reached max tasks per child (%d): finishing and exiting to be "
                        "replaced", limit)
            self.request_stop(exit_code=exitcodes.RECYCLE)

    def _stop_requested_set(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    async def _consume_until_stopped(self) -> int:
        """Wait for a stop request; reconnect when the broker connection drops."""
        assert self._stop_requested is not None and self._session is not None
        # Background watchers that end by requesting a stop themselves.
        watchers = []
        if self.options.burst:
            watchers.append(asyncio.ensure_future(self._drained()))
        if self.options.max_memory_kib:
            watchers.append(asyncio.ensure_future(self._watch_memory()))
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            while not self._stop_requested.is_set():
                lost = asyncio.ensure_future(self._session.lost())
                await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)
                if not lost.done():
                    lost.cancel()
                elif not self._stop_requested.is_set() and not await self._reconnect(
                        lost.result()):
                    return exitcodes.BROKER_LOST
        finally:
            for watcher in (*watchers, stop):
                watcher.cancel()
        return self._exit_code

    async def _reconnect(self, reason: str) -> bool:
        """Open a new consumer session within ``reconnect_timeout``; False if impossible."""
        assert self._session is not None and self.consuming is not None
        self.consuming.clear()
        url = mask_url(self.app.conf.settings.broker_url)
        logger.warning("Lost the broker connection to %s (%s); %d task(s) in flight are "
                       "cancelled and will be redelivered. Reconnecting for up to %.0fs", url,
                       reason, self._session.in_flight, self.options.reconnect_timeout)
        await self._session.abandon()
        deadline = time.monotonic() + self.options.reconnect_timeout
        delay = 0.5
        while time.monotonic() < deadline and not self._stop_requested_set():
            try:
                self._session = await self._open_session(BrokerConnectionError)
            except BrokerConnectionError as exc:
                logger.warning("Reconnect failed: %s (next try in %.1fs)", exc, delay)
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 5.0)
                continue
            logger.info("Reconnected to %s: %d consumer(s) attached again", url,
                        self._session.consumer_count)
            return True
        if self._stop_requested_set():
            return True
        logger.error("Could not reach the broker %s within %.0fs: exiting with code %d so "
                     "that a supervisor restarts the worker", url,
                     self.options.reconnect_timeout, exitcodes.BROKER_LOST)
        return False

    async def _drained(self) -> None:
        """Burst mode: stop once nothing is running or waiting and the queues are empty."""
        assert self._session is not None
        idle_checks = 0
        while idle_checks < 2:
            await asyncio.sleep(0.05)
            session = self._session
            if session.busy:
                idle_checks = 0
                continue
            counts = [await session.message_count(q) for q in self.queues]
            idle_checks = idle_checks + 1 if not any(counts) and not session.busy else 0
        logger.info("Burst mode: the queues are empty and nothing is running, stopping")
        self.request_stop()

    async def _watch_memory(self) -> None:
        limit = self.options.max_memory_kib
        while True:
            await asyncio.sleep(1.0)
            rss = resident_kib()
            if rss > limit:
                logger.warning("Resident memory %d KiB exceeds max memory per child (%d KiB): "
                               "finishing and exiting to be replaced", rss, limit)
                self.request_stop(exit_code=exitcodes.RECYCLE)
                return

    async def _shutdown(self) -> None:
        assert self._session is not None and self.consuming is not None
        self.consuming.clear()
        started = time.monotonic()
        timeout = (self.options.shutdown_timeout
                   if self.options.shutdown_timeout is not None
                   else self.app.conf.settings.worker_shutdown_timeout)
        outcome = await self._session.stop(timeout, cold=self._cold)
        kind = "Cold" if self._cold else "Warm"  # a second signal may have come meanwhile
        logger.info("%s shutdown in %.1fs: %d task(s) finished since start, %d returned to "
                    "the queue unstarted, %d cancelled and returned", kind,
                    time.monotonic() - started, self.stats.finished, outcome.returned,
                    outcome.cancelled)


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


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM/SIGINT: warm shutdown (the second one: cold); SIGQUIT: cold.

    The handlers only record the request; the worker's run loop acts on it.
    """
    import signal

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    loop.add_signal_handler(signal.SIGQUIT, lambda: worker.request_stop(cold=True))
    loop.add_signal_handler(signal.SIGUSR1, worker.dump_tasks)
