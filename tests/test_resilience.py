"""Retries, resume, restart and rate limiting against the real local upstream."""

from __future__ import annotations

import _thread
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import attrs
import pytest

import holysheep
from holysheep import (
    Attempt,
    BadRequestError,
    ConnectError,
    InternalServerError,
    RateLimiter,
    RateLimitError,
    RetryPolicy,
    StreamError,
    StreamInterruptedError,
    Timeouts,
)
from holysheep.testing import MockUpstream, UpstreamConfig, serve
from holysheep.transports import (
    AiohttpTransport,
    AsyncHTTPXTransport,
    AsyncMockTransport,
    HTTPXTransport,
    MockResponse,
    MockTransport,
    RequestsTransport,
    sse_body,
)

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
FAST = RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05, wait_jitter=0.01)
FULL = "".join(UpstreamConfig().token_list(None))


def first(n: int) -> str:
    return "".join(UpstreamConfig().token_list(n))


def client(upstream: MockUpstream, **kwargs: Any) -> holysheep.Client:
    kwargs.setdefault("retry", FAST)
    return holysheep.Client(api_key="k", base_url=upstream.base_url, **kwargs)


def test_429_then_success_is_retried_transparently_after_retry_after() -> None:
    """The caller sees one clean completion; stats show both attempts and why."""
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 429, "retry_after": 0.1}})
        with client(upstream).chat.stream(model="m", messages=MESSAGES) as stream:
            text = "".join(stream.text_stream())
        assert FULL == text
        stats = stream.stats
        assert 2 == stats.attempts
        (attempt,) = stats.retries
        assert (1, 0.1) == (attempt.attempt, attempt.delay)
        assert "Retry-After" in attempt.decision
        keys = {r.headers["idempotency-key"] for r in upstream.requests}
        assert 1 == len(keys)  # one logical request, one key


@pytest.mark.parametrize("where", ["client", "call"])
def test_the_callers_idempotency_key_is_sent_on_every_attempt(where: str) -> None:
    """A key the caller chose (to deduplicate across its own restarts) is never replaced."""
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        mine = {"Idempotency-Key": "order-42"}
        made = client(upstream, headers=mine if where == "client" else None)
        extra = mine if where == "call" else None
        assert FULL == made.chat.complete(model="m", messages=MESSAGES, extra_headers=extra).text
        assert ["order-42", "order-42"] == [r.headers["idempotency-key"] for r in upstream.requests]


def test_a_retry_field_of_any_length_is_a_wait_capped_by_the_policy() -> None:
    """`retry:` with hundreds of digits is valid SSE: the wait is capped at `max_retry_after`
    (it raised OverflowError, turning it into seconds)."""
    huge = MockResponse(chunks=[b"retry: 1" + b"0" * 400 + b"\n\n"], fault="drop")
    made = holysheep.Client(
        api_key="k",
        transport=holysheep.transports.MockTransport([huge, MockResponse()]),
        retry=attrs.evolve(FAST, max_retry_after=0.05),
    )
    with made.chat.stream(model="m", messages=MESSAGES) as stream:
        assert "Hello!" == stream.until_done().text
    (attempt,) = stream.stats.retries
    assert attempt.delay is not None
    assert attempt.delay <= 0.05
    made.close()


def test_an_unknown_on_interrupt_is_refused_where_it_is_given() -> None:
    with pytest.raises(holysheep.ConfigurationError, match="on_interrupt must be one of"):
        holysheep.Client(api_key="k", on_interrupt="bogus")  # type: ignore[arg-type]
    made = holysheep.Client(api_key="k", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(holysheep.ConfigurationError, match="'resume'"):
        made.chat.stream(model="m", messages=MESSAGES, on_interrupt="later")  # type: ignore[arg-type]
    made.close()


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 503},
        {"kind": "status", "status": 529},
        "drop@0",
        "inband_error@0",
    ],
)
def test_failures_before_any_content_are_retried(fault: Any) -> None:
    """Server errors, overload, a drop or an in-band error before the first token: retried."""
    with serve() as upstream:
        upstream.enqueue({"fault": fault})
        assert FULL == client(upstream).chat.complete(model="m", messages=MESSAGES).text
        assert 2 == len(upstream.requests)


def test_client_errors_are_never_retried() -> None:
    """400 is the caller's mistake: one request, then the error."""
    with serve(fault={"kind": "status", "status": 400}) as upstream:
        with pytest.raises(BadRequestError):
            client(upstream).chat.complete(model="m", messages=MESSAGES)
        assert 1 == len(upstream.requests)


def test_attempts_are_bounded() -> None:
    """A server that keeps failing gets `attempts` requests, then the last error."""
    with serve(fault={"kind": "status", "status": 503}) as upstream:
        with pytest.raises(holysheep.InternalServerError):
            client(upstream).chat.complete(model="m", messages=MESSAGES)
        assert 4 == len(upstream.requests)


def test_interrupted_after_content_raises_with_the_exact_partial_text() -> None:
    """Default `on_interrupt="raise"`: no silent restart, the partial text is kept."""
    with serve(fault="drop@5") as upstream:
        seen: list[str] = []
        with (
            pytest.raises(StreamInterruptedError) as info,
            client(upstream).chat.stream(model="m", messages=MESSAGES) as stream,
        ):
            seen.extend(chunk.text for chunk in stream)
        assert first(5) == "".join(seen)
        assert info.value.completion is not None
        assert first(5) == info.value.completion.text
        assert info.value.request_id is not None
        assert 1 == len(upstream.requests)


def _resumed_in_full(upstream: MockUpstream) -> holysheep.Stream:
    """Read a stream with `on_interrupt="resume"`: the caller sees the whole text, once."""
    seen: list[str] = []
    with client(upstream, on_interrupt="resume").chat.stream(
        model="m", messages=MESSAGES
    ) as stream:
        seen.extend(chunk.text for chunk in stream)
    assert FULL == "".join(seen) == stream.completion.text
    return stream


def test_resume_continues_exactly_after_the_last_event() -> None:
    """`on_interrupt="resume"`: Last-Event-ID, and the text is byte-identical, nothing twice."""
    with serve(event_ids=True) as upstream:
        upstream.enqueue({"fault": "drop@7"})
        stream = _resumed_in_full(upstream)
        resumed = upstream.requests[1]
        assert "7" == resumed.headers["last-event-id"]  # role chunk is event 0, tokens 1..7
        assert 2 == stream.stats.attempts


