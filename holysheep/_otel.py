"""OpenTelemetry traces and metrics for holysheep, as an `Observer` (extra: `holysheep[otel]`).

Theory of operation
-------------------
`OpenTelemetryObserver` turns the five lifecycle callbacks into one span and a handful of metric
points per logical request (all its attempts together):

- `on_request` starts a CLIENT span named `chat {model}` with everything known up front (the
  request attributes samplers may look at) and keeps `_Stream` state keyed by the
  `RequestInfo`, which hashes by identity.
- `on_first_token` sets `gen_ai.response.time_to_first_chunk` and adds a span event.
- `on_retry` adds a span event and counts the retry.
- `on_end` / `on_error` pop the state, set the response (or error) attributes, end the span and
  record the histograms. The `Observer` contract closes every request with exactly one of the
  two, so no span stays open and no state outlives its request; but for a stream dropped
  without being closed or read to its end, which nothing reports. The state is held by weak
  reference to the `RequestInfo`, which lives as long as the stream, so such a stream's state
  and request body go with it; its span is ended as abandoned when the next request starts
  (`_end_abandoned`).

One observer serves every stream of a client, and a sync client may be used from many threads,
so the shared dict is only touched under `_lock`. A stream's own callbacks come from the thread
or task reading it, but for the end of one closed by `close()` from another: that end may
overlap a first token or a retry told in the reading thread. The lock also makes each
callback's look at a stream's state whole: an end pops it before a first token changes it, or
after, never while.

Names follow the OpenTelemetry semantic conventions for Generative AI as released in semantic
conventions v1.41.0 (the spans and client metrics pages, `schema_url` below): the attribute is
`gen_ai.provider.name`, which replaced `gen_ai.system` in v1.37 (the older name is not
emitted), and time to first chunk exists both as the span attribute
`gen_ai.response.time_to_first_chunk` and the histogram
`gen_ai.client.operation.time_to_first_chunk`. The GenAI group's later, still unreleased
renames (`gen_ai.client.inference.*`) are not followed. What the conventions do not name
(retries, the output token rate) is under `holysheep.*`.

Unlike the core, this module reads a clock: `gen_ai.client.operation.duration` covers the
whole operation, retries and their waits included, which no one attempt's `StreamStats` carries.
The OpenTelemetry API is imported when an observer is constructed, never by `import holysheep`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeGuard, final
from urllib.parse import urlsplit

import attrs

from ._observe import Observer, RequestInfo
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from ._call import Attempt
    from ._chat import Completion
    from ._exchange import StreamStats

__all__ = ["OpenTelemetryObserver"]

#: The semantic conventions version these names follow.
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.41.0"

# Bucket boundaries the conventions recommend (ExplicitBucketBoundaries advice) for
# gen_ai.client.operation.duration and .time_to_first_chunk: 10 ms doubling to 82 s.
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
# ... and for gen_ai.client.token.usage: powers of four from 1 to 64 Mi tokens.
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
# Ours, for output tokens per second: doubling from a crawling 1/s to the 4,096/s that only the
# fastest hosted inference approaches; the same doubling as the durations keeps shapes alike.
RATE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

_INSTALL = "pip install 'holysheep[otel]'"

#: `error.type` of the span of a stream dropped without an end (see `_end_abandoned`).
ABANDONED: Final = "holysheep.abandoned"

# Request body keys -> span attributes, by the type the conventions give them.
_FLOAT_PARAMS: Final = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
}
_INT_PARAMS: Final = {
    "top_k": "gen_ai.request.top_k",
    "seed": "gen_ai.request.seed",
}


@attrs.define
class _Stream:
    """What one request's span needs between callbacks."""

    span: Span
    started: float
    #: Attributes every metric point of this request carries.
    attributes: dict[str, AttributeValue]
    ttft: float | None = None
    #: Ends the span as abandoned if the request's `RequestInfo` goes before its end came.
    dropped: weakref.finalize[Any, Any] | None = None


