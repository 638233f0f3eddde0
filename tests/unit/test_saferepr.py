"""The bounded repr of :mod:`aio_celery.saferepr`: ``repr`` itself for what fits, a cut
text for what does not, work bounded by the length asked for, and no exception ever."""

from __future__ import annotations

import time
from collections import namedtuple
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from celery.utils.saferepr import saferepr as celery_saferepr

from aio_celery.saferepr import MAXLEN, saferepr

Point = namedtuple("Point", "x y")


class ListKeepingRepr(list[Any]):
    pass


class DictKeepingRepr(dict[Any, Any]):
    def items(self) -> Any:  # not what dict's repr shows
        return [("other", "pairs")]


class OwnRepr:
    def __repr__(self) -> str:
        return "<own>"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no")


class AppError(Exception):
    pass


def self_holding_list() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def self_holding_dict() -> dict[str, Any]:
    mapping: dict[str, Any] = {"a": 1}
    mapping["me"] = mapping
    return mapping


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


#: values whose repr fits: ours is repr's text
SMALL = [
    0, -1, 1.5, float("inf"), True, None, 3 + 4j, Decimal("1.30"), Fraction(1, 2),
    "", "abc", "it's", 'say "hi"', "a\nb\tc", "é\x00", b"", b"abc", b"\x00\xff", bytearray(b"ab"),
    [], (), {}, set(), frozenset(), [1, 2, 3], (1,), (1, 2), {"a": 1, "b": [1, 2]}, {1, 2, 3},
    frozenset({1}), {(1, 2): "x"}, [[[[[1]]]]], {"a": {"b": {"c": {"d": 1}}}},
    Point(1, 2), ListKeepingRepr([1, "a"]), DictKeepingRepr(x=1), OwnRepr(), range(3),
    ValueError("boom"), KeyError("k"), OSError(2, "No such file"), Exception(),
    AppError("a", [1]), self_holding_list(), self_holding_dict(), nested(300),
    list(range(200)), "x" * (MAXLEN - 2),
]


@pytest.mark.parametrize("value", SMALL, ids=lambda value: type(value).__name__)
def test_what_fits_is_the_text_of_repr(value: Any) -> None:
    assert saferepr(value) == repr(value)


#: values on which Celery's saferepr agrees with ours (and so with repr): what a Celery
#: worker's events show, Flower shows for ours
AGREED = [
    0, -1, 1.5, True, None, 3 + 4j, Decimal("1.30"), "", "abc", 'say "hi"', "é", b"", b"abc",
    [], (), {}, set(), frozenset(), [1, 2, 3], (1,), (1, 2), {"a": 1, "b": [1, 2]}, {1, 2, 3},
    frozenset({1}), {(1, 2): "x"}, [[[1]]], {"a": {"b": {"c": 1}}},
    ListKeepingRepr([1, "a"]), OwnRepr(), range(3), ValueError("boom"),
    {"id": 7, "tags": ("x", "y"), "score": 0.5},
]


@pytest.mark.parametrize("value", AGREED, ids=lambda value: type(value).__name__)
def test_what_fits_is_what_celerys_saferepr_gives(value: Any) -> None:
    assert saferepr(value) == celery_saferepr(value, MAXLEN)


# Where ours differs from Celery's on purpose (ours is repr's text; the SMALL table):
# - quotes and escapes: Celery writes "it's" as 'it\'s' and a newline as itself, and
#   non-UTF-8 bytes as hex (b'00ff'), where repr writes "it's", 'a\nb', b'\x00\xff';
# - Celery shows at most 3 levels ([[[[...]]]]), ours all that fit in maxlen;
# - a container holding itself: Celery '<Recursion on list with id=...>', repr '[...]';
# - namedtuples and Fractions: Celery '(1, 2)' and '1/2', repr 'Point(x=1, y=2)' and
#   'Fraction(1, 2)';
# - the cut: Celery cuts a string at a space and closes the open brackets after '...',
#   so its text may exceed maxlen; ours is repr's text cut to maxlen, '...' included.
@pytest.mark.parametrize("value", [
    "it's", "a\nb", b"\x00\xff", [[[[1]]]], self_holding_list(), Point(1, 2), Fraction(1, 2),
    list(range(1000)),
], ids=lambda value: type(value).__name__)
def test_where_celerys_saferepr_differs_ours_is_repr(value: Any) -> None:
    ours, full = saferepr(value), repr(value)
    assert ours == (full if len(full) <= MAXLEN else full[:MAXLEN - 3] + "...")
    assert celery_saferepr(value, MAXLEN) != ours


@pytest.mark.parametrize("value", [
    "a" * 5000, b"b" * 5000, bytearray(b"c" * 5000), list(range(5000)),
    tuple(range(5000)), {index: str(index) for index in range(2000)}, ValueError("x" * 5000),
    {"rows": [{"id": index, "name": f"n{index}"} for index in range(500)]},
    [OwnRepr()] * 500, nested(500),
], ids=lambda value: type(value).__name__)
def test_what_does_not_fit_is_the_start_of_repr_and_an_ellipsis(value: Any) -> None:
    text = saferepr(value, 100)
    assert len(text) == 100
    assert text == repr(value)[:97] + "..."