def test_resume_without_event_ids_raises_rather_than_guessing() -> None:
    """A server without ids cannot be resumed exactly: the caller is told so."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@3"})
        with pytest.raises(StreamInterruptedError, match="no event ids"):
            client(upstream, on_interrupt="resume").chat.complete(model="m", messages=MESSAGES)


def test_complete_starts_over_after_an_interruption() -> None:
    """`complete()` shows no text before it returns, so a drop after content is retried from
    the start rather than raised: it used to raise `StreamInterruptedError` ("a retry would
    repeat it") with the client's default `on_interrupt="raise"`."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        completion = client(upstream).chat.complete(model="m", messages=MESSAGES)
        assert (FULL, "stop", 2) == (
            completion.text,
            completion.finish_reason,
            len(upstream.requests),
        )


def test_complete_resumes_when_the_client_says_resume() -> None:
    """A client set to resume keeps that for `complete()`: only the rest is asked for."""
    with serve(event_ids=True) as upstream:
        upstream.enqueue({"fault": "drop@7"})
        completion = client(upstream, on_interrupt="resume").chat.complete(
            model="m", messages=MESSAGES
        )
        assert (FULL, "7") == (completion.text, upstream.requests[1].headers["last-event-id"])


def test_complete_raises_when_the_client_says_raise() -> None:
    """`on_interrupt="raise"` set on the client is a choice, not the default: `complete()`
    keeps it (it used to be indistinguishable from the default, and was overridden)."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        with pytest.raises(StreamInterruptedError):
            client(upstream, on_interrupt="raise").chat.complete(model="m", messages=MESSAGES)
        assert 1 == len(upstream.requests)


def test_complete_does_not_start_over_a_stream_the_server_ended_early() -> None:
    """A body the server ends cleanly, with neither `[DONE]` nor a finish (a gateway that
    always does, see troubleshooting.md), would end the same way again: `complete()` raises
    at once rather than paying for the answer four times; `"restart"` asks for it anyway."""
    early = MockResponse(chunks=sse_body("Hel", "lo")[:3])  # the role chunk and two tokens
    transport = MockTransport([early] * 4)
    quiet = holysheep.Client(api_key="k", transport=transport, retry=FAST)
    with pytest.raises(StreamInterruptedError, match="the server ended the stream before") as info:
        quiet.chat.complete(model="m", messages=MESSAGES)
    assert ("Hello", 1) == (info.value.completion.text, len(transport.requests))
    with pytest.raises(StreamInterruptedError, match="the restart failed"):
        quiet.chat.complete(model="m", messages=MESSAGES, on_interrupt="restart")
    assert 1 + FAST.attempts == len(transport.requests)


def test_complete_starts_over_after_a_break_past_the_finish() -> None:
    """A connection that breaks after the finish, in the middle of the usage event, is no end
    the server chose: `complete()` starts over (the check whether a clean end there would do
    once left the exchange marked as ended by the server, and it raised)."""
    whole = sse_body("Hel", "lo")
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    cut = MockResponse(chunks=[*whole[:4], usage[:20]], fault="connection reset")
    transport = MockTransport([cut, MockResponse(chunks=whole)])
    broken = holysheep.Client(api_key="k", transport=transport, retry=FAST)
    completion = broken.chat.complete(model="m", messages=MESSAGES)
    assert ("Hello", 2) == (completion.text, len(transport.requests))


def test_complete_starts_over_after_a_stall() -> None:
    """A stall after content is transient like a drop: `complete()` starts over."""
    stalls = MockResponse(chunks=sse_body("Hel", "lo")[:3] + [b": keep-alive\n\n"] * 50, delay=0.02)
    transport = MockTransport([stalls, MockResponse(chunks=sse_body("Hel", "lo"))])
    stalled = holysheep.Client(
        api_key="k", transport=transport, retry=FAST, timeout=Timeouts(idle=0.2)
    )
    completion = stalled.chat.complete(model="m", messages=MESSAGES)
    assert ("Hello", "stop", 2) == (
        completion.text,
        completion.finish_reason,
        len(transport.requests),
    )


def test_complete_raises_on_an_interruption_when_the_call_says_raise() -> None:
    """`on_interrupt="raise"` given to `complete()` itself is honoured, with the partial text."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        with pytest.raises(StreamInterruptedError) as caught:
            client(upstream).chat.complete(model="m", messages=MESSAGES, on_interrupt="raise")
        assert (first(4), 1) == (caught.value.completion.text, len(upstream.requests))


@pytest.mark.anyio
async def test_async_complete_starts_over_after_an_interruption() -> None:
    """The same on the async client."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=FAST
        ) as aclient:
            completion = await aclient.chat.complete(model="m", messages=MESSAGES)
            assert (FULL, 2) == (completion.text, len(upstream.requests))
            upstream.enqueue({"fault": "drop@4"})
            with pytest.raises(StreamInterruptedError):
                await aclient.chat.complete(model="m", messages=MESSAGES, on_interrupt="raise")


def test_restart_yields_a_reset_marker_first() -> None:
    """`on_interrupt="restart"`: a Reset chunk, then the whole completion again."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        shown = ""
        resets = 0
        with client(upstream, on_interrupt="restart").chat.stream(
            model="m", messages=MESSAGES
        ) as stream:
            for chunk in stream:
                if chunk.reset is not None:
                    resets += 1
                    shown = ""  # what a terminal app would do: clear and start over
                shown += chunk.text
        assert (1, FULL, FULL) == (resets, shown, stream.completion.text)


def test_text_stream_after_a_restart_yields_only_what_was_not_shown() -> None:
    """`text_stream()` dropped the Reset marker (it has no text) and yielded the restarted
    answer whole: "Sheep are gentle, social Sheep are gentle, social animals...". Printed
    text cannot be taken back, so the repeated beginning is skipped instead."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        with client(upstream, on_interrupt="restart").chat.stream(
            model="m", messages=MESSAGES
        ) as stream:
            shown = "".join(stream.text_stream())
        assert (FULL, FULL, 2) == (shown, stream.completion.text, stream.stats.attempts)


@pytest.mark.anyio
async def test_async_text_stream_after_a_restart_yields_only_what_was_not_shown() -> None:
    """The same on the async client."""
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@4"})
        async with (
            holysheep.AsyncClient(
                api_key="k", base_url=upstream.base_url, retry=FAST, on_interrupt="restart"
            ) as aclient,
            aclient.chat.stream(model="m", messages=MESSAGES) as stream,
        ):
            shown = "".join([text async for text in stream.text_stream()])
        assert (FULL, 2) == (shown, stream.stats.attempts)


def test_text_stream_refuses_a_restarted_answer_that_differs() -> None:
    """A restarted answer that says something else cannot follow the text already printed:
    StreamInterruptedError, with the new answer's partial completion, and nothing yielded
    twice or spliced."""
    first = sse_body("Hello ", "wor")[:3]  # the role chunk and two pieces, then a drop
    transport = MockTransport(
        [MockResponse(chunks=first, fault="drop"), MockResponse(chunks=sse_body("Goodbye"))]
    )
    made = holysheep.Client(
        api_key="k",
        base_url="http://mock/v1",
        transport=transport,
        retry=FAST,
        on_interrupt="restart",
    )
    shown = []
    with (
        made.chat.stream(model="m", messages=MESSAGES) as stream,
        pytest.raises(StreamInterruptedError, match="differs from the text text_stream"),
    ):
        shown.extend(stream.text_stream())
    assert ["Hello ", "wor"] == shown
    assert stream.closed
    made.close()


def test_text_stream_refuses_a_restarted_answer_shorter_than_what_it_showed() -> None:
    """A restarted answer that ends while still repeating the text shown left that text on
    screen, longer than the completion, with no error."""
    first = sse_body("Sheep are ", "gentle, ", "social ")[:4]
    transport = MockTransport(
        [MockResponse(chunks=first, fault="drop"), MockResponse(chunks=sse_body("Sheep are"))]
    )
    made = holysheep.Client(
        api_key="k", base_url="http://mock/v1", transport=transport, retry=FAST,
        on_interrupt="restart",
    )  # fmt: skip
    shown: list[str] = []
    with (
        made.chat.stream(model="m", messages=MESSAGES) as stream,
        pytest.raises(StreamInterruptedError, match="differs from the text text_stream"),
    ):
        shown.extend(stream.text_stream())
    assert ("Sheep are gentle, social ", "Sheep are") == ("".join(shown), stream.completion.text)
    made.close()


SHEEP = sse_body("Sheep ", "are ", "gentle")
# The first attempt shows "Sheep are " and drops; the restarted one drops after "Sheep ", or
# before any content.
SHOWN_THEN_SHORTER = {"Sheep ": SHEEP[:2], "": SHEEP[:1]}


def restarted_twice(again: list[bytes]) -> list[MockResponse]:
    return [MockResponse(chunks=SHEEP[:3], fault="drop"), MockResponse(chunks=again, fault="drop")]


@pytest.mark.parametrize("again", SHOWN_THEN_SHORTER.values(), ids=SHOWN_THEN_SHORTER.keys())
def test_text_stream_failing_while_a_restart_repeats_keeps_the_text_it_yielded(
    again: list[bytes],
) -> None:
    """`text_stream()` yielded "Sheep are ", the stream restarted, and the new attempt broke
    before getting that far. The error carried the new attempt's text ("Sheep " or nothing:
    less than the caller printed) and, with nothing new delivered, was an
    IncompleteStreamError, as if no content had reached the caller. It is the restart that
    failed: StreamInterruptedError, with the completion that was yielded."""
    made = holysheep.Client(
        api_key="k",
        transport=MockTransport(restarted_twice(again)),
        retry=attrs.evolve(FAST, attempts=2),
        on_interrupt="restart",
    )
    shown: list[str] = []
    with (
        pytest.raises(StreamInterruptedError) as info,
        made.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        shown.extend(stream.text_stream())
    made.close()
    assert info.value.completion is not None
    assert ("Sheep are ", "Sheep are ", 2) == (
        "".join(shown),
        info.value.completion.text,
        info.value.attempts,
    )
    # Said once: an error that was a StreamInterruptedError already is not wrapped again.
    assert 1 == str(info.value).count("interrupted after content was delivered")


def test_text_stream_keeps_a_final_error_type_while_a_restart_repeats() -> None:
    """A final in-band error while the restarted answer still repeats what was yielded stays
    the StreamError it is (type and code kept, as when reading chunks), carrying the
    completion that was yielded."""
    refused = b'data: {"error": {"message": "Flagged", "type": "content_filter"}}\n\n'
    made = holysheep.Client(
        api_key="k",
        transport=MockTransport(
            [
                MockResponse(chunks=SHEEP[:3], fault="drop"),
                MockResponse(chunks=[*SHEEP[:2], refused]),
            ]
        ),
        retry=attrs.evolve(FAST, attempts=2),
        on_interrupt="restart",
    )
    shown: list[str] = []
    with (
        pytest.raises(StreamError) as info,
        made.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        shown.extend(stream.text_stream())
    made.close()
    assert (StreamError, "content_filter") == (type(info.value), info.value.type)
    assert info.value.completion is not None
    assert ("Sheep are ", "Sheep are ") == ("".join(shown), info.value.completion.text)


async def collect(texts: AsyncIterator[str], into: list[str]) -> None:
    async for text in texts:
        into.append(text)


@pytest.mark.anyio
@pytest.mark.parametrize("again", SHOWN_THEN_SHORTER.values(), ids=SHOWN_THEN_SHORTER.keys())
async def test_async_text_stream_failing_while_a_restart_repeats_keeps_the_text_it_yielded(
    again: list[bytes],
) -> None:
    shown: list[str] = []
    async with (
        holysheep.AsyncClient(
            api_key="k",
            transport=AsyncMockTransport(restarted_twice(again)),
            retry=attrs.evolve(FAST, attempts=2),
            on_interrupt="restart",
        ) as made,
        made.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        with pytest.raises(StreamInterruptedError) as info:
            await collect(stream.text_stream(), shown)
    assert info.value.completion is not None
    assert ("Sheep are ", "Sheep are ") == ("".join(shown), info.value.completion.text)
    assert 1 == str(info.value).count("interrupted after content was delivered")


@pytest.mark.parametrize("status", [503, 429])
def test_a_failed_reconnect_is_retried_like_the_drop(status: int) -> None:
    """Resuming, a 503 or 429 on the way back is one more transient failure, retried within
    `attempts` (it ended the stream: the policy took it for a failure after content)."""
    with serve(event_ids=True) as upstream:
        upstream.enqueue(
            {"fault": "drop@5"}, {"fault": {"kind": "status", "status": status, "retry_after": 0}}
        )
        stream = _resumed_in_full(upstream)
        assert ["5", "5"] == [r.headers["last-event-id"] for r in upstream.requests[1:]]
        assert 3 == stream.stats.attempts


@pytest.mark.parametrize("on_interrupt", ["resume", "restart"])
def test_a_reconnect_that_keeps_failing_raises_the_interruption_with_the_text(
    on_interrupt: str,
) -> None:
    """Giving up on the way back: `StreamInterruptedError` with what the caller was shown (it
    was a bare 503 with no completion), and on restart no `Reset` the caller would clear its
    screen for."""
    with serve(event_ids=True) as upstream:
        down = {"fault": {"kind": "status", "status": 503, "retry_after": 0}}
        upstream.enqueue({"fault": "drop@5"}, down, down, down)
        shown: list[holysheep.ChatChunk] = []
        with (
            pytest.raises(StreamInterruptedError, match=f"the {on_interrupt} failed") as info,
            client(upstream, on_interrupt=on_interrupt).chat.stream(
                model="m", messages=MESSAGES
            ) as stream,
        ):
            shown.extend(stream)
        assert [None] * len(shown) == [chunk.reset for chunk in shown]
        assert first(5) == "".join(chunk.text for chunk in shown)
        assert info.value.completion is not None
        assert first(5) == info.value.completion.text
        assert 503 == info.value.status_code
        assert isinstance(info.value.__cause__, holysheep.InternalServerError)
        assert 4 == len(upstream.requests)


@pytest.mark.anyio
@pytest.mark.parametrize("on_interrupt", ["resume", "restart"])
async def test_async_a_reconnect_that_keeps_failing_raises_the_interruption(
    on_interrupt: str,
) -> None:
    with serve(event_ids=True) as upstream:
        down = {"fault": {"kind": "status", "status": 503, "retry_after": 0}}
        upstream.enqueue({"fault": "drop@5"}, down, down, down)
        shown: list[holysheep.ChatChunk] = []

        async def read(aclient: holysheep.AsyncClient) -> None:
            async with aclient.chat.stream(model="m", messages=MESSAGES) as stream:
                async for chunk in stream:
                    shown.append(chunk)

        async with holysheep.AsyncClient(
            api_key="k",
            base_url=upstream.base_url,
            retry=FAST,
            on_interrupt=on_interrupt,  # type: ignore[arg-type]
        ) as aclient:
            with pytest.raises(StreamInterruptedError, match=f"the {on_interrupt} failed") as info:
                await read(aclient)
        assert [None] * len(shown) == [chunk.reset for chunk in shown]
        assert first(5) == "".join(chunk.text for chunk in shown)
        assert info.value.completion is not None
        assert first(5) == info.value.completion.text


def test_a_retry_before_content_in_resume_mode_keeps_every_event() -> None:
    """A drop before the first token is retried as a fresh request: its events are all new,
    even where their ids repeat the dropped attempt's (the role chunk was skipped)."""
    with serve(event_ids=True) as upstream:
        upstream.enqueue({"fault": "drop@0"})
        with client(upstream, on_interrupt="resume").chat.stream(
            model="m", messages=MESSAGES
        ) as stream:
            text = "".join(chunk.text for chunk in stream)
        assert "last-event-id" not in upstream.requests[1].headers
        assert (FULL, "assistant") == (text, stream.completion.role)


