"""The sans-IO exchange: request building, status errors, deadlines and stats, with no I/O."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from holysheep import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    Call,
    ChatAccumulator,
    Client,
    ConfigurationError,
    ConflictError,
    ConnectError,
    Exchange,
    FirstTokenTimeoutError,
    IdleTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    LocalProtocolError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RemoteProtocolError,
    Retry,
    RetryPolicy,
    StreamError,
    Timeouts,
    TotalTimeoutError,
    UnexpectedContentTypeError,
    UnprocessableEntityError,
    _exchange,
)
from holysheep._config import ClientConfig
from holysheep._exchange import parse_retry_after
from holysheep._pricing import estimate_tokens
from holysheep.transports import MockResponse, MockTransport, sse_body

SSE = {"content-type": "text/event-stream; charset=utf-8", "x-request-id": "req_server"}


def make(timeouts: Timeouts | None = None, **body: Any) -> Exchange:
    return Exchange(
        url="http://127.0.0.1:1/v1/chat/completions",
        api_key="sk-test",
        body={"model": "gpt-4.1", "messages": [], "stream": True, **body},
        timeouts=timeouts or Timeouts(),
        request_id="req_client",
    )


def test_request_carries_auth_ids_and_body() -> None:
    """The request is complete: key, request id, SSE accept, no compression, JSON body."""
    request = make(temperature=0.2).request
    headers = dict(request.headers)
    assert "Bearer sk-test" == headers["authorization"]
    assert "req_client" == headers["x-request-id"]
    assert "text/event-stream" == headers["accept"]
    assert "identity" == headers["accept-encoding"]
    assert {"model": "gpt-4.1", "messages": [], "stream": True, "temperature": 0.2} == json.loads(
        request.content
    )
    assert "req_client" == request.header("X-Request-ID")
    assert request.header("missing") is None


def test_config_passes_params_through_and_asks_for_usage() -> None:
    """Extra params land in the body; usage is requested unless the caller says otherwise."""
    config = ClientConfig.from_arguments("k", "http://h/v1/", None, {"x-team": "a"}, True)
    call = config.call("m", [{"role": "user", "content": "hi"}], {"max_tokens": 5}, limited=True)
    exchange = call.start_attempt(0.0)
    body = json.loads(exchange.request.content)
    assert (True, {"include_usage": True}, 5) == (
        body["stream"],
        body["stream_options"],
        body["max_tokens"],
    )
    assert "http://h/v1/chat/completions" == exchange.request.url
    assert "a" == exchange.request.header("x-team")
    assert str(exchange.request.header("x-request-id")).startswith("hs-")
    assert str(exchange.request.header("idempotency-key")).startswith("hs-idem-")
    # max_tokens + a prompt of 2 characters (~0 tokens) in one message (3) and the reply (3)
    assert 5 + 0 + 3 + 3 == call.cost
    override = config.call("m", [], {"stream_options": {"include_usage": False}})
    body = json.loads(override.start_attempt(0.0).request.content)
    assert {"include_usage": False} == body["stream_options"]


@pytest.mark.parametrize(
    ("request_id", "headers"),
    [
        (None, None),
        ("mine", None),
        (None, {"Idempotency-Key": "key-1"}),
        ("mine", {"idempotency-key": "key-1"}),
    ],
)
def test_each_request_gets_random_ids_unless_given(
    request_id: str | None, headers: dict[str, str] | None
) -> None:
    """Both ids are 128 random bits (32 hex digits) where the caller set none, new for every
    request and different from each other; the ones the caller gives are kept."""
    config = ClientConfig.from_arguments("k", "http://h/v1", None, None, True)
    seen = set()
    for _ in range(50):
        call = config.call("m", [], {}, request_id=request_id, headers=headers)
        request = call.start_attempt(0.0).request
        sent_id, key = request.header("x-request-id"), request.header("idempotency-key")
        assert (sent_id, key) == (call.exchange and call.exchange.request_id, call.idempotency_key)
        if request_id:
            assert request_id == sent_id
        if headers:
            assert "key-1" == key
        for value, prefix, given_one in ((sent_id, "hs-", request_id), (key, "hs-idem-", headers)):
            assert value is not None
            if not given_one:
                assert value.startswith(prefix)
                digits = value.removeprefix(prefix)
                assert 32 == len(digits)
                int(digits, 16)
                assert digits not in seen
                seen.add(digits)


def make_call(**options: Any) -> Call:
    def make_exchange(headers: Mapping[str, str], accumulator: ChatAccumulator | None) -> Exchange:
        return Exchange(
            url="http://127.0.0.1:1/v1/chat/completions",
            api_key="k",
            body={"model": "m", "messages": []},
            timeouts=Timeouts(),
            headers=headers,
            accumulator=accumulator,
        )

    return Call(make_exchange, policy=RetryPolicy(), random=lambda: 0.0, **options)


def test_a_call_made_without_an_idempotency_key_sends_one_of_its_own_on_every_attempt() -> None:
    """`Call` used directly: a generated key (128 random bits), the same on each attempt, so
    a gateway can tell the retry from a new request; a key given is used as it is."""
    call = make_call()
    first = call.start_attempt(0.0)
    assert isinstance(call.failed(ConnectError("refused"), 0.1, None), Retry)
    second = call.start_attempt(1.0)
    key = call.idempotency_key
    assert (key, key) == (
        first.request.header("idempotency-key"),
        second.request.header("idempotency-key"),
    )
    assert (8 + 32, True) == (len(key), key.startswith("hs-idem-"))
    assert key != make_call().idempotency_key
    assert "mine" == make_call(idempotency_key="mine").idempotency_key


def test_peek_is_the_exchange_the_first_attempt_uses_and_then_the_current_one() -> None:
    """Reading before the stream is sent costs no attempt; afterwards it reads the attempt
    under way."""
    call = make_call()
    before = call.peek()
    assert (0, before) == (call.attempt, call.peek())
    assert before is call.start_attempt(0.0)
    call.failed(ConnectError("refused"), 0.1, None)
    second = call.start_attempt(1.0)
    assert (2, second) == (call.attempt, call.peek())
    assert second is not before


def test_reporting_a_failure_before_any_attempt_is_the_callers_mistake() -> None:
    """`failed()` says how an attempt ended: before `start_attempt()` there is none, which is
    a `LocalProtocolError` naming the fix (it was a ValueError from deep in the policy)."""
    fresh, peeked = make_call(), make_call()
    peeked.peek()
    for call in (fresh, peeked):
        with pytest.raises(LocalProtocolError, match=r"call start_attempt\(\) first"):
            call.failed(ConnectError("refused"), 0.0, None)


def test_missing_api_key_names_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key anywhere is a clear error at construction."""
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="HOLYSHEEP_API_KEY"):
        ClientConfig.from_arguments(None, None, None, None, True)


