"""Reverse proxy from the tunnel to a local HTTP service (``linkd up --upstream http://127.0.0.1:3000``).

- Only the request's path and query are appended to the upstream base URL; the
  scheme, host and port always come from ``--upstream``, so no request can make
  the daemon talk to another host (``//evil.example/x`` is a path here).
- Bodies stream both ways (the request body from the tunnel into httpx, the
  response from httpx into the tunnel, each with its own flow control): nothing
  holds a whole body in memory. Response bytes are passed raw (a compressed
  answer stays compressed, with its ``Content-Encoding``).
- Hop-by-hop headers are dropped in both directions: ``Connection`` and every
  header it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
  ``Transfer-Encoding``, ``Upgrade``. ``Host`` is the upstream's.
- An upgrade (WebSocket) request, one the caller sent as an upgraded tunnel stream
  (``request.upgrade``) with an ``Upgrade`` header, goes to
  :mod:`linkd.upstream_upgrade` instead of httpx: same path, header and error rules, plus
  ``Upgrade``/``Connection: Upgrade``; after the service's 101 a raw byte pipe. An
  ``Upgrade`` header on a plain request (an older caller) is dropped as above.
- ``X-Forwarded-Host`` (the tunnel hostname unless the caller set one),
  ``X-Forwarded-Proto`` and ``X-Forwarded-For`` as the caller sent them, and
  ``Via: 1.1 linkd`` are added for the local service.
- A request with a body goes to :mod:`linkd.upstream_upload` instead of httpx: same
  path, header and length rules, but the answer is read while the body goes up, so a
  service that refuses early (``501``/``413`` before reading a 5 MB upload, then closing)
  is answered with its own response, not a ``502``.
- Upstream not reachable: ``502 {"error": {"code": "upstream_unreachable", ...}}``;
  no response head in time: ``504 upstream_timeout``; other failures before the
  response started: ``502 upstream_error``. A failure in the middle of a response
  body ends the tunnel request with an error, never with a silently short body. Each
  failure is logged once (WARNING, logger ``linkd.upstream``: the upstream URL and the
  exception chain's reason) and noted on the request's traffic record
  (:func:`linkd.traffic.note_error`), so the access log line names its code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Final

import httpx

import tunnel
from contract.http_headers import HOP_BY_HOP as CONNECTION_HEADERS
from contract.http_headers import connection_named

from .traffic import Exchange, current_exchange, note_error
from .upstream_body import BodyLengthMismatch, declared_length, length_checked
from .upstream_path import InvalidTarget, check_target
from .upstream_response import BadUpstreamResponse, checked_reason, checked_response_headers, checked_status
from .upstream_socket import describe, error_response
from .upstream_upgrade import open_upgraded
from .upstream_upload import ConnectionPool, send_with_body

__all__ = ["HOP_BY_HOP", "UpstreamProxy", "filter_headers", "header_bytes", "upstream_url"]

log = logging.getLogger("linkd.upstream")

HOP_BY_HOP: Final = CONNECTION_HEADERS  # the contract's list, under its old name here
# Local services answer in milliseconds, but may think (a build, a model) before the head.
CONNECT_TIMEOUT: Final = 5.0
RESPONSE_HEAD_TIMEOUT: Final = 300.0
MAX_CONNECTIONS: Final = 100
_NO_BODY_STATUS: Final = frozenset({204, 304})


def filter_headers(
    headers: list[tuple[str, str]], *, extra_drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """``headers`` without hop-by-hop ones (and those named in ``Connection``), order kept."""
    drop = HOP_BY_HOP | connection_named(headers) | extra_drop
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in drop and not name.lower().startswith("proxy-")
    ]


def upstream_url(base: httpx.URL, target: str) -> httpx.URL:
    """``base`` with ``target`` (path + query, starting with '/') appended to its path; host unchanged.

    Raises :class:`~linkd.upstream_path.InvalidTarget` (a ``ValueError``) for anything
    :func:`~linkd.upstream_path.check_target` refuses.
    """
    raw_target = check_target(target)
    base_path = base.raw_path.split(b"?", 1)[0].rstrip(b"/")
    url = base.copy_with(raw_path=base_path + raw_target)
    if not url.raw_path.startswith(base_path + b"/") or (url.host, url.port) != (base.host, base.port):
        raise InvalidTarget(f"request target escapes the upstream base: {target!r}")
    return url


def header_bytes(value: str) -> bytes:
    """A header value as the bytes HTTP carries: latin-1 (obs-text) when it fits, else UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


