"""``scripts/bench scale``: our supervisor with ``-c 1`` against ``-c 2``, and 1 against 2
plain aio-pika consumer processes, all running scripts/bench_tasks.py: does a second process
gain as much for us as for the plain consumer?"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AsyncExitStack, suppress
from typing import TYPE_CHECKING, Any

from .harness import (
    REPO,
    SCRIPTS,
    Params,
    Stopwatch,
    header,
    measurement,
    median_rates,
    report,
    run_rounds,
    spawn_python,
)
from .queues import QueueAdmin, connected_client, prefill

if TYPE_CHECKING:
    import argparse

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
        commands = [["-m", "aio_celery", "worker", "-c", str(processes),
                     "--concurrency", str(params["concurrency"]), "-Q", queue,
                     "--loglevel", "WARNING", "--status-file",
                     os.path.join(directory, "status"), "bench_tasks:app"]]
    else:
        commands = [[str(SCRIPTS / "bench_tasks.py"), "plain"]] * processes
    started: list[asyncio.subprocess.Process] = []
    try:
        for number, command in enumerate(commands):
            with open(os.path.join(directory, f"log{number}"), "wb") as log:  # noqa: ASYNC230
                started.append(await spawn_python(
                    *command, env=env, cwd=str(REPO), stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True))
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
