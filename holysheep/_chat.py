"""The chat stream layer: SSE events of a `chat.completion.chunk` stream in, typed deltas out.

Theory of operation
-------------------
`ChatAccumulator` sits on top of an `SSEDecoder`. Each data event is one JSON chunk; it is
parsed once, turned into a `ChatChunk` (its typed deltas plus the raw dict), and its fragments
are appended to per-choice lists. Nothing is concatenated per chunk: `completion` joins each
list once when asked (and keeps the joined string, so asking again is free). That keeps
accumulation linear in the size of the stream.

The stream ends well when `data: [DONE]` arrives, or, for servers that omit it, when every
choice seen has a `finish_reason` and no event was cut off. With `n` > 1 the choices finish one
by one, so one finish_reason alone says nothing of the others' ends. `close()` checks that and
raises `IncompleteStreamError` with the partial completion otherwise.

Tool calls arrive as fragments keyed by `index`. Real gateways bend that: some omit `index`
(we fall back to `id`, then to the latest call), some repeat `id` and `name` on every
fragment (we keep one copy), some reuse index 0 for parallel calls with distinct ids (a new id
at a known index starts a new call, a known one goes back to its call, even interleaved; a
fragment without an id continues the call that took the last one at its index). A new call
without an index gets the next unused one.
Numbers are never added together: the latest `usage` wins.
"""

from __future__ import annotations

import json
import operator
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias, final

import attrs

from . import _sse
from ._exceptions import (
    ConfigurationError,
    HolySheepError,
    IncompleteStreamError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamError,
)
from ._pricing import Cost, cost_of
from ._sse import ServerSentEvent, SSEDecoder

__all__ = [
    "ChatAccumulator",
    "ChatChunk",
    "ChatDelta",
    "Choice",
    "Completion",
    "ContentDelta",
    "Finished",
    "ReasoningDelta",
    "RefusalDelta",
    "Reset",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "UsageReport",
    "is_retryable_error",
]

try:  # orjson parses chunks ~2-3x faster; it is an optional extra (`holysheep[speedups]`).
    import orjson

    _loads: Callable[[str | bytes], Any] = orjson.loads
    JSON_BACKEND = "orjson"
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    JSON_BACKEND = "json"

_DONE = "[DONE]"
# Long enough to recognise a payload in an error message, short enough to read.
_SNIPPET = 200

# Error types and codes that mean "try again later", from OpenAI, Anthropic and the gateways
# in front of them. Anything else (invalid request, auth, quota) will fail the same way again.
_RETRYABLE_KINDS = frozenset(
    {
        "overloaded",
        "overloaded_error",
        "rate_limit",
        "rate_limit_error",
        "rate_limit_exceeded",
        "server_error",
        "api_error",
        "internal_error",
        "internal_server_error",
        "service_unavailable",
        "service_unavailable_error",
        "timeout",
        "timeout_error",
        "upstream_error",
        "bad_gateway",
    }
)
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# The same statuses as the text a server sends ("429"). A code is compared with these, never
# passed to int(): str.isdigit() also holds for digits int() refuses ("²") or reads ("٤٢٩"),
# and int() refuses more than 4300 digits, so a server's code could raise instead of classify.
_RETRYABLE_STATUS_TEXT = frozenset(map(str, _RETRYABLE_STATUS))


def is_retryable_error(type: str | None, code: str | int | None) -> bool:
    """Whether an error of this type/code is transient (overloaded, rate limit, server error)."""
    for kind in (type, code):
        if isinstance(kind, int):
            if kind in _RETRYABLE_STATUS:
                return True
        elif isinstance(kind, str) and (
            kind in _RETRYABLE_STATUS_TEXT or kind.lower() in _RETRYABLE_KINDS
        ):
            return True
    return False


def _snippet(text: str) -> str:
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "...")


# -- values ------------------------------------------------------------------------------------


