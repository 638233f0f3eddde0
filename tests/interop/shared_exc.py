"""An exception class both sides import under the same module name, ``shared_exc``.

Our worker stores a failure as ``exc_module="shared_exc", exc_type="SharedError"``; a Celery
client rebuilds the class from ``sys.modules["shared_exc"]``, so the tests import it as
``shared_exc`` too (``tests/interop`` is on ``sys.path`` in both processes).
"""

from __future__ import annotations

from typing import Any


class SharedError(Exception):
    """A custom failure with two arguments."""

    def __init__(self, code: str, detail: Any) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
