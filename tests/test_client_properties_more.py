"""The clients' promise, end to end, where test_client_properties.py does not go.

The same scripted upstream and the same kind of model, with what that test leaves out:

- `n` > 1 choices, streamed interleaved or one after another (a gateway emulating `n`), cut
  anywhere, between two choices too: a stream that ends or breaks without `[DONE]` is complete
  only once each of the `n` choices asked for finished (chat.md, "End of stream and errors");
- tool calls whose arguments stream in pieces, parallel calls interleaved, cut in the middle;
  reasoning and an optional usage chunk;
- attempts refused before any response (`ConnectError`, `ConnectTimeoutError`: the transport
  raises, the request never left), and a hang: `k` events, then nothing until the connection
  is closed, which the `ttft`, `idle` or `total` timeout ends (timeouts.md);
- a resumed stream answered with another completion id (a server that ignores
  `Last-Event-ID` and starts a new answer is refused, resilience.md; one that goes on after it
  is taken as it comes);
- several choices in one chunk (a gateway batching the choices' tokens), and the usage
  alone at the end, on some chunks or counted up on every one: `completion.usage` holds the
  exact counts of the latest report the accumulation took, after a resume or restart too;
- the caller closing the stream from another thread or task, or cancelling its task, where
  it waits: in a read, in a send with no response head yet (a sync send cannot be cut short:
  it ends after the close, with a head, an error status or no connection), queued in the
  rate limiter, or waiting to retry (a long Retry-After): no attempt after that, no error,
  every response closed, what arrived on `stream.completion`, all within a bounded time.

Every client also goes through a shared `RateLimiter`, which must hold no ticket afterwards;
each attempt is settled at what it used, and an accumulation's attempts (a fresh request and
the ones resuming it) at its usage, once.

The model (`expect`) is written from the docs; `check` holds `Client` and `AsyncClient` (asyncio,
trio), read chunk by chunk, with `text_stream()` or with `complete()`, to it: the attempts and
their `Last-Event-ID`, every choice of the completion (or of the error's partial one), what the
caller saw of each choice (a `Reset` clears it), the error's type, status, request id and
attempts, and every response closed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import anyio
import attrs
import pytest
from _scripted import (
    ERRORS,
    KEEP_ALIVE,
    MESSAGES,
    NO_WAIT,
    as_complete,
    retried,
    split,
    status_response,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import holysheep
from holysheep import (
    Attempt,
    BadRequestError,
    Completion,
    ConnectError,
    ConnectTimeoutError,
    ContentDelta,
    Finished,
    FirstTokenTimeoutError,
    HolySheepError,
    IdleTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    RateLimiter,
    RateLimitError,
    ReasoningDelta,
    RemoteProtocolError,
    StreamError,
    StreamInterruptedError,
    Ticket,
    Timeouts,
    ToolCallDelta,
    TotalTimeoutError,
    UsageReport,
)
from holysheep._gate import Gate, gate_for
from holysheep.transports import (
    AsyncMockTransport,
    AsyncResponse,
    MockResponse,
    MockTransport,
    Request,
    Response,
)

# The short timeouts of a world whose hang a timeout ends. Everything else in such a world is
# instant (a scripted response, no waits between attempts), so a read takes microseconds to
# these quarter seconds (and the caller's own time between chunks does not count, see
# timeouts.md); a hang lasts until the connection is closed, so the timeout that ends it is
# the only real wait.
SHORT = 0.25  # ttft and idle
TOTAL = 0.5  # for the whole call: every attempt before the hang too
# A hang no timeout ends (a caller closes it, or a bug leaves it): how long before the test
# gives up on it, far beyond anything expected.
HANG_LIMIT = 30.0

# "complete": how `complete()` meets the default mode, which a "raise" world leaves to the
# client: "restart", but a body the server ended too early (a clean "eof") is not restarted.
Mode = Literal["raise", "resume", "restart", "complete"]
Kind = Literal["role", "reasoning", "content", "tool", "finish", "usage", "done"]
End = Literal["fault", "eof", "error", "fatal"]
# What ends a hang: its timeouts ("short": ttft and idle; "total"), or the caller ("close").
# With "close", the caller also closes the stream where it waits without reading: a send that
# gets no response head, a wait in the rate limiter, a wait before a retry (see `Step`).
Timer = Literal["short", "total", "close"]
# A Retry-After no test waits out: the caller closes the stream in it.
LONG_WAIT = 30


# -- the answer --------------------------------------------------------------------------------


@attrs.frozen
class Part:
    """One piece of the answer: what it says, for which choice."""

    kind: Kind
    choice: int = 0
    text: str = ""  # reasoning, content, tool arguments; the finish reason
    call: int = 0  # a tool call's index in its choice
    head: bool = False  # the call's first fragment: its id and name

    @property
    def progress(self) -> bool:
        """Whether the part is a delta (the caller got "content"): not a role, not `[DONE]`
        (chat.md: a chunk's `deltas`; the role is not one)."""
        return self.kind not in ("role", "done")

    @property
    def shows(self) -> bool:
        """Whether the part is a delta of its choice (a usage report is no choice's)."""
        return self.kind not in ("role", "done", "usage")


# One event: its parts, at most one per choice (a chunk's `choices` has one entry per index),
# and a usage report riding along or alone.
Event = tuple[Part, ...]
# A usage report's counts: prompt, completion, total tokens (a `Usage` may lack one).
Counts = tuple[int | None, int | None, int | None]


@attrs.frozen
class Answer:
    n: int
    events: tuple[Event, ...]  # in stream order, `[DONE]` alone last
    prompt_tokens: int = 0  # usage: the prompt's count, and the completion's before event 0
    base_tokens: int = 0

    def usage(self, index: int) -> tuple[int, int, int]:
        """The usage event `index` reports: cumulative (gateways that report usage on every
        chunk count up), so each report differs from the one before and "the latest wins"
        (chat.md) is seen."""
        completion = self.base_tokens + index
        return self.prompt_tokens, completion, self.prompt_tokens + completion

    def parts(self, indexes: list[int]) -> Iterator[tuple[int, Part]]:
        """The parts of these events, in order, each with its event's index."""
        for i in indexes:
            for part in self.events[i]:
                yield i, part

    def progress(self, index: int) -> bool:
        """Whether event `index` carries a delta: a chunk the caller got "content" from."""
        return any(part.progress for part in self.events[index])

    def data(self, index: int, completion_id: str) -> str:
        event = self.events[index]
        if event[0].kind == "done":
            return "[DONE]"
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk"}
        body["model"] = "m"
        choices = [choice_data(part) for part in event if part.kind != "usage"]
        body["choices"] = choices
        if any(part.kind == "usage" for part in event):
            prompt, completion, total = self.usage(index)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion}
            body["usage"] = {**usage, "total_tokens": total}
        return json.dumps(body, ensure_ascii=False)

    def finished(self, indexes: list[int]) -> bool:
        """Whether these events finish every one of the `n` choices (chat.md: choices that
        never began count as unfinished)."""
        done = {part.choice for _, part in self.parts(indexes) if part.kind == "finish"}
        return len(done) == self.n

    @property
    def text(self) -> str:
        parts = self.parts(list(range(len(self.events))))
        return "".join(p.text for _, p in parts if p.kind == "content" and p.choice == 0)


