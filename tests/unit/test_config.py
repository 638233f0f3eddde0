"""``app.conf``: Celery's setting names, checked updates, and URL masking."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from types import SimpleNamespace

import pytest

from aio_celery import Celery
from aio_celery.config import Config, Settings, mask_url
from aio_celery.exceptions import AioCeleryError, ConfigurationError

#: settings aio-celery adds that Celery does not have (everything else uses Celery's name)
AIO_ONLY_SETTINGS = {"broker_publish_timeout", "task_default_retry_delay",
                     "worker_shutdown_timeout", "worker_max_pending_results"}


def test_update_with_celery_names() -> None:
    conf = Config()
    conf.update(
        broker_url="amqp://u:p@rabbit:5672/vh",
        result_backend="redis://cache:6379/3",
        task_default_queue="work",
        task_routes={"a.*": {"queue": "a"}},
        result_expires=3600,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        timezone="Europe/Amsterdam",
        enable_utc=False,
    )
    assert conf.broker_url == "amqp://u:p@rabbit:5672/vh"
    assert conf.result_backend == "redis://cache:6379/3"
    assert conf.task_default_queue == "work"
    assert conf.task_routes == {"a.*": {"queue": "a"}}
    assert conf.result_expires == 3600
    assert conf.task_acks_late is False
    assert conf.worker_prefetch_multiplier == 1
    assert conf.timezone == "Europe/Amsterdam"
    assert conf.enable_utc is False
    # the typed settings object sees the same values
    assert conf.settings.task_default_queue == "work"


def test_update_takes_a_mapping_and_keywords() -> None:
    conf = Config()
    conf.update({"task_default_queue": "from-mapping", "timezone": "UTC"},
                task_default_queue="from-kwargs")
    assert conf.task_default_queue == "from-kwargs"
    assert conf.timezone == "UTC"


@pytest.mark.interop
def test_setting_names_are_celerys() -> None:
    from celery.app.defaults import NAMESPACES, flatten

    celery_names = {name for name, _ in flatten(NAMESPACES)}
    ours = {field.name for field in dataclasses.fields(Settings)}
    assert ours - celery_names == AIO_ONLY_SETTINGS


def test_unknown_key_raises_configuration_error_naming_it() -> None:
    conf = Config()
    with pytest.raises(ConfigurationError) as info:
        conf.update(broker_url="amqp://x//", brokr_url="amqp://typo//")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AioCeleryError)
    assert "brokr_url" in str(info.value)


def test_nothing_applied_when_one_key_is_unknown() -> None:
    conf = Config()
    before = dataclasses.asdict(conf.settings)
    with pytest.raises(ConfigurationError):
        conf.update(task_default_queue="changed", result_expires=5, not_a_setting=1)
    assert dataclasses.asdict(conf.settings) == before
    assert conf.task_default_queue == "celery"


@pytest.mark.parametrize("name", ["task_serializer", "result_serializer"])
@pytest.mark.parametrize("value", ["pickle", "yaml", "msgpack"])
def test_non_json_serializer_refused(name: str, value: str) -> None:
    conf = Config()
    with pytest.raises(ConfigurationError) as info:
        conf.update({name: value, "task_default_queue": "changed"})
    assert name in str(info.value)
    assert value in str(info.value)
    assert getattr(conf, name) == "json"
    assert conf.task_default_queue == "celery"


def test_attribute_access() -> None:
    conf = Config()
    assert conf.task_default_queue == "celery"
    conf.task_default_queue = "other"
    assert conf.task_default_queue == "other"
    with pytest.raises(AttributeError, match="nonexistent_setting"):
        _ = conf.nonexistent_setting
    with pytest.raises(ConfigurationError, match="nonexistent_setting"):
        conf.nonexistent_setting = 1
    assert not hasattr(conf, "nonexistent_setting")


def test_mapping_access() -> None:
    conf = Config()
    conf.update(task_default_queue="mapped")
    assert conf["task_default_queue"] == "mapped"
    assert "broker_url" in conf
    assert "nonexistent_setting" not in conf
    with pytest.raises(KeyError):
        _ = conf["nonexistent_setting"]
    names = list(conf)
    assert names == sorted(field.name for field in dataclasses.fields(Settings))
    assert len(conf) == len(names)
    assert dict(conf)["task_default_queue"] == "mapped"
    assert conf.get("nonexistent_setting", "fallback") == "fallback"


def test_app_constructor_sets_broker_and_backend() -> None:
    app = Celery("cfg", broker="amqp://a:b@h//", backend="redis://h:6379/1",
                 set_as_current=False)
    assert app.conf.broker_url == "amqp://a:b@h//"
    assert app.conf.result_backend == "redis://h:6379/1"


def test_config_from_object() -> None:
    source = SimpleNamespace(
        broker_url="amqp://obj//",
        task_default_queue="from-object",
        result_expires=timedelta(minutes=5),
        BROKER_URL="amqp://old-style-ignored//",
        some_unrelated_attribute=42,
    )
    conf = Config()
    conf.config_from_object(source)
    assert conf.broker_url == "amqp://obj//"
    assert conf.task_default_queue == "from-object"
    assert conf.result_expires == timedelta(minutes=5)
    assert "some_unrelated_attribute" not in conf


def test_config_from_object_with_a_class_and_a_module() -> None:
    class Settings_:
        task_default_queue = "from-class"
        task_acks_late = False

    conf = Config()
    conf.config_from_object(Settings_)
    assert conf.task_default_queue == "from-class"
    assert conf.task_acks_late is False

    import types

    module = types.ModuleType("celeryconfig")
    module.task_default_queue = "from-module"  # type: ignore[attr-defined]
    conf.config_from_object(module)
    assert conf.task_default_queue == "from-module"


def test_config_from_object_refuses_non_json_serializer() -> None:
    conf = Config()
    with pytest.raises(ConfigurationError):
        conf.config_from_object(SimpleNamespace(task_serializer="pickle",
                                                task_default_queue="x"))
    assert conf.task_default_queue == "celery"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (86400.0, 86400),
        (90.7, 90),
        (1.5, 1),
        (0.2, 1),  # a positive expiry never becomes "forever" or 0
        (3600, 3600),
        (timedelta(hours=1), 3600),
        (timedelta(days=1, seconds=30), 86430),
        (timedelta(milliseconds=10), 1),
        (None, None),
        (0, None),
        (timedelta(0), None),
    ],
)
def test_result_expires_seconds(value: float | timedelta | None, expected: int | None) -> None:
    conf = Config()
    conf.update(result_expires=value)
    assert conf.settings.result_expires_seconds() == expected


def test_result_expires_default_is_one_day() -> None:
    assert Config().settings.result_expires_seconds() == 86400


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:secret@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
        ("amqp://user:s3cr3t@rabbit/vhost", "amqp://user:***@rabbit/vhost"),
        ("amqps://user:pw@rabbit:5671/%2F?heartbeat=30",
         "amqps://user:***@rabbit:5671/%2F?heartbeat=30"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://default:pw@host:6379/2", "redis://default:***@host:6379/2"),
    ],
)
def test_mask_url_hides_password(url: str, expected: str) -> None:
    masked = mask_url(url)
    assert masked == expected
    password = url.split("@", maxsplit=1)[0].rsplit(":", 1)[1]
    assert password not in masked.split("@")[0]


@pytest.mark.parametrize(
    "url",
    ["amqp://127.0.0.1:5672//", "amqp://guest@127.0.0.1//", "redis://host:6379/0",
     "redis://localhost", "unix:///tmp/redis.sock"],
)
def test_mask_url_without_password_is_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_of_nothing() -> None:
    assert mask_url("") == ""
    assert isinstance(mask_url(None), str)