@final
@attrs.frozen
class Usage:
    """Token counts as the server reported them; `raw` keeps details such as cached tokens."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    def to_dict(self) -> dict[str, int | None]:
        """The three counts under the OpenAI names, for JSON (a log line, a relay's event);
        `raw` has whatever else the server sent. A fresh dict each time."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Usage:
        """Read OpenAI names, falling back to Anthropic's `input_tokens`/`output_tokens`."""
        prompt = _count(raw.get("prompt_tokens", raw.get("input_tokens")))
        completion = _count(raw.get("completion_tokens", raw.get("output_tokens")))
        total = _count(raw.get("total_tokens"))
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        return cls(prompt, completion, total, raw)


def _count(value: object) -> int | None:
    # JSON `true` decodes to a bool, which Python counts as the int 1: no token count.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@final
@attrs.frozen
class ToolCall:
    """A complete tool call: `arguments` is the whole JSON string, as the model wrote it."""

    id: str
    name: str
    arguments: str
    index: int = 0
    type: str = "function"

    def parsed_arguments(self) -> Any:
        """`arguments` parsed as JSON (raises `json.JSONDecodeError` if the model wrote junk)."""
        return json.loads(self.arguments) if self.arguments else {}


@final
@attrs.frozen
class Choice:
    """One choice of a completion (there are several when the request sets `n`)."""

    index: int
    text: str = ""
    role: str | None = None
    refusal: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None


@final
@attrs.frozen
class Completion:
    """The accumulated result of a stream, complete or partial.

    `text`, `role`, `tool_calls`, `finish_reason` and friends read choice 0, which is the only
    choice unless the request set `n`; `choices` has all of them.
    """

    choices: tuple[Choice, ...] = ()
    id: str | None = None
    model: str | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    usage: Usage | None = None
    last_chunk: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def _first(self) -> Choice:
        # Choice 0, listed first (by index) once it began. A stream cut before it began (`n` >
        # 1, another choice first) has only others: their text is not choice 0's, which no
        # chunk's `text` showed.
        choices = self.choices
        if choices and choices[0].index == 0:
            return choices[0]
        for choice in choices:  # a gateway's negative index sorts first
            if choice.index == 0:
                return choice
        return _EMPTY_CHOICE

    @property
    def text(self) -> str:
        return self._first.text

    @property
    def role(self) -> str | None:
        return self._first.role

    @property
    def refusal(self) -> str | None:
        return self._first.refusal

    @property
    def reasoning(self) -> str | None:
        return self._first.reasoning

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self._first.tool_calls

    @property
    def finish_reason(self) -> str | None:
        return self._first.finish_reason

    @property
    def cost(self) -> Cost | None:
        """What this completion cost at the built-in gateway prices (None: unpriced model).

        From the server's usage when it sent one; otherwise estimated from everything the model
        wrote (every choice's text, reasoning, refusal and tool calls) and marked `estimated`.
        A completion does not know its prompt, so an estimate leaves the prompt out; for that,
        and for other prices, call `cost_of(...)` with `prompt_text` and your own `PriceTable`.
        """
        usage = self.usage
        return cost_of(
            usage.prompt_tokens if usage is not None else None,
            usage.completion_tokens if usage is not None else None,
            self.model or "",
            completion_text=self.output_text if usage is None else "",
        )

    @property
    def output_text(self) -> str:
        """Everything the model wrote, over every choice: what output tokens are billed for
        (the text alone misses the other choices, reasoning and tool-call arguments)."""
        parts: list[str] = []
        for choice in self.choices:
            parts += (choice.text, choice.reasoning or "", choice.refusal or "")
            for call in choice.tool_calls:
                parts += (call.name, call.arguments)
        return "".join(parts)

    def to_message(self, choice: int = 0) -> dict[str, Any]:
        """Choice `choice` as the assistant message to append to `messages` for the next turn.

        A tool-calling loop must send the model's calls back ahead of their results, in the
        shape the API takes: `content` is None beside tool calls and no text (as the API itself
        answers), a string otherwise; `tool_calls` is left out when there are none; a `refusal`
        goes back as one. Reasoning goes back as `reasoning_content` with tool calls only:
        DeepSeek's thinking mode answers 400 to a tool loop that drops it, and ignores it on a
        text turn (where its older API refused it). A fresh dict each time, yours to change.
        """
        found = self._choice(choice)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": found.text or (None if found.tool_calls else ""),
        }
        if found.refusal is not None:
            message["refusal"] = found.refusal
        if found.tool_calls and found.reasoning:
            message["reasoning_content"] = found.reasoning
        if found.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in found.tool_calls
            ]
        return message

    def _choice(self, index: int) -> Choice:
        for choice in self.choices:
            if choice.index == index:
                return choice
        if index == 0 and not self.choices:
            return _EMPTY_CHOICE  # nothing arrived: an empty answer, as `text` reads ""
        seen = ", ".join(str(choice.index) for choice in self.choices) or "none"
        raise IndexError(f"no choice {index} in this completion (choices: {seen})")


