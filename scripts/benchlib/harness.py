"""The harness: measurements registered by name, each run in a fresh interpreter of its own
(the one place a child Python is started), timed in wall-clock and CPU seconds with its peak
RSS, in alternating rounds on fresh queues, reported per run and as medians and ratios.

Parent side: :func:`run_rounds` -> :func:`run_child` (``bench.py _measure NAME PARAMS``)
-> :func:`report`. Child side: :func:`child_main` runs one registered measurement and
prints its JSON report as the last stdout line.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .queues import QUEUE_PREFIX, unique_queue
from .rss import peak_rss_mib

if TYPE_CHECKING:
    import argparse

    from .queues import QueueAdmin

SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent
#: the command line whose hidden ``_measure`` command runs one measurement in a child
ENTRY = SCRIPTS / "bench.py"
CHILD_TIMEOUT = 900.0
WIDTH = 28  # contender names

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


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mask(url: str) -> str:
    from aio_celery.config import mask_url

    return mask_url(url)


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


# --- child processes -------------------------------------------------------------------------


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this process when its parent dies (Linux), so that no
    measurement child or worker outlives an interrupted benchmark."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def spawn_python(*args: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """Start ``python ARGS`` with this interpreter (the repo's .venv, which scripts/bench
    picks), dying with its parent: for measurement children and the scale processes."""
    return await asyncio.create_subprocess_exec(sys.executable, *args,
                                                preexec_fn=die_with_parent, **kwargs)


async def run_child(name: str, params: Params) -> dict[str, Any]:
    """Run measurement ``name`` in a fresh interpreter; return its JSON report."""
    process = await spawn_python(str(ENTRY), "_measure", name, json.dumps(params),
                                 stdout=asyncio.subprocess.PIPE,
                                 stderr=asyncio.subprocess.PIPE)
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


# --- rounds and report -----------------------------------------------------------------------


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