def test_a_header_http_cannot_carry_is_a_clear_error_naming_it() -> None:
    """An API key pasted with a typographic dash fails at construction, without quoting the
    key; a header value alike, per client or per call."""
    with pytest.raises(ConfigurationError, match=r"API key .*\(U\+2013\) at position 2"):
        ClientConfig.from_arguments("sk\u2013abc", None, None, None, True)
    with pytest.raises(ConfigurationError, match="header 'x-team'"):
        ClientConfig.from_arguments("k", None, None, {"x-team": "caf\u00e9"}, True)
    config = ClientConfig.from_arguments("k", None, None, None, True)
    with pytest.raises(ConfigurationError, match="header 'x-note'"):
        config.call("m", [], {}, headers={"x-note": "\u2603"})
    with pytest.raises(ConfigurationError) as info:
        ClientConfig.from_arguments("sk\u2013secret", None, None, None, True)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "header 'x-n' must be a string, not int"),
        ("a\r\nx-admin: 1", r"'\\r' \(U\+000D\) at position 1"),
        ("trace\n", r"'\\n' \(U\+000A\) at position 5"),
        (" padded", "starts or ends with whitespace"),
    ],
)
def test_a_header_value_http_cannot_carry_fails_at_construction(
    value: object, message: str
) -> None:
    """A non-string value, a CR or LF (which would end the header) or padding reached the
    transport, which called it a connection failure, retried it 4 times, and quoted it."""
    with pytest.raises(ConfigurationError, match=message):
        ClientConfig.from_arguments("k", None, None, {"x-n": value}, True)  # type: ignore[dict-item]


def test_a_tab_inside_a_header_value_is_sent_as_it_is() -> None:
    """HTTP allows a tab between the visible characters of a value (RFC 9110 5.5): it is not
    refused like a control character, and reaches the server unchanged."""
    transport = MockTransport([MockResponse(chunks=sse_body("ok"))])
    client = Client(api_key="k", transport=transport, headers={"x-note": "a\tb"})
    assert "ok" == client.chat.complete(model="m", messages=[]).text
    assert "a\tb" == transport.requests[0].header("x-note")


