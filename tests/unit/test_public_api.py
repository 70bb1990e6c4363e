"""The public surface of ``tunnel``: ``__all__`` is exact, and everything in it is importable."""

from __future__ import annotations

import importlib
import re
import types

import pytest

import tunnel

EXPECTED_PUBLIC_NAMES = {
    "BufferLimitExceeded",
    "DEFAULT_FIRST_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_PREFIX",
    "LEGACY_PREFIX",
    "DEFAULT_UNREACHABLE_GRACE",
    "DEFAULT_MAX_WINDOW",
    "DEFAULT_WINDOW",
    "DEFAULT_WINDOW_BUDGET",
    "DeadlineExceeded",
    "ErrorCode",
    "EventHook",
    "FetchResponse",
    "Handler",
    "HostSubjects",
    "IdleTimeout",
    "IntegrityError",
    "Limits",
    "LocalProtocolError",
    "NoFirstFrameTimeout",
    "PermissionDenied",
    "RemoteError",
    "RemoteProtocolError",
    "Request",
    "Response",
    "ServerConfig",
    "ServerStats",
    "StallTimeout",
    "Timeouts",
    "TunnelAborted",
    "TunnelClient",
    "TunnelConnectionError",
    "TunnelCounters",
    "TunnelError",
    "TunnelEvent",
    "TunnelServer",
    "TunnelTimeout",
    "TunnelUnreachable",
    "UpgradeUnsupported",
    "check_headers",
    "client_for",
    "fetch",
    "host_token",
    "logging_hook",
    "parse_tunnel_url",
    "serve",
    "websocket_connect",
}
# Names tunnel/__init__.py resolves on first use (module __getattr__): not in vars(tunnel) until then.
LAZY_NAMES = {"websocket_connect"}


def test_all_is_exactly_the_public_names() -> None:
    assert set(tunnel.__all__) == EXPECTED_PUBLIC_NAMES
    assert len(tunnel.__all__) == len(set(tunnel.__all__)), "duplicate names in __all__"


def test_every_name_in_all_is_importable() -> None:
    module = importlib.import_module("tunnel")
    for name in tunnel.__all__:
        assert getattr(module, name, None) is not None, name
    namespace: dict[str, object] = {}
    exec("from tunnel import *", namespace)
    assert set(namespace) - {"__builtins__"} == EXPECTED_PUBLIC_NAMES


def test_no_public_name_is_exported_without_being_in_all() -> None:
    public = {
        name
        for name, value in vars(tunnel).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - LAZY_NAMES == set(tunnel.__all__) - LAZY_NAMES


# Add-ons with their own import cost (httpx, ASGI) or their own namespace stay public submodules,
# imported on demand: ``from tunnel.httpx_transport import TunnelTransport``.
PUBLIC_SUBMODULES = {"asgi", "backoff", "connect", "httpx_transport", "tls", "websocket"}


def test_implementation_modules_are_private() -> None:
    for name in PUBLIC_SUBMODULES:
        importlib.import_module(f"tunnel.{name}")
    submodules = {name for name, value in vars(tunnel).items() if isinstance(value, types.ModuleType)}
    public = {name for name in submodules if not name.startswith("_")}
    assert public <= PUBLIC_SUBMODULES, public - PUBLIC_SUBMODULES


def test_every_public_error_carries_a_stable_code_and_http_status() -> None:
    errors = [getattr(tunnel, name) for name in tunnel.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, tunnel.TunnelError)]
    assert len(errors) == 16
    for cls in errors:
        err = cls("message")
        assert isinstance(err.code, str) and err.code.startswith("tunnel_")
        assert 400 <= err.http_status <= 599


def test_check_headers_passes_what_the_tunnel_carries_and_names_what_it_cannot() -> None:
    ok = [("content-type", "text/plain"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
    assert tunnel.check_headers(ok) == ok
    for bad, problem in [
        ([("bad name", "x")], "invalid header name"),
        ([("x-split", "a\r\nb")], "invalid value for header 'x-split'"),
        ([("x-big", "v" * (64 * 1024 + 1))], "invalid value for header 'x-big'"),
        ([("x", "1")] * 513, "more than 512 headers"),
    ]:
        with pytest.raises(tunnel.LocalProtocolError, match=re.escape(problem)):
            tunnel.check_headers(bad)
