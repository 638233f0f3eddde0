"""The publisher's retry policy read from Celery's settings (the retries themselves, against
a broker that goes away: ``tests/integration/test_client_publish_retry.py``)."""

from __future__ import annotations

import pytest

from aio_celery.broker import RetryPolicy


def test_the_retry_policy_reads_celerys_keys_and_refuses_others() -> None:
    assert RetryPolicy.from_settings(True, None).pauses() == [0.0, 0.2, 0.2]
    assert RetryPolicy.from_settings(True, {"max_retries": 2, "interval_start": 1,
                                            "interval_step": 1, "interval_max": 5}
                                     ).pauses() == [1, 2]
    assert RetryPolicy.from_settings(False, {"max_retries": 9}).pauses() == []
    with pytest.raises(ValueError, match="unknown key"):
        RetryPolicy.from_settings(True, {"retries": 3})
