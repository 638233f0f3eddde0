"""The pidbox mailbox on the real RabbitMQ: declared as Celery 5.7 declares it, answered
through Celery's own client, taken over after a ``405 RESOURCE_LOCKED``, and declared
again after a lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from celery import Celery as CeleryApp
from helpers import AMQP_URL

from aio_celery import Celery
from aio_celery.amqp.connection import AMQPConnection
from aio_celery.control import wire
from aio_celery.control.mailbox import Mailbox

pytestmark = pytest.mark.interop

DEADLINE = 15.0


class PingNode:
    """Enough of a node for ``ping``."""

    def __init__(self, nodename: str) -> None:
        self.nodename = nodename
        self.app = Celery("mailbox-test")


class Connections:
    """Opens the mailbox's connections and keeps them (to close one under it)."""

    def __init__(self) -> None:
        self.opened: list[AMQPConnection] = []
        self._changed = asyncio.Condition()

    async def __call__(self) -> AMQPConnection:
        connection = AMQPConnection(AMQP_URL, connection_name="mailbox test")
        await connection.connect()
        self.opened.append(connection)
        async with self._changed:
            self._changed.notify_all()
        return connection

    async def reach(self, count: int) -> None:
        """Return once ``count`` connections were opened."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.opened) >= count),
                                   DEADLINE)


@pytest.fixture
async def start_mailbox() -> AsyncIterator[Callable[[str], tuple[Mailbox, Connections]]]:
    running: list[tuple[Mailbox, asyncio.Task[None]]] = []

    def start(nodename: str) -> tuple[Mailbox, Connections]:
        connections = Connections()
        mailbox = Mailbox(PingNode(nodename), connections)  # type: ignore[arg-type]
        running.append((mailbox, asyncio.ensure_future(mailbox.run())))
        return mailbox, connections

    try:
        yield start
    finally:
        for mailbox, task in running:
            task.cancel()
            await asyncio.wait([task])
            await mailbox.close()


async def ping(nodename: str) -> Any:
    app = CeleryApp("mailbox-test-client", broker=AMQP_URL, set_as_current=False)
    try:
        return await asyncio.to_thread(app.control.ping, destination=[nodename], timeout=3.0)
    finally:
        app.close()


async def test_celery_client_pings_the_mailbox(start_mailbox: Any, unique_name: str,
                                               amqp: AbstractConnection) -> None:
    node = f"{unique_name}@host"
    mailbox, _ = start_mailbox(node)
    await asyncio.wait_for(mailbox.consuming.wait(), DEADLINE)
    assert await ping(node) == [{node: {"ok": "pong"}}]
    # Declared as Celery 5.7 does: a passive declare from another connection is refused
    # (exclusive), and the same declaration is refused as locked, not as different
    channel = await amqp.channel()
    with pytest.raises(aiormq.exceptions.ChannelLockedResource):
        await channel.declare_queue(wire.queue_name(node), durable=False, exclusive=True,
                                    auto_delete=True, arguments=wire.QUEUE_ARGUMENTS)


async def test_a_second_mailbox_of_the_same_node_takes_over_when_the_first_goes(
        start_mailbox: Any, unique_name: str) -> None:
    node = f"{unique_name}@host"
    first, _ = start_mailbox(node)
    await asyncio.wait_for(first.consuming.wait(), DEADLINE)
    second, second_connections = start_mailbox(node)
    # 405 RESOURCE_LOCKED: retried, not given up
    await second_connections.reach(2)
    assert not second.consuming.is_set()
    await first.close()
    await asyncio.wait_for(second.consuming.wait(), DEADLINE)
    assert await ping(node) == [{node: {"ok": "pong"}}]


async def test_a_lost_connection_declares_the_mailbox_again(start_mailbox: Any,
                                                            unique_name: str) -> None:
    node = f"{unique_name}@host"
    mailbox, connections = start_mailbox(node)
    await asyncio.wait_for(mailbox.consuming.wait(), DEADLINE)
    await connections.opened[0].close()
    await connections.reach(2)
    await asyncio.wait_for(mailbox.consuming.wait(), DEADLINE)
    assert await ping(node) == [{node: {"ok": "pong"}}]
