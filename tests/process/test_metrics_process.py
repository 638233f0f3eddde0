"""``aio_celery worker -c 2 --metrics-port``: one ``/metrics`` for the supervisor and its
children, scraped over HTTP while real processes run, crash and are replaced."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from test_supervisor import Supervised, publish, wait_until

from aio_celery import exitcodes
from aio_celery.metrics import WORKER_METRICS
from supervisor.metrics import SUPERVISOR_METRICS

APP_SPEC = "tests.process.metrics_tasks:app"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (0 if there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def exporter_pid(supervisor: int) -> int:
    listing = subprocess.run(["ps", "-o", "pid=,cmd=", "--ppid", str(supervisor)],
                             capture_output=True, text=True, check=False).stdout
    [pid] = [int(line.split()[0]) for line in listing.splitlines()
             if "aio_celery metrics exporter" in line]
    return pid


def scraped_or_nothing(port: int) -> Samples:
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return {}


def test_one_metrics_endpoint_counts_every_childs_tasks_and_the_restarts(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str) -> None:
    port = free_port()
    sup = supervise("--metrics-port", str(port), "--metrics-bind", "127.0.0.1",
                    "--prefetch-multiplier", "1", processes=2, concurrency=2)
    sup.wait_ready(2)
    calls = [("metrics.ok", (0.05,))] * 14 + [("metrics.fail", (0.05,))] * 6
    ids = publish(unique_name, redis_url, calls)

    def all_counted() -> Samples | None:
        samples = scraped_or_nothing(port)
        return samples if value(samples, "aio_celery_tasks_total") == len(ids) else None

    samples = wait_until(all_counted, 30, "/metrics counts every task", sup.diagnostics)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        ran_in = set(client.hgetall(f"{unique_name}:ran").values())
    assert len(ran_in) == 2, f"one child ran every task: the sum proves nothing ({ran_in})"

    assert value(samples, "aio_celery_tasks_total", task="metrics.ok",
                 outcome="succeeded") == 14
    assert value(samples, "aio_celery_tasks_total", task="metrics.fail", outcome="failed") == 6
    assert value(samples, "aio_celery_task_runtime_seconds_count", task="metrics.ok") == 14
    assert value(samples, "aio_celery_task_runtime_seconds_count", task="metrics.fail") == 6
    # each task slept 0.05 s: the runtimes add up to at least that
    assert value(samples, "aio_celery_task_runtime_seconds_sum") >= 20 * 0.05
    assert value(samples, "aio_celery_task_queue_wait_seconds_count") == 20
    assert value(samples, "aio_celery_children_alive") == 2
    assert value(samples, "aio_celery_child_restarts_total") == 0
    names = {name for name, _ in samples}
    for name, kind in {**WORKER_METRICS, **SUPERVISOR_METRICS}.items():
        exported = f"{name}_count" if kind == "histogram" else name
        assert exported in names, f"{name} is not exported"

    os.kill(sup.pids_by_index()[1], signal.SIGKILL)

    def restarted() -> Samples | None:
        samples = scraped_or_nothing(port)
        crashed = value(samples, "aio_celery_child_restarts_total", cause="crash") == 1
        return samples if crashed and sup.all_ready(2) else None

    samples = wait_until(restarted, 30, "/metrics counts the crash", sup.diagnostics)
    assert value(samples, "aio_celery_child_restarts_total") == 1
    # the dead child's counts stay in the sums; its gauges leave them
    assert value(samples, "aio_celery_tasks_total") == len(ids)
    wait_until(lambda: value(scraped_or_nothing(port), "aio_celery_children_alive") == 2, 5,
               "two children alive again", sup.diagnostics)

    # The exporter is supervised too: killed, it is forked again and serves the same sums.
    exporter = exporter_pid(sup.pid)
    os.kill(exporter, signal.SIGKILL)
    sup.wait_for_log(rf"metrics exporter \(pid {exporter}\) exited \(killed by SIGKILL\): "
                     "starting it again", 10)
    samples = wait_until(lambda: scraped_or_nothing(port), 10, "/metrics answers again",
                         sup.diagnostics)
    assert value(samples, "aio_celery_tasks_total") == len(ids)
    assert exporter_pid(sup.pid) != exporter

    assert sup.stop() == exitcodes.OK, sup.diagnostics()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)
    found = re.search(r"Metrics on http://127\.0\.0\.1:\d+/metrics \(files in (\S+)\)", sup.log)
    assert found, sup.log
    assert not os.path.exists(found[1]), "the multiprocess directory outlived the supervisor"


def test_a_metrics_port_in_use_stops_the_start_with_one_line(
        supervise: Callable[..., Supervised]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = supervise("--metrics-port", str(port), "--metrics-bind", "127.0.0.1")
        assert sup.wait(30) == exitcodes.STARTUP_ERROR, sup.diagnostics()
    log = sup.log
    assert f"Cannot serve metrics on 127.0.0.1 port {port}" in log, log
    assert "Started child" not in log, log


def test_a_solo_worker_serves_its_own_metrics(
        supervise: Callable[..., Supervised], unique_name: str, redis_url: str) -> None:
    port = free_port()
    solo = supervise("-P", "solo", "--metrics-port", str(port), "--metrics-bind", "127.0.0.1")
    solo.wait_for_log(rf"Metrics on http://127\.0\.0\.1:{port}/metrics")
    solo.wait_for_log(r"ready: consuming")
    publish(unique_name, redis_url, [("metrics.ok", (0.01,))] * 3 + [("metrics.fail", (0,))])

    def counted() -> Samples | None:
        samples = scraped_or_nothing(port)
        return samples if value(samples, "aio_celery_tasks_total") == 4 else None

    samples = wait_until(counted, 20, "/metrics counts the four tasks", solo.diagnostics)
    assert value(samples, "aio_celery_tasks_total", task="metrics.fail", outcome="failed") == 1
    # prometheus_client's default registry: its process collector is there too
    assert value(samples, "process_resident_memory_bytes") > 0
    assert solo.stop() == exitcodes.OK, solo.diagnostics()