def choice_data(part: Part) -> dict[str, Any]:
    """A part as its entry in a chunk's `choices`."""
    delta: dict[str, Any] = {}
    finish = None
    if part.kind == "role":
        delta = {"role": "assistant", "content": ""}
    elif part.kind == "reasoning":
        delta = {"reasoning_content": part.text}
    elif part.kind == "content":
        delta = {"content": part.text}
    elif part.kind == "tool":
        fragment: dict[str, Any] = {"index": part.call, "function": {"arguments": part.text}}
        if part.head:
            fragment["id"] = call_id(part.choice, part.call)
            fragment["type"] = "function"
            fragment["function"]["name"] = tool_name(part.call)
        delta = {"tool_calls": [fragment]}
    else:
        finish = part.text
    return {"index": part.choice, "delta": delta, "finish_reason": finish}


def call_id(choice: int, call: int) -> str:
    return f"call_{choice}_{call}"


def tool_name(call: int) -> str:
    return ("get_weather", "lookup", "book")[call % 3]


# What a caller or a completion holds of each choice: its text, reasoning, tool calls
# ((index, id, name, arguments), by index) and finish reason.
ChoiceView = tuple[str, str, tuple[tuple[int, str | None, str | None, str], ...], str | None]
# Choices by index, and the usage's counts (None: none came).
View = tuple[dict[int, ChoiceView], Counts | None]


def snapshot(answer: Answer, indexes: list[int]) -> View:
    """The completion these events accumulate to: a choice exists from its first event."""
    texts: dict[int, list[str]] = {}
    reasoning: dict[int, list[str]] = {}
    calls: dict[int, dict[int, list[str]]] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for i, part in answer.parts(indexes):
        if part.kind == "usage":
            usage = answer.usage(i)  # the latest wins (chat.md)
            continue
        if part.kind == "done":
            continue
        c = part.choice
        texts.setdefault(c, [])
        reasoning.setdefault(c, [])
        calls.setdefault(c, {})
        finish.setdefault(c, None)
        if part.kind == "content":
            texts[c].append(part.text)
        elif part.kind == "reasoning":
            reasoning[c].append(part.text)
        elif part.kind == "tool":
            calls[c].setdefault(part.call, []).append(part.text)
        elif part.kind == "finish":
            finish[c] = part.text
    return (
        {
            c: (
                "".join(texts[c]),
                "".join(reasoning[c]),
                tuple(
                    (k, call_id(c, k), tool_name(k), "".join(calls[c][k])) for k in sorted(calls[c])
                ),
                finish[c],
            )
            for c in texts
        },
        usage,
    )


def shown_view(answer: Answer, indexes: list[int]) -> View:
    """What a caller reading the deltas of these events has of each choice: a choice shows
    once one of its events carries a delta (a role alone is none)."""
    choices, usage = snapshot(answer, indexes)
    with_deltas = {part.choice for _, part in answer.parts(indexes) if part.shows}
    return {c: v for c, v in choices.items() if c in with_deltas}, usage


