"""Every webhook by its user's tunnel host, in memory, from a watch on ``LINK_WEBHOOKS``.

The webhook processor sees every run event; the subject names the host, and a host is one
user's (``tunnel_hostname(user id)``). With this index an event of a host whose user has no
webhook costs a dictionary lookup, not a read (a desktop flooding its subjects costs the
webhooks nothing). A webhook registered on this instance is added at once; on the others the
watch brings it within milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from nats.js.kv import KeyValue

import tunnel

from ..hostnames import tunnel_hostname

__all__ = ["WebhookIndex"]


def host_token_of(user_id: str) -> str:
    return tunnel.host_token(tunnel_hostname(user_id))


class WebhookIndex:
    def __init__(self) -> None:
        self._by_host: dict[str, dict[str, dict[str, Any]]] = {}
        self._host_of: dict[str, str] = {}  # webhook id -> host token
        self.ready = asyncio.Event()  # the bucket's content was read once

    def hosts(self) -> list[str]:
        return list(self._by_host)

    def has_host(self, host_token: str) -> bool:
        return host_token in self._by_host

    def for_host(self, host_token: str) -> list[dict[str, Any]]:
        return list(self._by_host.get(host_token, {}).values())

    def add(self, record: dict[str, Any]) -> None:
        host = host_token_of(str(record["userId"]))
        self._by_host.setdefault(host, {})[str(record["id"])] = record
        self._host_of[str(record["id"])] = host

    def remove(self, webhook_id: str) -> None:
        host = self._host_of.pop(webhook_id, None)
        if host is not None:
            hooks = self._by_host.get(host, {})
            hooks.pop(webhook_id, None)
            if not hooks:
                self._by_host.pop(host, None)

    async def run(self, kv: KeyValue) -> None:
        """Follow the bucket until cancelled (raises when the watch fails: the owner restarts it).

        Ready once an entry says nothing was pending after it (``delta``: the server's count,
        carried on the message), or once the entry at the bucket's last sequence (read before
        the watch) is indexed, whichever comes first; not at nats-py's separate "no more
        pending" marker, which can come before entries the watcher has already received. The
        last message per key arrives in stream order, and the bucket keeps its last message (no
        max age; a delete leaves a marker) unless an operator purges a subject: ``delta`` covers
        that.
        """
        state = (await kv.status()).stream_info.state
        loaded_at = state.last_seq if state.messages else 0
        watcher = await kv.watchall()
        try:
            if not loaded_at:
                self.ready.set()
            async for entry in watcher:
                if entry is None:
                    continue
                webhook_id = entry.key.rsplit(".", 1)[-1]
                if entry.operation is not None or not entry.value:
                    self.remove(webhook_id)
                else:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.add(json.loads(entry.value))
                if not self.ready.is_set() and (entry.delta == 0 or (entry.revision or 0) >= loaded_at):
                    self.ready.set()
        finally:
            self.ready.clear()
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
