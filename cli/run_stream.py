"""Follow a run's events from the gateway, surviving dropped connections without loss or repeats.

``GET /api/runs/{id}/events?after=N`` (and ``Last-Event-ID: N``) replays every event with
``seq > N`` and stays live until the run is terminal, then sends one ``end`` message with
the final run state; ``state`` messages in between (no seq) say the run stalled or resumed.
:func:`follow` remembers the last ``seq`` it yielded; when the
connection breaks (reset, idle timeout, a gateway restarting, a 5xx from a proxy) it
reconnects with that number, drops anything it already yielded, and refuses a gap (an
event missing in between is an error, never silent loss). Reconnects back off and give
up after ``give_up_after`` seconds without progress.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import httpx

from . import exitcodes
from .gateway_api import GatewayApiError, GatewayClient
from .sse import SseError, SseParser

__all__ = ["END", "EVENT", "STATE", "Item", "StreamDropped", "follow", "run_path"]

EVENT: Final = "event"
END: Final = "end"
# A change of the live run's state (stalled, resumed): data is the run state, no seq.
STATE: Final = "state"
# Reconnect back-off: quick first (a blip), then at most every few seconds.
FIRST_RETRY_DELAY: Final = 0.2
MAX_RETRY_DELAY: Final = 5.0
# A gateway down longer than this (with no event arriving in between) is an outage to report.
DEFAULT_GIVE_UP_AFTER: Final = 60.0


class StreamDropped(Exception):
    """The connection ended or broke before the ``end`` message."""


@dataclass(frozen=True, slots=True)
class Item:
    """``kind`` EVENT: ``data`` is one run event; END: the final run state; STATE: the run state now."""

    kind: str
    data: dict[str, Any]


def run_path(run_id: str, suffix: str = "") -> str:
    return f"/api/runs/{quote(run_id, safe='')}{suffix}"


def _decode(data: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise GatewayApiError(f"the gateway sent {what} that is not a JSON object", exitcodes.GATEWAY_ERROR)
    return doc


async def follow(
    client: GatewayClient,
    run_id: str,
    *,
    after: int = 0,
    give_up_after: float = DEFAULT_GIVE_UP_AFTER,
    idle_timeout: float | None = None,
    on_reconnect: Callable[[int, int, BaseException], None] | None = None,
) -> AsyncIterator[Item]:
    """Every event with ``seq > after`` exactly once and in order, then the END item.

    ``on_reconnect(attempt, last_seq, error)`` is called before each reconnect.
    """
    last = after
    attempt = 0
    progress_at = time.monotonic()
    path = run_path(run_id, "/events")
    while True:
        try:
            kwargs: dict[str, Any] = {}
            if idle_timeout is not None:
                kwargs["idle_timeout"] = idle_timeout
            async with client.stream(
                path,
                params={"after": str(last)},
                headers={"Accept": "text/event-stream", "Last-Event-ID": str(last)},
                **kwargs,
            ) as response:
                parser = SseParser()
                async for chunk in response.aiter_bytes():
                    for message in parser.feed(chunk):
                        if message.event == END:
                            yield Item(END, _decode(message.data, "a final run state"))
                            return
                        if message.event == STATE:
                            yield Item(STATE, _decode(message.data, "a run state"))
                            continue
                        event = _decode(message.data, "a run event")
                        seq = event.get("seq")
                        if not isinstance(seq, int) or isinstance(seq, bool):
                            raise GatewayApiError(
                                "the gateway sent a run event without a sequence number",
                                exitcodes.GATEWAY_ERROR,
                            )
                        if seq <= last:
                            continue  # already yielded before the reconnect
                        if seq != last + 1:
                            raise GatewayApiError(
                                f"run {run_id}: events {last + 1}..{seq - 1} are missing from the stream",
                                exitcodes.GATEWAY_ERROR,
                            )
                        last = seq
                        attempt = 0
                        progress_at = time.monotonic()
                        yield Item(EVENT, event)
                raise StreamDropped("the gateway closed the event stream before the run ended")
        except GatewayApiError as exc:
            if exc.status < 500:
                raise
            error: BaseException = exc
        except (httpx.TransportError, StreamDropped, SseError) as exc:
            error = exc
        attempt += 1
        if time.monotonic() - progress_at > give_up_after:
            raise GatewayApiError(
                f"run {run_id}: lost the event stream and could not resume it for {give_up_after:g} s "
                f"(last event {last}; {_describe(error)}); resume with: linkctl runs attach {run_id} "
                f"--after {last}",
                exitcodes.GATEWAY_ERROR,
            )
        if on_reconnect is not None:
            on_reconnect(attempt, last, error)
        await asyncio.sleep(min(FIRST_RETRY_DELAY * 2 ** (attempt - 1), MAX_RETRY_DELAY))


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