def view_of(completion: Completion | None) -> View:
    if completion is None:
        return {}, None
    usage = completion.usage
    return (
        {
            choice.index: (
                choice.text,
                choice.reasoning or "",
                tuple((t.index, t.id, t.name, t.arguments) for t in choice.tool_calls),
                choice.finish_reason,
            )
            for choice in completion.choices
        },
        None
        if usage is None
        else (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
    )


@attrs.define
class Screen:
    """What a caller reading chunks has, built from their deltas; a `Reset` clears it."""

    texts: dict[int, str] = attrs.Factory(dict)
    reasoning: dict[int, str] = attrs.Factory(dict)
    calls: dict[tuple[int, int], list[Any]] = attrs.Factory(dict)  # [id, name, arguments]
    finish: dict[int, str] = attrs.Factory(dict)
    usage: Counts | None = None
    choices: set[int] = attrs.Factory(set)
    resets: int = 0

    def take(self, chunk: holysheep.ChatChunk) -> None:
        if chunk.reset is not None:  # start over, as the caller clears its screen
            self.texts, self.reasoning, self.calls, self.finish = {}, {}, {}, {}
            self.usage, self.choices, self.resets = None, set(), self.resets + 1
        for delta in chunk.deltas:
            match delta:
                case ContentDelta(text=text, choice=c):
                    self.texts[c] = self.texts.get(c, "") + text
                    self.choices.add(c)
                case ReasoningDelta(text=text, choice=c):
                    self.reasoning[c] = self.reasoning.get(c, "") + text
                    self.choices.add(c)
                case ToolCallDelta(index=k, id=id_, name=name, arguments=arguments, choice=c):
                    call = self.calls.setdefault((c, k), [None, None, ""])
                    call[0] = call[0] or id_
                    call[1] = call[1] or name
                    call[2] += arguments
                    self.choices.add(c)
                case Finished(reason=reason, choice=c):
                    self.finish[c] = reason
                    self.choices.add(c)
                case UsageReport(usage=usage):
                    self.usage = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        assert chunk.text == "".join(
            d.text for d in chunk.deltas if isinstance(d, ContentDelta) and d.choice == 0
        )

    def view(self) -> View:
        return (
            {
                c: (
                    self.texts.get(c, ""),
                    self.reasoning.get(c, ""),
                    tuple((k, *self.calls[(c, k)]) for (cc, k) in sorted(self.calls) if cc == c),
                    self.finish.get(c),
                )
                for c in self.choices
            },
            self.usage,
        )


# -- the upstream ------------------------------------------------------------------------------


@attrs.frozen
class Step:
    """What the server does with one attempt."""

    # "block": the request goes out and no response head comes until the caller closed the
    # stream. An async send is cancelled then; a sync one cannot be cut short (it would end at
    # the transport's head timeout, transports.md), so here it ends once the caller closed, as
    # `then` says. "queue": the attempt waits in the rate limiter, whose only slot another
    # user holds, until the caller closes it: it is never sent.
    kind: Literal["ok", "status", "cut", "hang", "refuse", "block", "queue"] = "ok"
    status: int = 200
    wait: bool = False  # "status" 429 or 503: Retry-After LONG_WAIT, the caller closes in it
    then: Literal["ok", "status", "refuse"] = "ok"  # "block": a stream, a 503, or no connection
    k: int = 0  # "cut", "hang": events sent before the end
    end: End = "fault"  # "cut"
    partial: bool = False  # "cut" by "fault"/"eof": half of the next event before the end
    sizes: tuple[int, ...] = ()  # read sizes, cycled; () is one read
    keep_alive: bool = False  # a comment before every event
    refusal: Literal["connect", "timeout"] = "connect"  # "refuse": how the connect fails


@attrs.frozen
class World:
    answer: Answer
    script: tuple[Step, ...]
    ids: bool  # the server sends SSE event ids
    replay: bool  # ... and ignores Last-Event-ID, sending every event again
    new_id: bool  # every response is another completion (its own id)
    mode: Mode
    attempts: int
    timer: Timer | None  # what ends the script's hang (one at most)
    closer: Literal["close", "cancel"] = "close"  # how an async caller stops ("close" timer)

    def step(self, attempt: int) -> Step:
        return self.script[attempt - 1] if attempt <= len(self.script) else Step()

    def start(self, last_event_id: str | None) -> int:
        return 0 if self.replay or last_event_id is None else int(last_event_id)

    def completion_id(self, attempt: int) -> str:
        return f"chatcmpl-{attempt}" if self.new_id else "chatcmpl-more"

    def timeouts(self) -> Timeouts:
        if self.timer == "short":
            return Timeouts(ttft=SHORT, idle=SHORT)
        if self.timer == "total":
            return Timeouts(ttft=5, idle=60, total=TOTAL)
        return Timeouts(ttft=5, idle=60)


class Upstream:
    """Answers the requests of one call as `world` says; records what was opened and closed,
    and holds a hanging response until it is closed."""

    def __init__(self, world: World, hanging: Callable[[], None] = lambda: None) -> None:
        self.world = world
        self.requests: list[Request] = []
        self.closed: list[bool] = []
        # Called when the client waits on the server ("block", "hang") or on a retry's wait
        # (see `client_options`): the caller may close the stream now.
        self.hanging = hanging
        self.hang_at: int | None = None  # the last response: hang after this many reads
        self._held: Request | None = None  # a blocked request, recorded already

    def holds(self, request: Request) -> bool:
        """Whether the server keeps `request` waiting for its head ("block"); it is recorded."""
        if self.world.step(len(self.requests) + 1).kind != "block":
            return False
        self.requests.append(request)
        self._held = request
        self.hanging()
        return True

    def respond(self, request: Request) -> MockResponse:
        if self._held is not request:
            self.requests.append(request)
        self._held = None
        attempt = len(self.requests)
        world, step = self.world, self.world.step(attempt)
        self.hang_at = None
        if step.kind == "refuse" or (step.kind == "block" and step.then == "refuse"):
            if step.refusal == "timeout":
                raise ConnectTimeoutError("connect timeout (scripted)", limit=10, elapsed=10)
            raise ConnectError("connection refused (scripted)")
        request_id = {"x-request-id": f"srv-{attempt}"}
        if step.kind == "status" or (step.kind == "block" and step.then == "status"):
            response = status_response(step.status if step.kind == "status" else 503, request_id)
            if step.wait:
                headers = {**response.headers, "retry-after": str(LONG_WAIT)}
                response = attrs.evolve(response, headers=headers)
            return response
        start = world.start(request.header("last-event-id"))
        cid = world.completion_id(attempt)
        served = list(range(start, len(world.answer.events)))
        if step.kind in ("ok", "block") or step.k >= len(served):
            return MockResponse(chunks=self._reads(served, step, cid), headers=request_id)
        sent, rest = served[: step.k], served[step.k :]
        reads = self._reads(sent, step, cid)
        if step.kind == "hang":
            self.hang_at = len(reads)
            return MockResponse(chunks=[*reads, b"never sent"], headers=request_id)
        tail = b""
        if step.end in ("fault", "eof") and step.partial:
            whole = self._event(rest[0], cid)
            tail = whole[: len(whole) // 2]
        elif step.end in ERRORS:
            tail = b"event: error\ndata: " + json.dumps({"error": ERRORS[step.end]}).encode()
            tail += b"\n\n"
        body = b"".join(reads) + tail
        fault = "connection reset by peer" if step.end == "fault" else None
        return MockResponse(chunks=split(body, step.sizes), headers=request_id, fault=fault)

    def _event(self, index: int, cid: str) -> bytes:
        head = f"id: {index + 1}\n" if self.world.ids else ""
        return f"{head}data: {self.world.answer.data(index, cid)}\n\n".encode()

    def _reads(self, events: list[int], step: Step, cid: str) -> list[bytes]:
        alive = KEEP_ALIVE if step.keep_alive else b""
        return split(b"".join(alive + self._event(i, cid) for i in events), step.sizes)

    def opened(self, close: Callable[[], Any], released: Callable[[], None]) -> Callable[[], Any]:
        """`close`, recorded as this response's; it also ends a hang."""
        index = len(self.closed)
        self.closed.append(False)

        def recorded() -> Any:
            self.closed[index] = True
            released()
            return close()

        return recorded


def held(
    reads: Iterator[bytes], at: int, released: threading.Event, hanging: Callable[[], None]
) -> Iterator[bytes]:
    """The first `at` reads, then nothing until the response is closed."""
    for _ in range(at):
        yield next(reads)
    hanging()
    released.wait(HANG_LIMIT)


async def aheld(
    reads: AsyncIterator[bytes], at: int, released: anyio.Event, hanging: Callable[[], None]
) -> AsyncIterator[bytes]:
    try:
        for _ in range(at):
            yield await reads.__anext__()
        hanging()
        with anyio.move_on_after(HANG_LIMIT):
            await released.wait()
    finally:
        close = getattr(reads, "aclose", None)  # MockTransport's body is a generator
        if close is not None:
            await close()


class RecordingTransport(MockTransport):
    """MockTransport, with each response's close recorded by the upstream, a hang, and a send
    held until the caller closed the stream (`unblock`)."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream.respond)
        self.upstream = upstream
        self.unblock = threading.Event()

    def send(self, request: Request) -> Response:
        if self.upstream.holds(request):
            self.unblock.wait(HANG_LIMIT)
        response = super().send(request)
        upstream, released = self.upstream, threading.Event()
        stream = response.stream
        if upstream.hang_at is not None:
            stream = held(stream, upstream.hang_at, released, upstream.hanging)
        close = upstream.opened(response.close, released.set)
        return attrs.evolve(response, stream=stream, close=close)


class AsyncRecordingTransport(AsyncMockTransport):
    """The async twin: a held send waits until it is cancelled (by the caller's close)."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream.respond)
        self.upstream = upstream

    async def send(self, request: Request) -> AsyncResponse:
        if self.upstream.holds(request):
            await anyio.sleep(HANG_LIMIT)
        response = await super().send(request)
        upstream, released = self.upstream, anyio.Event()
        stream = response.stream
        if upstream.hang_at is not None:
            stream = aheld(stream, upstream.hang_at, released, upstream.hanging)
        aclose = upstream.opened(response.aclose, released.set)
        return attrs.evolve(response, stream=stream, aclose=aclose)


# -- what must happen, from the docs -----------------------------------------------------------


@attrs.frozen
class Expected:
    last_event_ids: tuple[str | None, ...]  # one per attempt: the request's Last-Event-ID
    shown: View  # what a caller reading chunks has at the end (Resets clear it)
    resets: int
    completion: View  # the stream's completion at the end (complete on success)
    error: type[HolySheepError] | None = None
    status: int | None = None  # the error's status_code
    failure: View = ({}, None)  # the error's partial completion
    refused: bool = False  # the last attempt never got a response: the request id is ours
    # text_stream(): what it yielded (the longest text shown, see `Expected` in
    # test_client_properties.py) and the error it raises.
    yielded: str = ""
    yielded_error: type[HolySheepError] | None = None
    closed: bool = False  # the caller closed the stream (or cancelled) where it waited
    begun: int | None = None  # closed in the rate limiter: the attempts begun, one not sent
    # The usage of the last accumulation sent, which its attempts are charged all together.
    charged: Counts | None = None

    @property
    def attempts(self) -> int:
        return len(self.last_event_ids)


def expect(world: World) -> Expected:
    """The outcome of `world`'s call, by the documented rules (see test_client_properties.py
    for those it shares), and:

    - a stream without `[DONE]` is complete once every one of the `n` choices finished, with
      no event cut in the middle, whether its body ends, breaks or stalls (chat.md: on a
      resumed stream that brought nothing new, the stall is `ttft`'s); a choice that never
      began is unfinished;
    - a refused connection (`ConnectError`, `ConnectTimeoutError`) is retried like a dropped
      one (resilience.md); it has no status, and its request id is the one sent (errors.md);
    - a hang ends by `ttft` (no new content in the attempt: FirstTokenTimeoutError), `idle`
      (IdleTimeoutError), both retried like the others, or `total` (TotalTimeoutError, never
      retried) (timeouts.md); or by the caller, who closed the stream;
    - the caller closing the stream (or cancelling its task) where it waits, in a read, a
      send with no response head yet, the rate limiter's queue or a wait before a retry,
      ends it quietly: no attempt after that, and `stream.completion` keeps what arrived
      (tutorial.md, "Stopping early"); while a restart has not opened, no `Reset` was
      yielded, so that is the broken answer the caller still shows (resilience.md);
    - the usage is the latest one the accumulation got (chat.md), and the rate limiter is
      charged it once over the attempts of that accumulation, resumed ones included
      (resilience.md);
    - a resumed stream that starts by replaying delivered events with another completion id
      is refused: "the resume failed", a StreamInterruptedError (resilience.md);
    - text_stream() after a restart that failed before catching up: the error carries the
      text it yielded; a bare early end is a StreamInterruptedError, anything else keeps its
      type (resilience.md).
    """
    answer = world.answer
    mode, ids = world.mode, world.ids
    headers: list[str | None] = []
    accumulated: list[int] = []  # the events in the current accumulation
    shown: list[int] = []  # the events whose chunks the caller has, since the last Reset
    resets = 0
    longest = ""  # the longest text of choice 0 shown: what text_stream() has yielded
    delivered = pending_reset = False
    broken: View | None = None  # the completion when the stream broke, while reconnecting
    resume_from: str | None = None
    run_start = 0
    attempt = 0

    def text_of(indexes: list[int]) -> str:
        parts = answer.parts(indexes)
        return "".join(p.text for _, p in parts if p.kind == "content" and p.choice == 0)

    charged: Counts | None = None  # the usage of the last accumulation sent

    def closed(begun: int | None = None) -> Expected:
        """The caller closed the stream where it waited."""
        kept = broken if pending_reset and broken is not None else snapshot(answer, accumulated)
        shown_now = shown_view(answer, shown)
        return Expected(
            tuple(headers),
            shown_now,
            resets,
            kept,
            yielded=longest,
            closed=True,
            begun=begun,
            charged=charged,
        )

    while True:
        attempt += 1
        step = world.step(attempt)
        resuming = resume_from is not None
        if not resuming:
            accumulated = []
        if step.kind == "queue":
            return closed(begun=attempt)
        headers.append(resume_from if resuming else None)
        charged = snapshot(answer, accumulated)[1]
        if step.kind == "block":
            return closed()
        skip = set(accumulated) if mode == "resume" and ids else set()
        error: type[HolySheepError] = HolySheepError
        retryable = interruption = False
        clean_end = False  # the body ended, closed by the server, too early
        progressed = finished_ok = False
        last_id: str | None = None
        status: int | None = 200
        new: list[int] = []  # this attempt's events that are not replays
        if step.kind == "refuse":
            error = ConnectTimeoutError if step.refusal == "timeout" else ConnectError
            status, retryable, interruption = None, True, True
        elif step.kind == "status":
            status = step.status
            error = {429: RateLimitError, 400: BadRequestError}.get(status, InternalServerError)
            retryable, interruption = status != 400, False
        else:
            if pending_reset:
                pending_reset, broken, shown = False, None, []
                resets += 1
            start = world.start(headers[-1])
            served = list(range(start, len(answer.events)))
            whole = step.kind == "ok" or step.k >= len(served)
            sent = served if whole else served[: step.k]
            if resuming and world.replay and world.new_id and sent:
                # Another completion where the delivered one was to be replayed: refused at
                # its first event, which is not taken.
                error, retryable, interruption = RemoteProtocolError, False, False
                sent, whole = [], False
            for i in sent:
                if ids:
                    last_id = str(i + 1)
                if i in skip:
                    continue
                new.append(i)
                accumulated.append(i)
                shown.append(i)
                if answer.progress(i):
                    progressed = delivered = True
                    longest = max(longest, text_of(shown), key=len)
            if whole:
                finished_ok = True
            elif error is RemoteProtocolError:
                pass
            elif step.kind == "hang" and world.timer == "close":
                charged = snapshot(answer, accumulated)[1]
                return closed()
            elif step.kind == "hang":
                # Once every choice finished, a stall ends the answer (chat.md, timeouts.md).
                finished_ok = answer.finished(accumulated)
                if world.timer == "total":
                    error, retryable, interruption = TotalTimeoutError, False, False
                elif progressed:
                    error, retryable, interruption = IdleTimeoutError, True, True
                else:
                    error, retryable, interruption = FirstTokenTimeoutError, True, False
            else:
                if step.end in ("fault", "eof"):
                    finished_ok = answer.finished(accumulated) and not step.partial
                error = IncompleteStreamError if step.end in ("fault", "eof") else StreamError
                clean_end = step.end == "eof"
                retryable = interruption = step.end != "fatal"
        charged = snapshot(answer, accumulated)[1]
        if finished_ok:
            completion = snapshot(answer, accumulated)
            return Expected(
                tuple(headers),
                shown_view(answer, shown),
                resets,
                completion,
                yielded=longest,
                charged=charged,
            )

        # The attempt failed: what `Call.failed` decides, in the docs' words.
        if error in (IncompleteStreamError, StreamError):
            failure = snapshot(answer, accumulated)
        elif error in (FirstTokenTimeoutError, IdleTimeoutError, TotalTimeoutError) and new:
            failure = snapshot(answer, accumulated)  # a timeout: once the attempt had chunks
        else:
            failure = ({}, None)
        if progressed:
            broken = None  # a new interruption
            if mode == "resume":
                run_start = attempt - 1
        reconnecting = broken is not None
        interrupted = reconnecting or (delivered and interruption)
        retry = retried(
            mode,
            interrupted=interrupted,
            reconnecting=reconnecting,
            delivered=delivered,
            retryable=retryable,
            ids=ids,
            clean_end=clean_end,
            attempts_in_run=attempt - run_start,
            attempts=world.attempts,
        )
        if retry:
            if interrupted:
                if broken is None:
                    broken = snapshot(answer, accumulated)
                if mode == "resume":
                    resume_from = last_id or resume_from
                else:
                    delivered, resume_from, pending_reset = False, None, True
            if step.wait:
                return closed()  # in the wait before the next attempt
            continue
        if broken is not None:
            error, failure = StreamInterruptedError, broken
        elif delivered and error is IncompleteStreamError:
            error = StreamInterruptedError
        yielded_error = error
        if len(longest) > len(text_of(shown)):  # text_stream() is still repeating
            yielded_error = StreamInterruptedError if error is IncompleteStreamError else error
        return Expected(
            tuple(headers),
            shown_view(answer, shown),
            resets,
            snapshot(answer, accumulated),
            error,
            status,
            failure,
            step.kind == "refuse",
            longest,
            yielded_error,
            charged=charged,
        )


# -- the strategies ----------------------------------------------------------------------------

# Any text UTF-8 can carry (multi-byte characters put read boundaries inside them).
pieces = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=4)
sizes = st.lists(st.integers(1, 30), max_size=3).map(tuple)


def interleave(draw: st.DrawFn, runs: list[list[Part]]) -> list[Part]:
    """The parts of `runs`, each run in its order, the runs interleaved as hypothesis likes."""
    tags = [n for n, run in enumerate(runs) for _ in run]
    taken = [iter(run) for run in runs]
    return [next(taken[n]) for n in draw(st.permutations(tags))]


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    n = draw(st.sampled_from([2, 3, 1]))
    choices = []
    for c in range(n):
        reasoning = [Part("reasoning", c, t) for t in draw(st.lists(pieces, max_size=1))]
        content = [Part("content", c, t) for t in draw(st.lists(pieces, max_size=3))]
        calls = draw(st.lists(st.lists(pieces, max_size=2), max_size=2))
        # Parallel calls: each call's fragments in order (its id and name first), the calls'
        # fragments interleaved.
        fragments = interleave(
            draw,
            [
                [Part("tool", c, "", k, head=True), *(Part("tool", c, t, k) for t in arguments)]
                for k, arguments in enumerate(calls)
            ],
        )
        finish = Part("finish", c, "tool_calls" if calls else "stop")
        choices.append([Part("role", c), *reasoning, *content, *fragments, finish])
    # A gateway emulating `n` streams the choices one after another.
    sequential = n > 1 and draw(st.booleans())
    parts = [p for run in choices for p in run] if sequential else interleave(draw, choices)
    # A chunk per part, as OpenAI sends them; or several choices in one chunk, each once, as
    # gateways batching the choices' tokens do: some chunks, or every one that can.
    packing = draw(st.sampled_from(["one", "some", "all"])) if n > 1 else "one"
    chunks: list[list[Part]] = []
    for part in parts:
        last = chunks[-1] if chunks else None
        if (
            last is not None
            and all(p.choice != part.choice for p in last)
            and (packing == "all" or (packing == "some" and draw(st.booleans())))
        ):
            last.append(part)
        else:
            chunks.append([part])
    # The usage: none; a chunk of its own at the end (OpenAI's `include_usage`); or counted
    # up on some or every chunk (vLLM's continuous usage), and maybe at the end too.
    usage = draw(st.sampled_from(["none", "last", "some", "every"]))
    if usage in ("some", "every"):
        for chunk in chunks:
            if usage == "every" or draw(st.booleans()):
                chunk.append(Part("usage"))
    if usage == "last" or (usage == "some" and draw(st.booleans())):
        chunks.append([Part("usage")])
    return Answer(
        n,
        (*map(tuple, chunks), (Part("done"),)),
        draw(st.integers(40, 4000)),
        draw(st.integers(0, 1000)),
    )


@st.composite
def worlds(draw: st.DrawFn, closing: bool = False) -> World:
    """A world; `closing`: one whose caller closes the stream where it waits, after a few
    failures at most (most worlds end before they reach such a place)."""
    # The server's and the client's traits, drawn evenly: hypothesis leans to its first
    # choices, which here would leave the rules of resuming mostly untried.
    rnd = draw(st.randoms(use_true_random=True))
    ids = rnd.random() < 2 / 3
    # Whether the server ignores Last-Event-ID (replays), and whether every response is
    # another completion: both, a resume it must refuse.
    replay, new_id = rnd.choice([(False, False), (True, False), (True, True), (False, True)])
    replay = replay and ids
    modes: list[Mode] = ["raise", "resume", "resume", "restart"]
    mode = rnd.choice(modes)
    attempts = rnd.choice([1, 2, 3, 4, 4])
    timers: list[Timer | None] = [None, None, None, None, "short", "total", "close", "close"]
    timer = "close" if closing else rnd.choice(timers)
    closers: list[Literal["close", "cancel"]] = ["close", "cancel"]
    closer = rnd.choice(closers)
    answer = draw(answers())
    events = len(answer.events)
    # Cut anywhere, and often just after a finish: between two choices, or where every
    # choice finished (the rule that a break there is an end, or not, is all in the count).
    after_finish = [i + 1 for i, part in answer.parts(list(range(events))) if part.kind == "finish"]
    ks = st.one_of(st.integers(2, events), st.sampled_from(after_finish), st.integers(0, events))
    cut = st.builds(
        Step,
        kind=st.just("cut"),
        k=ks,
        end=st.sampled_from(["fault", "error", "fatal", "eof"]),
        partial=st.booleans(),
        sizes=sizes,
        keep_alive=st.booleans(),
    )
    status = st.builds(Step, kind=st.just("status"), status=st.sampled_from([429, 500, 503, 400]))
    refuse = st.builds(
        Step, kind=st.just("refuse"), refusal=st.sampled_from(["connect", "connect", "timeout"])
    )
    ok = st.builds(Step, kind=st.just("ok"), sizes=sizes)
    # Mostly failures (the server behaves past the end of the script anyway); `ok` last, since
    # hypothesis leans to the first.
    script = draw(st.lists(st.one_of(cut, cut, cut, status, refuse, ok), min_size=1, max_size=5))
    if closing:
        # Failures the attempts suffice for: what ends the call before the close is the rules.
        script = draw(st.lists(st.one_of(cut, cut, status, refuse), max_size=3))
        attempts = max(attempts, len(script) + 1)
    # At most one hang: a timeout ending one is a real wait.
    if timer is not None:
        # Keep-alive comments while it waits: they are no content, and end no timeout.
        hang = Step("hang", k=draw(ks), sizes=draw(sizes), keep_alive=True)
        if timer == "close":
            # Where the caller closes: in a read (the hang), or where nothing is read: a send
            # with no response head yet, the rate limiter's queue, a wait before a retry.
            block = st.builds(
                Step, kind=st.just("block"), then=st.sampled_from(["ok", "status", "refuse"])
            )
            backoff = st.builds(
                Step, kind=st.just("status"), status=st.sampled_from([429, 503]), wait=st.just(True)
            )
            places = [st.just(hang), block, st.just(Step("queue")), backoff]
            hang = draw(places[rnd.randrange(4)] if closing else st.one_of(places))
        # Late in the script, mostly: a hang the caller closes, or `total` ends, ends the call.
        # A `closing` world's is last: the failures before it are what it waits after.
        at = len(script) if closing else len(script) - draw(st.integers(0, len(script)))
        script.insert(at, hang)
    return World(answer, tuple(script), ids, replay, new_id, mode, attempts, timer, closer)


# -- running a world through the clients -------------------------------------------------------

Consume = Literal["chunks", "text_stream", "complete"]


@attrs.define
class Observed:
    screen: Screen = attrs.Factory(Screen)
    pieces: list[str] = attrs.Factory(list)  # text_stream()'s
    completion: Completion | None = None  # the stream's at the end, or complete()'s
    attempts: int | None = None  # stream.stats.attempts
    error: HolySheepError | None = None
    limiter: tuple[int, int] = (0, 0)  # in flight, waiting: at the end
    settled: list[int | None] = attrs.Factory(list)  # each attempt's tokens, as it ended
    cancelled: bool = False
    elapsed: float = 0.0  # seconds the call took, the caller's close included


class Rival:
    """Another user of the rate limiter: it takes the only slot before an attempt the script
    queues ("queue"), and gives it back once the caller closed the stream (or, if the close
    did not end the wait, after HANG_LIMIT, so that a test of a broken client still ends)."""

    def __init__(self, gate: Gate, release: Callable[[Ticket, int | None], None]) -> None:
        self.gate, self.release = gate, release
        self.ticket: Ticket | None = None

    def take(self) -> None:
        self.ticket = self.gate.acquire(1, lambda: False)  # the slot is free: at once

    def leave(self) -> None:
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.release(ticket, 0)


def client_options(
    world: World, seen: Observed, hanging: Callable[[], None]
) -> tuple[dict[str, Any], Rival]:
    # Shared by the attempts, and by nothing else: it must get every ticket back, each settled
    # at what its attempt used (resilience.md), which its gate is asked to do: recorded.
    limiter = RateLimiter(max_concurrent=1, tokens_per_minute=10**9)
    gate = gate_for(limiter)
    release = gate.release

    def settle(ticket: Ticket, tokens: int | None) -> None:
        seen.settled.append(tokens)
        release(ticket, tokens)

    gate.release = settle  # type: ignore[method-assign]
    rival = Rival(gate, release)
    if world.step(1).kind == "queue":
        rival.take()
        hanging()

    def retrying(record: Attempt) -> None:
        # Told of each failed attempt before the client waits to retry (resilience.md, hooks).
        if record.delay is None:
            return  # it gives up: no wait, no next attempt
        if world.step(record.attempt).wait:
            hanging()  # a wait of LONG_WAIT s: the caller closes in it
        elif world.step(record.attempt + 1).kind == "queue":
            rival.take()
            hanging()

    options = {
        "api_key": "k",
        "base_url": "http://mock/v1",
        "retry": attrs.evolve(NO_WAIT, attempts=world.attempts),
        "on_interrupt": None if world.mode == "raise" else world.mode,  # the default
        "timeout": world.timeouts(),
        "limiter": limiter,
        "hooks": [retrying],
    }
    return options, rival


def run_sync(world: World, consume: Consume) -> tuple[Observed, Upstream]:
    hanging, over = threading.Event(), threading.Event()
    upstream = Upstream(world, hanging.set)
    seen = Observed()
    options, rival = client_options(world, seen, hanging.set)
    limiter: RateLimiter = options["limiter"]
    transport = RecordingTransport(upstream)
    client = holysheep.Client(transport=transport, **options)
    params: dict[str, Any] = {"model": "m", "messages": MESSAGES, "n": world.answer.n}
    closer = None
    began = time.monotonic()
    try:
        if consume == "complete" and world.timer != "close":
            seen.completion = client.chat.complete(**params)
            return seen, upstream
        stream = client.chat.stream(**params)

        def close() -> None:
            # Another thread closes the stream where it waits: a read, a send, the rate
            # limiter's queue (once the client is in it), a wait before a retry.
            hanging.wait(HANG_LIMIT)
            if rival.ticket is not None:
                limit = time.monotonic() + HANG_LIMIT
                while not limiter.waiting and not over.is_set() and time.monotonic() < limit:
                    time.sleep(0.001)
            if not over.is_set():
                stream.close()
                transport.unblock.set()  # the held send ends only now (see `Step`)
            over.wait(HANG_LIMIT)
            rival.leave()

        if world.timer == "close":
            closer = threading.Thread(target=close)
            closer.start()
        try:
            with stream:
                if consume == "chunks":
                    for chunk in stream:
                        seen.screen.take(chunk)
                elif consume == "text_stream":
                    seen.pieces.extend(stream.text_stream())
                else:
                    stream.until_done()
            seen.completion = stream.completion
        finally:
            seen.attempts = stream.stats.attempts
    except HolySheepError as exc:
        seen.error = exc
    finally:
        seen.elapsed = time.monotonic() - began
        over.set()
        hanging.set()
        if closer is not None:
            closer.join()
        rival.leave()
        client.close()
        seen.limiter = (limiter.in_flight, limiter.waiting)
    return seen, upstream


async def run_async(world: World, consume: Consume) -> tuple[Observed, Upstream]:
    hanging, over = anyio.Event(), anyio.Event()
    upstream = Upstream(world, hanging.set)
    seen = Observed()
    options, rival = client_options(world, seen, hanging.set)
    limiter: RateLimiter = options["limiter"]
    params: dict[str, Any] = {"model": "m", "messages": MESSAGES, "n": world.answer.n}
    transport = AsyncRecordingTransport(upstream)
    began = time.monotonic()
    async with holysheep.AsyncClient(transport=transport, **options) as client:
        stream = client.chat.stream(**params) if consume != "complete" else None
        scope = anyio.CancelScope()

        async def close() -> None:
            # Another task closes the stream, or cancels the reading task, where it waits.
            await hanging.wait()
            if rival.ticket is not None:
                with anyio.move_on_after(HANG_LIMIT):
                    while not limiter.waiting and not over.is_set():
                        await anyio.sleep(0.001)
            if not over.is_set():
                if world.closer == "cancel" or stream is None:
                    scope.cancel()
                else:
                    stream.close()
            with anyio.move_on_after(HANG_LIMIT):
                await over.wait()
            rival.leave()

        async with anyio.create_task_group() as tasks:
            if world.timer == "close":
                tasks.start_soon(close)
            with scope:
                try:
                    if stream is None:
                        seen.completion = await client.chat.complete(**params)
                    else:
                        try:
                            async with stream:
                                if consume == "chunks":
                                    async for chunk in stream:
                                        seen.screen.take(chunk)
                                else:
                                    texts = stream.text_stream()
                                    try:
                                        async for piece in texts:
                                            seen.pieces.append(piece)
                                    finally:  # cancelled in it: closed now, not by the GC
                                        await texts.aclose()  # type: ignore[attr-defined]
                            seen.completion = stream.completion
                        finally:
                            seen.attempts = stream.stats.attempts
                except HolySheepError as exc:
                    seen.error = exc
            seen.elapsed = time.monotonic() - began
            over.set()
            hanging.set()
        seen.cancelled = scope.cancelled_caught
        if seen.cancelled and stream is not None:
            seen.completion = stream.completion
    rival.leave()
    seen.limiter = (limiter.in_flight, limiter.waiting)
    return seen, upstream


def runs(world: World, consume: Consume) -> Iterator[tuple[str, Observed, Upstream]]:
    yield "sync", *run_sync(world, consume)
    for backend in ("asyncio", "trio"):
        yield backend, *anyio.run(run_async, world, consume, backend=backend)


def check(world: World, consume: Consume, seen: Observed, upstream: Upstream, driver: str) -> None:
    # The sync runner reads a stream it can close, with `until_done()`, where the caller
    # closes it: its `on_interrupt` is the stream's, not `complete()`'s.
    called_complete = consume == "complete" and (driver != "sync" or world.timer != "close")
    expected = expect(as_complete(world) if called_complete else world)
    sent = [request.header("last-event-id") for request in upstream.requests]
    keys = {request.header("idempotency-key") for request in upstream.requests}
    assert all(upstream.closed), f"responses left open: {upstream.closed}"
    assert (0, 0) == seen.limiter, "the rate limiter still holds tickets (in flight, waiting)"
    # Nothing waits longer than its timeouts (a quarter or half a second here), and a close
    # ends any wait at once.
    assert seen.elapsed < HANG_LIMIT / 3, f"the call took {seen.elapsed:.1f} s"
    # A refused request costs nothing: an error status, or no connection made (the request
    # never left); an answered one, its usage or an estimate (resilience.md). An attempt the
    # caller closed in its send never got an answer: it keeps its reservation, or costs
    # nothing (no connection, or its accumulation's usage, charged already).
    assert len(sent) == len(seen.settled)
    for attempt, tokens in enumerate(seen.settled, 1):
        if world.step(attempt).kind in ("status", "refuse"):
            assert 0 == tokens, f"attempt {attempt} was refused, and charged {tokens} tokens"
        elif world.step(attempt).kind == "block":
            assert tokens in (None, 0), f"attempt {attempt} got no answer, charged {tokens}"
        else:
            assert tokens is not None, f"attempt {attempt} was answered, and not settled"
    if expected.charged is not None:
        # The attempts of one accumulation (a fresh request, then those resuming it) are
        # charged its usage once, all together (resilience.md).
        fresh = max(n for n, header in enumerate(sent) if header is None)
        charges = seen.settled[fresh:]
        assert [expected.charged[2]] == [sum(t for t in charges if t is not None)], charges
    assert min(1, len(sent)) == len(keys)  # one for every attempt (none: closed in the queue)
    assert list(expected.last_event_ids) == sent
    if seen.attempts is not None:
        # Closed in the rate limiter's queue: the attempt queued was never sent.
        sent = expected.begun - 1 if expected.begun else expected.attempts
        assert sent == seen.attempts
    error = seen.error
    if expected.closed:
        # The caller stopped: quietly, with what arrived.
        assert error is None, f"expected a quiet end, got {error!r}"
        if seen.completion is not None:
            assert expected.completion == view_of(seen.completion)
    elif expected.error is None:
        assert error is None, f"expected success, got {error!r}"
        assert not seen.cancelled
        whole = snapshot(world.answer, list(range(len(world.answer.events))))
        assert whole[0] == expected.completion[0]  # the model's own sanity
        assert expected.completion == view_of(seen.completion)
    else:
        kind = expected.yielded_error if consume == "text_stream" else expected.error
        assert type(error) is kind, f"expected {kind and kind.__name__}: {error!r}"
        assert error is not None
        if consume == "text_stream":
            partial = error.completion.text if error.completion is not None else ""
            assert expected.yielded == partial
        else:
            assert expected.failure == view_of(error.completion)
        assert (expected.status, expected.attempts) == (error.status_code, error.attempts)
        request = upstream.requests[-1]
        ours = request.header("x-request-id")
        assert (ours if expected.refused else f"srv-{expected.attempts}") == error.request_id
    if consume == "chunks":
        # What the caller saw of every choice, all of it, once.
        assert (expected.shown, expected.resets) == (seen.screen.view(), seen.screen.resets)
    elif consume == "text_stream":
        assert expected.yielded == "".join(seen.pieces)


# Each example runs three clients; 40 keep the three tests near 12 s. To hunt, raise it:
# PROP_EXAMPLES=2000 pytest tests/test_client_properties_more.py
SETTINGS = settings(
    max_examples=int(os.environ.get("PROP_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Closing worlds wait on no timer (but for a sync close in the rate limiter: 0.1 s, the
# gate's poll): 40 take 2 to 4 s.
CLOSING_SETTINGS = settings(SETTINGS, max_examples=int(os.environ.get("PROP_EXAMPLES", 40)))


def _answer(*parts: Part | Event, n: int = 1) -> Answer:
    """An answer of these events (a part alone is an event of its own), then `[DONE]`."""
    events = tuple(part if isinstance(part, tuple) else (part,) for part in parts)
    return Answer(n, (*events, (Part("done"),)), 12, 0)


def _one(text: str, choice: int = 0) -> tuple[Part, ...]:
    return Part("role", choice), Part("content", choice, text), Part("finish", choice, "stop")


# Each kind of world once, whatever the search draws.
EXAMPLES = {
    # Two choices one after another, broken between them and resumed there.
    "between choices": World(
        _answer(*_one("Yes."), *_one("No.", 1), n=2),
        (Step("cut", k=3), Step("cut", k=0, end="eof")),
        True,
        False,
        False,
        "resume",
        4,
        None,
    ),
    # Choice 1 first, cut before choice 0 began: the partial completion's text is choice 0's.
    "choice 0 not begun": World(
        _answer(*_one("No.", 1), *_one("Yes."), n=2),
        (Step("cut", k=2),),
        True,
        False,
        False,
        "raise",
        1,
        None,
    ),
    # Parallel tool calls, interleaved, cut inside an event in the arguments; restarted.
    "tool calls": World(
        _answer(
            Part("role"),
            Part("tool", 0, "", 0, head=True),
            Part("tool", 0, "", 1, head=True),
            Part("tool", 0, '{"city": ', 0),
            Part("tool", 0, '{"q": ', 1),
            Part("tool", 0, '"Oslo"}', 0),
            Part("tool", 0, '"sheep"}', 1),
            Part("finish", 0, "tool_calls"),
        ),
        (Step("cut", k=5, partial=True, sizes=(7,)), Step("refuse")),
        True,
        False,
        False,
        "restart",
        3,
        None,
    ),
    # The server ignores Last-Event-ID and starts another completion: refused.
    "another completion": World(
        _answer(*_one("Hello")), (Step("cut", k=2),), True, True, True, "resume", 3, None
    ),
    # Every choice finished, an in-band error, and the resumed stream stalls (on `ttft`).
    "stall after the finish": World(
        _answer(*_one("All said.")),
        (Step("cut", k=3, end="error"), Step("hang", k=0, keep_alive=True)),
        True,
        False,
        False,
        "resume",
        2,
        "short",
    ),
    # The caller closes (another thread or task) and cancels (its task) in a read.
    "closed": World(
        _answer(*_one("Yes."), *_one("No.", 1), n=2),
        (Step("hang", k=4),),
        True,
        False,
        False,
        "raise",
        1,
        "close",
    ),
    # Two choices in each chunk, the usage on the last; cut before it, and resumed.
    "choices in one chunk": World(
        _answer(
            (Part("role"), Part("role", 1)),
            (Part("content", 0, "Yes."), Part("content", 1, "No.")),
            (Part("finish", 0, "stop"), Part("finish", 1, "stop"), Part("usage")),
            n=2,
        ),
        (Step("cut", k=2, partial=True, sizes=(9,)),),
        True,
        False,
        False,
        "resume",
        2,
        None,
    ),
    # The usage counted up on every chunk; cut, and restarted: the new answer's counts.
    "usage restarted": World(
        _answer(
            (Part("role"), Part("usage")),
            (Part("content", 0, "Yes."), Part("usage")),
            (Part("finish", 0, "stop"), Part("usage")),
        ),
        (Step("cut", k=2),),
        True,
        False,
        False,
        "restart",
        2,
        None,
    ),
    # The caller closes where nothing is read: in a send with no head yet, queued in the
    # rate limiter, and waiting to retry a restart (the answer it shows stands: no Reset).
    "closed in a send": World(
        _answer(*_one("Yes.")),
        (Step("cut", k=2), Step("block", then="ok")),
        True,
        False,
        False,
        "resume",
        3,
        "close",
    ),
    "closed in a send that fails": World(
        _answer(*_one("Yes.")),
        (Step("block", then="refuse"),),
        True,
        False,
        False,
        "raise",
        1,
        "close",
    ),
    "closed in the queue": World(
        _answer(*_one("Yes.")), (Step("queue"),), True, False, False, "raise", 3, "close"
    ),
    "closed waiting to restart": World(
        _answer(*_one("Yes.")),
        (Step("cut", k=2), Step("status", status=503, wait=True)),
        True,
        False,
        False,
        "restart",
        3,
        "close",
    ),
}
EXAMPLES["cancelled"] = attrs.evolve(EXAMPLES["closed"], closer="cancel")


def with_examples(test: Callable[..., None]) -> Callable[..., None]:
    for world in EXAMPLES.values():
        test = example(world=world)(test)
    return test


@pytest.mark.parametrize("consume", ["chunks", "text_stream", "complete"])
@SETTINGS
@given(world=worlds())
@with_examples
def test_every_client_keeps_the_promise_with_more(consume: Consume, world: World) -> None:
    """With n choices, tool calls, refused connections, timeouts, a resume answered by another
    completion, and a caller closing or cancelling mid-stream, each client ends as the docs
    say, with everything once."""
    keeps_the_promise(consume, world)


@pytest.mark.parametrize("consume", ["chunks", "text_stream", "complete"])
@CLOSING_SETTINGS
@given(world=worlds(closing=True))
def test_every_client_closes_where_it_waits(consume: Consume, world: World) -> None:
    """Closed (or cancelled) where it waits without reading, in a send with no response head
    yet, in the rate limiter's queue or in a wait before a retry, as in a read, each client
    ends quietly and at once, with what arrived, every response closed and every ticket
    back."""
    keeps_the_promise(consume, world)


def keeps_the_promise(consume: Consume, world: World) -> None:
    expected = expect(world)
    outcome = "closed" if expected.closed else expected.error.__name__ if expected.error else "ok"
    event(f"{world.mode}, n={world.answer.n}: {outcome}")
    event(f"attempts made: {expected.attempts}, timer: {world.timer}")
    resumed = sum(header is not None for header in expected.last_event_ids)
    event(f"resumed: {resumed}{', replayed' if resumed and world.replay else ''}")
    if expected.closed:
        where = world.step(expected.begun or expected.attempts)
        event(f"closed in: {'a wait to retry' if where.kind == 'status' else where.kind}")
    packed = any(len({p.choice for p in e if p.kind != "usage"}) > 1 for e in world.answer.events)
    usages = sum(p.kind == "usage" for e in world.answer.events for p in e)
    event(f"choices in one chunk: {packed}, usage reports: {min(usages, 2)}")
    for driver, seen, upstream in runs(world, consume):
        try:
            check(world, consume, seen, upstream, driver)
        except AssertionError as exc:
            raise AssertionError(f"{driver}, {consume}: {exc}") from exc
