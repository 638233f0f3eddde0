"""Rules every module of the package keeps, checked on its source with ``ast``.

No ``assert`` statements: ``python -O`` strips them, so an invariant worth checking is
checked with an ``if`` that raises.

No module uses another module's private names. A leading underscore says "only this
module relies on it"; a name that two modules share is API between them and is spelt
without one. This walks every module of ``aio_celery``
and ``supervisor`` and fails on ``from x import _name``, ``import x._name`` and
``x._name`` where ``x`` is another module of ours. Dunder names (``__version__``) are
fine, and so is anything a module does with its own names, or with attributes of objects
(``self._field``), which this check does not see.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("aio_celery", "supervisor")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` in ``current``."""
    if level == 0:
        return module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def ours(name: str) -> bool:
    return name.split(".", maxsplit=1)[0] in PACKAGES


def violations_in(path: Path) -> list[str]:
    where = str(path.relative_to(ROOT))
    return [f"{where}:{line}" for line in violations(
        path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")]


def violations(source: str, current: str, is_package: bool) -> list[str]:
    """``<line> <what>`` for each use of another module's private name in ``source``."""
    tree = ast.parse(source)
    #: local name -> the module of ours it stands for (``import x.y as z``, ``from x import y``)
    modules: dict[str, str] = {}
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += from_import(node, resolve(current, is_package, node.level, node.module),
                                 current, modules)
        elif isinstance(node, ast.Import):
            found += plain_import(node, modules)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            dotted = dotted_name(node.value, modules)
            if dotted is not None and ours(dotted) and dotted != current:
                found.append(f"{node.lineno} {dotted}.{node.attr}")
    return sorted(found, key=lambda line: int(line.split(" ", maxsplit=1)[0]))


def from_import(node: ast.ImportFrom, source: str, current: str,
                modules: dict[str, str]) -> list[str]:
    if not ours(source) or source == current:
        return []
    for alias in node.names:
        modules[alias.asname or alias.name] = f"{source}.{alias.name}"
    return [f"{node.lineno} from {source} import {alias.name}"
            for alias in node.names if is_private(alias.name)]


def plain_import(node: ast.Import, modules: dict[str, str]) -> list[str]:
    found = []
    for alias in node.names:
        if not ours(alias.name):
            continue
        if any(is_private(part) for part in alias.name.split(".")[1:]):
            found.append(f"{node.lineno} import {alias.name}")
        top = alias.name.split(".", maxsplit=1)[0]
        modules[alias.asname or top] = alias.name if alias.asname else top
    return found


def dotted_name(node: ast.expr, modules: dict[str, str]) -> str | None:
    """The module of ours an expression like ``app`` or ``aio_celery.app`` names, if any."""
    if isinstance(node, ast.Name):
        return modules.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value, modules)
        return None if base is None else f"{base}.{node.attr}"
    return None


def all_modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_the_walk_sees_the_packages() -> None:
    names = {module_name(path) for path in all_modules()}
    assert {"aio_celery", "aio_celery.app", "aio_celery.worker.delivery", "supervisor.arbiter"
            } <= names


def test_no_module_uses_another_modules_private_names() -> None:
    found = [line for path in all_modules() for line in violations_in(path)]
    assert found == []


def test_the_check_catches_each_form() -> None:
    source = (
        "from aio_celery.app import _origin\n"
        "from ..app import _new_id\n"
        "from . import _private_module\n"
        "import aio_celery._private\n"
        "import aio_celery.app as app_module\n"
        "from aio_celery import protocol\n"
        "app_module._origin()\n"
        "protocol._repr\n"
        "protocol.__name__\n"
        "self_like = object()\n"
        "self_like._field\n"
        "from aio_celery.worker.probe import _mine\n"
        "from aio_celery.worker.probe import __version__\n"
    )
    assert violations(source, "aio_celery.worker.probe", is_package=False) == [
        "1 from aio_celery.app import _origin",
        "2 from aio_celery.app import _new_id",
        "3 from aio_celery.worker import _private_module",
        "4 import aio_celery._private",
        "7 aio_celery.app._origin",
        "8 aio_celery.protocol._repr",
    ]


def test_no_assert_statements() -> None:
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in all_modules()
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Assert)]
    assert found == []
