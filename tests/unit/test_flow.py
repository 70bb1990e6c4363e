"""Credit-based flow control and sequence checking (sans-IO)."""

from __future__ import annotations

import pytest

from tunnel._errors import BufferLimitExceeded, LocalProtocolError, RemoteProtocolError
from tunnel._flow import GRANT_THRESHOLD_FRACTION, MAX_CREDIT, GrowthBudget, ReceiveWindow, SendCredit

# --------------------------------------------------------------------------- SendCredit


def test_send_credit_counts_down_and_numbers_frames_from_zero() -> None:
    credit = SendCredit(100)
    assert not credit.unlimited
    assert credit.available() == 100
    assert credit.spend(30) == 0
    assert credit.spend(0) == 1
    assert credit.spend(70) == 2
    assert credit.available() == 0
    assert credit.sent_bytes == 100
    assert credit.next_seq == 3


def test_send_credit_never_allows_spending_over_credit() -> None:
    credit = SendCredit(100)
    credit.spend(60)
    with pytest.raises(LocalProtocolError):
        credit.spend(41)
    # A refused spend changes nothing.
    assert credit.available() == 40
    assert credit.next_seq == 1
    assert credit.sent_bytes == 60
    assert credit.spend(40) == 1
    with pytest.raises(LocalProtocolError):
        credit.spend(1)


def test_grants_are_cumulative_limits_so_lost_or_repeated_ones_do_no_harm() -> None:
    credit = SendCredit(10)
    credit.spend(10)
    credit.grant(15)  # imagine this one was lost ...
    credit.grant(22)  # ... the next limit covers it
    assert credit.available() == 12
    credit.grant(22)  # a repeat changes nothing
    credit.grant(15)  # nor does a stale (reordered) one
    assert credit.available() == 12
    credit.spend(12)
    assert credit.available() == 0


def test_accumulated_credit_is_bounded() -> None:
    credit = SendCredit(MAX_CREDIT - 1)
    credit.grant(MAX_CREDIT)
    credit.grant(MAX_CREDIT)
    assert credit.available() == MAX_CREDIT


def test_no_flow_control_means_unlimited_and_ignores_grants() -> None:
    credit = SendCredit(None)
    assert credit.unlimited
    assert credit.available() >= 2**53 - 1
    credit.grant(10)
    assert credit.unlimited
    assert credit.spend(10**12) == 0
    assert credit.spend(10**12) == 1
    assert credit.sent_bytes == 2 * 10**12


# --------------------------------------------------------------------------- ReceiveWindow


def test_contiguous_chunks_within_the_window_are_accepted() -> None:
    window = ReceiveWindow(100)
    window.on_chunk(0, 40)
    window.on_chunk(1, 0)
    window.on_chunk(2, 60)
    window.on_end(3)
    assert window.received_bytes == 100
    assert window.buffered == 100


def test_gap_is_detected() -> None:
    window = ReceiveWindow(100)
    window.on_chunk(0, 10)
    with pytest.raises(RemoteProtocolError, match="missing"):
        window.on_chunk(2, 10)


def test_first_chunk_must_be_seq_zero() -> None:
    with pytest.raises(RemoteProtocolError):
        ReceiveWindow(100).on_chunk(1, 10)


def test_duplicate_is_detected() -> None:
    window = ReceiveWindow(100)
    window.on_chunk(0, 10)
    window.on_chunk(1, 10)
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        window.on_chunk(1, 10)
    with pytest.raises(RemoteProtocolError):
        window.on_chunk(0, 10)


def test_sequence_is_checked_even_without_flow_control() -> None:
    window = ReceiveWindow(None, buffer_limit=10**12)
    window.on_chunk(0, 10**9)
    with pytest.raises(RemoteProtocolError):
        window.on_chunk(0, 1)
    with pytest.raises(RemoteProtocolError):
        window.on_chunk(5, 1)


def test_overrun_of_granted_credit_is_detected() -> None:
    window = ReceiveWindow(100)
    window.on_chunk(0, 100)
    with pytest.raises(RemoteProtocolError, match="credit"):
        window.on_chunk(1, 1)
    fresh = ReceiveWindow(100)
    with pytest.raises(RemoteProtocolError):
        fresh.on_chunk(0, 101)


def test_no_credit_check_without_flow_control_only_a_buffer_limit() -> None:
    window = ReceiveWindow(None, buffer_limit=10**12)
    window.on_chunk(0, 10**12)
    assert window.on_consumed(10**12) is None
    window.on_chunk(1, 10**12)  # consumed bytes no longer count against the limit


