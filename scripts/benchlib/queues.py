"""Queue admin for the orchestrator: unique names, declare, count and delete the bench
queues, and pre-fill them with task messages through aio-celery's client.

Nothing here is timed: it runs in the parent, outside the measurement children.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from contextlib import AsyncExitStack
from typing import Any

QUEUE_PREFIX = "aio-celery-bench"


def unique_queue(kind: str) -> str:
    return f"{QUEUE_PREFIX}-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
