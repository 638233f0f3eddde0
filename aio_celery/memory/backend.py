"""``result_backend="memory://"``: Celery's result documents and chord counters in a dict.

The same operations as :class:`~aio_celery.backend.RedisBackend`, with the same rules:
documents go through the JSON codec both ways (a result that is not JSON fails as it would
with Redis), a stored SUCCESS is never overwritten, ``store_if_status`` checks and writes
in one step, ``wait_for`` wakes on the first ready document. Chords keep Celery's
protocol of the Lua scripts: each header part counted once per ``task_id:group_index``,
one claim (with its expiry) for the part that completes the chord, a ``done`` mark after
the cleanup so that a late duplicate cannot start it again. Results do not expire (the
process is short-lived); nothing is shared with another process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from aio_celery import resultmeta, states
from aio_celery.backend import ChordPart

__all__ = ["MemoryBackend", "backend_for", "reset"]


@dataclasses.dataclass
class _Chord:
    size: int | None = None
    #: ``task_id:score`` -> (score, encoded part)
    parts: dict[str, tuple[float, str]] = dataclasses.field(default_factory=dict)
    claim: str | None = None
    claim_until: float = 0.0
    done: bool = False


class MemoryBackend:
    """Result documents of one ``memory://`` URL in this process."""

    def __init__(self, url: str = "memory://", *, expires: int | None = None) -> None:
        self.url = url
        self.expires = expires
        self._documents: dict[str, bytes] = {}
        self._waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        self._chords: dict[str, _Chord] = {}
        self._groups: dict[str, dict[str, Any]] = {}

    async def close(self) -> None:
        """The results stay until :func:`reset`: a client may read them after the worker
        is gone, as with Redis."""

    # --- results --------------------------------------------------------------------------

    async def store(self, meta: dict[str, Any]) -> None:
        current = self._read(meta["task_id"])
        if current is None or current.get("status") != states.SUCCESS:
            self._write(meta)

    async def store_if_status(self, meta: dict[str, Any], statuses: Iterable[str]) -> bool:
        current = self._read(meta["task_id"])
        if current is not None and current.get("status") not in set(statuses):
            return False
        self._write(meta)
        return True

    def _write(self, meta: dict[str, Any]) -> None:
        task_id = meta["task_id"]
        encoded = resultmeta.encode_meta(meta)  # TypeError for a result that is not JSON
        self._documents[task_id] = encoded
        if meta.get("status") in states.READY_STATES:
            for future in self._waiters.get(task_id, ()):
                if not future.done():
                    future.set_result(resultmeta.decode_meta(encoded))

    def _read(self, task_id: str) -> dict[str, Any] | None:
        raw = self._documents.get(task_id)
        return None if raw is None else resultmeta.decode_meta(raw)

    async def get_meta(self, task_id: str) -> dict[str, Any] | None:
        return self._read(task_id)

    async def forget(self, task_id: str) -> None:
        self._documents.pop(task_id, None)

    async def wait_for(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        meta = self._read(task_id)
        if meta is not None and meta["status"] in states.READY_STATES:
            return meta
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, set())
        waiters.add(future)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            waiters.discard(future)
            if not waiters:
                del self._waiters[task_id]

    # --- chords ---------------------------------------------------------------------------

    async def set_chord_size(self, group_id: str, size: int) -> None:
        chord = self._chords.setdefault(group_id, _Chord())
        chord.size = size
        chord.claim, chord.done = None, False

    async def chord_part_return(self, group_id: str, task_id: str, group_index: int | None,
                                encoded: str, *, claim_expires: int,
                                claim_token: str) -> ChordPart:
        chord = self._chords.setdefault(group_id, _Chord())
        if chord.done:
            return ChordPart(-1, 0, False)
        score = math.inf if group_index is None else float(group_index)
        member = f"{task_id}:{'+inf' if group_index is None else group_index}"
        chord.parts.setdefault(member, (score, encoded))
        ready = len(chord.parts)
        claimed = False
        if chord.size is not None and ready == chord.size and not self._claimed(chord):
            self._claim(chord, claim_token, claim_expires)
            claimed = True
        return ChordPart(ready, chord.size, claimed)

    async def chord_results(self, group_id: str) -> list[bytes | str]:
        chord = self._chords.get(group_id)
        if chord is None:
            return []
        return [value for _, value in sorted(chord.parts.values())]

    async def get_group_meta(self, group_id: str) -> dict[str, Any] | None:
        return self._groups.get(group_id)

    async def chord_claim_extend(self, group_id: str, claim_token: str, expires: int) -> bool:
        chord = self._chords.get(group_id)
        if chord is None:
            return False
        if chord.claim == claim_token and self._claimed(chord):
            self._claim(chord, claim_token, expires)
            return True
        if not self._claimed(chord) and chord.size is not None:
            self._claim(chord, claim_token, expires)
            return True
        return False

    async def chord_cleanup(self, group_id: str, claim_token: str, done_expires: int) -> bool:
        chord = self._chords.get(group_id)
        if chord is None or chord.claim != claim_token or not self._claimed(chord):
            return False
        chord.parts.clear()
        chord.size = None
        chord.claim = None
        chord.done = done_expires > 0
        return True

    async def drop_chord_size(self, group_id: str) -> None:
        chord = self._chords.get(group_id)
        if chord is not None:
            chord.size = None

    @staticmethod
    def _claimed(chord: _Chord) -> bool:
        return chord.claim is not None and chord.claim_until > _now()

    @staticmethod
    def _claim(chord: _Chord, token: str, expires: int) -> None:
        chord.claim, chord.claim_until = token, _now() + expires


def _now() -> float:
    return asyncio.get_running_loop().time()


_backends: dict[str, MemoryBackend] = {}


def backend_for(url: str) -> MemoryBackend:
    """The result store of ``url`` in this process (shared by its client and worker)."""
    backend = _backends.get(url)
    if backend is None:
        backend = _backends[url] = MemoryBackend(url)
    return backend


def reset(url: str | None = None) -> None:
    """Forget the results of ``url``, or of every memory backend."""
    for name in [url] if url is not None else list(_backends):
        _backends.pop(name, None)
