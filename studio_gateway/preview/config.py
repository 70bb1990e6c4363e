"""The preview settings (``GATEWAY_PREVIEW_*``) as one frozen value object, checked at start-up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..settings import (
    DEFAULT_PREVIEW_COOKIE_TTL,
    DEFAULT_PREVIEW_TICKET_TTL,
    GATEWAY_PREVIEW_COOKIE_TTL,
    GATEWAY_PREVIEW_DOMAIN,
    GATEWAY_PREVIEW_SECRET,
    GATEWAY_PREVIEW_TICKET_TTL,
    ConfigError,
    SettingValues,
)

__all__ = ["MIN_SECRET_BYTES", "PreviewConfig", "PreviewDomain", "parse_domain"]

# As for GATEWAY_JWT_SECRET: an HMAC key shorter than this is guessable.
MIN_SECRET_BYTES: Final = 32
# Host names in the preview domain: dot-separated DNS labels, lowercase.
_HOSTNAME: Final = re.compile(
    r"(?=.{1,200}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
_DOMAIN: Final = re.compile(r"(?:(?P<scheme>https?)://)?(?P<host>[^:/]+)(?::(?P<port>\d{1,5}))?/?")


@dataclass(frozen=True)
class PreviewDomain:
    """Where previews live: ``<label>.<host>``; ``port`` None means the port the API caller used."""

    host: str
    scheme: str = "https"
    port: int | None = None

    @property
    def secure(self) -> bool:
        return self.scheme == "https"


def parse_domain(raw: str) -> PreviewDomain:
    """``[http://|https://]host[:port]``; without a scheme, ``http`` for ``localhost`` names
    (browsers resolve ``*.localhost`` to loopback) and ``https`` for everything else."""
    env = GATEWAY_PREVIEW_DOMAIN.env
    match = _DOMAIN.fullmatch(raw.strip().lower())
    if match is None:
        raise ConfigError(env, f"{raw!r} is not [http://|https://]host[:port]")
    host = match["host"].strip(".")
    if not _HOSTNAME.fullmatch(host) or ("." not in host and host != "localhost"):
        raise ConfigError(env, f"{host!r} is not a DNS name with room for a label in front")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(env, f"port {port} is out of range")
    local = host == "localhost" or host.endswith(".localhost")
    scheme = match["scheme"] or ("http" if local else "https")
    return PreviewDomain(host=host, scheme=scheme, port=port)


@dataclass(frozen=True)
class PreviewConfig:
    """``domain`` None: previews are off (the API answers 503 ``preview_disabled``)."""

    domain: PreviewDomain | None = None
    # None: a random key per process (tickets and cookies die with it; fine for one gateway).
    secret: bytes | None = field(default=None, repr=False)
    ticket_ttl: float = DEFAULT_PREVIEW_TICKET_TTL
    cookie_ttl: float = DEFAULT_PREVIEW_COOKIE_TTL

    @classmethod
    def from_settings(cls, values: SettingValues) -> PreviewConfig:
        raw_domain = (values.given(GATEWAY_PREVIEW_DOMAIN) or "").strip()
        return cls(
            domain=parse_domain(raw_domain) if raw_domain else None,
            secret=_secret(values.given(GATEWAY_PREVIEW_SECRET)),
            ticket_ttl=values.value(GATEWAY_PREVIEW_TICKET_TTL),
            cookie_ttl=values.value(GATEWAY_PREVIEW_COOKIE_TTL),
        )


def _secret(raw: str | None) -> bytes | None:
    """The key, given inline or as a path to a file holding it (as the other secrets)."""
    env = GATEWAY_PREVIEW_SECRET.env
    text = (raw or "").strip()
    if not text:
        return None
    if text.startswith(("/", "./", "~/")) and "\n" not in text:
        path = Path(text).expanduser()
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(env, f"cannot read {path}: {exc.strerror}") from None
    key = text.encode("utf-8")
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(env, f"too short: use at least {MIN_SECRET_BYTES} bytes of random data")
    return key
