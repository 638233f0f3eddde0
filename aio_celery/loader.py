"""Find the user's app from ``module:attribute``, telling apart a missing module from a
module that failed to import."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aio_celery.app import Celery


class AppLoadError(Exception):
    """The app could not be loaded; the message says why and what to do."""


def load_app(spec: str) -> Celery:
    """Import ``module:attr`` (``module`` alone looks for ``app`` then ``celery``)."""
    from aio_celery.app import Celery

    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise AppLoadError(f"{spec!r}: expected module:app, e.g. proj.tasks:app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppLoadError(
                f"module {module_name!r} not found (sys.path[0]={sys.path[0]!r}); "
                "run from the directory that contains it or set PYTHONPATH") from exc
        raise AppLoadError(_import_failed(module_name)) from exc
    except Exception as exc:
        raise AppLoadError(_import_failed(module_name)) from exc
    names = [attr] if attr else ["app", "celery"]
    for name in names:
        candidate = getattr(module, name, None)
        if isinstance(candidate, Celery):
            return candidate
        if candidate is not None and attr:
            raise AppLoadError(f"{spec!r} is a {type(candidate).__name__}, not a Celery app")
    raise AppLoadError(f"module {module_name!r} has no Celery app named {' or '.join(names)}")


def _import_failed(module_name: str) -> str:
    return (f"module {module_name!r} failed to import; its error:\n"
            f"{traceback.format_exc().rstrip()}")
