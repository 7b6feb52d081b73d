"""When to try a failed request again, and after how long, without reading a clock.

Theory of operation
-------------------
A `RetryPolicy` is a frozen value holding stamina's knobs (`attempts`, `timeout`, `wait_*`) and
a ceiling for server-chosen waits. After every failure the driver asks it::

    decision = policy.decide(
        error,
        attempt=attempts_made,     # 1 after the first failure
        elapsed=now - first_start, # on the driver's monotonic clock
        delivered=caller_saw_content,
        random=rng.random,         # [0, 1), for the jitter
        wall_clock=time.time(),    # only to read a Retry-After given as an HTTP-date
    )
    match decision:
        case Retry(delay=delay):   sleep(delay), then send attempt `decision.attempt`
        case GiveUp():             raise error

`decide` runs three steps, each a pure function of its arguments:

1. `classify(error)` says whether the failure is transient and whether the server named a wait
   (`Retry-After`). Only our own errors are candidates: anything else is a bug or a
   cancellation, and not ours to retry.
2. Content already handed to the caller is never retried transparently: a second attempt
   would repeat or contradict what the user saw. What to do then is the caller's decision.
3. The wait is the server's `Retry-After` if it sent one (no jitter: the server chose the
   moment), else the stream's `retry:` field if it set one, else exponential backoff with
   jitter. The retry happens only if it stays within `attempts` and the `timeout` budget.

The policy never sleeps and keeps no state, so one policy can serve every client and thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Literal, TypeAlias, final

import attrs

from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    HolySheepError,
    IncompleteStreamError,
    RateLimitError,
    StreamError,
    TotalTimeoutError,
)
from ._exchange import parse_retry_after

__all__ = [
    "Classification",
    "GiveUp",
    "Retry",
    "RetryDecision",
    "RetryPolicy",
    "classify",
]

# Statuses that describe the server's momentary state, not the request: a timeout (408), a
# conflict with a concurrent request (409), rate limiting (429), and the server or gateway
# failing or overloaded (500, 502, 503, 504, and 529, the "overloaded" status some LLM
# providers send). Every other status, notably 400/401/403/404/422, fails the same way again.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

# Error types (the body's `error.type` or `error.code`) that no retry can fix, whatever the
# status: the request itself is wrong, or the account is out of credit (OpenAI-compatible
# gateways send the latter with a 429, where waiting does not help).
_HOPELESS_ERROR_TYPES = frozenset({"invalid_request_error", "insufficient_quota"})


@final
@attrs.frozen
class Classification:
    """What one error says about trying again.

    `retry_after` is the server's requested wait in seconds (`Retry-After`), or None.
    """

    retryable: bool
    reason: str
    retry_after: float | None = None


@final
@attrs.frozen
class Retry:
    """Try again after `delay` seconds; `attempt` is the number of the attempt about to start.

    `pause_all` is True when the delay is a 429's `Retry-After`: the server throttles the
    whole account, so a shared rate limiter should hold back every request, not just this one.
    """

    delay: float
    reason: str
    attempt: int
    pause_all: bool = False

    @property
    def pause(self) -> float | None:
        """How long a shared rate limiter should hold every request back; None: not at all."""
        return self.delay if self.pause_all else None


@final
@attrs.frozen
class GiveUp:
    """Stop and raise the error; `reason` says why no retry happens.

    `pause` is set when the error is a 429 naming a wait: this request stops, but the account
    is still throttled, so a shared rate limiter should hold the others back that long
    (capped at `max_retry_after`). `cut_short` is set when the error was one to retry and a
    limit other than the attempt count stopped it (a Retry-After past `max_retry_after`, the
    retry budget, the total timeout): the error's message says which, as the reason would
    otherwise be only in logs and hooks.
    """

    reason: str
    pause: float | None = None
    cut_short: str | None = None


RetryDecision: TypeAlias = Retry | GiveUp


def _describe(error: BaseException) -> str:
    name = type(error).__name__
    status = getattr(error, "status_code", None)
    return f"{name} (HTTP {status})" if isinstance(status, int) else name


def _seconds(value: float | None) -> float | None:
    """A wait the server named, made safe: NaN is no wait at all, a negative one is zero."""
    if value is None or math.isnan(value):
        return None
    return max(0.0, value)


def retry_after(error: APIStatusError, wall_clock: float | None) -> float | None:
    """The wait an error response asks for, in seconds, or None if it names none.

    RFC 9110 section 10.2.3: `Retry-After` is delta-seconds or an HTTP-date. Gateways also
    send fractional seconds and `retry-after-ms`; `parse_retry_after` reads those. A date is
    relative to the wall clock, so without one it is ignored rather than guessed.
    """
    if isinstance(error, RateLimitError) and error.retry_after is not None:
        return _seconds(error.retry_after)
    headers = {name.lower(): value for name, value in error.headers.items()}
    seconds = parse_retry_after(headers)
    if seconds is not None:
        return _seconds(seconds)
    value = headers.get("retry-after")
    if value is None or wall_clock is None:
        return None
    when = _http_date(value)
    return None if when is None else max(0.0, when - wall_clock)


# RFC 9110 section 5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms a recipient
# must still accept. All are GMT. (Parsed here rather than with email.utils, which would pull
# the socket module into the sans-IO core.)
_HTTP_DATE_FORMATS = (
    "%a, %d %b %Y %H:%M:%S GMT",
    "%A, %d-%b-%y %H:%M:%S GMT",
    "%a %b %d %H:%M:%S %Y",
    "%a, %d %b %Y %H:%M:%S %z",  # RFC 5322 style with a numeric zone, which servers also send
)


def _http_date(value: str) -> float | None:
    text = " ".join(value.split())
    for form in _HTTP_DATE_FORMATS:
        try:
            when = datetime.strptime(text, form)
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    return None


def _should_retry_header(error: APIStatusError) -> bool | None:
    """The server's own verdict, `x-should-retry: true|false`, which OpenAI's API sends."""
    for name, value in error.headers.items():
        if name.lower() == "x-should-retry":
            verdict = value.strip().lower()
            if verdict in ("true", "false"):
                return verdict == "true"
    return None


def classify(error: BaseException, *, wall_clock: float | None = None) -> Classification:
    """Whether `error` is a transient failure worth another attempt, and why.

    `wall_clock` (Unix time) is needed only to read a `Retry-After` given as an HTTP-date.
    Whether content was already delivered is not known here; `RetryPolicy.decide` adds that.
    """
    what = _describe(error)
    if not isinstance(error, HolySheepError):
        return Classification(False, f"{what} is not a holysheep error, so not ours to retry")
    error_type = getattr(error, "type", None)
    error_code = getattr(error, "code", None)
    hopeless = next((t for t in (error_type, error_code) if t in _HOPELESS_ERROR_TYPES), None)

    if isinstance(error, APIStatusError):
        status = error.status_code
        # Read whatever the verdict: a 429 naming a wait pauses everyone sharing a limiter
        # even when this request does not try again (`RetryPolicy.decide`).
        wait = retry_after(error, wall_clock)
        verdict = _should_retry_header(error)
        if verdict is None and hopeless is not None:
            return Classification(False, f"{what} reports {hopeless}; retrying cannot fix it", wait)
        if verdict is None:
            verdict = status in RETRYABLE_STATUSES
            why = "is transient" if verdict else "would fail the same way again"
        else:
            why = f"carries x-should-retry: {str(verdict).lower()}"
        return Classification(verdict, f"{what} {why}", wait)

    if isinstance(error, IncompleteStreamError):
        # Before the generic StreamError: a cut stream is a dropped connection, not a verdict.
        return Classification(True, f"{what}: the stream was cut off, usually a dropped link")
    if isinstance(error, StreamError):
        if hopeless is not None:
            return Classification(False, f"{what} reports {hopeless}; retrying cannot fix it")
        if error.retryable:
            return Classification(True, f"{what}: the server reported a transient error")
        return Classification(False, f"{what}: the server reported an error retrying won't fix")
    if isinstance(error, TotalTimeoutError):
        # `total` bounds the whole stream, its retries included: another attempt would only
        # run past it.
        return Classification(
            False, f"{what}: the total timeout of {error.limit:g} s for the whole stream fired"
        )
    if isinstance(error, APITimeoutError):
        # An idle timeout is retryable only while nothing was delivered; `decide` enforces
        # that for every error alike.
        return Classification(
            True, f"{what}: the {error.timeout} timeout of {error.limit:g} s fired"
        )
    if isinstance(error, APIConnectionError):
        return Classification(True, f"{what}: the connection failed, usually a transient fault")
    return Classification(False, f"{what} is not a transient failure")


def _check(
    predicate: Callable[[float], bool], rule: str
) -> Callable[[object, object, object], None]:
    """An attrs validator raising `ConfigurationError` (a `ValueError`) that states the rule."""

    def validate(_instance: object, attribute: object, value: object) -> None:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not math.isnan(value)
            and predicate(value)
        )
        if not ok:
            name = getattr(attribute, "name", "value")
            raise ConfigurationError(f"RetryPolicy: {name} must be {rule}, got {value!r}")

    return validate


def _is_whole(value: float) -> bool:
    return isinstance(value, int) and value >= 1


def _check_mode(_instance: object, _attribute: object, value: object) -> None:
    if value not in ("raise", "cap"):
        raise ConfigurationError(
            f"RetryPolicy: on_long_retry_after must be 'raise' or 'cap', got {value!r}"
        )


def _check_timeout(instance: object, attribute: object, value: object) -> None:
    if value is not None:
        _check(lambda v: v > 0, "None or a positive number of seconds")(instance, attribute, value)


_finite_wait = _check(lambda v: 0 <= v < math.inf, "a finite number of seconds >= 0")


@final
@attrs.frozen
class RetryPolicy:
    """How often, how long and how patiently to retry; stamina's names, LLM-gateway defaults.

    - `attempts=4`: the first try and three retries ride out a gateway restart or a short
      overload (about 0.5 + 1 + 2 s of backoff) without hammering a provider that is down.
    - `timeout=120`: the whole budget, attempts and waits together; a caller who has waited
      two minutes for a first token wants the error, not a fifth try.
    - `wait_initial=0.5`: a reset connection or a 502 from a restarting upstream usually
      clears within a second; waiting longer first only adds latency.
    - `wait_max=30`: no single backoff wait longer than a provider's typical overload episode;
      longer throttling arrives as an explicit `Retry-After`.
    - `wait_jitter=0.5`: up to half a second of random extra wait spreads clients that failed
      together, on the scale of `wait_initial`, so it never dominates short waits.
    - `wait_exp_base=2`: doubling, the usual compromise between recovering fast and backing off.
    - `max_retry_after=60`: per-minute quotas reset within 60 s; a server asking for longer
      means an hourly or daily quota, which no retry within one call will outlast.
    - `on_long_retry_after="raise"`: then give up at once and say so (`"cap"` waits the
      ceiling instead, usually just to be refused again).

    `attempts=1` (or `RetryPolicy.none()`) never retries.
    """

    attempts: int = attrs.field(default=4, validator=_check(_is_whole, "an integer >= 1"))
    timeout: float | None = attrs.field(default=120.0, validator=_check_timeout)
    wait_initial: float = attrs.field(default=0.5, validator=_finite_wait)
    wait_max: float = attrs.field(default=30.0, validator=_finite_wait)
    wait_jitter: float = attrs.field(default=0.5, validator=_finite_wait)
    wait_exp_base: float = attrs.field(
        default=2.0, validator=_check(lambda v: 1 <= v < math.inf, "a finite number >= 1")
    )
    max_retry_after: float = attrs.field(default=60.0, validator=_finite_wait)
    on_long_retry_after: Literal["raise", "cap"] = attrs.field(
        default="raise", validator=_check_mode
    )

    @classmethod
    def none(cls) -> RetryPolicy:
        """A policy that never retries: every failure is raised as it happens."""
        return cls(attempts=1)

    def backoff(self, attempt: int, random: Callable[[], float]) -> float:
        """The wait after failed attempt number `attempt` (1-based), jitter included.

        `min(wait_max, wait_initial * wait_exp_base ** (attempt - 1)) + wait_jitter * random()`
        """
        _check_attempt(attempt)
        try:
            grown = self.wait_initial * float(self.wait_exp_base) ** (attempt - 1)
        except OverflowError:  # thousands of attempts: the cap applies long before
            grown = self.wait_max
        return min(self.wait_max, grown) + self.wait_jitter * random()

    def decide(
        self,
        error: BaseException,
        *,
        attempt: int,
        elapsed: float,
        delivered: bool,
        random: Callable[[], float],
        wall_clock: float | None = None,
        retry_delay_hint: float | None = None,
    ) -> Retry | GiveUp:
        """Retry or give up after `error` ended attempt number `attempt` (1 after the first).

        `elapsed` is the time since the first attempt started; `delivered` whether the caller
        already received content; `random()` returns a float in [0, 1) for the jitter;
        `wall_clock` the current Unix time, used only for a `Retry-After` HTTP-date;
        `retry_delay_hint` the seconds of the stream's SSE `retry:` field, if it set one.
        """
        _check_attempt(attempt)
        verdict = classify(error, wall_clock=wall_clock)
        # A 429 naming a wait throttles the whole account, not this request: everyone sharing
        # a limiter should hold back, whether or not this request tries again.
        pause = None
        if verdict.retry_after is not None and getattr(error, "status_code", None) == 429:
            pause = min(verdict.retry_after, self.max_retry_after)
        if not verdict.retryable:
            return GiveUp(verdict.reason, pause)
        what = _describe(error)
        if delivered:
            return GiveUp(
                f"{what} after content was delivered to the caller; a retry would repeat it",
                pause,
            )
        if attempt >= self.attempts:
            return GiveUp(f"{what}: all {self.attempts} attempts used", pause)

        if verdict.retry_after is not None:
            delay = verdict.retry_after
            source = f"the server's Retry-After of {delay:g} s"
            if delay > self.max_retry_after:
                if self.on_long_retry_after == "raise":
                    why = (
                        f"the server asked to wait {delay:g} s, longer than "
                        f"max_retry_after of {self.max_retry_after:g} s"
                    )
                    return GiveUp(f"{what}: {why}", pause, why)
                delay = self.max_retry_after
                source += " capped at max_retry_after"
        elif (hint := _seconds(retry_delay_hint)) is not None:
            # The stream's `retry:` field replaces the exponential part only; the jitter still
            # spreads clients reconnecting together. It is advice, not a demand (WHATWG HTML
            # 9.2.6), so an excessive one is capped silently instead of giving up.
            delay = min(hint + self.wait_jitter * random(), self.max_retry_after)
            source = f"the stream's retry: {hint:g} s"
        else:
            delay = self.backoff(attempt, random)
            source = "exponential backoff"

        if self.timeout is not None and elapsed + delay > self.timeout:
            why = (
                f"the retry budget of {self.timeout:g} s would be exceeded "
                f"({elapsed:.2f} s elapsed + {delay:.2f} s wait)"
            )
            return GiveUp(f"{what}: {why}", pause, why)
        return Retry(
            delay,
            f"{verdict.reason}; attempt {attempt + 1} of {self.attempts} in {delay:.2f} s "
            f"({source})",
            attempt + 1,
            pause is not None,
        )


def _check_attempt(attempt: int) -> None:
    # Attempt 0 would silently read as "before the first attempt": a wait shorter than
    # `wait_initial`, or a decision about nothing.
    if attempt < 1:
        raise ConfigurationError(f"attempt counts the attempts made and starts at 1, got {attempt}")
