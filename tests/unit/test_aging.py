"""``aio_celery.worker.aging``: the sweep's arithmetic and the settings it checks."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from aio_celery import preflight
from aio_celery.config import Settings
from aio_celery.exceptions import ConfigurationError
from aio_celery.worker import WorkerOptions, aging


@dataclasses.dataclass
class Job:
    name: str
    arrived: float


def test_the_sweep_runs_ten_times_per_max_age_at_most_every_minute() -> None:
    assert aging.sweep_period(1500.0) == 60.0  # the default: given back 24-25 min old
    assert aging.sweep_period(300.0) == 30.0
    assert aging.sweep_period(2.0) == pytest.approx(0.2)


def test_take_aged_keeps_the_order_of_the_rest() -> None:
    # an eta that fell due joins the ready queue late with its old stamp: not sorted
    ready = collections.deque([Job("a", 5.0), Job("old-eta", 1.0), Job("b", 6.0),
                               Job("c", 3.0)])
    aged = aging.take_aged(ready, cutoff=3.0)
    assert [job.name for job in aged] == ["old-eta", "c"]
    assert [job.name for job in ready] == ["a", "b"]
    assert aging.take_aged(ready, cutoff=3.0) == []
    assert [job.name for job in ready] == ["a", "b"]


def test_max_age_option_overrides_the_setting_and_zero_turns_it_off() -> None:
    assert WorkerOptions().max_age(1500.0) == 1500.0
    assert WorkerOptions().max_age(None) is None
    assert WorkerOptions().max_age(0) is None
    assert WorkerOptions(unacked_max_age=60.0).max_age(1500.0) == 60.0
    assert WorkerOptions(unacked_max_age=0.0).max_age(1500.0) is None
    with pytest.raises(ValueError, match="unacked_max_age"):
        WorkerOptions(unacked_max_age=-1.0)


@pytest.mark.parametrize(("horizon", "setting", "option"), [
    (600.0, 600.0, None),
    (600.0, 1500.0, 300.0),
    (1800.0, 1500.0, None),
])
def test_an_eta_horizon_at_or_past_the_max_age_is_one_clear_error(
        horizon: float, setting: float, option: float | None) -> None:
    options = WorkerOptions(eta_horizon=horizon, unacked_max_age=option)
    with pytest.raises(ConfigurationError) as raised:
        preflight.check(Settings(worker_unacked_max_age=setting), options)
    message = str(raised.value)
    assert message.startswith(f"--eta-horizon ({horizon:g}s) must be below "
                              f"worker_unacked_max_age ({option or setting:g}s)")
    assert "consumer_timeout" in message and "\n" not in message


@pytest.mark.parametrize(("setting", "option"), [
    (1500.0, None),  # the defaults: 600 s horizon, 25 min
    (None, None),  # off: nothing to compare with
    (0, None),
    (1500.0, 0.0),
    (30, 601.0),
])
def test_settings_that_fit_pass(setting: float | None, option: float | None) -> None:
    preflight.check(Settings(worker_unacked_max_age=setting),
                    WorkerOptions(unacked_max_age=option))


@pytest.mark.parametrize("value", ["1500", -5, True])
def test_a_max_age_that_is_not_seconds_is_refused(value: object) -> None:
    with pytest.raises(ConfigurationError, match="worker_unacked_max_age must be a number"):
        preflight.check(Settings(worker_unacked_max_age=value),  # type: ignore[arg-type]
                        WorkerOptions())
