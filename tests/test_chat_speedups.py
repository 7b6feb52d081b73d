"""The C part of `ChatAccumulator.feed` (`chat_chunk` in _speedups.c) must do exactly what the
Python path does: same chunks, same state, same errors, for any event, valid or not."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holysheep import _chat
from holysheep._chat import ChatAccumulator, ContentDelta
from holysheep._exceptions import HolySheepError
from holysheep._sse import ServerSentEvent

FAST = None if _chat._c_feed is None else _chat._speedups.chat_chunk
pytestmark = pytest.mark.skipif(FAST is None, reason="the C part is not built (or turned off)")

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
BASE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1764000000,
    "model": "gpt-4.1",
    "system_fingerprint": "fp_1",
}


def event_bytes(data: str) -> bytes:
    """`data` as one SSE event: a line per line of it (a JSON text may span lines)."""
    return "".join(f"data: {line}\n" for line in data.split("\n")).encode() + b"\n"


def content(text: str, **delta: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text, **delta}, "logprobs": None}
    return {**BASE, "choices": [choice | {"finish_reason": None}]}


@pytest.fixture
def accumulator() -> ChatAccumulator:
    acc = ChatAccumulator()
    acc.feed(event_bytes(json.dumps(ROLE)))  # choice 0 is known from here on
    return acc


def fast(acc: ChatAccumulator, data: str) -> Any:
    assert FAST is not None
    return FAST(acc, ServerSentEvent(data=data))


# -- what the C part takes, and what it leaves ------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        json.dumps(content("Hello")),
        json.dumps(content("naïve 羊 🐑", refusal=None), ensure_ascii=False),
        json.dumps(content('naïve 羊 🐑\n\t"q" \\ /')),  # \u escapes, pairs and short ones
        json.dumps(content("x", role="assistant", reasoning_content=None, tool_calls=None)),
        json.dumps({"choices": [{"delta": {"content": "no index"}}], "usage": None}),
        json.dumps(content("spaced"), indent=2),
        '{"choices":[{"index":0,"delta":{"content":"n"},"x":[1,-2.5,3e+10,true,false,{}]}]}',
    ],
)
def test_the_common_chunk_is_taken(accumulator: ChatAccumulator, data: str) -> None:
    chunk = fast(accumulator, data)
    expected = json.loads(data)["choices"][0]["delta"]["content"]
    assert (expected, (ContentDelta(expected, 0),)) == (chunk.text, chunk.deltas)
    assert json.loads(data) == dict(chunk.raw)
    assert (2, data) == (accumulator.chunk_count, accumulator._last_data)
    assert expected == accumulator.completion.text


@pytest.mark.parametrize(
    "data",
    [
        json.dumps(content("")),  # nothing to add
        json.dumps({**content("x"), "usage": {"total_tokens": 1}}),
        json.dumps({**content("x"), "error": None}),
        json.dumps({"choices": [{"index": 1, "delta": {"content": "x"}}]}),
        json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}),
        json.dumps({"choices": [{"delta": {"content": "x"}, "message": {"content": "y"}}]}),
        json.dumps({"choices": [{"delta": {"content": "x", "refusal": "no"}}]}),
        json.dumps({"choices": [{"delta": {"content": "x"}}, {"delta": {"content": "y"}}]}),
        json.dumps({"choices": [{"delta": {"content": 5}}]}),
        json.dumps({"choices": []}),
        '{"choices":[{"index":0,"delta":{"content":"x","content":"y"}}]}',  # a key given twice
        '{"choices":[{"index":0,"delta":{"content":"x"}}],"choices":[]}',
        '{"choices":[{"index":-0,"delta":{"content":"x"}}]}',
        '{"choices":[{"index":0.0,"delta":{"content":"x"}}]}',
        '{"choices":[{"delta":{"content":"\\ud83d"}}]}',  # a lone surrogate: json takes it
        '{"choices":[{"delta":{"content":"x"}}],"n":1e400}',  # orjson refuses it
        '{"choices":[{"delta":{"content":"x"}}],"n":123456789012345678901}',  # parsers differ
        '{"choices":[{"delta":{"content":"x"}}],"n":[' * 70 + "]" * 70 + "}",
        '{"cho\\u0069ces":[{"delta":{"content":"x"}}]}',  # an escaped key
        '{"choices":[{"delta":{"content":"x"}}]} trailing',
        '{"choices":[{"delta":{"content":"x"}}],}',
        '{"choices":[{"delta":{"content":"a\x01"}}]}',
        "[DONE]",
        "",
    ],
)
def test_anything_else_is_left_untouched(accumulator: ChatAccumulator, data: str) -> None:
    before = (accumulator.chunk_count, accumulator._last_data, accumulator.completion)
    assert fast(accumulator, data) is None
    assert before == (accumulator.chunk_count, accumulator._last_data, accumulator.completion)


def test_only_a_plain_open_accumulator_is_handled() -> None:
    data = json.dumps(content("x"))
    assert fast(ChatAccumulator(), data) is None  # choice 0 not seen yet

    class Mine(ChatAccumulator):
        pass

    for acc in (Mine(), ChatAccumulator(json_loads=json.loads)):
        acc.feed(event_bytes(json.dumps(ROLE)))
        assert fast(acc, data) is None
    closed = ChatAccumulator(require_end=False)
    closed.feed(event_bytes(json.dumps(ROLE)))
    closed.close()
    assert fast(closed, data) is None
    typed = ChatAccumulator()
    typed.feed(event_bytes(json.dumps(ROLE)))
    assert FAST is not None
    assert FAST(typed, ServerSentEvent("ping", data)) is None


# -- the same as Python, for anything ----------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), _text)
_ABSENT = object()


def _often(common: Any, *others: Any) -> st.SearchStrategy[Any]:
    """The common value most of the time, so that most events are the common chunk, and
    every other now and then."""
    return st.sampled_from([common] * 24 + list(others))


@st.composite
def _chunk(draw: st.DrawFn) -> dict[str, Any]:
    """A common content chunk, with now and then something that makes it another."""
    delta: dict[str, Any] = {
        "content": draw(st.one_of(_text.filter(bool), _often("x", "", None, 3))),
        "role": draw(_often(_ABSENT, "assistant", "model", None, "")),
        "refusal": draw(_often(_ABSENT, None, "no")),
        "reasoning_content": draw(_often(_ABSENT, None, "hmm")),
        "tool_calls": draw(_often(_ABSENT, None)),
    }
    choice = {
        "index": draw(_often(0, _ABSENT, 1, None, "0", False)),
        "delta": {k: v for k, v in delta.items() if v is not _ABSENT},
        "logprobs": draw(st.one_of(_often(None), st.dictionaries(_text, _scalar, max_size=2))),
        "finish_reason": draw(_often(None, _ABSENT, "stop", "")),
        "message": draw(_often(_ABSENT, {"content": "m"})),
    }
    choices = draw(_often([choice], [], [choice, choice]))
    obj = {
        **draw(_often(BASE, {})),
        "choices": [{k: v for k, v in c.items() if v is not _ABSENT} for c in choices],
        "usage": draw(_often(_ABSENT, None, {"total_tokens": 3})),
        "error": draw(_often(_ABSENT, None, {"message": "boom"})),
        "extra": draw(
            st.one_of(
                _often(_ABSENT, 1764000000, -2.5, "fp_1", [True, False, {}]),
                st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
                st.floats(allow_nan=False, allow_infinity=False),
            )
        ),
    }
    return {k: v for k, v in obj.items() if v is not _ABSENT}


@st.composite
def _event_data(draw: st.DrawFn) -> str:
    obj = draw(_chunk())
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, None, 1])),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    edit = draw(_often("none", "cut", "insert", "duplicate"))
    if edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from([",", "}", '"', "\\", "1e999", " ", "\x00"]))
            + text[at:]
        )
    elif edit == "duplicate":
        text = text[:-1] + ',"choices":[]}'
    return text.replace("\r", "")


def outcome(reads: list[bytes], c_feed: bool) -> Iterator[Any]:
    """What feeding `reads` gives, with or without the C part: chunks or the error, and the
    accumulator's state after."""
    saved = _chat._c_feed
    _chat._c_feed = saved if c_feed else None
    try:
        acc = ChatAccumulator(require_end=False)
        for data in reads:
            try:
                chunks = acc.feed(data)
            except HolySheepError as exc:
                yield type(exc).__name__, str(exc)
                break
            yield [(c.text, c.deltas, dict(c.raw)) for c in chunks]
        state = acc._choice0  # before `completion`, which joins the text
        yield None if state is None else ([*state.text], state.blocks, state.role)
        yield acc.completion, acc.chunk_count, acc.usage, acc.done, acc.finished
        yield acc._first_data, acc._last_data
    finally:
        _chat._c_feed = saved