_EMPTY_CHOICE = Choice(0)


# -- deltas: what one chunk says ------------------------------------------------------------


@final
@attrs.frozen
class ContentDelta:
    """A piece of the answer's text."""

    text: str
    choice: int = 0


@final
@attrs.frozen
class ReasoningDelta:
    """A piece of the model's reasoning (DeepSeek's `reasoning_content`, `reasoning`)."""

    text: str
    choice: int = 0


@final
@attrs.frozen
class RefusalDelta:
    """A piece of a refusal message, sent instead of content when the model declines."""

    text: str
    choice: int = 0


@final
@attrs.frozen
class ToolCallDelta:
    """A fragment of a tool call; `arguments` is this fragment only, not the whole string."""

    index: int
    id: str | None
    name: str | None
    arguments: str
    choice: int = 0


@final
@attrs.frozen
class Finished:
    """The server says a choice is done, and why (`stop`, `length`, `tool_calls`, ...)."""

    reason: str
    choice: int = 0


@final
@attrs.frozen
class UsageReport:
    """Token usage, usually in the last chunk when `stream_options.include_usage` is set."""

    usage: Usage


@final
@attrs.frozen
class Reset:
    """The stream restarts from the beginning (`on_interrupt="restart"`).

    Forget the partial text shown so far; the completion starts over too.
    """

    reason: str
    attempt: int


ChatDelta: TypeAlias = (
    ContentDelta | ReasoningDelta | RefusalDelta | ToolCallDelta | Finished | UsageReport | Reset
)


@final
@attrs.frozen
class ChatChunk:
    """One `chat.completion.chunk` event.

    `text` is choice 0's content in this chunk ("" if none), which is what most callers print;
    `deltas` has everything the chunk said, typed; `raw` is the parsed JSON (a mapping, parsed
    when first read: most callers never read it, and thousands of open streams need not hold it).
    """

    text: str
    deltas: tuple[ChatDelta, ...]
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)
    event: ServerSentEvent | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def reset(self) -> Reset | None:
        """The `Reset` marker this chunk carries, if the stream restarted here."""
        for delta in self.deltas:
            if isinstance(delta, Reset):
                return delta
        return None

    @classmethod
    def for_reset(cls, reset: Reset) -> ChatChunk:
        return cls("", (reset,), {}, None)

    @property
    def id(self) -> str | None:
        value = self.raw.get("id")
        return value if isinstance(value, str) else None

    @property
    def model(self) -> str | None:
        value = self.raw.get("model")
        return value if isinstance(value, str) else None


@final
class _ParsedLater(Mapping[str, Any]):
    """`ChatChunk.raw` as the accumulator makes it: the chunk's JSON, parsed when first read.

    The accumulator parses every chunk once to read its deltas and lets the result go. Keeping
    it on the chunk instead held a dict tree of some 20 objects (1.4 KiB) for as long as the
    caller kept the chunk, typically until the next one arrives: with thousands of open
    streams, the largest part of their memory, and work for the garbage collector. Few
    callers read `raw`; those who do pay one more parse, once per chunk.
    """

    __slots__ = ("_data", "_loads", "_parsed")

    def __init__(self, data: str, loads: Callable[[str], Any]) -> None:
        self._data = data
        self._loads = loads
        self._parsed: dict[str, Any] | None = None

    def _dict(self) -> dict[str, Any]:
        parsed = self._parsed
        if parsed is None:
            parsed = self._parsed = self._loads(self._data)
        return parsed

    def __getitem__(self, key: str) -> Any:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __repr__(self) -> str:
        return repr(self._dict())


# The accumulator builds two objects per content chunk; like the SSE decoder it sets the slots of
# these frozen classes directly, skipping attrs' frozen `__init__` (nothing to validate: we made
# every value), which takes a sixth off the cost of a chunk.
_new = object.__new__
_set_delta_text = ContentDelta.__dict__["text"].__set__
_set_delta_choice = ContentDelta.__dict__["choice"].__set__
_set_chunk_text, _set_chunk_deltas, _set_chunk_raw, _set_chunk_event = (
    ChatChunk.__dict__[name].__set__ for name in ("text", "deltas", "raw", "event")
)


