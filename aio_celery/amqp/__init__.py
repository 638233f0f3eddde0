"""The worker's AMQP 0-9-1 client, in layers: :mod:`~aio_celery.amqp.wire` (the wire codec
of the hot paths, pure functions), :mod:`~aio_celery.amqp.reader` (the frame reader,
sans-I/O: bytes in, deliveries and methods out), neither importing anything else of
aio_celery, and :mod:`~aio_celery.amqp.connection` (the asyncio connection on top of them:
socket, heartbeats, requests, confirms)."""
