#!/usr/bin/env python3
"""Benchmarks: aio-celery against plain aio-pika, on a real RabbitMQ.

    scripts/bench publish [--n 50000] [--rounds 3] [--broker amqp://...]
    scripts/bench drain [--n 20000] [--concurrency 100] [--variants noop,results,sleep,...]
    scripts/bench scale [--n 20000] [--concurrency 100]

* ``publish``: ``add.delay()`` against plain aio-pika confirms, twice: a small JSON message,
  and the very wire message aio-celery sends (Celery protocol v2 headers, body, properties).
* ``drain``: a queue pre-filled with N task messages, drained by an in-process aio-celery
  ``Worker`` against a plain aio-pika consumer that acks each message; variants: no-op
  tasks; with Redis results; ``asyncio.sleep(0.1)`` tasks at concurrency 1000; no-op tasks
  on a quorum queue; ``metrics``: no-op tasks with Prometheus metrics on (in multiprocess
  mode, as under the supervisor) against the same worker with them off; ``events``: no-op
  tasks with task events on (``-E``, a monitor's queue bound to ``celeryev``).
* ``scale``: our supervisor with ``-c 1`` against ``-c 2``, and 1 against 2 plain aio-pika
  consumer processes: does a second process gain as much for us as for the plain consumer?

How it works: every measurement runs in a child process of its own (a clean heap, its own
peak RSS, no warm-up carried over from the other contender), the contenders alternate
round by round (A B, B A, A B, ...), each run gets a fresh queue that is checked and deleted
afterwards, and the report gives every run plus the medians. The machine is shared with the
broker (and maybe with other jobs): only the ratios of contenders measured side by side in
one invocation mean anything.

Adding a benchmark: write its measurements as ``@measurement("drain/aio-celery")``
coroutines that take the params dict and return a :class:`Stopwatch`, then a ``cmd_drain``
that calls :func:`run_rounds` and :func:`report`, and register it in :func:`build_parser`.

The broker is ``--broker``, else $AIO_CELERY_BENCH_BROKER, else $AIO_CELERY_TEST_BROKER,
else amqp://guest:guest@127.0.0.1:5672//.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"


def _reexec_in_venv() -> None:
    """Run under the repo's .venv when started with another interpreter."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() != VENV.resolve() and python.exists():
        os.execv(python, [str(python), __file__, *sys.argv[1:]])


if __name__ == "__main__":
    _reexec_in_venv()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import (  # noqa: E402
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Sequence,
)
from contextlib import (  # noqa: E402
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
    suppress,
)
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
#: tests/conftest.py claims an empty Redis database with this key (taking the highest free
#: one from 15 down); the benchmark claims its own the same way, from 1 up
REDIS_CLAIM_KEY = "aio-celery-test-run"
SCRIPTS = Path(__file__).resolve().parent
QUEUE_PREFIX = "aio-celery-bench"
CHILD_TIMEOUT = 900.0

Params = dict[str, Any]
Measurement = Callable[[Params], Awaitable["Stopwatch"]]
MEASUREMENTS: dict[str, Measurement] = {}


def measurement(name: str) -> Callable[[Measurement], Measurement]:
    """Register a child-side measurement: ``async def m(params) -> Stopwatch`` (the
    stopwatch around its critical section)."""

    def register(fn: Measurement) -> Measurement:
        MEASUREMENTS[name] = fn
        return fn

    return register


# --- shared helpers ------------------------------------------------------------------------


