"""One logical chat request across all its attempts: retries, resume and restart, without I/O.

Theory of operation
-------------------
The clients drive a `Call` the same way, sync or async. For each attempt they ask
`start_attempt(now)` for a fresh `Exchange` (its request carries a stable `Idempotency-Key`,
and `Last-Event-ID` when resuming), run it, and when it fails they ask `failed(error, now,
wall_clock)` what to do. The answer is one of:

- `GiveUp`: raise `error` (possibly rewritten: a stream that broke after content reached the
  caller becomes `StreamInterruptedError`, carrying the partial completion).
- `Retry`: wait `delay`, then start the next attempt. Before any content was delivered this is
  transparent; after, it happens only as the caller chose with `on_interrupt`:
  `"resume"` reconnects with `Last-Event-ID` and continues after the last event seen (events
  seen twice are dropped by id); `"restart"` starts over, and the driver first hands the caller
  a `Reset` marker (`Retry.reset` is true) so it can clear what it printed. Left to the
  default (None), the mode is "raise", unless `completing()` says nobody sees the text before
  the end (`complete()`): then a broken connection or a stall starts over, but a body the
  server ended too early does not, since the same server would end the next one the same way.

Content "delivered" means a chunk with a delta was handed to the caller; the drivers report it
with `delivered()`. Every attempt, its reason and its wait is kept in `history`.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, final

import attrs

from ._chat import ChatAccumulator, ChatChunk, Completion, Reset, Usage
from ._exceptions import (
    APIConnectionError,
    ConfigurationError,
    HolySheepError,
    IdleTimeoutError,
    IncompleteStreamError,
    LocalProtocolError,
    RateLimitError,
    StreamError,
    StreamInterruptedError,
)
from ._exchange import _NO_IDS, Exchange, StreamStats
from ._observe import Observer, RequestInfo, notify
from ._pricing import estimate_tokens
from ._retry import GiveUp, Retry, RetryPolicy, retry_after

__all__ = ["Attempt", "Call", "OnInterrupt", "Reset"]

OnInterrupt = Literal["raise", "resume", "restart"]
_ON_INTERRUPT = ("raise", "resume", "restart")
_A_DAY_MS = 86_400_000

logger = logging.getLogger("holysheep")
# A library logs; the application decides where it goes (no "last resort" output to stderr).
logger.addHandler(logging.NullHandler())


@final
@attrs.frozen
class Attempt:
    """One failed attempt: what failed, what was decided, how long the wait."""

    attempt: int
    error: str
    decision: str
    delay: float | None
    #: The exception itself, for code that wants its type or fields (not compared).
    exception: BaseException | None = attrs.field(default=None, eq=False, repr=False)


ExchangeFactory = Callable[[Mapping[str, str], ChatAccumulator | None], Exchange]
Hook = Callable[[Attempt], None]


@final
@attrs.frozen
class Earlier:
    """What the attempts before a call's current one measured: a stream's stats cover every
    attempt, since the caller waited through all of them (`ttft` from the first send, not
    from the last)."""

    sent: float | None = None  # the first attempt's send, on the driver's clock
    first_content: float | None = None
    events: int = 0
    bytes: int = 0
    last_content: float | None = None

    def add(self, exchange: Exchange) -> Earlier:
        last = exchange.last_progress
        return Earlier(
            self.sent if self.sent is not None else exchange.started,
            self.first_content if self.first_content is not None else exchange.first_progress,
            self.events + exchange.events,
            self.bytes + exchange.bytes,
            last if last is not None else self.last_content,
        )


_NOTHING_EARLIER = Earlier()  # shared: most calls have one attempt
# `chunk.deltas`, as a C function: `delivered` looks at every chunk until one has a delta.
_DELTAS = operator.attrgetter("deltas")


class Call:
    """See the module docstring."""

    # Slots: no per-instance dict; one is open per stream, thousands at a time.
    __slots__ = (
        "_announced",
        "_broken",
        "_budget_from",
        "_charged",
        "_chosen",
        "_delivered",
        "_earlier",
        "_first_token",
        "_hooks",
        "_make_exchange",
        "_observers",
        "_pending_reset",
        "_queued_before",
        "_random",
        "_reported",
        "_restart_early_ends",
        "_resume_from",
        "_run_start",
        "_seen_ids",
        "_shown",
        "attempt",
        "cost",
        "exchange",
        "history",
        "idempotency_key",
        "info",
        "on_interrupt",
        "policy",
        "prompt_cost",
        "queued",
        "replaced",
    )

    def __init__(
        self,
        make_exchange: ExchangeFactory,
        *,
        policy: RetryPolicy,
        on_interrupt: OnInterrupt | None = None,
        random: Callable[[], float],
        hooks: tuple[Hook, ...] = (),
        observers: tuple[Observer, ...] = (),
        info: RequestInfo | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        if on_interrupt is not None:
            check_on_interrupt(on_interrupt)
        self._make_exchange = make_exchange
        self.policy = policy
        self.on_interrupt: OnInterrupt = on_interrupt or "raise"
        self._chosen = on_interrupt is not None  # else `completing()` may choose
        self._restart_early_ends = True
        self._random = random
        self._hooks = hooks
        self._observers = observers
        self.idempotency_key = idempotency_key or new_idempotency_key()
        #: What observers are told this request is.
        self.info = info
        # Lifecycle reported to observers so far: each happens at most once.
        self._announced = self._first_token = self._reported = False
        #: Tokens to reserve from a rate limiter's per-minute budget for each attempt, and how
        #: many of them are the prompt's (see `tokens_used`).
        self.cost = 0
        self.prompt_cost = 0
        # Tokens charged for the attempts whose accumulation the current one continues.
        self._charged = 0
        #: Seconds spent waiting for a rate limiter, over all attempts.
        self.queued = 0.0
        self.attempt = 0
        # A tuple, grown by copying: most calls have one attempt and never add to it, and an
        # empty tuple is shared where an empty list would be one more object per open stream.
        self.history: tuple[Attempt, ...] = ()
        self.exchange: Exchange | None = None
        # Since when the retry budget counts: the first send, and again from each
        # interruption after content came (a long healthy stream does not use it up).
        self._budget_from: float | None = None
        # `queued` when the budget started counting: the queue's time since is not the budget's.
        self._queued_before = 0.0
        # Attempts made before the current run of failures: a resumed stream that made
        # progress since its last failure starts a new run, with every attempt again.
        self._run_start = 0
        # While reconnecting after an interruption (resume or restart): the completion as it
        # stood when the stream broke, for the error if reconnecting fails for good.
        self._broken: Completion | None = None
        self._delivered = False
        self._resume_from: str | None = None
        self._seen_ids: frozenset[str] = _NO_IDS
        self._pending_reset: Reset | None = None
        #: At the last `Reset`: the completion as it stood when the stream broke, which the
        #: caller is asked to clear (`text_stream()` cannot, see `ShownText`).
        self.replaced: Completion | None = None
        #: What the failed attempts measured, for the stream's stats (see `earlier`).
        self._earlier = _NOTHING_EARLIER
        # What `text_stream()` yielded, when it matches a restart against it: its errors are
        # the ones the caller sees, so observers must be told of those (see `error_to_raise`).
        self._shown: ShownText | None = None

    def peek(self) -> Exchange:
        """The current exchange; before the first attempt, the one it will use.

        For a caller that reads the request id, `completion` or `stats` before the stream
        is sent: that must not count as an attempt (or a retry would be lost to it).
        """
        exchange = self.exchange
        if exchange is None:
            exchange = self.exchange = self._make_exchange(
                {"idempotency-key": self.idempotency_key}, None
            )
            if self.on_interrupt == "resume":
                exchange.track_event_ids(skip=self._seen_ids)
        return exchange

    def start_attempt(self, now: float) -> Exchange:
        """The exchange for the next attempt."""
        self.attempt += 1
        if self.attempt == 1 and self.exchange is not None:
            return self.exchange  # made by `peek`
        headers = {"idempotency-key": self.idempotency_key}
        accumulator = None
        previous = self.exchange
        if previous is not None:
            # Its figures join the earlier attempts' now that another attempt replaces it, not
            # when it failed: a call that gives up keeps it as its current one, and its stats
            # counted it twice (once as earlier, once as current).
            self._earlier = self._earlier.add(previous)
        expect_id = None
        if self._resume_from is not None and previous is not None:
            if previous.ids_seen:
                self._seen_ids |= previous.ids_seen
            headers["last-event-id"] = self._resume_from
            accumulator = previous.accumulator
            accumulator.restart_decoder()
            expect_id = self._broken.id if self._broken is not None else None
        else:
            # A fresh request (a retry before content): its events are all new, whatever
            # ids they carry, and its usage is its own.
            self._seen_ids = _NO_IDS
            self._charged = 0
        exchange = self._make_exchange(headers, accumulator)
        exchange.continues(self._earlier.sent)
        if self.on_interrupt == "resume":
            exchange.track_event_ids(skip=self._seen_ids, expect_id=expect_id)
        self.exchange = exchange
        return exchange

    def tokens_used(self, exchange: Exchange) -> int | None:
        """What the attempt of `exchange` used of a tokens-per-minute budget, to settle its
        reservation when it ends; None keeps the reservation (nothing better is known).

        The server's usage when it sent one; nothing for a refused request (an error status,
        or no connection made); for a stream cut short, the prompt and the text so far,
        estimated. A resumed completion's usage and text include its earlier attempts, already
        charged.
        """
        usage = exchange.accumulator.usage
        if usage is not None and usage.total_tokens is not None:
            used = usage.total_tokens
        elif exchange.never_sent:
            used = 0
        elif exchange.status_code is None:
            return None  # no answer: whether the server started on it is unknown
        elif not 200 <= exchange.status_code < 300:
            used = 0
        else:
            # Everything the model wrote is billed: every choice, reasoning, tool calls.
            text = exchange.accumulator.completion.output_text
            used = self.prompt_cost + estimate_tokens(text)
        used = max(0, used - self._charged)
        self._charged += used
        return used

    def completion(self, exchange: Exchange) -> Completion:
        """What the caller has of the answer, `exchange` being the current attempt's.

        Until a restart's new attempt is open, no `Reset` has told the caller to clear what it
        showed: that is still the broken attempt's answer, not the new attempt's nothing (a
        caller closing the stream then keeps what arrived).
        """
        broken = self._broken
        if broken is not None and self._pending_reset is not None:
            return broken
        return exchange.completion

    def take_reset(self) -> Reset | None:
        """The `Reset` marker the driver must hand the caller before the next attempt, once
        that attempt is open."""
        reset, self._pending_reset = self._pending_reset, None
        if reset is not None:
            self.replaced = self._broken
            self._broken = None  # the caller clears what it showed: that text is gone
        return reset

    def delivered(self, chunks: list[ChatChunk], now: float) -> None:
        """The driver handed these chunks to the caller (read at `now`)."""
        if not self._delivered:
            self._delivered = any(map(_DELTAS, chunks))  # any chunk with a delta
        if not self._first_token and self.exchange is not None and self.exchange.progressed:
            self._first_token = True
            if self._observers and not self._reported:
                # (Reported: `close()` came during the read that brought these chunks.)
                self._tell("on_first_token", self.info, self._stats(now))

    @property
    def earlier(self) -> Earlier:
        """What the attempts before the current one measured (all zero for the first)."""
        return self._earlier

    def completing(self) -> None:
        """Nobody sees this call's text before it ends (`complete()` reads it): unless a mode
        was chosen, an interruption starts over rather than raising, as nothing shown would be
        repeated. Not a body the server ended too early (no `[DONE]`): the same server would
        end the next one the same way, and each restart pays for the answer again."""
        if not self._chosen:
            self.on_interrupt = "restart"
            self._restart_early_ends = False

    def failed(self, error: HolySheepError, now: float, wall_clock: float | None) -> Retry | GiveUp:
        """What to do about `error`, which ended the current attempt."""
        exchange = self.exchange
        if exchange is None or self.attempt < 1:
            raise LocalProtocolError(
                "Call.failed() reports how an attempt ended, and none was started: "
                "call start_attempt() first"
            )
        if isinstance(error, RateLimitError) and error.retry_after is None:
            # A `Retry-After` HTTP-date needs the wall clock, which only the driver has: the
            # exchange could read the seconds form alone.
            error.retry_after = retry_after(error, wall_clock)
        progressed = exchange.progressed
        if progressed or self._budget_from is None:
            # Content came since the last failure (or this is the first): a new run of
            # failures, with the whole budget. The time in the queue before is not ours.
            started = exchange.started
            self._budget_from = now if progressed or started is None else started
            self._queued_before = self.queued
            if progressed and self.on_interrupt == "resume":
                # Resumed progress is kept, so each run gets every attempt; a restart
                # starts over and would loop on a server that always drops.
                self._run_start = self.attempt - 1
        # Less the time later attempts waited in the rate limiter's queue: a retry sent to the
        # back of a busy shared queue is no slower server, and gave up for no reason.
        elapsed = now - self._budget_from - (self.queued - self._queued_before)
        if progressed:
            self._broken = None  # the reconnection worked: this is a new interruption
        reconnecting = self._broken is not None
        hint = None
        if exchange.accumulator.decoder.retry is not None:
            # Any number of digits is a valid `retry:`; a day is far past any wait we honour.
            hint = min(exchange.accumulator.decoder.retry, _A_DAY_MS) / 1000
        # Reconnecting after an interruption, any failure is part of it: a 503 or a timeout on
        # the way back is retried like the drop was, and giving up reports the interruption.
        interrupted = reconnecting or (self._delivered and _is_interruption(error))
        if interrupted and self.on_interrupt == "resume" and not self._last_event_id():
            decision: Retry | GiveUp = GiveUp(
                "the stream cannot be resumed: the server sent no event ids"
            )
        elif interrupted and not reconnecting and not self._restart_early_ends and exchange.eof:
            decision = GiveUp(
                "the server ended the stream before it was done, and would end a new one the "
                "same way: complete() starts over only after a broken connection or a stall "
                "(on_interrupt='restart' restarts this too)"
            )
        else:
            decision = self.policy.decide(
                error,
                attempt=self.attempt - self._run_start,
                elapsed=elapsed,
                delivered=self._delivered and not (interrupted and self.on_interrupt != "raise"),
                random=self._random,
                wall_clock=wall_clock,
                retry_delay_hint=hint,
            )
        if isinstance(decision, Retry):
            # The first send, this attempt's if it was the first (`start_attempt` folds it in).
            sent = self._earlier.add(exchange).sent
            decision = _within_total(decision, exchange, sent, now)
        if isinstance(decision, Retry) and interrupted:
            if self._broken is None:
                self._broken = exchange.completion
            if self.on_interrupt == "resume":
                self._resume_from = self._last_event_id()
            else:  # restart: nothing of the broken attempt survives
                self._delivered = False
                self._resume_from = None
                self._pending_reset = Reset(decision.reason, decision.attempt)
        if exchange.started is None:
            # Never sent: a retry still queued in the rate limiter when `total` ran out. It is
            # no attempt (`sent` does not count it), so no record or hook call either: those
            # tell of each request that failed.
            logger.info("holysheep gives up after attempt %d: %s", self.sent, decision.reason)
            return decision
        record = Attempt(
            self.attempt,
            f"{type(error).__name__}: {error}",
            decision.reason,
            decision.delay if isinstance(decision, Retry) else None,
            error,
        )
        self.history = (*self.history, record)
        if isinstance(decision, Retry):
            logger.warning("holysheep retry: attempt %d failed: %s", self.attempt, decision.reason)
        else:
            logger.info("holysheep gives up after attempt %d: %s", self.attempt, decision.reason)
        for hook in self._hooks:
            try:
                hook(record)
            except Exception:
                # As an observer's: a failing metrics hook must not fail the request, nor
                # replace its error (and the partial completion on it) with its own.
                logger.exception("holysheep hook %r failed", hook)
        if isinstance(decision, Retry) and self._observers:
            self._tell("on_retry", self.info, record)
        return decision

    # -- lifecycle for observers: the drivers report, `Call` makes each happen once ------------

    def sending(self) -> None:
        """The driver is about to send an attempt."""
        if not self._announced:
            self._announced = True
            if self._observers:
                notify(self._observers, "on_request", self.info)

    def _tell(self, method: str, *args: Any) -> None:
        """Tell the observers of progress (a first token, a retry) until the end is reported:
        an observer may close the stream from its callback, and the end is the last thing
        each of them hears."""
        for observer in self._observers:
            if self._reported:
                return
            notify((observer,), method, *args)

    def ended(self, now: float, error: BaseException | None = None) -> None:
        """The stream stopped for good: cleanly (`error` None) or with `error`."""
        if self.exchange is not None:
            # Its duration stops here, however it ended (a clean end stamped it already): an
            # error before the body left it growing for as long as the caller kept the stream.
            self.exchange.finish(now)
        if self._reported or not self._announced:
            return
        self._reported = True
        if error is None and self._shown is not None:
            error = self._shown.ended_early()  # an end `text_stream()` raises for
        if self._observers:
            stats = self._stats(now)
            if error is None:
                assert self.exchange is not None
                notify(self._observers, "on_end", self.info, self.completion(self.exchange), stats)
            else:
                notify(self._observers, "on_error", self.info, error, stats)

    def left(self, now: float, exc: BaseException | None) -> None:
        """The caller's code left the stream with `exc` in flight. Ctrl-C, `SystemExit` or a
        cancelled task end the request as an error; an ordinary exception or `break` in the
        caller's code is the caller closing early, which `ended(now)` reports as an end."""
        if exc is not None and not isinstance(exc, (Exception, GeneratorExit)):
            self.ended(now, exc)

    def _stats(self, now: float) -> StreamStats:
        assert self.exchange is not None
        return self.exchange.stats(now, self)

    @property
    def sent(self) -> int:
        """How many attempts were sent: a retry that never left the rate limiter's queue (its
        `total` ran out, or the client closed) is not one."""
        exchange = self.exchange
        if exchange is not None and exchange.started is None and self.attempt > 0:
            return self.attempt - 1
        return self.attempt

    def error_to_raise(self, error: HolySheepError, decision: GiveUp) -> HolySheepError:
        """The exception the caller sees when we give up, with the call's attempts on it."""
        failure = self._error_to_raise(error, decision)
        failure.attempts = self.sent
        if decision.cut_short is not None:
            failure.not_retried = decision.cut_short
        if self._shown is not None:
            # Made here, not where `text_stream()` catches it: observers get this error too.
            failure = self._shown.failed(failure)
        return failure

    def _error_to_raise(self, error: HolySheepError, decision: GiveUp) -> HolySheepError:
        if isinstance(error, StreamInterruptedError):
            return error
        broken = self._broken
        if broken is not None:
            # Reconnecting after content reached the caller failed for good: the caller
            # needs the interruption and the text it had, not only the reconnect's error.
            way = "resume" if self.on_interrupt == "resume" else "restart"
            what = f"the {way} failed: {error.message}"
            return _interruption(what, decision, error, broken, broken.usage)
        if self._delivered and isinstance(error, IncompleteStreamError):
            exchange = self.exchange
            usage = exchange.accumulator.usage if exchange is not None else None
            return _interruption(error.message, decision, error, error.completion, usage)
        return error

    def _last_event_id(self) -> str:
        exchange = self.exchange
        last = exchange.accumulator.decoder.last_event_id if exchange is not None else ""
        # A resumed stream that drops again before a new event id: resume from the same place.
        return last or self._resume_from or ""


