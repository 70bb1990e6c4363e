"""The processors' settings (``RUNS_PROCESSORS``, ``RUNS_PROCESSOR_LEASE_SECONDS``)."""

from __future__ import annotations

from dataclasses import dataclass

from ...settings import DEFAULT_RUNS_PROCESSOR_LEASE, RUNS_PROCESSOR_LEASE, RUNS_PROCESSORS, SettingValues

__all__ = ["ProcessorsConfig"]


@dataclass(frozen=True)
class ProcessorsConfig:
    # More processors, ``module:attribute`` each (loaded at start-up).
    extra: tuple[str, ...] = ()
    lease: float = DEFAULT_RUNS_PROCESSOR_LEASE

    @classmethod
    def from_settings(cls, values: SettingValues) -> ProcessorsConfig:
        raw = values.value(RUNS_PROCESSORS)
        extra = tuple(part.strip() for part in raw.split(",") if part.strip())
        return cls(extra=extra, lease=values.value(RUNS_PROCESSOR_LEASE))
