"""The worker's side of a chord: Celery 5.7's ``on_chord_part_return`` for the Redis backend.

Each header task carries the body's signature in the ``chord`` field of its message and the
chord's id in its ``group`` header. When it is over (success, failure, or revoked because it
expired), the worker records ``[1, task_id, state, result]`` (JSON; a failure's ``result``
is the exception document) in the sorted set ``celery-taskset-meta-<group_id>.j`` scored by
``group_index``, with Celery's Lua script (see :mod:`aio_celery.backend`). The part that makes
the count reach the size stored in ``.s`` claims ``.c``, reads the results in header order
and sends the body with that list prepended to its args; then it deletes the chord's keys
and leaves ``.c`` = ``done`` for five minutes, so that a late duplicate does nothing.

If a header task failed, the body is not sent: ``ChordError("Dependency <id> raised
<exc>")`` is stored as the body's FAILURE (under Celery's ``celery.exceptions`` name), the
body's ``link_error`` errbacks are sent with its id, and ``.s`` is deleted so that no later
copy of a header task fails the chord again. Those are the steps of
``RedisBackend.on_chord_part_return`` and ``Backend.chord_error_from_stack`` in
``celery/backends/redis.py`` and ``celery/backends/base.py``, so that Celery workers and
aio-celery workers can run the members of one chord.
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import TYPE_CHECKING, Any

from aio_celery import jsoncodec, resultmeta, states
from aio_celery.canvas import Signature, send_signature
from aio_celery.exceptions import BackendError, ChordError

if TYPE_CHECKING:
    from aio_celery.app import Celery

logger = logging.getLogger(__name__)

#: Celery's ``result_chord_join_timeout`` default (seconds)
JOIN_TIMEOUT = 3.0
#: how long the part completing the chord holds the claim before sending the body:
#: Celery's ``max(5, int(result_chord_join_timeout * 2))``
CLAIM_EXPIRES = max(5, int(JOIN_TIMEOUT * 2))
#: how long ``.c`` says ``done`` after the body was sent
DONE_EXPIRES = int(max(CLAIM_EXPIRES * 2, 300))



def encode_part(task_id: str, state: str, result: Any) -> str:
    """``[1, task_id, state, result]`` as Celery's ``encode`` writes it; a result that is not
    JSON counts as the FAILURE the worker stores for it."""
    try:
        return jsoncodec.dumps([1, task_id, state, result])
    except (TypeError, ValueError) as exc:
        error = resultmeta.exception_to_dict(
            TypeError(f"result is not JSON serializable: {exc}"))
        return jsoncodec.dumps([1, task_id, states.FAILURE, error])


async def on_chord_part_return(app: Celery, *, task_id: str, group_id: str,
                               group_index: int | None, body: dict[str, Any], state: str,
                               result: Any, claim_token: str) -> None:
    """Record a header task's outcome; the last one sends the body (or fails the chord).

    ``result`` is the return value, or for FAILURE/REVOKED the exception document. Raises
    :class:`BackendError` if Redis cannot be reached before the body is sent: the caller
    then keeps the message for redelivery, which is safe (a part is counted once per
    ``task_id:group_index``). Pass the same ``claim_token`` when retrying, so that a claim
    taken by an attempt whose answer was lost is recognised as ours.
    """
    backend = app.backend
    part = await backend.chord_part_return(
        group_id, task_id, group_index, encode_part(task_id, state, result),
        claim_expires=CLAIM_EXPIRES, claim_token=claim_token)
    if part.readycount == -1 or part.total is None or part.readycount != part.total:
        return
    if not part.claimed and not await backend.chord_claim_extend(group_id, claim_token,
                                                                 CLAIM_EXPIRES):
        return  # another part claimed it (or has already sent the body)
    callback = Signature(body, app=app)
    try:
        values = await _join(app, group_id)
    except BackendError:
        raise
    except ChordError as exc:
        logger.error("Chord %s failed: %s", group_id, exc)
        await _fail_chord(app, group_id, callback, exc)
        return
    except Exception as exc:
        logger.exception("Chord %s: could not read the header results", group_id)
        await _fail_chord(app, group_id, callback, _caused(f"Join error: {exc!r}", exc))
        return
    if not await backend.chord_claim_extend(group_id, claim_token, _publish_expires(app)):
        logger.warning("Chord callback for %r not published: dispatch claim is no longer "
                       "owned by this worker", group_id)
        return
    try:
        await _send_body(app, callback, values)
    except Exception as exc:
        logger.exception("Chord callback for %r raised: %r", group_id, exc)
        await _store_chord_error(app, callback, _caused(f"Callback error: {exc!r}", exc))
    finally:
        try:
            cleaned = await backend.chord_cleanup(group_id, claim_token, DONE_EXPIRES)
        except BackendError as exc:
            cleaned = False
            logger.warning("Chord %s: cleanup failed (%s)", group_id, exc)
        if not cleaned:
            logger.warning("Chord callback claim for %r was lost before cleanup; chord data "
                           "was left for expiry", group_id)


async def _join(app: Celery, group_id: str) -> list[Any]:
    """The header's values in ``group_index`` order; ChordError for a failed member."""
    saved = await app.backend.get_group_meta(group_id)
    if saved is not None and "result" in saved:
        # A header saved by the client (Celery does so when it holds nested groups): join
        # it as Celery would, in its own structure.
        return list(await _join_saved(app, saved["result"]))
    return [_unpack(raw) for raw in await app.backend.chord_results(group_id)]


