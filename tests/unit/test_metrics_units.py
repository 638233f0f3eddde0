"""The metrics without a broker: the worker's recorder, the task runner's outcomes, the
supervisor's restart causes and files, the CLI without the extra, and the Grafana dashboard
(every metric it queries is one we export)."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Histogram

from aio_celery import Celery, cli, exitcodes, metrics
from aio_celery.metrics import WORKER_METRICS, PrometheusRecorder
from aio_celery.protocol import TaskMessage
from aio_celery.worker.execution import Settle, TaskRunner
from aio_celery.worker.options import WorkerOptions
from supervisor import heartbeat
from supervisor import metrics as restarts
from supervisor.arbiter import Supervisor, SupervisorOptions
from supervisor.child import Child, ChildSpec
from supervisor.exits import classify_exit, restart_cause
from supervisor.metrics import SUPERVISOR_METRICS, NoMetrics
from supervisor.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- the recorder ---------------------------------------------------------------------------

@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def recorder(registry: CollectorRegistry) -> PrometheusRecorder:
    return PrometheusRecorder(registry)


def test_tasks_are_counted_by_name_and_outcome_with_their_runtime(
        registry: CollectorRegistry, recorder: PrometheusRecorder) -> None:
    recorder.task_done("proj.add", metrics.SUCCEEDED, 0.02)
    recorder.task_done("proj.add", metrics.SUCCEEDED, 0.2)
    recorder.task_done("proj.add", metrics.FAILED, 3.0)
    recorder.task_done(metrics.UNKNOWN_TASK, metrics.REJECTED, None)
    ok = {"task": "proj.add", "outcome": "succeeded"}
    assert _sample(registry, "aio_celery_tasks_total", **ok) == 0  # written by flush()
    recorder.flush()
    assert _sample(registry, "aio_celery_tasks_total", **ok) == 2
    assert _sample(registry, "aio_celery_tasks_total", task="proj.add", outcome="failed") == 1
    assert _sample(registry, "aio_celery_tasks_total", task="unknown", outcome="rejected") == 1
    # a message that did not run has no runtime
    assert _sample(registry, "aio_celery_task_runtime_seconds_count", task="proj.add") == 3
    assert _sample(registry, "aio_celery_task_runtime_seconds_count", task="unknown") == 0
    assert _sample(registry, "aio_celery_task_runtime_seconds_sum",
                   task="proj.add") == pytest.approx(3.22)
    assert _sample(registry, "aio_celery_task_runtime_seconds_bucket", task="proj.add",
                   le="0.025") == 1
    assert _sample(registry, "aio_celery_task_runtime_seconds_bucket", task="proj.add",
                   le="0.25") == 2


def test_queue_wait_runs_from_delivery_or_from_the_eta(
        registry: CollectorRegistry, recorder: PrometheusRecorder) -> None:
    now = datetime.datetime(2026, 12, 2, 3, 0, tzinfo=datetime.UTC)

    def clock() -> datetime.datetime:
        return now

    recorder.task_started("proj.add", time.monotonic() - 2.0, None, clock)
    recorder.task_started("proj.add", time.monotonic(), now - datetime.timedelta(seconds=40),
                          clock)
    # an eta tasks starts a little early (a holding queue's TTL): no negative wait
    recorder.task_started("proj.add", time.monotonic(), now + datetime.timedelta(seconds=1),
                          clock)
    recorder.flush()
    assert _sample(registry, "aio_celery_task_queue_wait_seconds_count", task="proj.add") == 3
    total = _sample(registry, "aio_celery_task_queue_wait_seconds_sum", task="proj.add")
    assert 42.0 <= total < 43.0
    assert _sample(registry, "aio_celery_task_queue_wait_seconds_bucket", task="proj.add",
                   le="0.001") == 1


@pytest.mark.parametrize("values", [
    [0.0, 0.001, 0.0010001, 0.3, 7.0, 3600.0, 99999.0],  # on, between and past the bounds
    [0.02] * 5,
    [],
])
def test_a_flush_writes_what_observe_would_have(values: list[float]) -> None:
    """The flush adds to the histogram's bucket values itself (prometheus_client has no
    bulk observe()): what it writes must be what observe() writes, value by value."""
    direct, batched = CollectorRegistry(), CollectorRegistry()
    recorder = PrometheusRecorder(batched)
    reference = Histogram("aio_celery_task_runtime_seconds", "the same", ["task"],
                          registry=direct, buckets=metrics.RUNTIME_BUCKETS).labels("proj.add")
    for value in values:
        recorder.task_done("proj.add", metrics.SUCCEEDED, value)
        reference.observe(value)
    recorder.task_done("proj.add", metrics.SUCCEEDED, 1.0)  # one more, in a second flush
    recorder.flush()
    recorder.task_done("proj.add", metrics.SUCCEEDED, 1.0)
    recorder.flush()
    reference.observe(1.0)
    reference.observe(1.0)

    def runtimes(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {(sample.name, sample.labels.get("le", "")): sample.value
                for family in registry.collect()
                if family.name == "aio_celery_task_runtime_seconds"
                for sample in family.samples if not sample.name.endswith("_created")}

    assert runtimes(batched) == pytest.approx(runtimes(direct))
    assert _sample(batched, "aio_celery_tasks_total", task="proj.add",
                   outcome="succeeded") == len(values) + 2


def test_gauges_and_counters(registry: CollectorRegistry, recorder: PrometheusRecorder) -> None:
    recorder.sample(in_flight=7, prefetched=30)
    recorder.broker_reconnecting()
    recorder.broker_reconnecting()
    recorder.result_store_retried()
    recorder.events_dropped()
    recorder.events_dropped(4)
    assert _sample(registry, "aio_celery_tasks_in_flight") == 7
    assert _sample(registry, "aio_celery_tasks_prefetched") == 30
    recorder.sample(in_flight=0, prefetched=2)
    assert _sample(registry, "aio_celery_tasks_in_flight") == 0
    assert _sample(registry, "aio_celery_broker_reconnects_total") == 2
    assert _sample(registry, "aio_celery_result_store_retries_total") == 1
    assert _sample(registry, "aio_celery_events_dropped_total") == 5


def test_the_catalogue_names_every_metric_the_recorder_exports(
        registry: CollectorRegistry, recorder: PrometheusRecorder) -> None:
    exported = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exported[name] = family.type
    assert exported == WORKER_METRICS


def test_the_null_recorder_records_nothing_and_needs_no_prometheus_client() -> None:
    code = textwrap.dedent("""
        import sys, time
        from aio_celery import metrics
        import aio_celery.worker.worker, aio_celery.cli, supervisor.arbiter
        from supervisor.metrics import NoMetrics
        recorder = metrics.Recorder()
        assert not recorder.enabled
        recorder.task_started("t", time.monotonic(), None, lambda: None)
        recorder.task_done("t", metrics.SUCCEEDED, 0.1)
        recorder.sample(1, 2)
        recorder.broker_reconnecting()
        recorder.result_store_retried()
        recorder.events_dropped(3)
        off = NoMetrics()
        off.open(); off.children(2); off.restarted("crash"); off.child_exited(1); off.close()
        assert not off.reaped(1, "exit code 0 (ok)", False) and off.fds() == []
        loaded = sorted(m for m in sys.modules if m.startswith("prometheus_client"))
        print(loaded)
        sys.exit(1 if loaded else 0)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the task runner's outcomes -------------------------------------------------------------