def test_whitespace_around_an_api_key_is_not_part_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key read from a secrets file keeps its newline, which was sent (and quoted in the
    error) or refused deep in a transport; a key inside still fails, unquoted."""
    monkeypatch.setenv("HOLYSHEEP_API_KEY", "sk-from-file\n")
    assert "sk-from-file" == ClientConfig.from_arguments(None, None, None, None, True).api_key
    with pytest.raises(ConfigurationError, match="HOLYSHEEP_API_KEY"):
        ClientConfig.from_arguments(" \n", None, None, None, True)
    with pytest.raises(ConfigurationError) as info:
        ClientConfig.from_arguments("sk-se\ncret", None, None, None, True)
    assert "cret" not in str(info.value)


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("https://gw.example/v1/", "https://gw.example/v1/chat/completions"),
        (" https://gw.example/v1\n", "https://gw.example/v1/chat/completions"),
        ("https://gw.example/v1/chat/completions", "https://gw.example/v1/chat/completions"),
        (
            "https://gw.example/v1?api-version=2",
            "https://gw.example/v1/chat/completions?api-version=2",
        ),
        # Relative: joined to the base URL of a transport's own client (httpx's `base_url`).
        ("/", "/chat/completions"),
        ("/chat/completions", "/chat/completions"),
        ("/v1/", "/v1/chat/completions"),
    ],
)
def test_the_base_url_is_read_as_people_write_it(given: str, url: str) -> None:
    """A trailing slash or newline, the whole endpoint pasted, or a query string: each sent
    to a URL that does not exist (`/v1%20%0A/...`, `/chat/completions/chat/completions`, the
    query in the middle of the path)."""
    config = ClientConfig.from_arguments("k", given, None, None, True)
    assert url == config.call("m", [], {}).start_attempt(0.0).request.url


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("api.holysheep.ai/v1", "needs http:// or https://"),
        ("localhost:8000/v1", "needs http:// or https://"),
        ("ftp://x/v1", "needs http:// or https://"),
        ("http://127.0.0.1:99999/v1", "is not a valid URL: Port out of range"),
        ("http://[::1/v1", "is not a valid URL"),
        ("https:///v1", "has no host"),
        # Nothing after the scheme: it said the URL needed the http:// it had.
        ("http://", "^base_url 'http://' has no host"),
        ("https:///", "^base_url 'https:///' has no host"),
    ],
)
def test_a_base_url_the_clients_cannot_use_is_a_clear_error(given: str, message: str) -> None:
    """Without a scheme, a transport reported it as a connection failure, retried; a port out
    of range or an unclosed IPv6 bracket reached httpx, which raised its own exceptions."""
    with pytest.raises(ConfigurationError, match=message):
        ClientConfig.from_arguments("k", given, None, None, True)


def test_a_base_url_error_never_quotes_a_password() -> None:
    """Credentials in the URL are masked in the message, as header values are never quoted."""
    with pytest.raises(ConfigurationError) as info:
        ClientConfig.from_arguments("k", "https://user:s3cret@gw:99999/v1", None, None, True)
    assert "s3cret" not in str(info.value)
    assert "https://***@gw:99999/v1" in str(info.value)


def test_stream_false_is_refused_and_stream_options_keep_usage() -> None:
    """`stream=False` sent a body the API refuses (and the fake upstream answered with JSON,
    reported as a wrong content type); a caller's `stream_options` replaced `include_usage`,
    so usage, and with it exact cost, went missing."""
    config = ClientConfig.from_arguments("k", None, None, None, True)
    with pytest.raises(ConfigurationError, match="stream=False: holysheep always streams"):
        config.call("m", [], {"stream": False})
    call = config.call("m", [], {"stream": True, "stream_options": {"continuous_usage": True}})
    body = json.loads(call.start_attempt(0.0).request.content)
    assert {"include_usage": True, "continuous_usage": True} == body["stream_options"]
    none = config.call("m", [], {"stream_options": None})
    assert {"include_usage": True} == json.loads(none.start_attempt(0.0).request.content)[
        "stream_options"
    ]


def test_stream_options_that_are_not_an_object_are_sent_for_the_server_to_judge() -> None:
    """Only an object can take `include_usage`; anything else is the caller's, sent as
    given (the API refuses it with a 400 naming the field), not silently replaced."""
    transport = MockTransport([MockResponse(chunks=sse_body("ok"))])
    Client(api_key="k", transport=transport).chat.complete(
        model="m", messages=[], stream_options=["include_usage"]
    )
    assert ["include_usage"] == json.loads(transport.requests[0].content)["stream_options"]


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ("extra_body", "pass its keys as keyword arguments"),
        ("extra_query", "put the query string in base_url"),
        ("max_retries", r"retry=RetryPolicy\(attempts=max_retries \+ 1\)"),
    ],
)
def test_openai_sdk_options_are_refused_with_the_holysheep_way(option: str, hint: str) -> None:
    """Code ported from the openai SDK sent these in the JSON body, which the local upstream
    accepted and the API refuses: the mistake showed only in production."""
    config = ClientConfig.from_arguments("k", None, None, None, True)
    with pytest.raises(
        ConfigurationError, match=f"{option}= is an option of the openai SDK.*{hint}"
    ):
        config.call("m", [], {option: {"seed": 1} if option.startswith("extra") else 2})


def test_the_token_reservation_counts_every_choice_and_the_tool_definitions() -> None:
    """`n=4` reserved one choice's `max_tokens`, and 4,000 characters of tool schema nothing:
    the limiter let through what the gateway then refused with 429s."""
    config = ClientConfig.from_arguments("k", None, None, None, True)
    plain = config.call("m", [], {"max_tokens": 50}, limited=True)
    four = config.call("m", [], {"max_tokens": 50, "n": 4}, limited=True)
    tools = [{"type": "function", "function": {"name": "f", "description": "x" * 4000}}]
    with_tools = config.call("m", [], {"max_tokens": 50, "tools": tools}, limited=True)
    assert (50, 200) == (plain.cost, four.cost)
    assert 1000 < with_tools.prompt_cost < 1100
    assert with_tools.cost == with_tools.prompt_cost + 50


def test_env_vars_configure_key_and_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOLYSHEEP_API_KEY and HOLYSHEEP_BASE_URL are read; the default URL is the gateway."""
    monkeypatch.setenv("HOLYSHEEP_API_KEY", "sk-env")
    monkeypatch.delenv("HOLYSHEEP_BASE_URL", raising=False)
    config = ClientConfig.from_arguments(None, None, None, None, True)
    assert ("sk-env", "https://api.holysheep.ai/v1") == (config.api_key, config.base_url)
    monkeypatch.setenv("HOLYSHEEP_BASE_URL", "http://127.0.0.1:9/v1")
    assert (
        "http://127.0.0.1:9/v1"
        == ClientConfig.from_arguments(None, None, None, None, True).base_url
    )


