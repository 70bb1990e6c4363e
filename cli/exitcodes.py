"""Exit statuses of ``linkctl``: stable, documented, safe to branch on in scripts.

======  ==========================================================================
status  meaning
======  ==========================================================================
0       success (``fetch``: the response arrived, whatever its HTTP status unless
        ``--fail``; ``status``: the desktop is online)
1       ``status``: the desktop is offline (nobody serves the host, or it did not
        answer in time); ``services``: no service answered within ``--timeout``
2       usage or set-up error: bad flag, URL, header or file; NATS unreachable or
        refusing the credentials; the gateway unreachable or refusing the token;
        ``status``: the probe itself failed (the desktop answered something that
        is not a status document, NATS dropped)
3       gateway commands (``session``, ``runs``, ``status --gateway``): the gateway
        answered with an error this command cannot act on (5xx, malformed answer)
4       ``runs``: no such run (or it belongs to another user); ``webhooks``: no such
        webhook
5       ``runs cancel``: the run had already finished; ``webhooks add``: too many
        webhooks
6       ``runs attach`` / ``send --attach``: the run ended ``failed``
7       ``runs attach`` / ``send --attach``: the run ended ``cancelled``
8       ``dev`` / ``demo``: a part of the local stack did not start or died
9       ``demo``: a check failed (desktop not online, run not completed, events
        out of order)
10-21   ``fetch``: a typed tunnel error, one status per stable code (table below)
22      ``fetch --fail``: the response status was 400 or more
23      ``fetch``: the output could not be written (disk full, closed pipe)
24      ``fetch``: a tunnel error with a code this version does not know (sent by a
        newer peer)
25      ``fetch``: ``tunnel_stalled`` (the desktop gave up on a stalled transfer)
26      ``fetch``/``forward``: ``tunnel_upgrade_unsupported`` (an upgrade, such as a
        WebSocket, asked of a desktop whose daemon cannot carry one)
27      ``fetch``: ``tunnel_integrity_error`` (the response body arrived corrupted
        or truncated: its byte count or CRC-32 differs from what the desktop sent)
28      ``tunnel_permission_denied`` (NATS refused a subscription a server needs)
29      NATS over TLS: a certificate problem (unknown CA, wrong host name, expired,
        client certificate required); the line names the URL and the flag that fixes it
30      ``inspect``: linkd's inspector cannot be reached or read
130     interrupted (Ctrl-C) while a request was in flight
======  ==========================================================================

``tunnel_bad_request`` raised locally (we could not even express the request:
bad header, method or URL) is a usage error, status 2.
"""

from __future__ import annotations

from typing import Final

from tunnel import ErrorCode

OK: Final = 0
OFFLINE: Final = 1
USAGE: Final = 2
GATEWAY_ERROR: Final = 3
NOT_FOUND: Final = 4
CONFLICT: Final = 5
RUN_FAILED: Final = 6
RUN_CANCELLED: Final = 7
STACK_FAILED: Final = 8
DEMO_FAILED: Final = 9
HTTP_ERROR: Final = 22
WRITE_ERROR: Final = 23
UNKNOWN_TUNNEL_ERROR: Final = 24
INSPECTOR_UNREACHABLE: Final = 30
# A TLS handshake with NATS failed on a certificate (unknown CA, host name, expiry, mTLS).
TLS_ERROR: Final = 29
INTERRUPTED: Final = 130

TUNNEL_ERROR_EXIT: Final[dict[str, int]] = {
    ErrorCode.UNREACHABLE: 10,
    ErrorCode.NO_FIRST_FRAME: 11,
    ErrorCode.IDLE_TIMEOUT: 12,
    ErrorCode.TIMEOUT: 13,
    ErrorCode.ABORTED: 14,
    ErrorCode.PROTOCOL_ERROR: 15,
    ErrorCode.HANDLER_ERROR: 16,
    ErrorCode.CONNECTION_CLOSED: 17,
    ErrorCode.SERVER_CLOSING: 18,
    ErrorCode.OVERLOADED: 19,
    ErrorCode.BUFFER_LIMIT: 20,
    ErrorCode.BODY_ERROR: 21,
    # Sent by a server whose caller stopped granting credit or sending its body.
    ErrorCode.STALLED: 25,
    # An upgrade (WebSocket) asked of a daemon that speaks only plain v1.
    ErrorCode.UPGRADE_UNSUPPORTED: 26,
    # A body that arrived with another byte count or CRC-32 than its sender stated.
    ErrorCode.INTEGRITY: 27,
    # Set-up, not transport: NATS refused a subscription serving needs (linkctl serves nothing,
    # but the code must not collide with another's status).
    ErrorCode.PERMISSION_DENIED: 28,
    # A peer that judged our request malformed: a usage problem on our side.
    ErrorCode.BAD_REQUEST: USAGE,
}


def for_tunnel_code(code: str) -> int:
    """The exit status for a tunnel error code (see the module table)."""
    return TUNNEL_ERROR_EXIT.get(code, UNKNOWN_TUNNEL_ERROR)


def describe() -> str:
    """The exit status table as help text (``\\b`` keeps click from rewrapping it)."""
    rows = [
        ("0", "success (any HTTP status unless --fail)"),
        ("2", "usage error: bad flag, URL, header or file; NATS unreachable"),
        *((str(status), code) for code, status in TUNNEL_ERROR_EXIT.items() if status != USAGE),
        ("22", "--fail and an HTTP status of 400 or more"),
        ("23", "the output could not be written"),
        ("24", "another tunnel error code"),
        ("29", "NATS TLS: a certificate problem (unknown CA, host name, expired, client cert)"),
        ("130", "interrupted"),
    ]
    rows.sort(key=lambda row: int(row[0]))
    return "\b\nExit status:\n" + "\n".join(f"  {status:>4}  {text}" for status, text in rows)