def _chunk(index: int, completion_id: str, delta: dict[str, Any], finish: Any = None) -> bytes:
    data = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"id: {index}\ndata: {json.dumps(data)}\n\n".encode()


def test_a_resume_answered_with_another_completion_is_not_spliced() -> None:
    """A server that ignores Last-Event-ID and generates anew: its events, numbered from 1
    again, were partly skipped as delivered and partly appended, a text nobody generated.
    Now the caller gets the interruption, with the text it was shown."""
    cat = [_chunk(i, "chatcmpl-A", {"content": w}) for i, w in enumerate(["The ", "cat "], 1)]
    dog = [_chunk(i, "chatcmpl-B", {"content": w}) for i, w in enumerate(["A ", "dog ", "ran."], 1)]
    made = holysheep.Client(
        api_key="k",
        transport=holysheep.transports.MockTransport(
            [
                MockResponse(chunks=cat, fault="drop"),
                MockResponse(
                    chunks=[*dog, _chunk(4, "chatcmpl-B", {}, "stop"), b"data: [DONE]\n\n"]
                ),
            ]
        ),
        retry=FAST,
        on_interrupt="resume",
    )
    shown: list[str] = []
    with (
        pytest.raises(StreamInterruptedError, match="another completion") as info,
        made.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        shown.extend(chunk.text for chunk in stream)
    assert "The cat " == "".join(shown)
    assert info.value.completion is not None
    assert "The cat " == info.value.completion.text
    made.close()


def test_a_resume_that_goes_on_is_not_checked_for_the_completion_id() -> None:
    """Some gateways vary the id from chunk to chunk: a resumed stream that continues after
    Last-Event-ID is taken as it comes; only a replay of delivered events must match."""
    words = ["The ", "cat ", "sat."]
    events = [_chunk(i, f"chunk-{i}", {"content": w}) for i, w in enumerate(words, 1)]
    end = [_chunk(4, "chunk-4", {}, "stop"), b"data: [DONE]\n\n"]
    made = holysheep.Client(
        api_key="k",
        transport=holysheep.transports.MockTransport(
            [MockResponse(chunks=events[:2], fault="drop"), MockResponse(chunks=events[2:] + end)]
        ),
        retry=FAST,
        on_interrupt="resume",
    )
    assert "The cat sat." == made.chat.complete(model="m", messages=MESSAGES).text
    made.close()


def test_a_resume_drops_replayed_events_even_when_the_request_id_was_read_first() -> None:
    """Reading `stream.request_id` before the stream is sent prepares its first attempt; in
    resume mode that attempt must record its event ids too, or a server that replays the
    events already delivered has them shown twice."""
    words = ["The ", "cat ", "sat."]
    events = [_chunk(i, "chatcmpl-A", {"content": w}) for i, w in enumerate(words, 1)]
    end = [_chunk(4, "chatcmpl-A", {}, "stop"), b"data: [DONE]\n\n"]
    transport = holysheep.transports.MockTransport(
        [MockResponse(chunks=events[:2], fault="drop"), MockResponse(chunks=events + end)]
    )
    made = holysheep.Client(api_key="k", transport=transport, retry=FAST, on_interrupt="resume")
    stream = made.chat.stream(model="m", messages=MESSAGES)
    request_id = stream.request_id
    with stream:
        shown = "".join(chunk.text for chunk in stream)
    made.close()
    assert ("The cat sat.", "The cat sat.") == (shown, stream.completion.text)
    assert [request_id, request_id] == [r.header("x-request-id") for r in transport.requests]
    assert "2" == transport.requests[1].header("last-event-id")


class _RaisesInterrupted(holysheep.transports.MockTransport):
    """A transport (one relaying another holysheep stream, say) that reports the break as
    `StreamInterruptedError` itself, after the chunks."""

    def __init__(self, error: StreamInterruptedError) -> None:
        super().__init__([MockResponse(chunks=sse_body("Hello", " there")[:2])])
        self.error = error

    def send(self, request: holysheep.Request) -> holysheep.transports.Response:
        response = super().send(request)
        error = self.error

        def body() -> Any:
            yield from response.stream
            raise error

        return attrs.evolve(response, stream=body())


def test_a_stream_interrupted_error_from_the_transport_reaches_the_caller_unwrapped() -> None:
    """It already says the stream broke after content came: the caller gets that very error,
    not another `StreamInterruptedError` wrapped around it."""
    error = StreamInterruptedError("the relay lost its upstream")
    made = holysheep.Client(api_key="k", transport=_RaisesInterrupted(error), retry=FAST)
    shown: list[str] = []
    with (
        pytest.raises(StreamInterruptedError) as info,
        made.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        shown.extend(chunk.text for chunk in stream)
    made.close()
    assert ("Hello", error) == ("".join(shown), info.value)  # exceptions compare by identity


def test_a_break_before_every_choice_finished_is_resumed() -> None:
    """With `n=2`, a drop after choice 0 finished, in the middle of choice 1, is an
    interruption like any other: resumed, it gives both whole answers (it ended the stream as
    complete, choice 1 cut short, and nothing was resumed)."""

    def event(i: int, choice: int, delta: dict[str, Any], finish: Any = None) -> bytes:
        data = {
            "id": "chatcmpl-A",
            "object": "chat.completion.chunk",
            "choices": [{"index": choice, "delta": delta, "finish_reason": finish}],
        }
        return f"id: {i}\ndata: {json.dumps(data)}\n\n".encode()

    before = [event(1, 0, {"content": "Yes."}), event(2, 1, {"content": "Well, it "})]
    before += [event(3, 0, {}, "stop"), event(4, 1, {"content": "depends on"})]
    after = [event(5, 1, {"content": " the sheep."}), event(6, 1, {}, "stop")]
    transport = holysheep.transports.MockTransport(
        [MockResponse(chunks=before, fault="drop"), MockResponse(chunks=after)]
    )
    made = holysheep.Client(api_key="k", transport=transport, retry=FAST, on_interrupt="resume")
    with made.chat.stream(model="m", messages=MESSAGES, n=2) as stream:
        completion = stream.until_done()
    made.close()
    assert [("Yes.", "stop"), ("Well, it depends on the sheep.", "stop")] == [
        (c.text, c.finish_reason) for c in completion.choices
    ]
    assert [None, "4"] == [request.header("last-event-id") for request in transport.requests]


def test_a_long_healthy_stream_keeps_its_retry_budget_for_a_resume() -> None:
    """The budget counts failures, not streaming: a drop after longer than `timeout` of good
    streaming is still resumed (it gave up: 'the retry budget would be exceeded')."""
    with serve(event_ids=True, tokens=12, tokens_per_s=20) as upstream:
        upstream.enqueue({"fault": "drop@10"})  # after 0.5 s of streaming
        made = client(upstream, retry=attrs.evolve(FAST, timeout=0.3), on_interrupt="resume")
        assert first(12) == made.chat.complete(model="m", messages=MESSAGES).text
        assert 2 == len(upstream.requests)


def test_time_in_the_rate_limiter_queue_is_not_retry_budget() -> None:
    """A stream that queued longer than `timeout` behind another still gets its retry."""
    limiter = RateLimiter(max_concurrent=1)
    with serve(tokens=12, tokens_per_s=30) as upstream:  # the first stream takes 0.4 s
        made = client(upstream, limiter=limiter, retry=attrs.evolve(FAST, timeout=0.3))
        holder = made.chat.stream(model="m", messages=MESSAGES)
        holder.open()
        upstream.enqueue({"fault": {"kind": "status", "status": 503, "retry_after": 0}})
        done: list[str] = []
        waiter = threading.Thread(
            target=lambda: done.append(made.chat.complete(model="m", messages=MESSAGES).text)
        )
        waiter.start()
        time.sleep(0.1)
        holder.until_done()
        holder.close()
        waiter.join(5)
        assert [first(12)] == done
        made.close()


@pytest.mark.parametrize(
    ("faults", "on_interrupt"),
    [
        ([{"fault": {"kind": "status", "status": 503}}] * 2, "raise"),
        ([{"fault": "drop@5"}], "resume"),
    ],
)
def test_the_token_budget_is_charged_what_the_attempts_used(
    faults: list[dict[str, Any]], on_interrupt: str
) -> None:
    """A refused attempt used no tokens, and a resumed completion's usage covers its earlier
    attempts: both kept their whole reservation (prompt + max_tokens), so after two 503s a
    10-token answer held 870 tokens of a 600 a minute budget, and the next request waited for
    over a minute."""
    limiter = RateLimiter(tokens_per_minute=600)
    with serve(event_ids=True, tokens=10) as upstream:
        made = client(upstream, limiter=limiter, on_interrupt=on_interrupt)
        upstream.enqueue(*faults)
        made.chat.complete(model="m", messages=[], max_tokens=290)
        started = time.monotonic()
        made.chat.complete(model="m", messages=[], max_tokens=500)
        assert time.monotonic() - started < 3.0
        made.close()


@pytest.mark.parametrize("messages", [1, 4, 12])
def test_the_reservation_covers_a_prompt_of_short_messages(messages: int) -> None:
    """The prompt estimate counted content only, about 4 characters a token: short messages
    came out at half their real count (12 for a 15-token request), and a tokens-per-minute
    limiter let 750 tokens through a 600 budget at once. It adds what the chat format costs
    for each message; the embedded upstream counts prompts as OpenAI's models do (a word a
    token, 3 more a message), so the reservation must cover its usage."""
    limiter = RateLimiter(tokens_per_minute=6000)
    prompt = [{"role": "user", "content": "hello there"}] * messages
    with serve(tokens=10) as upstream:
        made = client(upstream, limiter=limiter)
        with made.chat.stream(
            model="m", messages=prompt, max_tokens=10, stream_options={"include_usage": True}
        ) as stream:
            usage = stream.until_done().usage
        made.close()
    assert usage is not None
    assert usage.total_tokens <= stream._call.cost < 2 * usage.total_tokens


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


SYNC_TRANSPORTS = {"requests": RequestsTransport, "httpx": HTTPXTransport}
ASYNC_TRANSPORTS = {"httpx": AsyncHTTPXTransport, "aiohttp": AiohttpTransport}


@pytest.mark.parametrize("transport", sorted(SYNC_TRANSPORTS))
def test_attempts_that_could_not_connect_give_their_tokens_back(transport: str) -> None:
    """A refused connection never sent the request, so it used none of the token budget: three
    refused attempts reserving 300 tokens each held 900 of 600 a minute, and the next request
    waited over a minute."""
    limiter = RateLimiter(tokens_per_minute=600)
    dead = holysheep.Client(
        api_key="k",
        base_url=f"http://127.0.0.1:{closed_port()}/v1",
        retry=attrs.evolve(FAST, attempts=3),
        limiter=limiter,
        transport=SYNC_TRANSPORTS[transport](),
    )
    with pytest.raises(ConnectError, match="could not connect"):
        dead.chat.complete(model="m", messages=[], max_tokens=290)
    dead.close()
    with serve(tokens=10) as upstream:
        made = client(upstream, limiter=limiter)
        started = time.monotonic()
        made.chat.complete(model="m", messages=[], max_tokens=500)
        assert time.monotonic() - started < 3.0
        made.close()


@pytest.mark.anyio
@pytest.mark.parametrize("transport", sorted(ASYNC_TRANSPORTS))
async def test_async_attempts_that_could_not_connect_give_their_tokens_back(
    transport: str, anyio_backend: str
) -> None:
    """The async clients settle a refused connection the same way."""
    if transport == "aiohttp" and anyio_backend != "asyncio":
        pytest.skip("aiohttp runs on asyncio only")
    limiter = RateLimiter(tokens_per_minute=600)
    async with holysheep.AsyncClient(
        api_key="k",
        base_url=f"http://127.0.0.1:{closed_port()}/v1",
        retry=attrs.evolve(FAST, attempts=3),
        limiter=limiter,
        transport=ASYNC_TRANSPORTS[transport](),
    ) as dead:
        with pytest.raises(ConnectError, match="could not connect"):
            await dead.chat.complete(model="m", messages=[], max_tokens=290)
    with serve(tokens=10) as upstream:
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=FAST, limiter=limiter
        ) as made:
            with anyio.fail_after(3):
                await made.chat.complete(model="m", messages=[], max_tokens=500)


@pytest.mark.anyio
async def test_an_async_waiter_goes_as_soon_as_a_reservation_is_settled() -> None:
    """A queued async call slept the whole wait computed when it reached the head (here ~45 s:
    the first call reserved 1,500 of 2,000 tokens a minute), though the first call used only
    a few tokens and gave the rest back on ending; it now looks again, as a sync one does."""
    limiter = RateLimiter(tokens_per_minute=2000)
    with serve(tokens=10, tokens_per_s=100) as upstream:
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=FAST, limiter=limiter
        ) as made:

            async def one() -> None:
                await made.chat.complete(model="m", messages=MESSAGES, max_tokens=1500)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(one)
                    await anyio.sleep(0.05)
                    tasks.start_soon(one)