def test_without_an_api_key_no_authorization_header_is_sent() -> None:
    """A gateway that needs no key (a local server) gets no `Authorization: Bearer` at all."""
    exchange = Exchange(
        url="http://127.0.0.1:1/v1/chat/completions",
        api_key=None,
        body={"model": "m", "messages": []},
        timeouts=Timeouts(),
    )
    assert [] == [value for name, value in exchange.request.headers if name == "authorization"]


def test_a_clean_stream_accumulates_and_measures() -> None:
    """Bytes in, chunks out, stats from the driver's timestamps."""
    exchange = make()
    exchange.start(100.0)
    assert "stream" == exchange.on_headers(200, SSE, 100.1)
    pieces = sse_body("Hel", "lo")
    body = b"".join(pieces)
    hel = len(pieces[0]) + len(pieces[1])  # the role chunk and the first content
    chunks = (
        exchange.on_data(body[:10], 100.2)
        + exchange.on_data(body[10:hel], 100.5)
        + exchange.on_data(body[hel:], 100.75)
    )
    exchange.on_eof(101.0)
    assert "Hello" == "".join(c.text for c in chunks)
    stats = exchange.stats(200.0)
    assert (pytest.approx(0.5), pytest.approx(1.0), 2, True) == (
        stats.ttft,
        stats.duration,
        stats.tokens,
        stats.tokens_estimated,
    )
    assert ("req_server", len(body)) == (stats.server_request_id, stats.bytes)
    # 2 tokens from the first content (100.5) to the last chunk with a delta (100.75).
    assert stats.tokens_per_s == pytest.approx(8.0)
    assert "ttft 500 ms" in stats.summary()


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["I", " am", " ok"], 3),  # a chunk a token, as OpenAI streams
        (["x" * 40, "y" * 40], 20),  # a gateway batching tokens: four characters a token
        (["羊", "很", "温", "顺"], 4),  # a character a token: the chunks count
    ],
)
def test_without_usage_the_token_count_is_the_larger_estimate(
    pieces: list[str], expected: int
) -> None:
    """No usage from the server: the larger of the content chunks and the text's length over
    four (the chunks alone said 2 tokens for 80 characters, while the cost was priced at 20)."""
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    exchange.on_data(b"".join(sse_body(*pieces)), 0.2)
    exchange.on_eof(0.3)
    stats = exchange.stats(1.0)
    assert (expected, True) == (stats.tokens, stats.tokens_estimated)


def _event(choices: list[dict[str, Any]]) -> bytes:
    return b"data: " + json.dumps({"id": "c", "choices": choices}).encode() + b"\n\n"


@pytest.mark.parametrize(
    ("events", "written"),
    [
        # 300 chunks of reasoning, then a short answer: 1 token, from choice 0's content.
        (
            [_event([{"index": 0, "delta": {"reasoning_content": "think "}}])] * 300
            + [_event([{"index": 0, "delta": {"content": "Yes."}}])],
            "Yes." + "think " * 300,  # (output_text: the text, then the reasoning)
        ),
        # Three choices: choice 0's text alone was a third of it.
        (
            [
                _event([{"index": i, "delta": {"content": "word " * 20}} for i in range(3)]),
            ],
            "word " * 60,
        ),
        # A tool call and no text: 0 tokens, so no rate either.
        (
            [
                _event(
                    [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "index": 0,
                                        "id": "call_1",
                                        "type": "function",
                                        "function": {
                                            "name": "get_weather",
                                            "arguments": '{"city": "Paris"}',
                                        },
                                    }
                                ]
                            },
                        }
                    ]
                )
            ],
            'get_weather{"city": "Paris"}',
        ),
    ],
    ids=["reasoning", "three choices", "tool call"],
)
def test_without_usage_the_token_estimate_counts_everything_the_model_wrote(
    events: list[bytes], written: str
) -> None:
    """What `Completion.cost` and the rate limiter's reckoning count, the stats count too: the
    estimate was choice 0's content, and the CLI priced the output at it."""
    exchange = make(n=3)
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    for at, event in enumerate(events):
        exchange.on_data(event, 0.2 + at / 1000)
    exchange.on_data(b"data: [DONE]\n\n", 0.9)
    exchange.on_eof(1.0)
    stats = exchange.stats(1.0)
    assert written == exchange.completion.output_text
    assert (estimate_tokens(written), True) == (stats.tokens, stats.tokens_estimated)