def _content_delta(text: str, choice: int) -> ContentDelta:
    obj = _new(ContentDelta)
    _set_delta_text(obj, text)
    _set_delta_choice(obj, choice)
    return obj


def _chat_chunk(
    text: str, deltas: tuple[ChatDelta, ...], raw: Mapping[str, Any], event: ServerSentEvent
) -> ChatChunk:
    obj = _new(ChatChunk)
    _set_chunk_text(obj, text)
    _set_chunk_deltas(obj, deltas)
    _set_chunk_raw(obj, raw)
    _set_chunk_event(obj, event)
    return obj


# -- the accumulator ----------------------------------------------------------------------------


@attrs.define
class _ToolCallState:
    index: int
    id: str = ""
    name: str = ""
    type: str = "function"
    arguments: list[str] = attrs.field(factory=list)

    def freeze(self) -> ToolCall:
        if len(self.arguments) > 1:
            self.arguments[:] = ["".join(self.arguments)]
        return ToolCall(self.id, self.name, "".join(self.arguments), self.index, self.type)


_call_index = operator.attrgetter("index")


# Content deltas are joined in blocks of this many as they arrive. A chat stream is mostly
# one-word deltas, and one string object per delta (about 56 bytes each for a few characters)
# was most of what an open stream holds; blocks of 8 hold a fifth of that, and every
# character is still copied a bounded number of times (once into its block, once at the end).
_BLOCK = 8


@attrs.define
class _ChoiceState:
    index: int
    text: list[str] = attrs.field(factory=list)
    # text[:blocks] are joined blocks, text[blocks:] the deltas since the last one.
    blocks: int = 0
    refusal: list[str] | None = None
    reasoning: list[str] | None = None
    role: str | None = None
    finish_reason: str | None = None
    # Tool calls, made when the first one arrives: most choices never have any.
    calls: list[_ToolCallState] | None = None
    calls_by_index: dict[int, _ToolCallState] | None = None
    calls_by_id: dict[str, _ToolCallState] | None = None

    def add_text(self, content: str) -> None:
        text = self.text
        text.append(content)
        if len(text) - self.blocks >= _BLOCK:
            start = self.blocks
            text[start:] = ["".join(text[start:])]
            self.blocks = start + 1

    def tool_call(self, index: Any, id: str | None) -> _ToolCallState:
        if self.calls is None or self.calls_by_index is None or self.calls_by_id is None:
            self.calls, self.calls_by_index, self.calls_by_id = [], {}, {}
        call: _ToolCallState | None
        if isinstance(index, int):
            call = self.calls_by_index.get(index)
            if call is not None and id and call.id and call.id != id:
                # A gateway reusing one index for parallel calls: the call of this id if it
                # started already (their fragments interleave, each with its id), else a new
                # one. Either is now the call at this index, which a fragment without an id
                # continues: the call being streamed.
                call = self.calls_by_id.get(id)
                if call is not None and call.index == index:
                    self.calls_by_index[index] = call
        elif id:
            call = self.calls_by_id.get(id)
        else:
            call = self.calls[-1] if self.calls else None
        if call is None:
            if not isinstance(index, int):
                # One past the highest index in use: len(self.calls) may be taken already (by
                # a call the server numbered), and a later fragment of that index would then
                # join this call.
                index = max(self.calls_by_index) + 1 if self.calls_by_index else 0
            call = _ToolCallState(index)
            self.calls.append(call)
            self.calls_by_index[call.index] = call
        if id and not call.id:
            call.id = id
            self.calls_by_id[id] = call
        return call

    def freeze(self) -> Choice:
        text = _joined(self.text)
        self.blocks = len(self.text)  # the whole text is one block now
        calls: tuple[ToolCall, ...] = ()
        if self.calls is not None:
            # By index, as the OpenAI SDK lists them, not by arrival (index 1 may come first);
            # calls sharing an index (a gateway reusing one) keep their order: sorted() is stable.
            calls = tuple(call.freeze() for call in sorted(self.calls, key=_call_index))
        return Choice(
            self.index,
            text,
            self.role,
            None if self.refusal is None else _joined(self.refusal),
            None if self.reasoning is None else _joined(self.reasoning),
            calls,
            self.finish_reason,
        )


