"""``python -m aio_celery worker ...``"""

from aio_celery.cli import main

main(prog_name="aio_celery")
