"""The RabbitMQ 4.x layer: one node from ``scripts/rabbitmq4`` (RabbitMQ 4.0.5 from a Debian
trixie chroot, with 4.3's defaults for the deprecated ``global_qos`` and
``transient_nonexcl_queues`` both denied), started once for the layer and stopped at its
end. Every test here talks to that node: ``amqp_url`` is its URL, so the ``app`` and
``start_worker`` fixtures of ``services.py`` use it. Redis is the shared one.

A queue we declare that is neither durable nor exclusive makes this node close the
connection (541), and a global QoS is ignored: the tests pin how we fare there.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# The real servers (Redis for the results): ``_services_up`` fails every test when one is
# missing; ``amqp_url`` below replaces the main broker's.
from services import *  # noqa: F403  (fixtures: pytest finds them by name in this module)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq4"
PORT = int(os.environ.get("AIO_CELERY_RMQ4_PORT", "5740"))
URL = f"amqp://guest:guest@127.0.0.1:{PORT}//"
#: a boot takes ~8 s (a first one bootstraps the chroot: about a minute more)
START_TIMEOUT, STOP_TIMEOUT = 300.0, 120.0


def _script(*args: str, timeout: float) -> str | None:
    """Run ``scripts/rabbitmq4 ARGS``; None when it succeeded, else what went wrong. It runs
    in a session of its own, so a timeout kills what it started too (a debootstrap)."""
    process = subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "AIO_CELERY_RMQ4_PORT": str(PORT)})
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return f"scripts/rabbitmq4 {' '.join(args)} took over {timeout:.0f}s\n{output}"
    if process.returncode != 0:
        return f"scripts/rabbitmq4 {' '.join(args)} exited with {process.returncode}\n{output}"
    return None


@pytest.fixture(scope="session")
def rabbitmq4() -> Iterator[str]:
    """The 4.x node's AMQP URL, while it runs; stopped at the end whatever happened (a
    failed start and a failed stop are both reported)."""
    failed_start = _script("start", timeout=START_TIMEOUT)
    try:
        if failed_start is None:
            yield URL
    finally:
        failed_stop = _script("stop", timeout=STOP_TIMEOUT)
        problems = [problem for problem in (failed_start, failed_stop) if problem]
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def amqp_url(rabbitmq4: str) -> str:
    return rabbitmq4
