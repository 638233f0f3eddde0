"""Plain helpers shared by the test files of every layer (fixtures live in the ``conftest.py``
files, those of the layers with servers in ``services.py``). Nothing here connects at import:
``tests/unit`` imports this module too.

Imported as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` when it loads
``tests/conftest.py`` (rootdir-style imports, as for ``tcp_proxy``). Test modules must not
import from ``conftest``: with more than one ``conftest.py`` in the tree, the module named
``conftest`` is whichever pytest loaded last.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import amqp  # py-amqp comes with the test dependency on celery
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pamqp import commands, frame

if TYPE_CHECKING:
    from datetime import datetime

    from aio_celery import Celery
    from aio_celery.amqp.connection import Delivery
    from aio_celery.result import AsyncResult

#: the repository (the worker subprocesses run there, with it on ``PYTHONPATH``)
ROOT = Path(__file__).resolve().parents[1]

AMQP_URL = os.environ.get("AIO_CELERY_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_HOST_URL = os.environ.get("AIO_CELERY_TEST_REDIS", "redis://127.0.0.1:6379")

#: rabbitmqctl for the broker under test, as a command prefix (``shlex``-split; a relative
#: path is from the repository): ``scripts/rabbitmq4 ctl`` for the RabbitMQ 4.x node of
#: ``scripts/rabbitmq4``. Plain ``rabbitmqctl`` reaches the host's node, rabbit@localhost.
RABBITMQCTL = tuple(shlex.split(os.environ.get("AIO_CELERY_TEST_RABBITMQCTL", "rabbitmqctl")))

#: queue suffixes a test may use next to its unique name; all are removed after the test
QUEUE_SUFFIXES = ("", "-a", "-b", "-c", "-high", "-low", "-dlx", "-other")


# --- the broker, synchronously (py-amqp) -----------------------------------------------------

@contextlib.contextmanager
def amqp_connection() -> Iterator[amqp.Connection]:
    """A blocking py-amqp connection to :data:`AMQP_URL`."""
    parts = urlsplit(AMQP_URL)
    with amqp.Connection(f"{parts.hostname}:{parts.port or 5672}", userid=parts.username,
                         password=parts.password,
                         virtual_host=parts.path[1:] or "/") as connection:
        yield connection


def delete_queues_with_prefix(prefix: str) -> None:
    """Delete the test's queues and exchanges (``prefix`` plus :data:`QUEUE_SUFFIXES`)."""
    with amqp_connection() as connection:
        for suffix in QUEUE_SUFFIXES:
            channel = connection.channel()
            try:
                channel.queue_delete(prefix + suffix)
                channel.exchange_delete(prefix + suffix)
            except amqp.exceptions.NotFound:
                pass
            finally:
                if channel.is_open:
                    channel.close()