@pytest.fixture
def worker_app() -> Celery:
    app = Celery("metrics-units", set_as_current=False)

    @app.task(name="m.ok")
    async def ok() -> int:
        return 1

    @app.task(name="m.fail")
    async def fail() -> None:
        raise ValueError("no")

    return app


async def test_the_runner_records_each_outcome(worker_app: Celery,
                                               registry: CollectorRegistry) -> None:
    runner = TaskRunner(worker_app, "unit@host", recorder=PrometheusRecorder(registry))
    info: dict[str, Any] = {"queue": "q", "routing_key": "q", "redelivered": False}
    past = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    assert await runner.run(TaskMessage(id="1", task="m.ok"), info) is Settle.ACK
    assert await runner.run(TaskMessage(id="2", task="m.fail"), info) is Settle.ACK
    assert await runner.run(TaskMessage(id="3", task="m.nope"), info) is Settle.REJECT
    assert await runner.run(TaskMessage(id="4", task="m.ok", expires=past), info) is Settle.ACK
    assert await runner.retire(TaskMessage(id="5", task="m.made-up"), info, 3) is Settle.REJECT
    runner.metrics.flush()
    counts = {(labels["task"], labels["outcome"]): value
              for family in registry.collect() if family.name == "aio_celery_tasks"
              for name, labels, value, *_ in family.samples if name.endswith("_total")}
    assert counts == {("m.ok", "succeeded"): 1, ("m.fail", "failed"): 1,
                      ("unknown", "rejected"): 1, ("m.ok", "revoked"): 1,
                      ("unknown", "retired"): 1}
    assert _sample(registry, "aio_celery_task_runtime_seconds_count", task="m.ok") == 1
    assert _sample(registry, "aio_celery_task_runtime_seconds_count", task="m.fail") == 1
    # made-up names never become labels
    assert runner.label("m.ok") == "m.ok" and runner.label("m.nope") == "unknown"


