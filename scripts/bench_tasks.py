"""The subprocess side of ``scripts/bench scale``: a no-op task for our supervisor, and the
plain aio-pika consumer it is compared with (``python scripts/bench_tasks.py plain``).

Both count what they execute in a :class:`Tally` that is written to
``$BENCH_STATS_DIR/<pid>.json`` every 20 ms, and both hold their first deliveries at a
*gate* until ``$BENCH_STATS_DIR/go`` exists, so that the orchestrator can start the clock
once every process is consuming (see scripts/benchlib/scale.py).

Environment: ``BENCH_BROKER`` (AMQP URL), ``BENCH_QUEUE``, ``BENCH_STATS_DIR`` and, for the
plain consumer, ``BENCH_PREFETCH`` and ``BENCH_QOS_GLOBAL=1`` (a channel-wide prefetch limit,
as our worker sets, instead of aio-pika's default per-consumer one; for experiments).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from benchlib.rss import peak_rss_mib

BROKER = os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("BENCH_QUEUE", "aio-celery-bench")
STATS_DIR = os.environ.get("BENCH_STATS_DIR", "")
FLUSH_EVERY = 0.02
GATE_POLL = 0.005


class Tally:
    """Executions in this process: count, the monotonic time of the last one, and the CPU
    time spent since the gate opened (sampled at each flush), flushed to a JSON file."""

    def __init__(self) -> None:
        self.open = False
        self.count = 0
        self.last = 0.0
        self._gate: asyncio.Event | None = None
        self._cpu_at_gate = 0.0
        self._flusher: asyncio.Task[None] | None = None
        self._flushed = -1

    async def wait_gate(self) -> None:
        """Hold the caller until the orchestrator creates the ``go`` file (the first caller
        polls for it; every other one waits on an event)."""
        if self._gate is not None:
            await self._gate.wait()
            return
        self._gate = asyncio.Event()
        go = os.path.join(STATS_DIR, "go")
        while not os.path.exists(go):  # noqa: ASYNC110, ASYNC240 (a 5 ms poll, once)
            await asyncio.sleep(GATE_POLL)
        self._cpu_at_gate = time.process_time()
        self.open = True
        self._flusher = asyncio.create_task(self._flush_loop())
        self._gate.set()

    def record(self) -> None:
        self.count += 1
        self.last = time.monotonic()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self.flush()

    def flush(self) -> None:
        if self.count == self._flushed or not STATS_DIR:
            return
        self._flushed = self.count
        state = {"pid": os.getpid(), "count": self.count, "last": self.last,
                 "cpu": time.process_time() - self._cpu_at_gate, "peak_rss_mib": peak_rss_mib()}
        path = os.path.join(STATS_DIR, f"{os.getpid()}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as out:
            json.dump(state, out)
        os.replace(path + ".tmp", path)

    def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.flush()


tally = Tally()

if __name__ != "__main__":  # the worker's app (the plain consumer does not import aio_celery)
    import contextlib

    from aio_celery import Celery

    app = Celery("bench_tasks", broker=BROKER)
    app.conf.update(task_default_queue=QUEUE)

    @app.task(name="bench.noop")
    async def noop(x: int, y: int) -> None:
        if not tally.open:
            await tally.wait_gate()
        tally.record()

    @app.define_app_context
    @contextlib.asynccontextmanager
    async def _flush_on_exit() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {}
        finally:
            tally.stop()


async def plain_consumer() -> None:
    """A plain aio-pika consumer: json-decode the body, count, ack; until SIGTERM."""
    import aio_pika

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connection = await aio_pika.connect(BROKER)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=int(os.environ.get("BENCH_PREFETCH", "400")),
                              global_=os.environ.get("BENCH_QOS_GLOBAL") == "1")
        queue = await channel.declare_queue(QUEUE, durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            json.loads(message.body)
            if not tally.open:
                await tally.wait_gate()
            await message.ack()
            tally.record()

        await queue.consume(on_message)
        await stop.wait()
    tally.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["plain"]:
        sys.exit("usage: bench_tasks.py plain")
    asyncio.run(plain_consumer())
