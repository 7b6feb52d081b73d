"""The local upstream itself, over raw HTTP (http.client), and its command line."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from typing import Any

import attrs
import pytest

import holysheep
from holysheep.testing import Fault, UpstreamConfig, UpstreamProcess, raise_fd_limit, serve
from holysheep.testing._server import MAX_TOKENS


def post(
    port: int, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"content-type": "application/json", **(headers or {})},
        )
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def events(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


def test_stream_has_the_openai_shape() -> None:
    """Role chunk (with `refusal: null`), content chunks, finish chunk, usage chunk, [DONE];
    with include_usage every chunk but the last carries `usage: null`, as the API's do."""
    with serve(tokens=3) as upstream:
        status, headers, raw = post(
            upstream.port,
            {
                "model": "gpt-4.1",
                "messages": [],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    data = events(raw)
    assert (200, "text/event-stream") == (status, headers["content-type"])
    assert "[DONE]" == data[-1]
    chunks = [json.loads(d) for d in data[:-1]]
    assert {"role": "assistant", "content": "", "refusal": None} == chunks[0]["choices"][0]["delta"]
    assert [None] * (len(chunks) - 1) == [c["usage"] for c in chunks[:-1]]
    assert 3 == sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert "stop" == chunks[-2]["choices"][0]["finish_reason"]
    assert ([], 3) == (chunks[-1]["choices"], chunks[-1]["usage"]["completion_tokens"])
    assert {"chat.completion.chunk"} == {c["object"] for c in chunks}


def test_non_stream_matches_the_streamed_text() -> None:
    """Without `stream`, one chat.completion with the same text, shaped as the API's."""
    with serve(tokens=12) as upstream:
        _, _, raw = post(upstream.port, {"model": "m", "messages": []})
        _, _, streamed = post(upstream.port, {"model": "m", "messages": [], "stream": True})
    completion = json.loads(raw)
    choice = completion["choices"][0]
    assert (None, None, "fp_mock") == (
        choice["logprobs"],
        choice["message"]["refusal"],
        completion["system_fingerprint"],
    )
    text = "".join(
        json.loads(d)["choices"][0]["delta"].get("content", "") for d in events(streamed)[:-1]
    )
    assert ("chat.completion", text) == (
        completion["object"],
        completion["choices"][0]["message"]["content"],
    )


def test_routes_and_bad_bodies_answer_in_openai_error_shape() -> None:
    """404 for unknown paths, 400 for a body without messages; /v1/models lists models."""
    with serve() as upstream:
        status, _, raw = post(upstream.port, {"model": "m"})
        connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
        connection.request("GET", "/v1/models")
        models = json.loads(connection.getresponse().read())
        connection.request("GET", "/nope")
        missing = connection.getresponse()
        missing_body = json.loads(missing.read())
        connection.close()
    assert (400, "invalid_request_error") == (status, json.loads(raw)["error"]["type"])
    assert "gpt-4.1" in {m["id"] for m in models["data"]}
    assert (404, "no route for GET /nope") == (missing.status, missing_body["error"]["message"])


def get(port: int, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_models_are_listed_and_retrieved_as_the_api_does() -> None:
    """Each model has its `created` (an int, as the API's), and `/v1/models/{id}` answers the
    model object (it was a 404), or the API's 404 for a model that does not exist."""
    with serve() as upstream:
        _, listed = get(upstream.port, "/v1/models")
        one = get(upstream.port, "/v1/models/claude-sonnet-4.5")
        missing = get(upstream.port, "/v1/models/gpt-9")
    assert {("model", "holysheep-mock", True)} == {
        (m["object"], m["owned_by"], type(m["created"]) is int) for m in listed["data"]
    }
    by_id = {m["id"]: m for m in listed["data"]}
    assert (200, by_id["claude-sonnet-4.5"]) == one
    assert (404, "invalid_request_error", "model_not_found") == (
        missing[0],
        missing[1]["error"]["type"],
        missing[1]["error"]["code"],
    )
    assert "The model 'gpt-9' does not exist" in missing[1]["error"]["message"]


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` as it is; everything the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(request)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    return answer


def test_expect_100_continue_is_answered_before_the_body() -> None:
    """curl sends `Expect: 100-continue` with bodies over 1 MB and waits a second for the
    go-ahead, which never came."""
    body = json.dumps({"messages": [], "n": 1}).encode()
    with (
        serve(tokens=2) as upstream,
        socket.create_connection(("127.0.0.1", upstream.port)) as sock,
    ):
        sock.settimeout(0.5)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        go_ahead = sock.recv(65536)
        sock.settimeout(5)
        sock.sendall(body)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    assert b"HTTP/1.1 100 Continue\r\n\r\n" == go_ahead
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("framing", "message"),
    [
        (b"Content-Length: abc", "invalid Content-Length header: 'abc'"),
        (b"Content-Length: -5", "invalid Content-Length header: '-5'"),
        (
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
            "invalid chunked request body: chunk size 'zz' is not a hexadecimal number",
        ),
    ],
)
def test_a_body_of_unreadable_length_gets_a_400_and_the_connection_closes(
    framing: bytes, message: str
) -> None:
    """A 400 in the API's error shape, then the close (the next request cannot be found); the
    handler crashed, the client got nothing and the server logged a ValueError."""
    with serve() as upstream:
        answer = raw_exchange(
            upstream.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing
        )
        after, _, _ = post(upstream.port, {"messages": []})
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    error = json.loads(body)["error"]
    assert (message, "invalid_request_error", None, None) == (
        error["message"],
        error["type"],
        error["param"],
        error["code"],
    )
    assert 200 == after


def test_routes_are_exact_as_the_gateways_are() -> None:
    """Any path ending in /chat/completions was answered, so a client that dropped `/v1`
    passed every test here and got a 404 from the real gateway; the absolute form a proxy is
    sent (`POST http://host/v1/...`) is the same route."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    answers = []
    with serve(tokens=1) as upstream:
        for target in (
            "/chat/completions",
            "/api/chat/completions",
            "/v1/chat/completions/",
            f"http://127.0.0.1:{upstream.port}/v1/chat/completions",
        ):
            connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
            connection.request("POST", target, body=body)
            response = connection.getresponse()
            response.read()
            connection.close()
            answers.append(response.status)
    assert [404, 404, 200, 200] == answers


def test_zero_tokens_stream_an_empty_completion() -> None:
    """`tokens=0`: no content chunk, but the finish, the usage and [DONE] all come."""
    with serve(tokens=0) as upstream:
        _, _, raw = post(
            upstream.port,
            {
                "model": "m",
                "messages": [],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    chunks = [json.loads(d) for d in events(raw)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert [{"role": "assistant", "content": "", "refusal": None}, {}] == deltas
    assert ("stop", 0) == (
        chunks[-2]["choices"][0]["finish_reason"],
        chunks[-1]["usage"]["completion_tokens"],
    )
    assert [] == UpstreamConfig(tokens=0).token_list(None)


@pytest.mark.parametrize(
    ("body", "header", "param", "code", "message"),
    [
        ({"messages": ["hi"]}, None, "messages[0]", "invalid_type", "expected an object"),
        ({"messages": "hi"}, None, "messages", "invalid_type", "expected an array"),
        ({"messages": [], "max_tokens": 0}, None, "max_tokens", "integer_below_min_value", ">= 1"),
        ({"messages": [], "max_completion_tokens": 0}, None, "max_completion_tokens", None, ">= 1"),
        ({"messages": []}, "{bad", None, None, "X-Mock-Config is not valid JSON"),
        ({"messages": []}, "[1]", None, None, "X-Mock-Config must be a JSON object"),
        ({"messages": []}, '{"tokenz": 3}', None, None, "unknown UpstreamConfig field 'tokenz'"),
        ({"messages": []}, '{"tokens": -1}', None, None, "tokens must be None or a whole number"),
        # 2.5 tokens streamed 3; a million and one is past the bound; true is not a count.
        ({"messages": []}, '{"tokens": 2.5}', None, None, "from 0 to 1,000,000, got 2.5"),
        ({"messages": []}, '{"tokens": 1000001}', None, None, "to 1,000,000, got 1000001"),
        ({"messages": []}, '{"tokens": true}', None, None, "to 1,000,000, got True"),
        ({"messages": []}, '{"fault": "bogus"}', None, None, "unknown fault 'bogus'"),
        # Values a field refuses: they crashed the handler mid-response, or were taken as
        # another fault (a bogus kind behaved as invalid_json).
        ({"messages": []}, '{"ttft": "abc"}', None, None, "ttft must be a number of seconds"),
        ({"messages": []}, '{"tokens_per_s": "x"}', None, None, "tokens_per_s must be None"),
        ({"messages": []}, '{"text": 5}', None, None, "'text' must be <class 'str'>"),
        ({"messages": []}, '{"fault": {"kind": "bogus"}}', None, None, "'kind' must be in"),
        ({"messages": []}, '{"fault": {"kind": "drop", "after": "x"}}', None, None, "'after'"),
        ({"messages": [], "n": 0}, None, "n", "integer_below_min_value", ">= 1, but got 0"),
        ({"messages": [], "n": 9}, None, "n", "integer_above_max_value", "<= 8, but got 9"),
        ({"messages": [], "n": "2"}, None, "n", "invalid_type", "expected an integer"),
        ({"messages": [], "tools": {}}, None, "tools", "invalid_type", "expected an array"),
        ({"messages": [], "tools": []}, None, "tools", "empty_array", "empty array"),
        ({"messages": [], "tools": [{}]}, None, "tools[0].type", None, "'tools[0].type'"),
        (
            {"messages": [], "tools": [{"type": "function"}]},
            None,
            "tools[0].function",
            "missing_required_parameter",
            "Missing required parameter: 'tools[0].function'.",
        ),
        (
            {"messages": [], "tools": [{"type": "function", "function": {}}]},
            None,
            "tools[0].function.name",
            "missing_required_parameter",
            "'tools[0].function.name'",
        ),
        ({"messages": [], "tool_choice": "auto"}, None, "tool_choice", None, "only allowed when"),
        # Accepted, where the API refuses them: "yes" was taken as true, stream_options
        # without a stream ignored, and NaN (which Python's json reads) passed as a number.
        ({"messages": [], "stream": "yes"}, None, "stream", "invalid_type", "expected a boolean"),
        (
            {"messages": [], "stream": False, "stream_options": {"include_usage": True}},
            None,
            "stream_options",
            None,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ),
        (
            {"messages": [], "temperature": float("nan")},
            None,
            None,
            None,
            "We could not parse the JSON body of your request: NaN is not a JSON value",
        ),
        ({"messages": [], "top_p": float("-inf")}, None, None, None, "-Infinity is not a JSON"),
        (
            {"messages": [], "stream_options": True},
            None,
            "stream_options",
            "invalid_type",
            "object",
        ),
        (
            {
                "messages": [],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "mcp"},
            },
            None,
            "tool_choice.type",
            "invalid_value",
            "'function', 'custom' and 'allowed_tools'",
        ),
        (
            {
                "messages": [],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "always",
            },
            None,
            "tool_choice",
            "invalid_value",
            "'none', 'auto', and 'required'",
        ),
        (
            {
                "messages": [],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            None,
            "tool_choice",
            "invalid_value",
            "no function named 'g'",
        ),
        (
            {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "21"}]},
            None,
            "messages.[0].role",
            None,
            "must be a response to a preceeding message with 'tool_calls'",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
                    {"role": "user", "content": "and?"},
                ]
            },
            None,
            "messages.[0].role",
            None,
            "did not have response messages: call_1",
        ),
    ],
)
def test_bad_requests_get_a_400_in_openai_error_shape(
    body: dict[str, Any], header: str | None, param: str | None, code: str | None, message: str
) -> None:
    """What the real API refuses, and an X-Mock-Config that cannot apply, are answered with a
    400 naming the problem (they used to crash the handler and drop the connection); the
    server goes on serving."""
    with serve(tokens=2) as upstream:
        extra = {} if header is None else {"x-mock-config": header}
        status, _, raw = post(upstream.port, {"model": "m", "stream": True, **body}, extra)
        after, _, _ = post(upstream.port, {"model": "m", "messages": []})
    error = json.loads(raw)["error"]
    assert (400, "invalid_request_error", param) == (status, error["type"], error["param"])
    assert code is None or code == error["code"]
    assert message in error["message"]
    assert 200 == after


def test_enqueue_refuses_an_unknown_field() -> None:
    """A typo in a queued override fails in the test that wrote it, not in a request."""
    with serve() as upstream, pytest.raises(ValueError, match="'tokenz'; expected one of tokens"):
        upstream.enqueue({"tokens": 1}, {"tokenz": 1})


@pytest.mark.parametrize(
    ("fault", "status", "body"),
    [
        ("inband_error@1", 200, b'{"error": {"message": "That model is currently overloaded'),
        ("invalid_json@1", 200, b"{not json"),
        ("drop@1", None, None),
        ("stall@1", None, None),
        ("drop@3", 200, b'{"id": "chatcmpl-'),  # after the last of 3 tokens: no fault
    ],
)
def test_stream_faults_apply_to_non_stream_answers(
    fault: str, status: int | None, body: bytes | None
) -> None:
    """Without `stream`, a drop or stall leaves the request unanswered, and inband_error and
    invalid_json are the body; a fault after the last token does not fire."""
    with serve(tokens=3, fault=fault) as upstream:
        connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=0.5)
        connection.request("POST", "/v1/chat/completions", body=json.dumps({"messages": []}))
        try:
            response = connection.getresponse()
            answer: tuple[int | None, bytes | None] = (response.status, response.read())
        except (http.client.RemoteDisconnected, TimeoutError):
            answer = (None, None)
        finally:
            connection.close()
    assert (status, body) == (answer[0], answer[1] and answer[1][: len(body or b"")])


def test_an_inband_error_has_the_openai_shape_and_is_retryable() -> None:
    """{message, type, param, code}, with OpenAI's type for an overloaded model (it sent no
    `param` and Anthropic's `overloaded_error`); the client still takes it as transient."""
    with serve(tokens=3, fault="inband_error@1") as upstream:
        _, _, raw = post(upstream.port, {"messages": [], "stream": True})
        with (
            holysheep.Client(
                api_key="k", base_url=upstream.base_url, retry=holysheep.RetryPolicy.none()
            ) as client,
            pytest.raises(holysheep.StreamError) as info,
        ):
            client.chat.complete(model="m", messages=[])
    assert {
        "error": {
            "message": "That model is currently overloaded with other requests. You can retry"
            " your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    } == json.loads(events(raw)[-1])
    assert (True, "server_error") == (info.value.retryable, info.value.type)


def test_resume_continues_after_last_event_id() -> None:
    """With event ids, Last-Event-ID n resumes at event n+1 of the same sequence."""
    body = {"model": "m", "messages": [], "stream": True}
    pinned = {"completion_id": "chatcmpl-pinned", "created": 1764000000}
    with serve(tokens=6, event_ids=True, **pinned) as upstream:
        _, _, whole = post(upstream.port, body)
        _, _, rest = post(upstream.port, body, {"last-event-id": "3"})
    assert events(whole)[4:] == events(rest)


def test_a_server_wide_drop_lets_a_resumed_stream_finish() -> None:
    """`drop@5` counts each response's own content events and spares a response with 5 or
    fewer left, so resuming after it ends with the exact text."""
    retry = holysheep.RetryPolicy(attempts=5, wait_initial=0.001, wait_jitter=0, wait_max=0.001)
    with (
        serve(event_ids=True, tokens=8, fault="drop@5") as upstream,
        holysheep.Client(api_key="k", base_url=upstream.base_url, retry=retry) as client,
        client.chat.stream(model="m", messages=[], on_interrupt="resume") as stream,
    ):
        text = "".join(stream.text_stream())
        resumed_from = [r.headers.get("last-event-id") for r in upstream.requests]
    assert "".join(UpstreamConfig(tokens=8).token_list(None)) == text
    assert ("stop", [None, "5"]) == (stream.completion.finish_reason, resumed_from)


@pytest.mark.parametrize(
    ("pace", "events_first"),
    [({"ttft": 5.0}, 0), ({"tokens_per_s": 0.2}, 2)],
    ids=["first-token", "next-token"],
)
def test_a_client_leaving_while_the_server_waits_is_seen_when_it_leaves(
    pace: dict[str, float], events_first: int
) -> None:
    """A client that closes its connection while the server waits (for the first token, or
    between slow tokens) is a disconnect at once, as a gateway sees it: not one or two waits
    later, so `wait_for_disconnect()` tells a client that left at once from one that left late.
    It reads all it was sent first (the role chunk and a token, or nothing), so it closes with a
    FIN, which the server used to notice only at its second write after it."""
    body = {"model": "m", "messages": [], "stream": True}
    with serve(tokens=5, **pace) as upstream:
        connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
        with connection.getresponse() as response:
            received = b""
            while received.count(b"data: ") < events_first:
                received += response.read1(65536)
        connection.close()
        left = time.monotonic()
        assert upstream.wait_for_disconnect(timeout=2)
        assert time.monotonic() - left < 1
        assert 1 == upstream.disconnects


def test_a_client_leaving_a_non_stream_answer_during_ttft_is_seen() -> None:
    """Without `stream` the first-token wait was a plain sleep: a client that left during it
    was never counted (`wait_for_disconnect` gave up)."""
    with serve(tokens=3, ttft=5.0) as upstream:
        sock = socket.create_connection(("127.0.0.1", upstream.port))
        body = json.dumps({"model": "m", "messages": []}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        while not upstream.requests:
            time.sleep(0.01)
        sock.close()
        left = time.monotonic()
        assert upstream.wait_for_disconnect(timeout=3)
        assert time.monotonic() - left < 1
        assert 1 == upstream.disconnects


def test_request_id_is_minted_or_echoed_on_request() -> None:
    """The server mints its own x-request-id, as the API does, whatever the client sent; with
    `echo_request_id` (server-wide or per request) the client's comes back."""
    body = {"model": "m", "messages": []}
    with serve(tokens=1) as upstream:
        _, minted, _ = post(upstream.port, body, {"x-request-id": "abc"})
        _, again, _ = post(upstream.port, body, {"x-request-id": "abc"})
        echo = json.dumps({"echo_request_id": True})
        _, asked, _ = post(upstream.port, body, {"x-request-id": "abc", "x-mock-config": echo})
    with serve(tokens=1, echo_request_id=True) as upstream:
        _, echoed, _ = post(upstream.port, body, {"x-request-id": "abc"})
        _, unsent, _ = post(upstream.port, body)
    assert re.fullmatch("req_[0-9a-f]{32}", minted["x-request-id"])
    assert minted["x-request-id"] != again["x-request-id"]
    assert ("abc", "abc") == (asked["x-request-id"], echoed["x-request-id"])
    assert unsent["x-request-id"].startswith("req_")


def test_each_answer_has_its_own_id_and_the_current_time_unless_pinned() -> None:
    """`id` differs per request and `created` is now, streamed or not; `completion_id` and
    `created` pin them (the chunk id was a hash of the text, and created a fixed date)."""
    stream = {"model": "m", "messages": [], "stream": True}
    with serve(tokens=2) as upstream:
        before = int(time.time())
        first = [json.loads(d) for d in events(post(upstream.port, stream)[2])[:-1]]
        second = [json.loads(d) for d in events(post(upstream.port, stream)[2])[:-1]]
        whole = json.loads(post(upstream.port, {"model": "m", "messages": []})[2])
        after = int(time.time())
    with serve(tokens=2, completion_id="chatcmpl-pinned", created=1764000000) as upstream:
        pinned = [json.loads(d) for d in events(post(upstream.port, stream)[2])[:-1]]
    assert 1 == len({c["id"] for c in first})
    assert len({first[0]["id"], second[0]["id"], whole["id"]}) == 3
    assert re.fullmatch("chatcmpl-[0-9a-f]{24}", first[0]["id"])
    assert all(before <= c["created"] <= after for c in [*first, *second, whole])
    assert {("chatcmpl-pinned", 1764000000)} == {(c["id"], c["created"]) for c in pinned}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("drop@5", Fault("drop", 5)),
        ("stall", Fault("stall", 0)),
        ("status=429,retry_after=2", Fault("status", 0, 429, 2.0)),
        ("inband_error@4", Fault("inband_error", 4)),
        ("invalid_json,after=2", Fault("invalid_json", 2)),
    ],
)
def test_fault_parse(text: str, expected: Fault) -> None:
    """The command-line fault syntax."""
    assert expected == Fault.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stall@x", "fault 'stall@x': the count after @ must be a whole number, got 'x' (as in"),
        ("drop,after=1.5", "fault 'drop,after=1.5': after must be a whole number, got '1.5'"),
        ("status=4xx", "fault 'status=4xx': the status must be a whole number, got '4xx'"),
        (
            "status=429,retry_after=soon",
            "fault 'status=429,retry_after=soon': retry_after must be a number, got 'soon' (as in"
            " status=429,retry_after=2)",
        ),
    ],
)
def test_fault_parse_says_which_part_is_wrong(text: str, message: str) -> None:
    """It was int()'s "invalid literal for int() with base 10: 'x'"."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Fault.parse(text)


def test_fault_parse_rejects_unknown() -> None:
    """A typo is an error, not a silently healthy server."""
    with pytest.raises(ValueError, match="unknown fault"):
        Fault.parse("dorp@3")


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", None),
        (404, "invalid_request_error", None),
        (422, "invalid_request_error", None),
        (429, "rate_limit_error", None),
        # Retried by the client: invalid_request_error would tell it retrying cannot help.
        (408, "server_error", None),
        (409, "server_error", None),
        (500, "server_error", None),
        (503, "server_error", None),
    ],
)
def test_a_status_fault_has_the_apis_error_type(status: int, kind: str, code: str | None) -> None:
    """Every 4xx said `server_error`, which no API sends for a bad request or a bad key."""
    with serve(fault=f"status={status}") as upstream:
        answered, _, raw = post(upstream.port, {"messages": []})
    error = json.loads(raw)["error"]
    assert (status, kind, None, code) == (answered, error["type"], error["param"], error["code"])


@pytest.mark.parametrize("status", [100, 101, 199, 204, 304, 600])
def test_a_status_fault_without_a_body_is_refused(status: int) -> None:
    """An answer with a 1xx, 204 or 304 has no body: the error body after a 100 left the
    client waiting forever. Refused where it is given, and as an X-Mock-Config a 400."""
    with pytest.raises(ValueError, match=f"from 200 to 599 that has a body .*, got {status}"):
        Fault("status", status=status)
    with serve() as upstream:
        answered, _, raw = post(
            upstream.port, {"messages": []}, {"x-mock-config": f'{{"fault": "status={status}"}}'}
        )
    message = json.loads(raw)["error"]["message"]
    assert (400, True) == (answered, f"has a body (not 204 or 304), got {status}" in message)


def test_tokens_are_deterministic_and_capped() -> None:
    """Same config, same tokens; max_tokens caps them."""
    config = UpstreamConfig(tokens=50)
    assert config.token_list(None) == config.token_list(None)
    assert 50 == len(config.token_list(None))
    assert config.token_list(None)[:7] == config.token_list(7)


def test_a_long_answer_starts_at_once_and_holds_no_memory_for_its_tokens() -> None:
    """The most tokens an answer may have: the first event comes without the server making
    the others first (it made all million before the first byte: 6 s and 427 MB), and the
    count is cut only as sent; rotation and max_tokens still hold."""
    config = UpstreamConfig(tokens=MAX_TOKENS)
    assert MAX_TOKENS == config.token_count(None)
    assert config.token_list(5) == UpstreamConfig(tokens=5).token_list(None)
    tracemalloc.start()
    try:
        with (
            serve(config) as upstream,
            socket.create_connection(("127.0.0.1", upstream.port)) as sock,
        ):
            body = json.dumps({"messages": [], "stream": True, "n": 2}).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            sock.settimeout(10)
            first = sock.recv(4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert peak < 20_000_000, f"{peak:,} bytes"


def test_command_serves_and_stops_on_sigterm() -> None:
    """`python -m holysheep.testing --port 0` prints its URL, serves, and exits on SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "holysheep.testing", "--port", "0", "--tokens", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        status, _, raw = post(port, {"model": "m", "messages": [], "stream": True})
        assert (200, "[DONE]") == (status, events(raw)[-1])
        process.send_signal(signal.SIGTERM)
        assert 0 == process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_upstream_process_serves_from_a_child_and_stops() -> None:
    """The same server in a child process: a client streams from it; stop() ends the child
    and frees the port."""
    assert (raise_fd_limit() or 1024) >= 1024
    with UpstreamProcess(tokens=7, ttft=0.0, tokens_per_s=1000, args=["--event-ids"]) as up:
        assert up.base_url == f"http://127.0.0.1:{up.port}/v1"
        with holysheep.Client(api_key="k", base_url=up.base_url) as client:
            completion = client.chat.complete(model="m", messages=[])
        assert "".join(UpstreamConfig(tokens=7).token_list(None)) == completion.text
        cpu = up.cpu_seconds()
        assert cpu is None or cpu > 0
        status, _, _ = post(up.port, {"model": "m", "messages": [], "stream": False})
        assert 200 == status
    assert up.cpu_seconds() is None
    with pytest.raises(ConnectionRefusedError):
        post(up.port, {"model": "m", "messages": []})


def test_upstream_process_refuses_args_given_as_one_string() -> None:
    """A str is a sequence of characters: "--event-ids" was passed as 11 one-letter flags."""
    with pytest.raises(TypeError, match=re.escape("a list of arguments, such as ['--event-ids']")):
        UpstreamProcess(args="--event-ids")


def test_upstream_process_that_cannot_start_says_why() -> None:
    """The child's real exit status and its error line (it used to say "within 30 s (exit
    status None)" of a child that had exited at once)."""
    with (
        pytest.raises(RuntimeError) as info,
        UpstreamProcess(args=["--fault", "no-such-fault"]),
    ):
        pass  # pragma: no cover - never reached
    assert (
        "the local upstream (python -m holysheep.testing --port 0 --fault no-such-fault) exited"
        " with status 2 before printing its URL: python -m holysheep.testing: error: argument"
        " --fault: unknown fault 'no-such-fault'; expected one of drop, stall, status,"
        " inband_error, wrong_content_type, invalid_json"
    ) == str(info.value)


# -- n choices and tool calls ----------------------------------------------------------------

STREAM_WITH_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
FREEFORM = {"type": "custom", "custom": {"name": "sh"}}  # a custom (free-form input) tool


def rotated(tokens: list[str], by: int) -> str:
    return "".join(tokens[by:] + tokens[:by])


def test_n_choices_stream_interleaved() -> None:
    """With `n`, each chunk carries one choice: a role chunk per choice, then the choices'
    tokens in turn, a finish chunk per choice, and one usage chunk counting them all."""
    with serve(tokens=4) as upstream:
        body = {"model": "m", "messages": [], "n": 3, **STREAM_WITH_USAGE}
        _, _, raw = post(upstream.port, body)
    chunks = [json.loads(d) for d in events(raw)[:-1]]
    usage = chunks.pop()
    assert [1] * len(chunks) == [len(c["choices"]) for c in chunks]
    choices = [c["choices"][0] for c in chunks]
    kinds = [
        ("role" if "role" in c["delta"] else "finish" if c["finish_reason"] else "text", c["index"])
        for c in choices
    ]
    assert [
        *[("role", i) for i in range(3)],
        *[("text", i) for i in range(3)] * 4,
        *[("finish", i) for i in range(3)],
    ] == kinds
    texts = [
        "".join(c["delta"].get("content", "") for c in choices if c["index"] == i) for i in range(3)
    ]
    tokens = UpstreamConfig(tokens=4).token_list(None)
    assert [rotated(tokens, i) for i in range(3)] == texts
    assert ([], 12) == (usage["choices"], usage["usage"]["completion_tokens"])


def test_n_choices_through_the_client_and_without_stream() -> None:
    """`completion.choices` has the n texts (choice i rotates the tokens by i); a non-stream
    answer has the same choices; `max_tokens` caps each choice."""
    tokens = UpstreamConfig(tokens=5).token_list(None)
    with (
        serve(tokens=5) as upstream,
        holysheep.Client(api_key="k", base_url=upstream.base_url) as client,
    ):
        completion = client.chat.complete(model="m", messages=[], n=2)
        capped = client.chat.complete(model="m", messages=[], n=2, max_tokens=3)
        _, _, raw = post(upstream.port, {"model": "m", "messages": [], "n": 2})
    whole = json.loads(raw)
    assert [rotated(tokens, 0), rotated(tokens, 1)] == [c.text for c in completion.choices]
    assert [c.text for c in completion.choices] == [
        c["message"]["content"] for c in whole["choices"]
    ]
    assert (10, 10) == (completion.usage.completion_tokens, whole["usage"]["completion_tokens"])
    assert ["length", "length"] == [c.finish_reason for c in capped.choices]
    assert [rotated(tokens[:3], 0), rotated(tokens[:3], 1)] == [c.text for c in capped.choices]


@pytest.mark.parametrize(
    ("extra", "fault", "resumed_from"),
    [
        # Two role chunks (ids 0, 1), then 16 interleaved tokens: each attempt takes 5 more,
        # until the 1 left is served whole.
        ({"n": 2}, "drop@5", [None, "6", "11", "16"]),
        # A first chunk (id 0), then 5 argument fragments: 3, a drop, then the 2 left whole.
        ({"tools": [WEATHER]}, "drop@3", [None, "3"]),
    ],
    ids=["n=2", "tool call"],
)
def test_a_server_wide_drop_lets_a_resumed_stream_finish_every_choice(
    extra: dict[str, Any], fault: str, resumed_from: list[str | None]
) -> None:
    """A fault counts content events across the interleaved choices (argument fragments for a
    tool call); resuming with Last-Event-ID after each drop gives every choice whole."""
    retry = holysheep.RetryPolicy(attempts=5, wait_initial=0.001, wait_jitter=0, wait_max=0.001)
    with (
        serve(event_ids=True, tokens=8, completion_id="chatcmpl-pinned") as upstream,
        holysheep.Client(api_key="k", base_url=upstream.base_url, retry=retry) as client,
    ):
        clean = client.chat.complete(model="m", messages=[], **extra)
        upstream.config = attrs.evolve(upstream.config, fault=fault)
        with client.chat.stream(model="m", messages=[], on_interrupt="resume", **extra) as stream:
            completion = stream.until_done()
        resumed = [r.headers.get("last-event-id") for r in upstream.requests[1:]]
    assert resumed_from == resumed
    assert clean.choices == completion.choices
    if "n" in extra:
        tokens = UpstreamConfig(tokens=8).token_list(None)
        assert [rotated(tokens, 0), rotated(tokens, 1)] == [c.text for c in completion.choices]
        assert ["stop", "stop"] == [c.finish_reason for c in completion.choices]
    else:
        assert {"city": "sheep", "unit": "c"} == completion.tool_calls[0].parsed_arguments()
        assert "tool_calls" == completion.finish_reason


def test_tool_call_streams_as_the_api_does() -> None:
    """A first fragment with the call's index, id, type, name and empty arguments, then the
    arguments in several fragments, then finish_reason "tool_calls"."""
    with serve(completion_id="chatcmpl-pinned", created=1764000000) as upstream:
        body = {"model": "m", "messages": [], "tools": [WEATHER, CLOCK], "stream": True}
        _, _, raw = post(upstream.port, body)
        _, _, again = post(upstream.port, body)
    chunks = [json.loads(d) for d in events(raw)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = deltas[0]["tool_calls"][0]
    assert ("assistant", None, None) == (
        deltas[0]["role"],
        deltas[0]["content"],
        deltas[0]["refusal"],
    )
    assert (0, "function", {"name": "get_weather", "arguments": ""}) == (
        first["index"],
        first["type"],
        first["function"],
    )
    assert re.fullmatch("call_[0-9a-f]{24}", first["id"])
    fragments = [d["tool_calls"][0] for d in deltas[1:-1]]
    assert len(fragments) > 2
    assert [{"index", "function"}] * len(fragments) == [set(f) for f in fragments]
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert {"city": "sheep", "unit": "c"} == json.loads(arguments)
    assert ({}, "tool_calls") == (deltas[-1], chunks[-1]["choices"][0]["finish_reason"])
    assert raw == again  # the call id is a function of the completion id


def test_tool_call_round_trip_through_the_client() -> None:
    """The first turn calls the tool; the second, carrying the call and its result, gets
    text; a non-stream answer carries the same call in `message.tool_calls`."""
    with (
        serve(tokens=3) as upstream,
        holysheep.Client(api_key="k", base_url=upstream.base_url) as client,
    ):
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
        asked = client.chat.complete(model="m", messages=messages, tools=[WEATHER])
        call = asked.tool_calls[0]
        messages += [
            asked.to_message(),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ]
        answered = client.chat.complete(model="m", messages=messages, tools=[WEATHER])
        sent = upstream.requests[-1].body["messages"]
        _, _, raw = post(upstream.port, {"model": "m", "messages": [], "tools": [WEATHER]})
    whole = json.loads(raw)["choices"][0]
    assert ("get_weather", {"city": "sheep", "unit": "c"}, "tool_calls") == (
        call.name,
        call.parsed_arguments(),
        asked.finish_reason,
    )
    assert [call.id] == [c["id"] for c in sent[1]["tool_calls"]]
    assert ("tool", call.id) == (sent[2]["role"], sent[2]["tool_call_id"])
    assert ("".join(UpstreamConfig(tokens=3).token_list(None)), "stop", ()) == (
        answered.text,
        answered.finish_reason,
        answered.tool_calls,
    )
    assert ("tool_calls", None) == (whole["finish_reason"], whole["message"]["content"])
    assert {"city": "sheep", "unit": "c"} == json.loads(
        whole["message"]["tool_calls"][0]["function"]["arguments"]
    )


@pytest.mark.parametrize(
    ("extra", "config", "expected"),
    [
        ({"tool_choice": "required"}, None, "get_weather"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, None, "get_time"),
        ({"tool_choice": "none"}, None, None),
        ({}, '{"tool_calls": false}', None),
        (
            {
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {
                        "mode": "required",
                        "tools": [{"type": "function", "function": {"name": "get_time"}}],
                    },
                }
            },
            None,
            "get_time",
        ),
        (
            {"tools": [FREEFORM], "tool_choice": {"type": "custom", "custom": {"name": "sh"}}},
            None,
            None,
        ),
    ],
)
def test_tool_choice_picks_the_tool_or_text(
    extra: dict[str, Any], config: str | None, expected: str | None
) -> None:
    """`tool_choice` naming a function (or allowing some) calls it; "none", a custom tool (never
    called: the upstream makes function calls only), or `tool_calls=False`, gets text. A call
    the request named finishes as "stop", as on the API; one the model chose, "tool_calls"."""
    with (
        serve(tokens=2) as upstream,
        holysheep.Client(api_key="k", base_url=upstream.base_url) as client,
    ):
        headers = {} if config is None else {"x-mock-config": config}
        extra = {"tools": [WEATHER, CLOCK], **extra}
        completion = client.chat.complete(model="m", messages=[], extra_headers=headers, **extra)
    assert expected == (completion.tool_calls[0].name if completion.tool_calls else None)
    choice = extra.get("tool_choice")
    named = isinstance(choice, dict) and choice["type"] == "function"
    if expected is not None:
        assert ("stop" if named else "tool_calls") == completion.finish_reason
    if expected == "get_time":
        assert {} == completion.tool_calls[0].parsed_arguments()  # no parameters: `{}`
    if expected is None:
        assert "".join(UpstreamConfig(tokens=2).token_list(None)) == completion.text


def test_tool_arguments_come_from_the_simple_properties_of_the_schema() -> None:
    """Fixed values per type (an enum's first), nullable types by their other type; other
    properties are left out."""
    properties = {
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "x": {"type": "number"},
        "b": {"type": "boolean"},
        "e": {"type": "string", "enum": ["warm", "cold"]},
        "o": {"type": ["null", "string"]},
        "nested": {"type": "object", "properties": {"a": {"type": "string"}}},
        "list": {"type": "array", "items": {"type": "string"}},
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": properties}}}
    with (
        serve() as upstream,
        holysheep.Client(api_key="k", base_url=upstream.base_url) as client,
    ):
        completion = client.chat.complete(model="m", messages=[], tools=[tool])
    assert {"s": "sheep", "i": 3, "x": 1.5, "b": True, "e": "warm", "o": "sheep"} == (
        completion.tool_calls[0].parsed_arguments()
    )


def test_a_long_answer_being_made_does_not_stop_the_other_streams() -> None:
    """An answer of 100,000 tokens is made before its first byte (about 1 s of work), in a
    thread: a paced stream on the same upstream goes on meanwhile (it stopped for as long)."""
    with serve(tokens=100, tokens_per_s=50) as upstream:
        gaps: list[float] = []

        def paced() -> None:
            client = holysheep.Client(api_key="k", base_url=upstream.base_url)
            with client, client.chat.stream(model="m", messages=[]) as stream:
                last = time.monotonic()
                for _ in stream:
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

        reader = threading.Thread(target=paced)
        reader.start()
        time.sleep(0.3)  # the paced stream is under way
        body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
        request = urllib.request.Request(
            upstream.base_url + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "X-Mock-Config": '{"tokens": 100000}'},
        )
        with urllib.request.urlopen(request) as response:
            assert response.read(6) == b"data: "
        reader.join()
    assert len(gaps) > 50
    assert max(gaps) < 0.5
