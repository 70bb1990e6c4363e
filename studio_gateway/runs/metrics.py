"""The gateway's run metrics (``GET /metrics``), one :class:`RunMetrics` per application.

Series (all per gateway instance):

- ``studio_runs_created_total``: runs accepted by ``POST``;
- ``studio_runs_finished_total{status,failure_kind}``: terminal transitions this instance wrote
  (``failure_kind`` is ``""`` unless the status is ``failed``);
- ``studio_runs_dispatch_seconds{outcome}``: how long delivering a work item took
  (``outcome``: ``accepted`` or a failure kind);
- ``studio_runs_reaped_total``: runs the reaper failed (``desktop_lost``, ``events_lost``,
  ``dispatch_error``);
- ``studio_runs_uplink_events_total{result}``: uplink events the projector handled, by
  result: ``applied``, ``duplicate``, ``gap`` (retried later), ``stale_fence``,
  ``wrong_host``, ``terminal`` (late, after the run ended), ``unknown_run``, ``stray`` (for a
  run its host does not have, dropped without a state read), ``stale_read`` (the index says
  active but the state read found nothing: a lagging replica; given back, retried), ``invalid``,
  ``dead_letter`` (a poison event parked, see ``studio_runs_dead_letters_total``);
- ``studio_runs_projector_pending``: events in the projector's consumer not yet delivered
  (from the last message's metadata);
- ``studio_runs_projector_lag_seconds``: now minus the stream time of the last event applied;
- ``studio_runs_cancels_total{outcome}``: cancel requests by how they ended (``requested``:
  the desktop took it; ``gateway``: the gateway ended the run itself; ``already_finished``;
  ``failed``);
- ``studio_runs_projector_errors_total{kind}``: projector failures by kind (``unavailable``:
  its consumer not served for a while, e.g. a leader election or a dead node;
  ``consumer_gone``: deleted; ``open``: could not open or re-create it; ``fetch``; ``apply``:
  a state write failed, the events are redelivered; ``poison``: an event's apply step raised,
  once per delivery);
- ``studio_runs_projector_restarts_total``: host feeds the projector re-opened after one failed;
- ``studio_runs_quota_exceeded_total``: times a host went over its quota of events for runs
  it does not have (its events purged, its active runs failed as ``quota_exceeded``);
- ``studio_runs_reaper_errors_total``: reaper passes (or runs within one) that failed;
- ``studio_runs_stalled``: runs ``stalled`` at this instance's last reaper pass (every instance
  sees all runs: do not sum this one); ``studio_runs_stalls_total``: runs this instance's reaper
  marked stalled; ``studio_runs_resumed_total``: stalled runs this instance's projector resumed;
  ``studio_runs_resume_expired_total``: runs failed ``desktop_lost`` past the resume window;
- ``studio_runs_dead_letters_total``: events this instance's projector parked in the dead-letter
  bucket (their apply step raised on every one of ``MAX_POISON_DELIVERIES`` deliveries);
- ``studio_runs_ready`` (1 while runs work on this instance: set up, and the projector and the
  reaper healthy, as ``/healthz`` says), ``studio_runs_dispatch_in_flight``.
"""

from __future__ import annotations

import time

from ..metrics import Counter, Gauge, Histogram, Registry

__all__ = ["RunMetrics"]


class RunMetrics:
    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self.created = r.register(Counter("studio_runs_created_total", "Runs accepted by POST."))
        self.finished = r.register(
            Counter(
                "studio_runs_finished_total",
                "Runs this instance moved to a terminal status.",
                ("status", "failure_kind"),
            )
        )
        self.dispatch_seconds = r.register(
            Histogram(
                "studio_runs_dispatch_seconds", "Time to deliver a work item to the desktop.", ("outcome",)
            )
        )
        self.reaped = r.register(
            Counter("studio_runs_reaped_total", "Runs the reaper failed (desktop lost, events lost, ...).")
        )
        self.uplink_events = r.register(
            Counter("studio_runs_uplink_events_total", "Uplink events handled by the projector.", ("result",))
        )
        self.cancels = r.register(
            Counter("studio_runs_cancels_total", "Cancel requests by outcome.", ("outcome",))
        )
        self.projector_pending = r.register(
            Gauge("studio_runs_projector_pending", "Uplink events not yet delivered to the projector.")
        )
        self.projector_errors = r.register(
            Counter("studio_runs_projector_errors_total", "Projector failures by kind.", ("kind",))
        )
        self.projector_restarts = r.register(
            Counter("studio_runs_projector_restarts_total", "Feeds the projector re-opened after a failure.")
        )
        self.quota_exceeded = r.register(
            Counter(
                "studio_runs_quota_exceeded_total",
                "Times a host went over its quota of events for runs it does not have.",
            )
        )
        self.reaper_errors = r.register(
            Counter("studio_runs_reaper_errors_total", "Reaper passes, or runs in one, that failed.")
        )
        self.stalled = r.register(
            Gauge("studio_runs_stalled", "Runs stalled (desktop silent, within the resume window) now.")
        )
        self.stalls = r.register(
            Counter("studio_runs_stalls_total", "Runs this instance's reaper marked stalled.")
        )
        self.resumed = r.register(
            Counter("studio_runs_resumed_total", "Stalled runs resumed by their events flowing again.")
        )
        self.resume_expired = r.register(
            Counter(
                "studio_runs_resume_expired_total",
                "Runs failed as desktop_lost because their resume window passed.",
            )
        )
        self.dead_letters = r.register(
            Counter(
                "studio_runs_dead_letters_total",
                "Run events parked in the dead-letter bucket (their apply step kept raising).",
            )
        )
        self.ready = r.register(
            Gauge("studio_runs_ready", "1 while runs work on this instance (set up and healthy), else 0.")
        )
        self.dispatch_in_flight = r.register(
            Gauge("studio_runs_dispatch_in_flight", "Work items being delivered right now.")
        )
        self._last_event_time: float | None = None
        self.projector_lag = r.register(
            Gauge(
                "studio_runs_projector_lag_seconds",
                "Now minus the stream time of the last event the projector applied.",
                source=self._lag,
            )
        )

        # Messages to desktops (docs/runs.md, "Messages to a running run"): each send's outcome
        # (acknowledged, failed, unknown: resent later), the desktops' acknowledgements (duplicate:
        # the desktop had the message id already), resends, and signals the desktop took.
        self.messages_outbound = r.register(
            Counter(
                "studio_runs_messages_outbound_total",
                "Messages sent to desktops (kickoff, context, signal, cancel), by outcome.",
                ("kind", "result"),
            )
        )
        self.messages_acks = r.register(
            Counter(
                "studio_runs_messages_acks_total",
                "Acknowledgements from desktops, by message kind and whether it was a duplicate.",
                ("kind", "duplicate"),
            )
        )
        self.messages_resent = r.register(
            Counter("studio_runs_messages_resent_total", "Pending messages this instance sent again.")
        )
        self.signals = r.register(
            Counter(
                "studio_runs_signals_total",
                "Signals desktops took, by type (the first 100 types; then 'other') and severity.",
                ("signal_type", "severity"),
            )
        )

    def _lag(self) -> float | None:
        if self._last_event_time is None:
            return None
        return max(0.0, round(time.time() - self._last_event_time, 3))

    def event_applied_at(self, stream_time: float) -> None:
        self._last_event_time = stream_time

    def run_finished(self, status: str, failure_kind: str | None) -> None:
        self.finished.inc(status=status, failure_kind=failure_kind or "")

    def render(self) -> str:
        return self.registry.render()
