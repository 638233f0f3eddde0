"""The public API: exports, no Celery import, typing marker, task registration, signatures."""

from __future__ import annotations

import inspect
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import aio_celery
from aio_celery import Celery, Signature, Task, chain, jsoncodec, shared_task, signature


def test_all_names_exist() -> None:
    missing = [name for name in aio_celery.__all__ if not hasattr(aio_celery, name)]
    assert missing == []
    assert len(set(aio_celery.__all__)) == len(aio_celery.__all__)


def test_all_is_complete() -> None:
    # dir() rather than vars(): the package may load its names lazily on first access
    namespace = {name: getattr(aio_celery, name) for name in dir(aio_celery)
                 if not name.startswith("_")}
    public = {
        name for name, obj in namespace.items()
        if (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").split(".")[0] == "aio_celery"
    }
    assert {"Celery", "Task", "AsyncResult", "shared_task"} <= public  # the check saw them
    assert public - set(aio_celery.__all__) == set()


def test_all_exports_the_documented_api() -> None:
    expected = {"Celery", "Task", "Signature", "signature", "chain", "group", "AsyncResult",
                "GroupResult", "shared_task", "current_app", "current_task", "current_request",
                "Context", "exceptions", "states", "__version__"}
    assert expected <= set(aio_celery.__all__)
    assert aio_celery.signature is aio_celery.Signature


def _all_module_names() -> list[str]:
    names = ["aio_celery"]
    for info in pkgutil.walk_packages(aio_celery.__path__, prefix="aio_celery."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it would run the CLI
            names.append(info.name)
    return names


def test_package_never_imports_celery_or_kombu() -> None:
    modules = _all_module_names()
    assert {"aio_celery.app", "aio_celery.backend", "aio_celery.broker",
            "aio_celery.protocol", "aio_celery.result"} <= set(modules)
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        import aio_celery
        app = aio_celery.Celery("probe", set_as_current=False)
        app.conf.update(result_backend="redis://127.0.0.1:6379/0")
        backend = app.backend
        backend.client  # imports redis lazily
        leaked = sorted(m for m in sys.modules
                        if m == "celery" or m.startswith(("celery.", "kombu")))
        assert not leaked, leaked
        print("ok", len(sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_py_typed_present() -> None:
    marker = Path(aio_celery.__file__).parent / "py.typed"
    assert marker.is_file()


# --- tasks ----------------------------------------------------------------------------


def make_app() -> Celery:
    return Celery("surface", set_as_current=False)


def test_task_requires_async_def() -> None:
    app = make_app()

    def sync_function(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="async def"):
        app.task(sync_function)
    with pytest.raises(TypeError, match="async def"):
        app.task(name="explicit")(sync_function)
    with pytest.raises(TypeError, match="async def"):
        Task(sync_function, name="direct")  # type: ignore[arg-type]
    assert app.tasks == {}


def test_unknown_task_option_is_type_error() -> None:
    app = make_app()

    async def fn() -> None:
        return None

    with pytest.raises(TypeError, match="retires"):
        app.task(retires=3)(fn)
    with pytest.raises(TypeError, match="_private"):
        app.task(_private=True)(fn)
    assert app.tasks == {}


def test_default_name_is_module_dot_function() -> None:
    app = make_app()

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add
    assert app.gen_task_name(add.fn) == f"{__name__}.add"


async def test_task_without_parentheses() -> None:
    app = make_app()

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    assert isinstance(double, Task)
    assert double.app is app
    assert await double(21) == 42
    assert double.__wrapped__.__name__ == "double"


async def test_task_with_parentheses_and_options() -> None:
    app = make_app()

    @app.task(name="custom.name", queue="special", max_retries=7, bind=True,
              autoretry_for=ValueError, priority=3)
    async def bound(self: Task, x: int) -> str:
        return f"{self.name}:{x}"

    assert isinstance(bound, Task)
    assert app.tasks["custom.name"] is bound
    assert bound.name == "custom.name"
    assert bound.queue == "special"
    assert bound.max_retries == 7
    assert bound.priority == 3
    assert bound.autoretry_for == (ValueError,)
    assert await bound(5) == "custom.name:5"

    @app.task()
    async def empty_parens() -> None:
        return None

    assert app.tasks[f"{__name__}.empty_parens"] is empty_parens


def test_shared_task_registers_on_apps_before_and_after() -> None:
    before = make_app()

    @shared_task
    async def shared_probe_plain(x: int) -> int:
        return x

    @shared_task(name="surface.shared_named", max_retries=1)
    async def shared_probe_named(x: int) -> int:
        return x

    after = make_app()
    plain_name = f"{__name__}.shared_probe_plain"
    for app in (before, after):
        assert isinstance(app.tasks[plain_name], Task)
        assert app.tasks[plain_name].app is app
        assert app.tasks["surface.shared_named"].max_retries == 1
        assert app.tasks["surface.shared_named"].app is app
    assert before.tasks[plain_name] is not after.tasks[plain_name]
    assert isinstance(shared_probe_plain, Task)
    assert shared_probe_plain.name == plain_name
    assert shared_probe_named.name == "surface.shared_named"


# --- signatures -----------------------------------------------------------------------


def _app_with_add() -> tuple[Celery, Task]:
    app = make_app()

    @app.task(name="proj.add")
    async def add(x: int, y: int = 0) -> int:
        return x + y

    return app, add


def test_s_and_si() -> None:
    _, add = _app_with_add()
    sig = add.s(1, y=2)
    assert isinstance(sig, Signature)
    assert sig["task"] == "proj.add"
    assert sig["args"] == [1]
    assert sig["kwargs"] == {"y": 2}
    assert sig["options"] == {}
    assert sig["subtask_type"] is None
    assert sig["immutable"] is False
    immutable = add.si(1, 2)
    assert immutable["immutable"] is True
    assert immutable["args"] == [1, 2]


def test_signature_options() -> None:
    _, add = _app_with_add()
    sig = add.signature((1,), {"y": 2}, countdown=10, queue="q")
    assert sig["options"] == {"countdown": 10, "queue": "q"}
    assert sig.name == "proj.add"
    assert sig.args == [1]
    assert sig.kwargs == {"y": 2}


def test_clone_follows_celerys_rules() -> None:
    _, add = _app_with_add()
    partial = add.s(2)
    full = partial.clone((3,), {"y": 4}, countdown=1)
    assert full["args"] == [3, 2]  # new arguments come first, as in Celery
    assert full["kwargs"] == {"y": 4}
    assert full["options"] == {"countdown": 1}
    assert partial["args"] == [2]  # the original is untouched
    frozen = add.si(2).clone((3,), {"y": 4})
    assert frozen["args"] == [2]
    assert frozen["kwargs"] == {}


def test_signature_from_a_received_dict() -> None:
    raw = {"task": "proj.add", "args": [1], "kwargs": {}, "options": {},
           "subtask_type": None, "immutable": False}
    sig = Signature(raw)
    assert sig.name == "proj.add"
    assert dict(sig) == raw


def _json(value: Any) -> Any:
    return json.loads(jsoncodec.dumps(value))


@pytest.mark.interop
def test_signature_dict_keys_equal_celerys() -> None:
    import celery

    theirs = celery.signature("x", args=(1,), kwargs={"a": 1})
    ours = signature("x", args=(1,), kwargs={"a": 1})
    assert set(ours) == set(theirs)


@pytest.mark.interop
def test_signature_dict_equals_celerys_on_the_wire() -> None:
    import celery
    from kombu.utils.json import dumps as kombu_dumps

    _, add = _app_with_add()
    pairs = [
        (signature("x", args=(1,), kwargs={"a": 1}),
         celery.signature("x", args=(1,), kwargs={"a": 1})),
        (add.s(1, y=2), celery.signature("proj.add", args=(1,), kwargs={"y": 2})),
        (add.si(1), celery.signature("proj.add", args=(1,), immutable=True)),
        (add.signature((1,), countdown=5),
         celery.signature("proj.add", args=(1,), countdown=5)),
    ]
    for ours, theirs in pairs:
        assert _json(ours) == json.loads(kombu_dumps(theirs))


@pytest.mark.interop
def test_chain_signature_equals_celerys_on_the_wire() -> None:
    import celery
    from kombu.utils.json import dumps as kombu_dumps

    ours = chain(signature("a", args=(1,)), signature("b"))
    theirs = celery.chain(celery.signature("a", args=(1,)), celery.signature("b"))
    assert _json(ours) == json.loads(kombu_dumps(theirs))
    piped = signature("a", args=(1,)) | signature("b")
    assert _json(piped) == _json(ours)


def test_signature_takes_options_as_keywords_like_celery() -> None:
    # Celery's documented form: signature("tasks.add", args=(2, 2), countdown=10)
    sig = signature("tasks.add", args=(2, 2), countdown=10, queue="q")
    assert sig["options"] == {"countdown": 10, "queue": "q"}
    assert sig["args"] == [2, 2]
    explicit = signature("tasks.add", args=(2, 2), options={"countdown": 10})
    assert explicit["options"] == {"countdown": 10}
