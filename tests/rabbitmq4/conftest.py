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


def _script(*args: str, timeout: float) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, "AIO_CELERY_RMQ4_PORT": str(PORT)})
    if done.returncode != 0:
        pytest.fail(f"scripts/rabbitmq4 {' '.join(args)} exited with {done.returncode}\n"
                    f"{done.stdout}\n{done.stderr}", pytrace=False)
    return done.stdout


@pytest.fixture(scope="session")
def rabbitmq4() -> Iterator[str]:
    """The 4.x node's AMQP URL, while it runs."""
    try:
        _script("start", timeout=START_TIMEOUT)
        yield URL
    finally:
        _script("stop", timeout=STOP_TIMEOUT)


@pytest.fixture
def amqp_url(rabbitmq4: str) -> str:
    return rabbitmq4
