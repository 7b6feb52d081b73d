"""The rate limiter core: FIFO admission under rate, token budget and concurrency, exactly."""

from __future__ import annotations

import ast
import heapq
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from holysheep._exceptions import ConfigurationError, LocalProtocolError
from holysheep._limiter import Admit, RateLimiter, Ticket, TicketState, Wait


def delay(decision: Admit | Wait) -> float | None:
    assert isinstance(decision, Wait), decision
    return decision.delay


def admit(limiter: RateLimiter, cost: int = 0, now: float = 0.0) -> Ticket:
    ticket = limiter.enqueue(cost, now)
    assert Admit() == limiter.poll(ticket, now)
    return ticket


# -- configuration ------------------------------------------------------------------------------


def test_burst_defaults_to_one_second_of_the_rate() -> None:
    """600 requests per minute start 10 at a time; a slow rate still allows one."""
    assert (10, 1, None) == (
        RateLimiter(requests_per_minute=600).burst,
        RateLimiter(requests_per_minute=30).burst,
        RateLimiter().burst,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requests_per_minute": 0},
        {"requests_per_minute": -60},
        {"requests_per_minute": math.inf},
        {"requests_per_minute": "60"},
        {"requests_per_minute": 60, "burst": 0},
        {"requests_per_minute": 60, "burst": 1.5},
        {"tokens_per_minute": math.nan},
        {"max_concurrent": 0},
        {"max_concurrent": True},
    ],
)
def test_invalid_limits_are_rejected(kwargs: dict[str, Any]) -> None:
    """Nonsense limits fail at construction with a `ConfigurationError` naming the field."""
    with pytest.raises(ConfigurationError, match=list(kwargs)[-1]):
        RateLimiter(**kwargs)


def test_burst_without_a_rate_is_rejected() -> None:
    """A bucket needs a refill rate."""
    with pytest.raises(ConfigurationError, match="burst=5 needs requests_per_minute"):
        RateLimiter(burst=5)


def test_limits_are_read_only() -> None:
    """A shared limiter's limits cannot change under its waiting callers."""
    limiter = RateLimiter(requests_per_minute=60)
    with pytest.raises(AttributeError):
        limiter.requests_per_minute = 120


@pytest.mark.parametrize("cost", [-1, 1.5, True])
def test_cost_must_be_a_token_count(cost: Any) -> None:
    """Costs are whole, non-negative token counts."""
    with pytest.raises(ValueError, match="cost must be an integer >= 0"):
        RateLimiter().enqueue(cost, 0.0)


# -- admission ----------------------------------------------------------------------------------


def test_without_limits_every_ticket_is_admitted_at_once() -> None:
    """No limit, no wait."""
    limiter = RateLimiter()
    tickets = [admit(limiter) for _ in range(100)]
    assert (0, 100, TicketState.ADMITTED) == (
        limiter.waiting,
        limiter.in_flight,
        tickets[-1].state,
    )


def test_burst_then_the_exact_wait_for_the_next_request() -> None:
    """At 60 per minute with burst 3, three go at once and the fourth waits one second."""
    limiter = RateLimiter(requests_per_minute=60, burst=3)
    for _ in range(3):
        admit(limiter)
    fourth = limiter.enqueue(0, 0.25)
    assert Wait(0.75) == limiter.poll(fourth, 0.25)
    assert Admit() == limiter.poll(fourth, 1.0)


def test_later_tickets_wait_behind_the_head_even_if_they_would_fit() -> None:
    """First in, first out: a small request does not overtake a large one."""
    limiter = RateLimiter(tokens_per_minute=1000)
    admit(limiter, cost=900)
    big = limiter.enqueue(600, 0.0)
    small = limiter.enqueue(10, 0.0)
    # 100 tokens are left: enough for the small one, but the big one needs 500 more first,
    # 30 s at 1000 per minute; then the small one waits for its own 10 tokens, 0.6 s.
    assert (Wait(30.0), Wait(None)) == (limiter.poll(big, 0.0), limiter.poll(small, 0.0))
    assert Admit() == limiter.poll(big, 30.0)
    assert pytest.approx(0.6) == delay(limiter.poll(small, 30.0))


