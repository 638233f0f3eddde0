"""The worker's AMQP 0-9-1 client: :mod:`~aio_celery.amqp.wire` (the wire codec of the hot
paths, pure functions, no other aio_celery import) and :mod:`~aio_celery.amqp.connection`
(the asyncio connection on top of it)."""
