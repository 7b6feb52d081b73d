"""An OpenAI-compatible upstream on 127.0.0.1, for tests, demos and benchmarks.

Theory of operation
-------------------
One asyncio server (stdlib only) speaks just enough HTTP/1.1: keep-alive, `Content-Length`
and chunked request bodies (with `Expect: 100-continue` answered), chunked responses.
`POST /v1/chat/completions` with `"stream": true` answers exactly as the OpenAI API does (a
role chunk, one chunk per token, a finish chunk, a usage chunk when
`stream_options.include_usage` is set, `data: [DONE]`; per choice with `n`, and a tool call
when the request has `tools`); without it, one `chat.completion` object. The tokens are a
deterministic function of the configuration, so a stream resumed with `Last-Event-ID` has
exactly the text of an uninterrupted one; ids, `created` and `x-request-id` vary per answer as
the real API's do, unless the config pins them.

A request is planned before a byte is sent: one `_Planned` per choice (`n` of them), each its
pieces (text tokens, or the argument fragments of one tool call) and a finish reason. Text
tokens are counted up front but cut from the text only as they are sent (`_Tokens`), so a
million-token answer starts at once and holds no more memory than a short one. `_events` lays
the plan out as the API streams it, the choices interleaved piece by piece, and marks which
events are content: faults and `Last-Event-ID` count events in that one sequence, so they mean
the same with one choice or eight, and with text or a tool call.

Behaviour is an `UpstreamConfig`: token count and text, time to first token, token rate,
keep-alive comments, event ids, and one `Fault`. The server's default config can be overridden
per request (an `X-Mock-Config` header holding JSON) or by a queue (`enqueue`), whose entries are
taken one per request: "the first attempt gets a 429, the second succeeds". A request the real
API would refuse, or an `X-Mock-Config` that cannot apply, gets a 400 in OpenAI's error shape.

One coroutine per connection and no per-token tasks keep 10,000 slow streams cheap. The server
notices a client leaving at its next write (or at once while stalled, by reading) and records it
in `disconnects`, which tests wait on to prove a client really closed its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Literal, final

import attrs

__all__ = ["DEFAULT_TEXT", "Fault", "MockUpstream", "RecordedRequest", "UpstreamConfig", "serve"]

DEFAULT_TEXT = (
    "Sheep are gentle, social animals that have lived beside people for more than ten thousand "
    "years. A flock moves as one because every sheep keeps an eye on its neighbours: when one "
    "starts to walk, the others follow within seconds. Their wool grows all year long, so most "
    "sheep are shorn once a year, and a single fleece can weigh several kilograms. Sheep "
    "recognise faces, remember them for years, and call to their lambs with a voice each lamb "
    "knows. "
)

FaultKind = Literal["drop", "stall", "status", "inband_error", "wrong_content_type", "invalid_json"]
_FAULT_KINDS = ("drop", "stall", "status", "inband_error", "wrong_content_type", "invalid_json")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Site Overloaded",
}
# Request heads beyond this are refused; real clients send a few hundred bytes.
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
# How often a wait (the first token's, or between paced tokens) looks whether the client has
# left. A client that closes cleanly (a FIN: it had read everything sent) is otherwise found
# out only by the second write after its close, one or two waits later, so `disconnects`
# counted a client that left during a long `ttft` or between slow tokens late, or not before
# a test gave up waiting; a gateway sees the close when it comes (as Go's net/http cancels a
# request's context at the client's EOF). 50 ms is far below what a test waits for. Waits of
# up to `_LEAVE_WHOLE` are not cut up, only checked at their end: at 10 tokens a second over
# thousands of streams (the concurrency benchmark) every wake-up counts.
_LEAVE_CHECK = 0.05
_LEAVE_WHOLE = 0.25
# The most tokens one answer may have. Events are made as they are sent, so a long answer
# costs time, not memory; the bound turns a typo (`--tokens 10000000000`) into an error
# rather than a stream that never ends. The longest streams the benchmarks use are 20,000
# tokens (bench/client.py); a million is 50 times that.
MAX_TOKENS = 1_000_000
# Answers of up to this many content events are made before their first byte (a few tens of
# MB at most); longer ones as they are sent (see `_chat`).
_MADE_BEFORE = 100_000
# Up to this many, on the server's loop: about 9 µs an event, so 20 ms at most.
_MADE_INLINE = 2_000


# Validators: a bad value in `X-Mock-Config` or `enqueue()` is refused where it is given (the
# server answers 400), not met later as a crash in the middle of a response.
_NUMBER = (int, float)


def _instance_of(kind: type | tuple[type, ...]) -> Any:
    return attrs.validators.instance_of(kind)


def _seconds(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, _NUMBER) or not 0 <= value < float("inf"):
        raise ValueError(f"{attribute.name} must be a number of seconds >= 0, got {value!r}")


def _optional_seconds(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _seconds(instance, attribute, value)


def _optional_count(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    # bool is an int to Python, and 2.5 tokens would be rounded somewhere: refuse both.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ValueError(
            f"{attribute.name} must be None or a whole number from 0 to {MAX_TOKENS:,},"
            f" got {value!r}"
        )


def _optional_positive(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, _NUMBER) or not 0 < value < float("inf"):
        raise ValueError(f"{attribute.name} must be None or a number > 0, got {value!r}")


def _fault_status(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    # An answer to a 1xx, 204 or 304 has no body (RFC 9110 6.4.1), so the error body sent
    # with it would be read as the next response, or waited for forever.
    if not 200 <= value <= 599 or value in (204, 304):
        raise ValueError(
            f"{attribute.name} must be an HTTP status from 200 to 599 that has a body (not 204"
            f" or 304), got {value!r}"
        )


@final
@attrs.frozen
class Fault:
    """Something for the upstream to get wrong, after `after` content events of a response
    (the tokens of all its choices as they are sent, or the argument fragments of tool calls).

    A stream fault fires only if a content event would follow it: a response with `after` or
    fewer content events left is served whole, so resuming after a server-wide fault finishes.

    `drop`: close the socket abruptly. `stall`: stop sending, keep the connection open.
    `status`: answer `status` (with `retry_after` as `Retry-After`) and an OpenAI error body.
    `inband_error`: send `data: {"error": ...}` (overloaded) and end the stream.
    `wrong_content_type`: a 200 with an HTML page, like a misbehaving proxy.
    `invalid_json`: send `data: {not json`.

    `Fault.parse("drop@5")`, `"stall@3"`, `"status=429,retry_after=2"`, `"inband_error@4"`,
    `"wrong_content_type"`, `"invalid_json@2"` build them from text (for the command line).
    """

    kind: FaultKind = attrs.field(validator=attrs.validators.in_(_FAULT_KINDS))
    after: int = attrs.field(default=0, validator=[_instance_of(int), attrs.validators.ge(0)])
    status: int = attrs.field(default=500, validator=[_instance_of(int), _fault_status])
    retry_after: float | None = attrs.field(default=None, validator=_optional_seconds)

    @classmethod
    def parse(cls, text: str) -> Fault:
        head, _, options = text.partition(",")
        kind, _, after = head.partition("@")
        after_part = "the count after @"
        status, retry_after = "500", None
        if kind.startswith("status"):
            kind, _, status = kind.partition("=")
            status = status or "500"
        for option in filter(None, options.split(",")):
            name, _, value = option.partition("=")
            if name == "retry_after":
                retry_after = value
            elif name == "after":
                after, after_part = value, "after"
            else:
                raise ValueError(f"unknown fault option {name!r} in {text!r}")
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(_FAULT_KINDS)}")

        # int() and float() would say "invalid literal for int() with base 10: 'x'", naming
        # neither the part of the fault nor what it should look like.
        def number(part: str, value: str, read: type[int] | type[float], form: str) -> Any:
            try:
                return read(value)
            except ValueError:
                kind_of = "a whole number" if read is int else "a number"
                raise ValueError(
                    f"fault {text!r}: {part} must be {kind_of}, got {value!r} (as in {form})"
                ) from None

        return cls(
            kind,  # type: ignore[arg-type]
            number(after_part, after, int, f"{kind}@5") if after else 0,
            number("the status", status, int, "status=429"),
            None
            if retry_after is None
            else number("retry_after", retry_after, float, "status=429,retry_after=2"),
        )

    @classmethod
    def from_value(cls, value: Fault | str | Mapping[str, Any] | None) -> Fault | None:
        if value is None or isinstance(value, Fault):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls(**value)


def _to_fault(value: Fault | str | Mapping[str, Any] | None) -> Fault | None:
    return Fault.from_value(value)


@final
@attrs.frozen
class UpstreamConfig:
    """How the upstream behaves. Times in seconds; `tokens_per_s=None` means no pacing.

    Like the real API, every answer has its own `chatcmpl-` id, the current time as `created`
    and a server-minted `x-request-id`; `completion_id`, `created` and `echo_request_id` (send
    the client's `X-Request-ID` back) pin them for tests that compare answers byte for byte.

    A request with `tools` is answered with a call to the first (or the one `tool_choice`
    names), unless `tool_choice` is `"none"`, the last message is a tool result, or
    `tool_calls=False`; those get text.
    """

    tokens: int | None = attrs.field(default=None, validator=_optional_count)
    text: str = attrs.field(default=DEFAULT_TEXT, validator=_instance_of(str))
    ttft: float = attrs.field(default=0.0, validator=_seconds)
    tokens_per_s: float | None = attrs.field(default=None, validator=_optional_positive)
    keepalive_interval: float | None = attrs.field(default=None, validator=_optional_positive)
    event_ids: bool = attrs.field(default=False, validator=_instance_of(bool))
    retry_ms: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional([_instance_of(int), attrs.validators.ge(0)]),
    )
    fault: Fault | None = attrs.field(default=None, converter=_to_fault)
    completion_id: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_instance_of(str))
    )
    created: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_instance_of(int))
    )
    echo_request_id: bool = attrs.field(default=False, validator=_instance_of(bool))
    tool_calls: bool = attrs.field(default=True, validator=_instance_of(bool))

    def merged(self, overrides: Mapping[str, Any] | UpstreamConfig | None) -> UpstreamConfig:
        if overrides is None:
            return self
        if isinstance(overrides, UpstreamConfig):
            return overrides
        unknown = sorted(set(overrides) - set(attrs.fields_dict(UpstreamConfig)))
        if unknown:
            known = ", ".join(attrs.fields_dict(UpstreamConfig))
            raise ValueError(
                f"unknown UpstreamConfig field {unknown[0]!r}; expected one of {known}"
            )
        return attrs.evolve(self, **dict(overrides))

    def token_list(self, max_tokens: int | None) -> list[str]:
        """The deterministic tokens: `text` cut into 1-8 character pieces, cycled as needed."""
        return list(itertools.islice(_cut(self.text), self.token_count(max_tokens)))

    def token_count(self, max_tokens: int | None) -> int:
        """How many tokens an answer capped at `max_tokens` has: `tokens`, or one pass over
        `text` when `tokens` is None."""
        if not self.text:
            return 0
        count = self.tokens
        if count is None:  # one pass: as many pieces as `_cut` makes before it starts again
            rng, i, count = random.Random(len(self.text)), 0, 0
            while i < len(self.text):
                i += rng.randint(1, 8)
                count += 1
        return count if max_tokens is None else min(count, max(0, max_tokens))


def _cut(text: str) -> Iterator[str]:
    """`text` cut into 1-8 character pieces, pass after pass, made one at a time. Seeded by
    the text's length, so the same text is always cut alike (`token_count` counts a pass)."""
    if not text:
        return
    rng = random.Random(len(text))
    while True:
        i = 0
        while i < len(text):
            n = rng.randint(1, 8)
            yield text[i : i + n]
            i += n


@final
@attrs.frozen
class RecordedRequest:
    """A request as the upstream saw it; `headers` has lower-case names."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any


class MockUpstream:
    """The server. Use `serve()` to run one on a background thread."""

    def __init__(self, config: UpstreamConfig | None = None) -> None:
        self.config = config or UpstreamConfig()
        self.requests: list[RecordedRequest] = []
        self.connections_opened = 0
        self.disconnects = 0
        self.port = 0
        self._queue: list[Mapping[str, Any] | UpstreamConfig] = []
        self._lock = threading.Lock()
        self._disconnected = threading.Condition(self._lock)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *overrides: Mapping[str, Any] | UpstreamConfig) -> None:
        """Each next request takes one of these overrides, in order.

        Each is checked here (an unknown field raises `ValueError` in the caller), not when a
        request takes it, where the mistake could only become a 400 answer.
        """
        for override in overrides:
            self.config.merged(override)
        with self._lock:
            self._queue.extend(overrides)

    def wait_for_disconnect(self, timeout: float, count: int = 1) -> bool:
        """Block until at least `count` clients left mid-stream; False on timeout."""
        with self._disconnected:
            return self._disconnected.wait_for(lambda: self.disconnects >= count, timeout)

    # -- serving -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=_MAX_HEAD, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_opened += 1
        self._writers.add(writer)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the server is shutting down; end quietly
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = [*lines[0].split(" "), "", ""][:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        # A body whose length cannot be read leaves no way to find the next request: answer
        # 400, as the API's front end does, and close.
        # A client that asked to be told to go on (curl does for bodies over 1 MB) waits for
        # this before it sends the body, or a second for nothing (RFC 9110 10.1.1).
        go_on = headers.get("expect", "").lower() == "100-continue"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            if go_on:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body_bytes = await _read_chunked(reader)
            except ValueError as exc:
                error = _error(f"invalid chunked request body: {exc}")
                await self._send_json(writer, 400, error, _request_id(self.config, headers))
                return False
        else:
            text = headers.get("content-length") or "0"
            if not (text.isascii() and text.isdigit()):
                error = _error(f"invalid Content-Length header: {text!r}")
                await self._send_json(writer, 400, error, _request_id(self.config, headers))
                return False
            length = int(text)
            if length > _MAX_BODY:
                request_id = _request_id(self.config, headers)
                await self._send_json(writer, 413, _error("request body too large"), request_id)
                return False
            if go_on and length:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body_bytes = await reader.readexactly(length) if length else b""
        keep_alive = headers.get("connection", "").lower() != "close"
        body, unreadable = None, None
        try:
            body = json.loads(body_bytes, parse_constant=_not_json) if body_bytes else None
        except ValueError as exc:  # also a UnicodeDecodeError
            unreadable = str(exc)
        self.requests.append(RecordedRequest(method, path.split("?")[0], headers, body))
        route = _route(path)
        request_id = _request_id(self.config, headers)
        if method == "GET" and route == "/v1/models":
            models = [_model(name) for name in _MODELS]
            await self._send_json(writer, 200, {"object": "list", "data": models}, request_id)
        elif method == "GET" and route.startswith("/v1/models/"):
            name = urllib.parse.unquote(route.removeprefix("/v1/models/"))
            if name in _MODELS:
                await self._send_json(writer, 200, _model(name), request_id)
            else:
                error = _error(
                    f"The model '{name}' does not exist or you do not have access to it.",
                    code="model_not_found",
                )
                await self._send_json(writer, 404, error, request_id)
        elif method == "POST" and route == "/v1/chat/completions":
            try:
                config = self._config_for(headers)
                if unreadable is not None:
                    raise _BadRequest(
                        f"We could not parse the JSON body of your request: {unreadable}"
                    )
                request = _check_body(body)
            except _BadRequest as exc:
                await self._send_json(writer, 400, exc.body(), request_id)
            else:
                request_id = _request_id(config, headers)
                answer = self._chat(config, request, headers, request_id, reader, writer)
                return await answer and keep_alive
        else:
            error = _error(f"no route for {method} {path}")
            await self._send_json(writer, 404, error, request_id)
        return keep_alive

    def _config_for(self, headers: Mapping[str, str]) -> UpstreamConfig:
        """The server's config, then the next queued override, then the request's header.

        A header that cannot be applied is the caller's mistake: `_BadRequest` (a 400), and
        the queued override stays for the next request.
        """
        header = headers.get("x-mock-config")
        overrides: Any = None
        if header:
            try:
                overrides = json.loads(header)
            except ValueError as exc:
                raise _BadRequest(f"X-Mock-Config is not valid JSON: {exc}") from None
            if not isinstance(overrides, dict):
                raise _BadRequest(f"X-Mock-Config must be a JSON object, not {header!r}")
        with self._lock:
            config = self.config.merged(self._queue[0] if self._queue else None)
            try:
                config = config.merged(overrides)
            except (TypeError, ValueError) as exc:
                # attrs' TypeError carries (message, attribute, type, value): the message only.
                why = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
                raise _BadRequest(f"X-Mock-Config: {why}") from None
            if self._queue:
                self._queue.pop(0)
        return config

    async def _chat(
        self,
        config: UpstreamConfig,
        body: dict[str, Any],
        headers: Mapping[str, str],
        request_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        fault = config.fault
        if fault is not None and fault.kind == "status":
            extra = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            kind, code = _status_error(fault.status)
            await self._send_json(
                writer,
                fault.status,
                _error(f"mock fault: HTTP {fault.status}", kind, code=code),
                request_id,
                extra,
            )
            return True
        if fault is not None and fault.kind == "wrong_content_type":
            page = b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
            await self._send(writer, 200, page, request_id, {"content-type": "text/html"})
            return True
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_completion_tokens")
        model = str(body.get("model") or "gpt-4.1")
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 3 for m in body["messages"])
        # What the real API stamps on every answer: its own id, the time it was created. A
        # resumed request (Last-Event-ID) continues an answer, so it must carry that answer's
        # id, which a client checks. The server keeps no state between requests: the id comes
        # from the Idempotency-Key, the same on every attempt of one call (an idempotent
        # gateway answers a repeated key with the same completion).
        key = headers.get("idempotency-key")
        if config.completion_id is not None:
            completion_id = config.completion_id
        elif key:
            completion_id = f"chatcmpl-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
        else:
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        plan = _plan(config, body, max_tokens, completion_id)
        content_events = sum(len(choice.pieces) for choice in plan)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": content_events,
            "total_tokens": prompt_tokens + content_events,
        }
        base = {
            "id": completion_id,
            "created": int(time.time()) if config.created is None else config.created,
            "model": model,
            "system_fingerprint": "fp_mock",
        }
        if not body.get("stream"):
            try:
                # As a stream waits, so a client leaving during the wait counts at once (a
                # plain sleep never looked); no keep-alive: the head is not sent yet.
                await self._wait(config.ttft, None, reader, writer)
            except ConnectionError:
                self._note_disconnect()
                return False
            if fault is not None and content_events > fault.after:
                return await self._whole_fault(fault, reader, writer, request_id)
            completion = {
                "id": base["id"],
                "object": "chat.completion",
                **base,
                "choices": [
                    {
                        "index": index,
                        "message": choice.message(),
                        "logprobs": None,
                        "finish_reason": choice.finish,
                    }
                    for index, choice in enumerate(plan)
                ],
                "usage": usage,
            }
            await self._send_json(writer, 200, completion, request_id)
            return True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _events(base, plan, usage if include_usage else None)
        if content_events <= _MADE_INLINE:
            events = iter(list(events))  # a few ms at most: not worth a thread's hand-over
        elif content_events <= _MADE_BEFORE:
            # Made before the first byte: made while sending, they cost the stream a third of
            # its pace (the throughput benchmark then measured this server, 100k events/s, not
            # the clients). In a thread, so the loop goes on serving the other streams meanwhile
            # (on the loop, 100,000 events stopped every other stream for 0.9 s).
            events = iter(await asyncio.to_thread(list, events))
        # The content events' indices: after each choice's first (role) chunk.
        content = range(len(plan), len(plan) + content_events)
        return await self._stream(config, events, content, headers, request_id, reader, writer)

    async def _stream(
        self,
        config: UpstreamConfig,
        events: Iterator[tuple[bool, bytes]],
        content: range,
        headers: Mapping[str, str],
        request_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        start = 0
        last_id = headers.get("last-event-id")
        if config.event_ids and last_id is not None and last_id.isdigit():
            start = int(last_id) + 1  # resume right after the last event the client saw
        # The fault counts this response's content events, and fires only if at least one
        # content event would follow it: a resumed request with `after` or fewer left is served
        # whole, so a client resuming after a server-wide `drop@K` always gets to the end.
        fault = config.fault
        if fault is not None and len(range(max(start, content.start), content.stop)) <= fault.after:
            fault = None
        writer.write(self._head(200, request_id, {"content-type": "text/event-stream"}, None))
        if config.retry_ms is not None:
            writer.write(_chunk(f"retry: {config.retry_ms}\n\n".encode()))
        interval = 1 / config.tokens_per_s if config.tokens_per_s else 0.0
        content_sent = 0
        try:
            if start == 0 and config.ttft:
                await self._wait(config.ttft, config.keepalive_interval, reader, writer)
            for index, (is_content, payload) in enumerate(
                itertools.islice(events, start, None), start
            ):
                if fault is not None and is_content and content_sent >= fault.after:
                    return await self._fault(fault, reader, writer)
                event = b"data: " + payload + b"\n\n"
                if config.event_ids:
                    event = b"id: %d\n" % index + event
                if writer.transport.is_closing():
                    raise ConnectionResetError("client went away")
                writer.write(_chunk(event))
                content_sent += is_content
                if is_content and interval:
                    await self._wait(interval, config.keepalive_interval, reader, writer)
                elif writer.transport.get_write_buffer_size() > 65536:
                    await writer.drain()
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            return True
        except ConnectionError:
            self._note_disconnect()
            return False

    async def _wait(
        self,
        seconds: float,
        keepalive: float | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Sleep, sending keep-alive comments; a client that left (closed its side, or the
        connection broke) shows up as ConnectionError within `_LEAVE_CHECK` (or at the end of
        a short wait).

        HTTP clients do not half-close a connection they still read a response from, so the
        end of the client's side (EOF, with nothing unread) means it has gone, as a gateway
        takes it.
        """
        now = time.monotonic()
        deadline = now + seconds
        next_keepalive = now + keepalive if keepalive else deadline
        check = _LEAVE_CHECK if seconds > _LEAVE_WHOLE else seconds
        await writer.drain()
        while now < deadline:
            await asyncio.sleep(min(deadline, next_keepalive, now + check) - now)
            if reader.at_eof() or writer.transport.is_closing():
                raise ConnectionResetError("client went away")
            now = time.monotonic()
            if keepalive and next_keepalive <= now < deadline:
                writer.write(_chunk(b": keep-alive\n\n"))
                next_keepalive = now + keepalive
                await writer.drain()
        await writer.drain()

    async def _fault(
        self, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if fault.kind == "drop":
            # Close mid-body, without the final chunk: the client sees the stream end early.
            # A FIN, not an RST: with an RST the client's kernel may discard bytes it had
            # already received, and tests could no longer say exactly what arrived.
            await writer.drain()
            writer.transport.close()
            return False
        if fault.kind == "stall":
            await writer.drain()
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass  # hold the line until the client gives up
            self._note_disconnect()
            return False
        if fault.kind == "inband_error":
            event = b"data: " + json.dumps(_OVERLOADED).encode() + b"\n\n"
            writer.write(_chunk(event) + b"0\r\n\r\n")
        else:  # invalid_json
            writer.write(_chunk(b"data: {not json\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _whole_fault(
        self,
        fault: Fault,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request_id: str,
    ) -> bool:
        """A stream fault in a non-stream answer: the generation breaks before any answer
        (`drop` closes, `stall` holds the connection), or the body is what the stream would
        have carried (`inband_error`: the error object; `invalid_json`: `{not json`)."""
        if fault.kind in ("drop", "stall"):
            return await self._fault(fault, reader, writer)
        if fault.kind == "inband_error":
            await self._send_json(writer, 200, _OVERLOADED, request_id)
        else:  # invalid_json
            await self._send(
                writer, 200, b"{not json", request_id, {"content-type": "application/json"}
            )
        return True

    def _note_disconnect(self) -> None:
        with self._disconnected:
            self.disconnects += 1
            self._disconnected.notify_all()

    def _head(
        self,
        status: int,
        request_id: str,
        extra: Mapping[str, str],
        length: int | None,
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            f"x-request-id: {request_id}",
        ]
        lines += [f"{name}: {value}" for name, value in extra.items()]
        if length is None:
            lines += ["transfer-encoding: chunked", "cache-control: no-cache"]
        else:
            lines.append(f"content-length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        request_id: str,
        extra: Mapping[str, str],
    ) -> None:
        writer.write(self._head(status, request_id, extra, len(body)) + body)
        await writer.drain()

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        request_id: str,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        headers = {"content-type": "application/json", **(extra or {})}
        await self._send(writer, status, json.dumps(payload).encode(), request_id, headers)


_MODELS = ("gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2")
# A model's `created`, as the API dates each model (Unix time): fixed, like the real ones.
_MODELS_CREATED = 1_744_316_542  # 2025-04-10


def _model(name: str) -> dict[str, Any]:
    """A model object, as `/v1/models` lists it and `/v1/models/{id}` answers."""
    return {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "holysheep-mock"}


def _status_error(status: int) -> tuple[str, str | None]:
    """The `type` and `code` of an error body with this status, as the API sends them: a bad
    request, a missing model or a bad key (with its code) is `invalid_request_error`, which the
    client takes as "retrying cannot fix it"; OpenAI has no one type for 403 (Anthropic's
    `permission_error` says it). 408 and 409 are states of the moment that the client retries:
    `invalid_request_error` would stop that, so they keep `server_error`, as 5xx do."""
    if status == 429:
        return "rate_limit_error", None
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if 400 <= status < 500 and status not in (408, 409):
        return "invalid_request_error", None
    return "server_error", None


def _error(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# What OpenAI sends in the stream when the model is overloaded: its error shape (`param` and
# `code` null) and type `server_error`, which the client takes as transient (`_chat.py`
# `_RETRYABLE_KINDS`), so the fault is retried as docs/resilience.md says.
_OVERLOADED = _error(
    "That model is currently overloaded with other requests. You can retry your request.",
    "server_error",
)


class _BadRequest(Exception):
    """A request the real API would refuse with 400; the message names the problem."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return _error(str(self), param=self.param, code=self.code)


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    return _JSON_TYPES.get(type(value), "an object")


def _not_json(name: str) -> Any:
    # Python reads NaN, Infinity and -Infinity; JSON (RFC 8259) has no such values and the
    # API refuses a body holding them.
    raise ValueError(f"{name} is not a JSON value")


def _check_body(body: object) -> dict[str, Any]:
    """Refuse what the real API refuses, in its words, instead of failing mid-answer."""
    if not isinstance(body, dict) or "messages" not in body:
        raise _BadRequest("the body must be a JSON object with messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{i}]", "an object", message)
    for name in ("max_tokens", "max_completion_tokens"):
        _check_integer(body, name, 1)
    _check_integer(body, "n", 1, _MAX_N)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    if options is not None and not stream:
        raise _BadRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    _check_tools(body)
    _check_tool_results(messages)
    return body


# The API takes `n` up to 128; eight choices are plenty to test with, and keep a typo (n=100)
# from streaming a hundred copies.
_MAX_N = 8


def _check_integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type(name, "an integer", value)
    if value < low:
        raise _BadRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got"
            f" {value} instead.",
            name,
            "integer_below_min_value",
        )
    if high is not None and value > high:
        raise _BadRequest(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got"
            f" {value} instead.",
            name,
            "integer_above_max_value",
        )


def _wrong_type(name: str, expected: str, value: object) -> _BadRequest:
    return _BadRequest(
        f"Invalid type for '{name}': expected {expected}, but got {_json_type(value)} instead.",
        name,
        "invalid_type",
    )


def _missing(name: str) -> _BadRequest:
    return _BadRequest(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def _check_tools(body: Mapping[str, Any]) -> None:
    """`tools` is a non-empty array of function (or custom) tools, each named; `tool_choice`
    (only with `tools`) is "none", "auto", "required", names one of them, or lists the allowed
    ones (`allowed_tools`). Only function tools are ever called (see `_function_to_call`)."""
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise _wrong_type("tools", "an array", tools)
        if not tools:
            raise _BadRequest(
                "Invalid 'tools': empty array. Expected an array with minimum length 1, but got"
                " an empty array instead.",
                "tools",
                "empty_array",
            )
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise _wrong_type(f"tools[{i}]", "an object", tool)
            if tool.get("type") == "custom":
                custom = tool.get("custom")
                if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
                    raise _missing(f"tools[{i}].custom.name")
                names.append(custom["name"])
                continue
            if tool.get("type") != "function":
                if "type" not in tool:
                    raise _missing(f"tools[{i}].type")
                raise _BadRequest(
                    f"Invalid value: {tool['type']!r}. Supported values are: 'function' and"
                    " 'custom'.",
                    f"tools[{i}].type",
                    "invalid_value",
                )
            function = tool.get("function")
            if not isinstance(function, dict):
                raise _missing(f"tools[{i}].function")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise _missing(f"tools[{i}].function.name")
            names.append(function["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return
    if tools is None:
        raise _BadRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are"
            " specified.",
            "tool_choice",
        )
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _BadRequest(
                f"Invalid value: {choice!r}. Supported values are: 'none', 'auto', and 'required'.",
                "tool_choice",
                "invalid_value",
            )
        return
    if not isinstance(choice, dict):
        raise _wrong_type("tool_choice", "one of a string or an object", choice)
    kind = choice.get("type", "function")
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools")
        if not isinstance(allowed, dict) or not isinstance(allowed.get("tools"), list):
            raise _missing("tool_choice.allowed_tools.tools")
        return
    if kind not in ("function", "custom"):
        raise _BadRequest(
            f"Invalid value: {kind!r}. Supported values are: 'function', 'custom' and"
            " 'allowed_tools'.",
            "tool_choice.type",
            "invalid_value",
        )
    function = choice.get(kind)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _missing(f"tool_choice.{kind}.name")
    if name not in names:
        raise _BadRequest(
            f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
            "tool_choice",
            "invalid_value",
        )


def _check_tool_results(messages: list[dict[str, Any]]) -> None:
    """As the API insists: each tool message answers a call of the assistant message before
    it, and every call is answered before the conversation goes on."""
    pending: dict[str, None] = {}  # ids of the calls not answered yet, in order
    asked_at = 0
    for i, message in enumerate(messages):
        if message.get("role") == "tool":
            call_id = str(message.get("tool_call_id"))
            if call_id not in pending:
                # "preceeding" [sic]: the API's own words, which clients may match on.
                raise _BadRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a"
                    " preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            del pending[call_id]
            continue
        _check_answered(pending, asked_at)
        if message.get("role") == "assistant":
            calls = message.get("tool_calls")
            calls = calls if isinstance(calls, list) else []
            pending = {str(c.get("id")): None for c in calls if isinstance(c, dict)}
            asked_at = i
    _check_answered(pending, asked_at)


def _check_answered(pending: Mapping[str, None], asked_at: int) -> None:
    if pending:
        raise _BadRequest(
            "An assistant message with 'tool_calls' must be followed by tool messages"
            " responding to each 'tool_call_id'. The following tool_call_ids did not have"
            f" response messages: {', '.join(pending)}",
            f"messages.[{asked_at}].role",
        )


def _request_id(config: UpstreamConfig, headers: Mapping[str, str]) -> str:
    """The server's own id for the answer, as the real API mints one; the client's only if
    `echo_request_id` asks for it."""
    echoed = headers.get("x-request-id") if config.echo_request_id else None
    return echoed or f"req_{uuid.uuid4().hex}"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# Tool-call arguments are streamed this many characters at a time: several fragments for any
# real object, as the API sends them (a few characters per token), and few enough to read.
_ARGUMENT_PIECE = 6
# What a tool call's arguments hold, per JSON-schema type of a property (`enum`: its first).
_SAMPLE_VALUES: dict[str, Any] = {"string": "sheep", "integer": 3, "number": 1.5, "boolean": True}


@final
@attrs.frozen
class _Tokens:
    """The text tokens of one choice, cut only as they are read: the first `count` of
    `_cut(text)`, rotated by `by` (choice i starts at token i)."""

    text: str
    count: int
    by: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        by = self.by % self.count if self.count else 0
        return itertools.chain(
            itertools.islice(_cut(self.text), by, self.count),
            itertools.islice(_cut(self.text), by),
        )


@final
@attrs.frozen
class _Planned:
    """One choice of an answer: its pieces (text tokens, or the argument fragments of a call to
    `tool` with id `call_id`), each one content event, and its finish reason."""

    pieces: _Tokens | list[str]
    finish: str
    tool: str | None = None
    call_id: str | None = None

    def message(self) -> dict[str, Any]:
        """The choice as a non-stream answer's `message`."""
        if self.tool is None:
            return {"role": "assistant", "content": "".join(self.pieces), "refusal": None}
        call = {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.tool, "arguments": "".join(self.pieces)},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}


def _plan(
    config: UpstreamConfig, body: Mapping[str, Any], max_tokens: int | None, completion_id: str
) -> list[_Planned]:
    """The `n` choices of the answer. Text: choice i is the token list rotated by i tokens
    (choice 0 is the plain list), so every choice is predictable and, given more tokens than
    choices, distinct. A tool call: the same call in every choice, each with its own id."""
    n = body.get("n") or 1
    function = _function_to_call(config, body)
    if function is None:
        count = config.token_count(max_tokens)
        finish = "length" if max_tokens is not None and count >= max_tokens else "stop"
        return [_Planned(_Tokens(config.text, count, i), finish) for i in range(n)]
    arguments = json.dumps(_sample_arguments(function.get("parameters")), separators=(",", ":"))
    pieces = [arguments[i : i + _ARGUMENT_PIECE] for i in range(0, len(arguments), _ARGUMENT_PIECE)]
    # Like the API, max_tokens cuts the arguments wherever it falls, JSON or not.
    capped = pieces if max_tokens is None else pieces[:max_tokens]
    # A call the request named (`tool_choice` naming the function) finishes as "stop" on the
    # API, one the model chose (auto, required) as "tool_calls".
    named = isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") in (
        None,
        "function",
    )
    finish = "length" if len(capped) < len(pieces) else "stop" if named else "tool_calls"
    name = function["name"]
    return [_Planned(capped, finish, name, _call_id(completion_id, i)) for i in range(n)]


def _call_id(completion_id: str, choice: int) -> str:
    # Derived from the completion's id, so every attempt of one call (the same
    # Idempotency-Key, hence the same completion id) names its calls alike, and a resumed
    # stream continues the same call.
    return f"call_{hashlib.sha256(f'{completion_id}/{choice}'.encode()).hexdigest()[:24]}"


def _function_to_call(config: UpstreamConfig, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `function` of the tool the answer calls, or None for a text answer.

    The second turn of a tool-calling loop (the last message is a tool's result) is answered
    with text, whatever `tool_choice` says, so a loop under test ends.
    """
    tools = body.get("tools")
    choice = body.get("tool_choice")
    messages = body["messages"]
    if not tools or not config.tool_calls or choice == "none":
        return None
    if messages and messages[-1].get("role") == "tool":
        return None
    # Custom tools (free-form input) are accepted but never called: the answer is text.
    functions = [tool["function"] for tool in tools if tool.get("type") == "function"]
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {
            entry["function"].get("name")
            for entry in choice["allowed_tools"]["tools"]
            if isinstance(entry, dict) and isinstance(entry.get("function"), dict)
        }
        functions = [function for function in functions if function["name"] in allowed]
    elif isinstance(choice, dict):
        if choice.get("type", "function") != "function":
            return None
        wanted = choice["function"]["name"]
        functions = [function for function in functions if function["name"] == wanted]
    return functions[0] if functions else None


def _sample_arguments(schema: object) -> dict[str, Any]:
    """Fixed values for the properties of a simple `parameters` schema: a string, integer,
    number or boolean property gets `_SAMPLE_VALUES`' (an `enum` its first value); any other
    property is left out, and a schema without `properties` gives `{}`."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    arguments: dict[str, Any] = {}
    for name, spec in properties.items():
        if not isinstance(spec, dict):
            continue
        enum = spec.get("enum")
        kind = spec.get("type")
        if isinstance(kind, list):  # ["string", "null"]: an optional string
            kind = next((k for k in kind if k != "null"), None)
        if isinstance(enum, list) and enum:
            arguments[name] = enum[0]
        elif isinstance(kind, str) and kind in _SAMPLE_VALUES:
            arguments[name] = _SAMPLE_VALUES[kind]
    return arguments


def _events(
    base: Mapping[str, Any], plan: list[_Planned], usage: dict[str, int] | None
) -> Iterator[tuple[bool, bytes]]:
    """(is_content, JSON payload) for every event of the stream, in order.

    As the real API does: each chunk carries one choice, with its `index`; every choice has a
    first chunk (the role, and for a tool call its id, type, name and empty arguments), then
    the choices' pieces interleaved (piece 0 of each choice, then piece 1, ...), then a finish
    chunk per choice. With `include_usage` (`usage` given) every chunk carries `"usage": null`
    but the last, which carries the usage of all choices and no choices.
    """
    head = {"id": base["id"], "object": "chat.completion.chunk", **base}
    tail = {} if usage is None else {"usage": None}

    def event(choices: list[Any], **extra: Any) -> bytes:
        chunk = {**head, "choices": choices, **tail, **extra}
        return json.dumps(chunk, separators=(",", ":")).encode()

    def choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> list[Any]:
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    for index, planned in enumerate(plan):
        first: dict[str, Any]
        if planned.tool is None:
            first = {"role": "assistant", "content": "", "refusal": None}
        else:
            function = {"name": planned.tool, "arguments": ""}
            call = {"index": 0, "id": planned.call_id, "type": "function", "function": function}
            first = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        yield False, event(choice(index, first))
    pieces = [iter(planned.pieces) for planned in plan]
    for step in range(max((len(planned.pieces) for planned in plan), default=0)):
        for index, planned in enumerate(plan):
            if step >= len(planned.pieces):
                continue
            piece = next(pieces[index])
            if planned.tool is None:
                delta: dict[str, Any] = {"content": piece}
            else:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            yield True, event(choice(index, delta))
    for index, planned in enumerate(plan):
        yield False, event(choice(index, {}, planned.finish))
    if usage is not None:
        yield False, event([], usage=usage)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body; ValueError naming a chunk size that is not a hexadecimal number."""
    parts: list[bytes] = []
    while True:
        line = (await reader.readuntil(b"\r\n")).split(b";")[0].strip()
        if not line or line.strip(b"0123456789abcdefABCDEF"):
            raise ValueError(f"chunk size {line.decode('latin-1')!r} is not a hexadecimal number")
        size = int(line, 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


@contextlib.contextmanager
def serve(
    config: UpstreamConfig | None = None, *, port: int = 0, **overrides: Any
) -> Iterator[MockUpstream]:
    """Run a `MockUpstream` on a background thread for the duration of the block.

    `serve(ttft=0.2, tokens_per_s=50)` is `serve(UpstreamConfig(ttft=0.2, tokens_per_s=50))`.
    """
    upstream = MockUpstream((config or UpstreamConfig()).merged(overrides or None))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(upstream.start(port=port))
        except BaseException as exc:  # pragma: no cover - a busy port
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(upstream.stop())
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="holysheep-upstream", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def _route(target: str) -> str:
    """The path a request line names: without its query, a trailing slash, or (the
    absolute form a proxy is sent) its scheme and host. Routes are exact, as the gateway's
    are: a client that dropped `/v1` must get the 404 the real one would."""
    path = target.split("?")[0]
    if path.startswith(("http://", "https://")):
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    return path.rstrip("/") or "/"
