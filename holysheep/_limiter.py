"""Client-side admission control shared by many clients: request rate, token budget, concurrency.

Theory of operation
-------------------
A caller takes a `Ticket` with `enqueue(cost, now)` and asks `poll(ticket, now)` until the
answer is `Admit()`; then it sends its request, and when the stream ends it calls
`reconcile(ticket, actual_tokens, now)` (if it learned the real usage) and `release(ticket,
now)`. A caller that stops waiting calls `cancel(ticket)`. Every method is given the time; the
limiter never reads a clock, never sleeps and never blocks, so every rule is tested exactly.

Tickets are served strictly first in, first out: only the ticket at the head of the queue can
be admitted, and it is admitted once every limit allows it:

- requests per minute: a token bucket of `burst` requests refilled at `requests_per_minute / 60`
  per second. It is kept as a GCRA "theoretical arrival time" (one float): the bucket is full
  when that time is in the past, and each admission pushes it one interval further, so the
  count over any window of W seconds never exceeds `burst + rate * W`, however long it runs.
- tokens per minute: the same bucket in tokens, holding one minute's budget. Admission reserves
  the ticket's `cost` (the caller's estimate: prompt plus `max_tokens`); `reconcile` charges or
  refunds the difference once the real usage is known. A cost larger than the whole budget is
  admitted when the bucket is full and leaves it in debt, so it delays later requests instead
  of blocking forever.
- `max_concurrent`: requests admitted and not yet released.
- `pause_until(until)`: nothing is admitted before `until`; a driver calls it when a 429's
  `Retry-After` says the whole account is throttled (`Retry.pause_all`).

`poll` answers `Wait(delay)` with the exact time until the head could be admitted if nothing
else happens, or `Wait(None)` when that depends on another caller: this ticket is not the head
yet, or every concurrency slot is taken. Those callers wait to be notified.

Writing a driver
----------------
The limiter holds no lock: a driver serialises every call under its own, and wakes all
waiters whenever a call may have changed who goes next, that is after a `poll` that admitted,
and after `release`, `cancel` and `reconcile`. With threads (`cond = threading.Condition()`
shared with the limiter)::

    with cond:
        ticket = limiter.enqueue(cost, time.monotonic())
        try:
            while isinstance(decision := limiter.poll(ticket, time.monotonic()), Wait):
                cond.wait(decision.delay)          # None: until notified
        except BaseException:
            limiter.cancel(ticket)
            cond.notify_all()
            raise
        cond.notify_all()                          # the next ticket is now the head
    try:
        ...                                        # send the request, read the stream
    finally:
        with cond:
            if usage is not None:
                limiter.reconcile(ticket, usage.total_tokens, time.monotonic())
            limiter.release(ticket, time.monotonic())
            cond.notify_all()

With anyio the same lines use `async with cond`, and the wait becomes
`with anyio.move_on_after(decision.delay): await cond.wait()` (`move_on_after(None)` waits
until notified). A cancelled wait lands in the `except` branch, which cancels the ticket before
re-raising. An `anyio.Condition` serves the tasks of one event loop; a limiter shared by threads
and event loops needs a threading lock around its calls (they are short and never block) and a
cross-thread wake-up, for example waiting at most a short interval before polling again.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import TypeAlias, final

import attrs

from ._exceptions import ConfigurationError, LocalProtocolError
from ._validate import positive_or_none

__all__ = ["Admission", "Admit", "RateLimiter", "Ticket", "TicketState", "Wait"]

# Admit a ticket this close to its exact time: clocks and floats are coarser than a nanosecond,
# and without it a driver could wake up a hair early and wait again for 1e-17 s. Admitting 1 ns
# early lets at most rate * 1 ns extra requests through, so the envelope holds to ~1e-9.
_EPSILON = 1e-9


class TicketState(enum.Enum):
    """Where a ticket is in its life; the limiter moves it, callers only read it."""

    WAITING = "waiting"
    ADMITTED = "admitted"
    RELEASED = "released"
    CANCELLED = "cancelled"


# Every legal move; any other (state, action) pair is a caller's bug and fails fast.
_TRANSITIONS: dict[tuple[TicketState, str], TicketState] = {
    (TicketState.WAITING, "admit"): TicketState.ADMITTED,
    (TicketState.WAITING, "cancel"): TicketState.CANCELLED,
    (TicketState.ADMITTED, "release"): TicketState.RELEASED,
}


@final
@attrs.define(eq=False)
class Ticket:
    """One caller's place in the queue, and after admission its reservation.

    `cost` is the token estimate reserved at admission; `charged` is what the token budget has
    been charged so far (`cost`, then whatever `reconcile` last reported). `enqueued_at` and
    `admitted_at` are on the driver's clock, so `admitted_at - enqueued_at` is the time spent
    queueing.
    """

    number: int
    cost: int
    enqueued_at: float
    state: TicketState = TicketState.WAITING
    charged: int = 0
    admitted_at: float | None = None
    released_at: float | None = None

    def _move(self, action: str) -> None:
        try:
            self.state = _TRANSITIONS[self.state, action]
        except KeyError:
            raise LocalProtocolError(
                f"cannot {action} ticket #{self.number}: it is {self.state.value}"
            ) from None


@final
@attrs.frozen
class Admit:
    """The head ticket may go: send the request now, and release the ticket when it ends."""


@final
@attrs.frozen
class Wait:
    """Not yet: poll again after `delay` seconds, or when notified if `delay` is None."""

    delay: float | None


Admission: TypeAlias = Admit | Wait


_optional_positive = positive_or_none("RateLimiter")


def _optional_count(
    _instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"RateLimiter: {attribute.name} must be an integer >= 1, got {value!r}"
        )


def _check_amount(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an integer >= 0 tokens, got {value!r}")


def _check_time(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigurationError(f"{name} must be a time in seconds, got {value!r}")


_CONFIG = attrs.setters.frozen  # limits are fixed at construction; the state is private


@final
@attrs.define(eq=False)
class RateLimiter:
    """FIFO admission under a request rate, a token budget and a concurrency cap.

    Every limit is optional; a limiter without any admits every ticket at once, in order.
    `burst` is how many requests may start back to back; it defaults to one second's worth of
    `requests_per_minute` (at least 1), so a fresh limiter does not release a minute's quota
    in one instant, which is exactly what per-second enforcement at gateways punishes.
    """

    requests_per_minute: float | None = attrs.field(
        default=None, validator=_optional_positive, on_setattr=_CONFIG
    )
    burst: int | None = attrs.field(default=None, validator=_optional_count, on_setattr=_CONFIG)
    tokens_per_minute: float | None = attrs.field(
        default=None, validator=_optional_positive, on_setattr=_CONFIG
    )
    max_concurrent: int | None = attrs.field(
        default=None, validator=_optional_count, on_setattr=_CONFIG
    )

    _queue: deque[Ticket] = attrs.field(init=False, factory=deque, repr=False)
    _in_flight: int = attrs.field(init=False, default=0, repr=False)
    _numbers: int = attrs.field(init=False, default=0, repr=False)
    # The buckets as GCRA theoretical arrival times; -inf is a full bucket.
    _request_tat: float = attrs.field(init=False, default=-math.inf, repr=False)
    _token_tat: float = attrs.field(init=False, default=-math.inf, repr=False)
    _paused_until: float = attrs.field(init=False, default=-math.inf, repr=False)

    def __attrs_post_init__(self) -> None:
        rpm = self.requests_per_minute
        if rpm is None:
            if self.burst is not None:
                raise ConfigurationError(
                    f"RateLimiter: burst={self.burst} needs requests_per_minute to refill it"
                )
        elif self.burst is None:
            # Past the frozen setter on purpose: resolving a default is part of construction.
            object.__setattr__(self, "burst", max(1, int(rpm // 60)))

    # -- what drivers and dashboards read --------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Tickets queued and not yet admitted or cancelled."""
        return len(self._queue)

    @property
    def head(self) -> Ticket | None:
        """The ticket admitted next, when the limits allow: the first waiting one, if any."""
        return self._queue[0] if self._queue else None

    @property
    def in_flight(self) -> int:
        """Tickets admitted and not yet released."""
        return self._in_flight

    @property
    def paused_until(self) -> float | None:
        """The time before which nothing is admitted, if `pause_until` was ever called."""
        return None if self._paused_until == -math.inf else self._paused_until

    # -- the protocol ----------------------------------------------------------------------------

    def enqueue(self, cost: int, now: float) -> Ticket:
        """Join the queue, asking for `cost` tokens of the per-minute budget (0 if unknown)."""
        _check_amount("cost", cost)
        _check_time("now", now)
        self._numbers += 1
        ticket = Ticket(self._numbers, cost, now)
        self._queue.append(ticket)
        return ticket

    def poll(self, ticket: Ticket, now: float) -> Admit | Wait:
        """Admit `ticket` if it is the head of the queue and every limit allows it, else wait."""
        _check_time("now", now)
        if ticket.state is not TicketState.WAITING:
            raise LocalProtocolError(
                f"cannot poll ticket #{ticket.number}: it is {ticket.state.value}, not waiting"
            )
        if self._queue[0] is not ticket:
            return Wait(None)  # first in, first out: its turn comes when those ahead are gone
        ready = self._ready_at(ticket.cost)
        if ready is None:
            return Wait(None)
        if ready - now > _EPSILON:
            return Wait(ready - now)
        self._admit(ticket, now)
        return Admit()

    def release(self, ticket: Ticket, now: float) -> None:
        """The admitted request ended (finished, failed or abandoned): free its slot."""
        _check_time("now", now)
        ticket._move("release")
        ticket.released_at = now
        self._in_flight -= 1

    def cancel(self, ticket: Ticket) -> None:
        """A waiting caller gave up: leave the queue; the next ticket may become the head."""
        ticket._move("cancel")
        self._queue.remove(ticket)

    def reconcile(self, ticket: Ticket, actual_tokens: int, now: float) -> int:
        """Correct an admitted ticket's reservation to the tokens it really used.

        Returns the difference charged (positive) or refunded (negative). It may be called
        more than once, before or after `release`: each call settles against the last.
        """
        _check_amount("actual_tokens", actual_tokens)
        _check_time("now", now)
        if ticket.state not in (TicketState.ADMITTED, TicketState.RELEASED):
            raise LocalProtocolError(
                f"cannot reconcile ticket #{ticket.number}: it is {ticket.state.value}, "
                "and only an admitted ticket has a reservation"
            )
        difference = actual_tokens - ticket.charged
        ticket.charged = actual_tokens
        if self.tokens_per_minute is not None:
            # From a full bucket (`tat` in the past) the change starts at `now`; a refund that
            # lands before `now` just means a full bucket, since admission clamps at `now`.
            self._token_tat = max(self._token_tat, now) + difference * 60 / self.tokens_per_minute
        return difference

    def pause_until(self, until: float) -> None:
        """Admit nothing before `until` (driver's clock). A pause never shortens an earlier one."""
        _check_time("until", until)
        self._paused_until = max(self._paused_until, until)

    # -- the arithmetic --------------------------------------------------------------------------

    def _ready_at(self, cost: int) -> float | None:
        """The earliest time a head asking for `cost` tokens is admitted; None if no slot."""
        if self.max_concurrent is not None and self._in_flight >= self.max_concurrent:
            return None
        ready = self._paused_until
        rpm, burst = self.requests_per_minute, self.burst
        if rpm is not None and burst is not None:
            # Room for one request once the bucket has refilled to 1 of `burst`.
            ready = max(ready, self._request_tat - (burst - 1) * 60 / rpm)
        tpm = self.tokens_per_minute
        if tpm is not None:
            # Room once the bucket holds `cost` tokens, or is full for a cost above the budget.
            ready = max(ready, self._token_tat - (tpm - min(cost, tpm)) * 60 / tpm)
        return ready

    def _admit(self, ticket: Ticket, now: float) -> None:
        ticket._move("admit")
        self._queue.popleft()
        ticket.admitted_at = now
        ticket.charged = ticket.cost
        self._in_flight += 1
        if self.requests_per_minute is not None:
            self._request_tat = max(self._request_tat, now) + 60 / self.requests_per_minute
        if self.tokens_per_minute is not None:
            self._token_tat = max(self._token_tat, now) + ticket.cost * 60 / self.tokens_per_minute
