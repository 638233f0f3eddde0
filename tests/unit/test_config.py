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
                     "worker_shutdown_timeout", "worker_max_task_deaths",
                     "task_queue_arguments", "worker_max_pending_results",
                     "worker_unacked_max_age"}


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
        worker_send_task_events=True,
        event_exchange="monitoring",
        event_serializer="json",
    )
    assert (conf.worker_send_task_events, conf.event_exchange) == (True, "monitoring")
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


@pytest.mark.parametrize("name", ["task_serializer", "result_serializer", "event_serializer"])
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


#: (url, masked, the secrets that must not appear in it)
MASKED = [
    ("amqp://guest:secret@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//", ["secret"]),
    ("amqp://user:s3cr3t@rabbit/vhost", "amqp://user:***@rabbit/vhost", ["s3cr3t"]),
    ("amqps://user:pw@rabbit:5671/%2F?heartbeat=30",
     "amqps://user:***@rabbit:5671/%2F?heartbeat=30", ["pw@"]),
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0", ["pw@"]),
    ("redis://default:pw@host:6379/2", "redis://default:***@host:6379/2", ["pw@"]),
    # passwords with / # ? @ % as typed (which URL parsers misread) and percent-encoded
    ("amqp://user:se/cret@host//", "amqp://user:***@host//", ["se/cret", "cret"]),
    ("amqp://user:se#cret@host//", "amqp://user:***@host//", ["se#cret", "cret"]),
    ("amqp://user:se?cret@host//", "amqp://user:***@host//", ["se?cret", "cret"]),
    ("amqp://user:se@cret@host//", "amqp://user:***@host//", ["se@", "cret"]),
    ("amqp://user:se%cret@host//", "amqp://user:***@host//", ["se%cret"]),
    ("amqp://user:se%2Fcr%40et@host:5672/v", "amqp://user:***@host:5672/v", ["se%2F", "et@"]),
    ("amqp://user:a:b:c@host//", "amqp://user:***@host//", ["a:b:c"]),
    ("unix://:sock-pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1", ["sock-pw"]),
    # passwords in the query string
    ("redis://h:6379/0?password=secret", "redis://h:6379/0?password=***", ["secret"]),
    ("redis://h/0?db=1&password=se%26cret&ssl=1", "redis://h/0?db=1&password=***&ssl=1",
     ["se%26cret"]),
    ("redis://h/0?password=se&cret&db=1", "redis://h/0?password=***&db=1", ["cret"]),
    ("rediss://h/0?ssl_cert_reqs=none&PASSWORD=x1y2#frag",
     "rediss://h/0?ssl_cert_reqs=none&PASSWORD=***", ["x1y2"]),
    ("redis://h/0?sentinel_password=sp1&db=2", "redis://h/0?sentinel_password=***&db=2",
     ["sp1"]),
    ("amqp://h//?auth_token=tk9&heartbeat=5", "amqp://h//?auth_token=***&heartbeat=5", ["tk9"]),
    ("redis://user:p1@h/0?password=p2", "redis://user:***@h/0?password=***", ["p1", "p2"]),
    # Celery's failover form: every URL of the list
    ("amqp://a:p1@h1//;amqp://b:p2@h2//", "amqp://a:***@h1//;amqp://b:***@h2//", ["p1", "p2"]),
    ("amqp://a:p;1@h1//; amqps://b:p/2@h2//", "amqp://a:***@h1//; amqps://b:***@h2//",
     ["p;1", "p/2"]),
    # not a URL at all: still no password
    ("user:pw123@host", "user:***@host", ["pw123"]),
    # in doubt, too much is masked rather than too little
    ("redis://h:6379/0?x=a@b", "redis://h:***@b", []),
]


@pytest.mark.parametrize(("url", "expected", "secrets"), MASKED)
def test_mask_url_hides_every_password(url: str, expected: str, secrets: list[str]) -> None:
    masked = mask_url(url)
    assert masked == expected
    for secret in secrets:
        assert secret not in masked


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



# --- a URL that cannot be read: the error says why and never quotes it ------------------------

#: (url, a piece of its password, what the error must say)
UNREADABLE_BROKER_URLS = [
    ("amqp://user:se/cret@host//", "cret", "percent-encoded"),
    ("amqp://user:se#cret@host//", "cret", "percent-encoded"),
    ("amqp://user:se?cret@host:5672/v", "cret", "percent-encoded"),
    ("amqp://a:p1x@h1//;amqp://b:p2/y@h2//", "p2/y", "URL 2 of 2: its port is not a number"),
    ("redis://:pw9@h:6379/0", "pw9", "must start with amqp://"),
    ("user:pw9@host//", "pw9", "must start with amqp://"),
]


@pytest.mark.parametrize(("url", "secret", "says"), UNREADABLE_BROKER_URLS)
def test_an_unreadable_broker_url_is_never_quoted(url: str, secret: str, says: str) -> None:
    """Neither the worker's connection nor the publisher (whose parsers quote what they
    cannot read, e.g. "Port could not be cast to integer value as 'se'") echo it."""
    import asyncio

    from aio_celery.amqp.connection import Endpoint
    from aio_celery.broker import Broker, ConsumerChannel
    from aio_celery.exceptions import BrokerConnectionError

    with pytest.raises(ValueError) as parsed:
        Endpoint.from_url(url.rpartition(";")[2])  # one URL at a time
    with pytest.raises(BrokerConnectionError) as consumer:
        asyncio.run(ConsumerChannel(url, prefetch_count=1).open())
    with pytest.raises(ConfigurationError) as publisher:
        asyncio.run(Broker(url).connect())
    assert says.removeprefix("URL 2 of 2: ") in str(parsed.value)
    for error in (consumer.value, publisher.value):
        assert says in str(error)
    for error in (parsed.value, consumer.value, publisher.value):
        assert secret not in str(error)
        assert url not in str(error)


def test_a_heartbeat_that_is_not_a_number_is_not_quoted() -> None:
    from aio_celery.amqp.connection import Endpoint

    with pytest.raises(ValueError, match="heartbeat= must be whole seconds") as raised:
        Endpoint.from_url("amqp://u:pw9@h//?heartbeat=pw9")
    assert "pw9" not in str(raised.value)


@pytest.mark.parametrize(("url", "secret", "says"), [
    ("redis://:se/cret@h:6379/0", "cret", "percent-encoded"),
    ("redis://:pw9@h/0?socket_timeout=soon", "pw9", "socket_timeout"),
    ("redis://:pw9@h1/0;redis://:pw8@h2/0", "pw8", "failover"),
])
def test_an_unreadable_result_backend_url_is_never_quoted(
        url: str, secret: str, says: str) -> None:
    from aio_celery.backend import RedisBackend

    backend = RedisBackend(url)
    with pytest.raises(ConfigurationError) as raised:
        _ = backend.client  # redis-py reads the URL here (it connects later)
    assert says in str(raised.value)
    assert secret not in str(raised.value)
    context = raised.value.__cause__ or raised.value.__context__  # shown with a traceback
    assert context is None or secret not in str(context)


def test_an_unsupported_result_backend_is_not_quoted() -> None:
    from aio_celery.backend import RedisBackend

    with pytest.raises(ConfigurationError, match="only redis://") as raised:
        RedisBackend("memcached://u:pw9@h")
    assert "pw9" not in str(raised.value)
