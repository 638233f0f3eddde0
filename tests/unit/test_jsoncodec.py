"""JSON with kombu's tagged types, proven identical to ``kombu.utils.json``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from aio_celery import jsoncodec

UID = uuid.UUID("5b8e6a52-33c1-4b09-9d2b-2f5c1c2b7a11")

TAGGED: list[tuple[str, Any, dict[str, Any]]] = [
    ("datetime-aware", datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC),
     {"__type__": "datetime", "__value__": "2026-03-04T05:06:07.123456+00:00"}),
    ("datetime-offset", datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-5))),
     {"__type__": "datetime", "__value__": "2026-03-04T05:06:07-05:00"}),
    ("datetime-naive", datetime(2026, 3, 4, 5, 6, 7),
     {"__type__": "datetime", "__value__": "2026-03-04T05:06:07"}),
    ("date", date(2026, 3, 4), {"__type__": "date", "__value__": "2026-03-04"}),
    ("time", time(13, 14, 15, 16), {"__type__": "time", "__value__": "13:14:15.000016"}),
    ("time-aware", time(13, 14, tzinfo=UTC),
     {"__type__": "time", "__value__": "13:14:00+00:00"}),
    ("decimal", Decimal("12.3400"), {"__type__": "decimal", "__value__": "12.3400"}),
    ("decimal-exp", Decimal("-1E+5"), {"__type__": "decimal", "__value__": "-1E+5"}),
    ("uuid", UID, {"__type__": "uuid", "__value__": {"hex": UID.hex}}),
    ("bytes-utf8", "héllo".encode(), {"__type__": "bytes", "__value__": "héllo"}),
    ("bytes-empty", b"", {"__type__": "bytes", "__value__": ""}),
    ("bytes-binary", b"\xff\x00\xfe", {"__type__": "base64", "__value__": "/wD+"}),
]
IDS = [case[0] for case in TAGGED]


@pytest.mark.parametrize(("value", "tagged"), [c[1:] for c in TAGGED], ids=IDS)
def test_tagged_encoding(value: Any, tagged: dict[str, Any]) -> None:
    assert json.loads(jsoncodec.dumps(value)) == tagged


@pytest.mark.parametrize("value", [c[1] for c in TAGGED], ids=IDS)
def test_roundtrip(value: Any) -> None:
    back = jsoncodec.loads(jsoncodec.dumps(value))
    assert type(back) is type(value)
    assert back == value
    if isinstance(value, datetime | time):
        assert back.tzinfo == value.tzinfo


@pytest.mark.parametrize("value", [c[1] for c in TAGGED], ids=IDS)
def test_roundtrip_from_bytes(value: Any) -> None:
    assert jsoncodec.loads(jsoncodec.dumps(value).encode()) == value


def test_nested_structure_roundtrip() -> None:
    value = {
        "args": [1, 2.5, None, True, "ü", [date(2020, 1, 1), {"d": Decimal("1.1")}]],
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "ids": [UID, UID],
        "blob": b"\x80binary",
        "plain": {"__type__": "not-a-tag", "extra": 1},
    }
    assert jsoncodec.loads(jsoncodec.dumps(value)) == value


def test_output_is_ascii_like_kombu() -> None:
    text = jsoncodec.dumps({"name": "Zoë ☃"})
    assert text.isascii()
    assert text == '{"name": "Zo\\u00eb \\u2603"}'


def test_json_reducer_hook() -> None:
    class Point:
        def __json__(self) -> dict[str, int]:
            return {"x": 1, "y": 2}

    assert json.loads(jsoncodec.dumps([Point()])) == [{"x": 1, "y": 2}]


def test_unserializable_object_is_type_error() -> None:
    with pytest.raises(TypeError, match="object"):
        jsoncodec.dumps({"a": object()})


def test_unknown_tag_is_value_error() -> None:
    with pytest.raises(ValueError, match="pickle"):
        jsoncodec.loads('{"__type__": "pickle", "__value__": "gASV"}')


def test_invalid_json_is_value_error() -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads(b"{not json")


# --- same bytes as kombu --------------------------------------------------------------

COMPARED = [
    *(case[1] for case in TAGGED),
    None, True, 0, -7, 1.5, "text", "Zoë ☃", [], {},
    [[1, 2], {"a": 1}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
    {"nested": {"when": datetime(2026, 1, 1, 12, tzinfo=UTC), "ids": [UID],
                "amounts": [Decimal("0.1"), Decimal("2")], "raw": [b"ok", b"\xc3\x28"]}},
]


@pytest.mark.interop
@pytest.mark.parametrize("value", COMPARED, ids=repr)
def test_dumps_identical_to_kombu(value: Any) -> None:
    from kombu.utils.json import dumps as kombu_dumps

    assert jsoncodec.dumps(value) == kombu_dumps(value)


@pytest.mark.interop
@pytest.mark.parametrize("value", COMPARED, ids=repr)
def test_each_side_reads_the_other(value: Any) -> None:
    from kombu.utils.json import dumps as kombu_dumps
    from kombu.utils.json import loads as kombu_loads

    from_kombu = jsoncodec.loads(kombu_dumps(value))
    from_us = kombu_loads(jsoncodec.dumps(value))
    assert from_kombu == value
    assert from_us == value
    assert type(from_kombu) is type(value)
    assert type(from_us) is type(value)


@pytest.mark.interop
def test_loads_agrees_with_kombu_on_raw_documents() -> None:
    from kombu.utils.json import loads as kombu_loads

    documents = [
        b'{"__type__": "datetime", "__value__": "2026-01-01T00:00:00+00:00"}',
        b'[{"__type__": "uuid", "__value__": {"hex": "5b8e6a5233c14b099d2b2f5c1c2b7a11"}}]',
        b'{"__type__": "x", "__value__": 1, "other": 2}',
        b'{"k": {"__type__": "decimal", "__value__": "3.14"}}',
        b'{"__type__": "base64", "__value__": "/wD+"}',
    ]
    for raw in documents:
        assert jsoncodec.loads(raw) == kombu_loads(raw)
        assert jsoncodec.loads(raw.decode()) == kombu_loads(raw.decode())


@pytest.mark.interop
def test_unknown_tag_refused_by_both() -> None:
    from kombu.utils.json import loads as kombu_loads

    raw = '{"__type__": "pickle", "__value__": "gASV"}'
    with pytest.raises(ValueError):
        kombu_loads(raw)
    with pytest.raises(ValueError):
        jsoncodec.loads(raw)