def assert_same_as_python(reads: list[bytes]) -> None:
    assert [*outcome(reads, c_feed=False)] == [*outcome(reads, c_feed=True)]


@settings(max_examples=400)
@given(
    st.lists(_event_data(), min_size=1, max_size=6),
    _often(True, False),
    st.sampled_from(["\n", "\r\n"]),
    st.lists(st.integers(0, 2000), max_size=6),
)
def test_any_events_give_what_python_gives(
    datas: list[str], role_first: bool, newline: str, cuts: list[int]
) -> None:
    """Any chunks, with LF or CRLF line ends, in reads cut anywhere (a CR ending one read and
    its LF starting the next included)."""
    events = [event_bytes(json.dumps(ROLE))] if role_first else []
    events += [event_bytes(data) for data in datas]
    stream = b"".join(events).replace(b"\n", newline.encode())
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    assert_same_as_python([stream[a:b] for a, b in itertools.pairwise(bounds)])


def test_events_without_a_chunk_between_chunks_of_one_read_give_what_python_gives() -> None:
    """Keep-alives and other event types among the chunks of one read, and an error after
    them: the same chunks, returned or carried by the error (`HolySheepError.chunks`)."""
    keepalive, ping = b"data: \n\n", b"event: ping\ndata: {}\n\n"
    first = event_bytes(json.dumps(ROLE))  # the start of a stream is Python's to decode
    read = b"".join(
        [
            keepalive,
            event_bytes(json.dumps(content("a"))),
            ping,
            keepalive,
            event_bytes(json.dumps(content("b"))),
            keepalive,
        ]
    )
    assert_same_as_python([first, read, read])

    def carried(c_feed: bool) -> tuple[list[tuple[str, Any]], str]:
        saved = _chat._c_feed
        _chat._c_feed = saved if c_feed else None
        acc = ChatAccumulator()
        try:
            acc.feed(first)
            acc.feed(read + b'data: {"error": {"message": "boom"}}\n\n')
        except HolySheepError as exc:
            return [(chunk.text, chunk.deltas) for chunk in exc.chunks], str(exc)
        finally:
            _chat._c_feed = saved
        raise AssertionError("no error")

    assert carried(c_feed=False) == carried(c_feed=True)
    assert ["a", "b"] == [text for text, _ in carried(c_feed=True)[0]]