def queue_depth(queue: str) -> int:
    """Ready messages in ``queue`` (not those delivered and unacknowledged)."""
    with amqp_connection() as connection:
        channel = connection.channel()
        try:
            _, count, _ = channel.queue_declare(queue, passive=True)
        finally:
            channel.close()
    return int(count)


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 60) -> str:
    """``rabbitmqctl -q ARGS...`` on the broker under test (:data:`RABBITMQCTL`): its output.
    Unless ``check`` is false, a failure raises RuntimeError with rabbitmqctl's stderr.
    Blocking: from asyncio, ``await asyncio.to_thread(rabbitmqctl, ...)``."""
    command = [*RABBITMQCTL, "-q", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done.stdout


# --- the broker, from asyncio (aio-pika) -----------------------------------------------------

async def declare_test_queue(channel: AbstractChannel, name: str,
                             **options: Any) -> AbstractQueue:
    """``channel.declare_queue(name, **options)`` for a queue of the test's own: durable,
    since RabbitMQ 4.3 refuses a queue that is neither durable nor exclusive (the deprecated
    feature ``transient_nonexcl_queues``: the connection is closed with 541), and aio-pika's
    default is neither. The ``unique_name`` fixture deletes it after the test."""
    return await channel.declare_queue(name, durable=True, **options)


async def ready_count(connection: AbstractConnection, name: str) -> int | None:
    """Messages ready in ``name`` (delivered-but-unacked ones are not counted); None when the
    queue does not exist."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def publish_raw(connection: AbstractConnection, queue: str, body: bytes, *,
                      headers: dict[str, Any] | None, content_type: str | None,
                      content_encoding: str | None = None,
                      correlation_id: str | None = None) -> None:
    """Publish a message as given (persistent) to ``queue`` through the default exchange."""
    channel = await connection.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers, content_type=content_type,
                             content_encoding=content_encoding, correlation_id=correlation_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue)
    finally:
        await channel.close()


# --- polling from asyncio --------------------------------------------------------------------

async def _evaluate(predicate: Callable[[], Any]) -> Any:
    value = predicate()
    if inspect.isawaitable(value):
        value = await value
    return value


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it is truthy, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await _evaluate(predicate)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def send_eta_into_the_queue(app: Celery, name: str, args: tuple[Any, ...],
                                  eta: datetime) -> AsyncResult:
    """``app.send_task(name, args, eta=eta)`` straight into the task's queue, as a Celery
    client before 5.5 (or one not in quorum mode) sends it: in quorum mode with a topic
    exchange, ``send_task`` would send it through native delayed delivery instead, and it
    would reach the queue only about a second before it is due, after what was sent next."""
    from aio_celery import protocol

    message, queue = app.build_message(name, args, None, {"eta": eta})
    await app.publisher.publish(protocol.encode(message, app.now()), queue, 0)
    return app.AsyncResult(message.id)


async def run_ready_tasks_behind_etas(app: Celery, start_worker: Callable[..., Any],
                                      timeout: float = 15.0) -> dict[str, float]:
    """The prefetch window's scenario: concurrency 2 x multiplier 2, a static window of 4
    with room for 2 etas in memory. Six etas due in 3 s go straight into the queue (see
    :func:`send_eta_into_the_queue`), then four ready tasks: the ready ones run within
    1.5 s (the etas beyond the window's room are parked, not held), every eta runs and
    none early, and the worker counts all ten. Returns when each ran, and the eta time
    under ``"eta"``; the caller checks how they were parked."""
    from datetime import UTC, datetime, timedelta

    ran: dict[str, float] = {}

    @app.task(name="helpers.window_job")
    async def job(label: str) -> str:
        ran[label] = time.time()
        return label

    eta = datetime.now(UTC) + timedelta(seconds=3)
    etas = [await send_eta_into_the_queue(app, job.name, (f"eta-{i}",), eta)
            for i in range(6)]
    ready = [await job.delay(f"ready-{i}") for i in range(4)]
    started = time.time()
    handle = await start_worker(concurrency=2, prefetch_multiplier=2)
    try:
        assert [await r.get(timeout=5) for r in ready] == [f"ready-{i}" for i in range(4)]
        assert all(ran[f"ready-{i}"] - started < 1.5 for i in range(4)), ran
        assert [await r.get(timeout=10) for r in etas] == [f"eta-{i}" for i in range(6)]
        assert all(ran[f"eta-{i}"] >= eta.timestamp() - 0.05 for i in range(6)), \
            ("an eta task ran early", ran)
        # A result is stored before the task is counted as finished: wait for the count.
        await eventually(lambda: handle.worker.stats.finished == 10, timeout,
                         what="10 tasks counted as finished")
    finally:
        assert await handle.stop() == 0
    return {**ran, "eta": eta.timestamp()}


async def stays(predicate: Callable[[], Any], duration: float = 0.3) -> None:
    """``predicate`` (sync or async) holds for the whole of ``duration`` (checked repeatedly)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert await _evaluate(predicate), "condition stopped holding"
        await asyncio.sleep(0.03)


async def resolves_to(awaitable: Awaitable[Any], expected: Any) -> bool:
    """``await awaitable == expected``, as a predicate for :func:`eventually`/:func:`stays`."""
    return await awaitable == expected


# --- subprocesses (blocking) -----------------------------------------------------------------

def wait_until(predicate: Callable[[], bool], deadline: float, what: str,
               diagnostics: Callable[[], str] = lambda: "") -> None:
    """Poll ``predicate`` until it is true; after ``deadline`` seconds, fail the test with
    ``diagnostics()`` (a subprocess's log, say)."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline}s waiting until {what}\n{diagnostics()}",
                        pytrace=False)
        time.sleep(0.02)


def wait_for_log(process: subprocess.Popen[Any], log: Callable[[], str], text: str,
                 deadline: float, diagnostics: Callable[[], str],
                 who: str = "the worker") -> None:
    """Wait until ``text`` is in ``log()``; fail at once if ``process`` exits first."""
    def seen() -> bool:
        if text in log():
            return True
        if process.poll() is not None:
            pytest.fail(f"{who} exited with {process.returncode} before logging {text!r}\n"
                        f"{diagnostics()}", pytrace=False)
        return False

    wait_until(seen, deadline, f"{who} logs {text!r}", diagnostics)


def wait_for_exit(process: subprocess.Popen[Any], deadline: float,
                  diagnostics: Callable[[], str], who: str = "the worker") -> int:
    """The exit code of ``process``; fail the test if it is still running after ``deadline``."""
    try:
        return process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{who} did not exit within {deadline}s\n{diagnostics()}", pytrace=False)


def kill_process_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL the whole process group of ``process`` (started with
    ``start_new_session=True``: a supervisor's children included) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


class WorkerProcess:
    """One ``aio_celery worker`` subprocess in a process group of its own."""

    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.stderr_path = log_dir / f"worker-{uuid.uuid4().hex[:8]}.stderr"
        self.stdout_path = self.stderr_path.with_suffix(".stdout")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), env.get("PYTHONPATH"), os.environ.get("PYTHONPATH")]))
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aio_celery", *args], cwd=ROOT, env=full_env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def diagnostics(self) -> str:
        return f"--- worker stderr ---\n{self.stderr[-6000:]}"

    def wait_for_log(self, text: str, deadline: float = 30.0) -> None:
        wait_for_log(self.process, lambda: self.stderr, text, deadline, self.diagnostics)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, deadline: float) -> int:
        return wait_for_exit(self.process, deadline, self.diagnostics)

    def kill(self) -> None:
        """SIGKILL the whole process group (children of a supervisor included)."""
        kill_process_group(self.process)


def close_celery_client(app: Any) -> None:
    """Close a real Celery client app without leaving a socket for exit time.

    Celery results that are garbage-collected late unsubscribe on a Redis connection that
    nobody closes (a ResourceWarning at interpreter exit, an error under
    ``filterwarnings=error``): collect them now, forget the channels, close that connection.
    """
    import gc

    gc.collect()
    consumer = app.backend.result_consumer
    if consumer is not None:
        consumer.subscribed_to.clear()
        consumer.stop()
    app.close()


# --- a fake AMQP server -----------------------------------------------------------------------

class Collector:
    """A delivery callback that keeps what it is given and lets a test wait for a count."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self._arrived = asyncio.Event()

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self._arrived.set()

    def __len__(self) -> int:
        return len(self.deliveries)

    async def until(self, count: int, timeout: float = 5.0) -> list[Delivery]:
        """Wait until ``count`` deliveries have arrived (at least); return them all."""
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(self.deliveries)} of {count} deliveries arrived"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.deliveries


class FakeBroker:
    """Speaks just enough AMQP on a local socket: the handshake, then whatever the test
    sends; every frame the client sends is kept (decoded by pamqp). Declarations, binds and
    ``basic.consume`` are answered; other requests wait for the test's answer."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.port = 0
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._frame_arrived = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def send(self, method: Any, channel: int = 0) -> None:
        self.write(frame.marshal(method, channel))

    def write(self, data: bytes) -> None:
        """Send raw bytes: frames as the test builds them, bad ones too."""
        assert self._writer is not None
        self._writer.write(data)

    def methods(self, kind: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        await reader.readexactly(8)  # the protocol header
        capabilities = {"publisher_confirms": True, "connection.blocked": True,
                        "consumer_cancel_notify": True, "basic.nack": True}
        self.send(commands.Connection.Start(server_properties={"capabilities": capabilities},
                                            mechanisms="PLAIN", locales="en_US"))
        buffer = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                buffer += data
                while len(buffer) >= 8:
                    consumed, _, method = frame.unmarshal(buffer)
                    if not consumed:
                        break
                    buffer = buffer[consumed:]
                    self.received.append(method)
                    self._answer(method)

    def _answer(self, method: Any) -> None:
        replies = {commands.Connection.StartOk: (commands.Connection.Tune(
                       channel_max=2047, frame_max=131072, heartbeat=60), 0),
                   commands.Connection.Open: (commands.Connection.OpenOk(), 0),
                   commands.Channel.Open: (commands.Channel.OpenOk(), 1),
                   commands.Confirm.Select: (commands.Confirm.SelectOk(), 1),
                   commands.Connection.Close: (commands.Connection.CloseOk(), 0),
                   commands.Exchange.Declare: (commands.Exchange.DeclareOk(), 1),
                   commands.Queue.Declare: (commands.Queue.DeclareOk(
                       queue="q", message_count=0, consumer_count=0), 1),
                   commands.Queue.Bind: (commands.Queue.BindOk(), 1)}
        reply = replies.get(type(method))
        if reply is not None:
            self.send(*reply)
        elif isinstance(method, commands.Basic.Consume):  # deliveries use the client's tag
            self.send(commands.Basic.ConsumeOk(consumer_tag=method.consumer_tag), 1)