def _joined(parts: list[str]) -> str:
    # Join once and keep the result, so building a snapshot twice costs nothing extra.
    if len(parts) > 1:
        parts[:] = ["".join(parts)]
    return parts[0] if parts else ""


class ChatAccumulator:
    """Turns an OpenAI-compatible chat stream into `ChatChunk`s and one `Completion`.

    Sans-IO: feed it bytes (`feed`) or decoded events (`feed_event`), then call `close()` at
    end of stream. `completion` is available at any time, partial until the stream is done.

    `require_end=False` accepts a stream that ends without `[DONE]` or a `finish_reason`
    (some self-hosted servers); by default that raises `IncompleteStreamError`.

    `choices` is how many the request asked for (`n`). Without `[DONE]`, a stream is complete
    only once that many choices finished: a gateway that streams the choices one after another
    and breaks between two would otherwise pass for a complete answer with fewer choices.
    """

    # Slots: no per-instance dict; one is open per stream, thousands at a time.
    __slots__ = (
        "_choice0",
        "_choices",
        "_closed",
        "_error",
        "_first_data",
        "_last_data",
        "_loads",
        "_usage",
        "choices",
        "chunk_count",
        "decoder",
        "done",
        "require_end",
    )

    def __init__(
        self,
        *,
        require_end: bool = True,
        decoder: SSEDecoder | None = None,
        json_loads: Callable[[str], Any] | None = None,
        choices: int = 1,
    ) -> None:
        if type(choices) is not int or choices < 1:
            raise ConfigurationError(
                f"choices must be a positive int (the request's n), not {choices!r}"
            )
        self.require_end = require_end
        #: The choices the request asked for (`n`), each of which must finish (see above).
        self.choices = choices
        self.decoder = decoder if decoder is not None else SSEDecoder()
        #: True once `data: [DONE]` arrived.
        self.done = False
        #: Data events turned into chunks so far.
        self.chunk_count = 0
        self._loads = json_loads or _loads
        # Choice 0 has a slot of its own: most streams have no other, and a dict holding one
        # entry is 240 bytes more for every open stream. The others (`n` > 1) go in the dict.
        self._choice0: _ChoiceState | None = None
        self._choices: dict[int, _ChoiceState] | None = None
        self._usage: Usage | None = None
        # The first and last chunks are kept as their JSON text and parsed again for a
        # snapshot: a dict tree held from one event to the next outlives the garbage
        # collector's young generation and, over thousands of open streams, makes every full
        # collection longer (and the first one would be held for the whole stream).
        self._first_data: str | None = None
        self._last_data: str | None = None
        self._closed = False
        self._error: StreamError | None = None

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[ChatChunk]:
        """Take the next bytes of the response body; return the chunks they complete.

        Any bytes-like object will do; the decoder keeps a copy (see `SSEDecoder.feed`).
        """
        if _c_feed is not None:
            # The same loop in C (_speedups.c), with the common chunks made there too; None,
            # having changed nothing, for a subclass (which may override what it calls).
            done = _c_feed(self, data)
            if done is not None:
                return done
        chunks: list[ChatChunk] = []
        events: Iterable[ServerSentEvent]
        failure: HolySheepError | None = None
        try:
            try:
                events = self.decoder.feed(data)
            except HolySheepError as exc:  # `_decode`, inline: a call less per read
                if not exc.events:
                    raise
                events, failure = exc.events, exc
            for event in events:
                chunk = self.feed_event(event)
                if chunk is not None:
                    chunks.append(chunk)
            if failure is not None:
                raise failure
        except HolySheepError as exc:
            if chunks:
                exc.chunks = chunks  # accumulated already: see `HolySheepError.chunks`
            raise
        return chunks

    def feed_event(self, event: ServerSentEvent) -> ChatChunk | None:
        """Take one decoded event; return its chunk, or None for `[DONE]` and ignored events."""
        if self._closed or self._error is not None:
            raise LocalProtocolError(
                "ChatAccumulator fed after "
                + ("close()" if self._closed else f"the stream reported an error: {self._error}")
            )
        if self.done:
            # `[DONE]` ended the stream: what a server sends after it (more text, an error,
            # invalid JSON) is not part of the answer.
            return None
        data = event.data
        if event.event == "error":
            raise self._stream_error(self._parse_error_payload(data))
        if event.event != "message" or not data:
            return None  # other event types and empty keep-alives carry no chunk
        if data == _DONE:
            self.done = True
            return None
        try:
            obj = self._loads(data)
        except (ValueError, RecursionError) as exc:  # json's own parser recurses per level
            raise RemoteProtocolError(
                f"invalid JSON in stream event: {exc}; data: {_snippet(data)}"
            ) from exc
        if not isinstance(obj, dict):
            raise RemoteProtocolError(
                f"expected a JSON object in stream event, got {_snippet(data)}"
            )
        if obj.get("error") is not None:  # some gateways send `"error": null` on every chunk
            raise self._stream_error(obj)
        return self._chunk(obj, event)

    def close(self) -> list[ChatChunk]:
        """End of stream. Raises `IncompleteStreamError` if the stream was cut short."""
        if self._closed:
            return []
        self._closed = True
        self.decoder.close()
        if self.require_end and not self.done:
            states = self._states()
            unfinished = sorted(i for i, state in states.items() if state.finish_reason is None)
            unstarted = self.choices - len(states)
            if unfinished or not states or unstarted > 0:
                if unfinished or not states:
                    cut = "and without a finish_reason" + _for_choices(unfinished, len(states))
                    cut += _not_started(unstarted, self.choices, ", and ")
                else:  # every choice that came finished: others never came
                    cut = _not_started(unstarted, self.choices, "and ")
                raise IncompleteStreamError(
                    "stream ended without [DONE] " + cut + self._truncation_note(),
                    completion=self.completion,
                )
            if self.decoder.truncated:
                raise IncompleteStreamError(
                    "stream ended in the middle of an event after the finish_reason (usage may be"
                    " missing)",
                    completion=self.completion,
                )
        return []

    def restart_decoder(self) -> None:
        """Continue on a new connection (a resume): a fresh decoder, the same accumulation.

        The server's reconnection time carries over. The last event id does not: events of
        the new connection that carry none must not take the old one (a resume would skip
        them as delivered); `Call` remembers where it resumed from instead.
        """
        old = self.decoder
        self.decoder = SSEDecoder(
            max_line_size=old.max_line_size, max_event_size=old.max_event_size
        )
        self.decoder.retry = old.retry
        self._closed = False
        self._error = None

    # -- output --------------------------------------------------------------------------------

    @property
    def completion(self) -> Completion:
        """A snapshot of everything accumulated so far."""
        last: Mapping[str, Any] = {} if self._last_data is None else self._loads(self._last_data)
        first: Mapping[str, Any] = {} if self._first_data is None else self._loads(self._first_data)

        def meta(name: str) -> Any:
            # The last chunk may omit what the first one said (some gateways send it once).
            value = last.get(name)
            return first.get(name) if value is None else value

        created = meta("created")
        states = self._states()
        return Completion(
            tuple(states[i].freeze() for i in sorted(states)),
            _str_or_none(meta("id")),
            _str_or_none(meta("model")),
            created if isinstance(created, int) else None,
            _str_or_none(meta("system_fingerprint")),
            self._usage,
            last if self._last_data is not None else None,
        )

    @property
    def usage(self) -> Usage | None:
        """The latest usage the server reported, without building a snapshot."""
        return self._usage

    @property
    def closed(self) -> bool:
        """True once `close()` was called: the body reached its end (cleanly or not)."""
        return self._closed

    @property
    def finished(self) -> bool:
        """True once the stream said it is done (`[DONE]`, or a `finish_reason` for each of the
        `choices` asked for)."""
        if self.done:
            return True
        states = self._states()
        return (
            len(states) >= self.choices
            and bool(states)
            and all(state.finish_reason is not None for state in states.values())
        )

    # -- internals -----------------------------------------------------------------------------

    def _states(self) -> dict[int, _ChoiceState]:
        states = dict(self._choices) if self._choices else {}
        if self._choice0 is not None:
            states[0] = self._choice0
        return states

    def _chunk(self, obj: dict[str, Any], event: ServerSentEvent) -> ChatChunk:
        choices = obj.get("choices")
        if choices and isinstance(choices, list):
            _check_choices(choices)  # before any state changes: a chunk is taken whole or not
        else:
            choices = None
        self.chunk_count += 1
        if self._first_data is None:
            self._first_data = event.data
        self._last_data = event.data
        deltas: list[ChatDelta] = []
        text = ""
        if choices is not None:
            for raw_choice in choices:
                index = raw_choice.get("index", 0)
                if not isinstance(index, int):
                    index = 0
                if index == 0:
                    state = self._choice0
                    if state is None:
                        state = self._choice0 = _ChoiceState(index)
                else:
                    state = self._other_choice(index)
                delta = raw_choice.get("delta") or raw_choice.get("message")
                if delta and isinstance(delta, dict):
                    content = delta.get("content")
                    if content and isinstance(content, str):
                        state.add_text(content)
                        deltas.append(_content_delta(content, index))
                        if index == 0:
                            text = content if not text else text + content
                    if len(delta) > 1 or content is None:
                        self._rest_of_delta(delta, state, deltas)
                finish = raw_choice.get("finish_reason")
                if finish:  # a str: `_check_choices` made it one
                    state.finish_reason = finish
                    deltas.append(Finished(finish, index))
        usage = obj.get("usage")
        if usage and isinstance(usage, dict):
            self._usage = Usage.from_dict(usage)
            deltas.append(UsageReport(self._usage))
        return _chat_chunk(text, tuple(deltas), _ParsedLater(event.data, self._loads), event)

    def _other_choice(self, index: int) -> _ChoiceState:
        others = self._choices
        if others is None:
            others = self._choices = {}
        state = others.get(index)
        if state is None:
            state = others[index] = _ChoiceState(index)
        return state

    def _rest_of_delta(
        self, delta: dict[str, Any], state: _ChoiceState, deltas: list[ChatDelta]
    ) -> None:
        # Everything but `content`, off the hot path.
        role = delta.get("role")
        if role and isinstance(role, str):
            state.role = role
        index = state.index
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            if state.refusal is None:
                state.refusal = []
            state.refusal.append(refusal)
            deltas.append(RefusalDelta(refusal, index))
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and isinstance(reasoning, str):
            if state.reasoning is None:
                state.reasoning = []
            state.reasoning.append(reasoning)
            deltas.append(ReasoningDelta(reasoning, index))
        tool_calls = delta.get("tool_calls")
        if tool_calls and isinstance(tool_calls, list):
            for raw_call in tool_calls:
                if isinstance(raw_call, dict):
                    deltas.append(self._tool_call(raw_call, state))

    @staticmethod
    def _tool_call(raw: dict[str, Any], state: _ChoiceState) -> ToolCallDelta:
        call_id = raw.get("id") or None
        if not isinstance(call_id, str):
            call_id = None  # a list or an object is no id, and cannot be looked up as one
        call = state.tool_call(raw.get("index"), call_id)
        function = raw.get("function")
        if not isinstance(function, dict):
            function = {}
        name = function.get("name") or None
        if name and isinstance(name, str) and name != call.name:
            # Names come whole, once; some gateways repeat them on every fragment.
            call.name = name if not call.name else call.name + name
        kind = raw.get("type")
        if kind and isinstance(kind, str):
            call.type = kind
        arguments = function.get("arguments")  # a str or None: see `_check_choices`
        if arguments is None:
            arguments = ""
        if arguments:
            call.arguments.append(arguments)
        return ToolCallDelta(
            call.index,
            call_id,
            name if isinstance(name, str) else None,
            arguments,
            state.index,
        )

    def _parse_error_payload(self, data: str) -> Any:
        try:
            return self._loads(data)
        except (ValueError, RecursionError):
            return {"error": {"message": data}}

    def _stream_error(self, payload: Any) -> StreamError:
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        try:  # str() and json.dumps() recurse once per level of what the server nested
            if isinstance(error, dict):
                message = error.get("message") or error.get("msg") or json.dumps(error)
                kind = _str_or_none(error.get("type"))
                raw_code = error.get("code", error.get("status"))
            else:
                message, kind, raw_code = str(error), None, None
            code = None if raw_code is None else str(raw_code)
            text = f"the server reported an error in the stream: {message}"
        except RecursionError as exc:
            raise RemoteProtocolError(
                "the server reported an error in the stream, nested too deeply to read"
            ) from exc
        status = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        self._error = StreamError(
            text,
            type=kind,
            code=code,
            status_code=status,
            retryable=is_retryable_error(kind, raw_code),
            completion=self.completion,
        )
        return self._error

    def _truncation_note(self) -> str:
        if self.decoder.truncated:
            return " (the connection closed in the middle of an event)"
        return ""


