"""Signatures, ``chain`` and ``group``, serialized exactly as Celery serializes them.

A signature is a dict (``task``, ``args``, ``kwargs``, ``options``, ``subtask_type``,
``immutable``) so that it travels in a message body unchanged. A chain is
sent as its first step; the rest ride in the body's ``chain`` stack, last step first, and
the worker pops the next step when a step succeeds.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from aio_celery.result import AsyncResult

if TYPE_CHECKING:
    from aio_celery.app import Celery


class Signature(dict[str, Any]):
    """A task call that can be sent later: ``add.s(2, 2)``."""

    def __init__(self, task: str | dict[str, Any], args: Any = None,
                 kwargs: dict[str, Any] | None = None, *, options: dict[str, Any] | None = None,
                 immutable: bool = False, subtask_type: str | None = None,
                 app: Celery | None = None, **ex: Any) -> None:
        if isinstance(task, dict):  # a signature dict received in a message
            super().__init__(task)
            self.setdefault("args", [])
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("immutable", False)
        else:
            super().__init__(task=task, args=list(args or ()), kwargs=dict(kwargs or {}),
                             options=dict(options or {}, **ex), subtask_type=subtask_type,
                             immutable=immutable)
        self._app = app

    @property
    def app(self) -> Celery:
        if self._app is None:
            from aio_celery.app import current_app

            return current_app()
        return self._app

    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self["options"])

    @property
    def immutable(self) -> bool:
        return bool(self["immutable"])

    def clone(self, args: Any = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Signature:
        """A copy with ``args`` appended, ``kwargs`` and ``options`` merged (Celery's rules:
        an immutable signature takes no new arguments)."""
        new_args, new_kwargs = self.args, self.kwargs
        if not self.immutable:
            new_args = new_args + list(args or ())
            new_kwargs.update(kwargs or {})
        copy = Signature(dict(self), app=self._app)
        copy.update(args=new_args, kwargs=new_kwargs, options={**self.options, **options})
        return copy

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        if immutable is not None:
            self["immutable"] = immutable
        self["options"] = {**self["options"], **options}
        return self

    def link(self, callback: Signature) -> Signature:
        self["options"].setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Signature) -> Signature:
        self["options"].setdefault("link_error", []).append(errback)
        return errback

    async def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return await self.apply_async(args, kwargs)

    async def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None,
                          **options: Any) -> AsyncResult:
        """Send the task, with ``args`` added to the signature's own."""
        sig = self.clone(args, kwargs, **options)
        return await self.app.send_task(sig.name, sig.args, sig.kwargs, **sig.options)

    def __or__(self, other: Signature) -> _Chain:  # type: ignore[override]
        if isinstance(other, _Chain):
            return _Chain(self, *other.tasks, app=self._app)
        return _Chain(self, other, app=self._app)


class _Chain(Signature):
    """Steps run one after the other, each result prepended to the next step's args."""

    def __init__(self, *tasks: Signature, app: Celery | None = None) -> None:
        if not tasks:
            raise ValueError("a chain needs at least one task")
        super().__init__("celery.chain", (), {"tasks": [dict(t) for t in tasks]},
                         subtask_type="chain", app=app or tasks[0]._app)
        self.tasks = [t if isinstance(t, Signature) else Signature(t) for t in tasks]

    def __or__(self, other: Signature) -> _Chain:  # type: ignore[override]
        more = other.tasks if isinstance(other, _Chain) else [other]
        return _Chain(*self.tasks, *more, app=self._app)

    async def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None,
                          **options: Any) -> AsyncResult:
        """Send the first step; returns the *last* step's result (its ``parent`` links back
        through the earlier steps, as in Celery)."""
        options = dict(options)
        chain_id = options.pop("task_id", None)
        steps = [step.clone() for step in self.tasks]
        steps[0] = steps[0].clone(args, kwargs)
        if chain_id is not None:  # as in Celery, the chain's id is its last step's
            steps[-1]["options"]["task_id"] = chain_id
        results: list[AsyncResult] = []
        for step in steps:
            step["options"].setdefault("task_id", str(uuid.uuid4()))
            parent = results[-1] if results else None
            results.append(AsyncResult(step["options"]["task_id"], app=self._app, parent=parent))
        first, rest = steps[0], steps[1:]
        await self.app.send_task(first.name, first.args, first.kwargs,
                                 chain=[dict(step) for step in reversed(rest)],
                                 **{**first.options, **options})
        return results[-1]


def chain(*tasks: Signature, app: Celery | None = None) -> _Chain:
    """``chain(add.s(1, 2), add.s(3))``: run steps in order, passing results along."""
    flat: list[Signature] = []
    for task in tasks:
        flat.extend(task.tasks if isinstance(task, _Chain) else [task])
    return _Chain(*flat, app=app)


class GroupResult:
    """The results of a group, in the order of its tasks."""

    def __init__(self, id: str, results: list[AsyncResult]) -> None:
        self.id = id
        self.results = results

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __len__(self) -> int:
        return len(self.results)

    async def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Every task's value, in order (all waited for together)."""
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*(r.get(propagate=propagate) for r in self.results))

    async def ready(self) -> bool:
        return all(await asyncio.gather(*(r.ready() for r in self.results)))

    async def successful(self) -> bool:
        return all(await asyncio.gather(*(r.successful() for r in self.results)))


class group:
    """``group(add.s(1, 1), add.s(2, 2))``: send tasks to run in parallel."""

    def __init__(self, *tasks: Signature, app: Celery | None = None) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])
        self.tasks = list(tasks)
        self._app = app

    async def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None,
                          **options: Any) -> GroupResult:
        group_id = options.pop("group_id", None) or str(uuid.uuid4())
        results = await asyncio.gather(*(
            task.apply_async(args, kwargs, group_id=group_id, group_index=index, **options)
            for index, task in enumerate(self.tasks)
        ))
        return GroupResult(group_id, list(results))

    async def delay(self, *args: Any, **kwargs: Any) -> GroupResult:
        return await self.apply_async(args, kwargs)
