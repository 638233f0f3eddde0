"""The remote control commands a worker process answers, with Celery's names, arguments
and replies (``celery/worker/control.py``).

Each command is a coroutine ``command(node, **arguments)`` returning the reply value; the
node is the worker's side, seen through :class:`Node`. Arguments a command does not know
are ignored, as Celery's ``**kwargs`` do. An unknown command, or one that raises, is
answered ``{"error": repr(exc)}`` by the dispatcher, as kombu does: ``KeyError('name')``
for an unknown name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aio_celery.app import Celery
from aio_celery.control.wire import error, ok
from aio_celery.ratelimit import parse_rate

Command = Callable[..., Awaitable[Any]]
COMMANDS: dict[str, Command] = {}
_C = TypeVar("_C", bound=Command)
#: a command's result when no reply must be sent (``shutdown``, as Celery's)
NO_REPLY = object()


class EventsControl(Protocol):
    """What the event dispatcher offers remote control (Flower's ``enable_events`` every
    5 s, the ``heartbeat`` a monitor asks for when it starts)."""

    def enable_task_events(self) -> dict[str, str]: ...

    def disable_task_events(self) -> dict[str, str]: ...

    def send_heartbeat(self, freq: float) -> None: ...


class Node(Protocol):
    """The worker process as the commands see it."""

    nodename: str
    app: Celery
    events: EventsControl

    def active(self, safe: bool) -> list[dict[str, Any]]: ...

    def reserved(self, safe: bool) -> list[dict[str, Any]]: ...

    def scheduled(self, safe: bool) -> list[dict[str, Any]]: ...

    def stats(self) -> dict[str, Any]: ...

    def active_queues(self) -> list[dict[str, Any]]: ...

    async def revoke(self, task_ids: list[str], terminate: bool) -> list[str]: ...

    def revoked(self) -> list[str]: ...

    def shutdown(self) -> None: ...

    def resize_pool(self, delta: int) -> str | None: ...

    async def add_consumer(self, queue: str) -> None: ...

    async def cancel_consumer(self, queue: str) -> None: ...

    def conf(self) -> dict[str, Any]: ...

    def hello(self, from_node: str, revoked_ids: list[str]) -> dict[str, Any] | None: ...

    def clock(self) -> int: ...


def command(name: str) -> Callable[[_C], _C]:
    def register(function: _C) -> _C:
        COMMANDS[name] = function
        return function

    return register


async def dispatch(node: Node, method: str, arguments: dict[str, Any]) -> Any:
    """Run ``method``; KeyError for an unknown one (the dispatcher turns it into Celery's
    error reply)."""
    return await COMMANDS[method](node, **arguments)


@command("ping")
async def ping(node: Node, **_: Any) -> dict[str, str]:
    return ok("pong")


@command("active")
async def active(node: Node, safe: bool | None = False, **_: Any) -> list[dict[str, Any]]:
    return node.active(bool(safe))


@command("reserved")
async def reserved(node: Node, safe: bool | None = False, **_: Any) -> list[dict[str, Any]]:
    return node.reserved(bool(safe))


@command("scheduled")
async def scheduled(node: Node, safe: bool | None = False, **_: Any) -> list[dict[str, Any]]:
    return node.scheduled(bool(safe))


@command("stats")
async def stats(node: Node, **_: Any) -> dict[str, Any]:
    return node.stats()


@command("active_queues")
async def active_queues(node: Node, **_: Any) -> list[dict[str, Any]]:
    return node.active_queues()


@command("revoked")
async def revoked(node: Node, **_: Any) -> list[str]:
    return node.revoked()


@command("clock")
async def clock(node: Node, **_: Any) -> dict[str, int]:
    return {"clock": node.clock()}


@command("hello")
async def hello(node: Node, from_node: str = "", revoked: list[str] | None = None,
                **_: Any) -> dict[str, Any] | None:
    """Celery's mingle at a worker's start: a Celery worker starting next to ours gets our
    revoked ids, and we take its."""
    ids = [str(task_id) for task_id in revoked or [] if isinstance(task_id, str)]
    return node.hello(from_node, ids)


@command("conf")
async def conf(node: Node, **_: Any) -> dict[str, Any]:
    return node.conf()


#: Celery's ``DEFAULT_TASK_INFO_ITEMS``
TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")


@command("registered")
async def registered(node: Node, taskinfoitems: list[str] | None = None,
                     builtins: bool = False, **_: Any) -> list[str]:
    """``name [attr=value ...]`` for each task, sorted (Celery's format)."""
    items = [i for i in (taskinfoitems or TASK_INFO_ITEMS)
             if isinstance(i, str) and not i.startswith("_")]
    tasks = node.app.tasks
    names = sorted(n for n in tasks if builtins or not n.startswith("celery."))
    lines = []
    for name in names:
        fields = [(i, getattr(tasks[name], i, None)) for i in items]
        shown = " ".join(f"{i}={v}" for i, v in fields if v is not None)
        lines.append(f"{name} [{shown}]" if shown else name)
    return lines


@command("revoke")
async def revoke(node: Node, task_id: str | list[str] | None = None, terminate: bool = False,
                 signal: str | None = None, **_: Any) -> dict[str, str]:
    """Celery 5.7's replies: the id set as Python prints it, or what was terminated.
    ``signal`` is accepted and ignored: a running coroutine is cancelled, not signalled."""
    ids = [task_id] if isinstance(task_id, str) else list(task_id or [])
    terminated = await node.revoke(ids, bool(terminate))
    if terminate:
        return ok(f"terminate: {', '.join(terminated)}" if terminated
                  else "terminate: tasks unknown")
    return ok(f"tasks {set(ids)} flagged as revoked")


@command("terminate")
async def terminate(node: Node, signal: str | None = None,
                    task_id: str | list[str] | None = None, **_: Any) -> dict[str, str]:
    return await revoke(node, task_id, terminate=True, signal=signal)


@command("rate_limit")
async def rate_limit(node: Node, task_name: str = "", rate_limit: str | None = None,
                     **_: Any) -> dict[str, str]:
    try:
        parse_rate(rate_limit)
    except ValueError as exc:
        return error(f"Invalid rate limit string: {exc!r}")
    task = node.app.tasks.get(task_name)
    if task is None:
        return error("unknown task")
    task.rate_limit = rate_limit or None  # read again by the limiter at each receipt
    if not rate_limit:
        return ok("rate limit disabled successfully")
    return ok("new rate limit set successfully")


@command("time_limit")
async def time_limit(node: Node, task_name: str = "", hard: float | None = None,
                     soft: float | None = None, **_: Any) -> dict[str, str]:
    task = node.app.tasks.get(task_name)
    if task is None:
        return error("unknown task")
    task.soft_time_limit = soft
    task.time_limit = hard
    return ok("time limits set successfully")


@command("enable_events")
async def enable_events(node: Node, **_: Any) -> dict[str, str]:
    return node.events.enable_task_events()


@command("disable_events")
async def disable_events(node: Node, **_: Any) -> dict[str, str]:
    return node.events.disable_task_events()


@command("heartbeat")
async def heartbeat(node: Node, **_: Any) -> None:
    node.events.send_heartbeat(5.0)


@command("shutdown")
async def shutdown(node: Node, **_: Any) -> object:
    """The whole worker stops warm; no reply, as Celery's worker raises WorkerShutdown."""
    node.shutdown()
    return NO_REPLY


@command("pool_grow")
async def pool_grow(node: Node, n: int = 1, **_: Any) -> dict[str, str]:
    problem = node.resize_pool(int(n))
    return error(problem) if problem else ok("pool will grow")


@command("pool_shrink")
async def pool_shrink(node: Node, n: int = 1, **_: Any) -> dict[str, str]:
    problem = node.resize_pool(-int(n))
    return error(problem) if problem else ok("pool will shrink")


@command("add_consumer")
async def add_consumer(node: Node, queue: str = "", **_: Any) -> dict[str, str]:
    await node.add_consumer(queue)
    return ok(f"add consumer {queue}")


@command("cancel_consumer")
async def cancel_consumer(node: Node, queue: str = "", **_: Any) -> dict[str, str]:
    await node.cancel_consumer(queue)
    return ok(f"no longer consuming from {queue}")
