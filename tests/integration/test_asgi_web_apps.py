"""Real web apps (Starlette and FastAPI) behind ``serve_asgi``, called through ``TunnelTransport``
with ``follow_redirects=True``: the URLs they build and the redirects they send work for the caller.

What a direct tunnel caller gets (no proxy headers): the app's URLs are ``http://<tunnel host>/...``
(scope scheme ``http``, host header = the tunnel hostname), and the transport follows a redirect to
such a URL -- or a relative one -- as ``tunnel://<tunnel host>/...``. A caller that is a proxy for
browsers names the public URL with ``X-Forwarded-Proto``/``-Host``; the client address comes from
``X-Forwarded-For``, else it is the placeholder ``("tunnel", 0)``. One real nats-server, no mocks
of NATS (the off-tunnel web in one test is an ``httpx.MockTransport``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import Peers, connect_peers, serving
from tunnel.asgi import UNKNOWN_CLIENT, AsgiTunnelServer, serve_asgi
from tunnel.httpx_transport import NotATunnelURL, TunnelTransport

HOST = "desk.example"
OTHER_HOST = "other.example"
BASE = f"tunnel://{HOST}"
TOKEN = "Bearer sesame"


def describe(request: Request) -> dict[str, Any]:
    """What the app knows about the request and the URLs it would hand out."""
    client = request.client
    return {
        "method": request.method,
        "url": str(request.url),
        "base_url": str(request.base_url),
        "client": None if client is None else [client.host, client.port],
        "item_url": str(request.url_for("item", item_id="7")),
        "target_url": str(request.url_for("target")),
    }


# -- the Starlette app ----------------------------------------------------------------------


async def st_items(request: Request) -> JSONResponse:
    body = (await request.body()).decode()
    return JSONResponse({**describe(request), "body": body})


async def st_item(request: Request) -> JSONResponse:
    return JSONResponse({**describe(request), "item_id": request.path_params["item_id"]})


async def st_target(request: Request) -> JSONResponse:
    return JSONResponse(describe(request))


async def st_private(request: Request) -> Response:
    if request.headers.get("authorization") != TOKEN:
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    return JSONResponse(describe(request))


async def st_redirect(request: Request) -> RedirectResponse:
    to = request.path_params["to"]
    locations = {
        "relative": "/target",
        "relative-path": "../target",  # from /deep/go/relative-path: /deep/target
        "query": "?page=2",
        "absolute": str(request.url_for("target")),
        "absolute-private": str(request.url_for("private")),
        "other-desk": f"tunnel://{OTHER_HOST}/hello",
        "elsewhere": "https://example.com/landing",
    }
    return RedirectResponse(locations[to], status_code=302)


async def st_form(request: Request) -> RedirectResponse:
    await request.body()
    return RedirectResponse("/target?from=form", status_code=303)


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/items/", st_items, methods=["GET", "POST"]),
            Route("/items/{item_id}", st_item, name="item"),
            Route("/target", st_target, name="target"),
            Route("/deep/target", st_target),
            Route("/private", st_private, name="private"),
            Route("/go/{to}", st_redirect),
            Route("/deep/go/{to}", st_redirect),
            Route("/form", st_form, methods=["POST"]),
        ]
    )


# -- the FastAPI app (the same routes) ------------------------------------------------------


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/")
    async def list_items(request: FastAPIRequest) -> dict[str, Any]:
        return {**describe(request), "body": ""}

    @app.post("/items/")
    async def post_items(request: FastAPIRequest) -> dict[str, Any]:
        return {**describe(request), "body": (await request.body()).decode()}

    @app.get("/items/{item_id}", name="item")
    async def item(item_id: str, request: FastAPIRequest) -> dict[str, Any]:
        return {**describe(request), "item_id": item_id}

    @app.get("/target", name="target")
    @app.get("/deep/target", name="deep_target")
    async def target(request: FastAPIRequest) -> dict[str, Any]:
        return describe(request)

    @app.get("/private", name="private", response_model=None)
    async def private(request: FastAPIRequest) -> Response | dict[str, Any]:
        if request.headers.get("authorization") != TOKEN:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return describe(request)

    @app.get("/go/{to}")
    @app.get("/deep/go/{to}")
    async def go(request: FastAPIRequest) -> RedirectResponse:
        return await st_redirect(request)

    @app.post("/form")
    async def form(request: FastAPIRequest) -> RedirectResponse:
        return await st_form(request)

    return app


APPS: dict[str, Callable[[], Any]] = {"starlette": starlette_app, "fastapi": fastapi_app}


@pytest.fixture(params=sorted(APPS))
def app(request: pytest.FixtureRequest) -> Any:
    return APPS[request.param]()


@asynccontextmanager
async def web_client(
    server: NatsServer, app: Any, *, follow_redirects: bool = True, **serve_kwargs: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AsgiTunnelServer, Peers]]:
    """Serve ``app`` for HOST; an httpx client over the tunnel (base ``tunnel://HOST``)."""
    async with connect_peers(server) as peers:
        served = await serve_asgi(peers.server_nc, HOST, app, **serve_kwargs)
        try:
            async with httpx.AsyncClient(
                transport=TunnelTransport(peers.caller_nc),
                base_url=BASE,
                follow_redirects=follow_redirects,
                timeout=httpx.Timeout(5.0),
            ) as client:
                yield client, served, peers
        finally:
            await served.close(timeout=2.0)
        assert peers.errors == []


# -- trailing slash ---------------------------------------------------------------------------


async def test_trailing_slash_redirect_is_followed_through_the_tunnel(
    nats_server: NatsServer, app: Any
) -> None:
    async with web_client(nats_server, app) as (client, _, _):
        r = await client.get("/items", params={"page": "2"})
        assert r.status_code == 200, r.text
        assert r.url == f"{BASE}/items/?page=2"
        assert r.json()["url"] == f"http://{HOST}/items/?page=2"
        [hop] = r.history
        # The app said http://desk.example/items/?page=2; the transport made it a tunnel URL.
        assert hop.status_code == 307
        assert hop.headers["location"] == f"{BASE}/items/?page=2"
        assert hop.extensions["tunnel_original_location"] == f"http://{HOST}/items/?page=2"

        # 307 keeps the method and the body.
        posted = await client.post("/items", content=b"payload")
        assert posted.status_code == 200, posted.text
        assert posted.json()["method"] == "POST"
        assert posted.json()["body"] == "payload"
        assert [h.status_code for h in posted.history] == [307]


# -- relative and absolute same-host redirects ------------------------------------------------


@pytest.mark.parametrize(
    ("path", "lands_on"),
    [
        ("/go/relative", "/target"),
        ("/deep/go/relative-path", "/deep/target"),
        ("/go/absolute", "/target"),
    ],
)
async def test_relative_and_absolute_same_host_redirects_are_followed(
    nats_server: NatsServer, app: Any, path: str, lands_on: str
) -> None:
    async with web_client(nats_server, app) as (client, _, _):
        r = await client.get(path)
    assert r.status_code == 200, r.text
    assert r.url == f"{BASE}{lands_on}"
    assert r.json()["url"] == f"http://{HOST}{lands_on}"
    assert [h.status_code for h in r.history] == [302]


async def test_a_query_only_redirect_keeps_the_path(nats_server: NatsServer) -> None:
    async with web_client(nats_server, starlette_app(), follow_redirects=False) as (client, _, _):
        r = await client.get("/go/query")
    assert r.status_code == 302
    assert r.headers["location"] == f"{BASE}/go/query?page=2"
    assert r.extensions["tunnel_original_location"] == "?page=2"


async def test_post_redirected_with_303_becomes_a_get_of_the_target(
    nats_server: NatsServer, app: Any
) -> None:
    async with web_client(nats_server, app) as (client, _, _):
        r = await client.post("/form", data={"name": "x"})
    assert r.status_code == 200, r.text
    assert r.url == f"{BASE}/target?from=form"
    assert r.json()["method"] == "GET"


async def test_same_host_absolute_redirect_keeps_the_authorization_header(
    nats_server: NatsServer, app: Any
) -> None:
    # httpx drops Authorization on a cross-origin redirect; http://desk.example is the same
    # tunnel host, so after the transport maps it back onto tunnel:// the credentials stay.
    async with web_client(nats_server, app) as (client, _, _):
        r = await client.get("/go/absolute-private", headers={"Authorization": TOKEN})
    assert r.status_code == 200, r.text
    assert r.url == f"{BASE}/private"


async def test_without_follow_redirects_the_location_is_the_followable_tunnel_url(
    nats_server: NatsServer, app: Any
) -> None:
    async with web_client(nats_server, app, follow_redirects=False) as (client, _, _):
        relative = await client.get("/go/relative")
        assert relative.headers["location"] == f"{BASE}/target"
        assert relative.extensions["tunnel_original_location"] == "/target"
        assert relative.next_request is not None
        assert relative.next_request.url == f"{BASE}/target"
        followed = await client.send(relative.next_request)
        assert followed.status_code == 200


# -- cross-host redirects ------------------------------------------------------------------------


async def test_redirect_to_another_tunnel_host_is_followed_within_the_tunnel(
    nats_server: NatsServer, app: Any
) -> None:
    async def other(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-type", "text/plain")], f"{request.hostname} {request.path}")

    async with web_client(nats_server, app) as (client, _, peers):
        other_nc = await peers.connect(nats_server.url, "other-desk")
        async with serving(other_nc, OTHER_HOST, other):
            r = await client.get("/go/other-desk")
    assert r.status_code == 200
    assert r.url == f"tunnel://{OTHER_HOST}/hello"
    assert r.text == f"{OTHER_HOST} /hello"


async def test_redirect_off_the_tunnel_is_a_typed_error_naming_the_url(
    nats_server: NatsServer, app: Any
) -> None:
    async with web_client(nats_server, app) as (client, _, _):
        with pytest.raises(NotATunnelURL, match=r"https://example\.com/landing") as info:
            await client.get("/go/elsewhere")
    assert isinstance(info.value, httpx.UnsupportedProtocol)


async def test_redirect_off_the_tunnel_goes_to_the_other_mounted_transport(
    nats_server: NatsServer, app: Any
) -> None:
    seen: list[str] = []

    def web(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text="the web")

    async with connect_peers(nats_server) as peers:
        served = await serve_asgi(peers.server_nc, HOST, app)
        try:
            mounts: dict[str, httpx.AsyncBaseTransport] = {
                "tunnel://": TunnelTransport(peers.caller_nc),
                "all://": httpx.MockTransport(web),
            }
            async with httpx.AsyncClient(mounts=mounts, follow_redirects=True) as client:
                r = await client.get(f"{BASE}/go/elsewhere")
        finally:
            await served.close(timeout=2.0)
    assert r.text == "the web"
    assert seen == ["https://example.com/landing"]


# -- request.client and request.url_for -------------------------------------------------------


async def test_direct_caller_gets_the_placeholder_client_and_tunnel_host_urls(
    nats_server: NatsServer, app: Any
) -> None:
    async with web_client(nats_server, app) as (client, _, _):
        r = await client.get("/target")
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["client"] == list(UNKNOWN_CLIENT) == ["tunnel", 0]
        assert seen["url"] == f"http://{HOST}/target"
        assert seen["base_url"] == f"http://{HOST}/"
        assert seen["item_url"] == f"http://{HOST}/items/7"
        # A link from url_for is fetched through the tunnel with the scheme swapped.
        link = httpx.URL(seen["item_url"]).copy_with(scheme="tunnel")
        item = await client.get(link)
        assert item.status_code == 200, item.text
        assert item.json()["item_id"] == "7"


async def test_forwarded_for_names_the_client(nats_server: NatsServer, app: Any) -> None:
    async with web_client(nats_server, app) as (client, _, _):
        v4 = await client.get("/target", headers={"X-Forwarded-For": "203.0.113.7, 10.0.0.1"})
        v6 = await client.get("/target", headers={"X-Forwarded-For": "[2001:db8::1]:4711"})
        junk = await client.get("/target", headers={"X-Forwarded-For": "not-an-address"})
    assert v4.json()["client"] == ["203.0.113.7", 0]
    assert v6.json()["client"] == ["2001:db8::1", 0]
    assert junk.json()["client"] == ["tunnel", 0]


async def test_a_proxy_in_front_names_the_public_url(nats_server: NatsServer, app: Any) -> None:
    # What a browser's request looks like when a forwarder/gateway in front passes it on.
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "127.0.0.1:8080"}
    async with web_client(nats_server, app, follow_redirects=False) as (client, _, _):
        seen = (await client.get("/target", headers=proxy)).json()
        slash = await client.get("/items", headers=proxy)
    assert seen["url"] == "https://127.0.0.1:8080/target"
    assert seen["item_url"] == "https://127.0.0.1:8080/items/7"
    # The browser follows this itself; it is not the tunnel host, so the transport leaves it.
    assert slash.status_code == 307
    assert slash.headers["location"] == "https://127.0.0.1:8080/items/"
    assert "tunnel_original_location" not in slash.extensions


async def test_root_path_prefixes_the_public_urls(nats_server: NatsServer, app: Any) -> None:
    # A gateway serving the app at https://gw.example/api/ (it strips /api before the tunnel).
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example"}
    async with web_client(nats_server, app, root_path="/api") as (client, _, _):
        seen = (await client.get("/target", headers=proxy)).json()
    assert seen["url"] == "https://gw.example/api/target"
    assert seen["item_url"] == "https://gw.example/api/items/7"


async def test_proxy_headers_off_ignores_them(nats_server: NatsServer) -> None:
    headers = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-For": "203.0.113.7",
    }
    async with web_client(nats_server, starlette_app(), proxy_headers=False) as (client, _, _):
        seen = (await client.get("/target", headers=headers)).json()
    assert seen["url"] == f"http://{HOST}/target"
    assert seen["client"] == ["tunnel", 0]


async def test_malformed_proxy_headers_are_ignored(nats_server: NatsServer) -> None:
    bad = {"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "evil.example/path@x"}
    async with web_client(nats_server, starlette_app()) as (client, _, _):
        seen = (await client.get("/target", headers=bad)).json()
    assert seen["url"] == f"http://{HOST}/target"