# --- the supervisor's restart causes (no worker forked) -------------------------------------

class CountingMetrics(NoMetrics):
    def __init__(self) -> None:
        self.restarts: list[str] = []
        self.dead: list[int] = []

    def restarted(self, cause: str) -> None:
        self.restarts.append(cause)

    def child_exited(self, pid: int) -> None:
        self.dead.append(pid)


def _supervisor(**options: Any) -> tuple[Supervisor, CountingMetrics]:
    spec = ChildSpec(app_spec="proj.tasks:app", worker=WorkerOptions(), loglevel="INFO",
                     log_config=False, processes=2)
    counting = CountingMetrics()
    sup = Supervisor(SupervisorOptions(spec=spec, processes=2, **options), metrics=counting)
    sup.notifier = Notifier({})
    return sup, counting


def _record(tmp_path: Path, index: int, pid: int, **state: Any) -> Child:
    record = Child(index=index, pid=pid, beat=heartbeat.HeartbeatFile(str(tmp_path)))
    for name, value in state.items():
        setattr(record, name, value)
    return record


@pytest.mark.parametrize(("code", "last_state", "state", "cause"), [
    (-9, "ready", {}, restarts.CRASH),
    (exitcodes.BROKER_LOST, "ready", {}, restarts.CRASH),
    (exitcodes.OK, "ready", {}, restarts.CRASH),  # exited 0 unasked
    (exitcodes.OK, "stopping", {}, restarts.SIGNALLED),
    (exitcodes.RECYCLE, "stopping", {}, restarts.RECYCLED),
    (-9, "ready", {"killed": True, "restart_cause": restarts.HEARTBEAT_TIMEOUT},
     restarts.HEARTBEAT_TIMEOUT),
    (exitcodes.OK, "stopping", {"retiring": True, "restart_cause": restarts.ROLLING_RESTART},
     restarts.ROLLING_RESTART),
    (exitcodes.OK, "stopping", {"retiring": True}, None),  # scaled down, or shut down
])
def test_each_exit_names_its_restart_cause(tmp_path: Path, code: int, last_state: str,
                                          state: dict[str, Any], cause: str | None) -> None:
    record = _record(tmp_path, 1, 11, **state)
    verdict = classify_exit(code, last_state, asked_to_stop=record.retiring or record.killed,
                            burst=False, ever_ready=True)
    assert restart_cause(verdict, record.restart_cause) == cause


# The children below are real processes (``sleep``): the supervisor reaps them and signals
# them as it would its own.

@pytest.fixture
def sleepers() -> Iterator[Callable[[], int]]:
    """Starts ``sleep`` processes to stand for children; returns their pids."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        started.append(subprocess.Popen(["sleep", "60"]))
        return started[-1].pid

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()  # already reaped by the supervisor: Popen copes


def _killed(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it has exited, leaving it for the supervisor to reap."""
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_a_reaped_child_counts_its_restart_unless_everything_stops(
        tmp_path: Path, sleepers: Callable[[], int]) -> None:
    sup, counting = _supervisor()
    first = sleepers()
    sup.children = {first: _record(tmp_path, 1, first)}
    _killed(first)
    sup.reap()
    assert counting.restarts == [restarts.CRASH] and counting.dead == [first]
    assert not sup.children
    sup.stop("warm")  # no child left to be asked to stop
    second = sleepers()
    sup.children = {second: _record(tmp_path, 2, second)}
    _killed(second)
    sup.reap()
    assert counting.restarts == [restarts.CRASH] and counting.dead == [first, second]