def _decode(
    decoder: SSEDecoder, data: bytes
) -> tuple[Iterable[ServerSentEvent], HolySheepError | None]:
    """`decoder.feed(data)`, and the error it raised after decoding events, if it did.

    An `SSEDecoder` that refuses a read (a limit) puts the events the read completed before
    the offending line on the error's `events`: they are the stream's, as they would be had
    the read been cut before that line, so they are taken before the error is raised.
    """
    try:
        return decoder.feed(data), None
    except HolySheepError as exc:
        events = exc.events
        if not events:
            raise
        return events, exc


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _check_choices(choices: list[Any]) -> None:
    """Everything in a chunk's `choices` that can refuse it, done before `_chunk` changes any
    state, so that a chunk is accumulated whole or not at all: a chunk refused halfway would
    leave text in the completion that no chunk delivered, which the caller never showed.

    So each choice must be an object, and the values `_chunk` keeps as text but a gateway sent
    as something else (a `finish_reason` that is no string, tool-call `arguments` sent as an
    object) are made text here, in the parsed chunk, which is ours alone (`ChatChunk.raw`
    parses the event again). Making that text recurses once per level of nesting, which
    orjson accepts up to 1024 deep: deeper than the interpreter's recursion limit allows, the
    chunk is refused like invalid JSON.
    """
    try:
        for raw_choice in choices:
            if not isinstance(raw_choice, dict):
                raise RemoteProtocolError(
                    f"expected choices to be objects, got {_snippet(_short_repr(raw_choice))}"
                )
            finish = raw_choice.get("finish_reason")
            if finish and not isinstance(finish, str):
                raw_choice["finish_reason"] = str(finish)
            delta = raw_choice.get("delta") or raw_choice.get("message")
            if not delta or not isinstance(delta, dict):
                continue
            tool_calls = delta.get("tool_calls")
            if not tool_calls or not isinstance(tool_calls, list):
                continue
            for raw_call in tool_calls:
                function = raw_call.get("function") if isinstance(raw_call, dict) else None
                if isinstance(function, dict):
                    arguments = function.get("arguments")
                    if arguments is not None and not isinstance(arguments, str):
                        # a gateway that sends an object, not a string
                        function["arguments"] = json.dumps(arguments, separators=(",", ":"))
    except RecursionError as exc:
        raise RemoteProtocolError(
            "a chunk nested too deeply to read (deeper than Python's recursion limit allows)"
        ) from exc


