"""Fixtures of the process tests: supervisors on the test's queue, and the book their tasks
keep in Redis. A test module may set ``APP_SPEC`` (default: ``tests.process.sup_tasks:app``)
for the app its supervisors run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

# The real servers: ``_services_up`` fails every test here when one is missing.
from services import *  # noqa: F403  (fixtures: pytest finds them by name in this module)
from test_supervisor import APP_SPEC, Book, Supervised


@pytest.fixture
def supervise(request: pytest.FixtureRequest, tmp_path: Path, unique_name: str,
              redis_url: str) -> Iterator[Callable[..., Supervised]]:
    """``supervise(*extra_args, processes=2, concurrency=5, ...)``: start a supervisor on the
    test's queue (for the module's ``APP_SPEC``); killed (whole group) at the end."""
    app_spec = getattr(request.module, "APP_SPEC", APP_SPEC)
    started: list[Supervised] = []

    def start(*extra: str, **options: Any) -> Supervised:
        options.setdefault("app_spec", app_spec)
        sup = Supervised(tmp_path, unique_name, redis_url, *extra, **options)
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.kill()


@pytest.fixture
def book(redis_url: str, unique_name: str) -> Iterator[Book]:
    """What the test's tasks recorded in Redis (see ``sup_tasks``)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield Book(client, unique_name)
    finally:
        client.close()
