"""``scripts/bench drain``: a queue pre-filled with N task messages, drained by an in-process
aio-celery ``Worker`` against a plain aio-pika consumer that acks each message, in the
variants of :data:`DRAIN_VARIANTS`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .harness import Params, Stopwatch, header, measurement, median, report, run_rounds
from .queues import QUEUE_PREFIX, QueueAdmin, connected_client, prefill
from .redis_db import claimed_redis_db

if TYPE_CHECKING:
    import argparse

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
              f"unsettled {session and len(session.acks)}", file=sys.stderr)
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