@dataclass
class Stopwatch:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    #: set when the measured work ran in other processes: their peak RSS (else the child's)
    peak_rss_mib: float | None = None


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Wall-clock and process CPU time of the block."""
    watch = Stopwatch()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - wall
        watch.cpu_seconds = time.process_time() - cpu


def peak_rss_mib() -> float:
    """This process's peak resident set size.

    On Linux it is ``VmHWM`` from /proc/self/status, not ``ru_maxrss``: Linux keeps
    ``ru_maxrss`` across fork and execve, so a measurement child would report at least the
    parent's own peak at the time it was started (the parent that pre-fills queues grows
    to ~60 MiB). Elsewhere ``ru_maxrss`` (macOS reports bytes, others KiB).
    """
    with suppress(OSError, ValueError, IndexError), open("/proc/self/status",
                                                         encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def unique_queue(kind: str) -> str:
    return f"{QUEUE_PREFIX}-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def mask(url: str) -> str:
    from aio_celery.config import mask_url

    return mask_url(url)


class QueueAdmin:
    """An admin connection for the orchestrator: count and delete the bench queues."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Any = None
        self.created: set[str] = set()

    async def __aenter__(self) -> QueueAdmin:
        import aio_pika

        self._connection = await aio_pika.connect(self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            for name in sorted(self.created):
                await self.delete(name)
        finally:
            await self._connection.close()

    async def declare(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        """Declare ``name`` as a durable queue with ``arguments`` (how both contenders
        declare it), so that publishing does not depend on the client declaring it first."""
        self.created.add(name)
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        finally:
            await channel.close()

    async def message_count(self, name: str) -> int | None:
        """Ready messages in ``name`` (None when the queue does not exist)."""
        counts = await self.counts(name)
        return None if counts is None else counts[0]

    async def counts(self, name: str) -> tuple[int, int] | None:
        """``(ready messages, consumers)`` of ``name`` (None when it does not exist)."""
        import aio_pika

        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def delete(self, name: str) -> None:
        """Delete queue ``name`` and an exchange of the same name (aio-celery declares
        one), if they exist."""
        import aio_pika

        channel = await self._connection.channel()
        try:
            await channel.queue_delete(name)
            await channel.exchange_delete(name)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            pass
        finally:
            if not channel.is_closed:
                await channel.close()
        self.created.discard(name)


@dataclass
class Run:
    """One measurement of one contender in one round."""

    round: int
    contender: str
    n: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    problem: str | None = None
    unit: str = "msgs/s"

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this process when its parent dies (Linux), so that no
    measurement child or worker outlives an interrupted benchmark."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def run_child(name: str, params: Params) -> dict[str, Any]:
    """Run measurement ``name`` in a fresh interpreter; return its JSON report."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_measure", name, json.dumps(params),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent)
    try:
        out, err = await asyncio.wait_for(process.communicate(), CHILD_TIMEOUT)
    except TimeoutError:
        return {"error": f"timed out after {CHILD_TIMEOUT:.0f}s"}
    finally:  # timed out or interrupted: the child's finally blocks get a SIGTERM first
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
    if process.returncode != 0:
        text = err.decode(errors="replace")
        tail = text.strip().splitlines()[-3:]
        with tempfile.NamedTemporaryFile("w", prefix=f"{QUEUE_PREFIX}-failed-",
                                         suffix=".log", delete=False) as log:
            log.write(text)
        return {"error": f"exit {process.returncode} (stderr in {log.name}): "
                         + " | ".join(tail)}
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def run_rounds(admin: QueueAdmin, contenders: list[str], rounds: int,
                     params: Params, *, predeclare: bool = True,
                     arguments: dict[str, Any] | None = None,
                     prepare: Callable[[str], Awaitable[None]] | None = None,
                     expect: int | None = None, unit: str = "msgs/s") -> list[Run]:
    """Run every contender ``rounds`` times, alternating the order (A B, B A, ...), each on
    a fresh queue (declared beforehand with ``predeclare``, then given to ``prepare``, e.g.
    to fill it, outside the child) that must hold ``expect`` messages afterwards (default
    ``params["n"]``) and is then deleted."""
    expected = params["n"] if expect is None else expect
    runs: list[Run] = []
    for number in range(1, rounds + 1):
        order = contenders if number % 2 else contenders[::-1]
        for contender in order:
            queue = unique_queue(contender.split("/")[-1])
            admin.created.add(queue)
            try:
                if predeclare:
                    await admin.declare(queue, arguments)
                if prepare is not None:
                    await prepare(queue)
                report = await run_child(contender, {**params, "queue": queue})
                run = Run(number, contender, params["n"], report.get("seconds", float("nan")),
                          report.get("cpu_seconds", float("nan")),
                          report.get("peak_rss_mib", float("nan")), report.get("error"),
                          unit)
                if run.problem is None:
                    count = await admin.message_count(queue)
                    if count != expected:
                        run.problem = f"queue holds {count} messages, expected {expected}"
            finally:
                await admin.delete(queue)
            print_run(run)
            runs.append(run)
    return runs


WIDTH = 28  # contender names


def print_run(run: Run) -> None:
    line = (f"  round {run.round}  {run.contender:<{WIDTH}} {run.rate:>10,.0f} {run.unit}  "
            f"{run.seconds:7.2f} s  cpu {run.cpu_seconds:6.2f} s  "
            f"peak RSS {run.peak_rss_mib:6.1f} MiB")
    if run.problem:
        line += f"  PROBLEM: {run.problem}"
    print(line, flush=True)


def median_rates(runs: list[Run]) -> dict[str, float]:
    """The median rate of each contender's good runs."""
    return {contender: median([run.rate for run in runs
                               if run.contender == contender and run.problem is None])
            for contender in dict.fromkeys(run.contender for run in runs)}


def report(runs: list[Run], baseline: str, subject: str, *,
           also: Sequence[tuple[str, str]] = ()) -> int:
    """Print medians per contender and the subject/baseline rate ratio (and those of the
    ``also`` (subject, baseline) pairs); 1 if any run failed."""
    print("medians:")
    rates = median_rates(runs)
    for contender, rate in rates.items():
        good = [run for run in runs if run.contender == contender and run.problem is None]
        unit = good[0].unit if good else ""
        print(f"  {contender:<{WIDTH}} {rate:>10,.0f} {unit}  "
              f"cpu {median([run.cpu_seconds for run in good]):6.2f} s  "
              f"peak RSS {median([run.peak_rss_mib for run in good]):6.1f} MiB  "
              f"({len(good)} good runs)")
    for top, bottom in [(subject, baseline), *also]:
        ratio = rates.get(top, float("nan")) / rates.get(bottom, float("nan"))
        print(f"ratio {top} / {bottom}: {ratio:.2f}")
    return 1 if any(run.problem for run in runs) else 0


def header(title: str, args: argparse.Namespace, details: str = "") -> None:
    from importlib.metadata import version

    predeclare = getattr(args, "predeclare", True)
    print(f"{title}: n={args.n} rounds={args.rounds} broker={mask(args.broker)} "
          f"queues {'declared beforehand' if predeclare else 'declared by the clients'}"
          + (f" aio-celery publish timeout {args.publish_timeout}"
             if getattr(args, "publish_timeout", "default") != "default" else "")
          + (f" {details}" if details else ""))
    print(f"  python {platform.python_version()}, aio-pika {version('aio-pika')}, "
          f"aiormq {version('aiormq')}, {os.cpu_count()} CPUs (broker on the same host "
          "shares them)", flush=True)


# --- publish ---------------------------------------------------------------------------------


@measurement("publish/aio-celery")
async def publish_aio_celery(params: Params) -> Stopwatch:
    """``add.delay(n, n)`` N times, concurrently, on a connected app."""
    from aio_celery import Celery

    app = Celery("bench")
    app.conf.update(broker_url=params["broker"], task_default_queue=params["queue"])
    if "publish_timeout" in params:
        app.conf.update(broker_publish_timeout=params["publish_timeout"])

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with app.setup():
        with stopwatch() as watch:
            await asyncio.gather(*[add.delay(n, n) for n in range(params["n"])])
    return watch


@measurement("publish/aio-pika")
async def publish_aio_pika(params: Params) -> Stopwatch:
    """Plain aio-pika with publisher confirms: N small persistent JSON messages,
    concurrently, through the default exchange to a durable queue."""
    import aio_pika

    def bare_message(n: int) -> aio_pika.Message:
        return aio_pika.Message(json.dumps({"task": "bench.add", "args": [n, n]}).encode(),
                                delivery_mode=2)

    return await publish_with_aio_pika(params, bare_message)


async def publish_with_aio_pika(params: Params, make: Callable[[int], Any]) -> Stopwatch:
    """Publish ``make(n)`` for n < N concurrently with confirms, timed."""
    import aio_pika

    queue = params["queue"]
    connection = await aio_pika.connect(params["broker"])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        with stopwatch() as watch:
            await asyncio.gather(*[channel.default_exchange.publish(make(n), routing_key=queue)
                                   for n in range(params["n"])])
    return watch


#: the ``embed`` part of a Celery protocol v2 body for a task with no callbacks or chain
CELERY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@measurement("publish/aio-pika-celery-msg")
async def publish_aio_pika_celery_msg(params: Params) -> Stopwatch:
    """Plain aio-pika with publisher confirms sending the very message aio-celery sends for
    ``add.delay(n, n)``, built per message as a hand-rolled Celery publisher would: the
    protocol v2 headers (the 19 of ``aio_celery.protocol.encode_headers``, fresh uuid4 id),
    the JSON body ``[[n, n], {}, embed]`` and the properties (content type and encoding,
    correlation_id and message_id = the id, reply_to, persistent). Does not import
    aio_celery. Byte for byte the same but for one: aio-pika always sends ``priority`` (0)."""
    import aio_pika

    origin = f"gen{os.getpid()}@{socket.gethostname()}"
    reply_to = str(uuid.uuid4())  # an app's oid, as aio-celery and Celery send

    def celery_message(n: int) -> aio_pika.Message:
        task_id = str(uuid.uuid4())
        args = [n, n]
        headers: dict[str, Any] = {
            "lang": "py", "task": "bench.add", "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": repr(tuple(args)), "kwargsrepr": repr({}), "origin": origin,
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
        }
        return aio_pika.Message(
            json.dumps([args, {}, CELERY_EMBED]).encode(), headers=headers,
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
            correlation_id=task_id, message_id=task_id, reply_to=reply_to)

    return await publish_with_aio_pika(params, celery_message)


async def cmd_publish(args: argparse.Namespace) -> int:
    header("publish", args)
    params = {"broker": args.broker, "n": args.n}
    if args.publish_timeout != "default":
        params["publish_timeout"] = args.publish_timeout
    contenders = ["publish/aio-celery", "publish/aio-pika", "publish/aio-pika-celery-msg"]
    async with QueueAdmin(args.broker) as admin:
        runs = await run_rounds(admin, contenders, args.rounds, params,
                                predeclare=args.predeclare)
    return report(runs, baseline="publish/aio-pika", subject="publish/aio-celery",
                  also=[("publish/aio-celery", "publish/aio-pika-celery-msg")])


# --- drain -----------------------------------------------------------------------------------
#
# The parent fills each run's queue with N task messages through aio-celery's client
# (outside the child, so neither its time nor its memory is measured); the child drains it.
# The clock starts at the first delivery (the first task execution, for the worker) and stops
# once the N-th message is done: for the worker, when ``worker.stats.finished`` reaches N
# (the task ran, its result is stored, its ack is queued); for the plain consumer, after the
# N-th ``ack()``. The queue must then be empty.

DRAIN_VARIANTS: dict[str, tuple[str, str, str]] = {
    # variant: (aio-celery contender, plain contender, what each task does)
    "noop": ("drain/aio-celery", "drain/aio-pika", "no-op tasks, no results"),
    "results": ("drain/aio-celery-results", "drain/aio-pika-results",
                "no-op tasks, results stored in Redis"),
    "sleep": ("drain/aio-celery-sleep", "drain/aio-pika-sleep", "asyncio.sleep tasks"),
    "quorum": ("drain/aio-celery-quorum", "drain/aio-pika-quorum",
               "no-op tasks on a quorum queue"),
    # the baseline is our own worker with metrics off: the ratio is what metrics cost
    "metrics": ("drain/aio-celery-metrics", "drain/aio-celery",
                "no-op tasks, Prometheus metrics on (multiprocess files) against off"),
    "events": ("drain/aio-celery-events", "drain/aio-pika",
               "no-op tasks, task events on (-E), a monitor's queue bound to celeryev"),
}
QUORUM_ARGUMENTS = {"x-queue-type": "quorum"}


class DrainProgress:
    """Child side: the first delivery, and the count of messages done."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first: tuple[float, float] | None = None  # perf_counter, process_time
        self.finished = asyncio.Event()

    def started(self) -> None:
        if self.first is None:
            self.first = time.perf_counter(), time.process_time()

    def done(self) -> None:
        self.count += 1
        if self.count == self.n:
            self.finished.set()

    async def wait(self, other: asyncio.Future[Any] | None = None,
                   on_stall: Callable[[], None] | None = None) -> None:
        """Until N are done; raises if ``other`` (the worker) ends first, on a timeout, or
        when nothing got done for 30 s (after calling ``on_stall``, for diagnostics)."""
        deadline = time.monotonic() + 60 + self.n / 200
        waiter = asyncio.ensure_future(self.finished.wait())
        futures: list[asyncio.Future[Any]] = [waiter] if other is None else [waiter, other]
        why = ""
        progress_at, count = time.monotonic(), self.count
        while not why:
            done, _ = await asyncio.wait(futures, timeout=1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                return
            now = time.monotonic()
            if self.count != count:
                progress_at, count = now, self.count
            if done:
                why = "the worker exited"
            elif now - progress_at > 30:
                why = "stalled for 30s"
                if on_stall is not None:
                    on_stall()
            elif now > deadline:
                why = "timed out"
        waiter.cancel()
        raise RuntimeError(f"{why} with {self.count} of {self.n} messages done")

    def stopwatch(self) -> Stopwatch:
        assert self.first is not None
        return Stopwatch(time.perf_counter() - self.first[0],
                         time.process_time() - self.first[1])


@measurement("drain/aio-celery")
@measurement("drain/aio-celery-results")
@measurement("drain/aio-celery-sleep")
@measurement("drain/aio-celery-quorum")
@measurement("drain/aio-celery-events")
async def drain_aio_celery(params: Params) -> Stopwatch:
    """An in-process ``Worker`` (concurrency C, no banner; worker events on, as by default)
    on the pre-filled queue; the app has a Redis result backend when ``params["backend"]``
    is set, and the worker records Prometheus metrics (into a multiprocess directory, as a
    supervisor's child does) when ``params["metrics"]`` is; with ``params["events"]`` task
    events are on and a queue bound to ``celeryev`` takes them (as Flower's would; dropped
    after 5 s unread). Every execution of the task is counted; the run ends when the
    worker has finished N."""
    from aio_celery import Celery
    from aio_celery.worker import Worker, WorkerOptions

    n, pause = params["n"], float(params.get("sleep") or 0.0)
    progress = DrainProgress(n)
    app = Celery("bench-drain", broker=params["broker"])
    if params.get("backend"):
        app.conf.update(result_backend=params["backend"])
    if params.get("quorum"):  # the bench queue is not the default one: a "missing" queue
        app.conf.update(task_create_missing_queue_type="quorum")

    @app.task(name="bench.noop")
    async def noop(x: int, y: int) -> None:
        progress.started()
        progress.done()

    @app.task(name="bench.sleep")
    async def sleep(x: int, y: int) -> None:
        progress.started()
        await asyncio.sleep(pause)
        progress.done()

    recorder = None
    if params.get("metrics"):
        # before prometheus_client is imported: it picks its file-backed values then
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=f"{QUEUE_PREFIX}-")
        from aio_celery.metrics import PrometheusRecorder

        recorder = PrometheusRecorder()
    worker = Worker(app, WorkerOptions(concurrency=params["concurrency"],
                                       queues=(params["queue"],), burst=False, banner=False,
                                       task_events=bool(params.get("events"))),
                    recorder=recorder)
    try:
        async with AsyncExitStack() as stack:
            if params.get("events"):
                await stack.enter_async_context(monitor_queue(params["broker"]))
            watch = await drain_with(worker, progress, n)
    finally:
        if recorder is not None:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    if params.get("events") and worker.stats.events_dropped:
        print(f"events dropped: {worker.stats.events_dropped}", file=sys.stderr)
    return watch


@asynccontextmanager
async def monitor_queue(broker: str) -> AsyncIterator[None]:
    """An exclusive queue bound to ``celeryev`` with ``#``, as Flower's (TTL 5 s)."""
    import aio_pika

    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("celeryev", aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(f"{QUEUE_PREFIX}-celeryev-{uuid.uuid4().hex[:8]}",
                                            exclusive=True,
                                            arguments={"x-message-ttl": 5000})
        await queue.bind(exchange, "#")
        yield
    finally:
        await connection.close()


async def drain_with(worker: Any, progress: DrainProgress, n: int) -> Stopwatch:
    """Run ``worker`` until ``progress`` counts N executions and N are finished."""
    running = asyncio.create_task(worker.run())

    def on_stall() -> None:
        session: Any = worker._session  # diagnostics only
        print(f"stalled: stats {worker.stats}, in flight {session and session.in_flight}, "
              f"unsettled {session and len(session._tracker)}", file=sys.stderr)
        worker.dump_tasks()

    try:
        await progress.wait(running, on_stall)
        # The N-th execution is seen; poll (only now) for the last results being stored.
        while worker.stats.finished < n and not running.done():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        watch = progress.stopwatch()
    finally:
        worker.request_stop()
        code = await asyncio.wait_for(running, 60)
    if code != 0 or progress.count != n or worker.stats.finished != n:
        raise RuntimeError(f"worker exit code {code}, {progress.count} executions and "
                           f"{worker.stats.finished} finished for {n} messages")
    return watch


@measurement("drain/aio-celery-metrics")
async def drain_aio_celery_metrics(params: Params) -> Stopwatch:
    """:func:`drain_aio_celery` with metrics on (its baseline, drain/aio-celery, gets the
    same params: the contender's name decides)."""
    return await drain_aio_celery({**params, "metrics": True})


@measurement("drain/aio-pika")
@measurement("drain/aio-pika-results")
@measurement("drain/aio-pika-sleep")
@measurement("drain/aio-pika-quorum")
async def drain_aio_pika(params: Params) -> Stopwatch:
    """A plain aio-pika consumer (``queue.consume``, prefetch 4 x C like the worker) that
    json-decodes each body, then, per variant, sleeps in its delivery task (at most C at a
    time) or writes a Celery-style result (SET with expiry + PUBLISH in one MULTI/EXEC
    pipeline, as Celery's Redis backend does), then ``await message.ack()``."""
    import aio_pika

    n, pause = params["n"], params.get("sleep")
    progress = DrainProgress(n)
    slots = asyncio.Semaphore(params["concurrency"])
    redis_client: Any = None
    if params.get("backend"):
        import redis.asyncio

        redis_client = redis.asyncio.Redis.from_url(params["backend"])

    async def store_result(task_id: str) -> None:
        meta = json.dumps({"status": "SUCCESS", "result": None, "traceback": None,
                           "children": [], "date_done": datetime.now(UTC).isoformat(),
                           "task_id": task_id})
        key = f"celery-task-meta-{task_id}"
        async with redis_client.pipeline(transaction=True) as pipe:
            pipe.set(key, meta, ex=86400)
            pipe.publish(key, meta)
            await pipe.execute()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        progress.started()
        json.loads(message.body)
        if pause is not None:
            async with slots:
                await asyncio.sleep(pause)
        if redis_client is not None:
            await store_result(str(message.correlation_id))
        await message.ack()
        progress.done()

    connection = await aio_pika.connect(params["broker"])
    try:
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=params["prefetch"])
            queue = await channel.declare_queue(
                params["queue"], durable=True,
                arguments=QUORUM_ARGUMENTS if params.get("quorum") else None)
            tag = await queue.consume(on_message)
            await progress.wait()
            watch = progress.stopwatch()
            await queue.cancel(tag)
    finally:
        if redis_client is not None:
            await redis_client.aclose()
    if progress.count != n:
        raise RuntimeError(f"{progress.count} messages handled, expected {n}")
    return watch


async def prefill(app: Any, queue: str, task: str, n: int) -> None:
    """Send N ``task(i, i)`` messages to ``queue`` with aio-celery's client (in the parent)."""
    chunk = 5000
    for start in range(0, n, chunk):
        await asyncio.gather(*[app.send_task(task, (i, i), queue=queue)
                               for i in range(start, min(n, start + chunk))])


async def connected_client(stack: AsyncExitStack, broker: str, quorum: bool = False) -> Any:
    """The parent's aio-celery client for pre-filling queues, connected for the command
    (``quorum``: it declares the queues it fills as quorum queues)."""
    from aio_celery import Celery

    app = Celery("bench-prefill", broker=broker, set_as_current=False)
    if quorum:
        app.conf.update(task_create_missing_queue_type="quorum")
    await stack.enter_async_context(app.setup())
    return app


@asynccontextmanager
async def claimed_redis_db(url: str) -> AsyncIterator[str]:
    """A Redis database of our own for the run, flushed afterwards: the one ``url`` names
    (``/N``), else the lowest empty one from 1 up. It must be empty and is claimed with the
    key the test suite claims its databases with, so that a test run on the same server
    never picks it (nor we one of theirs): flushing it cannot wipe anybody else's data."""
    from urllib.parse import urlsplit, urlunsplit

    import redis.asyncio

    parts = urlsplit(url)
    named = parts.path.strip("/")
    token = f"aio-celery-bench pid {os.getpid()}"
    for db in [int(named)] if named else range(1, 16):
        db_url = urlunsplit(parts._replace(path=f"/{db}"))
        client = redis.asyncio.Redis.from_url(db_url)
        try:
            if await client.dbsize() == 0 and await client.set(REDIS_CLAIM_KEY, token, nx=True,
                                                                ex=3600):
                try:
                    yield db_url
                finally:
                    if await client.get(REDIS_CLAIM_KEY) == token.encode():
                        await client.flushdb()
                return
        finally:
            await client.aclose()
    raise RuntimeError(f"no empty Redis database for the results variant at {mask(url)}"
                       + (" (it must be empty: it is flushed afterwards)" if named else ""))


async def cmd_drain(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(DRAIN_VARIANTS)
    if unknown:
        print(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(DRAIN_VARIANTS)}",
              file=sys.stderr)
        return 2
    header("drain", args, f"concurrency={args.concurrency} "
           f"(sleep: {args.sleep_concurrency} x {args.sleep}s)")
    status = 0
    async with AsyncExitStack() as stack:
        admin = await stack.enter_async_context(QueueAdmin(args.broker))
        client = await connected_client(stack, args.broker)
        quorum_client = await connected_client(stack, args.broker, quorum=True) \
            if "quorum" in variants else None
        backend = None
        if "results" in variants:
            backend = await stack.enter_async_context(claimed_redis_db(args.redis))
        for variant in variants:
            subject, baseline, what = DRAIN_VARIANTS[variant]
            concurrency = args.sleep_concurrency if variant == "sleep" else args.concurrency
            task = "bench.sleep" if variant == "sleep" else "bench.noop"
            params: Params = {"broker": args.broker, "n": args.n,
                              "concurrency": concurrency, "prefetch": 4 * concurrency}
            if variant == "sleep":
                params["sleep"] = args.sleep
            if variant == "results":
                params["backend"] = backend
            if variant == "quorum":
                params["quorum"] = True
            if variant == "events":
                params["events"] = True
            print(f"{variant}: {what}, concurrency {concurrency}, "
                  f"prefetch {4 * concurrency}"
                  + (f", results in {backend}" if variant == "results" else ""),
                  flush=True)

            filler = quorum_client if variant == "quorum" else client

            async def fill(queue: str, task: str = task, filler: Any = filler) -> None:
                await prefill(filler, queue, task, args.n)

            runs = await run_rounds(admin, [subject, baseline], args.rounds, params,
                                    prepare=fill, expect=0, unit="tasks/s",
                                    arguments=QUORUM_ARGUMENTS if variant == "quorum"
                                    else None)
            status |= report(runs, baseline=baseline, subject=subject)
            rss = median([run.peak_rss_mib for run in runs
                           if run.contender == subject and run.problem is None])
            print(f"{subject} peak RSS {rss:.1f} MiB (target <= 40 MiB: "
                  f"{'ok' if rss <= 40 else 'OVER'})\n", flush=True)
    return status


# --- scale -----------------------------------------------------------------------------------

SCALE_PROCESSES = (1, 2)


async def stop_processes(processes: list[asyncio.subprocess.Process], grace: float) -> None:
    """SIGTERM each (warm shutdown), then SIGKILL its process group after ``grace``."""
    for process in processes:
        if process.returncode is None:
            with suppress(ProcessLookupError):
                process.terminate()
    for process in processes:
        with suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), grace)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: it and its children
        await process.wait()


def read_tallies(directory: str) -> list[dict[str, Any]]:
    tallies = []
    for name in os.listdir(directory):
        if name.endswith(".json"):
            with suppress(OSError, ValueError), open(os.path.join(directory, name),
                                                     encoding="utf-8") as data:
                tallies.append(json.load(data))
    return tallies


async def wait_for_consumers(admin: QueueAdmin, queue: str, count: int,
                             processes: list[asyncio.subprocess.Process]) -> None:
    deadline = time.monotonic() + 60
    while True:
        counts = await admin.counts(queue)
        if counts is not None and counts[1] >= count:
            return
        if any(p.returncode is not None for p in processes):
            raise RuntimeError("a process exited before consuming")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{counts and counts[1]} of {count} consumers after 60s")
        await asyncio.sleep(0.05)


async def wait_for_tally(directory: str, n: int,
                         processes: list[asyncio.subprocess.Process]) -> list[dict[str, Any]]:
    timeout = 60 + n / 100
    deadline = time.monotonic() + timeout
    while True:
        tallies = read_tallies(directory)
        done = sum(t["count"] for t in tallies)
        if done >= n:
            return tallies
        if any(p.returncode is not None for p in processes):
            raise RuntimeError(f"a process exited with {done} of {n} tasks done")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s with {done} of {n} tasks done")
        await asyncio.sleep(0.02)


async def scale_run(params: Params, processes: int, ours: bool) -> Stopwatch:
    """No-op tasks/s of K worker processes on a queue the parent pre-filled with N tasks:
    our supervisor (``python -m aio_celery worker -c K --concurrency C``) or K plain aio-pika
    consumer processes (prefetch 4 x C each), all running scripts/bench_tasks.py.

    What is timed, and why it is sound: start-up (fork, imports, connections) must not
    count, and no process may get a head start, so every process holds its first
    deliveries at a *gate* (a file that does not exist yet) until the queue has K consumers;
    then the gate opens and the clock starts. Each process counts the tasks it executes and
    writes its count, the CLOCK_MONOTONIC time of its last execution (one clock for every
    process on the host) and its CPU time since the gate to a file every 20 ms; the run ends
    when the counts add up to N, at the latest last-execution time. (The queue's message
    count alone cannot say when the last prefetched task has run.) Afterwards the processes
    get SIGTERM (warm shutdown) and the counts must still add up to exactly N (no task ran
    twice); the parent then checks that the queue is empty (nothing left unacked: an
    unacked message would be back in the queue once its consumer is gone).
    """
    n, queue = params["n"], params["queue"]
    directory = tempfile.mkdtemp(prefix="aio-celery-bench-scale-")
    env = {**os.environ, "BENCH_BROKER": params["broker"], "BENCH_QUEUE": queue,
           "BENCH_STATS_DIR": directory, "BENCH_PREFETCH": str(4 * params["concurrency"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS),
                                                       os.environ.get("PYTHONPATH")]))}
    if ours:
        commands = [[sys.executable, "-m", "aio_celery", "worker", "-c", str(processes),
                     "--concurrency", str(params["concurrency"]), "-Q", queue,
                     "--loglevel", "WARNING", "--status-file",
                     os.path.join(directory, "status"), "bench_tasks:app"]]
    else:
        commands = [[sys.executable, str(SCRIPTS / "bench_tasks.py"), "plain"]] * processes
    started: list[asyncio.subprocess.Process] = []
    try:
        for number, command in enumerate(commands):
            with open(os.path.join(directory, f"log{number}"), "wb") as log:  # noqa: ASYNC230
                started.append(await asyncio.create_subprocess_exec(
                    *command, env=env, cwd=str(REPO), stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True,
                    preexec_fn=die_with_parent))
        async with QueueAdmin(params["broker"]) as admin:
            await wait_for_consumers(admin, queue, processes, started)
        gate = time.monotonic()
        with open(os.path.join(directory, "go"), "w", encoding="utf-8"):  # noqa: ASYNC230
            pass
        tallies = await wait_for_tally(directory, n, started)
        watch = Stopwatch(max(t["last"] for t in tallies) - gate,
                          sum(t["cpu"] for t in tallies),
                          max(t["peak_rss_mib"] for t in tallies))
        await stop_processes(started, grace=30)
        total = sum(t["count"] for t in read_tallies(directory))
        if total != n:
            raise RuntimeError(f"{total} executions for {n} messages")
        return watch
    except BaseException:
        for number in range(len(commands)):
            path = os.path.join(directory, f"log{number}")
            with suppress(OSError), open(path, errors="replace") as log:  # noqa: ASYNC230
                sys.stderr.write(log.read()[-2000:])
        raise
    finally:
        await stop_processes(started, grace=5)
        shutil.rmtree(directory, ignore_errors=True)