def test_without_usage_a_rate_limiter_is_charged_for_everything_the_model_wrote() -> None:
    """A tokens-per-minute budget settles a stream with no usage at its estimate: it was
    choice 0's content (1 token here), so 300 chunks of reasoning cost the budget nothing."""
    call = make_call()
    call.prompt_cost = 7
    exchange = call.start_attempt(0.0)
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    reasoning = _event([{"index": 0, "delta": {"reasoning_content": "think "}}])
    exchange.on_data(reasoning * 300 + _event([{"index": 0, "delta": {"content": "Yes."}}]), 0.2)
    exchange.on_data(b"data: [DONE]\n\n", 0.3)
    exchange.on_eof(0.4)
    assert 7 + estimate_tokens("Yes." + "think " * 300) == call.tokens_used(exchange)


def test_the_token_rate_runs_from_the_first_chunk_to_the_last_not_to_the_end_of_the_body() -> None:
    """A server that holds the body open after `[DONE]` (the clients wait up to a second for
    its end) made the rate a sixth of what it was; an answer read in one piece has none."""
    role, first, second, finish, done = sse_body("Hello", " world")
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    exchange.on_data(role + first, 0.2)
    exchange.on_data(second, 0.3)
    exchange.on_data(finish + done, 0.4)
    exchange.on_eof(1.4)  # a second of keep-alives after [DONE]
    stats = exchange.stats(2.0)
    assert (pytest.approx(0.2), pytest.approx(1.4)) == (stats.generating, stats.duration)
    assert pytest.approx(stats.tokens / 0.2) == stats.tokens_per_s

    whole = make()
    whole.start(0.0)
    whole.on_headers(200, SSE, 0.1)
    whole.on_data(b"".join(sse_body("Hello", " world")), 0.2)
    whole.on_eof(0.3)
    assert (0.0, None) == (whole.stats(1.0).generating, whole.stats(1.0).tokens_per_s)


def test_the_token_rate_of_a_retried_call_reaches_back_to_the_earlier_attempts() -> None:
    """Before the new attempt's first content, the last content is the broken attempt's."""
    call = make_call(on_interrupt="restart")
    broken = call.start_attempt(0.0)
    broken.start(0.0)
    broken.on_headers(200, SSE, 0.1)
    role, first, second, _finish, _done = sse_body("Hello", " world")
    broken.on_data(role + first, 0.2)
    broken.on_data(second, 0.5)
    error = broken.interrupted(APIConnectionError("reset"), 0.6)
    assert isinstance(call.failed(error, 0.6, None), Retry)
    retry = call.start_attempt(0.7)
    retry.start(0.7)
    assert pytest.approx(0.3) == retry.stats(0.8, call).generating
    assert 3 == retry.stats(0.8, call).events  # the role chunk and two of content


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, InternalServerError),
        (418, APIStatusError),
    ],
)
def test_error_statuses_map_to_typed_errors(status: int, cls: type[APIStatusError]) -> None:
    """Each status class has its error, quoting the server's message and request id."""
    exchange = make()
    exchange.start(0.0)
    assert "read_error_body" == exchange.on_headers(status, {"x-request-id": "req_9"}, 0.1)
    body = {"error": {"message": "nope", "type": "invalid_request_error", "code": "bad"}}
    exc = exchange.error_for_body(json.dumps(body).encode())
    assert type(exc) is cls
    assert isinstance(exc, APIStatusError)
    assert (status, "req_9", "invalid_request_error", "bad") == (
        exc.status_code,
        exc.request_id,
        exc.type,
        exc.code,
    )
    assert f"HTTP {status}" in str(exc)
    assert "nope" in str(exc)
    assert "request_id=req_9" in str(exc)


def test_rate_limit_error_carries_retry_after() -> None:
    """429 parses Retry-After (and retry-after-ms, which wins)."""
    exchange = make()
    exchange.on_headers(429, {"retry-after": "7"}, 0.0)
    exc = exchange.error_for_body(b"")
    assert isinstance(exc, RateLimitError)
    assert (7.0, "(empty body)") == (exc.retry_after, exc.message.split(": ", 1)[1])


def test_an_error_body_whose_error_is_a_string_quotes_that_string() -> None:
    """`{"error": "..."}` (some gateways' shape): the string is the message, with no type."""
    exchange = make()
    exchange.on_headers(403, {}, 0.0)
    exc = exchange.error_for_body(b'{"error": "key disabled"}')
    assert isinstance(exc, PermissionDeniedError)
    assert ("HTTP 403 from http://127.0.0.1:1/v1/chat/completions: key disabled", None) == (
        exc.message,
        exc.type,
    )


@pytest.mark.parametrize("body", [b'{"error": null}', b'{"error": 42}', b'{"error": ["no"]}'])
def test_an_error_body_whose_error_is_no_object_or_string_is_quoted_as_it_came(
    body: bytes,
) -> None:
    """No message to pick out: the body itself is the message, and the parsed JSON is kept."""
    exchange = make()
    exchange.on_headers(500, {}, 0.0)
    exc = exchange.error_for_body(body)
    assert (f"HTTP 500 from http://127.0.0.1:1/v1/chat/completions: {body.decode()}", None) == (
        exc.message,
        exc.type,
    )
    assert json.loads(body) == exc.body


