"""The worker's integration tests, run again on ``memory://``: no RabbitMQ, no Redis.

The test bodies are the ones in ``tests/integration`` (imported here, so pytest runs them
with this module's ``app``); only the transport differs. What memory:// cannot do (other
processes, remote control, Redis keys, a broker outage) stays in the integration suite.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aio_celery import Celery, memory
from aio_celery.memory import MemoryBackend, MemoryPublisher
from aio_celery.worker import Worker, WorkerOptions

# tests/ on sys.path whatever the conftest files do: tests/integration imports as
# ``integration``, and its modules import ``helpers``
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

#: the tests of tests/integration that run here too, by module
MIRRORED = {
    "test_worker_basics": ("test_worker_runs_tasks_and_stores_results",),
    "test_worker_states_retries": (
        "test_retry_state_is_visible_while_the_retry_is_pending",
        "test_started_state_when_tracking_is_on",
        "test_no_started_state_by_default",
        "test_a_task_that_calls_sys_exit_fails_and_the_client_survives_its_result",
        "test_retry_keeps_id_and_counts_retries_until_success",
        "test_max_retries_exceeded_stores_max_retries_exceeded_error",
        "test_max_retries_exceeded_with_exc_stores_that_exception",
        "test_autoretry_for_retries_then_fails_with_the_original_exception",
        "test_autoretry_for_succeeds_after_retries",
        "test_exception_not_in_autoretry_for_fails_at_once",
        "test_request_fields",
        "test_a_retry_keeps_queue_priority_expiry_and_time_limits",
    ),
    "test_worker_canvas_hooks": (
        "test_chain_of_three_steps",
        "test_chain_stops_at_a_failing_step",
        "test_link_callback_gets_the_result",
        "test_link_error_gets_the_failed_task_id",
        "test_signals_receive_the_right_arguments",
        "test_app_context_is_entered_once_per_worker_run",
        "test_failing_receiver_does_not_stop_the_task",
        "test_app_context_failure_is_a_startup_error",
    ),
    "test_worker_consumer_timeout": (
        "test_a_task_running_past_the_max_age_is_warned_about_once",
    ),
    "test_chord": (
        "test_chord_header_then_body_call_form_and_task_id",
        "test_results_follow_the_header_order_not_the_finishing_order",
        "test_group_or_body_is_a_chord_and_link_goes_to_the_body",
        "test_chain_in_the_header_counts_as_its_last_step",
        "test_empty_header_sends_the_body_at_once",
        "test_failing_first_step_of_a_header_chain_fails_the_chord",
        "test_expired_member_fails_the_chord",
    ),
    "test_worker_concurrency_acks": (
        "test_at_most_concurrency_tasks_run_at_once",
        "test_success_state_and_result_document",
    ),
    "test_worker_eta_limits": (
        "test_waiting_eta_task_holds_no_concurrency_slot",
        "test_eta_in_the_past_runs_at_once",
        "test_soft_time_limit_is_raised_inside_the_task",
        "test_uncaught_soft_time_limit_is_a_failure",
        "test_hard_time_limit_cancels_and_worker_carries_on",
        "test_hard_limit_after_an_ignored_soft_limit",
    ),
    "test_worker_rate_limits": (
        "test_a_task_without_a_limit_passes_the_waiting_ones",
        "test_a_rate_changed_at_runtime_reaches_the_waiting_ones",
        "test_worker_disable_rate_limits_ignores_them",
        "test_task_default_rate_limit_applies_to_tasks_without_one",
    ),
}
for _module, _names in MIRRORED.items():
    _tests = importlib.import_module(f"integration.{_module}")
    globals().update({name: getattr(_tests, name) for name in _names})


@pytest.fixture
def unique_name() -> Iterator[str]:
    """A queue name of this test (no broker to clean up: memory.reset() forgets it)."""
    yield f"aio-celery-memory-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def app(unique_name: str) -> AsyncIterator[Celery]:
    application = Celery(unique_name)
    application.conf.update(broker_url="memory://", result_backend="memory://",
                            task_default_queue=unique_name)
    try:
        async with application.setup():
            yield application
    finally:
        memory.reset()


@pytest.fixture(autouse=True)
def _on_memory(app: Celery) -> None:
    """Every test here runs on memory:// (the imported bodies never see a network)."""
    assert isinstance(app.publisher, MemoryPublisher)
    assert isinstance(app.backend, MemoryBackend)


class _Handle:
    """What the integration tests' ``start_worker`` hands back."""

    def __init__(self, worker: Worker, task: asyncio.Task[int]) -> None:
        self.worker = worker
        self.task = task

    async def stop(self, cold: bool = False, timeout: float = 30) -> int:
        self.worker.request_stop(cold=cold)
        return await asyncio.wait_for(self.task, timeout)

    async def wait(self, timeout: float = 30) -> int:
        return await asyncio.wait_for(self.task, timeout)


@pytest.fixture
async def start_worker(app: Celery) -> AsyncIterator[Callable[..., Awaitable[_Handle]]]:
    """The integration suite's fixture of the same name, here so that this module needs
    nothing of the conftest files that may need services."""
    handles: list[_Handle] = []

    async def start(app_: Celery | None = None, **options: Any) -> _Handle:
        options.setdefault("banner", False)
        worker = Worker(app_ or app, WorkerOptions(**options))
        task = asyncio.create_task(worker.run())
        while (worker.consuming is None or not worker.consuming.is_set()
               or worker.session is None):
            if task.done():
                raise RuntimeError(f"worker exited during start-up with {task.result()}")
            await asyncio.sleep(0.01)
        handle = _Handle(worker, task)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        if not handle.task.done():
            await handle.stop(cold=True)