def test_concurrency_waits_for_a_release() -> None:
    """With every slot taken the head waits for a notification, not a time."""
    limiter = RateLimiter(max_concurrent=2)
    first, _ = admit(limiter), admit(limiter)
    third = limiter.enqueue(0, 1.0)
    assert Wait(None) == limiter.poll(third, 1.0)
    limiter.release(first, 2.0)
    assert (Admit(), 2) == (limiter.poll(third, 2.0), limiter.in_flight)


def test_cancelling_the_head_lets_the_next_ticket_go() -> None:
    """A caller that stops waiting leaves the queue; the one behind it moves up."""
    limiter = RateLimiter()
    head, second = limiter.enqueue(0, 0.0), limiter.enqueue(0, 0.0)
    limiter.cancel(head)
    assert (Admit(), TicketState.CANCELLED, 0) == (
        limiter.poll(second, 0.0),
        head.state,
        limiter.waiting,
    )


def test_cancelling_from_the_middle_keeps_the_order() -> None:
    """Removing a ticket from the middle of the queue keeps the others in order."""
    limiter = RateLimiter(max_concurrent=1)
    running = admit(limiter)
    a, b, c = (limiter.enqueue(0, 0.0) for _ in range(3))
    limiter.cancel(b)
    limiter.release(running, 1.0)
    assert (Admit(), Wait(None), 1) == (limiter.poll(a, 1.0), limiter.poll(c, 1.0), limiter.waiting)


def test_ticket_records_its_times() -> None:
    """The queueing time is readable from the ticket."""
    limiter = RateLimiter(requests_per_minute=60, burst=1)
    admit(limiter)
    ticket = limiter.enqueue(0, 0.5)
    limiter.poll(ticket, 1.0)
    limiter.release(ticket, 4.0)
    assert (0.5, 1.0, 4.0) == (ticket.enqueued_at, ticket.admitted_at, ticket.released_at)


# -- the token budget ---------------------------------------------------------------------------


def test_token_cost_is_reserved_and_refilled_per_minute() -> None:
    """600 of 1000 tokens spent: the next 600 need 200 more, 12 s at 1000 per minute."""
    limiter = RateLimiter(tokens_per_minute=1000)
    admit(limiter, cost=600)
    ticket = limiter.enqueue(600, 0.0)
    assert Wait(12.0) == limiter.poll(ticket, 0.0)


def test_a_cost_above_the_whole_budget_waits_for_a_full_bucket_and_leaves_debt() -> None:
    """A huge request is not blocked forever; it delays those behind it instead."""
    limiter = RateLimiter(tokens_per_minute=1000)
    admit(limiter, cost=100)
    huge = limiter.enqueue(3000, 0.0)
    assert Wait(6.0) == limiter.poll(huge, 0.0)
    assert Admit() == limiter.poll(huge, 6.0)
    after = limiter.enqueue(1, 6.0)
    # 2000 tokens of debt plus 1 token: 120.06 s at 1000 per minute.
    assert pytest.approx(120.06) == delay(limiter.poll(after, 6.0))


def test_reconcile_refunds_unused_tokens() -> None:
    """A stream that used less than its estimate gives the rest back at once."""
    limiter = RateLimiter(tokens_per_minute=1000)
    first = admit(limiter, cost=1000)
    waiting = limiter.enqueue(500, 0.0)
    assert Wait(30.0) == limiter.poll(waiting, 0.0)
    assert -800 == limiter.reconcile(first, 200, 1.0)
    assert Admit() == limiter.poll(waiting, 1.0)


def test_reconcile_charges_extra_tokens() -> None:
    """A stream that used more than its estimate delays the next ones."""
    limiter = RateLimiter(tokens_per_minute=1000)
    first = admit(limiter, cost=100)
    assert 400 == limiter.reconcile(first, 500, 0.0)
    ticket = limiter.enqueue(600, 0.0)
    assert Wait(6.0) == limiter.poll(ticket, 0.0)


