"""Node names from Celery's ``-n/--hostname`` templates (pure; the host is passed in).

Celery expands ``%h`` (the host name), ``%n`` (its first label), ``%d`` (its domain),
``%i`` (the pool process index, ``0`` in the main process) and ``%I`` (``-<index>``, empty
in the main process); ``%%`` is a literal ``%`` (``celery/utils/nodenames.py``).

Every child of our supervisor is a node of its own (it consumes its own mailbox), so its
name must differ from its siblings': a template without ``%i``/``%I`` gets ``-<index>``
appended to its name part, as ``aio_celery@host`` has always become ``aio_celery-1@host``.
"""

from __future__ import annotations

import re

#: the default template: ``aio_celery-1@host``, ``aio_celery-2@host``... under the
#: supervisor, ``aio_celery@host`` for a worker run alone (``-P solo``)
DEFAULT_TEMPLATE = "aio_celery%I@%h"
_FORMAT = re.compile(r"%([%\w])")
_INDEXED = re.compile(r"(?<!%)%[iI]")


def expand(template: str, host: str, index: int | None = None) -> str:
    """The node name ``template`` gives on ``host`` in child ``index`` (None: no pool).

    A template without ``@`` is a name on ``host`` (Celery's ``default_nodename``).
    ValueError for an unknown ``%x``, naming it, as Celery does."""
    name = template if "@" in template else f"{template or 'celery'}@%h"
    first, _, domain = host.partition(".")
    keys = {"h": host, "n": first, "d": domain, "%": "%",
            "i": str(index) if index else "0",
            "I": f"-{index}" if index else ""}

    def resolve(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in keys:
            raise ValueError(f"unknown format key %{key} in node name {template!r} "
                             "(known: %h %n %d %i %I %%)")
        return keys[key]

    return _FORMAT.sub(resolve, name)


def for_child(template: str, host: str, index: int) -> str:
    """The node name of supervised child ``index`` (1-based): distinct per child even when
    the template names no index (then ``-<index>`` goes at the end of the name part)."""
    if not _INDEXED.search(template):
        name, at, rest = template.partition("@")
        template = f"{name}%I{at}{rest}" if at else f"{name or 'celery'}%I"
    return expand(template, host, index)
