"""Task messages as ``send_task``, ``retry()`` and the canvas build them: pure.

:func:`build_message` turns a call (name, args, kwargs, ``apply_async`` options) plus what
it was sent from (the settings, the task, the running request, a retried request) into a
:class:`~aio_celery.protocol.TaskMessage` and the queue it goes to. The clock, the id
source, the ``origin`` and the app's ``reply_to`` are passed in, so the same call gives the
same message (the golden tests rely on it); :mod:`aio_celery.app` supplies the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aio_celery.config import first_set
from aio_celery.protocol import TaskMessage
from aio_celery.routing import route_queue

if TYPE_CHECKING:
    from aio_celery.config import Settings
    from aio_celery.task import Context, Task

#: the ``apply_async`` options aio-celery puts into a message
SEND_OPTIONS = frozenset({
    "task_id", "countdown", "eta", "expires", "queue", "priority", "ignore_result", "headers",
    "soft_time_limit", "time_limit", "link", "link_error", "chain", "group_id", "group_index",
    "shadow", "reply_to", "retries", "chord",
})

#: apply_async options Celery accepts that mean nothing for aio-celery's transport
IGNORED_OPTIONS = frozenset({
    "serializer", "compression", "retry", "retry_policy", "exchange", "routing_key",
    "exchange_type", "mandatory", "add_to_parent", "connection", "producer", "publisher",
    "declare", "immediate", "delivery_mode", "immutable", "subtask_type", "chord_size",
})


def unknown_options(options: Mapping[str, Any]) -> set[str]:
    """The options neither sent nor knowingly ignored (a typo, or one Celery adds to the
    signatures it sends, such as ``root_id``)."""
    return set(options.keys() - SEND_OPTIONS - IGNORED_OPTIONS)


def build_message(settings: Settings, name: str, args: Any, kwargs: Any,
                  options: Mapping[str, Any], *, now: datetime, new_id: Callable[[], str],
                  origin: str, reply_to: str, task: Task | None = None,
                  parent: Context | None = None,
                  retry_of: Context | None = None) -> tuple[TaskMessage, str]:
    """The message for ``name(*args, **kwargs)`` sent with ``options``, and its queue.

    ``parent`` is the request of the task sending it (its root and id become the message's
    root and parent); ``retry_of`` is the request being retried: the message keeps its id,
    root and parent, counts one retry more and is sent as the original was (its queue,
    limits, group, chain, chord and callbacks) unless ``options`` say otherwise, as Celery's
    ``Task.retry`` does. ``new_id`` is called only when no id is given.
    """
    unknown = unknown_options(options) if options else None
    if unknown:
        raise TypeError(f"send_task({name!r}): unknown option(s) {sorted(unknown)}")
    if kwargs is not None and not isinstance(kwargs, (dict, Mapping)):  # dict: fast path
        raise TypeError(f"send_task({name!r}): kwargs must be a dict")
    if retry_of is not None:
        options = {**retry_options(retry_of), **options}
        parent = retry_of
    args = list(args or ())
    kwargs = dict(kwargs or {})
    task_id: str = (retry_of.id if retry_of is not None else None) or options.get(
        "task_id") or new_id()
    queue = options.get("queue") or (task.queue if task else None) or route_queue(
        settings.task_routes, name, args, kwargs, options, task) or settings.task_default_queue
    message = TaskMessage(
        id=task_id,
        task=name,
        args=args,
        kwargs=kwargs,
        root_id=_root_id(parent, retry_of),
        parent_id=(retry_of.parent_id if retry_of else parent.id if parent else None),
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        retries=retry_of.retries + 1 if retry_of else int(options.get("retries") or 0),
        eta=eta_of(now, options.get("countdown"), options.get("eta")),
        expires=expires_of(now, options.get("expires")),
        soft_time_limit=options.get("soft_time_limit"),
        time_limit=options.get("time_limit"),
        shadow=options.get("shadow"),
        origin=origin,
        ignore_result=options.get("ignore_result"),
        callbacks=signatures(options.get("link")),
        errbacks=signatures(options.get("link_error")),
        chain=options.get("chain"),
        chord=options.get("chord"),
        priority=first_set(options.get("priority"), task.priority if task else None,
                           settings.task_default_priority),
        reply_to=options.get("reply_to") or reply_to,
        extra_headers=options.get("headers") or {},
    )
    return message, queue


def _root_id(parent: Context | None, retry_of: Context | None) -> str | None:
    """A retry keeps the root of the retried task (itself when it had none); anything else
    sent from a task has that task's root."""
    if retry_of is not None:
        return retry_of.root_id or retry_of.id
    if parent is not None and parent.id:
        return parent.root_id or parent.id
    return None


def retry_options(request: Context) -> dict[str, Any]:
    """How the running task was sent, as ``send_task`` options for its retry: its queue,
    priority, expiry, time limits, group, chain, chord and callbacks."""
    delivery = request.delivery_info or {}
    hard, soft = request.timelimit
    options = {
        "queue": delivery.get("queue") or delivery.get("routing_key"),
        "priority": delivery.get("priority"),
        "expires": request.expires,
        "soft_time_limit": soft,
        "time_limit": hard,
        "group_id": request.group,
        "group_index": request.group_index,
        "chain": request.chain,
        "chord": request.chord,
        "link": request.callbacks,
        "link_error": request.errbacks,
    }
    return {key: value for key, value in options.items() if value is not None}


def eta_of(now: datetime, countdown: float | None, eta: datetime | None) -> datetime | None:
    """The absolute eta: ``countdown`` seconds from ``now``, else ``eta`` (naive: UTC)."""
    if countdown is not None:
        return now + timedelta(seconds=float(countdown))
    if eta is not None and eta.tzinfo is None:
        return eta.replace(tzinfo=UTC)
    return eta


def expires_of(now: datetime,
               expires: float | datetime | timedelta | None) -> datetime | None:
    """The absolute expiry of an ``expires`` option (seconds, a timedelta or a datetime)."""
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    if isinstance(expires, timedelta):
        return now + expires
    return now + timedelta(seconds=float(expires))


def signatures(value: Any) -> list[dict[str, Any]] | None:
    """``link``/``link_error``: one signature or a list of them, as plain dicts."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [dict(item) for item in items]