def test_reconcile_settles_against_the_last_report_after_release_too() -> None:
    """Reporting usage twice charges only the change, and works once released."""
    limiter = RateLimiter(tokens_per_minute=1000)
    ticket = admit(limiter, cost=100)
    limiter.release(ticket, 1.0)
    assert (50, 0, -150) == (
        limiter.reconcile(ticket, 150, 1.0),
        limiter.reconcile(ticket, 150, 1.0),
        limiter.reconcile(ticket, 0, 1.0),
    )


def test_a_refund_never_overfills_the_bucket() -> None:
    """Refunds top up to the budget and no further."""
    limiter = RateLimiter(tokens_per_minute=1000)
    ticket = admit(limiter, cost=100)
    limiter.reconcile(ticket, 0, 120.0)
    admit(limiter, cost=1000, now=120.0)
    last = limiter.enqueue(1, 120.0)
    assert pytest.approx(0.06) == delay(limiter.poll(last, 120.0))


def test_reconcile_without_a_token_budget_just_reports() -> None:
    """The difference is returned even when no budget is enforced."""
    limiter = RateLimiter()
    assert 7 == limiter.reconcile(admit(limiter, cost=3), 10, 0.0)


# -- pausing ------------------------------------------------------------------------------------


def test_pause_holds_every_admission_until_its_end() -> None:
    """After a 429 with Retry-After, nobody goes before the pause ends."""
    limiter = RateLimiter()
    limiter.pause_until(10.0)
    ticket = limiter.enqueue(0, 4.0)
    assert (Wait(6.0), Admit(), 10.0) == (
        limiter.poll(ticket, 4.0),
        limiter.poll(ticket, 10.0),
        limiter.paused_until,
    )


def test_a_pause_never_shortens_an_earlier_one() -> None:
    """Two throttled callers report different ends: the later one holds."""
    limiter = RateLimiter()
    limiter.pause_until(10.0)
    limiter.pause_until(5.0)
    assert 10.0 == limiter.paused_until


def test_the_longest_constraint_decides_the_wait() -> None:
    """Pause, request bucket and token bucket together: the latest wins."""
    limiter = RateLimiter(requests_per_minute=60, burst=1, tokens_per_minute=600)
    admit(limiter, cost=590)
    limiter.pause_until(0.5)
    ticket = limiter.enqueue(100, 0.0)
    # Request bucket: 1 s; pause: 0.5 s; tokens: 90 more at 10 per second, 9 s.
    assert Wait(9.0) == limiter.poll(ticket, 0.0)


# -- misuse -------------------------------------------------------------------------------------


def test_misuse_fails_fast_naming_ticket_and_state() -> None:
    """Every move a ticket's state does not allow raises `LocalProtocolError`."""
    limiter = RateLimiter()
    admitted = admit(limiter)
    waiting = limiter.enqueue(0, 0.0)
    with pytest.raises(LocalProtocolError, match="cannot release ticket #2: it is waiting"):
        limiter.release(waiting, 0.0)
    with pytest.raises(LocalProtocolError, match="cannot reconcile ticket #2: it is waiting"):
        limiter.reconcile(waiting, 1, 0.0)
    with pytest.raises(LocalProtocolError, match="cannot poll ticket #1: it is admitted"):
        limiter.poll(admitted, 0.0)
    with pytest.raises(LocalProtocolError, match="cannot cancel ticket #1: it is admitted"):
        limiter.cancel(admitted)
    limiter.release(admitted, 0.0)
    with pytest.raises(LocalProtocolError, match="cannot release ticket #1: it is released"):
        limiter.release(admitted, 0.0)
    limiter.cancel(waiting)
    with pytest.raises(LocalProtocolError, match="cannot cancel ticket #2: it is cancelled"):
        limiter.cancel(waiting)
    assert (0, 0) == (limiter.waiting, limiter.in_flight)


def test_nan_times_are_rejected() -> None:
    """A NaN would make every comparison false and the limiter admit nothing, silently."""
    with pytest.raises(ValueError, match="until must be a time"):
        RateLimiter().pause_until(math.nan)


# -- long horizons ------------------------------------------------------------------------------


