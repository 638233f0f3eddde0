"""Celery's result document and stored failures, without Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from aio_celery import exceptions, resultmeta, states
from aio_celery.resultmeta import (
    build_meta,
    decode_meta,
    encode_meta,
    exception_from_dict,
    exception_to_dict,
    result_key,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


class CustomError(Exception):
    """An exception class of this test module."""


class Outer:
    class InnerError(Exception):
        """A nested exception class: stored under its qualname."""


class TwoArgError(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


TRAP_CALLS: list[tuple[Any, ...]] = []


def trap(*args: Any) -> None:
    """A callable that stored data must never get to call."""
    TRAP_CALLS.append(args)


class NotAnException:
    def __init__(self, *args: Any) -> None:
        TRAP_CALLS.append(args)


# --- build_meta -----------------------------------------------------------------------


def test_key() -> None:
    assert result_key("abc") == "celery-task-meta-abc"
    assert resultmeta.KEY_PREFIX == "celery-task-meta-"


def test_success_document() -> None:
    meta = build_meta("t1", states.SUCCESS, {"x": 1}, now=NOW)
    assert meta == {
        "status": "SUCCESS",
        "result": {"x": 1},
        "traceback": None,
        "children": [],
        "date_done": "2026-01-02T03:04:05.678901+00:00",
        "task_id": "t1",
    }
    assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]


@pytest.mark.parametrize("state", sorted(states.READY_STATES))
def test_date_done_for_ready_states(state: str) -> None:
    meta = build_meta("t1", state, None, now=NOW)
    assert meta["date_done"] == NOW.isoformat()
    assert datetime.fromisoformat(meta["date_done"]) == NOW


@pytest.mark.parametrize("state", sorted(states.UNREADY_STATES | {"PROGRESS"}))
def test_no_date_done_for_unready_states(state: str) -> None:
    meta = build_meta("t1", state, {"done": 3}, now=NOW)
    assert "date_done" in meta
    assert meta["date_done"] is None
    assert meta["status"] == state
    assert meta["result"] == {"done": 3}


def test_date_done_keeps_the_clock_offset() -> None:
    cet = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    meta = build_meta("t1", states.SUCCESS, None, now=cet)
    assert meta["date_done"] == "2026-01-02T03:04:05+01:00"


def test_parent_and_group_only_when_set() -> None:
    plain = build_meta("t1", states.SUCCESS, 1, now=NOW, parent_id=None, group_id=None)
    assert "parent_id" not in plain
    assert "group_id" not in plain
    full = build_meta("t1", states.FAILURE, {"exc_type": "E"}, now=NOW, traceback="tb",
                      children=[[["c1", None], None]], parent_id="p1", group_id="g1")
    assert full == {
        "status": "FAILURE",
        "result": {"exc_type": "E"},
        "traceback": "tb",
        "children": [[["c1", None], None]],
        "date_done": NOW.isoformat(),
        "group_id": "g1",
        "parent_id": "p1",
        "task_id": "t1",
    }
    assert list(full)[-3:] == ["group_id", "parent_id", "task_id"]


@pytest.mark.interop
def test_document_has_the_keys_celerys_redis_backend_writes() -> None:
    from celery import Celery as RealCelery

    real = RealCelery("meta-shape", backend="redis://127.0.0.1:6379/0", set_as_current=False)
    try:
        request = SimpleNamespace(id="t1", group="g1", parent_id="p1", children=[])
        theirs = real.backend._get_result_meta(5, "SUCCESS", None, request,
                                                format_date=True, encode=False)
        theirs["task_id"] = "t1"  # RedisBackend._store_result adds it last
        ours = build_meta("t1", "SUCCESS", 5, now=NOW, parent_id="p1", group_id="g1")
        assert list(ours) == list(theirs)
        assert {k: v for k, v in ours.items() if k != "date_done"} == {
            k: v for k, v in theirs.items() if k != "date_done"}
        assert datetime.fromisoformat(theirs["date_done"]).tzinfo is not None

        bare = SimpleNamespace(id="t2", group=None, parent_id=None, children=[])
        theirs = real.backend._get_result_meta(None, "STARTED", None, bare,
                                                format_date=True, encode=False)
        theirs["task_id"] = "t2"
        assert build_meta("t2", "STARTED", None, now=NOW) == theirs
    finally:
        real.close()


def test_encode_decode_meta() -> None:
    meta = build_meta("t1", states.SUCCESS, {"when": NOW, "n": [1, 2]}, now=NOW)
    raw = encode_meta(meta)
    assert isinstance(raw, bytes)
    assert json.loads(raw)["result"]["when"] == {"__type__": "datetime",
                                                 "__value__": NOW.isoformat()}
    assert decode_meta(raw) == meta
    assert decode_meta(raw.decode()) == meta


def test_encode_meta_refuses_non_json_result() -> None:
    with pytest.raises(TypeError):
        encode_meta(build_meta("t1", states.SUCCESS, object(), now=NOW))


@pytest.mark.parametrize("raw", [b"[1, 2]", b'{"result": 1}', b"42"])
def test_decode_meta_refuses_non_documents(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_meta(raw)


# --- exceptions -----------------------------------------------------------------------


def roundtrip(exc: BaseException) -> BaseException:
    """Store and read back through JSON, as the Redis backend does."""
    return exception_from_dict(json.loads(json.dumps(exception_to_dict(exc))))


def test_builtin_exception_dict() -> None:
    assert exception_to_dict(ValueError("a", 1)) == {
        "exc_type": "ValueError",
        "exc_message": ["a", 1],
        "exc_module": "builtins",
    }


@pytest.mark.parametrize(
    "exc",
    [ValueError("a", 1), KeyError("k"), ZeroDivisionError("division by zero"),
     RuntimeError(), OSError(2, "No such file"), TimeoutError("slow")],
)
def test_builtin_roundtrip(exc: BaseException) -> None:
    back = roundtrip(exc)
    assert type(back) is type(exc)
    assert back.args == exc.args


def test_custom_exception_roundtrip() -> None:
    stored = exception_to_dict(CustomError("boom", 3))
    assert stored == {"exc_type": "CustomError", "exc_message": ["boom", 3],
                      "exc_module": __name__}
    back = roundtrip(CustomError("boom", 3))
    assert type(back) is CustomError
    assert back.args == ("boom", 3)


def test_nested_class_uses_qualname() -> None:
    stored = exception_to_dict(Outer.InnerError("deep"))
    assert stored["exc_type"] == "Outer.InnerError"
    assert stored["exc_module"] == __name__
    back = exception_from_dict(stored)
    assert type(back) is Outer.InnerError
    assert back.args == ("deep",)


def test_unknown_module_gives_remote_task_error() -> None:
    back = exception_from_dict({"exc_type": "ReallyBadError",
                                "exc_message": ["it broke", 7],
                                "exc_module": "some_project.errors_not_installed"})
    assert type(back) is exceptions.RemoteTaskError
    assert back.exc_type == "ReallyBadError"
    assert back.exc_module == "some_project.errors_not_installed"
    assert back.args == ("it broke", 7)
    assert "ReallyBadError" in str(back)
    assert "it broke" in str(back)


def test_unknown_class_in_known_module_gives_remote_task_error() -> None:
    back = exception_from_dict({"exc_type": "NoSuchError", "exc_message": ["x"],
                                "exc_module": __name__})
    assert isinstance(back, exceptions.RemoteTaskError)
    assert back.exc_type == "NoSuchError"
    assert back.args == ("x",)


def test_modules_are_never_imported_for_stored_data() -> None:
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    back = exception_from_dict({"exc_type": "Zen", "exc_message": ["x"], "exc_module": "this"})
    assert isinstance(back, exceptions.RemoteTaskError)
    assert "this" not in sys.modules


def test_non_exception_callable_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    system_calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(os, "system", lambda *args: system_calls.append(args))
    back = exception_from_dict({"exc_module": "os", "exc_type": "system",
                                "exc_message": ["echo pwned"]})
    assert isinstance(back, exceptions.RemoteTaskError)
    assert back.exc_type == "system"
    assert back.exc_module == "os"
    assert back.args == ("echo pwned",)
    assert system_calls == []


@pytest.mark.parametrize("exc_type", ["trap", "NotAnException"])
def test_non_exception_names_in_this_module_are_never_called(exc_type: str) -> None:
    TRAP_CALLS.clear()
    back = exception_from_dict({"exc_module": __name__, "exc_type": exc_type,
                                "exc_message": ["payload"]})
    assert isinstance(back, exceptions.RemoteTaskError)
    assert back.exc_type == exc_type
    assert TRAP_CALLS == []


def test_builtin_non_exception_type_is_refused() -> None:
    back = exception_from_dict({"exc_module": "builtins", "exc_type": "dict",
                                "exc_message": []})
    assert isinstance(back, exceptions.RemoteTaskError)
    assert back.exc_type == "dict"


class StopEverything(BaseException):
    """A BaseException subclass that is not an Exception."""


class Sneaky(Exception):
    """An Exception class whose constructor hands back a SystemExit."""

    def __new__(cls, *args: Any) -> Any:
        return SystemExit(*args)


@pytest.mark.parametrize(("exc", "module", "exc_type"), [
    (SystemExit(3), "builtins", "SystemExit"),
    (KeyboardInterrupt(), "builtins", "KeyboardInterrupt"),
    (GeneratorExit("closed"), "builtins", "GeneratorExit"),
    (BaseException("base"), "builtins", "BaseException"),
    (asyncio.CancelledError("cancelled"), "asyncio.exceptions", "CancelledError"),
    (StopEverything("stop"), __name__, "StopEverything"),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_base_exceptions_come_back_as_remote_task_error(
        exc: BaseException, module: str, exc_type: str) -> None:
    """Raising a rebuilt SystemExit would exit the client, a KeyboardInterrupt kill it."""
    back = roundtrip(exc)
    assert type(back) is exceptions.RemoteTaskError
    assert (back.exc_module, back.exc_type, back.args) == (module, exc_type, exc.args)
    with pytest.raises(exceptions.RemoteTaskError, match=exc_type):
        raise back


def test_a_constructor_that_returns_a_base_exception_is_not_trusted() -> None:
    back = exception_from_dict({"exc_type": "Sneaky", "exc_message": [3],
                                "exc_module": __name__})
    assert type(back) is exceptions.RemoteTaskError
    assert back.args == (3,)


def test_constructor_with_other_signature_gives_remote_task_error() -> None:
    back = roundtrip(TwoArgError("a", "b"))
    assert isinstance(back, exceptions.RemoteTaskError)
    assert back.exc_type == "TwoArgError"
    assert back.args == ("a/b",)


@pytest.mark.parametrize("data", [None, "oops", 42, {"exc_message": ["no type"]}])
def test_garbage_gives_remote_task_error(data: Any) -> None:
    assert isinstance(exception_from_dict(data), exceptions.RemoteTaskError)


def test_message_may_be_a_plain_string() -> None:
    back = exception_from_dict({"exc_type": "ValueError", "exc_message": "single",
                                "exc_module": "builtins"})
    assert type(back) is ValueError
    assert back.args == ("single",)


def test_missing_module_means_builtins() -> None:
    back = exception_from_dict({"exc_type": "KeyError", "exc_message": ["k"]})
    assert type(back) is KeyError
    assert back.args == ("k",)


MIRRORED = [
    exceptions.NotRegistered("proj.missing"),
    exceptions.MaxRetriesExceededError("too many"),
    exceptions.TaskRevokedError("expired"),
    exceptions.SoftTimeLimitExceeded("soft"),
    exceptions.TimeLimitExceeded(30.0),
    exceptions.TimeoutError("slow"),
    exceptions.Retry("again", None, 5),
    exceptions.WorkerLostError("Worker exited prematurely"),
]


@pytest.mark.parametrize("exc", MIRRORED, ids=lambda e: type(e).__name__)
def test_mirrored_classes_are_stored_as_celerys(exc: BaseException) -> None:
    stored = exception_to_dict(exc)
    assert stored["exc_module"] == "celery.exceptions"
    assert stored["exc_type"] == type(exc).__name__
    back = exception_from_dict(json.loads(json.dumps(stored)))
    assert type(back) is type(exc)
    assert type(back).__module__ == "aio_celery.exceptions"
    assert back.args == exc.args


@pytest.mark.interop
@pytest.mark.parametrize("exc", MIRRORED, ids=lambda e: type(e).__name__)
def test_mirrored_names_exist_in_celery(exc: BaseException) -> None:
    import celery.exceptions

    assert isinstance(getattr(celery.exceptions, type(exc).__name__), type)


@pytest.mark.interop
def test_a_celery_client_rebuilds_a_stored_worker_lost_error() -> None:
    import celery
    import celery.exceptions

    app = celery.Celery(set_as_current=False)
    stored = exception_to_dict(exceptions.WorkerLostError("Worker exited prematurely"))
    rebuilt = app.backend.exception_to_python(json.loads(json.dumps(stored)))
    assert isinstance(rebuilt, celery.exceptions.WorkerLostError)
    assert rebuilt.args == ("Worker exited prematurely",)


def test_celery_stored_mirrored_failure_reads_as_ours() -> None:
    back = exception_from_dict({"exc_type": "TimeLimitExceeded", "exc_message": [60.0],
                                "exc_module": "celery.exceptions"})
    assert type(back) is exceptions.TimeLimitExceeded
    assert back.args == (60.0,)


def test_own_unmirrored_classes_keep_their_module() -> None:
    stored = exception_to_dict(exceptions.BackendError("x"))
    assert stored["exc_module"] == "aio_celery.exceptions"
    assert type(exception_from_dict(stored)) is exceptions.BackendError


def test_non_json_args_become_repr() -> None:
    marker = object()
    stored = exception_to_dict(ValueError("text", marker, {1, 2}, b"\xff", 3))
    assert stored["exc_message"][0] == "text"
    assert stored["exc_message"][1] == repr(marker)
    assert stored["exc_message"][2] == repr({1, 2})
    assert stored["exc_message"][3] == b"\xff"  # bytes are a kombu-tagged JSON type
    assert stored["exc_message"][4] == 3
    encode_meta(build_meta("t1", states.FAILURE, stored, now=NOW))  # storable


@pytest.mark.interop
@pytest.mark.parametrize(
    "exc",
    [ValueError("a", 1), CustomError("boom", [1, 2]), Outer.InnerError("deep"),
     KeyError("k"), ValueError("x", object())],
    ids=lambda e: type(e).__qualname__,
)
def test_exception_dict_matches_celery(exc: BaseException) -> None:
    from celery import Celery as RealCelery

    real = RealCelery("exc-shape", backend="redis://127.0.0.1:6379/0", set_as_current=False)
    try:
        theirs = real.backend.prepare_exception(exc)
        ours = exception_to_dict(exc)
        assert ours["exc_type"] == theirs["exc_type"]
        assert ours["exc_module"] == theirs["exc_module"]
        assert ours["exc_message"] == list(theirs["exc_message"])
        # and Celery reads ours back as the same class
        rebuilt = real.backend.exception_to_python(ours)
        assert type(rebuilt) is type(exc)
    finally:
        real.close()
