#!/usr/bin/env python3
"""Benchmarks: aio-celery against plain aio-pika, on a real RabbitMQ.

    scripts/bench publish [--n 50000] [--rounds 3] [--broker amqp://...]

How it works: every measurement runs in a child process of its own (a clean heap, its own
peak RSS, no warm-up carried over from the other contender), the contenders alternate
round by round (A B, B A, A B, ...), each run gets a fresh queue that is checked and deleted
afterwards, and the report gives every run plus the medians.

Adding a benchmark (``drain``, ``scale``, ...): write its measurements as
``@measurement("drain/aio-celery")`` coroutines that take the params dict and return the
measured seconds, then a ``cmd_drain`` that calls :func:`run_rounds` and :func:`report`,
and register it in :func:`build_parser`.

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
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable, Coroutine, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
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
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
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

    async def declare(self, name: str) -> None:
        """Declare ``name`` as a durable queue with no arguments (how both contenders
        declare it), so that publishing does not depend on the client declaring it first."""
        self.created.add(name)
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(name, durable=True)
        finally:
            await channel.close()

    async def message_count(self, name: str) -> int | None:
        """Ready messages in ``name`` (None when the queue does not exist)."""
        import aio_pika

        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()
        count: int = queue.declaration_result.message_count
        return count

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

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


async def run_child(name: str, params: Params) -> dict[str, Any]:
    """Run measurement ``name`` in a fresh interpreter; return its JSON report."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_measure", name, json.dumps(params),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), CHILD_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        return {"error": f"timed out after {CHILD_TIMEOUT:.0f}s"}
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        return {"error": f"exit {process.returncode}: " + " | ".join(tail[-3:])}
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def run_rounds(admin: QueueAdmin, contenders: list[str], rounds: int,
                     params: Params, *, predeclare: bool = True) -> list[Run]:
    """Run every contender ``rounds`` times, alternating the order (A B, B A, ...), each on
    a fresh queue (declared beforehand with ``predeclare``) that must hold ``params["n"]``
    messages afterwards and is then deleted."""
    runs: list[Run] = []
    for number in range(1, rounds + 1):
        order = contenders if number % 2 else contenders[::-1]
        for contender in order:
            queue = unique_queue(contender.split("/")[-1])
            admin.created.add(queue)
            if predeclare:
                await admin.declare(queue)
            report = await run_child(contender, {**params, "queue": queue})
            run = Run(number, contender, params["n"], report.get("seconds", float("nan")),
                      report.get("cpu_seconds", float("nan")),
                      report.get("peak_rss_mib", float("nan")), report.get("error"))
            if run.problem is None:
                count = await admin.message_count(queue)
                if count != params["n"]:
                    run.problem = f"queue holds {count} messages, expected {params['n']}"
            await admin.delete(queue)
            print_run(run)
            runs.append(run)
    return runs


def print_run(run: Run) -> None:
    line = (f"  round {run.round}  {run.contender:<22} {run.rate:>10,.0f} msgs/s  "
            f"{run.seconds:7.2f} s  cpu {run.cpu_seconds:6.2f} s  "
            f"peak RSS {run.peak_rss_mib:6.1f} MiB")
    if run.problem:
        line += f"  PROBLEM: {run.problem}"
    print(line, flush=True)


def report(runs: list[Run], baseline: str, subject: str) -> int:
    """Print medians per contender and the subject/baseline rate ratio; 1 if any run failed."""
    print("medians:")
    rates: dict[str, float] = {}
    for contender in dict.fromkeys(run.contender for run in runs):
        good = [run for run in runs if run.contender == contender and run.problem is None]
        rates[contender] = median([run.rate for run in good])
        print(f"  {contender:<22} {rates[contender]:>10,.0f} msgs/s  "
              f"cpu {median([run.cpu_seconds for run in good]):6.2f} s  "
              f"peak RSS {median([run.peak_rss_mib for run in good]):6.1f} MiB  "
              f"({len(good)} good runs)")
    ratio = rates.get(subject, float("nan")) / rates.get(baseline, float("nan"))
    print(f"ratio {subject} / {baseline}: {ratio:.2f}")
    return 1 if any(run.problem for run in runs) else 0


def header(title: str, args: argparse.Namespace) -> None:
    from importlib.metadata import version

    print(f"{title}: n={args.n} rounds={args.rounds} broker={mask(args.broker)} "
          f"queues {'declared beforehand' if args.predeclare else 'declared by the clients'}"
          + (f" aio-celery publish timeout {args.publish_timeout}"
             if getattr(args, "publish_timeout", "default") != "default" else ""))
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

    queue = params["queue"]
    connection = await aio_pika.connect(params["broker"])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        with stopwatch() as watch:
            await asyncio.gather(*[
                channel.default_exchange.publish(
                    aio_pika.Message(json.dumps({"task": "bench.add", "args": [n, n]}).encode(),
                                     delivery_mode=2),
                    routing_key=queue)
                for n in range(params["n"])])
    return watch


async def cmd_publish(args: argparse.Namespace) -> int:
    header("publish", args)
    params = {"broker": args.broker, "n": args.n}
    if args.publish_timeout != "default":
        params["publish_timeout"] = args.publish_timeout
    async with QueueAdmin(args.broker) as admin:
        runs = await run_rounds(admin, ["publish/aio-celery", "publish/aio-pika"],
                                args.rounds, params, predeclare=args.predeclare)
    return report(runs, baseline="publish/aio-pika", subject="publish/aio-celery")


# --- child side ------------------------------------------------------------------------------


async def child_main(name: str, params: Params) -> None:
    """Run one measurement here and print its JSON report as the last stdout line."""
    watch = await MEASUREMENTS[name](params)
    print(json.dumps({"seconds": watch.seconds, "cpu_seconds": watch.cpu_seconds,
                      "peak_rss_mib": peak_rss_mib()}), flush=True)


# --- command line ----------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "publish": cmd_publish,
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

    measure = sub.add_parser("_measure")  # internal: one measurement in a child process
    measure.add_argument("name", choices=sorted(MEASUREMENTS))
    measure.add_argument("params", type=json.loads)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "_measure":
        asyncio.run(child_main(args.name, args.params))
        return 0
    return asyncio.run(COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