def test_non_json_error_body_is_quoted() -> None:
    """A plain-text or HTML error body is shown as it is, truncated."""
    exchange = make()
    exchange.on_headers(502, {}, 0.0)
    exc = exchange.error_for_body(b"<html>Bad Gateway</html>" + b"x" * 1000)
    assert "<html>Bad Gateway</html>" in str(exc)
    assert len(str(exc)) < 500


def test_wrong_content_type_on_200_is_an_error_with_the_body_start() -> None:
    """A proxy's HTML page with 200 never becomes an empty success."""
    exchange = make()
    assert "read_error_body" == exchange.on_headers(200, {"content-type": "text/html"}, 0.0)
    exc = exchange.error_for_body(b"<html><h1>502 Bad Gateway</h1></html>")
    assert isinstance(exc, UnexpectedContentTypeError)
    assert "text/html" in str(exc)
    assert "502 Bad Gateway" in str(exc)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
        ({"retry-after": " 7 "}, 7.0),
        ({}, None),
        # Not delta-seconds, though float() takes them all: no wait named, backoff applies.
        ({"retry-after": "-4"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1_0"}, None),
        ({"retry-after": "\u0663"}, None),  # an Arabic-Indic digit
        ({"retry-after": "1e3"}, None),
        ({"retry-after-ms": "nan", "retry-after": "10"}, 10.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """Delta-seconds forms are read; dates are left to a policy with a wall clock."""
    assert expected == parse_retry_after(headers)


@given(st.text(max_size=12))
def test_parse_retry_after_is_never_negative_or_not_finite(value: str) -> None:
    seconds = parse_retry_after({"retry-after": value})
    assert seconds is None or 0 <= seconds < math.inf


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0, 0.0, float("inf"), "5", True])
@pytest.mark.parametrize("name", ["connect", "ttft", "idle", "total"])
def test_timeouts_refuse_values_that_are_not_a_positive_number(name: str, value: Any) -> None:
    """NaN silently disabled a limit (no comparison with it is true), zero or less fired at
    once: both are configuration mistakes, said at construction."""
    with pytest.raises(ConfigurationError, match=f"Timeouts: {name} must be"):
        Timeouts(**{name: value})


def test_a_timeout_after_the_head_carries_its_status() -> None:
    exchange = make(Timeouts(connect=1, ttft=5, idle=2, total=100))
    exchange.start(0.0)
    exchange.on_headers(200, {"content-type": "text/event-stream"}, 0.5)
    error = exchange.timeout_error(6.0)
    assert isinstance(error, FirstTokenTimeoutError)
    assert 200 == error.status_code


def test_deadlines_move_from_connect_to_ttft_to_idle() -> None:
    """Before the head: connect; before content: ttft; then idle from the last content."""
    exchange = make(Timeouts(connect=1, ttft=5, idle=2, total=100))
    assert exchange.deadline() is None
    exchange.start(10.0)
    assert (11.0, "connect") == exchange.deadline()
    exchange.on_headers(200, SSE, 10.5)
    assert (15.0, "ttft") == exchange.deadline()
    exchange.on_data(b": keep-alive\n\n", 14.0)
    assert (15.0, "ttft") == exchange.deadline()  # comments prove nothing
    body = sse_body("a")
    exchange.on_data(body[0], 14.5)  # the role chunk carries no delta
    assert (15.0, "ttft") == exchange.deadline()
    exchange.on_data(body[1], 14.8)
    assert (16.8, "idle") == exchange.deadline()
    exchange.on_data(b": keep-alive\n\n", 16.0)
    assert (16.8, "idle") == exchange.deadline()


def test_total_deadline_wins_when_sooner() -> None:
    """The total budget caps every phase."""
    exchange = make(Timeouts(connect=None, ttft=None, idle=50, total=3))
    exchange.start(0.0)
    assert (3.0, "total") == exchange.deadline()
    assert make(Timeouts(None, None, None, None)).deadline() is None


def test_timeout_errors_name_the_timeout_and_keep_the_partial() -> None:
    """The error says which timeout fired, after how long, with the text so far."""
    exchange = make(Timeouts(connect=1, ttft=5, idle=2, total=100))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    assert exchange.timeout_error(4.9) is None
    ttft = exchange.timeout_error(5.0)
    assert isinstance(ttft, FirstTokenTimeoutError)
    assert (5, 5.0, "ttft") == (ttft.limit, ttft.elapsed, ttft.timeout)
    assert isinstance(ttft, TimeoutError)  # also a builtin TimeoutError
    exchange.on_data(b"".join(sse_body("par")[:2]), 1.0)
    idle = exchange.timeout_error(3.5)
    assert isinstance(idle, IdleTimeoutError)
    assert "no new content within 2 s" in str(idle)
    assert idle.completion is not None
    assert "par" == idle.completion.text


def test_total_timeout_error() -> None:
    """`total` fires even while content flows."""
    exchange = make(Timeouts(total=1))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.0)
    exchange.on_data(b"".join(sse_body("a")[:2]), 0.9)
    assert isinstance(exchange.timeout_error(1.0), TotalTimeoutError)


