"""The I/O front ends of `RateLimiter`: waiting for admission with threads or with anyio.

The limiter core holds no lock and never waits; this module does both. One gate per limiter
object (kept in a weak map), so a limiter shared by many clients, sync and async, serialises
through one `threading.Condition`. Sync callers wait on the condition; async callers never
block the event loop on it: they take the lock only for the short core calls and sleep with
anyio for the exact `Wait.delay` (or a short poll while another caller holds the head or the
concurrency slots), so asyncio and trio both work and a cancelled wait cancels its ticket.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable

import anyio

from ._limiter import RateLimiter, Ticket, Wait

__all__ = ["Gate", "gate_for"]

_clock = time.monotonic
# An async waiter without a known delay (not at the head, or all slots taken) looks again this
# often; short next to any stream, long enough that thousands of waiters cost little CPU.
_ASYNC_POLL = 0.005
# The head of the queue knows its delay, but a release or a settled reservation (a stream that
# used fewer tokens than it reserved) can shorten it: it looks again at least this often, as a
# sync waiter does. One waiter, so the cost is nil.
_ASYNC_HEAD_POLL = 0.1

_gates: weakref.WeakKeyDictionary[RateLimiter, Gate] = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def gate_for(limiter: RateLimiter) -> Gate:
    with _gates_lock:
        gate = _gates.get(limiter)
        if gate is None:
            gate = _gates[limiter] = Gate(limiter)
        return gate


class Gate:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._cond = threading.Condition()

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
                        cond.notify_all()
                        return None
                    # Bounded so a close() from another thread is noticed promptly.
                    wait = 0.1 if decision.delay is None else min(decision.delay, 0.1)
                    cond.wait(min(wait, left))
            except BaseException:
                limiter.cancel(ticket)
                cond.notify_all()
                raise
            cond.notify_all()
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
                        cond.notify_all()
                        return ticket
                    left = math.inf if until is None else until - _clock()
                    if left <= 0:
                        limiter.cancel(ticket)
                        cond.notify_all()
                        return None
                delay = decision.delay
                wait = _ASYNC_POLL if delay is None else min(delay, _ASYNC_HEAD_POLL)
                await anyio.sleep(min(wait, left))
        except BaseException:
            with cond:
                limiter.cancel(ticket)
                cond.notify_all()
            raise

    def release(self, ticket: Ticket, tokens: int | None) -> None:
        with self._cond:
            now = _clock()
            if tokens is not None:
                self.limiter.reconcile(ticket, tokens, now)
            self.limiter.release(ticket, now)
            self._cond.notify_all()

    def pause(self, seconds: float) -> None:
        """A 429 with Retry-After: nobody sharing this limiter sends before it passes."""
        with self._cond:
            self.limiter.pause_until(_clock() + seconds)
            self._cond.notify_all()
