"""Signatures, ``chain``, ``group`` and ``chord``, serialized exactly as Celery serializes them.

A signature is a dict (``task``, ``args``, ``kwargs``, ``options``, ``subtask_type``,
``immutable``) so that it travels in a message body unchanged. A chain is
sent as its first step; the rest ride in the body's ``chain`` stack, last step first, and
the worker pops the next step when a step succeeds. A chord is sent as Celery sends it: the
header size goes to ``celery-taskset-meta-<group_id>.s`` first, then each header task is
sent with the group id, its ``group_index`` and the body's signature in the ``chord`` field
of its message; the worker that finishes the last header task sends the body (see
:mod:`aio_celery.worker.chord`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from aio_celery import messages, protocol
from aio_celery.result import AsyncResult
from aio_celery.task import current_request

if TYPE_CHECKING:
    from aio_celery.app import Celery

logger = logging.getLogger(__name__)


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
        """A copy with ``args`` *prepended*, ``kwargs`` and ``options`` merged (Celery's
        rules: a chain step gets the previous result first; an immutable signature takes no
        new arguments)."""
        new_args, new_kwargs = self.args, self.kwargs
        if not self.immutable:
            new_args = [*(args or ()), *new_args]
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
        """Send the task, with ``args`` added to the signature's own (run it here with
        ``task_always_eager``, when the task is registered, as in Celery)."""
        sig = self.clone(args, kwargs, **options)
        app = self.app
        if app.conf.settings.task_always_eager and sig.name in app.tasks:
            return await app.tasks[sig.name].apply(sig.args, sig.kwargs, **sig.options)
        return await app.send_task(sig.name, sig.args, sig.kwargs, **sig.options)

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
        steps, results = self.steps(args, kwargs, last_id=options.pop("task_id", None),
                                    app=self._app)
        if self.app.conf.settings.task_always_eager:
            return await _eager_chain(steps, options)
        first, rest = steps[0], steps[1:]
        await self.app.send_task(first.name, first.args, first.kwargs,
                                 chain=[dict(step) for step in reversed(rest)],
                                 **{**first.options, **options})
        return results[-1]

    def steps(self, args: Any = None, kwargs: dict[str, Any] | None = None, *,
              last_id: str | None = None,
              app: Celery | None = None) -> tuple[list[Signature], list[AsyncResult]]:
        """Copies of the steps, ready to send: ``args``/``kwargs`` added to the first, each
        with a task id (the one it has, else a new one; ``last_id`` for the last, which is
        the chain's own id in Celery), and their results, each the ``parent`` of the next.
        The only place a chain's step ids are drawn."""
        steps = [step.clone() for step in self.tasks]
        steps[0] = steps[0].clone(args, kwargs)
        if last_id is not None:
            steps[-1]["options"]["task_id"] = last_id
        results: list[AsyncResult] = []
        for step in steps:
            step["options"].setdefault("task_id", str(uuid.uuid4()))
            parent = results[-1] if results else None
            results.append(AsyncResult(step["options"]["task_id"], app=app, parent=parent))
        return steps, results


async def _eager_chain(steps: list[Signature], options: dict[str, Any]) -> AsyncResult:
    """Each step run here with the previous one's value: the last step's result, its
    ``parent`` linking back through the earlier ones (Celery's ``chain.apply``)."""
    result = await steps[0].apply_async(**options)
    for step in steps[1:]:
        if await result.failed():  # the rest of the chain does not run, as in Celery
            break
        current = await step.apply_async((result.result,), **options)
        current.parent = result
        result = current
    return result


def chain(*tasks: Signature, app: Celery | None = None) -> _Chain:
    """``chain(add.s(1, 2), add.s(3))``: run steps in order, passing results along."""
    flat: list[Signature] = []
    for task in tasks:
        flat.extend(task.tasks if isinstance(task, _Chain) else [task])
    return _Chain(*flat, app=app)


class GroupResult:
    """The results of a group, in the order of its tasks."""

    #: a group is no step of a chain here (an ``AsyncResult``-like attribute, always None)
    parent: AsyncResult | None = None

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

    def __init__(self, *tasks: Signature | Iterable[Signature],
                 app: Celery | None = None) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])  # group([add.s(1, 1), ...])
        self.tasks = cast("list[Signature]", list(tasks))
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

    def __or__(self, body: Signature) -> chord:
        """``group(...) | body`` is a chord, as in Celery."""
        return chord(self, body)


