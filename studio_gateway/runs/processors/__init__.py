"""Processors over the run stream (docs/runs.md, "Processors"): a small class API.

- ``base``: :class:`Processor` (name, event types, subject filter, ``handle``) and :class:`RunEvent`;
- ``anchors``: ``ctx.once(key, action)``, the record that an effect happened (claim, act, done);
- ``context``: what ``handle`` gets; ``feed``: the durable consumer that is a processor's checkpoint;
- ``runner``: pulls, handles, acknowledges; ``service``: registration, lifetime, lag;
- ``projector``: the projector described as a processor; ``admin``: ``GET /api/admin/processors``.
"""
