"""``memory://``: a broker and a result backend in this process, for tests.

``broker_url="memory://"`` and ``result_backend="memory://"`` let a worker run in the
test's own event loop with nothing installed (no RabbitMQ, no Redis, no redis-py), on the
same code path as with RabbitMQ: see :mod:`aio_celery.testing` and the README's
"Testing without a broker". A client and a worker of the same URL share its queues and
results; ``memory://name`` keeps a separate set.
"""

from aio_celery.memory.backend import MemoryBackend, backend_for
from aio_celery.memory.broker import MemoryBroker, broker_for
from aio_celery.memory.broker import reset as _reset_brokers
from aio_celery.memory.transport import MemoryConsumer, MemoryPublisher, is_memory_url

__all__ = ["MemoryBackend", "MemoryBroker", "MemoryConsumer", "MemoryPublisher",
           "backend_for", "broker_for", "is_memory_url", "reset"]


def reset() -> None:
    """Forget every memory broker's queues and every memory backend's results."""
    from aio_celery.memory.backend import reset as reset_backends

    _reset_brokers()
    reset_backends()
