"""The worker command's event options reach WorkerOptions as Celery's flags mean them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from aio_celery import cli
from aio_celery.worker.options import WorkerOptions


@pytest.mark.parametrize(("args", "task_events", "interval"), [
    ([], None, 2.0),  # None: the app's worker_send_task_events decides
    (["-E"], True, 2.0),
    (["--task-events", "--heartbeat-interval", "0.5"], True, 0.5),
    (["--without-heartbeat"], None, None),
])
def test_event_options(monkeypatch: pytest.MonkeyPatch, args: list[str],
                       task_events: bool | None, interval: float | None) -> None:
    seen: list[WorkerOptions] = []

    def solo(app: str, options: WorkerOptions, *_: object) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(cli, "_solo", solo)
    result = CliRunner().invoke(cli.main, ["worker", "-P", "solo", "--no-log-config", *args,
                                           "proj:app"])
    assert result.exit_code == 0, result.output
    assert (seen[0].task_events, seen[0].heartbeat_interval) == (task_events, interval)


def test_a_heartbeat_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        WorkerOptions(heartbeat_interval=0)
