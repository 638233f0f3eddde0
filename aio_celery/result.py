"""``AsyncResult``: a task's state and return value, read from the result backend.

I/O happens only in the coroutines (``get``, ``refresh``, ``ready``, ``successful``,
``failed``, ``forget``); the properties (``state``, ``result``, ``traceback``, ...) show
what the last of them read, so they never block.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from aio_celery import exceptions, resultmeta, states

if TYPE_CHECKING:
    from aio_celery.app import Celery


class AsyncResult:
    """The result of a task, looked up by id."""

    def __init__(self, id: str, *, app: Celery | None = None,
                 parent: AsyncResult | None = None) -> None:
        self.id = id
        self.parent = parent
        self._app = app
        self._meta: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return self.id == other.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def app(self) -> Celery:
        if self._app is None:
            from aio_celery.app import current_app

            self._app = current_app()
        return self._app

    # --- what the last read saw -----------------------------------------------------------

    @property
    def state(self) -> str:
        """The state from the last read (``PENDING`` until something was stored)."""
        return states.PENDING if self._meta is None else str(self._meta["status"])

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the rebuilt exception for a failure (from the last read)."""
        if self._meta is None:
            return None
        if self._meta["status"] in states.EXCEPTION_STATES:
            return resultmeta.exception_from_dict(self._meta.get("result"))
        return self._meta.get("result")

    info = result

    @property
    def traceback(self) -> str | None:
        return None if self._meta is None else self._meta.get("traceback")

    @property
    def date_done(self) -> datetime | None:
        raw = None if self._meta is None else self._meta.get("date_done")
        return datetime.fromisoformat(raw) if raw else None

    @property
    def children(self) -> list[AsyncResult]:
        """Results of the tasks this one started (e.g. the next step of a chain)."""
        raw = [] if self._meta is None else self._meta.get("children") or []
        return [_result_from_tuple(item, self._app) for item in raw]

    # --- reads ----------------------------------------------------------------------------

    async def refresh(self) -> AsyncResult:
        """Read the stored document once."""
        meta = await self.app.backend.get_meta(self.id)
        if meta is not None:
            self._meta = meta
        return self

    async def _ready_meta(self) -> bool:
        if self._meta is None or self._meta["status"] not in states.READY_STATES:
            await self.refresh()
        return self.state in states.READY_STATES

    async def ready(self) -> bool:
        return await self._ready_meta()

    async def successful(self) -> bool:
        return await self._ready_meta() and self.state == states.SUCCESS

    async def failed(self) -> bool:
        return await self._ready_meta() and self.state == states.FAILURE

    async def forget(self) -> None:
        """Delete the stored result."""
        await self.app.backend.forget(self.id)
        self._meta = None

    async def get(self, timeout: float | None = None, propagate: bool = True,
                  **_ignored: Any) -> Any:
        """Wait until the task is ready and return its value.

        One read, then a wait on the result's pub/sub channel (no polling). A failure is
        raised as its rebuilt exception when ``propagate``; ``timeout`` (seconds) raises
        :class:`aio_celery.exceptions.TimeoutError`.
        """
        if self._meta is None or self._meta["status"] not in states.READY_STATES:
            try:
                self._meta = await self.app.backend.wait_for(self.id, timeout)
            except TimeoutError:
                raise exceptions.TimeoutError(
                    f"task {self.id} not ready after {timeout} seconds") from None
        if propagate and self.state in states.PROPAGATE_STATES:
            raise self.result
        return self.result

    wait = get


def _result_from_tuple(item: Any, app: Celery | None) -> AsyncResult:
    """Celery stores a result as ``[[id, parent_or_null], null]``, the parent nested alike."""
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
        task_id, parent = item[0][0], item[0][1] if len(item[0]) > 1 else None
        parent_result = _result_from_tuple(parent, app) if parent else None
        return AsyncResult(str(task_id), app=app, parent=parent_result)
    return AsyncResult(str(item), app=app)


def result_tuple(result: AsyncResult) -> list[Any]:
    """The ``children`` entry Celery stores for a result."""
    parent = result_tuple(result.parent) if result.parent is not None else None
    return [[result.id, parent], None]