def test_stale_children_carry_the_cause_of_their_kill(
        tmp_path: Path, sleepers: Callable[[], int]) -> None:
    sup, _ = _supervisor(startup_timeout=5.0, heartbeat_timeout=3.0)
    beating = _record(tmp_path, 1, sleepers(), was_ready=True)
    starting = _record(tmp_path, 2, sleepers())
    for record in (beating, starting):
        record.started -= 60
        record.startup_since -= 6
        sup.children[record.pid] = record
    beating.beat.beat(heartbeat.READY)
    starting.beat.beat(heartbeat.STARTING)  # beating, never consuming
    sup.check_heartbeats(time.monotonic())
    assert starting.restart_cause == restarts.STARTUP_TIMEOUT
    assert beating.restart_cause is None
    sup.check_heartbeats(time.monotonic() + 10)  # its loop stopped beating
    assert beating.restart_cause == restarts.HEARTBEAT_TIMEOUT


# --- the supervisor's files (in a process of its own: multiprocess mode is chosen at import) --

def test_the_supervisors_metrics_reach_the_files_and_leave_no_directory() -> None:
    code = textwrap.dedent("""
        import json, os, sys
        from supervisor.metrics import MetricsOptions, PrometheusMetrics
        m = PrometheusMetrics(MetricsOptions(port=0, bind="127.0.0.1"))
        m.open()
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == m.directory
        m.children(3)
        m.restarted("crash"); m.restarted("crash"); m.restarted("recycled")
        from prometheus_client import CollectorRegistry, Histogram
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=m.directory)
        values = {s.name + json.dumps(s.labels, sort_keys=True): s.value
                  for f in registry.collect() for s in f.samples}
        m.close()
        print(json.dumps({"values": values, "left": os.path.exists(m.directory)}))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    values = report["values"]
    assert values['aio_celery_children_alive{}'] == 3
    assert values['aio_celery_child_restarts_total{"cause": "crash"}'] == 2
    assert values['aio_celery_child_restarts_total{"cause": "recycled"}'] == 1
    for cause in restarts.RESTART_CAUSES:  # every series exists from the start
        assert f'aio_celery_child_restarts_total{{"cause": "{cause}"}}' in values
    assert report["left"] is False


# --- the CLI without the extra ---------------------------------------------------------------

def test_metrics_without_prometheus_client_is_a_usage_error_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = metrics.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "prometheus_client" else real(name, *args)

    monkeypatch.setattr(metrics.importlib.util, "find_spec", find_spec)
    result = CliRunner().invoke(cli.main, ["worker", "--metrics-port", "9808", "proj:app"])
    assert result.exit_code == exitcodes.USAGE_ERROR, result.output
    assert "pip install 'aio-celery[prometheus]'" in result.output


# --- the Grafana dashboard ---------------------------------------------------------------------

_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum")}


def _exported_series() -> set[str]:
    series = set()
    for name, kind in {**WORKER_METRICS, **SUPERVISOR_METRICS}.items():
        series.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return series


def _queries(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        for key, value in node.items():
            if key == "definition" and isinstance(value, str):
                found.append(value)
            found += _queries(value)
        return found
    if isinstance(node, list):
        return [query for item in node for query in _queries(item)]
    return []


def test_the_dashboard_queries_only_metrics_we_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = _queries(dashboard)
    assert len(queries) >= 10, "the dashboard lost its panels"
    used = {name for query in queries for name in re.findall(r"\baio_celery_\w+", query)}
    assert used, queries
    unknown = used - _exported_series()
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    shown = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    missing = (set(WORKER_METRICS) | set(SUPERVISOR_METRICS)) - shown
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_the_readme_lists_every_metric_we_export() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(aio_celery_\w+)` \|", readme, flags=re.MULTILINE))
    assert listed == set(WORKER_METRICS) | set(SUPERVISOR_METRICS)