def test_a_peer_without_flow_control_cannot_outrun_the_reader_past_the_buffer_limit() -> None:
    window = ReceiveWindow(None, buffer_limit=1000)
    window.on_chunk(0, 600)
    with pytest.raises(BufferLimitExceeded):
        window.on_chunk(1, 600)
    window.on_consumed(600)
    window.on_chunk(1, 600)


@pytest.mark.parametrize("end_seq", [0, 1, 3, 100])
def test_end_seq_must_equal_the_number_of_chunks(end_seq: int) -> None:
    window = ReceiveWindow(100)
    window.on_chunk(0, 1)
    window.on_chunk(1, 1)
    with pytest.raises(RemoteProtocolError):
        window.on_end(end_seq)
    window.on_end(2)


def test_empty_body_ends_at_seq_zero() -> None:
    window = ReceiveWindow(100)
    window.on_end(0)
    with pytest.raises(RemoteProtocolError):
        ReceiveWindow(100).on_end(1)


def test_grant_comes_once_half_the_window_is_consumed() -> None:
    assert GRANT_THRESHOLD_FRACTION == 0.5
    window = ReceiveWindow(100)
    window.on_chunk(0, 100)
    assert window.on_consumed(20) is None
    assert window.on_consumed(29) is None
    assert window.on_consumed(1) == 150  # 50 consumed since the last grant: new limit 100 + 50
    assert window.on_consumed(30) is None
    assert window.on_consumed(20) == 200
    assert window.granted == 200


def test_a_grant_lets_exactly_that_much_more_data_in() -> None:
    window = ReceiveWindow(100)
    window.on_chunk(0, 100)
    limit = window.on_consumed(60)
    assert limit == 160
    window.on_chunk(1, 60)
    with pytest.raises(RemoteProtocolError):
        window.on_chunk(2, 1)


def test_buffered_bytes_track_received_minus_consumed() -> None:
    window = ReceiveWindow(1000)
    window.on_chunk(0, 300)
    window.on_chunk(1, 200)
    assert window.buffered == 500
    window.on_consumed(120)
    assert window.buffered == 380
    window.on_chunk(2, 100)
    assert window.buffered == 480
    window.on_consumed(480)
    assert window.buffered == 0
    assert window.received_bytes == 600


def _transfer(send: SendCredit, receive: ReceiveWindow, to_send: int, *, read_all: bool) -> int:
    """Move ``to_send`` bytes in frames of up to 300 under credit; returns the most ever buffered.

    Each round the sender spends all its credit, then the application reads one frame, or
    everything there is (``read_all``); grants flow back as they come due.
    """
    pending: list[int] = []
    delivered = 0
    peak = 0
    while delivered < to_send:
        while send.available() > 0 and delivered + sum(pending) < to_send:
            n = min(300, send.available(), to_send - delivered - sum(pending))
            receive.on_chunk(send.spend(n), n)
            pending.append(n)
        peak = max(peak, receive.buffered)
        for _ in range(len(pending) if read_all else 1):
            n = pending.pop(0)
            delivered += n
            grant = receive.on_consumed(n)
            if grant is not None:
                send.grant(grant)
    receive.on_end(send.next_seq)
    assert receive.received_bytes == to_send == send.sent_bytes
    return peak


def test_sender_and_receiver_agree_over_a_long_transfer() -> None:
    """A sender that obeys its credit never overruns a receiver that grants as it consumes."""
    receive = ReceiveWindow(1000)
    assert _transfer(SendCredit(1000), receive, 25_000, read_all=False) <= 1000
    assert receive.window == 1000


def test_the_current_limit_is_repeated_only_when_nothing_waits_unread() -> None:
    window = ReceiveWindow(100)
    assert window.regrant() == 100
    window.on_chunk(0, 60)
    assert window.regrant() is None  # the reader has data: the sender is not stuck on us
    window.on_consumed(60)
    assert window.regrant() == 160
    assert ReceiveWindow(None).regrant() is None


# --------------------------------------------------------------------------- window growth


def test_a_reader_that_empties_its_buffer_doubles_the_window_at_the_next_grant() -> None:
    window = ReceiveWindow(100, max_window=400)
    window.on_chunk(0, 50)
    assert window.on_consumed(50) == 100 + 50 + 100  # caught up: the consumed bytes, plus 100 more
    assert window.window == 200
    window.on_chunk(1, 200)  # the peer may use all of it: 250 in all
    with pytest.raises(RemoteProtocolError):
        window.on_chunk(2, 1)


