"""``task_always_eager``, ``task_eager_propagates`` and ``Task.apply``: no broker, no backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from aio_celery import Celery, chain, chord, group, signals, states
from aio_celery.eager import EagerResult
from aio_celery.exceptions import MaxRetriesExceededError, Retry
from aio_celery.task import Task


class Boom(Exception):
    pass


@pytest.fixture
def app() -> Celery:
    # No broker anywhere near: an address nothing listens on, and no result backend.
    app = Celery("eager", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    app.conf.update(task_always_eager=True)
    return app


async def test_delay_runs_inline_and_returns_a_ready_result(app: Celery) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    result = await add.delay(1, 2)
    assert isinstance(result, EagerResult)
    assert result.state == states.SUCCESS
    assert await result.ready() and await result.successful()
    assert await result.get() == 3
    assert result.result == 3


async def test_apply_async_keeps_the_task_id_and_ignores_delivery_options(app: Celery) -> None:
    seen: list[Any] = []

    @app.task(bind=True)
    async def who(self: Task) -> str:
        seen.append((self.request.id, self.request.is_eager, self.request.retries))
        return "me"

    result = await who.apply_async(task_id="fixed-id", countdown=3600, queue="elsewhere",
                                   priority=9, expires=1)
    assert result.id == "fixed-id"
    assert await result.get() == "me"
    assert seen == [("fixed-id", True, 0)]


async def test_failure_is_kept_in_the_result_without_propagation(app: Celery) -> None:
    @app.task
    async def fail() -> None:
        raise Boom("no")

    result = await fail.delay()
    assert result.state == states.FAILURE
    assert await result.failed()
    assert isinstance(result.result, Boom)
    assert result.traceback is not None and "Boom: no" in result.traceback
    with pytest.raises(Boom, match="no"):
        await result.get()
    assert isinstance(await result.get(propagate=False), Boom)


async def test_eager_propagates_raises_from_the_call(app: Celery) -> None:
    app.conf.update(task_eager_propagates=True)

    @app.task
    async def fail() -> None:
        raise Boom("now")

    with pytest.raises(Boom, match="now"):
        await fail.delay()


async def test_retry_runs_again_at_once_with_new_arguments(app: Celery) -> None:
    calls: list[tuple[int, int]] = []

    @app.task(bind=True, default_retry_delay=3600)
    async def flaky(self: Task, n: int) -> int:
        calls.append((n, self.request.retries))
        if self.request.retries < 2:
            await self.retry(args=(n + 10,), countdown=3600)
        return n

    result = await flaky.delay(1)
    assert await result.get() == 21
    assert calls == [(1, 0), (11, 1), (21, 2)]
    assert len({result.id}) == 1


async def test_retry_past_max_retries_fails_with_the_error(app: Celery) -> None:
    @app.task(bind=True, max_retries=1)
    async def always(self: Task) -> None:
        await self.retry()

    result = await always.delay()
    assert isinstance(result.result, MaxRetriesExceededError)
    assert result.state == states.FAILURE


async def test_autoretry_for_retries_eagerly_then_fails(app: Celery) -> None:
    attempts: list[int] = []

    @app.task(bind=True, autoretry_for=(Boom,), max_retries=2, retry_backoff=True)
    async def shaky(self: Task) -> None:
        attempts.append(self.request.retries)
        raise Boom(f"attempt {self.request.retries}")

    result = await shaky.delay()
    assert attempts == [0, 1, 2]
    with pytest.raises(Boom, match="attempt 2"):
        await result.get()


async def test_apply_runs_inline_without_always_eager(app: Celery) -> None:
    app.conf.update(task_always_eager=False)

    @app.task
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task
    async def fail() -> None:
        raise Boom

    result = await mul.apply((6, 7))
    assert await result.get() == 42
    assert (await fail.apply()).state == states.FAILURE
    with pytest.raises(Boom):
        await fail.apply(throw=True)


async def test_send_task_by_name_still_sends(app: Celery) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    # As in Celery: send_task ignores task_always_eager; with no setup() there is no broker.
    with pytest.raises(RuntimeError, match="not connected"):
        await app.send_task(add.name, (1, 2))


async def test_link_and_link_error_run_eagerly(app: Celery) -> None:
    got: list[Any] = []

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def record(value: Any) -> None:
        got.append(value)

    @app.task
    async def fail() -> None:
        raise Boom

    await add.apply_async((1, 2), link=record.s())
    failed = await fail.apply_async(link_error=record.s())
    assert got == [3, failed.id]


async def test_chain_runs_each_step_with_the_previous_value(app: Celery) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    result = await chain(add.s(1, 2), add.s(10), add.s(100)).apply_async()
    assert await result.get() == 113
    assert result.parent is not None and await result.parent.get() == 13
    assert result.parent.parent is not None and await result.parent.parent.get() == 3


async def test_chain_stops_at_a_failed_step(app: Celery) -> None:
    ran: list[int] = []

    @app.task
    async def fail(x: int) -> None:
        raise Boom(str(x))

    @app.task
    async def mark(x: Any) -> None:
        ran.append(x)

    result = await chain(fail.s(1), mark.s()).apply_async()
    assert ran == []
    with pytest.raises(Boom):
        await result.get()


async def test_group_and_chord(app: Celery) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def total(values: list[int]) -> int:
        return sum(values)

    results = await group(add.s(i, i) for i in range(4)).apply_async()
    assert await results.get() == [0, 2, 4, 6]
    body = await chord([add.s(i, 1) for i in range(3)], total.s()).apply_async()
    assert await body.get() == 6


async def test_signals_are_sent(app: Celery) -> None:
    seen: list[str] = []

    def on(name: str) -> Any:
        def receiver(sender: Any = None, **kwargs: Any) -> None:
            seen.append(name)
        return receiver

    hooks = {signal: on(signal.name) for signal in (
        signals.task_prerun, signals.task_postrun, signals.task_success,
        signals.task_failure, signals.task_retry)}
    for signal, receiver in hooks.items():
        signal.connect(receiver)
    try:
        @app.task(bind=True)
        async def once(self: Task) -> int:
            if self.request.retries == 0:
                await self.retry()
            return 1

        await once.delay()
    finally:
        for signal, receiver in hooks.items():
            signal.disconnect(receiver)
    assert seen == ["task_prerun", "task_retry", "task_postrun",
                    "task_prerun", "task_success", "task_postrun"]


async def test_retry_returned_with_throw_false_is_the_outcome(app: Celery) -> None:
    @app.task(bind=True, max_retries=1)
    async def soft(self: Task) -> Any:
        if self.request.retries == 0:
            raise await self.retry(throw=False)
        return "second"

    assert await (await soft.delay()).get() == "second"


async def test_signal_arguments_are_the_workers(app: Celery) -> None:
    got: dict[str, dict[str, Any]] = {}

    def success(sender: Any = None, **kwargs: Any) -> None:
        got["success"] = kwargs

    def failure(sender: Any = None, **kwargs: Any) -> None:
        got["failure"] = kwargs

    signals.task_success.connect(success)
    signals.task_failure.connect(failure)
    try:
        @app.task
        async def ok() -> int:
            return 7

        @app.task
        async def bad(x: int) -> None:
            raise Boom(x)

        done = await ok.delay()
        failed = await bad.delay(5)
    finally:
        signals.task_success.disconnect(success)
        signals.task_failure.disconnect(failure)
    assert got["success"]["result"] == 7 and got["success"]["task_id"] == done.id
    assert got["failure"]["task_id"] == failed.id and got["failure"]["args"] == [5]
    assert isinstance(got["failure"]["exception"], Boom)
    assert "Boom" in got["failure"]["traceback"]


def test_retry_keeps_its_eager_signature() -> None:
    sentinel = object()
    assert Retry(sig=sentinel).sig is sentinel


@pytest.fixture(autouse=True)
def _no_leftover_receivers() -> Iterator[None]:
    before = {s.name: list(s.receivers) for s in (signals.task_prerun, signals.task_success)}
    yield
    assert before == {s.name: list(s.receivers)
                      for s in (signals.task_prerun, signals.task_success)}