def _interruption(
    what: str,
    decision: GiveUp,
    error: HolySheepError,
    completion: Completion | None,
    usage: Usage | None,
) -> StreamInterruptedError:
    return StreamInterruptedError(
        f"the stream was interrupted after content was delivered: {what} ({decision.reason})",
        completion=completion,
        request_id=error.request_id,
        status_code=error.status_code,
        usage=usage,
    )


def _within_total(
    decision: Retry, exchange: Exchange, sent: float | None, now: float
) -> Retry | GiveUp:
    """A retry only if the `total` timeout leaves time for it after the wait: `total` bounds
    the whole call, and an attempt sent at or past it would only time out."""
    total = exchange.timeouts.total
    if total is None or sent is None:
        return decision
    left = sent + total - now
    if decision.delay < left:
        return decision
    why = (
        f"the total timeout of {total:g} s would pass during the {decision.delay:.2f} s wait "
        f"({max(left, 0.0):.2f} s left)"
    )
    return GiveUp(why, decision.pause, why)


class StreamView:
    """What both clients' streams read of their call, written once: the two drivers differ
    only in how they wait, not in what they show."""

    __slots__ = ()
    _call: Call
    _closed: bool

    @property
    def _exchange(self) -> Exchange:
        exchange = self._call.exchange
        return exchange if exchange is not None else self._call.peek()

    @property
    def completion(self) -> Completion:
        """Everything accumulated so far (complete once the stream ended cleanly)."""
        return self._call.completion(self._exchange)

    @property
    def request_id(self) -> str:
        return self._exchange.server_request_id or self._exchange.request_id

    @property
    def response_headers(self) -> Mapping[str, str]:
        """The current attempt's response headers, looked up by lower-case name (a gateway's
        `x-ratelimit-remaining-tokens`, say); empty before the response head came."""
        return self._exchange.response_headers

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        """Which request, how many attempts, and where it stands (not sent, open, ended, or
        closed by the caller before its end)."""
        call, exchange = self._call, self._exchange
        if exchange.accumulator.closed:
            state = "ended"
        elif self._closed:
            state = "closed"
        elif call.exchange is None or exchange.status_code is None:
            state = "not sent"
        else:
            state = "open"
        kind = type(self).__name__
        return f"<{kind} request_id={self.request_id!r} attempts={call.attempt} {state}>"