for _k in SCALE_PROCESSES:
    async def _ours(params: Params, processes: int = _k) -> Stopwatch:
        """Our supervisor with ``-c K`` on the pre-filled queue (see above)."""
        return await scale_run(params, processes, ours=True)

    async def _plain(params: Params, processes: int = _k) -> Stopwatch:
        """K plain aio-pika consumer processes on the pre-filled queue (see above)."""
        return await scale_run(params, processes, ours=False)

    measurement(f"scale/aio-celery-c{_k}")(_ours)
    measurement(f"scale/aio-pika-{_k}proc")(_plain)


async def cmd_scale(args: argparse.Namespace) -> int:
    header("scale", args, f"concurrency={args.concurrency} per process")
    params: Params = {"broker": args.broker, "n": args.n, "concurrency": args.concurrency}
    ours = [f"scale/aio-celery-c{k}" for k in SCALE_PROCESSES]
    plain = [f"scale/aio-pika-{k}proc" for k in SCALE_PROCESSES]
    async with AsyncExitStack() as stack:
        admin = await stack.enter_async_context(QueueAdmin(args.broker))
        client = await connected_client(stack, args.broker)

        async def fill(queue: str) -> None:
            await prefill(client, queue, "bench.noop", args.n)

        runs = await run_rounds(admin, [*ours, *plain], args.rounds, params, prepare=fill,
                                expect=0, unit="tasks/s")
    # and side by side at equal process counts: on a host whose cores the broker shares, 2
    # processes may saturate it, so that the more efficient single process gains less
    status = report(runs, baseline=ours[0], subject=ours[1],
                    also=[(plain[1], plain[0]), *zip(ours, plain, strict=True)])
    rates = median_rates(runs)
    gain_ours = rates[ours[1]] / rates[ours[0]]
    gain_plain = rates[plain[1]] / rates[plain[0]]
    ratio = gain_ours / gain_plain
    print(f"gain_ours (c2/c1) {gain_ours:.2f}, gain_plain (2 procs/1 proc) {gain_plain:.2f}, "
          f"gain_ours / gain_plain {ratio:.2f} (target >= 0.9: "
          f"{'ok' if ratio >= 0.9 else 'BELOW'})")
    return status


