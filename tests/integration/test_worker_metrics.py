"""A worker's metrics recorder on real deliveries: tasks by outcome, the queue wait of an
eta task, broker reconnects and result-store retries (through TCP proxies the test cuts
and pauses), and the sampled gauges. Per-task counts reach the metrics at the worker's
flush, once a second: the tests wait for them."""

from __future__ import annotations

import asyncio
import datetime
from urllib.parse import urlsplit

import pytest
from helpers import AMQP_URL, eventually
from prometheus_client import CollectorRegistry
from tcp_proxy import TcpProxy

from aio_celery import Celery, exitcodes, states
from aio_celery.metrics import PrometheusRecorder


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_outcomes_queue_wait_and_gauges_of_real_tasks(
        app: Celery, start_worker, registry: CollectorRegistry) -> None:
    release = asyncio.Event()

    @app.task(name="metrics.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="metrics.boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.task(name="metrics.hold")
    async def hold() -> None:
        await release.wait()

    handle = await start_worker(concurrency=2, recorder=PrometheusRecorder(registry))
    results = [await add.delay(i, i) for i in range(5)] + [await boom.delay()]
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
    results.append(await add.apply_async((1, 1), eta=eta))
    await app.send_task("metrics.not-registered", ())
    await eventually(lambda: _value(registry, "aio_celery_tasks_total", task="metrics.add",
                                    outcome="succeeded") == 6, timeout=15,
                     what="six additions counted")
    assert _value(registry, "aio_celery_tasks_total", task="metrics.boom",
                  outcome="failed") == 1
    await eventually(lambda: _value(registry, "aio_celery_tasks_total", task="unknown",
                                    outcome="rejected") == 1, what="the unknown task counted")
    assert _value(registry, "aio_celery_task_runtime_seconds_count", task="metrics.add") == 6
    # the eta task waited from its eta: not the 1.5 s since its delivery
    assert _value(registry, "aio_celery_task_queue_wait_seconds_count", task="metrics.add") == 6
    assert _value(registry, "aio_celery_task_queue_wait_seconds_sum", task="metrics.add") < 1.0

    held = [await hold.delay() for _ in range(3)]
    await eventually(lambda: _value(registry, "aio_celery_tasks_in_flight") == 2
                     and _value(registry, "aio_celery_tasks_prefetched") == 1, timeout=5,
                     what="the sampled gauges show two running, one waiting")
    release.set()
    for result in held:
        assert (await result.get(timeout=10)) is None
    await eventually(lambda: _value(registry, "aio_celery_tasks_in_flight") == 0, timeout=5,
                     what="nothing in flight")
    assert await handle.stop() == exitcodes.OK


@pytest.fixture
def proxied_broker_app(unique_name: str, redis_url: str, proxy: TcpProxy) -> Celery:
    parts = urlsplit(AMQP_URL)
    application = Celery(unique_name + "-via-proxy", set_as_current=False)
    application.conf.update(
        broker_url=proxy.url(parts.username or "guest", parts.password or "guest",
                             parts.path[1:] or "/"),
        result_backend=redis_url, task_default_queue=unique_name,
        broker_connection_timeout=2.0)

    @application.task(name="metrics.add")
    async def add(x: int, y: int) -> int:
        return x + y

    return application


async def test_a_lost_broker_connection_counts_one_reconnect(
        app: Celery, proxied_broker_app: Celery, proxy: TcpProxy, start_worker,
        registry: CollectorRegistry) -> None:
    handle = await start_worker(proxied_broker_app, concurrency=2,
                                recorder=PrometheusRecorder(registry))
    worker = handle.worker
    old_session = worker.session
    assert proxy.cut() >= 1
    await eventually(lambda: worker.session is not old_session and worker.consuming.is_set(),
                     timeout=15, what="the worker reconnected")
    assert _value(registry, "aio_celery_broker_reconnects_total") == 1
    result = await app.send_task("metrics.add", (2, 3))
    assert await result.get(timeout=15) == 5
    await eventually(lambda: _value(registry, "aio_celery_tasks_total", task="metrics.add",
                                    outcome="succeeded") == 1, what="the task counted")
    assert await handle.stop() == exitcodes.OK


async def test_result_store_retries_are_counted_while_redis_is_away(
        unique_name: str, redis_db: int, redis_proxy: TcpProxy, start_worker,
        registry: CollectorRegistry) -> None:
    application = Celery(unique_name + "-redis-proxy", set_as_current=False)
    application.conf.update(
        broker_url=AMQP_URL, task_default_queue=unique_name,
        result_backend=f"redis://127.0.0.1:{redis_proxy.port}/{redis_db}")

    @application.task(name="metrics.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with application.setup():
        result = await add.delay(1, 2)
        await redis_proxy.pause()
        handle = await start_worker(application, concurrency=1, burst=True,
                                    recorder=PrometheusRecorder(registry))
        await eventually(lambda: _value(registry, "aio_celery_result_store_retries_total") >= 2,
                         timeout=10, what="the result store is tried again")
        assert _value(registry, "aio_celery_tasks_total", task="metrics.add",
                      outcome="succeeded") == 0  # not settled while its result waits
        await redis_proxy.resume()
        assert await handle.wait(timeout=20) == exitcodes.OK
        assert (await result.refresh()).state == states.SUCCESS
    assert _value(registry, "aio_celery_tasks_total", task="metrics.add",
                  outcome="succeeded") == 1