@pytest.mark.anyio
async def test_async_resume_and_retry() -> None:
    """The async client makes the same decisions, on asyncio and trio."""
    with serve(event_ids=True) as upstream:
        upstream.enqueue(
            {"fault": {"kind": "status", "status": 429, "retry_after": 0.05}}, {"fault": "drop@9"}
        )
        async with (
            holysheep.AsyncClient(
                api_key="k", base_url=upstream.base_url, retry=FAST, on_interrupt="resume"
            ) as aclient,
            aclient.chat.stream(model="m", messages=MESSAGES) as stream,
        ):
            texts = [chunk.text async for chunk in stream]
        assert FULL == "".join(texts)
        assert 3 == stream.stats.attempts


@pytest.mark.anyio
async def test_async_interrupted_raises_partial() -> None:
    """Async, default policy: StreamInterruptedError with the exact partial text."""
    with serve(fault="drop@6") as upstream:
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=FAST
        ) as aclient:
            with pytest.raises(StreamInterruptedError) as info:
                await aclient.chat.complete(model="m", messages=MESSAGES)
        assert info.value.completion is not None
        assert first(6) == info.value.completion.text


def test_every_retry_is_logged_and_hooked(caplog: pytest.LogCaptureFixture) -> None:
    """Logger `holysheep` and user hooks see each failed attempt."""
    seen: list[Attempt] = []
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        with caplog.at_level(logging.WARNING, logger="holysheep"):
            client(upstream, hooks=[seen.append]).chat.complete(model="m", messages=MESSAGES)
    assert 1 == len(seen)
    assert "InternalServerError" in seen[0].error
    assert any("attempt 1 failed" in record.getMessage() for record in caplog.records)


