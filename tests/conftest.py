"""What every test layer needs, and nothing that needs a server.

The layers (see DEVELOPERS.md):

* ``tests/unit``: no RabbitMQ, no Redis. Pure functions, golden messages, fakes (a fake broker
  on a local socket), subprocesses that need no server. ``pytest tests/unit`` passes on a
  laptop with neither; ``scripts/test`` runs it with both pointed at closed ports.
* ``tests/integration``, ``tests/interop``, ``tests/process``, ``tests/rabbitmq4`` (a
  RabbitMQ 4.x node of its own): the real servers. Their
  ``conftest.py`` imports the fixtures of ``services.py``, whose ``_services_up`` fails every
  test there when a server is missing (never a skip).

Being the root conftest, this file puts ``tests/`` on ``sys.path`` so that test files import
``helpers``, ``services`` and ``tcp_proxy`` by name. Its fixtures are those any layer may use
that need no server; it must import neither ``redis`` nor anything that reaches a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import WorkerProcess


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn(*args, env={...})``: start ``python -m aio_celery *args``; killed at the end."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(list(args), tmp_path, env or {})
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.kill()
