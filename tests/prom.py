"""Read Prometheus scrapes in tests with ``prometheus_client``'s own parsers.

Samples are matched by name and label set (the exposition sorts labels, so a sample is
never found by its text).
"""

from __future__ import annotations

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as text_families
from prometheus_client.samples import Sample

__all__ = ["parse_samples", "sample_value"]


def parse_samples(text: str, *, openmetrics: bool = False) -> list[Sample]:
    """Every sample of a scrape (ValueError if it does not parse)."""
    families = openmetrics_families(text) if openmetrics else text_families(text)
    return [sample for family in families for sample in family.samples]


def _spec(sample: str) -> tuple[str, dict[str, str]]:
    (parsed,) = parse_samples(f"{sample} 0\n")
    return parsed.name, dict(parsed.labels)


def sample_value(text: str, sample: str, *, openmetrics: bool = False) -> float | None:
    """The value of ``sample`` (``name`` or ``name{label="value",...}``), None when absent."""
    name, labels = _spec(sample)
    for found in parse_samples(text, openmetrics=openmetrics):
        if found.name == name and found.labels == labels:
            return float(found.value)
    return None
