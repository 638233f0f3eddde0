"""The worker runs tasks sent by our client: results, failures, burst drain."""

from __future__ import annotations

import asyncio

from aio_celery import Celery


async def test_worker_runs_tasks_and_stores_results(app: Celery, start_worker) -> None:
    @app.task(name="add")
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        return a + b

    results = [await add.delay(i, i) for i in range(20)]
    handle = await start_worker(concurrency=5, burst=True)
    assert await handle.wait() == 0
    assert [await r.get(timeout=5) for r in results] == [2 * i for i in range(20)]
