"""Start a coroutine now, in the caller's turn of the event loop, and make a task of the rest.

A new asyncio task takes its first step only on the next turn of the loop. For a message
handler that usually finishes without waiting (most of the CE bus's), that turn is most of the
handler's latency: tens of microseconds on a desktop, more when the process wakes from sleep,
at every hop of a task's way (docs/architecture.md §6). Python 3.12's eager task factory does
this for a whole loop; this does it for the few places that ask, on 3.11 too.

The part that runs now runs outside any task (`asyncio.current_task()` is None there), so it is
for coroutines that do not need one (no `asyncio.timeout`, no TaskGroup).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None] | None:
    """Run `coro` until it finishes (None) or first waits (the task that finishes it).

    An exception `coro` raises before it waits propagates here; its result is dropped.
    """
    try:
        waiting_on = _taken(coro.send(None))
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_rest(coro, waiting_on))


def _taken(waiting_on: Any) -> Any:
    """What a task does with the future its coroutine yields, at once: clear the flag that says it
    is being waited on. Another coroutine awaiting the same future before that would fail ("await
    wasn't used with future")."""
    if getattr(waiting_on, "_asyncio_future_blocking", None):
        waiting_on._asyncio_future_blocking = False
    return waiting_on


async def _rest(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
    """Go on as a task would: wait for what `coro` waits on, then resume it, with the outcome."""
    while True:
        error: BaseException | None = None
        try:
            if waiting_on is None:  # a bare yield: asyncio.sleep(0)
                await asyncio.sleep(0)
            elif getattr(waiting_on, "_asyncio_future_blocking", None) is not None:
                await waiting_on  # cancelling us cancels it, as a task cancels what it waits on
            else:
                error = RuntimeError(f"a coroutine started eagerly yielded {waiting_on!r}, not a future")
        except asyncio.CancelledError:
            # Resumed below, `coro` finds the future cancelled; if it was done already, tell it.
            if waiting_on is None or not waiting_on.cancelled():
                error = asyncio.CancelledError()
        except Exception:  # the future's exception: `coro` gets it from the future when it resumes
            pass
        try:
            waiting_on = _taken(coro.send(None) if error is None else coro.throw(error))
        except StopIteration:
            return
