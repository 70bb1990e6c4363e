"""The option objects (``Timeouts``, ``Limits``, ``ServerConfig``) and the keyword arguments they replace.

Defaults equal the old keyword defaults, bad values fail when the object is built, and
the deprecated keywords still take effect, with a ``DeprecationWarning`` that names the
replacement and points at the caller's line.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
import warnings
from types import SimpleNamespace
from typing import Any

import pytest

import tunnel
from tunnel.asgi import AsgiTunnelServer, serve_asgi

MAX_PAYLOAD = 1024 * 1024


def _nc() -> Any:
    """Enough of a nats-py client to build clients and servers (nothing is sent)."""
    return SimpleNamespace(max_payload=MAX_PAYLOAD)


async def _handler(request: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [], b"")


class _NotStarted(tunnel.TunnelServer):
    """``serve()`` without subscribing anything."""

    async def start(self) -> None:
        pass


# -- the value objects ---------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    # unreachable_grace was 0.2 s for every host; since it applies only to hosts seen serving
    # lately (others are reported at once) it bridges a whole daemon reconnect: 1 s.
    assert tunnel.Timeouts() == tunnel.Timeouts(
        first_frame=30.0,
        idle=20.0,
        total=None,
        unreachable_grace=1.0,
        republish_interval=1.0,
        presence=0.03,
        presence_fallback=0.25,
    )
    assert tunnel.Timeouts().first_frame == tunnel.DEFAULT_FIRST_FRAME_TIMEOUT
    assert tunnel.Timeouts().idle == tunnel.DEFAULT_IDLE_TIMEOUT
    assert tunnel.Timeouts().unreachable_grace == tunnel.DEFAULT_UNREACHABLE_GRACE
    with pytest.raises(ValueError, match="presence_fallback must be at least presence"):
        tunnel.Timeouts(presence=0.5, presence_fallback=0.25)
    assert tunnel.Limits() == tunnel.Limits(window=2 * 1024 * 1024, max_chunk=256 * 1024)
    assert (tunnel.Limits().window, tunnel.Limits().max_chunk, tunnel.Limits().effective_max_window) == (
        tunnel.DEFAULT_WINDOW,
        tunnel.DEFAULT_MAX_CHUNK,
        tunnel.DEFAULT_MAX_WINDOW,
    )
    assert tunnel.DEFAULT_MAX_WINDOW == 16 * 1024 * 1024
    assert tunnel.ServerConfig().effective_max_window == tunnel.DEFAULT_MAX_WINDOW
    assert tunnel.Limits().window_budget == tunnel.ServerConfig().window_budget == 64 * 1024 * 1024
    assert tunnel.Limits(window_budget=0).window_budget == 0  # windows never grow
    # A window someone chose stays fixed unless they say how far it may grow.
    assert tunnel.Limits(window=65536).effective_max_window == 65536
    assert tunnel.Limits(window=65536, max_window=1 << 20).effective_max_window == 1 << 20
    assert tunnel.Limits(window=1 << 20, max_window=65536).effective_max_window == 1 << 20  # never below
    assert tunnel.ServerConfig(window=65536).effective_max_window == 65536
    assert tunnel.Limits(window=tunnel.DEFAULT_WINDOW).effective_max_window == tunnel.DEFAULT_MAX_WINDOW
    assert tunnel.ServerConfig() == tunnel.ServerConfig(
        window=2 * 1024 * 1024, max_chunk=256 * 1024, stall_timeout=60.0, max_concurrent=256, fast_path=True
    )


def test_a_client_and_a_server_built_without_options_use_the_defaults() -> None:
    client = tunnel.TunnelClient(_nc())
    assert (client.timeouts, client.limits) == (tunnel.Timeouts(), tunnel.Limits())
    server = tunnel.TunnelServer(_nc(), "desk.example", _handler)
    assert server.config == tunnel.ServerConfig()
    assert (server.max_concurrent, server.stall_timeout, server.fast_path) == (256, 60.0, True)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: tunnel.Timeouts(first_frame=0), "first_frame"),
        (lambda: tunnel.Timeouts(idle=-1.0), "idle"),
        (lambda: tunnel.Timeouts(total=0.0), "total"),
        (lambda: tunnel.Timeouts(unreachable_grace=-0.1), "unreachable_grace"),
        (lambda: tunnel.Timeouts(republish_interval=0), "republish_interval"),
        (lambda: tunnel.Limits(window=0), "window"),
        (lambda: tunnel.Limits(max_chunk=-5), "max_chunk"),
        (lambda: tunnel.Limits(window=1.5), "window"),  # type: ignore[arg-type]
        (lambda: tunnel.Limits(max_window=0), "max_window"),
        (lambda: tunnel.ServerConfig(window=0), "window"),
        (lambda: tunnel.ServerConfig(max_window=-1), "max_window"),
        (lambda: tunnel.Limits(window_budget=-1), "window_budget"),
        (lambda: tunnel.ServerConfig(window_budget=True), "window_budget"),
        (lambda: tunnel.ServerConfig(max_chunk=0), "max_chunk"),
        (lambda: tunnel.ServerConfig(stall_timeout=0), "stall_timeout"),
        (lambda: tunnel.ServerConfig(max_concurrent=0), "max_concurrent"),
        (lambda: tunnel.ServerConfig(max_concurrent=True), "max_concurrent"),
        (lambda: tunnel.ServerConfig(max_concurrent=2.0), "max_concurrent"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_value_fails_when_the_object_is_built_naming_the_field(build: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build()


def test_none_disables_a_timeout_and_zero_grace_fails_at_once() -> None:
    timeouts = tunnel.Timeouts(first_frame=None, idle=None, total=None, unreachable_grace=0)
    assert (timeouts.first_frame, timeouts.idle, timeouts.total, timeouts.unreachable_grace) == (
        None,
        None,
        None,
        0,
    )
    assert tunnel.ServerConfig(stall_timeout=None).stall_timeout is None


def test_the_objects_are_frozen_and_hashable() -> None:
    objects: list[tuple[Any, str]] = [
        (tunnel.Timeouts(), "idle"),
        (tunnel.Limits(), "window"),
        (tunnel.ServerConfig(), "window"),
    ]
    for value, field in objects:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, 1)
        assert hash(value) == hash(dataclasses.replace(value))


def test_the_objects_take_effect_in_what_the_client_and_server_send() -> None:
    timeouts = tunnel.Timeouts(
        first_frame=3.0, idle=4.0, total=5.0, unreachable_grace=0, republish_interval=0.5
    )
    client = tunnel.TunnelClient(
        _nc(), timeouts=timeouts, limits=tunnel.Limits(window=4096, max_chunk=1024, max_window=65536)
    )
    options = client._options_for(timeouts.first_frame, timeouts.idle, timeouts.total, client.timeouts)
    assert (options.first_frame_timeout, options.idle_timeout, options.total_timeout) == (3.0, 4.0, 5.0)
    assert (options.unreachable_grace, options.republish_interval) == (0, 0.5)
    assert (options.window, options.max_chunk, options.max_payload) == (4096, 1024, MAX_PAYLOAD)
    assert options.max_window == 65536
    config = tunnel.ServerConfig(
        window=8192, max_chunk=512, stall_timeout=7.0, max_concurrent=3, fast_path=False, max_window=32768
    )
    server = tunnel.TunnelServer(_nc(), "desk.example", _handler, config=config)
    assert server.config is config
    assert server.dispatch.options.max_window == 32768
    budget = server.dispatch.options.growth_budget
    assert budget is not None and budget.limit == tunnel.DEFAULT_WINDOW_BUDGET
    assert (
        server.window,
        server.max_chunk,
        server.stall_timeout,
        server.max_concurrent,
        server.fast_path,
    ) == (
        8192,
        512,
        7.0,
        3,
        False,
    )


# -- the deprecated keyword arguments --------------------------------------------------------


def test_old_client_keywords_warn_naming_the_replacement_and_still_take_effect() -> None:
    with pytest.warns(DeprecationWarning) as record:
        client = tunnel.TunnelClient(
            _nc(),
            timeout=9.0,
            first_frame_timeout=3.0,
            idle_timeout=None,
            unreachable_grace=0,
            republish_interval=60.0,
            window=4096,
            max_chunk=1024,
        )
    assert client.timeouts == tunnel.Timeouts(
        first_frame=3.0, idle=None, total=9.0, unreachable_grace=0, republish_interval=60.0
    )
    assert client.limits == tunnel.Limits(window=4096, max_chunk=1024)
    messages = [str(w.message) for w in record]
    assert "TunnelClient(first_frame_timeout=...) is deprecated" in messages[1]
    assert "use TunnelClient(timeouts=tunnel.Timeouts(first_frame=...))" in messages[1]
    assert any("use TunnelClient(limits=tunnel.Limits(window=...))" in m for m in messages)
    assert len(record) == 7
    assert {w.filename for w in record} == {__file__}, "the warning points at the caller's line"


def test_old_client_attributes_are_read_only_views_that_warn() -> None:
    timeouts = tunnel.Timeouts(
        first_frame=3.0, idle=4.0, total=5.0, unreachable_grace=0, republish_interval=0.5
    )
    client = tunnel.TunnelClient(_nc(), timeouts=timeouts, limits=tunnel.Limits(window=4096, max_chunk=1024))
    expected = {
        "timeout": 5.0,
        "first_frame_timeout": 3.0,
        "idle_timeout": 4.0,
        "unreachable_grace": 0,
        "republish_interval": 0.5,
        "window": 4096,
        "max_chunk": 1024,
    }
    for name, value in expected.items():
        with pytest.warns(DeprecationWarning, match=rf"TunnelClient\.{name} is deprecated") as record:
            assert getattr(client, name) == value
        assert record[0].filename == __file__
    with pytest.raises(AttributeError):
        client.idle_timeout = 1.0  # type: ignore[misc]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_client_keywords_are_still_validated() -> None:
    with pytest.raises(ValueError, match="window"):
        tunnel.TunnelClient(_nc(), window=0)


async def test_old_server_keywords_warn_and_still_take_effect_in_serve_and_tunnel_server() -> None:
    with pytest.warns(DeprecationWarning) as record:
        server = await tunnel.serve(
            _nc(), "desk.example", _handler, max_concurrent=3, stall_timeout=None, server_class=_NotStarted
        )
    assert [str(w.message) for w in record] == [
        "serve(max_concurrent=...) is deprecated and goes away in the next release; "
        "use serve(config=tunnel.ServerConfig(max_concurrent=...))",
        "serve(stall_timeout=...) is deprecated and goes away in the next release; "
        "use serve(config=tunnel.ServerConfig(stall_timeout=...))",
    ]
    assert isinstance(server, _NotStarted)
    assert server.config == tunnel.ServerConfig(max_concurrent=3, stall_timeout=None)
    assert (server.max_concurrent, server.stall_timeout) == (3, None)
    with pytest.warns(DeprecationWarning) as record:
        direct = tunnel.TunnelServer(_nc(), "desk.example", _handler, fast_path=False, window=4096)
    assert "TunnelServer(fast_path=...) is deprecated" in str(record[0].message)
    assert "use TunnelServer(config=tunnel.ServerConfig(window=...))" in str(record[1].message)
    assert direct.config == tunnel.ServerConfig(fast_path=False, window=4096)
    assert {w.filename for w in record} == {__file__}


async def test_serve_warns_at_the_callers_line(recwarn: pytest.WarningsRecorder) -> None:
    await tunnel.serve(_nc(), "desk.example", _handler, window=4096, server_class=_NotStarted)
    (warning,) = recwarn.list
    assert warning.category is DeprecationWarning
    assert warning.filename == __file__


async def test_old_server_keywords_warn_and_take_effect_in_serve_asgi(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(AsgiTunnelServer, "start", _NotStarted.start)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    with pytest.warns(
        DeprecationWarning, match=r"use serve_asgi\(config=tunnel.ServerConfig\(max_chunk=...\)\)"
    ):
        server = await serve_asgi(_nc(), "desk.example", app, lifespan="off", max_chunk=512)
    assert server.config == tunnel.ServerConfig(max_chunk=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server = await serve_asgi(
            _nc(), "desk.example", app, lifespan="off", config=tunnel.ServerConfig(max_concurrent=2)
        )
    assert server.max_concurrent == 2


def test_new_style_arguments_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tunnel.TunnelClient(_nc(), timeouts=tunnel.Timeouts(idle=5), limits=tunnel.Limits(window=4096))
        tunnel.TunnelServer(_nc(), "desk.example", _handler, config=tunnel.ServerConfig(max_concurrent=2))


def test_an_old_keyword_beside_its_object_is_an_error_not_a_silent_choice() -> None:
    with pytest.raises(TypeError, match="idle_timeout= and timeouts= given together"):
        tunnel.TunnelClient(_nc(), timeouts=tunnel.Timeouts(), idle_timeout=5.0)
    with pytest.raises(TypeError, match="max_concurrent= and config= given together"):
        tunnel.TunnelServer(_nc(), "desk.example", _handler, config=tunnel.ServerConfig(), max_concurrent=2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_keywords_of_the_other_object_combine_with_a_given_one() -> None:
    client = tunnel.TunnelClient(_nc(), timeouts=tunnel.Timeouts(idle=5.0), window=4096)
    assert (client.timeouts.idle, client.limits.window) == (5.0, 4096)


def test_an_unknown_keyword_is_still_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'windw'"):
        tunnel.TunnelClient(_nc(), windw=4096)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_concurrency'"):
        tunnel.TunnelServer(_nc(), "desk.example", _handler, max_concurrency=2)  # type: ignore[call-arg]


# -- module-level fetch forwards TunnelClient.fetch's keywords ---------------------------------


def test_module_fetch_takes_exactly_the_keywords_of_tunnel_client_fetch() -> None:
    """``tunnel.fetch`` declares its options once (a TypedDict mypy checks against the method)."""
    options = inspect.signature(tunnel.fetch, eval_str=True).parameters["options"]
    assert options.kind is inspect.Parameter.VAR_KEYWORD
    (options_type,) = typing.get_args(options.annotation)
    method = inspect.signature(tunnel.TunnelClient.fetch).parameters.values()
    keywords = {p.name for p in method if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(typing.get_type_hints(options_type)) == keywords
    assert "timeouts" in keywords