def test_a_hook_that_raises_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook's own bug is logged, as an observer's is: the retry still happens and the
    answer comes, and when the call gives up the caller gets the request's error with its
    partial completion (the hook's exception used to replace the request's outcome)."""
    seen: list[Attempt] = []

    def broken(attempt: Attempt) -> None:
        seen.append(attempt)
        raise ValueError("metrics backend down")

    with serve() as upstream, caplog.at_level(logging.ERROR, logger="holysheep"):
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        completion = client(upstream, hooks=[broken]).chat.complete(model="m", messages=MESSAGES)
        with serve(fault="drop@6") as dropping, pytest.raises(StreamInterruptedError) as info:
            client(dropping, hooks=[broken]).chat.complete(
                model="m", messages=MESSAGES, on_interrupt="raise"
            )
    assert completion.text
    assert 2 == len(seen)
    assert info.value.completion is not None
    assert first(6) == info.value.completion.text
    failed = [r for r in caplog.records if "hook" in r.getMessage() and "failed" in r.getMessage()]
    assert 2 == len(failed)
    assert "metrics backend down" in (failed[0].exc_text or "")


def test_limiter_caps_concurrency_across_threads() -> None:
    """max_concurrent=3 holds for 12 threads streaming at once; the queue time is on stats."""
    limiter = RateLimiter(max_concurrent=3)
    with serve(tokens=10, tokens_per_s=100) as upstream:
        shared = client(upstream, limiter=limiter)
        queued: list[float] = []
        peak = 0
        lock = threading.Lock()

        def one() -> None:
            nonlocal peak
            with shared.chat.stream(model="m", messages=MESSAGES) as stream:
                with lock:
                    peak = max(peak, limiter.in_flight)
                stream.until_done()
            queued.append(stream.stats.queued)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert 12 == len(queued)
    assert 3 == peak
    assert 0 == limiter.in_flight
    assert max(queued) > 0.1  # later streams waited for a slot


@pytest.mark.anyio
async def test_limiter_caps_concurrency_across_tasks() -> None:
    """The async front end enforces the same limit without blocking the loop."""
    limiter = RateLimiter(max_concurrent=2)
    with serve(tokens=5, tokens_per_s=100) as upstream:
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, limiter=limiter
        ) as aclient:
            peak = 0

            async def one() -> None:
                nonlocal peak
                async with aclient.chat.stream(model="m", messages=MESSAGES) as stream:
                    peak = max(peak, limiter.in_flight)
                    await stream.until_done()

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
    assert (2, 0) == (peak, limiter.in_flight)


def _queued_behind_a_held_slot() -> tuple[RateLimiter, MockTransport, holysheep.Client]:
    limiter = RateLimiter(max_concurrent=1)
    transport = MockTransport(lambda request: MockResponse(chunks=sse_body("ok")))
    made = holysheep.Client(api_key="k", transport=transport, limiter=limiter, retry=FAST)
    return limiter, transport, made


def test_closing_a_queued_stream_ends_its_wait_at_once() -> None:
    """The queued thread saw `close()` at its next look, up to 0.1 s later (87 ms median);
    the close wakes it now (under a millisecond here)."""
    limiter, _transport, made = _queued_behind_a_held_slot()
    holder = made.chat.stream(model="m", messages=MESSAGES)
    holder.open()
    took = []
    for _ in range(5):
        queued = made.chat.stream(model="m", messages=MESSAGES)
        opener = threading.Thread(target=queued.open)
        opener.start()
        while not limiter.waiting:
            time.sleep(0.001)
        time.sleep(0.013)  # into a look's wait
        started = time.monotonic()
        queued.close()
        opener.join(3.0)
        took.append(time.monotonic() - started)
    assert sorted(took)[2] < 0.03
    holder.close()
    made.close()


def test_closing_a_stream_queued_in_the_limiter_takes_it_out_of_the_queue() -> None:
    """`close()` from another thread while `open()` waits for a slot: `open()` returns
    without sending, and the stream's place in the queue is given up."""
    limiter, transport, made = _queued_behind_a_held_slot()
    holder = made.chat.stream(model="m", messages=MESSAGES)
    holder.open()
    queued = made.chat.stream(model="m", messages=MESSAGES)
    opener = threading.Thread(target=queued.open)
    opener.start()
    deadline = time.monotonic() + 3.0
    while not limiter.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    queued.close()
    opener.join(3.0)
    assert (False, 0, 1, 1) == (
        opener.is_alive(),
        limiter.waiting,
        limiter.in_flight,
        len(transport.requests),
    )
    holder.close()
    made.close()


