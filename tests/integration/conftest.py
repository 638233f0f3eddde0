"""Fixtures for the in-process integration tests: asyncio clients for RabbitMQ and Redis, to
look at queues and stored results from the outside."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
import redis.asyncio
from aio_pika.abc import AbstractChannel, AbstractConnection
from helpers import AMQP_URL, REDIS_HOST_URL

# The real servers: ``_services_up`` fails every test here when one is missing. The asyncio
# ``redis_client`` below replaces the blocking one of that name.
from services import *  # noqa: F403  (fixtures: pytest finds them by name in this module)
from tcp_proxy import TcpProxy


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    """A plain aio-pika connection for looking at queues from the outside."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def channel(amqp: AbstractConnection) -> AbstractChannel:
    """A plain aio-pika channel on :func:`amqp` (closed with the connection)."""
    return await amqp.channel()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client on the run's Redis database (the tests here are all async; the
    other layers have a blocking one of this name, from ``services.py``)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def _proxy_to(url: str, default_port: int) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(url)
    tcp = TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port)
    await tcp.start()
    try:
        yield tcp
    finally:
        await tcp.close()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A :class:`~tcp_proxy.TcpProxy` in front of the test RabbitMQ, to cut or stall."""
    async for tcp in _proxy_to(AMQP_URL, 5672):
        yield tcp


@pytest.fixture
async def redis_proxy() -> AsyncIterator[TcpProxy]:
    """A :class:`~tcp_proxy.TcpProxy` in front of the test Redis (never stop the shared one)."""
    async for tcp in _proxy_to(REDIS_HOST_URL, 6379):
        yield tcp
