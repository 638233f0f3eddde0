"""pytest fixtures for testing tasks on ``memory://`` (needs pytest-asyncio).

In your ``conftest.py``::

    pytest_plugins = ["aio_celery.pytest_plugin"]

    @pytest.fixture
    def celery_app():
        from proj.celery import app
        app.conf.update(broker_url="memory://", result_backend="memory://")
        return app

then ``async def test_add(celery_worker): assert await (await add.delay(1, 2)).get() == 3``.

``celery_worker`` runs the app's worker in the test's event loop
(:func:`aio_celery.testing.worker`, concurrency ``celery_worker_concurrency``) and forgets
every memory queue and result after the test. Only this module imports pytest; nothing in
aio_celery imports this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from aio_celery import testing
from aio_celery.app import Celery
from aio_celery.worker import Worker


@pytest.fixture
def celery_app() -> Celery:
    """Override in your conftest: the app under test, on memory://."""
    raise pytest.UsageError("define a `celery_app` fixture that returns your app, configured "
                            "with broker_url='memory://' and result_backend='memory://'")


@pytest.fixture
def celery_worker_concurrency() -> int:
    """Override to run more (or fewer) tasks at once."""
    return 10


@pytest_asyncio.fixture
async def celery_worker(celery_app: Celery,
                        celery_worker_concurrency: int) -> AsyncIterator[Worker]:
    """A real worker for ``celery_app`` running in the test's event loop on memory://."""
    try:
        async with testing.worker(celery_app, concurrency=celery_worker_concurrency) as worker:
            yield worker
    finally:
        testing.reset()