def test_ctrl_c_while_queued_in_the_limiter_takes_the_stream_out_of_the_queue() -> None:
    """KeyboardInterrupt in a thread waiting for a slot: its ticket leaves the queue, so the
    next caller is not stuck behind it for good once the slot comes free."""
    limiter, transport, made = _queued_behind_a_held_slot()
    holder = made.chat.stream(model="m", messages=MESSAGES)
    holder.open()
    queued = made.chat.stream(model="m", messages=MESSAGES)
    # Python's own Ctrl-C handler: pytest started in the background by a non-interactive
    # shell inherits SIGINT ignored, and the interrupt would never land. Should it not land
    # anyway, a close ends the wait, so the test fails instead of hanging.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    rescue = threading.Timer(5.0, queued.close)
    rescue.start()
    try:
        threading.Timer(0.2, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            queued.open()
    finally:
        rescue.cancel()
        signal.signal(signal.SIGINT, handler)
    assert (0, 1) == (limiter.waiting, limiter.in_flight)
    holder.close()
    assert "ok" == made.chat.complete(model="m", messages=MESSAGES).text
    made.close()
    assert (0, 2) == (limiter.in_flight, len(transport.requests))


class _CloseFails(holysheep.transports.MockTransport):
    """A transport whose responses raise when closed."""

    def send(self, request: holysheep.Request) -> holysheep.transports.Response:
        def close() -> None:
            raise RuntimeError("close failed")

        return attrs.evolve(super().send(request), close=close)


class _AsyncCloseFails(holysheep.transports.AsyncMockTransport):
    async def send(self, request: holysheep.Request) -> holysheep.transports.AsyncResponse:
        async def aclose() -> None:
            raise RuntimeError("close failed")

        return attrs.evolve(await super().send(request), aclose=aclose)


def test_a_close_that_raises_still_returns_the_limiter_slot() -> None:
    """The slot comes back even when the transport fails to close the response; the failure
    is a warning, and the answer stands."""
    limiter = RateLimiter(max_concurrent=1)
    client = holysheep.Client(
        api_key="k",
        transport=_CloseFails([MockResponse()]),
        limiter=limiter,
        retry=RetryPolicy.none(),
    )
    with pytest.warns(RuntimeWarning, match="_CloseFails: closing a response raised RuntimeError"):
        assert "Hello!" == client.chat.complete(model="m", messages=MESSAGES).text
    assert 0 == limiter.in_flight


@pytest.mark.anyio
async def test_an_async_close_that_raises_still_returns_the_limiter_slot() -> None:
    """The async twin: the slot comes back whether or not the close had a cancel scope."""
    limiter = RateLimiter(max_concurrent=1)
    async with holysheep.AsyncClient(
        api_key="k",
        transport=_AsyncCloseFails([MockResponse()]),
        limiter=limiter,
        retry=RetryPolicy.none(),
    ) as aclient:
        with pytest.warns(RuntimeWarning, match="closing a response raised RuntimeError"):
            completion = await aclient.chat.complete(model="m", messages=MESSAGES)
    assert "Hello!" == completion.text
    assert 0 == limiter.in_flight


def test_a_429_pauses_everyone_sharing_the_limiter() -> None:
    """Adaptive: Retry-After on one request holds back the whole limiter."""
    limiter = RateLimiter(requests_per_minute=6000, burst=100)
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 429, "retry_after": 0.3}})
        client(upstream, limiter=limiter).chat.complete(model="m", messages=MESSAGES)
        assert limiter.paused_until > 0


@pytest.mark.parametrize(
    "policy",
    [RetryPolicy.none(), attrs.evolve(FAST, attempts=1), attrs.evolve(FAST, max_retry_after=0.1)],
)
def test_a_429_that_is_not_retried_still_pauses_everyone(policy: RetryPolicy) -> None:
    """No retries, the last attempt, or a wait above `max_retry_after`: the request gives up,
    and the others sharing the limiter are held back all the same."""
    limiter = RateLimiter(requests_per_minute=6000, burst=100)
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 429, "retry_after": 0.3}})
        made = client(upstream, limiter=limiter, retry=policy)
        with pytest.raises(holysheep.RateLimitError):
            made.chat.complete(model="m", messages=MESSAGES)
        started = time.monotonic()
        assert FULL == made.chat.complete(model="m", messages=MESSAGES).text
        assert time.monotonic() - started >= 0.08  # held back (capped at max_retry_after)
        made.close()


