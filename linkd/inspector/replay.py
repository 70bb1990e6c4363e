"""Replay: send a captured request to the upstream again, as it was or edited.

The captured values are the real ones (redaction is only for what is shown), so an
unedited replay sends the original credentials; an edit that leaves a ``[redacted]``
placeholder in place (a header value, a query parameter, a JSON body's top-level key, or
the whole shown body) keeps the original value there. Only requests the daemon sent to its
``--upstream`` are replayed, to the same upstream, through the same path rules as the proxy
(:func:`linkd.upstream.upstream_url`: the target can never name another host).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import httpx

from ..upstream import filter_headers, header_bytes, upstream_url
from ..upstream_path import InvalidTarget
from .redact import REDACTED
from .views import ExchangeLike, body_view

__all__ = ["CAPTURE_LIMIT", "ReplayEdits", "ReplayExchange", "ReplayRefused", "Replayer"]

CAPTURE_LIMIT: Final = 64 * 1024
REPLAY_TIMEOUT: Final = 30.0
_METHOD_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
)


class ReplayRefused(Exception):
    """This exchange cannot be replayed (status 409) or the edit is invalid (status 400)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(slots=True)
class ReplayExchange:
    """A replay's record: the same fields as ``linkd.traffic.Exchange``."""

    id: str
    started_at: float
    method: str
    target: str
    route: str = "upstream"
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    request_body: bytes = b""
    request_bytes: int = 0
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes = b""
    response_bytes: int = 0
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    error_detail: str | None = None
    upgraded: bool = False


@dataclass(frozen=True, slots=True)
class ReplayEdits:
    """What the user changed; None: as captured."""

    method: str | None = None
    target: str | None = None
    headers: list[tuple[str, str]] | None = None
    body: str | None = None

    @classmethod
    def parse(cls, payload: Any) -> ReplayEdits:
        if payload is None:
            return cls()
        if not isinstance(payload, dict):
            raise ReplayRefused(400, "invalid_edit", "the replay body must be a JSON object")
        method = payload.get("method")
        target = payload.get("target")
        headers = payload.get("headers")
        body = payload.get("body")
        if method is not None and (not isinstance(method, str) or not method or set(method) - _METHOD_CHARS):
            raise ReplayRefused(400, "invalid_edit", "method: an HTTP method token such as GET")
        if target is not None and (not isinstance(target, str) or not target.startswith("/")):
            raise ReplayRefused(400, "invalid_edit", "target: a path (and query) starting with '/'")
        pairs: list[tuple[str, str]] | None = None
        if headers is not None:
            if not isinstance(headers, list) or not all(
                isinstance(h, list | tuple) and len(h) == 2 and all(isinstance(p, str) for p in h)
                for h in headers
            ):
                raise ReplayRefused(400, "invalid_edit", "headers: a list of [name, value] pairs")
            pairs = [(str(h[0]).strip(), str(h[1])) for h in headers if str(h[0]).strip()]
        if body is not None and not isinstance(body, str):
            raise ReplayRefused(400, "invalid_edit", "body: a string")
        return cls(method.upper() if method else None, target, pairs, body)


