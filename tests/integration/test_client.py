"""The client side against real RabbitMQ and Redis: what is published where, and results."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiormq
import pytest
import redis.asyncio
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from helpers import eventually

from aio_celery import AsyncResult, Celery, chain, exceptions, group, resultmeta, states
from aio_celery.exceptions import BackendConnectionError, BrokerConnectionError
from aio_celery.result import result_tuple

# --- helpers ------------------------------------------------------------------------------


async def read_messages(channel: AbstractChannel, queue_name: str, count: int,
                        arguments: dict[str, Any] | None = None,
                        timeout: float = 5.0) -> list[AbstractIncomingMessage]:
    """Take exactly ``count`` messages off the queue (declared as Celery does), then check
    that nothing else is in it."""
    queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
    messages: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            messages.append(message)
            continue
        assert time.monotonic() < deadline, (
            f"only {len(messages)} of {count} messages arrived in {queue_name}")
        await asyncio.sleep(0.02)
    assert await queue.get(no_ack=True, fail=False) is None, f"more messages in {queue_name}"
    return messages


async def read_one(channel: AbstractChannel, queue_name: str,
                   arguments: dict[str, Any] | None = None) -> AbstractIncomingMessage:
    (message,) = await read_messages(channel, queue_name, 1, arguments)
    return message


def body_of(message: AbstractIncomingMessage) -> list[Any]:
    return json.loads(message.body)  # type: ignore[no-any-return]


def parse(value: Any) -> datetime:
    assert isinstance(value, str)
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel whatever a failed test left waiting, so it does not leak into teardown."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def subscriber_count(client: redis.asyncio.Redis, channel_name: str) -> int:
    counts = dict(await client.pubsub_numsub(channel_name))
    return int(counts.get(channel_name.encode(), 0))


def new_app(name: str, amqp_url: str, redis_url: str, **settings: Any) -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(broker_url=amqp_url, result_backend=redis_url, task_default_queue=name,
                    **settings)
    return app


# --- publishing ---------------------------------------------------------------------------


async def test_delay_publishes_a_protocol_v2_message(app: Celery, unique_name: str,
                                                     channel: AbstractChannel) -> None:
    @app.task(name="proj.add")
    async def add(x: int, y: int) -> int:
        return x + y

    result = await add.delay(1, y=2)
    assert isinstance(result, AsyncResult)

    message = await read_one(channel, unique_name)
    headers = message.headers
    assert headers["lang"] == "py"
    assert headers["task"] == "proj.add"
    assert headers["id"] == result.id
    assert headers["root_id"] == result.id
    assert headers["parent_id"] is None
    assert headers["retries"] == 0
    assert headers["eta"] is None
    assert headers["expires"] is None
    assert headers["group"] is None
    assert headers["timelimit"] == [None, None]
    assert headers["argsrepr"] == "(1,)"
    assert headers["kwargsrepr"] == "{'y': 2}"
    assert str(headers["origin"]).startswith("gen")
    assert message.correlation_id == result.id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.content_encoding == "utf-8"
    assert message.reply_to == app.oid
    assert message.priority in (None, 0)
    assert message.expiration is None
    assert body_of(message) == [[1], {"y": 2},
                                {"callbacks": None, "errbacks": None, "chain": None,
                                 "chord": None}]


async def test_apply_async_options_reach_the_message(app: Celery, unique_name: str,
                                                     channel: AbstractChannel) -> None:
    @app.task(name="proj.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    task_id = str(uuid.uuid4())
    before = datetime.now(UTC)
    result = await mul.apply_async((2, 3), {}, countdown=30, expires=60, priority=7,
                                   task_id=task_id, soft_time_limit=5, time_limit=10,
                                   headers={"x-custom": "yes"})
    after = datetime.now(UTC)
    assert result.id == task_id

    message = await read_one(channel, unique_name)
    headers = message.headers
    assert headers["id"] == task_id
    assert headers["root_id"] == task_id
    assert headers["retries"] == 0
    assert before + timedelta(seconds=30) <= parse(headers["eta"]) <= after + timedelta(seconds=30)
    assert before + timedelta(seconds=60) <= parse(headers["expires"]) <= (
        after + timedelta(seconds=60))
    assert headers["timelimit"] == [10, 5]  # Celery writes [hard, soft]
    assert headers["x-custom"] == "yes"
    assert message.priority == 7
    assert message.correlation_id == task_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    # AMQP expiration mirrors `expires` (aio-pika reports it in seconds)
    assert message.expiration is not None
    assert 50 < float(message.expiration) <= 60
    assert body_of(message)[:2] == [[2, 3], {}]


async def test_eta_and_absolute_expires(app: Celery, unique_name: str,
                                        channel: AbstractChannel) -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    expires = datetime(2030, 1, 3, tzinfo=UTC)
    await app.send_task("proj.later", eta=eta, expires=expires, retries=2)
    headers = (await read_one(channel, unique_name)).headers
    assert parse(headers["eta"]) == eta
    assert parse(headers["expires"]) == expires
    assert headers["retries"] == 2


async def test_send_task_by_name(app: Celery, unique_name: str,
                                 channel: AbstractChannel) -> None:
    result = await app.send_task("remote.only.task", args=[1, "two"], kwargs={"k": [3]},
                                 priority=2)
    assert result.id
    message = await read_one(channel, unique_name)
    assert message.headers["task"] == "remote.only.task"
    assert message.headers["id"] == result.id
    assert message.priority == 2
    assert body_of(message)[:2] == [[1, "two"], {"k": [3]}]


async def test_concurrent_first_sends_to_a_new_queue_all_arrive(
        app: Celery, unique_name: str, channel: AbstractChannel) -> None:
    """Sends that race the queue's first declaration must wait for it, not be dropped as
    unroutable."""
    results = await asyncio.gather(*(app.send_task("proj.burst", args=[n]) for n in range(10)))
    messages = await read_messages(channel, unique_name, 10)
    assert {m.headers["id"] for m in messages} == {r.id for r in results}


async def test_tagged_arguments_travel_as_kombu_json(app: Celery, unique_name: str,
                                                     channel: AbstractChannel) -> None:
    when = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    await app.send_task("proj.dated", args=[when], kwargs={"raw": b"\xff"})
    args, kwargs, _ = body_of(await read_one(channel, unique_name))
    assert args == [{"__type__": "datetime", "__value__": when.isoformat()}]
    assert kwargs == {"raw": {"__type__": "base64", "__value__": "/w=="}}


async def test_queue_routing_precedence(app: Celery, unique_name: str,
                                        channel: AbstractChannel) -> None:
    explicit, option, routed = f"{unique_name}-a", f"{unique_name}-b", f"{unique_name}-c"
    app.conf.update(task_routes={"proj.routed.*": {"queue": routed}})

    @app.task(name="proj.routed.with_option", queue=option)
    async def with_option() -> None:
        return None

    @app.task(name="proj.routed.plain")
    async def plain() -> None:
        return None

    @app.task(name="proj.unrouted")
    async def unrouted() -> None:
        return None

    # explicit queue= beats the task's queue option and task_routes
    r_explicit = await with_option.apply_async(queue=explicit)
    # the task's queue option beats task_routes
    r_option = await with_option.delay()
    # task_routes beats task_default_queue
    r_routed = await plain.delay()
    r_routed_by_name = await app.send_task("proj.routed.unregistered")
    # nothing else: task_default_queue
    r_default = await unrouted.delay()
    # explicit queue= also beats task_routes for a task without a queue option
    r_explicit_2 = await plain.apply_async(queue=explicit)

    ids_in = {}
    for queue_name, count in ((explicit, 2), (option, 1), (routed, 2), (unique_name, 1)):
        ids_in[queue_name] = {m.headers["id"] for m in
                              await read_messages(channel, queue_name, count)}
    assert ids_in[explicit] == {r_explicit.id, r_explicit_2.id}
    assert ids_in[option] == {r_option.id}
    assert ids_in[routed] == {r_routed.id, r_routed_by_name.id}
    assert ids_in[unique_name] == {r_default.id}


async def test_callable_router(app: Celery, unique_name: str, channel: AbstractChannel) -> None:
    seen: list[tuple[str, list[Any]]] = []

    def router(name: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any],
               task: Any = None, **kw: Any) -> dict[str, str] | None:
        seen.append((name, args))
        return {"queue": f"{unique_name}-high"} if kwargs.get("urgent") else None

    app.conf.update(task_routes=[router, {"proj.*": f"{unique_name}-low"}])
    urgent = await app.send_task("proj.job", args=[1], kwargs={"urgent": True})
    normal = await app.send_task("proj.job", args=[2])
    assert (await read_one(channel, f"{unique_name}-high")).headers["id"] == urgent.id
    assert (await read_one(channel, f"{unique_name}-low")).headers["id"] == normal.id
    assert seen == [("proj.job", [1]), ("proj.job", [2])]


async def test_max_priority_matches_a_celery_declaration(
        unique_name: str, amqp_url: str, redis_url: str, channel: AbstractChannel) -> None:
    app = new_app(unique_name, amqp_url, redis_url, task_queue_max_priority=10)
    async with app.setup():
        result = await app.send_task("proj.prio", priority=9)
    # Celery with task_queue_max_priority=10 declares the same queue like this; it must not
    # meet PRECONDITION_FAILED (inequivalent arg 'x-max-priority').
    message = await read_one(channel, unique_name, arguments={"x-max-priority": 10})
    assert message.headers["id"] == result.id
    assert message.priority == 9


async def test_without_max_priority_the_queue_has_no_priority_argument(
        app: Celery, unique_name: str, amqp_url: str) -> None:
    """The control for the test above: declarations really are compared by RabbitMQ."""
    other = f"{unique_name}-other"
    await app.send_task("proj.plain", queue=other)
    connection = await aio_pika.connect(amqp_url)
    try:
        probe = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await probe.declare_queue(other, durable=True, arguments={"x-max-priority": 10})
        # without the argument the declaration matches
        plain = await connection.channel()
        queue = await plain.declare_queue(other, durable=True)
        assert queue.declaration_result.message_count == 1
    finally:
        await connection.close()


async def test_unserializable_argument_is_refused_before_sending(
        app: Celery, unique_name: str, channel: AbstractChannel) -> None:
    @app.task(name="proj.takes_anything")
    async def takes_anything(value: Any) -> None:
        return None

    with pytest.raises(TypeError, match=r"proj\.takes_anything"):
        await takes_anything.delay(object())
    with pytest.raises(TypeError, match=r"proj\.takes_anything"):
        await takes_anything.apply_async(kwargs={"value": {1, 2}})
    with pytest.raises(TypeError, match=r"proj\.by_name"):
        await app.send_task("proj.by_name", args=[object()])
    # nothing went out: the only message in the queue is the one sent next
    marker = await takes_anything.delay("fine")
    message = await read_one(channel, unique_name)
    assert message.headers["id"] == marker.id


async def test_unknown_apply_async_option_is_type_error(
        app: Celery, unique_name: str, channel: AbstractChannel) -> None:
    @app.task(name="proj.opt")
    async def opt() -> None:
        return None

    with pytest.raises(TypeError, match="countdwn"):
        await opt.apply_async(countdwn=5)
    with pytest.raises(TypeError, match="bogus"):
        await app.send_task("proj.opt", bogus=1)
    # Celery options that mean nothing here are accepted
    marker = await opt.apply_async(serializer="json", retry=True, exchange="", routing_key="x")
    assert (await read_one(channel, unique_name)).headers["id"] == marker.id


async def test_broker_down_raises_broker_connection_error_quickly(
        unique_name: str, redis_url: str) -> None:
    url = "amqp://guest:secret@127.0.0.1:1//"
    app = new_app(unique_name, url, redis_url)
    start = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        async with app.setup():
            pytest.fail("setup must not succeed without a broker")
    elapsed = time.monotonic() - start
    assert elapsed < 10
    assert isinstance(info.value, ConnectionError)
    text = str(info.value)
    assert "amqp://guest:***@127.0.0.1:1//" in text
    assert "secret" not in text


async def test_sending_without_setup_is_a_clear_error(unique_name: str, amqp_url: str,
                                                      redis_url: str) -> None:
    app = new_app(unique_name, amqp_url, redis_url)
    with pytest.raises(RuntimeError, match="setup"):
        await app.send_task("proj.nowhere")


# --- canvas -------------------------------------------------------------------------------


async def test_group_sets_group_id_and_index(app: Celery, unique_name: str,
                                             channel: AbstractChannel) -> None:
    @app.task(name="proj.g")
    async def g(x: int) -> int:
        return x

    group_result = await group(g.s(0), g.s(1), g.s(2), app=app).apply_async()
    assert len(group_result) == 3
    messages = await read_messages(channel, unique_name, 3)
    by_id = {m.headers["id"]: m for m in messages}
    assert set(by_id) == {r.id for r in group_result.results}
    for index, result in enumerate(group_result.results):
        message = by_id[result.id]
        assert message.headers["group"] == group_result.id
        assert message.headers["group_index"] == index
        assert body_of(message)[0] == [index]


async def test_chain_sends_one_message_with_the_rest_last_first(
        app: Celery, unique_name: str, channel: AbstractChannel) -> None:
    @app.task(name="proj.step")
    async def step(x: int, y: int = 0) -> int:
        return x + y

    last = await chain(step.s(1, 1), step.s(10), step.si(100)).apply_async()

    message = await read_one(channel, unique_name)
    first_id = message.headers["id"]
    args, _, embed = body_of(message)
    assert message.headers["task"] == "proj.step"
    assert args == [1, 1]
    stack = embed["chain"]
    assert [s["args"] for s in stack] == [[100], [10]]  # the LAST step first
    assert [s["immutable"] for s in stack] == [True, False]
    assert all(s["task"] == "proj.step" for s in stack)

    # the returned result is the last step's; its parents link back to the sent message
    assert last.id == stack[0]["options"]["task_id"]
    assert last.parent is not None
    assert last.parent.id == stack[1]["options"]["task_id"]
    assert last.parent.parent is not None
    assert last.parent.parent.id == first_id
    assert last.parent.parent.parent is None
    assert len({last.id, last.parent.id, first_id}) == 3


# --- results ------------------------------------------------------------------------------


def meta(task_id: str, state: str, result: Any, app: Celery, **extra: Any) -> dict[str, Any]:
    return resultmeta.build_meta(task_id, state, result, now=app.now(), **extra)


async def test_get_result_stored_before(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    await app.backend.store(meta(task_id, states.SUCCESS, {"answer": 42}, app))
    result = app.AsyncResult(task_id)
    assert await result.get(timeout=5) == {"answer": 42}
    assert result.state == states.SUCCESS
    assert result.status == states.SUCCESS
    assert result.result == {"answer": 42}


async def test_store_if_status_writes_only_over_the_statuses_given(app: Celery) -> None:
    waiting, started, done = (str(uuid.uuid4()) for _ in range(3))
    await app.backend.store(meta(waiting, states.RETRY, None, app))
    await app.backend.store(meta(started, states.STARTED, None, app))
    await app.backend.store(meta(done, states.REVOKED, None, app))
    allowed = (states.PENDING, states.RECEIVED, states.RETRY)
    fresh = str(uuid.uuid4())
    results = [await app.backend.store_if_status(meta(task_id, states.REVOKED, "x", app),
                                                 allowed)
               for task_id in (fresh, waiting, started, done)]
    assert results == [True, True, False, False]
    assert [(await app.backend.get_meta(task_id) or {}).get("status")
            for task_id in (fresh, waiting, started, done)] == \
        [states.REVOKED, states.REVOKED, states.STARTED, states.REVOKED]
    assert (await app.backend.get_meta(done) or {}).get("result") is None


async def test_get_of_a_sent_task(app: Celery) -> None:
    sent = await app.send_task("proj.remote", args=[1])
    await app.backend.store(meta(sent.id, states.SUCCESS, [1, 2], app))
    assert await sent.get(timeout=5) == [1, 2]


async def test_get_wakes_up_on_publish(app: Celery, redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    channel_name = resultmeta.result_key(task_id)
    waiting = asyncio.create_task(app.AsyncResult(task_id).get(timeout=10))
    try:
        async def subscribed() -> bool:
            return await subscriber_count(redis_client, channel_name) == 1

        async def unsubscribed() -> bool:
            return await subscriber_count(redis_client, channel_name) == 0

        await eventually(subscribed, what="get() to subscribe")
        # a short delay so that get() is past its first read: the result must come by pub/sub
        await asyncio.sleep(0.2)
        assert not waiting.done()

        async def store_later() -> None:
            await app.backend.store(meta(task_id, states.SUCCESS, "late", app))

        stored_at = time.monotonic()
        await asyncio.create_task(store_later())
        assert await asyncio.wait_for(asyncio.shield(waiting), timeout=3) == "late"
        assert time.monotonic() - stored_at < 3
        await eventually(unsubscribed, what="get() to unsubscribe")
    finally:
        await cancel(waiting)


async def test_unready_states_do_not_wake_get(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    await app.backend.store(meta(task_id, states.STARTED, None, app))
    result = app.AsyncResult(task_id)
    waiting = asyncio.create_task(result.get(timeout=10))
    try:
        await app.backend.store(meta(task_id, "PROGRESS", {"done": 50}, app))
        await app.backend.store(meta(task_id, states.SUCCESS, "done", app))
        assert await asyncio.wait_for(asyncio.shield(waiting), timeout=5) == "done"
    finally:
        await cancel(waiting)


async def test_many_concurrent_gets_share_one_subscriber(
        app: Celery, redis_db: int, redis_client: redis.asyncio.Redis) -> None:
    ids = [str(uuid.uuid4()) for _ in range(25)]
    channels = [resultmeta.result_key(i) for i in ids]
    waiters = [asyncio.create_task(app.AsyncResult(i).get(timeout=15)) for i in ids]
    try:
        async def all_subscribed() -> bool:
            counts = dict(await redis_client.pubsub_numsub(*channels))
            return all(counts.get(c.encode()) == 1 for c in channels)

        await eventually(all_subscribed, what="every get() to subscribe")
        clients = await redis_client.client_list()
        subscribers = [c for c in clients
                       if int(c.get("sub", 0)) > 0 and int(c["db"]) == redis_db]
        assert len(subscribers) == 1, f"{len(subscribers)} pub/sub connections"
        assert int(subscribers[0]["sub"]) == len(ids)

        await asyncio.gather(*(app.backend.store(meta(i, states.SUCCESS, n, app))
                               for n, i in enumerate(ids)))
        done, _ = await asyncio.wait(waiters, timeout=10)
        assert len(done) == len(ids), f"only {len(done)} of {len(ids)} get()s returned"
        assert [w.result() for w in waiters] == list(range(len(ids)))
    finally:
        await cancel(*waiters)


async def test_many_concurrent_gets_all_return(app: Celery) -> None:
    """Without looking at Redis: every one of many simultaneous waiters gets its result."""
    ids = [str(uuid.uuid4()) for _ in range(10)]
    waiters = [asyncio.create_task(app.AsyncResult(i).get(timeout=15)) for i in ids]
    try:
        await asyncio.sleep(0.3)  # a short delay: every get() is waiting on pub/sub
        for n, task_id in enumerate(ids):
            await app.backend.store(meta(task_id, states.SUCCESS, n, app))
        done, _ = await asyncio.wait(waiters, timeout=10)
        assert len(done) == len(ids), f"only {len(done)} of {len(ids)} get()s returned"
        assert [w.result() for w in waiters] == list(range(len(ids)))
    finally:
        await cancel(*waiters)


async def test_same_id_awaited_twice(app: Celery, redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    channel_name = resultmeta.result_key(task_id)
    first = asyncio.create_task(app.AsyncResult(task_id).get(timeout=10))
    second = asyncio.create_task(app.AsyncResult(task_id).get(timeout=10))
    try:
        async def subscribed() -> bool:
            return await subscriber_count(redis_client, channel_name) == 1

        await eventually(subscribed, what="get() to subscribe")
        await app.backend.store(meta(task_id, states.SUCCESS, "both", app))
        done, _ = await asyncio.wait([first, second], timeout=5)
        assert len(done) == 2
        assert [first.result(), second.result()] == ["both", "both"]
    finally:
        await cancel(first, second)


async def test_get_timeout(app: Celery) -> None:
    result = app.AsyncResult(str(uuid.uuid4()))
    start = time.monotonic()
    with pytest.raises(exceptions.TimeoutError) as info:
        await result.get(timeout=0.3)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, TimeoutError)
    assert 0.25 <= elapsed < 3
    assert result.id in str(info.value)
    assert result.state == states.PENDING


async def test_get_timeout_catchable_as_builtin(app: Celery) -> None:
    with pytest.raises(TimeoutError):
        await app.AsyncResult(str(uuid.uuid4())).get(timeout=0.1)


class CustomFailure(Exception):
    pass


async def test_failure_propagates_the_rebuilt_exception(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    traceback = 'Traceback (most recent call last):\n  File "x"\nValueError: bad'
    await app.backend.store(meta(task_id, states.FAILURE,
                                 resultmeta.exception_to_dict(ValueError("bad", 2)), app,
                                 traceback=traceback))
    result = app.AsyncResult(task_id)
    with pytest.raises(ValueError) as info:
        await result.get(timeout=5)
    assert info.value.args == ("bad", 2)
    returned = await result.get(propagate=False)
    assert type(returned) is ValueError
    assert returned.args == ("bad", 2)
    assert result.state == states.FAILURE
    assert await result.failed() is True
    assert await result.successful() is False
    assert await result.ready() is True
    assert result.traceback == traceback
    assert isinstance(result.result, ValueError)


async def test_custom_and_unknown_failures(app: Celery) -> None:
    custom_id, unknown_id = str(uuid.uuid4()), str(uuid.uuid4())
    await app.backend.store(meta(custom_id, states.FAILURE,
                                 resultmeta.exception_to_dict(CustomFailure("mine")), app))
    await app.backend.store(meta(unknown_id, states.FAILURE,
                                 {"exc_type": "DatabaseGone", "exc_message": ["db down"],
                                  "exc_module": "their_project.errors"}, app))
    with pytest.raises(CustomFailure, match="mine"):
        await app.AsyncResult(custom_id).get(timeout=5)
    with pytest.raises(exceptions.RemoteTaskError) as info:
        await app.AsyncResult(unknown_id).get(timeout=5)
    assert info.value.exc_type == "DatabaseGone"
    assert "db down" in str(info.value)


async def test_revoked_propagates(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    await app.backend.store(meta(task_id, states.REVOKED,
                                 resultmeta.exception_to_dict(
                                     exceptions.TaskRevokedError("expired")), app))
    with pytest.raises(exceptions.TaskRevokedError):
        await app.AsyncResult(task_id).get(timeout=5)


async def test_states_and_reads(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    result = app.AsyncResult(task_id)
    assert result.state == states.PENDING
    assert await result.ready() is False
    assert await result.successful() is False
    assert await result.failed() is False
    assert result.result is None
    assert result.date_done is None
    assert result.children == []
    assert result.task_id == task_id

    await app.backend.store(meta(task_id, states.STARTED, {"pid": 1}, app))
    assert await result.ready() is False
    assert result.state == states.STARTED
    assert result.info == {"pid": 1}
    assert result.date_done is None

    now = datetime(2026, 4, 5, 6, 7, 8, 9, tzinfo=UTC)
    child = AsyncResult("child-2", parent=AsyncResult("child-1"))
    await app.backend.store(resultmeta.build_meta(
        task_id, states.SUCCESS, 7, now=now, children=[result_tuple(child)]))
    assert await result.ready() is True
    assert await result.successful() is True
    assert await result.failed() is False
    assert result.state == states.SUCCESS
    assert result.result == 7
    assert result.traceback is None
    assert result.date_done == now
    (stored_child,) = result.children
    assert stored_child.id == "child-2"
    assert stored_child.parent is not None
    assert stored_child.parent.id == "child-1"


async def test_a_stored_success_is_never_overwritten(app: Celery) -> None:
    """Like Celery: a RETRY (or a duplicate's STARTED/FAILURE) landing after the SUCCESS of the
    same task id leaves the SUCCESS in place; other states replace each other."""
    task_id = str(uuid.uuid4())
    await app.backend.store(meta(task_id, states.STARTED, {"pid": 1}, app))
    await app.backend.store(meta(task_id, states.RETRY, {"exc_type": "X"}, app))
    retry = await app.backend.get_meta(task_id)
    assert retry is not None
    assert retry["status"] == states.RETRY
    await app.backend.store(meta(task_id, states.SUCCESS, "first", app))
    late = [meta(task_id, state, None, app)
            for state in (states.RETRY, states.STARTED, states.FAILURE, states.SUCCESS)]
    await asyncio.gather(*(app.backend.store(document) for document in late))
    stored = await app.backend.get_meta(task_id)
    assert stored is not None
    assert (stored["status"], stored["result"]) == (states.SUCCESS, "first")


async def test_a_document_that_is_not_json_is_overwritten(
        app: Celery, redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    await redis_client.set(resultmeta.result_key(task_id), b"\x80\x04pickled")
    await app.backend.store(meta(task_id, states.SUCCESS, 5, app))
    assert await app.AsyncResult(task_id).get(timeout=5) == 5


async def test_a_key_of_another_type_is_overwritten_without_failing_the_batch(
        app: Celery, redis_client: redis.asyncio.Redis) -> None:
    """Results stored in the same loop turn share one script run: a result key holding a hash
    (say) is overwritten, as a SET would, instead of failing the whole batch (WRONGTYPE from
    its GET) after some of the others were written and before the rest."""
    ids = [str(uuid.uuid4()) for _ in range(5)]
    odd = ids[2]
    await redis_client.hset(resultmeta.result_key(odd), "status", "SUCCESS")
    await asyncio.wait_for(
        asyncio.gather(*(app.backend.store(meta(task_id, states.SUCCESS, n, app))
                         for n, task_id in enumerate(ids))), 3)
    assert await redis_client.type(resultmeta.result_key(odd)) == b"string"
    for n, task_id in enumerate(ids):
        stored = await app.backend.get_meta(task_id)
        assert stored is not None
        assert (stored["status"], stored["result"]) == (states.SUCCESS, n)
    assert await app.AsyncResult(odd).get(timeout=2) == 2


async def test_forget(app: Celery, redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    key = resultmeta.result_key(task_id)
    await app.backend.store(meta(task_id, states.SUCCESS, 1, app))
    result = app.AsyncResult(task_id)
    assert await result.get(timeout=5) == 1
    assert await redis_client.exists(key) == 1
    await result.forget()
    assert await redis_client.exists(key) == 0
    assert result.state == states.PENDING
    assert await result.ready() is False


async def test_stored_document_is_celerys(app: Celery,
                                          redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    await app.backend.store(meta(task_id, states.SUCCESS, 3, app, parent_id="p"))
    raw = await redis_client.get(resultmeta.result_key(task_id))
    document = json.loads(raw)
    assert document["status"] == "SUCCESS"
    assert document["result"] == 3
    assert document["task_id"] == task_id
    assert document["parent_id"] == "p"
    assert document["children"] == []
    assert document["traceback"] is None
    assert parse(document["date_done"]).tzinfo is not None


async def test_default_result_expires_sets_ttl(app: Celery,
                                               redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    await app.backend.store(meta(task_id, states.SUCCESS, 1, app))
    ttl = await redis_client.ttl(resultmeta.result_key(task_id))
    assert 86400 - 10 <= ttl <= 86400


@pytest.mark.parametrize(("expires", "low", "high"),
                         [(120, 110, 120), (timedelta(minutes=5), 290, 300), (7.9, 1, 7)])
async def test_result_expires_sets_ttl(unique_name: str, amqp_url: str, redis_url: str,
                                       redis_client: redis.asyncio.Redis, expires: Any,
                                       low: int, high: int) -> None:
    app = new_app(unique_name, amqp_url, redis_url, result_expires=expires)
    task_id = str(uuid.uuid4())
    async with app.setup():
        await app.backend.store(meta(task_id, states.SUCCESS, 1, app))
    ttl = await redis_client.ttl(resultmeta.result_key(task_id))
    assert low <= ttl <= high


async def test_result_expires_none_keeps_forever(unique_name: str, amqp_url: str,
                                                 redis_url: str,
                                                 redis_client: redis.asyncio.Redis) -> None:
    app = new_app(unique_name, amqp_url, redis_url, result_expires=None)
    task_id = str(uuid.uuid4())
    key = resultmeta.result_key(task_id)
    async with app.setup():
        await app.backend.store(meta(task_id, states.SUCCESS, 1, app))
    try:
        assert await redis_client.exists(key) == 1
        assert await redis_client.ttl(key) == -1
    finally:
        await redis_client.delete(key)


async def test_store_publishes_the_document(app: Celery,
                                            redis_client: redis.asyncio.Redis) -> None:
    task_id = str(uuid.uuid4())
    channel_name = resultmeta.result_key(task_id)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel_name)
    try:
        document = meta(task_id, states.SUCCESS, {"v": 1}, app)
        await app.backend.store(document)
        deadline = time.monotonic() + 5
        received = None
        while received is None:
            assert time.monotonic() < deadline, "no PUBLISH seen"
            received = await pubsub.get_message(timeout=0.5)
        assert received["channel"] == channel_name.encode()
        assert json.loads(received["data"]) == document
    finally:
        await pubsub.unsubscribe(channel_name)
        await pubsub.aclose()


async def test_redis_down_raises_backend_connection_error_quickly(
        unique_name: str, amqp_url: str) -> None:
    url = "redis://:secretpw@127.0.0.1:1/0"
    app = new_app(unique_name, amqp_url, url)
    async with app.setup():
        for action in (
            lambda: app.AsyncResult(str(uuid.uuid4())).get(timeout=30),
            lambda: app.AsyncResult(str(uuid.uuid4())).refresh(),
            lambda: app.backend.store(meta(str(uuid.uuid4()), states.SUCCESS, 1, app)),
        ):
            start = time.monotonic()
            with pytest.raises(BackendConnectionError) as info:
                await action()
            assert time.monotonic() - start < 10
            assert isinstance(info.value, ConnectionError)
            assert isinstance(info.value, exceptions.BackendError)
            text = str(info.value)
            assert "redis://:***@127.0.0.1:1/0" in text
            assert "secretpw" not in text


async def test_no_backend_configured(unique_name: str, amqp_url: str) -> None:
    app = Celery(unique_name, set_as_current=False)
    app.conf.update(broker_url=amqp_url, task_default_queue=unique_name)
    async with app.setup():
        with pytest.raises(exceptions.BackendError, match="result_backend"):
            await app.AsyncResult(str(uuid.uuid4())).get(timeout=1)