def test_a_crlf_split_across_reads_is_one_line_end() -> None:
    reads = [
        event_bytes(json.dumps(ROLE)),
        b'data: {"choices":[{"delta":\r',
        b'\ndata: {"content":"x"}}]}\r\n\r\n',
    ]
    assert_same_as_python(reads)
    chunks = [*outcome(reads, c_feed=True)][2]
    assert [("x", (ContentDelta("x"),), {"choices": [{"delta": {"content": "x"}}]})] == chunks


def _choice(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return event_bytes(
        json.dumps({**BASE, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
    )


def _call(call_id: str, arguments: str, name: str | None = None) -> dict[str, Any]:
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {"tool_calls": [{"index": 0, "id": call_id, "function": function}]}


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        (  # n=2: choice 0 finishes between common chunks (which C takes) and choice 1's
            [
                _choice(0, {"role": "assistant", "content": "Ye"}) + _choice(1, {"content": "Wel"}),
                _choice(0, {"content": "s."}) + _choice(0, {}, "stop"),
                _choice(1, {"content": "l, it"}) + _choice(1, {"content": " depends"}),
                b'data: {"choices": [{"index": 1, "de',
            ],
            (False, [("Yes.", "stop", []), ("Well, it depends", None, [])]),
        ),
        (  # parallel calls at index 0, interleaved, the id on every fragment, then text
            [
                _choice(0, {"role": "assistant", "content": "Let me see."}),
                _choice(0, _call("A", '{"x":', "f")) + _choice(0, _call("B", '{"y":', "g")),
                _choice(0, _call("A", "1}")) + _choice(0, _call("B", "2}")),
                _choice(0, {"content": " Done."}) + _choice(0, {}, "tool_calls"),
            ],
            (
                True,
                [
                    (
                        "Let me see. Done.",
                        "tool_calls",
                        [("A", "f", '{"x":1}'), ("B", "g", '{"y":2}')],
                    )
                ],
            ),
        ),
    ],
    ids=["one of two choices finished", "interleaved calls at one index"],
)
def test_several_choices_and_shared_index_calls_give_what_python_gives(
    reads: list[bytes], expected: tuple[bool, list[Any]]
) -> None:
    """Finish reasons and tool calls (which C leaves to Python) between common chunks (which
    it takes): the same completion and `finished` either way, and the right ones."""
    assert_same_as_python(reads)
    completion, *_, finished = [*outcome(reads, c_feed=True)][-2]
    choices = [
        (c.text, c.finish_reason, [(t.id, t.name, t.arguments) for t in c.tool_calls])
        for c in completion.choices
    ]
    assert expected == (finished, choices)


@settings(max_examples=200)
@given(st.lists(st.text(max_size=40).map(lambda t: t.replace("\r", "")), min_size=1, max_size=4))
def test_any_text_gives_what_python_gives(datas: list[str]) -> None:
    reads = [event_bytes(json.dumps(ROLE))] + [event_bytes("{" + data) for data in datas]
    assert_same_as_python(reads)


@pytest.mark.parametrize(
    ("data", "taken"),
    [
        # 1-byte strings (ASCII and Latin-1) have a scanner loop of their own; 2- and 4-byte ones
        # the general one: the same events of each kind.
        (json.dumps(content("café ÿ\x7f µ"), ensure_ascii=False), True),
        (json.dumps(content("Ā ĀĀ"), ensure_ascii=False), True),
        (json.dumps(content("🐑 x"), ensure_ascii=False), True),
        (json.dumps(content('é"\\/\n\x1f'), ensure_ascii=False), True),  # escapes, 1-byte
        (json.dumps(content('Ā"\\/\n\x1f'), ensure_ascii=False), True),  # escapes, 2-byte
        ('{"choices":[{"delta":{"content":"é\x1f"}}]}', False),  # a raw control character
        ('{"choices":[{"delta":{"content":"Ā\x1f"}}]}', False),
        ('{"choices":[{"delta":{"content":"🐑\x00"}}]}', False),
        ('{"choices":[{"delta":{"content":"é', False),  # the text ends inside a string
        ('{"choices":[{"delta":{"content":"é\\', False),  # ... or inside an escape
        ('{"choices":[{"delta":{"content":"Ā', False),
        # Keys that almost match are other keys: ignored, or null where Python needs it.
        (
            '{"choices":[{"delta":{"content":"x","conten":null,"contentt":null,"Content":null}}]}',
            True,
        ),
        ('{"choices":[{"delta":{"content":"x","conten":"y"}}]}', False),
        ('{"choices":[{"delta":{"contenÿ":"y","content":"x"}}]}', False),
        ('{"choices":[{"delta":{"contenĀ":"y","content":"x"}}]}', False),
        ('{"choices":[{"delta":{"content":"x"},"indexx":1,"inde":"s"}],"choice":1,"usag":2}', True),
        ('{"choices":[{"delta":{"content":"x"}}],"usage ":{"total_tokens":1}}', True),
        ('{"choices":[{"delta":{"content":"x"}}],"usagĀ":1}', True),
        # Whitespace: each of the four JSON allows, anywhere between tokens.
        ('{ "choices" :\t[\n{ "delta" :{"content" : "w" } ,"index":0 }\r\n] }', True),
        ('{"choices":[{"delta":{"content":"Ā"}}]}\n ', True),
        (' {"choices":[{"delta":{"content":"x"}}]}', False),  # left to Python, which takes it
        ('{"choices":[{"delta":{"content":"x"}}]\x0b}', False),  # a vertical tab is not one
        ('{"choices":[{"delta":{"content":"x"}}]\xa0}', False),  # nor a no-break space
    ],
)
def test_scanner_edges_give_what_python_gives(data: str, taken: bool) -> None:
    """Each kind of string, escapes, near-miss keys and whitespace: taken by C where it can
    be, and always the same chunks and state as Python's."""
    acc = ChatAccumulator(require_end=False)
    acc.feed(event_bytes(json.dumps(ROLE)))
    assert taken == (fast(acc, data) is not None)
    assert_same_as_python([event_bytes(json.dumps(ROLE)), *[event_bytes(data)] * 2])


# Any 1-byte character, the edges of what ends a run of plain characters often.
_latin1 = st.text(
    st.one_of(st.characters(max_codepoint=0xFF), st.sampled_from('\x00\x1f "\\\x7f\x80\xff')),
    max_size=12,
)


def _raw(text: str) -> str:
    """`text` as a JSON string with only quotes and backslashes escaped: control characters
    stay raw, which JSON forbids."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=300)
@given(st.lists(st.tuples(_latin1, _latin1, st.booleans()), min_size=1, max_size=4))
def test_any_latin1_text_gives_what_python_gives(items: list[tuple[str, str, bool]]) -> None:
    """1-byte strings (ASCII and Latin-1) have a scanner loop of their own: any such content
    and key, escaped as JSON escapes them or raw, control characters and all."""
    datas = [
        f'{{"choices":[{{"delta":{{"content":{_raw(text)},{_raw(key)}:null}}}}]}}'
        if raw
        else json.dumps({"choices": [{"delta": {"content": text, key: None}}]}, ensure_ascii=False)
        for text, key, raw in items
    ]
    assert_same_as_python([event_bytes(json.dumps(ROLE))] + [event_bytes(d) for d in datas])


@settings(max_examples=100)
@given(st.lists(_text.filter(bool), min_size=1, max_size=40), st.integers(1, 5))
def test_long_answers_are_kept_in_blocks_as_python_keeps_them(
    texts: list[str], per_read: int
) -> None:
    """Deltas are joined in blocks as they arrive; several events per read are one C call."""
    events = [event_bytes(json.dumps(ROLE))] + [event_bytes(json.dumps(content(t))) for t in texts]
    reads = [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]
    assert_same_as_python(reads)


def test_setup_refuses_classes_it_would_build_wrong_and_keeps_what_it_had(
    accumulator: ChatAccumulator,
) -> None:
    """A class with a slot the C part would leave empty, or without one it sets, is refused,
    and the C part goes on with the classes it was given before."""
    from holysheep import _speedups

    class Wider:
        __slots__ = ("deltas", "event", "raw", "text", "trace")

    class Narrower:
        __slots__ = ("deltas", "raw", "text")

    for chunk_class in (Wider, Narrower):
        with pytest.raises(TypeError):
            _speedups.setup_chat(
                ChatAccumulator,
                _chat._ChoiceState,
                chunk_class,
                ContentDelta,
                _chat._ParsedLater,
                _chat.SSEDecoder,
                HolySheepError,
                _chat._loads,
                _chat._BLOCK,
            )
    chunk = fast(accumulator, json.dumps(content("still")))
    assert (_chat.ChatChunk, "still") == (type(chunk), chunk.text)


def test_a_decoder_of_the_callers_own_is_used() -> None:
    """The C loop decodes with the accumulator's decoder, whatever it returns the events in."""

    class Counting(_chat.SSEDecoder):
        reads = 0

        def feed(self, data: bytes) -> Any:
            Counting.reads += 1
            return tuple(super().feed(data))

    reads = [event_bytes(json.dumps(ROLE)), event_bytes(json.dumps(content("mine")))]
    acc = ChatAccumulator(decoder=Counting())
    texts = [chunk.text for data in reads for chunk in acc.feed(data)]
    assert (["", "mine"], 2, "mine") == (texts, Counting.reads, acc.completion.text)


def test_a_decoder_that_fails_mid_read_leaves_what_python_leaves() -> None:
    """Events a caller's decoder yields before it raises are taken, one at a time, as Python
    takes them; the error, not ours, goes on as raised, without the chunks (only a
    HolySheepError carries them)."""

    class Failing(_chat.SSEDecoder):
        def feed(self, data: bytes) -> Any:
            yield from super().feed(data)
            raise ValueError("broken")

    def run(c_feed: bool) -> tuple[int, str, bool]:
        saved = _chat._c_feed
        _chat._c_feed = saved if c_feed else None
        try:
            acc = ChatAccumulator(decoder=Failing())
            with pytest.raises(ValueError, match="broken"):
                acc.feed(event_bytes(json.dumps(ROLE)))
            with pytest.raises(ValueError, match="broken") as info:
                acc.feed(b"".join(event_bytes(json.dumps(content(t))) for t in "abc"))
            return acc.chunk_count, acc.completion.text, hasattr(info.value, "chunks")
        finally:
            _chat._c_feed = saved

    assert (4, "abc", False) == run(c_feed=True) == run(c_feed=False)