def _restore_headers(edited: list[tuple[str, str]], original: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Edited headers, where a ``[redacted]`` value takes the original's value (same name, in order)."""
    originals: dict[str, list[str]] = defaultdict(list)
    for name, value in original:
        originals[name.lower()].append(value)
    out: list[tuple[str, str]] = []
    for name, value in edited:
        if value == REDACTED and originals.get(name.lower()):
            value = originals[name.lower()].pop(0)
        out.append((name, value))
    return out


def _restore_target(edited: str, original: str) -> str:
    """An edited target whose ``[redacted]`` query values take the original's values."""
    path, sep, query = edited.partition("?")
    if not sep or (REDACTED not in query and quote(REDACTED) not in query):
        return edited
    originals: dict[str, list[str]] = defaultdict(list)
    for piece in original.partition("?")[2].split("&"):
        raw_name, eq, raw_value = piece.partition("=")
        if eq:
            originals[raw_name].append(raw_value)
    parts: list[str] = []
    for piece in query.split("&"):
        raw_name, eq, raw_value = piece.partition("=")
        if eq and raw_value in (REDACTED, quote(REDACTED)) and originals.get(raw_name):
            piece = f"{raw_name}={originals[raw_name].pop(0)}"
        parts.append(piece)
    return f"{path}?{'&'.join(parts)}"


def _restore_body(edited: str, original: bytes, shown: str | None) -> bytes:
    """The edited body; the original where it is what the page showed, and for ``[redacted]`` JSON keys."""
    if shown is not None and edited == shown:
        return original
    data = edited.encode("utf-8")
    if REDACTED not in edited:
        return data
    try:
        new, old = json.loads(edited), json.loads(original)
    except (ValueError, UnicodeDecodeError):
        return data
    if not isinstance(new, dict) or not isinstance(old, dict):
        return data
    restored = {k: (old[k] if v == REDACTED and k in old else v) for k, v in new.items()}
    return json.dumps(restored, ensure_ascii=False).encode("utf-8")


class Replayer:
    """Sends replays to ``upstream_url`` with its own client; ``await aclose()`` when done."""

    def __init__(self, upstream_url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = httpx.URL(upstream_url)
        self.client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(REPLAY_TIMEOUT),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def prepare(
        self, original: ExchangeLike, edits: ReplayEdits
    ) -> tuple[str, str, list[tuple[str, str]], bytes]:
        """(method, target, headers, body) to send, secrets restored; raises ReplayRefused."""
        if original.route != "upstream":
            raise ReplayRefused(409, "not_replayable", "only requests the daemon sent to its upstream replay")
        if original.upgraded:
            raise ReplayRefused(409, "not_replayable", "an upgraded (WebSocket) request cannot be replayed")
        method = edits.method or original.method
        target = (
            _restore_target(edits.target, original.target) if edits.target is not None else original.target
        )
        headers = list(original.request_headers)
        if edits.headers is not None:
            headers = _restore_headers(edits.headers, headers)
        if edits.body is not None:
            shown = body_view(bytes(original.request_body), original.request_bytes, original.request_headers)
            body = _restore_body(edits.body, bytes(original.request_body), shown.get("text"))
        else:
            if original.request_bytes > len(original.request_body):
                raise ReplayRefused(
                    409,
                    "body_not_captured",
                    f"only {len(original.request_body)} of the body's {original.request_bytes} "
                    "bytes were kept; edit the body to replay it",
                )
            body = bytes(original.request_body)
        return method, target, headers, body

    async def send(
        self,
        replay_id: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        replay_of: str,
    ) -> ReplayExchange:
        """Send one replay; its record (with the upstream's answer or the failure)."""
        try:
            url = upstream_url(self.base, target)
        except InvalidTarget as exc:
            raise ReplayRefused(400, "invalid_edit", f"target: {exc}") from None
        sent = filter_headers(headers, extra_drop=frozenset({"host", "content-length"}))
        sent.append(("Via", "1.1 linkd"))
        sent.append(("X-Linkd-Replay-Of", replay_of))
        record = ReplayExchange(
            id=replay_id,
            started_at=time.time(),
            method=method,
            target=target,
            request_headers=sent,
            request_body=body[:CAPTURE_LIMIT],
            request_bytes=len(body),
        )
        start = time.perf_counter()
        try:
            request = self.client.build_request(
                method,
                url,
                headers=[(n.encode("ascii"), header_bytes(v)) for n, v in sent],
                content=body if body or method in ("POST", "PUT", "PATCH") else None,
            )
            response = await self.client.send(request, stream=True)
            try:
                record.ttfb_ms = (time.perf_counter() - start) * 1000
                record.status = response.status_code
                record.response_headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw
                ]
                kept = bytearray()
                async for block in response.aiter_raw():
                    record.response_bytes += len(block)
                    if len(kept) < CAPTURE_LIMIT:
                        kept += block[: CAPTURE_LIMIT - len(kept)]
                record.response_body = bytes(kept)
            finally:
                await response.aclose()
        except httpx.ConnectError as exc:
            record.error, record.error_detail = (
                "upstream_unreachable",
                f"cannot connect: {exc or type(exc).__name__}",
            )
        except httpx.TimeoutException as exc:
            record.error, record.error_detail = "upstream_timeout", type(exc).__name__
        except (httpx.HTTPError, UnicodeError, ValueError) as exc:
            record.error, record.error_detail = "upstream_error", f"{type(exc).__name__}: {exc}"
        record.duration_ms = (time.perf_counter() - start) * 1000
        return record