# --- child side ------------------------------------------------------------------------------


async def child_main(name: str, params: Params) -> None:
    """Run one measurement here and print its JSON report as the last stdout line."""
    # SIGTERM (from the parent, or its death) cancels the measurement: its finally blocks run
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    watch = await MEASUREMENTS[name](params)
    peak = watch.peak_rss_mib if watch.peak_rss_mib is not None else peak_rss_mib()
    print(json.dumps({"seconds": watch.seconds, "cpu_seconds": watch.cpu_seconds,
                      "peak_rss_mib": peak}), flush=True)


# --- command line ----------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "publish": cmd_publish,
    "drain": cmd_drain,
    "scale": cmd_scale,
}


def timeout_arg(text: str) -> float | str | None:
    return None if text.lower() == "none" else "default" if text == "default" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{" + ",".join(COMMANDS) + "}")
    broker = (os.environ.get("AIO_CELERY_BENCH_BROKER")
              or os.environ.get("AIO_CELERY_TEST_BROKER") or DEFAULT_BROKER)

    publish = sub.add_parser(
        "publish", help="publish throughput: add.delay() against plain aio-pika confirms")
    publish.add_argument("--n", type=int, default=50000, help="messages per run (50000)")
    publish.add_argument("--rounds", type=int, default=3, help="runs per contender (3)")
    publish.add_argument("--broker", default=broker, help=f"AMQP URL ({mask(broker)})")
    publish.add_argument(
        "--publish-timeout", type=timeout_arg, default="default", metavar="SECONDS|none",
        help="aio-celery's broker_publish_timeout for the run (default: the library's, which "
             "counts from the call, so it can expire for a large N gathered at once)")
    publish.add_argument(
        "--no-predeclare", dest="predeclare", action="store_false",
        help="leave declaring each run's queue to the client under test, inside the timing "
             "(default: declared beforehand, as the aio-pika side does outside its timing)")

    drain = sub.add_parser(
        "drain", help="drain a pre-filled queue: in-process Worker against a plain aio-pika "
                      "consumer (no-op, with Redis results, asyncio.sleep tasks)")
    drain.add_argument("--n", type=int, default=20000, help="tasks per run (20000)")
    drain.add_argument("--rounds", type=int, default=3, help="runs per contender (3)")
    drain.add_argument("--broker", default=broker, help=f"AMQP URL ({mask(broker)})")
    drain.add_argument("--concurrency", type=int, default=100,
                       help="worker concurrency for no-op tasks; prefetch is 4x (100)")
    drain.add_argument("--variants", default=",".join(DRAIN_VARIANTS),
                       help=f"comma separated, of {', '.join(DRAIN_VARIANTS)} (all)")
    drain.add_argument("--sleep", type=float, default=0.1,
                       help="seconds each task of the sleep variant sleeps (0.1)")
    drain.add_argument("--sleep-concurrency", type=int, default=1000,
                       help="concurrency of the sleep variant (1000)")
    drain.add_argument("--redis", default=DEFAULT_REDIS,
                       help=f"Redis server for the results variant ({DEFAULT_REDIS}): an "
                            "empty database is claimed (the lowest from 1 up, or the /N "
                            "given, which must be empty) and FLUSHED at the end")

    scale = sub.add_parser(
        "scale", help="supervisor -c 1 against -c 2, and 1 against 2 plain consumer processes")
    scale.add_argument("--n", type=int, default=20000, help="tasks per run (20000)")
    scale.add_argument("--rounds", type=int, default=3, help="runs per contender (3)")
    scale.add_argument("--broker", default=broker, help=f"AMQP URL ({mask(broker)})")
    scale.add_argument("--concurrency", type=int, default=100,
                       help="concurrency per process; prefetch is 4x (100)")

    measure = sub.add_parser("_measure")  # internal: one measurement in a child process
    measure.add_argument("name", choices=sorted(MEASUREMENTS))
    measure.add_argument("params", type=json.loads)
    return parser


async def command_main(args: argparse.Namespace) -> int:
    """Run a command; SIGTERM cancels it like Ctrl-C does, so that the measurement child,
    its worker processes and the queues are cleaned up."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        return await COMMANDS[args.command](args)
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "_measure":
        asyncio.run(child_main(args.name, args.params))
        return 0
    return asyncio.run(command_main(args))


if __name__ == "__main__":
    sys.exit(main())
