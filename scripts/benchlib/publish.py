"""``scripts/bench publish``: ``add.delay()`` against plain aio-pika confirms, publishing a
small JSON message and the very wire message aio-celery sends."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .harness import Params, Stopwatch, header, measurement, report, run_rounds, stopwatch
from .queues import QueueAdmin

if TYPE_CHECKING:
    import argparse


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
