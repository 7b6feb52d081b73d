"""The browser relays of docs/browsers.md (examples/browser_relay*.py), over real sockets.

Three servers on 127.0.0.1: the local upstream (holysheep.testing), the relay with its client,
and this file as the browser, which reads the relay's events with our own `SSEDecoder`. The
upstream's faults and its disconnect counter show what the relay does to the gateway.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import runpy
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import holysheep
from holysheep import RetryPolicy, ServerSentEvent, SSEDecoder
from holysheep.testing import MockUpstream, UpstreamConfig, serve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SYNC = runpy.run_path(str(EXAMPLES / "browser_relay.py"))
TEXT = "".join(UpstreamConfig(tokens=12).token_list(None))
FAST = RetryPolicy(wait_initial=0.01, wait_jitter=0)


@pytest.fixture
def anyio_backend() -> str:
    """The async relay runs on aiohttp.web, which is asyncio-only."""
    return "asyncio"


# -- the browser -----------------------------------------------------------------------------


@contextlib.contextmanager
def browse(
    port: int, path: str = "/chat?q=hi", body: Any = None
) -> Iterator[http.client.HTTPResponse]:
    """Open the relay's event stream as a browser does (`EventSource`: GET; `fetch`: POST)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if body is None:
            connection.request("GET", path)
        else:
            headers = {"Content-Type": "application/json"}
            connection.request("POST", path, body=json.dumps(body), headers=headers)
        with connection.getresponse() as response:
            yield response
    finally:
        # The response had the socket (an HTTP/1.0 answer ends when it closes): it is closed
        # now, and the browser has left.
        connection.close()


def events_of(response: http.client.HTTPResponse) -> Iterator[ServerSentEvent]:
    """The events as they arrive."""
    decoder = SSEDecoder()
    while data := response.read1(65536):
        yield from decoder.feed(data)
    yield from decoder.close()


def fetch(port: int, path: str = "/chat?q=hi", body: Any = None) -> list[ServerSentEvent]:
    with browse(port, path, body) as response:
        assert 200 == response.status
        return list(events_of(response))


def texts(events: list[ServerSentEvent]) -> str:
    assert all("message" == event.event for event in events), events
    return "".join(event.json()["text"] for event in events)