@final
class OpenTelemetryObserver(Observer):
    """Spans and metrics per the OpenTelemetry GenAI semantic conventions.

    `tracer_provider` and `meter_provider` default to the global ones. `capture_content=True`
    records the prompt and the completion on the span (`gen_ai.input.messages`,
    `gen_ai.output.messages`); leave it off where those may hold personal data.
    `provider_name` is the `gen_ai.provider.name` value: holysheep speaks the OpenAI chat
    completions API, so `"openai"` unless you know the gateway behind the URL better.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        capture_content: bool = False,
        provider_name: str = "openai",
    ) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError as exc:
            raise ImportError(
                f"holysheep.OpenTelemetryObserver needs the OpenTelemetry API: {_INSTALL}"
            ) from exc
        self.capture_content = capture_content
        self.provider_name = provider_name
        self._tracer = trace.get_tracer(
            "holysheep", __version__, tracer_provider, schema_url=SCHEMA_URL
        )
        meter = metrics.get_meter("holysheep", __version__, meter_provider, schema_url=SCHEMA_URL)
        self._duration: Histogram = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._token_usage: Histogram = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._time_to_first_chunk: Histogram = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            # From the first attempt's send, as the conventions define it and `stats.ttft` is:
            # the caller waited through the failed attempts and the waits between them too.
            description="Time to the first content chunk, from the first attempt's send "
            "(retries and their waits included).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._output_rate: Histogram = meter.create_histogram(
            "holysheep.client.operation.output_token_rate",
            unit="{token}/s",
            description="Output tokens per second after the first token.",
            explicit_bucket_boundaries_advisory=RATE_BUCKETS,
        )
        self._retries: Counter = meter.create_counter(
            "holysheep.client.operation.retries",
            unit="{retry}",
            description="Attempts that failed and were retried.",
        )
        # Weak: a stream dropped without an end must not keep its state and body for good.
        self._streams: weakref.WeakKeyDictionary[RequestInfo, _Stream] = weakref.WeakKeyDictionary()
        # The states of requests whose `RequestInfo` went without an end, to end at the next
        # callback: the garbage collector, which finds them, may run anywhere (within a span
        # exporter holding its lock, say), so it only appends (atomic, takes no lock).
        self._abandoned: list[_Stream] = []
        self._lock = threading.Lock()  # see the module docstring

    # -- Observer ---------------------------------------------------------------------------

    def on_request(self, info: RequestInfo) -> None:
        from opentelemetry.trace import SpanKind

        common: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.provider_name,
            "gen_ai.request.model": info.model,
            **_server(info.url),
        }
        attributes = {
            **common,
            **_request_attributes(info.body),
            "holysheep.request_id": info.request_id,
        }
        if self.capture_content:
            attributes["gen_ai.input.messages"] = _json(_input_messages(info.body.get("messages")))
        if self._abandoned:
            self._end_abandoned()
        span = self._tracer.start_span(
            f"chat {info.model}", kind=SpanKind.CLIENT, attributes=attributes
        )
        stream = _Stream(span, time.monotonic(), common)
        stream.dropped = weakref.finalize(info, self._abandoned.append, stream)
        stream.dropped.atexit = False  # a stream open at exit: the providers may be shut down
        with self._lock:
            self._streams[info] = stream

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        with self._lock:
            stream = self._streams.get(info)
            if stream is None or stats.ttft is None:
                return
            stream.ttft = stats.ttft
            stream.span.set_attribute("gen_ai.response.time_to_first_chunk", stats.ttft)
            stream.span.add_event(
                "holysheep.first_token", {"gen_ai.response.time_to_first_chunk": stats.ttft}
            )

    def on_retry(self, info: RequestInfo, attempt: Attempt) -> None:
        with self._lock:
            stream = self._streams.get(info)
            if stream is not None:
                self._retried(stream, attempt)

    def _retried(self, stream: _Stream, attempt: Attempt) -> None:
        error_type = _attempt_error_type(attempt)
        event: dict[str, AttributeValue] = {
            "holysheep.retry.attempt": attempt.attempt,
            "error.type": error_type,
            "holysheep.retry.error": attempt.error,
            "holysheep.retry.reason": attempt.decision,
        }
        if attempt.delay is not None:
            event["holysheep.retry.delay"] = attempt.delay
        stream.span.add_event("holysheep.retry", event)
        self._retries.add(1, {**stream.attributes, "error.type": error_type})

    def on_end(self, info: RequestInfo, completion: Completion, stats: StreamStats) -> None:
        with self._lock:
            stream = self._streams.pop(info, None)
        if stream is None:
            return
        if stream.dropped is not None:
            stream.dropped.detach()
        span, metric = stream.span, stream.attributes
        if completion.model:
            metric["gen_ai.response.model"] = completion.model
        span.set_attributes(_response_attributes(completion, stats))
        rate = stats.tokens_per_s
        if rate is not None:
            span.set_attribute("holysheep.output_token_rate", rate)
        if self.capture_content:
            span.set_attribute("gen_ai.output.messages", _json(_output_messages(completion)))
        span.end()

        self._duration.record(time.monotonic() - stream.started, metric)
        if stream.ttft is not None:
            self._time_to_first_chunk.record(stream.ttft, metric)
        usage = completion.usage
        if usage is not None and usage.prompt_tokens is not None:
            self._token_usage.record(usage.prompt_tokens, {**metric, "gen_ai.token.type": "input"})
        if usage is not None and usage.completion_tokens is not None:
            output = {**metric, "gen_ai.token.type": "output"}
            self._token_usage.record(usage.completion_tokens, output)
        if rate is not None:
            self._output_rate.record(rate, metric)

    def on_error(self, info: RequestInfo, error: BaseException, stats: StreamStats) -> None:
        from opentelemetry.trace import Status, StatusCode

        with self._lock:
            stream = self._streams.pop(info, None)
        if stream is None:
            return
        if stream.dropped is not None:
            stream.dropped.detach()
        span = stream.span
        error_type = type(error).__qualname__
        span.set_attribute("error.type", error_type)
        span.set_attribute("holysheep.attempts", stats.attempts)
        if stats.status_code is not None:
            span.set_attribute("http.response.status_code", stats.status_code)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error) or error_type))
        span.end()

        metric = stream.attributes
        self._duration.record(
            time.monotonic() - stream.started, {**metric, "error.type": error_type}
        )
        if stream.ttft is not None:
            self._time_to_first_chunk.record(stream.ttft, metric)

    def _end_abandoned(self) -> None:
        """End the spans of requests dropped without an end (see `_abandoned`): status ERROR,
        as how they went is unknown, and no metric point, as their duration would be the
        garbage collector's."""
        from opentelemetry.trace import Status, StatusCode

        while self._abandoned:
            try:
                stream = self._abandoned.pop()
            except IndexError:  # another thread took the last one
                return
            span = stream.span
            span.set_attribute("error.type", ABANDONED)
            span.set_status(
                Status(
                    StatusCode.ERROR,
                    "the stream was dropped without being closed or read to its end: how it "
                    "ended is unknown (use `with` / `async with`)",
                )
            )
            span.end()