def test_the_window_grows_no_further_than_max_window() -> None:
    window = ReceiveWindow(100, max_window=300)
    sizes = []
    for seq in range(6):
        room = window.granted - window.received_bytes
        window.on_chunk(seq, room)
        window.on_consumed(room)  # read everything at once: always caught up
        sizes.append(window.window)
    assert sizes == [200, 300, 300, 300, 300, 300]
    assert window.granted - window.received_bytes == 300


def test_a_reader_behind_its_sender_keeps_its_window() -> None:
    """The sender refills the window before the reader ever empties it: no growth."""
    window = ReceiveWindow(100, max_window=10_000)
    window.on_chunk(0, 100)
    seq = 1
    for _ in range(50):
        grant = window.on_consumed(50)  # the reader takes half; half is still unread
        assert grant is not None
        window.on_chunk(seq, grant - window.received_bytes)  # the sender uses all new credit at once
        seq += 1
        assert window.buffered == 100
    assert window.window == 100


def test_catching_up_once_grows_the_window_once() -> None:
    window = ReceiveWindow(100, max_window=10_000)
    window.on_chunk(0, 100)
    window.on_consumed(100)  # caught up; this grant doubles
    assert window.window == 200
    window.on_chunk(1, 200)
    window.on_consumed(100)  # half of the new window read, half still buffered: no growth
    assert window.window == 200


def test_without_max_window_or_below_window_the_window_is_fixed() -> None:
    for window in (ReceiveWindow(100), ReceiveWindow(100, max_window=50)):
        window.on_chunk(0, 100)
        assert window.on_consumed(100) == 200
        assert window.window == 100


def test_sender_and_a_fast_reader_agree_as_the_window_grows() -> None:
    """Credit grows with the window, the sender may use it, and no more is ever buffered."""
    receive = ReceiveWindow(1000, max_window=8000)
    assert _transfer(SendCredit(1000), receive, 200_000, read_all=True) <= 8000
    assert receive.window == 8000


def test_windows_sharing_a_budget_grow_no_further_than_it_allows_in_all() -> None:
    budget = GrowthBudget(150)
    first = ReceiveWindow(100, max_window=1000, budget=budget)
    second = ReceiveWindow(100, max_window=1000, budget=budget)
    first.on_chunk(0, 100)
    assert first.on_consumed(100) == 300  # grew by 100 (the budget had it)
    second.on_chunk(0, 100)
    assert second.on_consumed(100) == 250  # only 50 left to grow by
    assert (first.window, second.window, budget.used) == (200, 150, 150)
    first.on_chunk(1, 200)
    assert first.on_consumed(200) == 500  # caught up again, but the budget is spent: no growth
    assert first.window == 200


def _grown_once() -> tuple[GrowthBudget, ReceiveWindow]:
    """A window of 100 that caught up once and grew to 200, taking 100 from a budget of 1000."""
    budget = GrowthBudget(1000)
    window = ReceiveWindow(100, max_window=1000, budget=budget)
    window.on_chunk(0, 100)
    window.on_consumed(100)
    assert (window.window, budget.used) == (200, 100)
    return budget, window


def test_a_released_window_returns_its_growth_once_nothing_is_unread_and_grows_no_more() -> None:
    budget, window = _grown_once()
    assert budget.used == 100
    window.on_chunk(1, 200)  # still unread when the stream ends
    window.release()
    window.release()  # twice is harmless
    assert budget.used == 100  # the bytes that came under the grown window are still held
    window.on_consumed(150)
    assert budget.used == 100
    window.on_consumed(50)  # the application drained the rest: nothing is held any more
    assert (window.window, budget.used) == (200, 0)


def test_a_window_released_with_nothing_unread_returns_its_growth_at_once() -> None:
    budget, window = _grown_once()
    window.release()
    assert budget.used == 0


def test_discarding_what_is_unread_returns_the_growth_of_a_released_window() -> None:
    budget, window = _grown_once()
    window.on_chunk(1, 150)
    window.discard()  # not released yet: the stream goes on, nothing to give back
    assert (window.buffered, budget.used) == (0, 100)
    window.on_chunk(2, 50)
    window.release()
    window.discard()
    assert budget.used == 0


def test_a_budget_of_zero_keeps_every_window_fixed() -> None:
    window = ReceiveWindow(100, max_window=1000, budget=GrowthBudget(0))
    window.on_chunk(0, 100)
    assert window.on_consumed(100) == 200
    assert window.window == 100


def test_a_budget_never_goes_negative() -> None:
    budget = GrowthBudget(10)
    assert budget.take(-5) == 0
    budget.give_back(7)
    assert budget.used == 0
