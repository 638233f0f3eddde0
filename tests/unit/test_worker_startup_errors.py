"""``python -m aio_celery worker`` as a real process, where it stops before any server: an app
that cannot be loaded, and ``--help``. The same errors once a server is involved (a wrong
broker password), signals and shutdown: ``tests/process/test_worker_process.py``."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import WorkerProcess

from aio_celery import exitcodes

# The same exit codes and messages with the supervisor (the default) and with -P solo.
POOLS = pytest.mark.parametrize("pool", ["processes", "solo"])


@POOLS
def test_missing_module_is_an_app_load_error(pool: str,
                                             spawn: Callable[..., WorkerProcess]) -> None:
    worker = spawn("worker", "-P", pool, "nosuchmodule_aio_celery_test:app")
    assert worker.wait(30) == exitcodes.APP_LOAD_ERROR, worker.diagnostics()
    assert "not found" in worker.stderr
    assert "nosuchmodule_aio_celery_test" in worker.stderr


@POOLS
def test_module_failing_to_import_is_an_app_load_error(
        pool: str, spawn: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    module = f"broken_tasks_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{module}.py").write_text(
        "from aio_celery import Celery\n"
        "app = Celery('broken')\n"
        "raise RuntimeError('boom while importing the tasks 4711')\n", encoding="utf-8")
    worker = spawn("worker", "-P", pool, f"{module}:app", env={"PYTHONPATH": str(code_dir)})
    assert worker.wait(30) == exitcodes.APP_LOAD_ERROR, worker.diagnostics()
    err = worker.stderr
    assert "failed to import" in err, err
    assert "RuntimeError: boom while importing the tasks 4711" in err, err
    assert "not found" not in err, err


def test_help_lists_the_options(spawn: Callable[..., WorkerProcess]) -> None:
    worker = spawn("worker", "--help")
    assert worker.wait(30) == exitcodes.OK, worker.diagnostics()
    text = worker.stdout
    for option in ("--concurrency", "-Q", "--queues", "--pool", "--processes", "--loglevel",
                   "--burst", "--shutdown-timeout", "--eta-horizon", "--prefetch-multiplier",
                   "--max-tasks-per-child", "--max-memory-per-child", "APP"):
        assert option in text, (option, text)