def test_an_hour_at_600_per_minute_admits_exactly_the_envelope() -> None:
    """Continuous demand for an hour gets the burst plus exactly 600 a minute, no drift."""
    limiter = RateLimiter(requests_per_minute=600, burst=10)
    now, admitted, ticket = 0.0, 0, limiter.enqueue(0, 0.0)
    while now <= 3600.0:
        decision = limiter.poll(ticket, now)
        if isinstance(decision, Wait):
            assert decision.delay is not None
            assert decision.delay > 0
            now += decision.delay
            continue
        admitted += 1
        limiter.release(ticket, now)
        ticket = limiter.enqueue(0, now)
    assert abs(10 + 600 * 60 - admitted) <= 1


def test_concurrency_is_never_exceeded_under_load() -> None:
    """Streams of varying length at a high rate never put more than 5 in flight."""
    limiter = RateLimiter(requests_per_minute=6000, max_concurrent=5)
    now, peak, admitted = 0.0, 0, 0
    ends: list[tuple[float, int, Ticket]] = []  # (end time, tiebreak, ticket)
    ticket = limiter.enqueue(0, now)
    while now < 600.0:
        decision = limiter.poll(ticket, now)
        if isinstance(decision, Admit):
            admitted += 1
            peak = max(peak, limiter.in_flight)
            heapq.heappush(ends, (now + 0.5 + (admitted * 7919 % 13) / 4, admitted, ticket))
            ticket = limiter.enqueue(0, now)
            continue
        next_end = ends[0][0]
        if decision.delay is None or now + decision.delay >= next_end:
            now = next_end
            limiter.release(heapq.heappop(ends)[2], now)
        else:
            now += decision.delay
    assert (5, True) == (peak, admitted > 1000)


# -- properties ---------------------------------------------------------------------------------


class LimiterMachine(RuleBasedStateMachine):
    """Random callers enqueue, poll, release, cancel and wait; the limits always hold."""

    @initialize(
        rpm=st.none() | st.sampled_from([30.0, 60.0, 600.0, 1000.0]),
        burst=st.none() | st.integers(1, 5),
        tpm=st.none() | st.sampled_from([500.0, 10_000.0]),
        max_concurrent=st.none() | st.integers(1, 4),
    )
    def setup(
        self, rpm: float | None, burst: int | None, tpm: float | None, max_concurrent: int | None
    ) -> None:
        self.limiter = RateLimiter(
            requests_per_minute=rpm,
            burst=burst if rpm is not None else None,
            tokens_per_minute=tpm,
            max_concurrent=max_concurrent,
        )
        self.now = 0.0
        self.queue: list[Ticket] = []
        self.running: list[Ticket] = []
        self.admissions: list[tuple[float, Ticket]] = []

    @rule(costs=st.lists(st.integers(0, 1200), min_size=1, max_size=4))
    def enqueue(self, costs: list[int]) -> None:
        self.queue.extend(self.limiter.enqueue(cost, self.now) for cost in costs)

    @precondition(lambda self: self.queue)
    @rule(rounds=st.integers(1, 8))
    def serve(self, rounds: int) -> None:
        """The heads' drivers in turn: poll, sleep exactly the wait, poll again."""
        for _ in range(rounds):
            if not self.queue:
                return
            ticket = self.queue[0]
            decision = self.limiter.poll(ticket, self.now)
            if isinstance(decision, Wait):
                if decision.delay is None:
                    return  # waits for a release
                # The wait is exact: after it, with nothing else changed, the head goes.
                assert 0 < decision.delay < math.inf
                self.now += decision.delay
                assert Admit() == self.limiter.poll(ticket, self.now)
            self._admitted(ticket)

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def poll_any(self, data: st.DataObject) -> None:
        """Any other waiter polled is told to wait for its turn."""
        ticket = data.draw(st.sampled_from(self.queue))
        decision = self.limiter.poll(ticket, self.now)
        if ticket is not self.queue[0]:
            assert Wait(None) == decision
        elif isinstance(decision, Admit):
            self._admitted(ticket)

    def _admitted(self, ticket: Ticket) -> None:
        assert ticket is self.queue.pop(0)
        self.running.append(ticket)
        self.admissions.append((self.now, ticket))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.running))
        self.running.remove(ticket)
        self.limiter.release(ticket, self.now)

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.queue))
        self.queue.remove(ticket)
        self.limiter.cancel(ticket)

    @rule(seconds=st.floats(0, 90))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(seconds=st.floats(0, 30))
    def pause(self, seconds: float) -> None:
        self.limiter.pause_until(self.now + seconds)

    @invariant()
    def counts_match(self) -> None:
        assert (len(self.queue), len(self.running)) == (
            self.limiter.waiting,
            self.limiter.in_flight,
        )

    @invariant()
    def concurrency_is_capped(self) -> None:
        cap = self.limiter.max_concurrent
        assert cap is None or self.limiter.in_flight <= cap

    @invariant()
    def admissions_are_first_in_first_out(self) -> None:
        numbers = [ticket.number for _, ticket in self.admissions]
        assert sorted(numbers) == numbers

    @invariant()
    def admissions_stay_within_the_rate_envelope(self) -> None:
        """In any window of W seconds: at most burst + rate * W requests, and tokens likewise.

        For tokens the last admission in the window counts only up to the whole budget: a
        cost above it is admitted from a full bucket and paid back later as debt.
        """
        rpm, burst, tpm = (
            self.limiter.requests_per_minute,
            self.limiter.burst,
            self.limiter.tokens_per_minute,
        )
        times = [at for at, _ in self.admissions]
        costs = [ticket.cost for _, ticket in self.admissions]
        for i in range(len(times)):
            spent = 0
            for j in range(i, len(times)):
                window = times[j] - times[i]
                if rpm is not None and burst is not None:
                    assert j - i + 1 <= burst + rpm / 60 * window + 1e-6
                if tpm is not None:
                    assert spent + min(costs[j], tpm) <= tpm + tpm / 60 * window + 1e-6
                spent += costs[j]