class UpstreamProxy:
    """A ``tunnel`` handler forwarding to ``base_url``; ``await aclose()`` when done."""

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        head_timeout: float = RESPONSE_HEAD_TIMEOUT,
    ) -> None:
        self.base = httpx.URL(base_url)
        if self.base.scheme not in ("http", "https") or not self.base.host:
            raise ValueError(f"upstream must be an http(s) URL with a host, not {base_url!r}")
        self.base_url = base_url
        self.head_timeout = head_timeout
        self.client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,  # an http_proxy in the environment must not capture the local service
            follow_redirects=False,
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT, read=head_timeout, pool=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=20),
        )
        self._netloc = self.base.netloc.decode("ascii")
        self.upload_pool = ConnectionPool()  # keep-alive for requests with a body (linkd.upstream_upload)

    async def aclose(self) -> None:
        self.upload_pool.close()
        await self.client.aclose()

    def _request_headers(self, request: tunnel.Request) -> list[tuple[bytes, bytes]]:
        """The caller's end-to-end headers as bytes (values latin-1, else UTF-8) plus ours."""
        headers = filter_headers(request.headers, extra_drop=frozenset({"host"}))
        names = {name.lower() for name, _ in headers}
        headers.append(("Host", self._netloc))
        if "x-forwarded-host" not in names:
            headers.append(("X-Forwarded-Host", request.hostname))
        headers.append(("Via", "1.1 linkd"))
        return [(name.encode("ascii"), header_bytes(value)) for name, value in headers]

    async def __call__(self, request: tunnel.Request) -> tunnel.Response:
        try:
            url = upstream_url(self.base, request.url)
        except InvalidTarget as exc:
            return error_response(
                400, "bad_request_target", f"the request target must be a safe path and query: {exc}"
            )
        try:
            sent_headers = self._request_headers(request)
            length = declared_length(sent_headers)
        except (ValueError, UnicodeError) as exc:
            return error_response(400, "bad_request_header", str(exc))
        if request.upgrade and request.header("upgrade"):
            return await open_upgraded(
                request,
                base=self.base,
                base_url=self.base_url,
                target=url.raw_path,
                headers=sent_headers,
                connect_timeout=CONNECT_TIMEOUT,
                head_timeout=self.head_timeout,
            )
        if request.has_body:
            # The answer is read while the body goes up (an early 501/413 passes through).
            return await send_with_body(
                request,
                base=self.base,
                base_url=self.base_url,
                target=url.raw_path,
                headers=sent_headers,
                length=length,
                connect_timeout=CONNECT_TIMEOUT,
                head_timeout=self.head_timeout,
                pool=self.upload_pool,
            )
        content: AsyncIterator[bytes] | None = None
        if length is not None:
            # A declared length on a request without a body: only 0 holds.
            content = length_checked(content, length)
        upstream_request = self.client.build_request(
            request.method, url, headers=sent_headers, content=content
        )
        if content is None and request.method in ("POST", "PUT", "PATCH"):
            upstream_request.headers.setdefault("Content-Length", "0")
        try:
            response = await self.client.send(upstream_request, stream=True)
        except BodyLengthMismatch as exc:
            return error_response(400, "content_length_mismatch", str(exc))
        except httpx.ConnectError as exc:
            log.warning("upstream %s is unreachable: %s", self.base_url, describe(exc))
            return error_response(
                502, "upstream_unreachable", f"cannot connect to {self.base_url}: {_reason(exc)}"
            )
        except httpx.TimeoutException as exc:
            log.warning("upstream %s did not answer in time: %s", self.base_url, describe(exc))
            return error_response(
                504, "upstream_timeout", f"{self.base_url} did not answer in time ({type(exc).__name__})"
            )
        except httpx.HTTPError as exc:
            log.warning(
                "upstream %s: %s %s failed: %s", self.base_url, request.method, request.path, describe(exc)
            )
            return error_response(502, "upstream_error", f"request to {self.base_url} failed: {_reason(exc)}")
        try:
            status = checked_status(response.status_code)
            reason = checked_reason(response.reason_phrase)
            headers = checked_response_headers(
                filter_headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw])
            )
        except BadUpstreamResponse as exc:
            await response.aclose()
            log.warning("upstream %s sent an unusable response head: %s", self.base_url, exc)
            return error_response(502, "upstream_error", f"{self.base_url} sent an unusable response: {exc}")
        if request.method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            await response.aclose()
            return tunnel.Response(status, headers, None, reason)
        body = _relay(response, self.base_url, current_exchange())
        return tunnel.Response(status, headers, body, reason)


async def _relay(response: httpx.Response, base_url: str, exchange: Exchange | None) -> AsyncIterator[bytes]:
    try:
        async for block in response.aiter_raw():
            if block:
                yield block
    except httpx.HTTPError as exc:
        # The caller must see a failed request (a typed tunnel error), never a short body.
        log.warning("upstream %s broke off a response body: %s", base_url, describe(exc))
        note_error(
            "upstream_error", f"the local service broke off the response: {describe(exc)}", exchange=exchange
        )
        raise tunnel.TunnelError(
            f"the local service broke off the response ({type(exc).__name__})",
            code=tunnel.ErrorCode.HANDLER_ERROR,
        ) from None
    finally:
        await response.aclose()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__)
    return text or type(exc).__name__