# A value shown in an error message, bounded in size and in depth: a choice that is no object
# may be an array nested a thousand deep, which repr() would recurse through. (Set one by one:
# `reprlib.Repr` takes them as arguments from Python 3.12.)
_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = _shown.maxlong = _SNIPPET
_short_repr = _shown.repr


def _not_started(unstarted: int, asked: int, joint: str) -> str:
    # The choices asked for (`n`) of which not one event came.
    if unstarted <= 0 or unstarted == asked:
        return ""
    return f"{joint}{unstarted} of the {asked} choices asked for (n) never started"


def _for_choices(unfinished: list[int], seen: int) -> str:
    # Which choices are cut, when others did finish (`n` > 1); nothing to add when none did.
    if len(unfinished) == seen:
        return ""
    return f" for choice{'s' if len(unfinished) > 1 else ''} {', '.join(map(str, unfinished))}"


# The C part of `feed` (`chat_feed` in _speedups.c), where the SSE decoder's is in use (built,
# and not turned off with HOLYSHEEP_NO_EXTENSIONS=1). It builds the same objects as `_chunk`,
# `add_text` and `Usage.from_dict`, so it is told their classes and the block size.
_c_feed: Callable[[ChatAccumulator, bytes], list[ChatChunk] | None] | None = None
if _sse._c_feed is not None:  # built, and not turned off
    from . import _speedups

    try:
        _speedups.setup_chat(
            ChatAccumulator,
            _ChoiceState,
            ChatChunk,
            ContentDelta,
            Finished,
            UsageReport,
            Usage,
            _ParsedLater,
            SSEDecoder,
            HolySheepError,
            _loads,
            _BLOCK,
        )
    except (AttributeError, TypeError):  # pragma: no cover - a build older than this file
        pass
    else:
        _c_feed = _speedups.chat_feed