def test_the_total_timeout_ends_the_call_and_is_not_retried() -> None:
    """`total` bounds the whole stream: it fired after 0.3 s, and was retried three times."""
    with serve(ttft=1.0) as upstream:
        started = time.monotonic()
        with pytest.raises(holysheep.TotalTimeoutError):
            client(upstream, timeout=Timeouts(total=0.3)).chat.complete(
                model="m", messages=MESSAGES
            )
        assert time.monotonic() - started < 0.9
        assert 1 == len(upstream.requests)


def test_without_a_total_timeout_failures_are_retried_as_the_policy_says() -> None:
    """`Timeouts(total=None)` puts no bound on the call: a 503 is retried, and the second
    attempt's request carries no total either."""
    transport = MockTransport([MockResponse(status_code=503), MockResponse(chunks=sse_body("ok"))])
    made = holysheep.Client(
        api_key="k", transport=transport, retry=FAST, timeout=Timeouts(total=None)
    )
    assert "ok" == made.chat.complete(model="m", messages=MESSAGES).text
    made.close()
    assert [None, None] == [request.timeouts.total for request in transport.requests]


def test_the_total_timeout_counts_from_the_first_attempt_across_resumes() -> None:
    """Resumed attempts continue the same stream, so `total` keeps counting from the first
    send (each attempt started its own, and two resumes let 1 s run to 1.9 s)."""
    with serve(event_ids=True, tokens=20, tokens_per_s=20) as upstream:  # 1 s in all
        upstream.enqueue({"fault": "drop@6"})
        upstream.enqueue({"fault": "drop@6"})
        started = time.monotonic()
        with pytest.raises(holysheep.TotalTimeoutError) as info:
            client(upstream, timeout=Timeouts(total=0.8), on_interrupt="resume").chat.complete(
                model="m", messages=MESSAGES
            )
        assert time.monotonic() - started < 1.2
        assert info.value.completion is not None
        assert first(20).startswith(info.value.completion.text)
        assert 3 == len(upstream.requests)


@pytest.mark.anyio
async def test_a_retry_wait_that_would_pass_the_total_timeout_gives_up_at_once() -> None:
    """`total` 0.5 s and a 503 asking for 2 s: the call ends now, not after sleeping the 2 s
    and then failing the total anyway (sync and async slept it out)."""
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503, "retry_after": 2}})
        made = client(upstream, timeout=Timeouts(total=0.5))
        started = time.monotonic()
        with pytest.raises(holysheep.InternalServerError):
            made.chat.complete(model="m", messages=MESSAGES)
        upstream.enqueue({"fault": {"kind": "status", "status": 503, "retry_after": 2}})
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=FAST, timeout=Timeouts(total=0.5)
        ) as aclient:
            with pytest.raises(holysheep.InternalServerError) as info:
                await aclient.chat.complete(model="m", messages=MESSAGES)
        assert time.monotonic() - started < 0.5
        assert 2 == len(upstream.requests)
        made.close()
    assert 503 == info.value.status_code


def test_each_resumed_run_gets_every_attempt() -> None:
    """Four drops, each after progress: a resumed stream finishes with the default four
    attempts, since each run of failures starts after new content (the count was per call,
    so the fourth drop gave up)."""
    with serve(event_ids=True, tokens=30) as upstream:
        for _ in range(4):
            upstream.enqueue({"fault": "drop@6"})
        made = client(upstream, on_interrupt="resume")
        assert first(30) == made.chat.complete(model="m", messages=MESSAGES).text
        assert 5 == len(upstream.requests)
        made.close()


def test_restart_never_loops_on_a_server_that_always_drops() -> None:
    """Restarting starts over, so its attempts are counted for the whole call."""
    with serve(fault="drop@3") as upstream:
        with pytest.raises(StreamInterruptedError):
            client(upstream, on_interrupt="restart").chat.complete(model="m", messages=MESSAGES)
        assert 4 == len(upstream.requests)


def test_timeouts_before_content_are_retried() -> None:
    """A first token that never comes is retried, like a connect failure."""
    with serve() as upstream:
        upstream.enqueue({"ttft": 2})
        completion = client(upstream, timeout=Timeouts(ttft=0.2)).chat.complete(
            model="m", messages=MESSAGES
        )
        assert FULL == completion.text
        assert 2 == len(upstream.requests)


def test_the_final_error_says_how_many_attempts_were_made() -> None:
    """After three 503s the error read like the first one; it now counts the attempts."""
    with serve() as upstream:
        upstream.enqueue(*[{"fault": {"kind": "status", "status": 503}}] * 3)
        made = client(upstream, retry=attrs.evolve(FAST, attempts=3))
        with pytest.raises(holysheep.InternalServerError) as info:
            made.chat.complete(model="m", messages=MESSAGES)
        made.close()
    assert 3 == info.value.attempts
    assert "attempts=3" in str(info.value)


def test_an_error_cut_short_by_a_limit_says_which() -> None:
    """A 429 whose Retry-After is past `max_retry_after`, and a 503 whose wait would pass the
    retry budget, are raised at once: the message said neither why nor that it could have been
    retried (only the log and the hooks did)."""
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 429, "retry_after": 120}})
        with pytest.raises(RateLimitError) as long_wait:
            client(upstream).chat.complete(model="m", messages=MESSAGES)
        upstream.enqueue({"fault": {"kind": "status", "status": 503, "retry_after": 2}})
        with pytest.raises(InternalServerError) as budget:
            client(upstream, retry=attrs.evolve(FAST, timeout=1.0)).chat.complete(
                model="m", messages=MESSAGES
            )
        upstream.enqueue(*[{"fault": {"kind": "status", "status": 503}}] * 4)
        with pytest.raises(InternalServerError) as used_up:
            client(upstream).chat.complete(model="m", messages=MESSAGES)
    why = "the server asked to wait 120 s, longer than max_retry_after of 60 s"
    assert (why, 1) == (long_wait.value.not_retried, long_wait.value.attempts)
    assert str(long_wait.value).endswith(f", not retried: {why})")
    assert budget.value.not_retried is not None
    assert budget.value.not_retried.startswith("the retry budget of 1 s would be exceeded")
    assert f"not retried: {budget.value.not_retried})" in str(budget.value)
    # The attempts running out is no limit cutting the retries short: `attempts=4` says it.
    assert (None, 4) == (used_up.value.not_retried, used_up.value.attempts)
    assert "not retried" not in str(used_up.value)


def test_a_retry_the_total_timeout_would_cut_says_so() -> None:
    """A wait that would run past `total` is not made, and the error says that was the limit."""
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503, "retry_after": 1}})
        with pytest.raises(InternalServerError) as info:
            client(upstream, timeout=Timeouts(total=0.5)).chat.complete(
                model="m", messages=MESSAGES
            )
    assert info.value.not_retried is not None
    assert info.value.not_retried.startswith("the total timeout of 0.5 s would pass")


def test_a_restart_cut_short_by_a_limit_says_which() -> None:
    """`not_retried` is on the interruption too when the reconnect met the limit (it was only
    in the message), and the message says it once."""
    with serve() as upstream:
        upstream.enqueue(
            {"fault": "drop@3"}, {"fault": {"kind": "status", "status": 429, "retry_after": 120}}
        )
        with pytest.raises(StreamInterruptedError, match="the restart failed") as info:
            client(upstream).chat.complete(model="m", messages=MESSAGES)
    why = "the server asked to wait 120 s, longer than max_retry_after of 60 s"
    assert why == info.value.not_retried
    assert 1 == str(info.value).count(why)


# -- a retry queued behind another stream: `total` bounds the wait, the retry budget does not ---

BUSY = MockResponse(status_code=503, chunks=[b'{"error": {"message": "busy"}}'])


