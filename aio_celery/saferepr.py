"""Pure: a ``repr`` that is bounded in length and in work, and never raises.

What monitoring and headers show of a task's values (the ``result`` of ``task-succeeded``,
``args``/``kwargs``, an exception, the ``argsrepr`` header) must not cost in proportion to
the value: a task returning a 50 MB list must not make the worker build a 50 MB string.
:func:`saferepr` walks the builtin containers itself and stops once ``maxlen`` characters
are produced, so its work is proportional to ``maxlen``, as with Celery's
``celery.utils.saferepr.saferepr``.

What it gives:

* the text of ``repr(value)`` whenever that has at most ``maxlen`` characters (so Flower
  shows what ``repr`` shows), including ``[...]`` for a container that holds itself;
* otherwise the start of it, cut so that with a final ``...`` it has ``maxlen``
  characters. A cut string's quotes are chosen from the part shown, so they may differ
  from those ``repr`` would choose from the whole string;
* for a value whose ``repr`` raises, ``<unrepresentable TYPE: ERROR>`` in its place.

Walked: ``list``, ``tuple``, ``dict`` (and subclasses that keep their ``repr``),
``set``, ``frozenset``, exceptions with ``BaseException``'s ``repr``; ``str``, ``bytes``
and ``bytearray`` are cut before their ``repr`` is taken. Anything else is ``repr``-ed
whole and then cut: its own ``__repr__`` decides what that costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

#: what ends a cut text
ELLIPSIS = "..."
#: Celery's ``resultrepr_maxsize``, ``argsrepr_maxsize`` and ``kwargsrepr_maxsize``
MAXLEN = 1024


def saferepr(value: Any, maxlen: int = MAXLEN) -> str:
    """``repr(value)`` in at most ``maxlen`` characters (see the module docstring)."""
    if _flat(value):  # the common arguments and results: repr is cheap, and 10x faster
        text = repr(value)
        return text if len(text) <= maxlen else _cut(text, maxlen)
    parts: list[str] = []
    size = 0
    try:
        for piece in _pieces(value, maxlen):
            parts.append(piece)
            size += len(piece)
            if size > maxlen:
                return _cut("".join(parts), maxlen)
    except Exception as exc:  # e.g. a dict changed size while walked
        return unrepresentable(value, exc)
    return "".join(parts)


def _cut(text: str, maxlen: int) -> str:
    if maxlen < len(ELLIPSIS):
        return ELLIPSIS[:maxlen]
    return text[:maxlen - len(ELLIPSIS)] + ELLIPSIS


def unrepresentable(value: Any, exc: BaseException) -> str:
    """What stands for a value whose ``repr`` failed with ``exc``."""
    try:
        reason = repr(exc)
    except Exception:  # the exception's own __repr__ may fail too
        reason = type(exc).__name__
    return f"<unrepresentable {type(value).__name__}: {reason}>"


#: how many items, and how long a string, :func:`_flat` takes: its repr is a few kB at most
_FLAT_ITEMS = 16
_FLAT_CHARS = 64


def _flat(value: Any) -> bool:
    """Whether ``value`` is a short scalar, or a builtin list, tuple or dict of a few of
    them: then ``repr`` costs little whatever ``maxlen`` is."""
    kind = type(value)
    if kind is tuple or kind is list:
        return len(value) <= _FLAT_ITEMS and all(_short_scalar(item) for item in value)
    if kind is dict:
        return len(value) <= _FLAT_ITEMS and all(
            _short_scalar(key) and _short_scalar(item) for key, item in value.items())
    return _short_scalar(value)


def _short_scalar(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is bytes:
        return len(value) <= _FLAT_CHARS
    if kind is int:
        return bool(-(1 << 64) < value < 1 << 64)  # a huge int's repr costs, or raises
    return value is None or kind is bool or kind is float


@dataclasses.dataclass(frozen=True, slots=True)
class _Literal:
    """Text between values (brackets, separators); ``closes``: the id of the container
    whose closing bracket this is, which is no longer being shown after it."""

    text: str
    closes: int | None = None


_COMMA = _Literal(", ")
#: BaseException's own ``args`` slot, as its repr reads it
_EXCEPTION_ARGS: Any = BaseException.__dict__["args"]
_COLON = _Literal(": ")


def _pieces(value: Any, limit: int) -> Iterator[str]:
    """The text of ``repr(value)`` in pieces, without recursion: each container met
    pushes an iterator over its items onto ``stack``. No piece has to be longer than
    ``limit`` + 2 for the caller to see the text is too long."""
    shown: set[int] = set()  # the containers open now: one met again is a self-reference
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        for item in stack[-1]:
            if isinstance(item, _Literal):
                if item.closes is not None:
                    shown.discard(item.closes)
                yield item.text
                continue
            shape = _shape(item)
            if shape is None:
                yield _scalar(item, limit)
                continue
            opening, closing, items = shape
            if id(item) in shown:
                yield opening + ELLIPSIS + closing.lstrip(",")  # as repr: [[...]], ((...),)
                continue
            if isinstance(item, BaseException):
                # repr has no recursion guard for exceptions (only for what they hold):
                # each level adds text, so maxlen still ends a cycle through one.
                yield opening
                stack.append(chain(items, (_Literal(closing),)))
                break
            shown.add(id(item))
            yield opening
            stack.append(chain(items, (_Literal(closing, id(item)),)))
            break  # go on with the container just entered
        else:
            stack.pop()


def _shape(item: Any) -> tuple[str, str, Iterator[Any]] | None:
    """A container's opening and closing text and its items with separators, or None for
    what is not walked."""
    kind = type(item)
    own_repr: object = kind.__repr__
    if kind is set or kind is frozenset:
        if not item:
            return None  # set(), frozenset()
        return ("{" if kind is set else "frozenset({"), ("}" if kind is set else "})"), \
            _separated(item)
    # A subclass keeping the builtin repr is shown as the builtin shows it: by its own
    # items, whatever its __iter__ or items() do.
    if own_repr is list.__repr__:
        return "[", "]", _separated(list.__iter__(item))
    if own_repr is tuple.__repr__:
        return "(", ",)" if tuple.__len__(item) == 1 else ")", \
            _separated(tuple.__iter__(item))
    if own_repr is dict.__repr__:
        return "{", "}", _dict_items(dict.items(item))
    if isinstance(item, BaseException) and own_repr is BaseException.__repr__:
        # BaseException's repr: the class name, then its args as a call
        # the args repr reads (an ``args`` property of a subclass is not them)
        args = _EXCEPTION_ARGS.__get__(item, kind)
        return f"{kind.__name__}(", ")", _separated(args)
    return None


def _separated(items: Iterable[Any]) -> Iterator[Any]:
    for index, item in enumerate(items):
        if index:
            yield _COMMA
        yield item


def _dict_items(pairs: Iterable[tuple[Any, Any]]) -> Iterator[Any]:
    for index, (key, item) in enumerate(pairs):
        if index:
            yield _COMMA
        yield key
        yield _COLON
        yield item


def _scalar(item: Any, limit: int) -> str:
    """``repr(item)``; of a long string or bytes, of its first ``limit`` + 1 characters
    only (longer than ``limit`` already)."""
    try:
        kind = type(item)
        own_repr: object = kind.__repr__
        if own_repr is str.__repr__ or own_repr is bytes.__repr__:
            return repr(item[:limit + 1]) if len(item) > limit else repr(item)
        if kind is bytearray:
            return f"bytearray({bytes(item[:limit + 1])!r})"
        return repr(item)
    except Exception as exc:  # a user's __repr__ fails like any other code
        return unrepresentable(item, exc)