def test_a_stream_without_content_has_no_rate_and_says_so() -> None:
    """No first token yet: no `ttft` and no tokens/s, shown as "-" in the summary."""
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    stats = exchange.stats(0.5)
    assert (None, None) == (stats.ttft, stats.tokens_per_s)
    expected = "ttft - | ~0 tokens in 0.50 s | - tokens/s | 0 events, 0 bytes | attempts 1"
    assert f"{expected} | request req_server" == stats.summary()


def test_a_timeout_from_value_sets_connect_ttft_and_idle_but_not_total() -> None:
    """`timeout=5` bounds each wait, not the whole stream: `total` keeps its default."""
    assert Timeouts(connect=5, ttft=5, idle=5, total=1800) == Timeouts.from_value(5)


def test_a_later_attempt_may_wait_for_its_head_only_what_is_left_of_total() -> None:
    """`total` counts from the first attempt's send; without a `total` the request's
    timeouts are left as they are."""
    bounded = make(Timeouts(total=100))
    bounded.continues(0.0)
    bounded.start(30.0)
    unbounded = make(Timeouts(total=None))
    unbounded.continues(0.0)
    unbounded.start(30.0)
    assert (70.0, Timeouts(total=None)) == (
        bounded.request.timeouts.total,
        unbounded.request.timeouts,
    )


def test_a_read_that_fails_after_a_deadline_passed_is_that_timeout() -> None:
    """The read broke, but the first token was already overdue: the caller learns about the
    timeout (what went wrong first), not about a cut stream."""
    exchange = make(Timeouts(ttft=5))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    exc = exchange.interrupted(ConnectionResetError("reset by peer"), 6.0)
    assert isinstance(exc, FirstTokenTimeoutError)
    assert (5, 6.0) == (exc.limit, exc.elapsed)


def test_a_break_inside_the_event_after_the_finish_is_not_a_complete_answer() -> None:
    """The finish came, then the connection broke in the middle of the next event (the usage,
    likely): that is a cut stream, as the same end of the body would be."""
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    finished = b"".join(sse_body("Hi")[:3])  # role, "Hi", the finish; no usage, no [DONE]
    exchange.on_data(finished + b'data: {"usage": {"prompt_', 0.2)
    assert not exchange.complete_at_break(APIConnectionError("reset"), 0.3)
    clean = make()
    clean.start(0.0)
    clean.on_headers(200, SSE, 0.1)
    clean.on_data(finished, 0.2)
    assert clean.complete_at_break(APIConnectionError("reset"), 0.3)


def test_an_in_band_error_keeps_its_own_numeric_code_as_its_status() -> None:
    """An error event with `"code": 529` reports 529, not the 200 the stream started with;
    the request id is the server's."""
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    body = b'data: {"error": {"message": "overloaded", "code": 529}}\n\n'
    with pytest.raises(StreamError) as info:
        exchange.on_data(body, 0.2)
    assert (529, "req_server") == (info.value.status_code, info.value.request_id)


def test_a_resume_replaying_only_a_non_chunk_is_not_checked_for_the_completion_id() -> None:
    """A replayed `[DONE]` under a delivered id carries no completion id to compare: the
    stream ends, as it says."""
    exchange = make()
    exchange.track_event_ids(skip=frozenset({"1", "2"}), expect_id="chatcmpl-A")
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    assert [] == exchange.on_data(b"id: 2\ndata: [DONE]\n\n", 0.2)
    assert exchange.accumulator.done


def test_a_replayed_event_that_only_mentions_error_is_dropped_as_a_replay() -> None:
    """An event under a delivered id whose data says "error" but is no JSON is no in-band
    error: it is skipped like the other replays (under a new id, it is a protocol error)."""
    exchange = make()
    exchange.track_event_ids(skip=frozenset({"1"}))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    replay = b'id: 1\ndata: {"error" oops\n\n'
    assert [] == exchange.on_data(replay, 0.2)
    with pytest.raises(RemoteProtocolError):
        exchange.on_data(replay.replace(b"id: 1", b"id: 2"), 0.3)


def test_interrupted_read_becomes_incomplete_stream_with_partial() -> None:
    """A connection that breaks mid-stream loses nothing that arrived."""
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.0)
    exchange.on_data(b"".join(sse_body("Hello", "wor")[:3]), 0.1)
    exc = exchange.interrupted(ConnectionResetError("reset by peer"), 0.2)
    assert isinstance(exc, IncompleteStreamError)
    assert "reset by peer" in str(exc)
    assert exc.completion is not None
    assert "Hellowor" == exc.completion.text
    assert "req_server" == exc.request_id


def test_eof_without_end_raises_with_request_id() -> None:
    """A body that stops early raises IncompleteStreamError naming the request."""
    exchange = make()
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.0)
    exchange.on_data(sse_body("a")[1], 0.1)
    with pytest.raises(IncompleteStreamError) as info:
        exchange.on_eof(0.2)
    assert "req_server" == info.value.request_id


