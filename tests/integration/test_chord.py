"""Chords: our client sends them, our worker completes them, with Celery's Redis keys.

The chord's state lives under ``celery-taskset-meta-<group_id>`` + ``.s`` (size), ``.j``
(results, a sorted set scored by group_index), ``.d`` (members counted), ``.t`` (size
added at run time) and ``.c`` (the claim to send the body, then ``done``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import redis.asyncio
from aio_pika.abc import AbstractChannel, AbstractConnection
from helpers import ready_count

from aio_celery import AsyncResult, Celery, GroupResult, chain, chord, group, resultmeta, states
from aio_celery.backend import group_key
from aio_celery.canvas import send_signature
from aio_celery.exceptions import ChordError
from aio_celery.worker import chord as worker_chord

RESULT_TIMEOUT = 10.0


def chord_keys(group_id: str) -> list[str]:
    return [group_key(group_id, suffix) for suffix in (".s", ".j", ".d", ".t")]


async def chord_failure(result: AsyncResult) -> str:
    """The message of the ChordError the chord's result raises.

    It is stored as Celery's ``celery.exceptions.ChordError`` and read back as
    ``aio_celery.exceptions.ChordError``.
    """
    try:
        await result.get(timeout=RESULT_TIMEOUT)
    except Exception as exc:
        assert isinstance(exc, ChordError), repr(exc)
        assert result.state == states.FAILURE
        return str(exc)
    raise AssertionError("the chord's result did not raise")


async def counter(client: redis.asyncio.Redis, key: str) -> int:
    return int(await client.get(key) or 0)


# --- success -------------------------------------------------------------------------------


async def test_chord_of_five_adds_gives_the_sum(app: Celery, start_worker,
                                                redis_client: redis.asyncio.Redis) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(bind=True)
    async def tsum(self: Any, values: list[int]) -> dict[str, Any]:
        return {"sum": sum(values), "values": values, "group": self.request.group,
                "parent_id": self.request.parent_id}

    result = await chord([add.s(i, i) for i in range(5)], tsum.s()).apply_async()
    header = result.parent
    assert isinstance(header, GroupResult) and len(header) == 5
    # The size is in Redis before any header task can finish.
    assert await redis_client.get(group_key(header.id, ".s")) == b"5"

    handle = await start_worker(concurrency=5, burst=True)
    assert await handle.wait() == 0
    value = await result.get(timeout=RESULT_TIMEOUT)
    assert value["sum"] == 20 and value["values"] == [0, 2, 4, 6, 8]
    assert value["group"] == header.id  # the body's message names the header's group
    assert value["parent_id"] in {r.id for r in header.results}  # sent by the last part
    assert await header.get(timeout=RESULT_TIMEOUT) == [0, 2, 4, 6, 8]

    # Done: the chord's keys are deleted and the claim says "done" for a while.
    assert await redis_client.exists(*chord_keys(header.id)) == 0
    assert await redis_client.get(group_key(header.id, ".c")) == b"done"
    assert 0 < await redis_client.ttl(group_key(header.id, ".c")) <= worker_chord.DONE_EXPIRES
    meta = resultmeta.decode_meta(await redis_client.get(resultmeta.result_key(result.id)))
    assert meta["group_id"] == header.id


async def test_chord_header_then_body_call_form_and_task_id(app: Celery, start_worker) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    @app.task
    async def collect(values: list[int], label: str) -> list[Any]:
        return [label, values]

    body_id = str(uuid.uuid4())
    # Celery's chord(header)(body); the results are PREPENDED to the body's own args.
    result = await chord(double.s(i) for i in range(3))(collect.s("doubled"), task_id=body_id)
    assert result.id == body_id
    handle = await start_worker(concurrency=3, burst=True)
    assert await handle.wait() == 0
    assert await result.get(timeout=RESULT_TIMEOUT) == ["doubled", [0, 2, 4]]


async def test_results_follow_the_header_order_not_the_finishing_order(
        app: Celery, start_worker) -> None:
    finished: list[int] = []

    @app.task
    async def slow(index: int, delay: float) -> int:
        await asyncio.sleep(delay)
        finished.append(index)
        return index

    @app.task
    async def ordered(values: list[int]) -> list[int]:
        return values

    # The first member finishes last, the last one first.
    members = [slow.s(i, 0.05 * (5 - i)) for i in range(6)]
    result = await chord(members, ordered.s()).apply_async()
    handle = await start_worker(concurrency=6, burst=True)
    assert await handle.wait() == 0
    assert await result.get(timeout=RESULT_TIMEOUT) == [0, 1, 2, 3, 4, 5]
    assert finished != sorted(finished)


async def test_group_or_body_is_a_chord_and_link_goes_to_the_body(app: Celery,
                                                                 start_worker) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task
    async def mul(a: int, b: int) -> int:
        return a * b

    workflow = group(add.s(1, 1), add.s(2, 2)) | tsum.s()
    assert isinstance(workflow, chord)
    result = await workflow.apply_async(link=mul.s(10))
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    assert await result.get(timeout=RESULT_TIMEOUT) == 6
    (callback,) = result.children
    assert await callback.get(timeout=RESULT_TIMEOUT) == 60


async def test_chain_in_the_header_counts_as_its_last_step(app: Celery, start_worker) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def mul(a: int, b: int) -> int:
        return a * b

    @app.task
    async def tsum(values: list[int]) -> list[int]:
        return values

    result = await chord([chain(add.s(1, 1), mul.s(10)), add.s(3, 3)], tsum.s()).apply_async()
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    assert await result.get(timeout=RESULT_TIMEOUT) == [20, 6]


async def test_empty_header_sends_the_body_at_once(app: Celery, start_worker) -> None:
    @app.task
    async def tsum(values: list[int]) -> list[int]:
        return values

    result = await chord([], tsum.s()).apply_async()
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await result.get(timeout=RESULT_TIMEOUT) == []


async def test_header_messages_carry_the_body_like_celery(
        app: Celery, unique_name: str, channel: AbstractChannel) -> None:
    @app.task(name="proj.add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="proj.tsum")
    async def tsum(values: list[int]) -> int:
        return sum(values)

    result = await chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async()
    header = result.parent
    assert isinstance(header, GroupResult)
    queue = await channel.declare_queue(unique_name, passive=True)
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    for _ in range(2):
        message = await queue.get(timeout=5)
        assert message is not None
        messages.append(message)
        await message.ack()
    messages.sort(key=lambda m: m.headers["group_index"])
    for index, message in enumerate(messages):
        assert message.headers["group"] == header.id
        assert message.headers["group_index"] == index
        assert message.headers["id"] == header.results[index].id
        args, kwargs, embed = json.loads(message.body)
        assert (args, kwargs) == ([index + 1, index + 1], {})
        assert embed["chain"] is None and embed["callbacks"] is None
        # Exactly what Celery 5.7 puts there: the body's signature, id assigned.
        assert embed["chord"] == {
            "task": "proj.tsum", "args": [], "kwargs": {}, "subtask_type": None,
            "immutable": False,
            "options": {"task_id": result.id, "reply_to": app.oid, "group_id": header.id},
        }


# --- failure -------------------------------------------------------------------------------


async def test_failing_member_fails_the_chord_and_the_body_does_not_run(
        app: Celery, start_worker, redis_client: redis.asyncio.Redis) -> None:
    body_runs = f"aio-celery-test-body-runs-{uuid.uuid4().hex}"
    errbacks: list[str] = []

    @app.task
    async def member(i: int) -> int:
        if i == 2:
            raise ValueError("member 2 broke")
        return i

    @app.task
    async def body(values: list[int]) -> list[int]:
        await redis_client.incr(body_runs)
        return values

    @app.task
    async def on_error(task_id: str) -> None:
        errbacks.append(task_id)

    result = await chord([member.s(i) for i in range(4)], body.s()).apply_async(
        link_error=on_error.s())
    header = result.parent
    assert isinstance(header, GroupResult)
    handle = await start_worker(concurrency=4, burst=True)
    assert await handle.wait() == 0

    message = await chord_failure(result)
    failed = header.results[2].id
    assert f"Dependency {failed} raised ValueError('member 2 broke')" in message
    assert await counter(redis_client, body_runs) == 0
    assert errbacks == [result.id]  # the body's errback, with the body's id
    # The stored document is Celery's: a Celery client rebuilds celery.exceptions.ChordError.
    meta = resultmeta.decode_meta(await redis_client.get(resultmeta.result_key(result.id)))
    assert meta["result"]["exc_type"] == "ChordError"
    assert meta["result"]["exc_module"] == "celery.exceptions"
    assert meta["traceback"] and "member 2 broke" in meta["traceback"]
    # The other members still succeeded; the size is dropped so nothing fails it again.
    assert await header.results[0].get(timeout=RESULT_TIMEOUT) == 0
    assert await redis_client.exists(group_key(header.id, ".s")) == 0


async def test_failing_first_step_of_a_header_chain_fails_the_chord(
        app: Celery, start_worker) -> None:
    @app.task
    async def boom(*_: Any) -> None:
        raise RuntimeError("first step broke")

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def tsum(values: list[int]) -> int:
        return sum(values)

    result = await chord([chain(boom.s(), add.s(1)), add.s(2, 2)], tsum.s()).apply_async()
    header = result.parent
    assert isinstance(header, GroupResult)
    handle = await start_worker(concurrency=2, burst=True)
    assert await handle.wait() == 0
    # The chain's last step never ran: it is stored as failed, and it fails the chord.
    assert "first step broke" in await chord_failure(result)
    assert (await header.results[0].refresh()).state == states.FAILURE


async def test_expired_member_fails_the_chord(app: Celery, start_worker) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def tsum(values: list[int]) -> int:
        return sum(values)

    handle = await start_worker(concurrency=2)
    try:
        # Delivered at once (the worker is consuming), due after it expires.
        expiring = add.s(2, 2).set(countdown=0.8, expires=0.3)
        result = await chord([add.s(1, 1), expiring], tsum.s()).apply_async()
        assert "TaskRevokedError('expired')" in await chord_failure(result)
    finally:
        assert await handle.stop() == 0


# --- at-least-once and expiry --------------------------------------------------------------


async def test_a_redelivered_member_is_counted_once_and_the_body_sent_once(
        app: Celery, start_worker, redis_client: redis.asyncio.Redis) -> None:
    body_runs = f"aio-celery-test-body-runs-{uuid.uuid4().hex}"

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def tsum(values: list[int]) -> int:
        await redis_client.incr(body_runs)
        return sum(values)

    group_id = str(uuid.uuid4())
    body = tsum.s().set(task_id=str(uuid.uuid4()), group_id=group_id, reply_to=app.oid)
    await app.backend.set_chord_size(group_id, 2)
    first = add.s(1, 1).set(task_id=str(uuid.uuid4()))
    # Member 0 arrives twice (a redelivery) before member 1, and once more afterwards.
    for sig, index in ((first, 0), (first, 0), (add.s(2, 2), 1)):
        await send_signature(app, sig, chord=dict(body), group_id=group_id, group_index=index)
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    result = app.AsyncResult(body["options"]["task_id"])
    assert await result.get(timeout=RESULT_TIMEOUT) == 6
    await send_signature(app, first, chord=dict(body), group_id=group_id, group_index=0)
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await counter(redis_client, body_runs) == 1
    assert await redis_client.exists(*chord_keys(group_id)) == 0


async def test_chord_keys_expire_with_results(app: Celery,
                                              redis_client: redis.asyncio.Redis) -> None:
    """Sizes, results and members expire after result_expires, as Celery sets them."""
    app.backend.expires = 120
    group_id = str(uuid.uuid4())
    await app.backend.set_chord_size(group_id, 3)
    assert 0 < await redis_client.ttl(group_key(group_id, ".s")) <= 120
    part = await app.backend.chord_part_return(
        group_id, "task-0", 0, worker_chord.encode_part("task-0", states.SUCCESS, 42),
        claim_expires=worker_chord.CLAIM_EXPIRES, claim_token="t")
    assert (part.readycount, part.total, part.claimed) == (1, 3, False)
    for suffix in (".s", ".j", ".d"):
        assert 0 < await redis_client.ttl(group_key(group_id, suffix)) <= 120
    # Celery's encoding of a part: [1, task_id, state, result], scored by group_index.
    assert await redis_client.zrange(group_key(group_id, ".j"), 0, -1, withscores=True) == [
        (b'[1, "task-0", "SUCCESS", 42]', 0.0)]
    assert await redis_client.smembers(group_key(group_id, ".d")) == {b"task-0:0"}
    await redis_client.delete(*chord_keys(group_id))


async def test_a_retried_part_recognises_its_own_claim(
        app: Celery, start_worker, unique_name: str, amqp: AbstractConnection) -> None:
    """The last part's first attempt claimed the chord but its answer was lost (Redis
    dropped the connection): the retry, with the same claim token, sends the body; a part
    with another token (another worker) does not."""
    @app.task
    async def tsum(values: list[int]) -> int:
        return sum(values)

    group_id = str(uuid.uuid4())
    body = dict(tsum.s().set(task_id=str(uuid.uuid4()), group_id=group_id, reply_to=app.oid))
    await app.backend.set_chord_size(group_id, 1)
    encoded = worker_chord.encode_part("t0", states.SUCCESS, 5)
    part = await app.backend.chord_part_return(group_id, "t0", 0, encoded,
                                               claim_expires=worker_chord.CLAIM_EXPIRES,
                                               claim_token="first-attempt")
    assert part.complete
    report = {"app": app, "task_id": "t0", "group_id": group_id, "group_index": 0,
              "body": body, "state": states.SUCCESS, "result": 5}
    await worker_chord.on_chord_part_return(**report, claim_token="another-worker")
    await app.broker.declare_queue(unique_name)
    assert await ready_count(amqp, unique_name) == 0
    await worker_chord.on_chord_part_return(**report, claim_token="first-attempt")
    handle = await start_worker(concurrency=1, burst=True)
    assert await handle.wait() == 0
    assert await app.AsyncResult(body["options"]["task_id"]).get(timeout=RESULT_TIMEOUT) == 5