# -- attributes ------------------------------------------------------------------------------


def _server(url: str) -> dict[str, AttributeValue]:
    """`server.address` and `server.port` of the request URL (the port by scheme if absent)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return {}
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: leave it out rather than fail
        port = None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    found: dict[str, AttributeValue] = {"server.address": parts.hostname}
    if port is not None:
        found["server.port"] = port
    return found


def _request_attributes(body: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """The `gen_ai.request.*` attributes the body sets; values of the wrong type are skipped."""
    found: dict[str, AttributeValue] = {"gen_ai.request.stream": bool(body.get("stream", True))}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if _is_int(max_tokens):
        found["gen_ai.request.max_tokens"] = max_tokens
    for key, name in _FLOAT_PARAMS.items():
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = float(value)
    for key, name in _INT_PARAMS.items():
        value = body.get(key)
        if _is_int(value):
            found[name] = value
    count = body.get("n")
    if _is_int(count) and count != 1:  # the conventions: only when not 1
        found["gen_ai.request.choice.count"] = count
    stop = body.get("stop")
    if isinstance(stop, str):
        found["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, Sequence) and stop and all(isinstance(s, str) for s in stop):
        found["gen_ai.request.stop_sequences"] = list(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind in ("json_object", "json_schema"):
            found["gen_ai.output.type"] = "json"
        elif kind == "text":
            found["gen_ai.output.type"] = "text"
    return found


def _response_attributes(completion: Completion, stats: StreamStats) -> dict[str, AttributeValue]:
    found: dict[str, AttributeValue] = {"holysheep.attempts": stats.attempts}
    if completion.id:
        found["gen_ai.response.id"] = completion.id
    if completion.model:
        found["gen_ai.response.model"] = completion.model
    reasons = [c.finish_reason for c in completion.choices if c.finish_reason]
    if reasons:  # none when the caller left before the model finished
        found["gen_ai.response.finish_reasons"] = reasons
    usage = completion.usage
    if usage is not None:
        if usage.prompt_tokens is not None:
            found["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        if usage.completion_tokens is not None:
            found["gen_ai.usage.output_tokens"] = usage.completion_tokens
        cached = _detail(usage.raw, "prompt_tokens_details", "cached_tokens")
        if cached is not None:
            found["gen_ai.usage.cache_read.input_tokens"] = cached
        reasoning = _detail(usage.raw, "completion_tokens_details", "reasoning_tokens")
        if reasoning is not None:
            found["gen_ai.usage.reasoning.output_tokens"] = reasoning
    return found


def _detail(raw: Mapping[str, Any], group: str, key: str) -> int | None:
    details = raw.get(group)
    value = details.get(key) if isinstance(details, Mapping) else None
    return value if _is_int(value) else None


def _attempt_error_type(attempt: Attempt) -> str:
    """The exception class of a failed attempt (from its `error` text, `"ClassName: message"`,
    for an `Attempt` built without the exception)."""
    if attempt.exception is not None:
        return type(attempt.exception).__name__
    name, _, _ = attempt.error.partition(":")
    return name.strip() or "_OTHER"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# -- content (only with capture_content=True) ------------------------------------------------


def _json(value: Any) -> str:
    # Structured attributes are recorded as JSON strings, which every exporter can carry.
    return json.dumps(value, ensure_ascii=False, default=str)


def _input_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages in the conventions' `gen_ai.input.messages` shape (role + parts)."""
    found: list[dict[str, Any]] = []
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return found
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = str(message.get("role") or "user")
        parts: list[dict[str, Any]] = []
        if role == "tool":
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": message.get("tool_call_id"),
                    "response": message.get("content"),
                }
            )
        else:
            parts.extend(_content_parts(message.get("content")))
            for call in message.get("tool_calls") or ():
                if isinstance(call, Mapping):
                    function = call.get("function")
                    function = function if isinstance(function, Mapping) else {}
                    parts.append(
                        _tool_call(call.get("id"), function.get("name"), function.get("arguments"))
                    )
        found.append({"role": role, "parts": parts})
    return found


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if isinstance(content, Sequence):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "text":
                parts.append({"type": "text", "content": part.get("text", "")})
            else:
                # Images, audio, files: the kind only, never the (often base64) payload.
                parts.append({"type": str(part.get("type") or "unknown")})
    return parts


def _tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        # A model that wrote broken JSON: keep the text.
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments) if arguments else {}
    return {"type": "tool_call", "id": call_id, "name": name or "", "arguments": arguments}


def _output_messages(completion: Completion) -> list[dict[str, Any]]:
    """Each choice as a `gen_ai.output.messages` entry."""
    found: list[dict[str, Any]] = []
    for choice in completion.choices:
        parts: list[dict[str, Any]] = []
        if choice.reasoning:
            parts.append({"type": "reasoning", "content": choice.reasoning})
        if choice.text:
            parts.append({"type": "text", "content": choice.text})
        if choice.refusal:
            parts.append({"type": "refusal", "content": choice.refusal})
        parts.extend(_tool_call(c.id, c.name, c.arguments) for c in choice.tool_calls)
        message: dict[str, Any] = {"role": choice.role or "assistant", "parts": parts}
        if choice.finish_reason:
            message["finish_reason"] = choice.finish_reason
        found.append(message)
    return found