class chord:
    """``chord(header, body)``: the header tasks run in parallel, then the body runs once with
    the list of their results, in header order (``chord(header)(body)`` also works).

    ``await chord([add.s(i, i) for i in range(5)], tsum.s()).apply_async()`` returns the
    body's result (its id assigned before anything is sent); its ``parent`` is the header's
    :class:`GroupResult`. If a header task fails, the body does not run: the worker stores
    ``ChordError`` as the body's result, as Celery does, and sends its ``link_error``.

    Header members are task signatures or chains of them (a chain counts as its last step);
    the body is a task signature. A ``result_backend`` is required: the chord's state lives
    there, in Celery's keys, so Celery and aio-celery workers can share a chord.
    """

    def __init__(self, header: group | Signature | Iterable[Signature],
                 body: Signature | None = None, *, app: Celery | None = None,
                 **options: Any) -> None:
        if isinstance(header, group):
            members: list[Any] = list(header.tasks)
            app = app or header._app
        elif isinstance(header, Signature):
            members = [header]
        else:
            members = list(header)
        self.tasks = [_header_member(member, app) for member in members]
        self.body = None if body is None else _plain(body, app, "the chord body")
        self._app = app
        self.options = options

    def __repr__(self) -> str:
        body = self.body.name if self.body is not None else "<no body>"
        return f"chord([{', '.join(t.name for t in self.tasks)}], {body})"

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def app(self) -> Celery:
        if self._app is not None:
            return self._app
        for sig in [*self.tasks, *([self.body] if self.body is not None else [])]:
            if sig._app is not None:
                return sig._app
        from aio_celery.app import current_app

        return current_app()

    async def __call__(self, body: Signature | None = None, **options: Any) -> AsyncResult:
        """``await chord(header)(body)``: send the chord with this body."""
        return await self.apply_async(body=body, **options)

    async def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return await self.apply_async(args, kwargs)

    async def apply_async(self, args: Any = None, kwargs: dict[str, Any] | None = None, *,
                          body: Signature | None = None, task_id: str | None = None,
                          **options: Any) -> AsyncResult:
        """Send the chord; returns the body's result.

        ``args``/``kwargs`` are partial arguments for every header task (prepended, as in
        Celery). ``countdown``/``eta`` delay the header; ``link``/``link_error`` go to the
        body; other options (``queue``, ``priority``, ``expires``...) apply to the header
        tasks and the body. ``task_id`` is the body's id (unless the body has one already),
        ``group_id`` the header's.
        """
        app = self.app
        body = self.body if body is None else _plain(body, app, "the chord body")
        if body is None:
            raise TypeError("chord() needs a body: chord(header, body) or chord(header)(body)")
        if app.conf.settings.task_always_eager:  # Celery's chord.apply: header, then body
            header = await group(*self.tasks, app=app).apply_async(args, kwargs)
            done = await body.apply_async((await header.get(),), task_id=task_id)
            done.parent = header  # type: ignore[assignment]
            return done
        options = {**self.options, **options}
        header_delay: dict[str, Any] = {
            k: options.pop(k) for k in ("countdown", "eta") if k in options}
        callbacks = {k: options.pop(k) for k in ("link", "link_error") if k in options}
        group_id = str(options.pop("group_id", None) or uuid.uuid4())
        task_id = task_id or options.pop("task_id", None)
        for key in ("group_index", "chord", "chain", "task_id"):
            options.pop(key, None)

        body = body.clone(**options)
        body_options = body["options"]
        body_options.setdefault("task_id", task_id or str(uuid.uuid4()))
        body_options.setdefault("reply_to", app.oid)
        body_options.setdefault("group_id", group_id)
        for key, value in callbacks.items():
            extra = value if isinstance(value, (list, tuple)) else [value]
            body_options[key] = [*body_options.get(key, []), *(dict(v) for v in extra)]
        result = AsyncResult(body_options["task_id"], app=app)

        if not self.tasks:  # nothing would ever send the body: Celery sends it at once
            await send_signature(app, body.clone([[]]))
            result.parent = GroupResult(group_id, [])  # type: ignore[assignment]
            return result

        body_dict = dict(body)
        await app.backend.set_chord_size(group_id, len(self.tasks))
        sends = [
            _send_member(app, member, index, args, kwargs, body_dict, group_id,
                         {**options, **header_delay})
            for index, member in enumerate(self.tasks)
        ]
        parts = list(await asyncio.gather(*sends))
        result.parent = GroupResult(group_id, parts)  # type: ignore[assignment]
        return result


