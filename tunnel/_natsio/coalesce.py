"""Body pieces that are ready at once travel together: fewer, larger frames, and never a wait.

Handlers and uploads often yield small pieces back to back (an async generator over a list, a
rendered template, a streaming response of lines). Each piece in its own frame costs a NATS
message and the receiver's work per frame. Here the next piece is asked for without
suspending: if the iterator hands it over at once, it joins the current piece (up to
``limit`` bytes); if it would wait, the current piece goes out first and that ask is awaited
afterwards. No byte is ever held back for a later one: Nagle without the delay.

Asking "without suspending" means running the iterator's ``__anext__`` one step by hand. When
that step suspends, the started ask is kept (:class:`_Started`) and awaited later exactly as
if it had been awaited in the first place: the task sees the same future, the iterator
resumes where it stopped. The one private-looking detail is that protocol (``send``/``throw``
on an awaitable's iterator), which is the language's, not a library's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from typing import Any, Final

log = logging.getLogger("tunnel")

Piece = bytes | bytearray | memoryview

_END: Final = object()


class _Started:
    """An ``__anext__`` that suspended after its first step; awaiting it continues the ask."""

    __slots__ = ("_first", "_steps")

    def __init__(self, steps: Generator[Any, Any, Any], first: Any) -> None:
        self._steps = steps
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        steps, value = self._steps, self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:  # a cancellation (or a throw) goes to the iterator
                try:
                    value = steps.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = steps.send(sent)
                except StopIteration as done:
                    return done.value

    async def abandon(self) -> None:
        """Cancel the ask where it waits, and let the iterator's own cleanup run (it may await)."""
        try:
            value = self._steps.throw(asyncio.CancelledError())
        except (StopIteration, StopAsyncIteration, asyncio.CancelledError):
            return
        except Exception:
            log.warning("a body iterator failed while its pending read was cancelled", exc_info=True)
            return
        self._first = value  # its cleanup awaits something: see it through
        try:
            await self
        except (StopAsyncIteration, asyncio.CancelledError):
            pass
        except Exception:
            log.warning("a body iterator failed while its pending read was cancelled", exc_info=True)


def _ask_now(pieces: AsyncIterator[Any]) -> Any:
    """The next piece if the iterator has it without suspending; ``_END``; the exception it
    raised; or the started ask (:class:`_Started`) when it would wait."""
    steps = pieces.__anext__().__await__()
    try:
        first = steps.send(None)
    except StopIteration as done:
        return done.value
    except StopAsyncIteration:
        return _END
    except Exception as exc:
        return exc
    return _Started(steps, first)


async def coalesced(
    pieces: AsyncIterator[Any], limit: int, convert: Callable[[Any], Piece]
) -> AsyncGenerator[Piece, None]:
    """The pieces of ``pieces`` (each passed through ``convert``), those ready at once joined
    up to ``limit`` bytes. An exception the iterator raises comes after the bytes before it.

    Close it (``aclose``) before closing ``pieces``: it may hold a started ask.
    """
    pending: _Started | None = None
    try:
        while True:
            try:
                if pending is not None:
                    step, pending = pending, None
                    raw = await step
                else:
                    raw = await anext(pieces)
            except StopAsyncIteration:
                return
            piece = convert(raw)
            if len(piece) >= limit:
                yield piece
                continue
            batch = [piece]
            size = len(piece)
            failure: Exception | None = None
            ended = False
            while size < limit:
                outcome = _ask_now(pieces)
                if isinstance(outcome, _Started):
                    pending = outcome
                    break
                if outcome is _END:
                    ended = True
                    break
                if isinstance(outcome, Exception):
                    failure = outcome
                    break
                try:
                    more = convert(outcome)
                except Exception as exc:
                    failure = exc
                    break
                batch.append(more)
                size += len(more)
            yield batch[0] if len(batch) == 1 else b"".join(batch)
            if failure is not None:
                raise failure
            if ended:
                return
    finally:
        if pending is not None:
            await pending.abandon()
