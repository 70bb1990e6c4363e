"""``http``: POST the work item's input to a local HTTP endpoint and stream its answer as output.

The endpoint is configured by the user (``[runners.http] endpoint``, e.g. a local
model server); a work item cannot choose it. The request body is the input as
JSON (``Content-Type: application/json``), with ``X-Linkd-Run-Id`` and
``X-Linkd-Thread-Id`` headers. Each piece of the response body becomes an output
event (stream ``body``) as it arrives, decoded as UTF-8. A non-2xx answer ends the
run ``failed`` with the status and the start of the body; so does a connection
error or the configured timeout. Cancelling the run closes the connection.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncGenerator
from typing import Any, Final

import httpx

from ..config import HttpRunnerConfig
from .base import InvalidInput, Output, RunFailed, RunnerEvent, Stage, WorkItem

__all__ = ["HttpRunner"]

MAX_INPUT_BYTES: Final = 16 * 1024 * 1024
# Of a failed answer, this much is quoted in the failure reason.
ERROR_SNIPPET_BYTES: Final = 2048
CONNECT_TIMEOUT: Final = 10.0


class HttpRunner:
    name: Final = "http"

    def __init__(
        self, config: HttpRunnerConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self._transport = transport

    def resumable(self, item: WorkItem) -> bool:
        """Only when the user configured the endpoint ``resumable`` (same input, same answer)."""
        return self.config.resumable

    def validate(self, input: Any) -> None:
        try:
            size = len(json.dumps(input).encode("utf-8"))
        except (TypeError, ValueError):
            raise InvalidInput("http runner input must be JSON") from None
        if size > MAX_INPUT_BYTES:
            raise InvalidInput(f"http runner input is larger than {MAX_INPUT_BYTES} bytes")

    async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
        endpoint = self.config.endpoint
        yield Stage("preparing")
        total = self.config.timeout
        timeout = httpx.Timeout(total, connect=min(CONNECT_TIMEOUT, total) if total else CONNECT_TIMEOUT)
        headers = {
            "Content-Type": "application/json",
            "X-Linkd-Run-Id": item.run_id,
            "X-Linkd-Thread-Id": item.thread_id,
        }
        body = json.dumps(item.input, ensure_ascii=False).encode("utf-8")
        async with httpx.AsyncClient(timeout=timeout, trust_env=False, transport=self._transport) as client:
            try:
                async with client.stream("POST", endpoint, content=body, headers=headers) as response:
                    if not 200 <= response.status_code < 300:
                        snippet = await _snippet(response)
                        raise RunFailed(
                            f"{endpoint} answered {response.status_code}: {snippet}".rstrip(": "),
                            httpStatus=response.status_code,
                        )
                    yield Stage("running")
                    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                    async for block in response.aiter_bytes():
                        text = decoder.decode(block)
                        if text:
                            yield Output(text, "body")
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        yield Output(tail, "body")
            except httpx.TimeoutException:
                limit = f"within {total:g}s" if total else "in time"
                raise RunFailed(f"{endpoint} did not answer {limit}") from None
            except httpx.HTTPError as exc:
                raise RunFailed(f"cannot reach {endpoint}: {exc or type(exc).__name__}") from None


async def _snippet(response: httpx.Response) -> str:
    collected = b""
    async for block in response.aiter_bytes():
        collected += block
        if len(collected) >= ERROR_SNIPPET_BYTES:
            break
    return collected[:ERROR_SNIPPET_BYTES].decode("utf-8", errors="replace").strip()
