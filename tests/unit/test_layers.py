"""The test layers stay apart: ``tests/unit`` needs no server, every other layer checks for them.

``scripts/test`` runs ``tests/unit`` with RabbitMQ and Redis pointed at closed ports, which
catches a unit test that talks to a server. What it cannot catch is an import: redis-py is
installed wherever the tests run, so a unit module (or the root conftest) importing it would
pass there and break the promise that the layer needs nothing but the package's own
dependencies. And a new layer without the services check would meet a missing server with
connection errors from deep inside a test instead of one clear failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# Imports the root conftest and every unit module with ``redis`` unimportable (a ``None`` in
# ``sys.modules`` makes ``import redis`` raise ImportError), as pytest would: rootdir-style,
# with ``tests/`` and ``tests/unit`` on ``sys.path``. One exception: test_memory_worker runs
# integration test bodies on memory://, and their modules import redis-py (the library, for
# their fixtures; no server is reached on memory://, which the closed ports prove).
_IMPORT_ALL = """
import importlib.util, pathlib, sys
tests = pathlib.Path(sys.argv[1])
sys.modules["redis"] = None
sys.path[:0] = [str(tests), str(tests / "unit")]
failed = []
mirrors = {"test_memory_worker.py"}
for path in [tests / "conftest.py", *sorted((tests / "unit").rglob("*.py"))]:
    if path.name in mirrors:
        continue
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        failed.append(f"{path.relative_to(tests)}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_the_unit_layer_imports_without_redis_py() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _IMPORT_ALL, str(TESTS)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_other_layer_checks_for_the_servers() -> None:
    """A directory of tests under ``tests/`` is the unit layer or takes the service fixtures
    (with ``_services_up``, which fails its tests when a server is missing)."""
    layers = {path.parent for path in TESTS.glob("*/**/test_*.py")}
    tops = {TESTS / layer.relative_to(TESTS).parts[0] for layer in layers}
    assert TESTS / "unit" in tops
    unchecked = sorted(top.name for top in tops - {TESTS / "unit"}
                       if "from services import *" not in _text(top / "conftest.py"))
    assert not unchecked, f"layers without the services check: {unchecked}"


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""