def _unpack(raw: bytes | str) -> Any:
    _, task_id, state, value = jsoncodec.loads(raw)
    if state in states.EXCEPTION_STATES:
        value = resultmeta.exception_from_dict(value)
    if state in states.PROPAGATE_STATES:
        raise _caused(f"Dependency {task_id} raised {value!r}", value)
    return value


async def _join_saved(app: Celery, node: Any) -> Any:
    """A saved ``as_tuple()`` result: ``[[id, parent], children]``; children is None for a
    task and a list for a group."""
    (task_id, _parent), children = node
    if isinstance(children, list):
        return [await _join_saved(app, child) for child in children]
    meta = await app.backend.get_meta(str(task_id))
    if meta is None or meta["status"] not in states.READY_STATES:
        meta = await app.backend.wait_for(str(task_id), JOIN_TIMEOUT)
    if meta["status"] in states.PROPAGATE_STATES:
        raise resultmeta.exception_from_dict(meta.get("result"))
    return meta.get("result")


def _caused(message: str, cause: Any) -> ChordError:
    error = ChordError(message)
    if isinstance(cause, BaseException):
        error.__cause__ = cause
    return error


def _publish_expires(app: Celery) -> int:
    """The claim's lifetime while the body is published: the broker's connection timeout
    twice (a reconnection) plus the publish timeout, as Celery sizes it from its publish
    retry policy."""
    settings = app.conf.settings
    connect = float(settings.broker_connection_timeout or 0)
    publish = float(settings.broker_publish_timeout or connect)
    return max(CLAIM_EXPIRES, math.ceil(2 * connect + publish + 1))


async def _send_body(app: Celery, callback: Signature, values: list[Any]) -> None:
    if callback.get("subtask_type"):
        raise TypeError(f"aio-celery cannot run a {callback['subtask_type']} as a chord body")
    await send_signature(app, callback.clone([values]), lenient=True)


async def _fail_chord(app: Celery, group_id: str, callback: Signature, exc: ChordError) -> None:
    try:
        await _store_chord_error(app, callback, exc)
    finally:
        await app.backend.drop_chord_size(group_id)


async def _store_chord_error(app: Celery, callback: Signature, exc: ChordError) -> None:
    """Celery's ``chord_error_from_stack``: errbacks of the body, then its FAILURE, then the
    FAILURE of the steps chained after it."""
    callback_id = str(callback.options.get("task_id") or "")
    if not callback_id:
        logger.error("Chord body %s has no task id: its failure cannot be stored (%s)",
                     callback.name, exc)
        return
    for errback in callback.options.get("link_error") or ():
        try:
            await send_signature(app, Signature(errback, app=app).clone([callback_id]),
                                 lenient=True)
        except Exception:
            logger.exception("Chord body %s[%s]: could not send errback %r", callback.name,
                             callback_id, errback.get("task"))
    tb = "".join(traceback.format_exception(exc))
    error = resultmeta.exception_to_dict(exc)
    await app.backend.store(resultmeta.build_meta(callback_id, states.FAILURE, error,
                                                  now=app.now(), traceback=tb))
    for step in callback.options.get("chain") or ():
        options = step.get("options") or {}
        if options.get("task_id"):
            await app.backend.store(resultmeta.build_meta(
                str(options["task_id"]), states.FAILURE, error, now=app.now(), traceback=tb,
                group_id=options.get("group_id"), parent_id=options.get("parent_id")))
