"""``task_routes``: the router forms Celery accepts, and which one answers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from aio_celery import Celery
from aio_celery.config import Config
from aio_celery.messages import build_message
from aio_celery.routing import route_queue


def route(routes: Any, name: str = "proj.tasks.add", args: list[Any] | None = None,
          kwargs: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
          task: Any = None) -> str | None:
    return route_queue(routes, name, args or [], kwargs or {}, options or {}, task)


@pytest.mark.parametrize("routes", [None, {}, []])
def test_no_routes(routes: Any) -> None:
    assert route(routes) is None


def test_dict_exact_name_with_queue_dict() -> None:
    routes = {"proj.tasks.add": {"queue": "math"}}
    assert route(routes) == "math"
    assert route(routes, "proj.tasks.sub") is None


def test_dict_exact_name_with_plain_string() -> None:
    routes = {"proj.tasks.add": "math"}
    assert route(routes) == "math"
    assert route(routes, "proj.tasks.addition") is None


def test_dict_glob_pattern() -> None:
    routes = {"proj.feed.*": {"queue": "feeds"}, "*.images.resize_?": "images"}
    assert route(routes, "proj.feed.import") == "feeds"
    assert route(routes, "proj.feed.sub.deep") == "feeds"
    assert route(routes, "proj.images.resize_1") == "images"
    assert route(routes, "proj.images.resize_10") is None
    assert route(routes, "proj.feeds") is None
    assert route(routes, "other.feed") is None


def test_glob_pattern_is_anchored_and_dots_are_literal() -> None:
    routes = {"proj.a*": "q"}
    assert route(routes, "proj.abc") == "q"
    assert route(routes, "projXabc") is None
    assert route(routes, "x.proj.abc") is None


def test_exact_name_wins_over_an_earlier_pattern() -> None:
    routes = {"proj.tasks.*": "by-pattern", "proj.tasks.add": "by-name"}
    assert route(routes, "proj.tasks.add") == "by-name"
    assert route(routes, "proj.tasks.mul") == "by-pattern"


def test_dict_regex_pattern() -> None:
    routes = {re.compile(r"proj\.(video|audio)\..*"): {"queue": "media"}}
    assert route(routes, "proj.video.encode") == "media"
    assert route(routes, "proj.audio.mix") == "media"
    assert route(routes, "proj.image.crop") is None


def test_queue_dict_with_queue_object_uses_its_name() -> None:
    queue = SimpleNamespace(name="object-queue")
    assert route({"proj.tasks.add": {"queue": queue}}) == "object-queue"


def test_route_dict_without_queue_does_not_route() -> None:
    routes = [{"proj.tasks.add": {"exchange": "x", "routing_key": "k"}},
              {"proj.tasks.add": "fallback"}]
    assert route(routes) == "fallback"


def test_callable_router_gets_celerys_arguments() -> None:
    calls: list[tuple[Any, ...]] = []
    sentinel_task = object()

    def router(name: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any],
               task: Any = None, **kw: Any) -> dict[str, str] | None:
        calls.append((name, args, kwargs, options, task, kw))
        if name.startswith("proj.tasks."):
            return {"queue": f"q-{args[0]}"}
        return None

    assert route(router, "proj.tasks.add", [7], {"y": 1}, {"priority": 3},
                 sentinel_task) == "q-7"
    assert calls == [("proj.tasks.add", [7], {"y": 1}, {"priority": 3}, sentinel_task, {})]
    assert route(router, "other.task", [1]) is None


def test_callable_router_returning_a_string() -> None:
    assert route(lambda name, args, kwargs, options, task=None, **kw: "plain") == "plain"


def test_list_of_routers_first_answer_wins() -> None:
    asked: list[str] = []

    def silent(name: str, *args: Any, **kw: Any) -> None:
        asked.append("silent")
        return None

    def never(name: str, *args: Any, **kw: Any) -> str:
        asked.append("never")
        return "too-late"

    routes = [silent, {"proj.other": "nope"}, {"proj.*": {"queue": "second"}},
              {"proj.tasks.add": "third"}, never]
    assert route(routes) == "second"
    assert asked == ["silent"]


def test_tuple_of_routers() -> None:
    assert route(({"x": "nope"}, {"proj.tasks.add": "found"})) == "found"


def test_list_where_nobody_answers() -> None:
    assert route([{"a": "b"}, lambda *a, **k: None]) is None


def test_bad_router_and_bad_route_are_type_errors() -> None:
    with pytest.raises(TypeError):
        route([42])
    with pytest.raises(TypeError):
        route({"proj.tasks.add": 42})


def test_messages_use_task_routes_setting() -> None:
    conf = Config()
    conf.update(task_routes={"proj.*": {"queue": "routed"}}, task_default_queue="dflt")

    def queue_of(name: str) -> str:
        return build_message(conf.settings, name, [], {}, {}, now=datetime.now(UTC),
                             new_id=lambda: "id", origin="gen1@host", reply_to="oid")[1]

    assert queue_of("proj.tasks.add") == "routed"
    assert queue_of("other.task") == "dflt"


def test_app_uses_task_routes_setting() -> None:
    app = Celery("routing", set_as_current=False)
    app.conf.update(task_routes={"proj.*": {"queue": "routed"}}, task_default_queue="dflt")
    assert app.build_message("proj.tasks.add")[1] == "routed"
    assert app.build_message("other.task")[1] == "dflt"