TestLimiterMachine = LimiterMachine.TestCase
TestLimiterMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)


def test_limiter_reads_no_clock() -> None:
    """The core is pure: every method is given the time."""
    tree = ast.parse((Path(__file__).parent.parent / "holysheep" / "_limiter.py").read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert set() == imported & {"time", "random", "anyio", "asyncio", "socket", "threading"}


def test_ticket_states_are_public() -> None:
    """`ticket.state` can be compared without a private import: `holysheep.TicketState`."""
    import holysheep

    limiter = holysheep.RateLimiter(max_concurrent=1)
    first, second = limiter.enqueue(1, 0.0), limiter.enqueue(1, 0.0)
    decisions: list[holysheep.Admission] = [limiter.poll(first, 0.0), limiter.poll(second, 0.0)]
    assert isinstance(decisions[0], holysheep.Admit)
    assert (holysheep.TicketState.ADMITTED, holysheep.TicketState.WAITING) == (
        first.state,
        second.state,
    )


class _CountingPolls:
    """A limiter seen through a counter of `poll` calls: how often its waiters looked."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.polls = 0

    def poll(self, ticket: Ticket, now: float) -> Admit | Wait:
        self.polls += 1
        return self.limiter.poll(ticket, now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.limiter, name)


@pytest.mark.anyio
async def test_async_waiters_sleep_until_they_are_the_head() -> None:
    """Queued async waiters looked every 5 ms each: 200 of them cost 0.6 s of CPU a second on
    asyncio and 1.3 s on trio. Only the head can be admitted next, so only it is woken, by the
    release; the others wake as they become the head, and all are admitted, in order."""
    import anyio

    from holysheep._gate import Gate

    counting = _CountingPolls(RateLimiter(max_concurrent=1))
    gate = Gate(counting)  # type: ignore[arg-type]
    holder = await gate.aacquire(0)
    assert holder is not None
    admitted: list[int] = []

    async def wait() -> None:
        ticket = await gate.aacquire(0)
        assert ticket is not None
        admitted.append(ticket.number)
        gate.release(ticket, None)

    async with anyio.create_task_group() as group:
        for _ in range(50):
            group.start_soon(wait)
        await anyio.sleep(0.5)
        polls = counting.polls
        started = anyio.current_time()
        gate.release(holder, None)
    assert sorted(admitted) == admitted
    assert 50 == len(admitted)
    assert anyio.current_time() - started < 1.0  # each admission wakes the next head
    assert polls < 150  # about one look each, and the head's few (the polling made 5,000)