class _QueuedRetry:
    """A's first attempt gets a 503 once B (started by `hold`) is queued behind it for the one
    slot; B then holds the slot, and A's retry waits in the queue. The requests after: B's
    answer, another 503 for A, then A's answer."""

    def __init__(self, limiter: RateLimiter, hold: Callable[[], None]) -> None:
        self.limiter, self.hold = limiter, hold
        self.answers = [MockResponse(), BUSY, MockResponse()]
        self.first = True

    def __call__(self, request: holysheep.Request) -> MockResponse:
        if self.first:
            self.first = False
            self.hold()
            deadline = time.monotonic() + 5
            while self.limiter.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            return BUSY
        return self.answers.pop(0)

    async def answer(self, request: holysheep.Request) -> MockResponse:
        if self.first:
            self.first = False
            self.hold()
            with anyio.fail_after(5):
                while self.limiter.waiting == 0:
                    await anyio.sleep(0.001)
            return BUSY
        return self.answers.pop(0)


def test_total_bounds_a_retry_waiting_in_the_limiters_queue() -> None:
    """`total` was not enforced while a retry waited for a slot: with total=2 the error came
    after 6 s, when the holder let go, and the retry was sent past the deadline."""
    limiter = RateLimiter(max_concurrent=1)
    released = threading.Event()
    threads: list[threading.Thread] = []

    def hold() -> None:
        def holder() -> None:
            with made.chat.stream(model="m", messages=MESSAGES, timeout=Timeouts(total=10)):
                released.wait(5)

        threads.append(threading.Thread(target=holder))
        threads[0].start()

    transport = MockTransport(_QueuedRetry(limiter, hold))
    made = holysheep.Client(
        api_key="k", transport=transport, limiter=limiter, retry=FAST, timeout=Timeouts(total=0.5)
    )
    started = time.monotonic()
    with pytest.raises(holysheep.TotalTimeoutError, match="rate limiter's queue") as info:
        made.chat.complete(model="m", messages=MESSAGES)
    took = time.monotonic() - started
    released.set()
    threads[0].join(5)
    assert 0.4 < took < 2.0
    assert 1 == info.value.attempts  # the queued retry was never sent
    assert 2 == len(transport.requests)  # A's first, B's
    made.close()
    assert (0, 0) == (limiter.in_flight, limiter.waiting)


@pytest.mark.anyio
async def test_async_total_bounds_a_retry_waiting_in_the_limiters_queue() -> None:
    limiter = RateLimiter(max_concurrent=1)
    async with anyio.create_task_group() as group:

        async def holder() -> None:
            async with made.chat.stream(model="m", messages=MESSAGES, timeout=Timeouts(total=10)):
                await anyio.sleep(5)

        transport = AsyncMockTransport(
            _QueuedRetry(limiter, lambda: group.start_soon(holder)).answer
        )
        async with holysheep.AsyncClient(
            api_key="k",
            transport=transport,
            limiter=limiter,
            retry=FAST,
            timeout=Timeouts(total=0.5),
        ) as made:
            started = time.monotonic()
            with pytest.raises(holysheep.TotalTimeoutError, match="rate limiter's queue"):
                await made.chat.complete(model="m", messages=MESSAGES)
            took = time.monotonic() - started
            group.cancel_scope.cancel()
    assert 0.4 < took < 2.0
    assert 2 == len(transport.requests)


def test_time_in_the_limiters_queue_does_not_use_up_the_retry_budget() -> None:
    """The budget counted a retry's wait for a slot: a 0.3 s budget gave up after the second
    503 because the retry had queued 1 s behind another stream, although the docs say the
    queue's time is not the budget's."""
    limiter = RateLimiter(max_concurrent=1)

    def hold() -> None:
        def holder() -> None:
            with made.chat.stream(model="m", messages=MESSAGES, timeout=Timeouts(total=10)):
                time.sleep(1.0)

        threading.Thread(target=holder).start()

    transport = MockTransport(_QueuedRetry(limiter, hold))
    made = holysheep.Client(
        api_key="k",
        transport=transport,
        limiter=limiter,
        retry=RetryPolicy(timeout=0.3, wait_initial=0.001, wait_jitter=0),
    )
    with made.chat.stream(model="m", messages=MESSAGES) as stream:
        assert "Hello!" == stream.until_done().text
    assert 3 == stream.stats.attempts
    assert stream.stats.queued > 0.8
    made.close()


# -- closing the client while its streams wait to send -----------------------------------------

BUSY_WITH_ID = MockResponse(
    status_code=503, chunks=[b'{"error": {"message": "busy"}}'], headers={"x-request-id": "req_9"}
)
SLOW_RETRY = RetryPolicy(wait_initial=30, wait_jitter=0)


def test_closing_the_client_wakes_its_waiting_streams() -> None:
    """Streams queued in the limiter, or waiting 30 s to retry a 503, went on waiting after
    `Client.close()`, then failed on the closed transport ("RequestsTransport is closed"), the
    503's status, message and request id lost. They wake at once, and say why."""
    limiter = RateLimiter(max_concurrent=1)
    transport = MockTransport(lambda request: MockResponse())
    made = holysheep.Client(api_key="k", transport=transport, limiter=limiter)
    holder = made.chat.stream(model="m", messages=MESSAGES)
    holder.open()  # holds the only slot
    errors: list[BaseException] = []

    def queued() -> None:
        try:
            made.chat.complete(model="m", messages=MESSAGES)
        except holysheep.HolySheepError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=queued) for _ in range(3)]
    for thread in threads:
        thread.start()
    while limiter.waiting < 3:
        time.sleep(0.001)
    started = time.monotonic()
    made.close()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() - started < 1.0
    assert 3 == len(errors)
    assert all(isinstance(e, holysheep.LocalProtocolError) for e in errors)
    assert "never sent" in str(errors[0])
    assert 1 == len(transport.requests)  # the holder's only
    holder.close()


def test_closing_the_client_during_a_retry_wait_raises_the_error_it_was_to_retry() -> None:
    transport = MockTransport([BUSY_WITH_ID])
    made = holysheep.Client(api_key="k", transport=transport, retry=SLOW_RETRY)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            made.chat.complete(model="m", messages=MESSAGES)
        except holysheep.HolySheepError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    while not transport.requests:
        time.sleep(0.001)
    time.sleep(0.05)  # into the 30 s wait
    started = time.monotonic()
    made.close()
    thread.join(5)
    assert time.monotonic() - started < 1.0
    (error,) = errors
    assert isinstance(error, holysheep.InternalServerError)
    assert (503, "req_9") == (error.status_code, error.request_id)
    assert "busy" in str(error)
    assert error.not_retried is not None
    assert "client was closed" in error.not_retried


@pytest.mark.anyio
async def test_async_closing_the_client_wakes_its_waiting_streams() -> None:
    limiter = RateLimiter(max_concurrent=1)
    transport = AsyncMockTransport([BUSY_WITH_ID, MockResponse()])
    made = holysheep.AsyncClient(
        api_key="k", transport=transport, limiter=limiter, retry=SLOW_RETRY
    )
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await made.chat.complete(model="m", messages=MESSAGES)
        except holysheep.HolySheepError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(call)  # gets the 503, then waits 30 s to retry
        while not transport.requests:
            await anyio.sleep(0.001)
        holder = made.chat.stream(model="m", messages=MESSAGES)
        await holder.open()  # the slot, meanwhile
        for _ in range(3):
            group.start_soon(call)  # queued behind it
        while limiter.waiting < 3:
            await anyio.sleep(0.001)
        started = anyio.current_time()
        await made.aclose()
    assert anyio.current_time() - started < 1.0
    assert 4 == len(errors)
    retried = [e for e in errors if isinstance(e, holysheep.InternalServerError)]
    assert 1 == len(retried)
    assert "req_9" == retried[0].request_id
    assert retried[0].not_retried is not None
    assert 3 == sum("never sent" in str(e) for e in errors)
    await holder.aclose()
