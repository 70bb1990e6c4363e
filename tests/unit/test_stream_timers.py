"""TimerHub and LazyTimer: the lazy per-request timers both tunnel ends use."""

from __future__ import annotations

import asyncio

from tunnel._natsio.common import TIMER_TICK, LazyTimer, TimerHub


class _Owner:
    """A request as TimerHub sees it: its timer is created on first access."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fired: asyncio.Event) -> None:
        self.released = False
        self.created = False
        self._loop = loop
        self._fired = fired
        self._timer: LazyTimer | None = None

    @property
    def timer(self) -> LazyTimer:
        if self._timer is None:
            self.created = True
            self._timer = LazyTimer(self._loop, self._on_fire)
        return self._timer

    def _on_fire(self) -> float | None:
        self._fired.set()
        return None


async def test_the_tick_arms_live_requests_and_never_builds_timers_for_released_ones() -> None:
    loop = asyncio.get_running_loop()
    hub = TimerHub(loop)
    live_fired, gone_fired = asyncio.Event(), asyncio.Event()
    live, gone = _Owner(loop, live_fired), _Owner(loop, gone_fired)
    hub.add(live, loop.time() + TIMER_TICK)
    hub.add(gone, loop.time() + TIMER_TICK)
    gone.released = True  # ended within the tick, like most small requests
    await asyncio.wait_for(live_fired.wait(), timeout=5.0)
    assert live.created
    assert not gone.created
    assert not gone_fired.is_set()


async def test_a_request_without_a_deadline_is_not_tracked() -> None:
    loop = asyncio.get_running_loop()
    hub = TimerHub(loop)
    owner = _Owner(loop, asyncio.Event())
    hub.add(owner, None)
    assert hub._handle is None
    assert not owner.created