async def send_signature(app: Celery, sig: Signature, *, chord: dict[str, Any] | None = None,
                         add_to_parent: bool = False, lenient: bool = False,
                         **options: Any) -> AsyncResult:
    """Send ``sig`` as it is (its args, kwargs and options, ``options`` on top), with
    ``chord`` (a chord body) in the message. The ``chord`` option of the signature, set on
    the last step of a chain in a chord header, is moved to the message the same way.

    ``lenient`` drops the options aio-celery does not send (``root_id``, ``parent_id``...),
    for signatures that arrived in a message from Celery.
    """
    merged = {**sig.options, **options}
    body = merged.pop("chord", None)
    if chord is not None:
        body = chord
    if body is not None:
        merged["chord"] = dict(body)
    if lenient:
        unknown = messages.unknown_options(merged)
        if unknown:
            logger.debug("Sending %s without the options %s", sig.name, sorted(unknown))
            for key in unknown:
                del merged[key]
    message, queue = app.build_message(sig.name, sig.args, sig.kwargs, merged,
                                       task=app.tasks.get(sig.name))
    await app.publisher.publish(protocol.encode(message, app.now()), queue)
    result = AsyncResult(message.id, app=app)
    parent = current_request.get()
    if add_to_parent and parent is not None and parent.id is not None:
        parent.children.append(result)
    return result


async def _send_member(app: Celery, member: Signature, index: int, args: Any,
                       kwargs: dict[str, Any] | None, body: dict[str, Any], group_id: str,
                       options: dict[str, Any]) -> AsyncResult:
    """Send one header task (or the first step of a header chain, whose last step carries the
    chord) and return the result the chord waits for."""
    if not isinstance(member, _Chain):
        sig = member.clone(args, kwargs)
        sig["options"].setdefault("task_id", str(uuid.uuid4()))
        return await send_signature(app, sig, chord=body, **options, group_id=group_id,
                                    group_index=index)
    steps, results = member.steps(args, kwargs, app=app)
    if len(steps) == 1:
        await send_signature(app, steps[0], chord=body, **options, group_id=group_id,
                             group_index=index)
        return results[-1]
    # As in Celery, only the last step is a member of the group, and carries the chord.
    steps[-1]["options"].update(chord=body, group_id=group_id, group_index=index)
    await send_signature(app, steps[0], chain=[dict(step) for step in reversed(steps[1:])],
                         **options)
    return results[-1]


def _plain(sig: Any, app: Celery | None, what: str) -> Signature:
    if isinstance(sig, (_Chain, group, chord)) or not isinstance(sig, dict) or sig.get(
            "subtask_type"):
        raise TypeError(f"{what} must be a task signature (add.s(...)), not {sig!r}")
    return sig if isinstance(sig, Signature) else Signature(sig, app=app)


def _header_member(sig: Any, app: Celery | None) -> Signature:
    if isinstance(sig, _Chain):
        for step in sig.tasks:
            _plain(step, app, "a step of a chain in a chord header")
        return sig
    return _plain(sig, app, "a chord header member")