def check_on_interrupt(value: object) -> None:
    """A mistyped mode fails where it is given, not at the first interruption."""
    if value not in _ON_INTERRUPT:
        raise ConfigurationError(
            f"on_interrupt must be one of {', '.join(map(repr, _ON_INTERRUPT))}, got {value!r}"
        )


def new_idempotency_key() -> str:
    """One per logical request, the same on every attempt, so a gateway can deduplicate."""
    return f"hs-idem-{os.urandom(16).hex()}"


def _is_interruption(error: HolySheepError) -> bool:
    """Errors that cut a stream short (as opposed to a refused request)."""
    if isinstance(error, StreamError) and not isinstance(error, IncompleteStreamError):
        return error.retryable
    return isinstance(error, IncompleteStreamError | APIConnectionError | IdleTimeoutError)


@final
class ShownText:
    """What `text_stream()` yields for each chunk: its text, and after a `Reset` only the text
    that goes beyond what was already yielded.

    A plain iterator of text has no way to take back what the caller printed, and restart mode
    (`on_interrupt="restart"`) starts the answer over: yielding the new answer whole would
    print its beginning twice. So after a `Reset` the new text is matched against what was
    shown; while it repeats it, nothing is yielded, and once it goes further, only the rest is.
    A new answer that says something else cannot be joined to what was shown: `take` returns
    None, and the caller raises (see `diverged`); so it does for one that ends while still
    repeating (see `repeating`). One that fails while still repeating fails as the restart
    it is part of: see `failed`.
    """

    __slots__ = ("_at", "_call", "_early", "_parts", "_shown", "_shown_completion")

    def __init__(self, call: Call | None = None) -> None:
        self._call = call  # for the completion each `Reset` replaces
        if call is not None:
            call._shown = self  # the call's errors are then ours (see `Call.error_to_raise`)
        self._early: StreamInterruptedError | None = None  # see `ended_early`
        self._parts: list[str] = []  # yielded so far, joined only at a Reset
        self._shown = ""
        self._at: int | None = None  # how much of `_shown` the new answer has repeated
        self._shown_completion: Completion | None = None  # the one whose text is `_shown`

    def take(self, chunk: ChatChunk) -> str | None:
        """The text to yield for `chunk` ("" for none); None if a restarted answer differs
        from what was yielded."""
        text = chunk.text
        if not text:
            if chunk.reset is not None:
                self._shown = "".join(self._parts)
                self._parts = [self._shown]
                self._at = 0
                call = self._call
                replaced = None
                if call is not None:
                    # Taken, not kept on the call for the rest of the stream.
                    replaced, call.replaced = call.replaced, None
                # The broken attempt's completion has all that was yielded, unless it broke
                # while still repeating an earlier one: that one's text is still what shows.
                if replaced is not None and len(replaced.text) >= len(self._shown):
                    self._shown_completion = replaced
            return ""
        at = self._at
        if at is None:
            self._parts.append(text)
            return text
        repeated = self._shown[at : at + len(text)]
        if not text.startswith(repeated):
            return None
        if at + len(text) <= len(self._shown):
            self._at = at + len(text)
            return ""
        rest = text[len(repeated) :]
        self._parts.append(rest)
        self._at = None
        return rest

    def repeating(self) -> bool:
        """Whether a restarted answer is still repeating what was yielded: one that ends there
        is shorter than what was shown, which differs from it as much as other words do."""
        return self._at is not None and self._at < len(self._shown)

    def failed(self, error: HolySheepError) -> HolySheepError:
        """The error to raise for `error`, which ended the stream.

        While a restarted answer still repeats what was yielded, the restart has not caught
        up: the caller has more text than the new attempt's completion, and cannot be told to
        clear it. So `error` carries the completion that was yielded instead, keeping its type
        (a final `StreamError` stays one, a timeout stays a timeout); a bare end of the stream,
        an `IncompleteStreamError`, is the `StreamInterruptedError` it is once text was shown.
        """
        shown = self._shown_completion
        if shown is None or not self.repeating():
            return error
        if type(error) is IncompleteStreamError:
            failure = StreamInterruptedError(
                "the stream was interrupted after content was delivered: the restart failed "
                f"before the new answer caught up with what text_stream() yielded: {error.message}",
                completion=shown,
                request_id=error.request_id,
                status_code=error.status_code,
                usage=shown.usage,
            )
            failure.attempts = error.attempts
            failure.not_retried = error.not_retried
            return failure
        error.completion = shown
        if isinstance(error, StreamInterruptedError):
            error.usage = shown.usage
        return error

    def ended_early(self) -> StreamInterruptedError | None:
        """The error for a restarted answer that ended while still repeating what was yielded
        (see `repeating`), None for any other end. Made once: `Call.ended` tells observers of
        it when the end is reported, and `text_stream()` raises the same exception after."""
        call = self._call
        if self._early is None and call is not None and self.repeating():
            exchange = call.exchange
            # The end of the answer, not the caller's close.
            if exchange is not None and exchange.accumulator.closed:
                request_id = exchange.server_request_id or exchange.request_id
                self._early = self.diverged(call.completion(exchange), request_id)
        return self._early

    def diverged(self, completion: Completion, request_id: str | None) -> StreamInterruptedError:
        """The error for a restarted answer that differs from the text already yielded."""
        at = self._at or 0
        return StreamInterruptedError(
            "the stream restarted after an interruption, and the new answer differs from the "
            f"text text_stream() already yielded, from character {at}: iterate the stream's "
            "chunks and replace what was shown at each Reset, or use on_interrupt='resume'",
            completion=completion,
            request_id=request_id,
        )
