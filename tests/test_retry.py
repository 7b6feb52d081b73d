"""The retry policy: which failures are retried, after how long, and when to give up."""

from __future__ import annotations

import ast
import email.utils
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from holysheep._exceptions import (
    APIConnectionError,
    APIStatusError,
    BadRequestError,
    ConfigurationError,
    ConnectTimeoutError,
    FirstTokenTimeoutError,
    IdleTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    LocalProtocolError,
    RateLimitError,
    RemoteProtocolError,
    StreamError,
    TotalTimeoutError,
)
from holysheep._retry import (
    Classification,
    GiveUp,
    Retry,
    RetryDecision,
    RetryPolicy,
    classify,
)

# 2015-10-21T07:28:00Z, the moment RFC 9110's own Retry-After example names.
NOW = 1445412480.0
HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


def status(code: int, headers: dict[str, str] | None = None, **kwargs: Any) -> APIStatusError:
    return APIStatusError(f"HTTP {code}", status_code=code, headers=headers, **kwargs)


def rate_limited(retry_after: float | None = None, **headers: str) -> RateLimitError:
    error = RateLimitError("HTTP 429: slow down", status_code=429, headers=headers)
    error.retry_after = retry_after
    return error


def decide(
    error: BaseException,
    policy: RetryPolicy | None = None,
    *,
    attempt: int = 1,
    elapsed: float = 0.0,
    delivered: bool = False,
    random: float = 0.0,
    **kwargs: Any,
) -> RetryDecision:
    return (policy or RetryPolicy()).decide(
        error,
        attempt=attempt,
        elapsed=elapsed,
        delivered=delivered,
        random=lambda: random,
        **kwargs,
    )


def retry(error: BaseException, policy: RetryPolicy | None = None, **kwargs: Any) -> Retry:
    decision = decide(error, policy, **kwargs)
    assert isinstance(decision, Retry), decision
    return decision


def connection_error() -> APIConnectionError:
    return APIConnectionError("connection refused")


# -- classification -----------------------------------------------------------------------------


def test_connection_errors_are_retryable() -> None:
    """A refused or reset connection is transient."""
    assert Classification(
        True, "APIConnectionError: the connection failed, usually a transient fault"
    ) == classify(connection_error())


@pytest.mark.parametrize("cls", [ConnectTimeoutError, FirstTokenTimeoutError, IdleTimeoutError])
def test_timeouts_of_one_wait_are_retryable_and_named(cls: type[ConnectTimeoutError]) -> None:
    """Timeouts are transient; the reason names which one and its limit."""
    verdict = classify(cls("timed out", limit=10.0, elapsed=10.2))
    assert (True, f"{cls.__name__}: the {cls.timeout} timeout of 10 s fired") == (
        verdict.retryable,
        verdict.reason,
    )


def test_the_total_timeout_is_not_retried() -> None:
    """`total` is the budget of the whole stream, retries included: another try would only
    run past it (it was retried, and a 0.3 s total let a call run for seconds)."""
    assert Classification(
        False, "TotalTimeoutError: the total timeout of 10 s for the whole stream fired"
    ) == classify(TotalTimeoutError("timed out", limit=10.0, elapsed=10.2))


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retryable(code: int) -> None:
    """Timeouts, conflicts, rate limits, and failing or overloaded servers are retried."""
    assert Classification(True, f"APIStatusError (HTTP {code}) is transient") == classify(
        status(code)
    )


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 422, 501])
def test_client_errors_are_not_retryable(code: int) -> None:
    """A status that describes the request fails the same way on every attempt."""
    assert Classification(
        False, f"APIStatusError (HTTP {code}) would fail the same way again"
    ) == classify(status(code))


def test_x_should_retry_true_overrides_the_status() -> None:
    """The server's `x-should-retry: true` makes even a 400 retryable."""
    error = BadRequestError("HTTP 400", status_code=400, headers={"X-Should-Retry": "true"})
    assert Classification(
        True, "BadRequestError (HTTP 400) carries x-should-retry: true"
    ) == classify(error)