@given(st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=20))
def test_idle_deadline_is_always_last_progress_plus_idle(gaps: list[float]) -> None:
    """Whatever the timing, the idle deadline tracks the latest content exactly."""
    exchange = make(Timeouts(connect=None, ttft=None, idle=2.0, total=None))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.0)
    now = 0.0
    content = sse_body("x")[1]
    for gap in gaps:
        now += gap
        exchange.on_data(content, now)
    assert (now + 2.0, "idle") == exchange.deadline()


def test_resumed_restarts_ttft_and_idle_but_not_total() -> None:
    """After the caller was away past a deadline, ttft and idle run again from its return;
    the error then says how long it waited since that return."""
    exchange = make(Timeouts(connect=1, ttft=5, idle=2, total=100))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.1)
    exchange.resumed(7.0)  # came to iterate after ttft had passed
    assert (12.0, "ttft") == exchange.deadline()
    exchange.on_data(b"".join(sse_body("a")[:2]), 7.5)
    assert (9.5, "idle") == exchange.deadline()  # content is later than the return
    exchange.resumed(20.0)
    assert (22.0, "idle") == exchange.deadline()
    error = exchange.timeout_error(22.5)
    assert isinstance(error, IdleTimeoutError)
    assert 2.5 == error.elapsed
    assert exchange.resumed(99.5) is None
    assert (100.0, "total") == exchange.deadline()
    assert isinstance(exchange.resumed(100.5), TotalTimeoutError)  # ran out meanwhile


@given(
    st.lists(
        st.tuples(st.sampled_from(["data", "back"]), st.floats(min_value=0, max_value=5)),
        max_size=20,
    )
)
def test_idle_deadline_runs_from_the_later_of_content_and_return(
    steps: list[tuple[str, float]],
) -> None:
    exchange = make(Timeouts(connect=None, ttft=None, idle=2.0, total=None))
    exchange.start(0.0)
    exchange.on_headers(200, SSE, 0.0)
    content = sse_body("x")[1]
    exchange.on_data(content, 0.0)
    now = last_data = last_back = 0.0
    for step, gap in steps:
        now += gap
        if step == "data":
            exchange.on_data(content, now)
            last_data = now
        else:
            exchange.resumed(now)
            last_back = now
    assert (max(last_data, last_back) + 2.0, "idle") == exchange.deadline()


def test_an_x_request_id_header_is_the_request_id() -> None:
    """Set as a header, the id is still the one stats and errors report; `request_id` wins."""
    common: dict[str, Any] = {
        "url": "http://127.0.0.1:1/v1/chat/completions",
        "api_key": "k",
        "body": {"model": "m", "messages": []},
        "timeouts": Timeouts(),
    }
    by_header = Exchange(**common, headers={"X-Request-ID": "hdr-2"})
    assert "hdr-2" == by_header.request_id
    assert ("x-request-id", "hdr-2") in by_header.request.headers
    both = Exchange(**common, headers={"X-Request-ID": "hdr-2"}, request_id="arg-1")
    assert "arg-1" == both.request_id
    assert [("x-request-id", "arg-1")] == [
        pair for pair in both.request.headers if pair[0] == "x-request-id"
    ]


def test_core_imports_no_io_libraries() -> None:
    """The sans-IO core loads no socket, HTTP or async library (checked in a fresh process)."""
    # attrs itself loads `platform` on Python 3.10, which loads subprocess and with it select:
    # what attrs loads is the baseline, and the core must add none of these to it.
    code = (
        "import sys, attrs; before = set(sys.modules); "
        "import holysheep; "
        "import holysheep._sse, holysheep._chat, holysheep._exchange; "
        "print(sorted({'socket', 'requests', 'httpx', 'anyio', 'trio', 'asyncio', 'urllib3', "
        "'select', 'selectors'} & (set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "[]" == result.stdout.strip()


def test_body_is_compact_utf8_json_whichever_encoder() -> None:
    """The body is the same bytes as the stdlib's compact, non-ASCII-keeping JSON, and what
    orjson refuses (a 70-bit integer, an integer key) is still sent, by the stdlib."""
    body = {"messages": [{"role": "user", "content": "Schäfchen 🐑"}], "temperature": 0.25}
    expected = json.dumps(
        {"model": "gpt-4.1", "messages": [], "stream": True, **body},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert expected == make(**body).request.content
    odd = make(seed=2**70, logit_bias={50256: -100})
    assert {"seed": 2**70, "logit_bias": {"50256": -100}}.items() <= json.loads(
        odd.request.content
    ).items()


def test_without_orjson_the_body_is_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson is optional (the `speedups` extra): without it the stdlib sends the same body."""
    body = {"messages": [{"role": "user", "content": "Schäfchen 🐑"}], "temperature": 0.25}
    with_orjson = make(**body).request.content
    monkeypatch.setattr(_exchange, "_orjson_dumps", None)
    assert with_orjson == make(**body).request.content
