"""The defaults are written once (aio_celery.defaults); the settings, the CLI, the worker's
and the supervisor's options, the README and the systemd units must all say the same."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from aio_celery import cli, defaults
from aio_celery.config import Settings
from aio_celery.worker.options import WorkerOptions
from supervisor import SupervisorOptions
from supervisor.arbiter import WARM_GRACE

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: a row of the README's settings table: | `name` | `default` | what it does |
_ROW = re.compile(r"^\| `(?P<name>[a-z_]+)` \| (?P<value>[^|]*) \|", re.MULTILINE)
_SETTINGS = {f.name: f for f in dataclasses.fields(Settings)}


def _readme_settings() -> dict[str, str]:
    rows = {m["name"]: m["value"].strip() for m in _ROW.finditer(README)
            if m["name"] in _SETTINGS}
    assert len(rows) > 30, "the README's settings table was not found"
    return rows


def _parse(text: str) -> Any:
    """A README cell: `None`, `True`, a number or a word, in backticks."""
    inner = text.strip("`")
    if inner in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[inner]
    try:
        return float(inner)
    except ValueError:
        return inner


def _default(name: str) -> Any:
    field = _SETTINGS[name]
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING \
        else field.default
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def test_every_default_in_the_readme_settings_table_is_the_settings_default() -> None:
    rows = _readme_settings()
    # the table shows each setting that has a plain default with that default
    checked = {name: cell for name, cell in rows.items() if cell.startswith("`")}
    assert {"worker_shutdown_timeout", "worker_prefetch_multiplier", "worker_unacked_max_age",
            "worker_max_task_deaths", "worker_max_pending_results"} <= set(checked)
    wrong = {name: (cell, _default(name)) for name, cell in checked.items()
             if _parse(cell) != _default(name)}
    assert not wrong, f"README settings table disagrees with Settings: {wrong}"


def test_the_settings_read_the_shared_defaults() -> None:
    settings = Settings()
    assert settings.worker_shutdown_timeout == defaults.SHUTDOWN_TIMEOUT
    assert settings.worker_prefetch_multiplier == defaults.PREFETCH_MULTIPLIER
    assert settings.worker_unacked_max_age == defaults.UNACKED_MAX_AGE
    assert settings.worker_max_task_deaths == defaults.MAX_TASK_DEATHS
    assert settings.worker_max_pending_results == defaults.MAX_PENDING_RESULTS


def test_the_worker_and_supervisor_options_read_the_shared_defaults() -> None:
    options = WorkerOptions()
    assert options.concurrency == defaults.CONCURRENCY
    assert options.eta_horizon == defaults.ETA_HORIZON
    assert options.heartbeat_interval == defaults.HEARTBEAT_INTERVAL
    fields = {f.name: f.default for f in dataclasses.fields(SupervisorOptions)}
    assert fields["shutdown_timeout"] == defaults.SHUTDOWN_TIMEOUT
    assert fields["heartbeat_timeout"] == defaults.HEARTBEAT_TIMEOUT
    assert fields["startup_timeout"] == defaults.STARTUP_TIMEOUT
    assert WARM_GRACE == defaults.WARM_GRACE


def _worker_options() -> dict[str, click.Option]:
    command = cli.main.commands["worker"]
    return {param.name: param for param in command.params
            if isinstance(param, click.Option) and param.name}


@pytest.mark.parametrize(("option", "value"), [
    ("concurrency", defaults.CONCURRENCY),
    ("eta_horizon", defaults.ETA_HORIZON),
    ("heartbeat_timeout", defaults.HEARTBEAT_TIMEOUT),
    ("startup_timeout", defaults.STARTUP_TIMEOUT),
    ("heartbeat_interval", defaults.HEARTBEAT_INTERVAL),
])
def test_the_cli_defaults_are_the_shared_ones(option: str, value: float) -> None:
    assert _worker_options()[option].default == value


def test_worker_help_states_the_shared_defaults() -> None:
    """Options whose default comes from the app's settings name it in their help text."""
    text = " ".join(CliRunner().invoke(
        cli.main, ["worker", "--help"], terminal_width=200).output.split())
    assert f"default {defaults.SHUTDOWN_TIMEOUT:g};" in text
    assert f"kills children {defaults.WARM_GRACE:g} s after it" in text
    assert f"worker_unacked_max_age, {defaults.UNACKED_MAX_AGE:g};" in text
    assert f"worker_max_task_deaths, {defaults.MAX_TASK_DEATHS})" in text
    assert f"--concurrency INTEGER RANGE Tasks running at once in each process. " \
           f"[default: {defaults.CONCURRENCY}; x>=1]" in text


def test_the_readme_worker_section_states_the_shared_defaults() -> None:
    prose = " ".join(README.split())
    assert f"`--concurrency` (tasks at once per process, default {defaults.CONCURRENCY})" \
        in prose
    assert f"the supervisor kills stragglers {defaults.WARM_GRACE:g} s later" in prose


@pytest.mark.parametrize("unit", ["aio-celery.service", "aio-celery@.service"])
def test_systemd_stops_after_the_shutdown_timeout_and_the_grace(unit: str) -> None:
    text = (ROOT / "systemd" / unit).read_text(encoding="utf-8")
    given = re.search(r"--shutdown-timeout (\d+)", text)
    stop = re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE)
    assert given is not None and stop is not None
    assert float(given[1]) == defaults.SHUTDOWN_TIMEOUT
    assert float(stop[1]) > defaults.SHUTDOWN_TIMEOUT + defaults.WARM_GRACE