def test_x_should_retry_false_overrides_the_status() -> None:
    """The server's `x-should-retry: false` stops even a 503, Retry-After or not."""
    error = status(503, {"x-should-retry": "false", "retry-after": "1"})
    assert Classification(
        False, "APIStatusError (HTTP 503) carries x-should-retry: false", 1.0
    ) == classify(error)


def test_unrecognised_x_should_retry_falls_back_to_the_status() -> None:
    """Only `true` and `false` are verdicts; anything else is ignored."""
    assert classify(status(503, {"x-should-retry": "maybe"})).retryable


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            status(500, type="invalid_request_error"),
            "APIStatusError (HTTP 500) reports invalid_request_error; retrying cannot fix it",
        ),
        (
            RateLimitError("no credit", status_code=429, code="insufficient_quota"),
            "RateLimitError (HTTP 429) reports insufficient_quota; retrying cannot fix it",
        ),
        (
            StreamError("bad", type="invalid_request_error", retryable=True),
            "StreamError reports invalid_request_error; retrying cannot fix it",
        ),
    ],
)
def test_invalid_requests_and_exhausted_quota_are_never_retried(
    error: BaseException, reason: str
) -> None:
    """An invalid request or an empty account fails again whatever the status says."""
    assert Classification(False, reason) == classify(error)


def test_stream_errors_follow_their_retryable_flag() -> None:
    """An in-band error is retried when the server said it is transient, and only then."""
    assert (True, False) == (
        classify(StreamError("overloaded", type="overloaded_error", retryable=True)).retryable,
        classify(StreamError("content filter", type="content_filter")).retryable,
    )


def test_incomplete_stream_is_a_dropped_connection() -> None:
    """A stream cut short is retryable even though it is not flagged so."""
    assert Classification(
        True, "IncompleteStreamError: the stream was cut off, usually a dropped link"
    ) == classify(IncompleteStreamError("cut"))


@pytest.mark.parametrize(
    "error",
    [
        RemoteProtocolError("garbage"),
        LocalProtocolError("misuse"),
        ConfigurationError("no key"),
    ],
)
def test_other_holysheep_errors_are_not_transient(error: BaseException) -> None:
    """Protocol violations and configuration mistakes repeat on every attempt."""
    assert Classification(False, f"{type(error).__name__} is not a transient failure") == (
        classify(error)
    )


@pytest.mark.parametrize("error", [ValueError("bug"), KeyboardInterrupt(), GeneratorExit()])
def test_foreign_exceptions_are_not_ours_to_retry(error: BaseException) -> None:
    """Bugs and interruptions propagate: the policy only retries errors holysheep raised."""
    reason = f"{type(error).__name__} is not a holysheep error, so not ours to retry"
    assert (Classification(False, reason), GiveUp(reason)) == (classify(error), decide(error))


