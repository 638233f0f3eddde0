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

The code is in scripts/benchlib/: ``harness`` (measurements, the child process each runs
in, rounds, report), ``queues`` (queue admin, pre-filling), ``publish``, ``drain`` (and
``redis_db`` for its results variant), ``scale`` (with scripts/bench_tasks.py, what its
processes run); this file is the command line. Start it as scripts/bench, which runs it with
the repo's .venv; the measurement children use the same interpreter.

Adding a benchmark: write its measurements as ``@measurement("drain/aio-celery")``
coroutines that take the params dict and return a ``Stopwatch``, then a ``cmd_drain``
that calls ``run_rounds`` and ``report``, and register it in :func:`build_parser`.

The broker is ``--broker``, else $AIO_CELERY_BENCH_BROKER, else $AIO_CELERY_TEST_BROKER,
else amqp://guest:guest@127.0.0.1:5672//.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from benchlib.drain import DRAIN_VARIANTS, cmd_drain
from benchlib.harness import MEASUREMENTS, child_main, mask
from benchlib.publish import cmd_publish
from benchlib.redis_db import DEFAULT_REDIS
from benchlib.scale import cmd_scale

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"

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
