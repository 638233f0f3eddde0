"""The demo: start ``aio_celery worker -c 2``, send sample tasks, print their results, stop.

Run it through ``scripts/demo`` (which prepares the virtualenv and the servers).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUEUE = f"aio-celery-demo-{uuid.uuid4().hex[:8]}"
os.environ["AIO_CELERY_DEMO_QUEUE"] = QUEUE
sys.path.insert(0, str(HERE))

from demo_tasks import add, app, fail, flaky, mul, whoami  # noqa: E402

from aio_celery import chain, group  # noqa: E402


def start_worker() -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "aio_celery", "worker", "-c", "2", "--concurrency", "20",
               "-Q", QUEUE, "--shutdown-timeout", "10", "--loglevel", "WARNING",
               "demo_tasks:app"]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.Popen(command, env=env)


async def wait_ready(timeout: float = 30.0) -> None:
    """The worker is ready when both children answer (each names its node)."""
    deadline = time.monotonic() + timeout
    async with app.setup():
        while time.monotonic() < deadline:
            result = await whoami.delay()
            try:
                await result.get(timeout=2)
                return
            except TimeoutError:
                continue
    raise SystemExit("the worker did not come up in time")


async def run_samples() -> None:
    async with app.setup():
        print("\n--- results ---", flush=True)
        sums = await asyncio.gather(*(add.delay(n, n) for n in range(10)))
        print("add(n, n) for n in 0..9:", [await r.get(timeout=10) for r in sums])
        pipeline = await chain(add.s(2, 3), mul.s(10), add.s(1)).apply_async()
        print("chain add(2,3) | mul(10) | add(1):", await pipeline.get(timeout=10))
        parallel = await group(mul.s(i, i) for i in range(5)).apply_async()
        print("group mul(i, i):", await parallel.get(timeout=10))
        later = await add.apply_async((40, 2), countdown=1)
        print("add(40, 2) with countdown=1:", await later.get(timeout=10))
        print("flaky task:", await (await flaky.delay(2)).get(timeout=10))
        failed = await fail.delay("demo failure")
        try:
            await failed.get(timeout=10)
        except ValueError as exc:
            print("fail() raised, as stored by the worker:", repr(exc))
        nodes = await asyncio.gather(*(whoami.delay() for _ in range(8)))
        names = sorted({await r.get(timeout=10) for r in nodes})
        print("tasks ran on:", ", ".join(names))


async def delete_queue() -> None:
    async with app.setup():
        channel = await app.broker.channel()
        await channel.queue_delete(QUEUE)
        await channel.exchange_delete(QUEUE)


def main() -> int:
    worker = start_worker()
    try:
        asyncio.run(wait_ready())
        asyncio.run(run_samples())
    finally:
        print("\n--- stopping the worker (SIGTERM: warm shutdown) ---", flush=True)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
        asyncio.run(delete_queue())
    print(f"worker exited with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