# -- Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "-4"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "nan", "retry-after": "10"}, 10.0),
        ({"retry-after": HTTP_DATE}, 0.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 -0000"}, 30.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_forms(headers: dict[str, str], expected: float | None) -> None:
    """Seconds, fractions, milliseconds and HTTP-dates (relative to the wall clock) are read."""
    assert expected == classify(status(503, headers), wall_clock=NOW).retry_after


def test_retry_after_date_without_a_wall_clock_is_ignored() -> None:
    """A date cannot be turned into a wait without knowing the time, so none is guessed."""
    error = status(503, {"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)})
    assert (None, 30.0) == (
        classify(error).retry_after,
        classify(error, wall_clock=NOW).retry_after,
    )


def test_rate_limit_error_attribute_wins_over_headers() -> None:
    """`RateLimitError.retry_after`, set by the exchange, is the server's wait."""
    assert 4.0 == classify(rate_limited(4.0, **{"retry-after": "9"})).retry_after


def test_rate_limit_error_falls_back_to_a_date_header() -> None:
    """Without a parsed `retry_after`, the HTTP-date form of the header still counts."""
    error = rate_limited(None, **{"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"})
    assert 5.0 == classify(error, wall_clock=NOW).retry_after


def test_nan_retry_after_is_no_wait() -> None:
    """A nonsensical wait is ignored rather than poisoning the arithmetic."""
    assert classify(rate_limited(math.nan)).retry_after is None


# -- decisions ----------------------------------------------------------------------------------


def test_backoff_doubles_from_wait_initial_up_to_wait_max() -> None:
    """Without jitter the waits are 0.5, 1, 2, 4 ... capped at 30 s."""
    policy = RetryPolicy(attempts=100, timeout=None)
    delays = [policy.backoff(attempt, lambda: 0.0) for attempt in range(1, 9)]
    assert [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0] == delays


def test_backoff_adds_jitter_scaled_by_wait_jitter() -> None:
    """`random()` spreads the wait by up to `wait_jitter` seconds."""
    assert 2.0 + 0.5 * 0.75 == RetryPolicy().backoff(3, lambda: 0.75)


def test_backoff_survives_absurd_attempt_numbers() -> None:
    """Exponent overflow is capped at `wait_max`, not raised."""
    assert 30.0 == RetryPolicy(wait_jitter=0).backoff(100_000, lambda: 0.0)


def test_retry_names_the_next_attempt_and_the_wait() -> None:
    """A retry carries the delay, the upcoming attempt's number and a readable reason."""
    assert Retry(
        1.125,
        "APIConnectionError: the connection failed, usually a transient fault; "
        "attempt 3 of 4 in 1.12 s (exponential backoff)",
        3,
    ) == decide(connection_error(), attempt=2, random=0.25)


def test_rate_limit_retry_after_wins_without_jitter_and_pauses_everyone() -> None:
    """A 429's Retry-After is waited exactly, and the limiter should pause all callers."""
    assert Retry(
        7.0,
        "RateLimitError (HTTP 429) is transient; attempt 2 of 4 in 7.00 s "
        "(the server's Retry-After of 7 s)",
        2,
        pause_all=True,
    ) == decide(rate_limited(7.0), random=0.9)


def test_retry_after_on_a_503_pauses_only_this_request() -> None:
    """Only a 429 speaks for the whole account; an overloaded 503 does not."""
    decision = retry(status(503, {"retry-after": "3"}), random=0.9)
    assert (3.0, False) == (decision.delay, decision.pause_all)


def test_retry_after_above_the_ceiling_gives_up_by_default() -> None:
    """A wait beyond `max_retry_after` means a long quota: say so instead of waiting (and that
    this limit, not the error's kind, stopped the retry)."""
    why = "the server asked to wait 3600 s, longer than max_retry_after of 60 s"
    assert GiveUp(f"RateLimitError (HTTP 429): {why}", pause=60.0, cut_short=why) == decide(
        rate_limited(3600.0)
    )


@pytest.mark.parametrize(
    ("policy", "attempt", "delivered"),
    [(RetryPolicy.none(), 1, False), (RetryPolicy(), 4, False), (RetryPolicy(), 1, True)],
)
def test_a_429_that_ends_the_request_still_pauses_everyone(
    policy: RetryPolicy, attempt: int, delivered: bool
) -> None:
    """The account stays throttled when this request gives up (no retries, attempts used,
    content delivered): the others sharing a limiter must still hold back."""
    decision = policy.decide(
        rate_limited(7.0), attempt=attempt, elapsed=0.0, delivered=delivered, random=lambda: 0.0
    )
    assert isinstance(decision, GiveUp)
    assert 7.0 == decision.pause


@pytest.mark.parametrize(
    "error",
    [
        rate_limited(None, **{"x-should-retry": "false", "retry-after": "5"}),
        RateLimitError(
            "no credit", status_code=429, code="insufficient_quota", headers={"retry-after": "5"}
        ),
    ],
    ids=["x-should-retry-false", "insufficient-quota"],
)
def test_a_429_not_to_retry_still_pauses_everyone_for_its_retry_after(
    error: RateLimitError,
) -> None:
    """A 429 whose Retry-After came with a verdict against retrying (x-should-retry: false,
    or a quota error) paused nobody: the others sharing the limiter went on sending into the
    throttle the server named."""
    decision = decide(error)
    assert isinstance(decision, GiveUp)
    assert 5.0 == decision.pause


def test_a_503_that_ends_the_request_pauses_nobody() -> None:
    decision = RetryPolicy.none().decide(
        status(503, {"retry-after": "3"}),
        attempt=1,
        elapsed=0.0,
        delivered=False,
        random=lambda: 0.0,
    )
    assert GiveUp("APIStatusError (HTTP 503): all 1 attempts used") == decision


def test_retry_after_above_the_ceiling_can_be_capped() -> None:
    """With `on_long_retry_after="cap"` the policy waits the ceiling instead."""
    policy = RetryPolicy(max_retry_after=20, on_long_retry_after="cap")
    assert Retry(
        20,
        "RateLimitError (HTTP 429) is transient; attempt 2 of 4 in 20.00 s "
        "(the server's Retry-After of 3600 s capped at max_retry_after)",
        2,
        pause_all=True,
    ) == decide(rate_limited(3600.0), policy)


def test_sse_retry_field_replaces_the_exponential_part() -> None:
    """The stream's `retry:` is used instead of backoff, still with jitter."""
    decision = retry(IncompleteStreamError("cut"), attempt=3, random=0.5, retry_delay_hint=1.5)
    assert 1.75 == decision.delay


def test_sse_retry_field_is_capped_silently() -> None:
    """An excessive `retry:` is advice, so it is capped rather than a reason to give up."""
    assert 60.0 == retry(IncompleteStreamError("cut"), retry_delay_hint=1e6).delay


def test_retry_after_wins_over_the_sse_retry_field() -> None:
    """When the server sent both, the response's Retry-After decides."""
    assert 4.0 == retry(rate_limited(4.0), retry_delay_hint=1.0, random=0.5).delay


def test_delivered_content_is_never_retried_transparently() -> None:
    """Once the caller saw text, a retry would repeat it; the caller decides instead."""
    error = IdleTimeoutError("stalled", limit=60.0, elapsed=60.0)
    assert GiveUp(
        "IdleTimeoutError after content was delivered to the caller; a retry would repeat it"
    ) == decide(error, delivered=True)


def test_idle_timeout_before_any_content_is_retried() -> None:
    """A stall before anything reached the caller is just another transient failure."""
    assert 2 == retry(IdleTimeoutError("stalled", limit=60.0, elapsed=60.0)).attempt


def test_gives_up_when_attempts_are_used() -> None:
    """`attempts` counts the first try: the fourth failure is final."""
    assert GiveUp("InternalServerError (HTTP 502): all 4 attempts used") == decide(
        InternalServerError("bad gateway", status_code=502), attempt=4
    )


def test_gives_up_when_the_wait_would_exceed_the_budget() -> None:
    """The wall-clock budget covers attempts and waits together."""
    why = "the retry budget of 120 s would be exceeded (119.80 s elapsed + 0.50 s wait)"
    assert GiveUp(f"APIConnectionError: {why}", cut_short=why) == decide(
        connection_error(), elapsed=119.8
    )


def test_no_timeout_means_only_attempts_bound_retries() -> None:
    """`timeout=None` lifts the wall-clock budget."""
    policy = RetryPolicy(timeout=None)
    assert 0.5 == retry(connection_error(), policy, elapsed=1e9).delay


@pytest.mark.parametrize("policy", [RetryPolicy.none(), RetryPolicy(attempts=1)])
def test_a_single_attempt_never_retries(policy: RetryPolicy) -> None:
    """`RetryPolicy.none()` and `attempts=1` raise the first failure."""
    assert GiveUp("APIConnectionError: all 1 attempts used") == decide(connection_error(), policy)


def test_attempt_numbers_start_at_one() -> None:
    """Asking before any attempt failed is a caller bug."""
    with pytest.raises(ConfigurationError, match="starts at 1, got 0"):
        decide(connection_error(), attempt=0)
    with pytest.raises(ConfigurationError, match="starts at 1, got 0"):
        RetryPolicy().backoff(0, lambda: 0.0)


def test_decisions_match_exhaustively() -> None:
    """Consumers `match` on the two decision types."""

    def describe(decision: RetryDecision) -> str:
        match decision:
            case Retry(delay=delay):
                return f"retry in {delay}"
            case GiveUp(reason=reason):
                return reason

    assert "retry in 0.5" == describe(decide(connection_error()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": 2.0},
        {"attempts": True},
        {"timeout": 0},
        {"timeout": -1},
        {"wait_initial": -0.1},
        {"wait_max": math.inf},
        {"wait_jitter": math.nan},
        {"wait_exp_base": 0.5},
        {"max_retry_after": "60"},
        {"on_long_retry_after": "wait"},
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, Any]) -> None:
    """Nonsense settings fail at construction with a `ConfigurationError` naming the field."""
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


# -- properties ---------------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    attempts=st.integers(1, 10),
    timeout=st.none() | st.floats(0.1, 1000),
    wait_initial=st.floats(0, 10),
    wait_max=st.floats(0, 100),
    wait_jitter=st.floats(0, 5),
    wait_exp_base=st.floats(1, 10),
    max_retry_after=st.floats(0, 600),
    on_long_retry_after=st.sampled_from(["raise", "cap"]),
)

errors = st.one_of(
    st.builds(APIConnectionError, st.just("refused")),
    st.builds(IdleTimeoutError, st.just("idle"), limit=st.just(60.0), elapsed=st.just(61.0)),
    st.builds(IncompleteStreamError, st.just("cut")),
    st.builds(StreamError, st.just("in-band"), retryable=st.booleans()),
    st.builds(
        status,
        st.sampled_from([400, 404, 408, 429, 500, 503, 529]),
        st.fixed_dictionaries(
            {},
            optional={
                "retry-after": st.sampled_from(["0", "1.5", "30", "4000", "x", HTTP_DATE]),
                "x-should-retry": st.sampled_from(["true", "false"]),
            },
        ),
    ),
    st.builds(rate_limited, st.none() | st.floats(0, 10_000)),
    st.just(ValueError("bug")),
)


@given(
    policy=policies,
    error=errors,
    attempt=st.integers(1, 12),
    elapsed=st.floats(0, 2000),
    delivered=st.booleans(),
    random=st.floats(0, 1, exclude_max=True),
    hint=st.none() | st.floats(0, 1e6),
    wall_clock=st.none() | st.just(NOW - 100),
)
def test_decisions_stay_within_every_bound(
    policy: RetryPolicy,
    error: BaseException,
    attempt: int,
    elapsed: float,
    delivered: bool,
    random: float,
    hint: float | None,
    wall_clock: float | None,
) -> None:
    """Any retry waits within the configured ceilings, never after delivery, within budget."""
    decision = policy.decide(
        error,
        attempt=attempt,
        elapsed=elapsed,
        delivered=delivered,
        random=lambda: random,
        wall_clock=wall_clock,
        retry_delay_hint=hint,
    )
    if isinstance(decision, GiveUp):
        assert decision.reason
        return
    assert not delivered
    assert classify(error, wall_clock=wall_clock).retryable
    assert 0 <= decision.delay <= max(policy.wait_max + policy.wait_jitter, policy.max_retry_after)
    assert attempt + 1 == decision.attempt <= policy.attempts
    assert policy.timeout is None or elapsed + decision.delay <= policy.timeout


@given(policy=policies, random=st.floats(0, 1, exclude_max=True))
def test_backoff_never_shrinks_and_never_exceeds_its_cap(
    policy: RetryPolicy, random: float
) -> None:
    """Waits grow with the attempt number up to `wait_max` plus jitter."""
    delays = [policy.backoff(attempt, lambda: random) for attempt in range(1, 40)]
    assert sorted(delays) == delays
    assert all(0 <= delay <= policy.wait_max + policy.wait_jitter for delay in delays)


def test_policy_reads_no_clock_and_no_global_randomness() -> None:
    """The core is pure: time and randomness come in as arguments."""
    tree = ast.parse((Path(__file__).parent.parent / "holysheep" / "_retry.py").read_text())
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
