"""Celery's remote control (``celery inspect``/``control``, Flower) for our workers:
node names, the pidbox wire format, the commands, the revoked ids and the mailbox."""
