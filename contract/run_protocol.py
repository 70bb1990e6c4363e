"""The run uplink's wire contract, shared by the daemon (producer) and the gateway (projector).

A daemon serving host ``H`` under tunnel prefix ``P`` publishes every event of a
run (see :mod:`linkd.run_events` for the JSON shape) to::

    P.host.<token(H)>.runs.<runId>

with header ``Nats-Msg-Id: <runId>:<fence>:<seq>:<execution>``, as a JetStream
publish (it waits for the ack and retries with the same id). A message may carry
several consecutive events of the run, one compact JSON object per line (``\n``
between them), with ``Nats-Msg-Id: <runId>:<fence>:<firstSeq>-<lastSeq>:<execution>``:
a batch is one message through the servers, the projector and every reader instead of
one per event (:func:`split_events` reads both). A batch sent again is the same batch,
and if its events are re-cut after a reconnect, the overlap is recognised by seq
(readers and the projector take each seq once). ``execution`` is 16
random hex characters fixed for one run execution: JetStream de-duplicates per
stream, not per subject, so with a predictable id another host's daemon could
publish ``<runId>:<fence>:<seq>`` first under its own subject and have the real
event dropped as a duplicate; it cannot guess this host's random part. Those subjects sit under the
host's own prefix, so the daemon's NATS permissions (publish ``P.host.<token>.runs.*``)
confine it to its own runs: the projector takes the host from the subject, never
from the payload.

The daemon's request inbox is ``P.host.<token>.inbox`` (JetStream publish acks
arrive there), so its credential never needs ``_INBOX.>``.

The gateway creates the stream ``RUN_STREAM`` capturing ``P.host.*.runs.*``.

A ``done`` event with ``status: "failed"`` may name why in ``failureKind`` (one of
:data:`DAEMON_FAILURE_KINDS`); the run's failure kind is then that one, otherwise
``run_failed``. :data:`DAEMON_RESTARTED`: the daemon was restarted (a crash, SIGKILL, a
reboot) while the run worked, and the run's runner cannot resume (docs/runs.md, "Daemon
restarts").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

import tunnel

__all__ = [
    "DAEMON_FAILURE_KINDS",
    "DAEMON_RESTARTED",
    "FAILURE_KIND_FIELD",
    "RUN_ID_PATTERN",
    "RUN_STREAM",
    "RunSubject",
    "is_valid_run_id",
    "parse_event",
    "parse_run_subject",
    "run_event_subject",
    "run_stream_subjects",
    "split_events",
    "uplink_inbox_prefix",
    "uplink_publish_grant",
]

RUN_STREAM: Final = "LINK_RUNS"
# The done event's field naming a failure kind, and the kinds a daemon may name there.
FAILURE_KIND_FIELD: Final = "failureKind"
DAEMON_RESTARTED: Final = "daemon_restarted"
DAEMON_FAILURE_KINDS: Final = frozenset({DAEMON_RESTARTED})
RUN_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RUNS_SEGMENT: Final = "runs"
_INBOX_SEGMENT: Final = "inbox"


def split_events(data: bytes) -> list[bytes]:
    """The events of one message: one, or several separated by line breaks (see the module doc)."""
    if b"\n" not in data:
        return [data]
    return [line for line in data.split(b"\n") if line.strip()]


def parse_event(line: bytes | str) -> dict[str, Any] | None:
    """One event as a JSON object, or None for anything else a desktop may have published.

    Malformed, not UTF-8, not an object, or nested so deeply that Python's parser gives up
    (a ``RecursionError``, which is no ``ValueError``): the gateway's readers skip or count such
    a line; none of them may stop on it, or one host would stall everybody's runs.
    """
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


def is_valid_run_id(run_id: str) -> bool:
    """Run ids end up in subjects and message ids: letters, digits, ``_`` and ``-`` only."""
    return RUN_ID_PATTERN.fullmatch(run_id) is not None


def run_event_subject(subjects: tunnel.HostSubjects, run_id: str) -> str:
    if not is_valid_run_id(run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    return f"{subjects.base}.{_RUNS_SEGMENT}.{run_id}"


def uplink_inbox_prefix(subjects: tunnel.HostSubjects) -> str:
    """The daemon's nats-py ``inbox_prefix``: JetStream acks come back under its own host."""
    return f"{subjects.base}.{_INBOX_SEGMENT}"


def uplink_publish_grant(subjects: tunnel.HostSubjects) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(publish, subscribe)`` allow-lists the uplink needs, all under the host's own prefix."""
    return (f"{subjects.base}.{_RUNS_SEGMENT}.*",), (f"{uplink_inbox_prefix(subjects)}.>",)


def run_stream_subjects(prefix: str = tunnel.DEFAULT_PREFIX) -> list[str]:
    """The subjects the run stream captures: every host's run events, nothing else."""
    return [f"{prefix}.host.*.{_RUNS_SEGMENT}.*"]


@dataclass(frozen=True, slots=True)
class RunSubject:
    host_token: str
    run_id: str


def parse_run_subject(subject: str, prefix: str = tunnel.DEFAULT_PREFIX) -> RunSubject | None:
    """The host token and run id of an uplink subject, or None when it is not one."""
    head = f"{prefix}.host."
    if not subject.startswith(head):
        return None
    parts = subject[len(head) :].split(".")
    if len(parts) != 3 or parts[1] != _RUNS_SEGMENT or not parts[0] or not is_valid_run_id(parts[2]):
        return None
    return RunSubject(parts[0], parts[2])
