"""The webhooks' settings (``WEBHOOKS_*``, docs/runs.md "Webhooks")."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import (
    DEFAULT_WEBHOOKS_MAX_AGE,
    DEFAULT_WEBHOOKS_MAX_ATTEMPTS,
    DEFAULT_WEBHOOKS_RETRY_BASE,
    DEFAULT_WEBHOOKS_RETRY_MAX,
    DEFAULT_WEBHOOKS_TIMEOUT,
    WEBHOOKS_ALLOW_HTTP,
    WEBHOOKS_ALLOW_PRIVATE,
    WEBHOOKS_MAX_AGE,
    WEBHOOKS_MAX_ATTEMPTS,
    WEBHOOKS_RETRY_BASE,
    WEBHOOKS_RETRY_MAX,
    WEBHOOKS_TIMEOUT,
    ConfigError,
    SettingValues,
)

__all__ = ["WebhooksConfig"]


@dataclass(frozen=True)
class WebhooksConfig:
    allow_http: bool = False
    allow_private: bool = False
    max_attempts: int = DEFAULT_WEBHOOKS_MAX_ATTEMPTS
    max_age: float = DEFAULT_WEBHOOKS_MAX_AGE
    retry_base: float = DEFAULT_WEBHOOKS_RETRY_BASE
    retry_max: float = DEFAULT_WEBHOOKS_RETRY_MAX
    timeout: float = DEFAULT_WEBHOOKS_TIMEOUT

    @classmethod
    def from_settings(cls, values: SettingValues) -> WebhooksConfig:
        config = cls(
            allow_http=values.value(WEBHOOKS_ALLOW_HTTP),
            allow_private=values.value(WEBHOOKS_ALLOW_PRIVATE),
            max_attempts=values.value(WEBHOOKS_MAX_ATTEMPTS),
            max_age=values.value(WEBHOOKS_MAX_AGE),
            retry_base=values.value(WEBHOOKS_RETRY_BASE),
            retry_max=values.value(WEBHOOKS_RETRY_MAX),
            timeout=values.value(WEBHOOKS_TIMEOUT),
        )
        if config.retry_max < config.retry_base:
            raise ConfigError(WEBHOOKS_RETRY_MAX.env, "must be at least WEBHOOKS_RETRY_BASE_SECONDS")
        return config
