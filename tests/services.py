"""The fixtures of the layers that need the real servers (``tests/integration``,
``tests/interop``, ``tests/process``, ``tests/rabbitmq4``): RabbitMQ and Redis, isolated per
run and per test.

A layer opts in with ``from services import *`` in its ``conftest.py``; that brings
``_services_up``, which makes a missing server fail every test of the layer (it never skips).
pytest allows ``pytest_plugins`` only in the root conftest, and that one must stay free of
services so that ``pytest tests/unit`` runs on a laptop without them: so each layer imports
the fixtures (and a run still uses one Redis database, see :class:`_RunDatabase`).

Every test gets its own queue names (``aio-celery-test-<test>-<random>``), deleted after
the test; the whole run uses one otherwise empty Redis database, flushed at the end.
The service URLs (``AIO_CELERY_TEST_BROKER``, ``AIO_CELERY_TEST_REDIS``), rabbitmqctl for the
broker under test (``AIO_CELERY_TEST_RABBITMQCTL``, a command prefix such as
``scripts/rabbitmq4 ctl``; plain ``rabbitmqctl`` by default) and plain helpers are in
``helpers.py`` (``from helpers import ...``).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis
from helpers import AMQP_URL, REDIS_HOST_URL, delete_queues_with_prefix

from aio_celery import Celery

# the fixtures a service layer's ``conftest.py`` takes with ``from services import *``
__all__ = ["_services_up", "amqp_url", "app", "redis_client", "redis_db", "redis_url",
           "start_worker", "unique_name"]


def _port_open(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port),
                                      timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _services_up() -> None:
    missing = [name for name, url, port in (("RabbitMQ", AMQP_URL, 5672),
                                             ("Redis", REDIS_HOST_URL, 6379))
               if not _port_open(url, port)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not reachable: run scripts/services first "
                    "(the tests need real servers and never skip)", pytrace=False)


class _RunDatabase:
    """The run's Redis database, claimed by the first layer that asks and flushed when the
    last one is done. Each layer's conftest imports the fixtures, so each has a session-scoped
    ``redis_db`` of its own; this keeps a whole run on one database (parallel runs share 15)."""

    def __init__(self) -> None:
        self.client: redis.Redis | None = None
        self.db = 0
        self.users = 0

    def claim(self) -> int:
        if self.client is None:
            self.client, self.db = self._claim_empty()
        self.users += 1
        return self.db

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.client is not None:
            client, self.client = self.client, None
            try:
                client.flushdb()
            finally:
                client.close()

    @staticmethod
    def _claim_empty() -> tuple[redis.Redis, int]:
        for db in range(15, 0, -1):
            client = redis.Redis.from_url(f"{REDIS_HOST_URL}/{db}")
            lock = f"aio-celery-test-run-lock-{os.getpid()}"
            if client.dbsize() == 0 and client.set("aio-celery-test-run", lock, nx=True,
                                                   ex=3600):
                return client, db
            client.close()
        pytest.fail("no empty Redis database (1-15) for the test run", pytrace=False)


_run_database = _RunDatabase()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """An empty Redis database number for this run (highest free one first)."""
    db = _run_database.claim()
    try:
        yield db
    finally:
        _run_database.release()


@pytest.fixture
def redis_url(redis_db: int) -> str:
    return f"{REDIS_HOST_URL}/{redis_db}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A blocking client on the run's Redis database (``tests/integration`` has an asyncio one
    of the same name instead)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A queue name unique to this test; queues named with it as prefix are deleted after."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40].strip("-")
    name = f"aio-celery-test-{slug}-{uuid.uuid4().hex[:8]}"
    yield name
    delete_queues_with_prefix(name)


@pytest.fixture
async def app(unique_name: str, amqp_url: str, redis_url: str) -> AsyncIterator[Celery]:
    """A connected app whose default queue is unique to the test."""
    application = Celery(unique_name)
    application.conf.update(broker_url=amqp_url, result_backend=redis_url,
                            task_default_queue=unique_name)
    async with application.setup():
        yield application


class WorkerHandle:
    """An in-process worker started by the ``start_worker`` fixture."""

    def __init__(self, worker: object, task: asyncio.Task[int]) -> None:
        self.worker = worker
        self.task = task

    async def stop(self, cold: bool = False, timeout: float = 30) -> int:
        self.worker.request_stop(cold=cold)  # type: ignore[attr-defined]
        return await asyncio.wait_for(self.task, timeout)

    async def wait(self, timeout: float = 30) -> int:
        """Wait for a burst-mode worker to drain and exit."""
        return await asyncio.wait_for(self.task, timeout)


@pytest.fixture
async def start_worker(app: Celery) -> AsyncIterator[Callable[..., Awaitable[WorkerHandle]]]:
    """``handle = await start_worker(concurrency=10, burst=True, ...)``: run a Worker for the
    test's app on this event loop (``recorder=``: its metrics recorder); it is ready
    (consumers attached) when this returns."""
    from aio_celery.worker import Worker, WorkerOptions

    handles: list[WorkerHandle] = []

    async def start(app_: Celery | None = None, **options: object) -> WorkerHandle:
        options.setdefault("banner", False)
        recorder = options.pop("recorder", None)  # aio_celery.metrics
        worker = Worker(app_ or app, WorkerOptions(**options),  # type: ignore[arg-type]
                        recorder=recorder)  # type: ignore[arg-type]
        task = asyncio.create_task(worker.run())
        # ``consuming`` is set right before basic.consume (the supervisor's heartbeat must
        # see "ready" before a first task can block the loop), a moment before the session
        # is the worker's: tests use both.
        while (worker.consuming is None or not worker.consuming.is_set()
               or worker.session is None):
            if task.done():
                raise RuntimeError(f"worker exited during start-up with {task.result()}")
            await asyncio.sleep(0.01)
        handle = WorkerHandle(worker, task)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        if not handle.task.done():
            await handle.stop(cold=True)