@pytest.mark.parametrize("value", [
    {"a": [1, "two", (3.0, None)], "b": {"c": b"d"}},
    (1, "two", 3.0, None, b"d"),  # flat: repr'd at once, then cut
])
def test_every_length_is_respected(value: Any) -> None:
    full = repr(value)
    for maxlen in range(3, len(full) + 3):
        text = saferepr(value, maxlen)
        expected = full if len(full) <= maxlen else full[:maxlen - 3] + "..."
        assert text == expected, maxlen


def test_a_cut_string_takes_its_quotes_from_the_part_shown() -> None:
    # repr picks double quotes for the whole string (it holds a ' and no "); what is
    # shown holds no ', so it is quoted as repr quotes it
    value = "a" * 100 + "'"
    assert saferepr(value, 20) == "'" + "a" * 16 + "..."


class Counted:
    """Counts the reprs taken of its instances."""

    taken = 0

    def __repr__(self) -> str:
        Counted.taken += 1
        return "c"


def test_a_huge_value_costs_no_more_than_a_small_one() -> None:
    one = Counted()
    for value in ([one] * 5_000_000, tuple([one] * 5_000_000),
                  dict.fromkeys(range(1_000_000), one),
                  ValueError(*[one] * 100_000), [[one] * 1_000_000] * 1_000):
        Counted.taken = 0
        assert len(saferepr(value)) == MAXLEN
        # "c, " per item: the items shown and the one that went past the length, no more
        assert Counted.taken <= MAXLEN // 3 + 1
    huge_text = "x" * 50_000_000
    started = time.perf_counter()
    assert saferepr(huge_text) == "'" + "x" * (MAXLEN - 4) + "..."
    assert time.perf_counter() - started < 0.01  # repr() of it alone takes 0.2 s


def test_a_deep_nesting_stops_at_the_length_without_recursing() -> None:
    deep = nested(200_000)  # repr() raises RecursionError on it
    with pytest.raises(RecursionError):
        repr(deep)
    assert saferepr(deep) == "[" * (MAXLEN - 3) + "..."


def test_a_container_holding_itself_is_shown_once() -> None:
    looping = self_holding_list()
    assert saferepr(looping) == "[1, [...]]"
    first: list[Any] = []
    last = first
    for _ in range(10_000):  # a long cycle: cut at the length, long before it closes
        last.append([])
        last = last[0]
    last.append(first)
    assert saferepr(first) == "[" * (MAXLEN - 3) + "..."
    last[0] = last  # a short cycle after a sibling
    assert saferepr([nested(3), last]) == repr([nested(3), last]) == "[[[[[]]]], [[...]]]"


def test_the_same_value_twice_is_not_a_self_reference() -> None:
    shared = [1]
    assert saferepr([shared, shared, (shared,)]) == "[[1], [1], ([1],)]"


def test_a_repr_that_raises_is_named_in_place() -> None:
    assert saferepr(BadRepr()) == "<unrepresentable BadRepr: RuntimeError('no')>"
    assert saferepr([1, BadRepr()]) == "[1, <unrepresentable BadRepr: RuntimeError('no')>]"


def test_a_huge_int_whose_repr_python_refuses_does_not_raise() -> None:
    text = saferepr(10 ** 5000)
    assert text.startswith("<unrepresentable int: ValueError(")


def test_a_dict_changed_while_walked_does_not_raise() -> None:
    class Growing:
        def __init__(self, owner: dict[Any, Any]) -> None:
            self.owner = owner

        def __repr__(self) -> str:
            self.owner[len(self.owner)] = 0
            return "g"

    mapping: dict[Any, Any] = {}
    mapping["g"] = Growing(mapping)
    mapping["h"] = 1
    assert saferepr(mapping).startswith("<unrepresentable dict: RuntimeError(")


class ArgsProperty(Exception):
    @property
    def args(self) -> Any:  # type: ignore[override]  # not what BaseException's repr shows
        return ("fake",)


class LongTuple(tuple[Any, ...]):
    def __len__(self) -> int:  # not what tuple's repr uses
        return 5


def _tuple_holding_itself() -> tuple[Any, ...]:
    inner: list[Any] = []
    outer = (inner,)
    inner.append(outer)
    return outer


def _exception_holding_itself() -> ValueError:
    inner: list[Any] = []
    error = ValueError(inner)
    inner.append(error)  # repr guards the list, not the exception: ValueError([ValueError([...])])
    return error


@pytest.mark.parametrize("value", [
    _tuple_holding_itself(), _exception_holding_itself(), ArgsProperty("real"),
    LongTuple((1,))], ids=["tuple-cycle", "exception-cycle", "args-property", "tuple-len"])
def test_cycles_and_overridden_methods_are_shown_as_repr_shows_them(value: Any) -> None:
    assert saferepr(value) == repr(value)


def test_an_exception_that_holds_itself_directly_ends_at_the_length() -> None:
    error = ValueError()
    error.args = (error,)  # repr itself would recurse until RecursionError
    text = saferepr(error, 100)
    assert len(text) == 100 and text.startswith("ValueError(ValueError(") and text.endswith("...")


@pytest.mark.parametrize("maxlen", [0, 1, 2, 3])
def test_a_length_shorter_than_the_ellipsis_is_respected_too(maxlen: int) -> None:
    assert len(saferepr("x" * 50, maxlen)) == maxlen
