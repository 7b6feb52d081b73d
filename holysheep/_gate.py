"""The I/O front ends of `RateLimiter`: waiting for admission with threads or with anyio.

The limiter core holds no lock and never waits; this module does both. One gate per limiter
object (kept in a weak map), so a limiter shared by many clients, sync and async, serialises
through one `threading.Condition`. Sync callers wait on the condition; async callers never
block the event loop on it: they take the lock only for the short core calls and wait on an
event of their own loop, which whoever changes the limiter's state sets from any thread
(`_wake_head`), so asyncio and trio both work and a cancelled wait cancels its ticket.

Only the head of the queue can be admitted next, so only the head's waiter is woken: the others
sleep until they are the head. (Polling every few milliseconds instead cost 200 queued tasks
0.6 s of CPU a second on asyncio, 1.3 s on trio.)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import weakref
from collections.abc import Callable

import anyio

from ._limiter import RateLimiter, Ticket, Wait

__all__ = ["Gate", "gate_for"]

_clock = time.monotonic
# The head of the queue knows its delay, but a release or a settled reservation (a stream that
# used fewer tokens than it reserved) can shorten it: it looks again at least this often, as a
# sync waiter does. One waiter, so the cost is nil.
_ASYNC_HEAD_POLL = 0.1
# The others are woken when they become the head; they look again this often anyway, in case
# a wake-up was lost (a loop that could not take it): a safety net, cheap at any count.
_ASYNC_SAFETY_POLL = 1.0

_gates: weakref.WeakKeyDictionary[RateLimiter, Gate] = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def gate_for(limiter: RateLimiter) -> Gate:
    with _gates_lock:
        gate = _gates.get(limiter)
        if gate is None:
            gate = _gates[limiter] = Gate(limiter)
        return gate


def _waker(event: anyio.Event) -> Callable[[], None]:
    """A function that sets `event` from any thread, on the event loop it belongs to."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio (anyio's other backend)
        import trio

        token = trio.lowlevel.current_trio_token()

        def wake_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(event.set)

        return wake_trio

    def wake_asyncio() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(event.set)

    return wake_asyncio


class Gate:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._cond = threading.Condition()
        # The async waiters' wake-up functions, by ticket number (see `_wake_head`).
        self._wakers: dict[int, Callable[[], None]] = {}

    def _changed(self) -> None:
        """The limiter's state changed (under the lock): whoever may be admitted now looks."""
        self._cond.notify_all()
        self._wake_head()

    def _wake_head(self) -> None:
        head = self.limiter.head
        if head is not None:
            wake = self._wakers.pop(head.number, None)
            if wake is not None:
                wake()

    def acquire(
        self, cost: int, stop: Callable[[], bool], within: float | None = None
    ) -> Ticket | None:
        """Wait for admission; None if `stop()` turned true while waiting (the stream closed)
        or `within` seconds passed first (what the call's `total` timeout leaves)."""
        limiter, cond = self.limiter, self._cond
        until = None if within is None else _clock() + within
        with cond:
            ticket = limiter.enqueue(cost, _clock())
            try:
                while isinstance(decision := limiter.poll(ticket, _clock()), Wait):
                    left = math.inf if until is None else until - _clock()
                    if stop() or left <= 0:
                        limiter.cancel(ticket)
                        self._changed()
                        return None
                    # Bounded so a close() from another thread is noticed promptly.
                    wait = 0.1 if decision.delay is None else min(decision.delay, 0.1)
                    cond.wait(min(wait, left))
            except BaseException:
                limiter.cancel(ticket)
                self._changed()
                raise
            self._changed()
            return ticket

    async def aacquire(self, cost: int, within: float | None = None) -> Ticket | None:
        """Wait for admission without blocking the event loop; cancellation cancels the ticket.
        None if `within` seconds passed first (what the call's `total` timeout leaves).

        Seconds, not a deadline: the caller's clock may be trio's, which is not this one.
        """
        limiter, cond = self.limiter, self._cond
        until = None if within is None else _clock() + within
        with cond:
            ticket = limiter.enqueue(cost, _clock())
        try:
            while True:
                with cond:
                    decision = limiter.poll(ticket, _clock())
                    if not isinstance(decision, Wait):
                        self._wakers.pop(ticket.number, None)
                        self._changed()
                        return ticket
                    left = math.inf if until is None else until - _clock()
                    if left <= 0:
                        self._wakers.pop(ticket.number, None)
                        limiter.cancel(ticket)
                        self._changed()
                        return None
                    event = anyio.Event()
                    self._wakers[ticket.number] = _waker(event)
                delay = decision.delay
                if delay is not None:  # the head, waiting for a rate: it knows when to look
                    wait = min(delay, _ASYNC_HEAD_POLL)
                elif limiter.head is ticket:  # the head, waiting for a slot: a release wakes it
                    wait = _ASYNC_HEAD_POLL
                else:
                    wait = _ASYNC_SAFETY_POLL
                with anyio.move_on_after(min(wait, left)):
                    await event.wait()
        except BaseException:
            with cond:
                self._wakers.pop(ticket.number, None)
                limiter.cancel(ticket)
                self._changed()
            raise

    def wake(self) -> None:
        """A sync waiter's stop condition may have turned true (its stream closed): look now."""
        with self._cond:
            self._cond.notify_all()

    def release(self, ticket: Ticket, tokens: int | None) -> None:
        with self._cond:
            now = _clock()
            if tokens is not None:
                self.limiter.reconcile(ticket, tokens, now)
            self.limiter.release(ticket, now)
            self._changed()

    def pause(self, seconds: float) -> None:
        """A 429 with Retry-After: nobody sharing this limiter sends before it passes."""
        with self._cond:
            self.limiter.pause_until(_clock() + seconds)
            self._changed()