@contextlib.contextmanager
def sync_relay(client: holysheep.Client, keepalive: float = 15.0) -> Iterator[int]:
    """examples/browser_relay.py's relay for `client`, on a free port."""
    relay = SYNC["RelayServer"](("127.0.0.1", 0), client, keepalive=keepalive)
    # Polling 20 times a second, `shutdown()` returns at once rather than in up to 0.5 s.
    threading.Thread(target=relay.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield relay.server_address[1]
    finally:
        relay.shutdown()
        relay.server_close()


def client_for(upstream: MockUpstream, **options: Any) -> holysheep.Client:
    return holysheep.Client(api_key="k", base_url=upstream.base_url, **options)


# -- a whole answer ----------------------------------------------------------------------------


def test_an_answer_arrives_as_text_events_then_done() -> None:
    """One `{"text"}` event per piece, in order, then `done` with the finish reason, usage
    and the upstream's request id, and the response ends; unbuffered, uncached."""
    with (
        serve(tokens=12) as upstream,
        client_for(upstream) as client,
        sync_relay(client) as port,
        browse(port, "/chat?q=Tell+me+about+sheep.") as response,
    ):
        headers = {name.lower(): value for name, value in response.getheaders()}
        *pieces, done = events_of(response)
    assert "text/event-stream; charset=utf-8" == headers["content-type"]
    assert ("no-cache", "no") == (headers["cache-control"], headers["x-accel-buffering"])
    assert TEXT == texts(pieces)
    assert 12 == len(pieces)  # not batched: an event per piece the upstream sent
    assert "done" == done.event
    payload = done.json()
    assert {"finish_reason", "usage", "request_id"} == set(payload)
    assert "stop" == payload["finish_reason"]
    assert 12 == payload["usage"]["completion_tokens"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", payload["request_id"])  # the upstream's own id
    sent = upstream.requests[-1].body
    assert [{"role": "user", "content": "Tell me about sheep."}] == sent["messages"]
    assert (SYNC["MODEL"], SYNC["MAX_TOKENS"]) == (sent["model"], sent["max_tokens"])


def test_a_conversation_can_be_posted() -> None:
    """`fetch` POSTs the whole conversation; it reaches the upstream as it was sent."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me about sheep."},
    ]
    with serve(tokens=12) as upstream, client_for(upstream) as client, sync_relay(client) as port:
        *pieces, done = fetch(port, "/chat", {"messages": messages})
        with browse(port, "/chat", {"no": "messages"}) as refused:
            assert 400 == refused.status
    assert (TEXT, "done") == (texts(pieces), done.event)
    assert messages == upstream.requests[-1].body["messages"]
    assert 1 == len(upstream.requests)  # the refused one never reached the upstream


def test_keep_alive_comments_fill_a_long_wait_for_the_first_token() -> None:
    """While the upstream thinks, comment lines keep proxies from cutting the idle response;
    an SSE parser (ours, a browser's) skips them."""
    with (
        serve(tokens=3, ttft=0.5) as upstream,
        client_for(upstream) as client,
        sync_relay(client, keepalive=0.1) as port,
        browse(port) as response,
    ):
        raw = response.read()
    before_first_text = raw[: raw.index(b"data: ")]
    assert before_first_text.count(b": keep-alive\n\n") >= 3
    *pieces, done = SSEDecoder().feed(raw)
    assert ("".join(UpstreamConfig(tokens=3).token_list(None)), "done") == (
        texts(pieces),
        done.event,
    )


# -- the browser leaves ------------------------------------------------------------------------


def test_a_browser_leaving_mid_answer_closes_the_upstream_stream_at_once() -> None:
    """Closing the tab stops the tokens the gateway bills: the upstream sees the relay leave
    within a few tokens' time, and no other request is made."""
    with (
        serve(tokens=500, tokens_per_s=50) as upstream,
        client_for(upstream) as client,
        sync_relay(client) as port,
    ):
        with browse(port) as response:
            events = events_of(response)
            for _ in range(3):
                assert "message" == next(events).event
        left = time.monotonic()
        assert upstream.wait_for_disconnect(timeout=2)
        assert time.monotonic() - left < 1  # a token is 20 ms; the relay notices at a write
        assert 1 == len(upstream.requests)


def test_a_browser_leaving_before_the_first_token_closes_the_upstream_stream() -> None:
    """With nothing to send, the relay finds the browser gone within `LEAVE_CHECK`, well before
    its next keep-alive: a write after the browser's FIN still succeeds, so waiting for a
    failed write kept the upstream stream (and its bill) running for two keep-alives."""
    with (
        serve(tokens=5, ttft=30) as upstream,
        client_for(upstream) as client,
        sync_relay(client, keepalive=5) as port,
    ):
        with browse(port) as response:
            assert 200 == response.status
            while len(upstream.requests) < 1:
                time.sleep(0.01)
        left = time.monotonic()
        assert upstream.wait_for_disconnect(timeout=3)
        assert time.monotonic() - left < 1.5  # LEAVE_CHECK is 0.5 s; a keep-alive 5 s


# -- the upstream fails ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "shown", "kind", "status"),
    [
        ("drop@5", 5, "StreamInterruptedError", 200),
        ("inband_error@3", 3, "StreamError", 200),
        ("invalid_json@2", 2, "RemoteProtocolError", 200),
        ({"kind": "status", "status": 500}, 0, "InternalServerError", 500),
        ({"kind": "status", "status": 429}, 0, "RateLimitError", 429),
    ],
)
def test_an_upstream_failure_reaches_the_browser_as_an_error_event(
    fault: Any, shown: int, kind: str, status: int
) -> None:
    """The text sent so far stays sent, then one `error` event says what happened and how much
    text the browser has, and the response ends."""
    tokens = UpstreamConfig(tokens=12).token_list(None)
    with (
        serve(tokens=12) as upstream,
        client_for(upstream, retry=RetryPolicy.none()) as client,
        sync_relay(client) as port,
    ):
        upstream.enqueue({"fault": fault})
        *pieces, error = fetch(port)
    assert "".join(tokens[:shown]) == texts(pieces)
    assert "error" == error.event
    payload = error.json()
    assert {"type", "message", "status", "request_id", "text_length"} == set(payload)
    assert (kind, status) == (payload["type"], payload["status"])
    assert len(texts(pieces)) == payload["text_length"]
    assert payload["message"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", payload["request_id"])


def test_a_stalled_upstream_ends_in_an_idle_timeout_error_event() -> None:
    """A gateway that stops mid-answer is cut by the client's idle timeout, and said so."""
    with (
        serve(tokens=12) as upstream,
        client_for(upstream, retry=RetryPolicy.none(), timeout=holysheep.Timeouts(idle=0.3)) as c,
        sync_relay(c) as port,
    ):
        upstream.enqueue({"fault": "stall@4"})
        *pieces, error = fetch(port)
    assert ("IdleTimeoutError", len(texts(pieces))) == (
        error.json()["type"],
        error.json()["text_length"],
    )


def test_the_text_length_counts_characters_not_bytes() -> None:
    """`text_length` tells the page how much of the answer it has: in characters, as the page
    counts them (a count of UTF-8 bytes passed for ASCII text, and the other tests sent only
    that)."""
    with (
        serve(tokens=12, text="Les moutons été 🐑 naïfs, 日本語, über alles.") as upstream,
        client_for(upstream, retry=RetryPolicy.none()) as client,
        sync_relay(client) as port,
    ):
        upstream.enqueue({"fault": "drop@8"})
        *pieces, error = fetch(port)
    shown = texts(pieces)
    assert not shown.isascii()
    assert len(shown) == error.json()["text_length"]


def test_browsers_at_once_each_get_their_own_answer() -> None:
    """Ten browsers at once, each answered with a text of its own: each gets one whole text,
    and no text goes to two (a relay sharing anything between requests mixes them)."""
    answers = [f"Answer number {i}: " + "sheep " * (i + 3) for i in range(10)]
    got: list[str] = []
    with (
        serve(tokens_per_s=200) as upstream,
        client_for(upstream) as client,
        sync_relay(client) as port,
    ):
        upstream.enqueue(*({"text": text, "tokens": None} for text in answers))
        threads = [
            threading.Thread(target=lambda: got.append(texts(fetch(port)[:-1]))) for _ in answers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert sorted(answers) == sorted(got)


# -- restarts ------------------------------------------------------------------------------------


def test_a_restart_shows_no_text_twice() -> None:
    """on_interrupt="restart": the answer starts over upstream, and the browser, which only
    appends, gets every piece of text once (`text_stream()` skips the repeated beginning)."""
    with (
        serve(tokens=12) as upstream,
        client_for(upstream, retry=FAST, on_interrupt="restart") as client,
        sync_relay(client) as port,
    ):
        upstream.enqueue({"fault": "drop@4"})
        *pieces, done = fetch(port)
    assert 2 == len(upstream.requests)  # it did restart
    assert (TEXT, "done") == (texts(pieces), done.event)
    assert "stop" == done.json()["finish_reason"]


def test_a_restart_that_answers_otherwise_ends_in_an_error_not_in_mixed_text() -> None:
    """A new answer that differs cannot be appended to what the browser shows: an `error`
    event (StreamInterruptedError) with the first answer's text kept."""
    tokens = UpstreamConfig(tokens=12).token_list(None)
    with (
        serve(tokens=12) as upstream,
        client_for(upstream, retry=FAST, on_interrupt="restart") as client,
        sync_relay(client) as port,
    ):
        upstream.enqueue({"fault": "drop@4"}, {"text": "Goats are not sheep, whatever they say."})
        *pieces, error = fetch(port)
    assert "".join(tokens[:4]) == texts(pieces)
    payload = error.json()
    assert ("error", "StreamInterruptedError") == (error.event, payload["type"])
    assert len("".join(tokens[:4])) == payload["text_length"]


# -- the aiohttp relay -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def aiohttp_relay(upstream: MockUpstream, **options: Any) -> AsyncIterator[int]:
    """examples/browser_relay_aiohttp.py's app for `upstream`, on a free port."""
    from aiohttp import web

    example = runpy.run_path(str(EXAMPLES / "browser_relay_aiohttp.py"))
    app = example["make_app"](api_key="k", base_url=upstream.base_url, **options)
    runner = web.AppRunner(app)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    try:
        yield listener.getsockname()[1]
    finally:
        await runner.cleanup()


@pytest.mark.anyio
async def test_the_aiohttp_relay_speaks_the_same_events() -> None:
    """The same answer, as the same events, from aiohttp.web; a failure too."""
    pytest.importorskip("aiohttp")
    with serve(tokens=12) as upstream:
        async with aiohttp_relay(upstream, retry=RetryPolicy.none()) as port:
            body = {"messages": [{"role": "user", "content": "Hi"}]}
            *pieces, done = await anyio.to_thread.run_sync(fetch, port, "/chat", body)
            upstream.enqueue({"fault": "drop@5"})
            *partial, error = await anyio.to_thread.run_sync(fetch, port)
    assert (TEXT, "done", "stop") == (texts(pieces), done.event, done.json()["finish_reason"])
    payload = error.json()
    assert ("error", "StreamInterruptedError") == (error.event, payload["type"])
    assert len(texts(partial)) == payload["text_length"] > 0


@pytest.mark.anyio
async def test_the_aiohttp_relay_closes_the_upstream_stream_when_the_browser_leaves() -> None:
    """As the sync relay: the upstream sees the relay leave within a few tokens' time."""
    pytest.importorskip("aiohttp")

    def leave_after_three(port: int) -> None:
        with browse(port) as response:
            events = events_of(response)
            for _ in range(3):
                assert "message" == next(events).event

    with serve(tokens=500, tokens_per_s=50) as upstream:
        async with aiohttp_relay(upstream) as port:
            await anyio.to_thread.run_sync(leave_after_three, port)
            left = time.monotonic()
            assert await anyio.to_thread.run_sync(upstream.wait_for_disconnect, 2.0)
            assert time.monotonic() - left < 1


@pytest.mark.anyio
async def test_the_aiohttp_relay_sees_a_browser_leave_before_the_first_token() -> None:
    """As the sync relay: well before the next keep-alive."""
    pytest.importorskip("aiohttp")

    def ask_then_leave(port: int) -> None:
        with browse(port) as response:
            assert 200 == response.status
            while len(upstream.requests) < 1:
                time.sleep(0.01)

    with serve(tokens=5, ttft=30) as upstream:
        async with aiohttp_relay(upstream, keepalive=5) as port:
            await anyio.to_thread.run_sync(ask_then_leave, port)
            left = time.monotonic()
            assert await anyio.to_thread.run_sync(upstream.wait_for_disconnect, 3.0)
            assert time.monotonic() - left < 1.5


def test_a_post_whose_messages_are_not_a_list_is_refused_before_the_stream() -> None:
    """A 400, not a 200 with an empty body: the stream is made before the head goes."""
    with (
        serve(tokens=5) as upstream,
        client_for(upstream) as client,
        sync_relay(client) as port,
    ):
        for body in [{"messages": 5}, {"messages": None}, {"messages": ["hi"]}]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/chat", data=json.dumps(body).encode(), method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=5)
            info.value.close()
            assert 400 == info.value.code
        assert [] == upstream.requests


# -- the examples and the page -----------------------------------------------------------------


@pytest.mark.parametrize("script", ["browser_relay.py", "browser_relay_aiohttp.py"])
def test_the_example_runs_as_a_script(script: str) -> None:
    """With no arguments it asks its own relay once and prints the events, keep-alives first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLYSHEEP_")}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
        check=True,
    )
    out = result.stdout
    assert out.index(": keep-alive") < out.index('data: {"text": ') < out.index("event: done")
    assert '"finish_reason": "stop"' in out


def code_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(r"^```py(?:thon)?\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def without_imports(code: str) -> str:
    lines = [line for line in code.splitlines() if not line.startswith(("import ", "from "))]
    return "\n".join(lines).strip()


@pytest.mark.parametrize(
    ("marker", "script"),
    [
        ("class RelayHandler", "browser_relay.py"),
        ("async def chat(request", "browser_relay_aiohttp.py"),
    ],
)
def test_the_relay_on_the_page_is_the_example(marker: str, script: str) -> None:
    """docs/browsers.md shows the examples' relays as they are (imports aside), so the code a
    reader copies is the code these tests run."""
    (block,) = [block for block in code_blocks("browsers.md") if marker in block]
    relay = without_imports(block.split("# Try it")[0])
    assert relay in (EXAMPLES / script).read_text()
