"""The SSE decoder against the WHATWG HTML standard, section 9.2.6, and the peers' defects."""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holysheep import (
    ConfigurationError,
    LocalProtocolError,
    RemoteProtocolError,
    ServerSentEvent,
    SSEDecoder,
    _chat,
    _sse,
)

E = ServerSentEvent


@pytest.fixture(autouse=True, scope="module", params=["C", "pure Python"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs twice: with the C part (_speedups.c) and with Python alone."""
    built = _sse._c_feed, _chat._c_feed
    if request.param == "C" and built[0] is None:
        pytest.skip("the C part is not built here")
    if request.param == "pure Python":  # the accumulator's C part decodes too
        _sse._c_feed = _chat._c_feed = None
    yield request.param
    _sse._c_feed, _chat._c_feed = built


def decode_whole(data: bytes) -> tuple[list[ServerSentEvent], SSEDecoder]:
    decoder = SSEDecoder()
    events = decoder.feed(data)
    events += decoder.close()
    return events, decoder


def decode_split(
    data: bytes, cuts: list[int], **limits: int
) -> tuple[list[ServerSentEvent], SSEDecoder]:
    decoder = SSEDecoder(**limits)
    events: list[ServerSentEvent] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    events += decoder.close()
    return events, decoder


def decode_bytewise(data: bytes) -> list[ServerSentEvent]:
    return decode_split(data, list(range(len(data))))[0]


# Each case: (source, input, expected events). "WHATWG" cites the parsing rules in
# html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation.
SPEC_CASES = [
    ("WHATWG: data line, blank line dispatches", b"data: hi\n\n", [E(data="hi")]),
    ("WHATWG: one leading space stripped", b"data:  two\n\n", [E(data=" two")]),
    ("WHATWG: no space after colon", b"data:x\n\n", [E(data="x")]),
    ("WHATWG: data lines joined with LF", b"data: a\ndata: b\n\n", [E(data="a\nb")]),
    ("WHATWG: trailing LF of data removed once", b"data: a\ndata\n\n", [E(data="a\n")]),
    ("WHATWG: line without colon is a field", b"data\n\n", [E(data="")]),
    ("WHATWG: empty data buffer dispatches nothing", b"event: x\n\n", []),
    ("WHATWG: comment ignored", b": hello\ndata: a\n\n", [E(data="a")]),
    ("WHATWG: event type", b"event: add\ndata: 1\n\n", [E(event="add", data="1")]),
    ("WHATWG: empty event type means message", b"event:\ndata: 1\n\n", [E(data="1")]),
    ("WHATWG: unknown field ignored", b"foo: bar\ndata: 1\n\n", [E(data="1")]),
    ("WHATWG: field names are case-sensitive", b"Data: x\ndata: y\n\n", [E(data="y")]),
    ("WHATWG: CR line endings", b"data: a\rdata: b\r\r", [E(data="a\nb")]),
    ("WHATWG: CRLF line endings", b"data: a\r\n\r\n", [E(data="a")]),
    ("WHATWG: mixed line endings", b"data: a\r\ndata: b\rdata: c\n\n", [E(data="a\nb\nc")]),
    (
        "WHATWG: id persists",
        b"id: 1\ndata: a\n\ndata: b\n\n",
        [E(data="a", id="1"), E(data="b", id="1")],
    ),
    (
        "WHATWG: empty id resets",
        b"id: 1\ndata: a\n\nid\ndata: b\n\n",
        [E(data="a", id="1"), E(data="b")],
    ),
    (
        "WHATWG: id with NULL ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [E(data="a", id="1"), E(data="b", id="1")],
    ),
    ("WHATWG: id without data still sets last id", b"id: 7\n\ndata: b\n\n", [E(data="b", id="7")]),
    ("WHATWG: retry digits", b"retry: 1500\ndata: a\n\n", [E(data="a", retry=1500)]),
    ("WHATWG: retry non-digits ignored", b"retry: 15x\ndata: a\n\n", [E(data="a")]),
    ("WHATWG: retry non-ASCII digits ignored", "retry: ١٥\ndata: a\n\n".encode(), [E(data="a")]),
    ("WHATWG: retry empty ignored", b"retry:\ndata: a\n\n", [E(data="a")]),
    (
        "retry beyond 2**63 - 1 ms, too long for int(): clamped, the event kept",
        b"retry: " + b"1" * 5000 + b"\ndata: a\n\n",
        [E(data="a", retry=2**63 - 1)],
    ),
    (
        "retry just beyond 2**63 - 1 ms: clamped",
        b"retry: 9223372036854775808\ndata: a\n\n",
        [E(data="a", retry=2**63 - 1)],
    ),
    (
        "retry with many leading zeros",
        b"retry: " + b"0" * 5000 + b"7\ndata: a\n\n",
        [E(data="a", retry=7)],
    ),
    ("WHATWG: BOM stripped at start", b"\xef\xbb\xbfdata: a\n\n", [E(data="a")]),
    ("WHATWG: only one BOM stripped", b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),
    ("WHATWG: invalid UTF-8 replaced", b"data: \xff\xfe\n\n", [E(data="\ufffd\ufffd")]),
    ("WHATWG: unterminated event discarded", b"data: a\n\ndata: b\n", [E(data="a")]),
    ("WHATWG: unterminated line discarded", b"data: a\n\ndata: b", [E(data="a")]),
    ("WHATWG: space-only value keeps the rest", b"data:   \n\n", [E(data="  ")]),
    ("WHATWG: colon in value kept", b"data: a:b\n\n", [E(data="a:b")]),
    (
        "openai SDK defect: id + ping must not dispatch an empty event",
        b"id: 1\n: ping\n\ndata: {}\n\n",
        [E(data="{}", id="1")],
    ),
    ("sseclient/anthropic defect: LF CR LF ends the event", b"data: a\n\r\n", [E(data="a")]),
    ("httpx-sse defect: bare CR ends the event", b"data: a\r\r", [E(data="a")]),
    (
        "all peers: first event after a BOM kept",
        b"\xef\xbb\xbfevent: x\ndata: 1\n\n",
        [E("x", "1")],
    ),
]


@pytest.mark.parametrize(
    ("source", "stream", "expected"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES]
)
def test_spec_cases_whole_bytewise_and_with_junk_after(
    source: str, stream: bytes, expected: list[ServerSentEvent]
) -> None:
    """Each spec case decodes the same whole, one byte at a time, and with a partial event after."""
    assert expected == decode_whole(stream)[0]
    assert expected == decode_bytewise(stream)
    assert expected == decode_whole(stream + b"data: junk-without-end")[0]


def test_event_ended_by_cr_is_dispatched_before_the_next_chunk() -> None:
    """A CR ends the event at once; the LF that may follow belongs to it and is dropped."""
    decoder = SSEDecoder()
    assert [E(data="a")] == decoder.feed(b"data: a\r\r")
    assert [] == decoder.feed(b"\n")
    assert [E(data="b")] == decoder.feed(b"data: b\n\n")


def test_event_ended_by_lf_cr_lf_is_dispatched_at_once() -> None:
    """`\\n\\r\\n` is a line end then a blank line; no waiting for more bytes."""
    decoder = SSEDecoder()
    assert [E(data="a")] == decoder.feed(b"data: a\n\r\n")


def test_bom_split_across_chunks_is_stripped() -> None:
    """The three BOM bytes may arrive one by one."""
    decoder = SSEDecoder()
    assert [] == decoder.feed(b"\xef")
    assert [] == decoder.feed(b"\xbb")
    assert [E(data="x")] == decoder.feed(b"\xbfdata: x\n\n")


def test_bom_later_in_stream_is_kept() -> None:
    """Only a BOM at the very start is stripped; later it is part of a line."""
    events, _ = decode_whole(b"data: a\n\n\xef\xbb\xbfdata: b\n\ndata: c\n\n")
    assert [E(data="a"), E(data="c")] == events


def test_split_multibyte_utf8_decodes_correctly() -> None:
    """A character split across chunks is reassembled, never replaced."""
    stream = "data: héllo 🐑\n\n".encode()
    assert [E(data="héllo 🐑")] == decode_bytewise(stream)


def test_last_event_id_and_retry_are_tracked() -> None:
    """The decoder keeps the last event ID at dispatch and the latest valid retry."""
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\nretry: 3000\ndata: a\n\nid: 2\n")
    assert "1" == decoder.last_event_id  # `id: 2` is not committed until its event ends
    assert 3000 == decoder.retry
    decoder.feed(b"\n")
    assert "2" == decoder.last_event_id


def test_a_retry_too_long_for_int_is_clamped_and_nothing_is_lost() -> None:
    """More digits than int() takes set the largest reconnection time; the read's events stay,
    the decoder goes on, and the value in seconds is a finite float for the retry policy."""
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: " + b"1" * 5000 + b"\ndata: kept\n\n")
    assert [E(data="kept", retry=2**63 - 1)] == events
    assert 2**63 - 1 == decoder.retry
    assert math.isfinite(decoder.retry / 1000)
    assert [E(data="next")] == decoder.feed(b"data: next\n\n")


def test_truncation_is_reported_on_close() -> None:
    """An unfinished event is discarded, and `truncated` says so."""
    _, cut = decode_whole(b"data: a\n\ndata: b")
    _, cut_after_field = decode_whole(b"data: a\n\nevent: x\n")
    _, clean = decode_whole(b"data: a\n\n: trailing comment\n")
    assert (True, True, False) == (cut.truncated, cut_after_field.truncated, clean.truncated)


def test_feed_after_close_is_a_local_error() -> None:
    """Feeding a closed decoder is the caller's bug."""
    decoder = SSEDecoder()
    decoder.close()
    assert [] == decoder.close()
    with pytest.raises(LocalProtocolError, match="after close"):
        decoder.feed(b"data: a\n\n")


def test_line_limit_raises_with_sizes() -> None:
    """A line longer than max_line_size raises, naming the limit and the size."""
    decoder = SSEDecoder(max_line_size=10)
    with pytest.raises(RemoteProtocolError, match=r"max_line_size \(10 bytes\): 11 bytes"):
        decoder.feed(b"data: 12345")
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        decoder.feed(b"\n\n")


def test_line_limit_applies_to_complete_lines_too() -> None:
    """A long line that arrives whole in one chunk is caught as well."""
    with pytest.raises(RemoteProtocolError, match="a line of 21 bytes"):
        SSEDecoder(max_line_size=20).feed(b"data: 123456789012345\n\n")


def test_line_limit_applies_to_the_tail_of_a_chunk() -> None:
    """The unterminated rest of a chunk counts against the limit immediately."""
    with pytest.raises(RemoteProtocolError, match="max_line_size"):
        SSEDecoder(max_line_size=10).feed(b"data: a\n\ndata: 123456789")


def test_line_limit_counts_bytes_however_the_line_arrives() -> None:
    """max_line_size is in bytes, for a whole line as for one still arriving: a line of 11
    characters and 16 bytes is over a limit of 12 whether it comes in one read or cut."""
    stream = ("data: " + "é" * 5 + "\n\n").encode()
    for cuts in ([], [16], list(range(len(stream)))):
        with pytest.raises(RemoteProtocolError, match=r"max_line_size \(12 bytes\)"):
            decode_split(stream, cuts, max_line_size=12)
        assert [E(data="é" * 5)] == decode_split(stream, cuts, max_line_size=16)[0]


def test_event_limit_raises() -> None:
    """Many short data lines without a blank line are bounded by max_event_size."""
    decoder = SSEDecoder(max_event_size=20)
    with pytest.raises(RemoteProtocolError, match="max_event_size"):
        decoder.feed(b"data: 12345\n" * 5)


def test_event_limit_counts_the_data_as_delivered() -> None:
    """Several data lines count as the data they make: the lines and the LFs that join them."""
    assert [E(data="ab\ncd")] == SSEDecoder(max_event_size=5).feed(b"data: ab\ndata: cd\n\n")
    with pytest.raises(RemoteProtocolError, match=r"max_event_size \(4\): 5 characters"):
        SSEDecoder(max_event_size=4).feed(b"data: ab\ndata: cd\n\n")


@pytest.mark.parametrize(
    "read",
    [
        b"data: a\n\ndata: 123456\n\ndata: b\n\n",  # in the middle of the read
        b"data: a\n\ndata: 123456\n\n",  # the read's last event
        b"data: 123456\n\n",  # the read's only event
    ],
)
def test_an_oversize_event_among_many_in_one_read_is_refused(read: bytes) -> None:
    """A read of many one-line events is cut apart on a fast path: each event on it is held
    to max_event_size as one read per event would be, wherever in the read it sits."""
    decoder = SSEDecoder(max_event_size=5)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(read)
    assert "SSE event exceeds max_event_size (5): 6 characters of data without a blank line" == (
        str(info.value)
    )


@pytest.mark.parametrize(
    ("stream", "limits", "expected"),
    [
        (  # the report's case: an event, then a line over the limit, in one read
            b"data: ok\n\ndata: " + b"y" * 50 + b"\n\n",
            {"max_event_size": 10},
            r"SSE event exceeds max_event_size \(10\): 50 characters",
        ),
        (b"id: 7\ndata: ok\n\ndata: " + b"y" * 50 + b"\n\n", {"max_line_size": 20}, "a line of 56"),
        (b"data: ok\r\rdata: " + b"y" * 50 + b"\r", {"max_line_size": 20}, "a line of 56"),
        (b"id: 7\ndata: ok\n\ndata: " + b"y" * 50, {"max_line_size": 20}, "56 bytes received"),
        (b"id: 7\ndata: ok\n\ndata: y\ndata: " + b"y" * 50 + b"\n", {"max_event_size": 20}, "52"),
    ],
    ids=["event", "line", "line ended by CR", "unfinished line", "event of two lines"],
)
def test_the_events_before_a_refused_line_come_with_the_error(
    stream: bytes, limits: dict[str, int], expected: str
) -> None:
    """A read that completes events and then goes over a limit: the error carries those
    events (`events`), as they would have been returned had the read been cut before the
    offending line, and the last event ID they committed is kept."""
    decoder = SSEDecoder(**limits)
    with pytest.raises(RemoteProtocolError, match=expected) as info:
        decoder.feed(stream)
    assert [E(data="ok", id=decoder.last_event_id)] == info.value.events  # type: ignore[attr-defined]
    assert ("7" if b"id: 7" in stream else "") == decoder.last_event_id
    with pytest.raises(RemoteProtocolError) as alone:
        SSEDecoder(**limits).feed(stream[stream.index(b"data: y") :])
    assert [] == alone.value.events  # type: ignore[attr-defined]  # nothing before it


def test_limits_must_be_positive() -> None:
    """A zero limit is a configuration mistake."""
    with pytest.raises(ValueError, match="positive"):
        SSEDecoder(max_line_size=0)


@pytest.mark.parametrize(
    "limit", [0, -1, 1.5, 10e6, math.inf, math.nan, 2**64, sys.maxsize + 1, True, "10", None]
)
@pytest.mark.parametrize("name", ["max_line_size", "max_event_size"])
def test_a_limit_that_is_no_size_is_refused(name: str, limit: object) -> None:
    """A limit is an int from 1 to sys.maxsize: a float (10e6, inf), a bool or an int past
    what the C part compares with is refused when the decoder is made, not at its first read."""
    with pytest.raises(ConfigurationError, match=f"{name} must be a positive int"):
        SSEDecoder(**{name: limit})  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [sys.maxsize, math.inf, 10e6, 2**64])
def test_a_limit_of_any_size_decodes_alike_on_both_paths(limit: int) -> None:
    """sys.maxsize is a limit like any other; a limit set afterwards to what the constructor
    refuses is compared as it is, the C part leaving those reads to Python."""
    decoder = SSEDecoder(max_line_size=sys.maxsize, max_event_size=sys.maxsize)
    decoder.max_line_size = decoder.max_event_size = limit
    assert [E(data="hi"), E(data="a\nb")] == decoder.feed(b"data: hi\n\ndata: a\ndata: b\n\n")
    acc = _chat.ChatAccumulator(decoder=decoder, require_end=False)
    chunks = acc.feed(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
    assert ["hi"] == [chunk.text for chunk in chunks]


def test_encode_rejects_what_cannot_round_trip() -> None:
    """Values that would change meaning on the wire are refused."""
    for bad in (
        E(data="a\rb"),
        E(event="a\nb"),
        E(id="a\x00"),
        E(id="a\rb"),
        E(retry=-1),
        E(retry=2**63),
        E(retry=10**5000),
        E(retry=True),
        E(retry=1.5),  # type: ignore[arg-type]
        E(retry=2.0),  # type: ignore[arg-type]
        E(event=""),
        E(data="\ud800"),
        E(event="\udcff", data="x"),
        E(id="a\udfffb"),
    ):
        with pytest.raises(ConfigurationError, match="SSE"):
            bad.encode()


@settings(max_examples=500)
@given(
    st.builds(
        ServerSentEvent,
        event=st.one_of(st.just("message"), st.text(max_size=6)),
        data=st.text(max_size=12),
        id=st.text(max_size=6),
        retry=st.one_of(st.none(), st.booleans(), st.integers(-5, 2**64), st.floats()),
    )
)
def test_encode_round_trips_or_refuses(event: ServerSentEvent) -> None:
    """Any event, of any text (line breaks, NUL, lone surrogates, empty) and any retry: its
    encoding decodes to an equal event, or `encode()` refuses it with ConfigurationError."""
    try:
        wire = event.encode()
    except ConfigurationError:
        return
    assert [event] == SSEDecoder().feed(wire)


def test_event_json() -> None:
    """`json()` parses the data."""
    assert {"a": [1]} == E(data='{"a": [1]}').json()


# -- properties --------------------------------------------------------------------------------

field_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"),
    max_size=20,
)
events_strategy = st.lists(
    st.builds(
        ServerSentEvent,
        event=st.one_of(st.just("message"), field_text.filter(bool)),
        data=st.lists(field_text, min_size=1, max_size=3).map("\n".join),
        id=field_text.filter(bool),
        retry=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
    ),
    max_size=8,
)


@st.composite
def stream_with_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    events = draw(events_strategy)
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    stream = b"".join(e.encode().replace(b"\n", eol) for e in events)
    stream = draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + stream
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
    return stream, cuts


@given(events_strategy, st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_encode_decode_round_trip(events: list[ServerSentEvent], eol: bytes) -> None:
    """Any events, encoded with any line ending, decode back to themselves."""
    stream = b"".join(e.encode().replace(b"\n", eol) for e in events)
    assert events == decode_whole(stream)[0]


@given(stream_with_cuts())
def test_chunk_split_invariance(case: tuple[bytes, list[int]]) -> None:
    """Splitting the stream anywhere (inside CRLF, inside UTF-8, inside the BOM) changes nothing."""
    stream, cuts = case
    whole, whole_decoder = decode_whole(stream)
    split, split_decoder = decode_split(stream, cuts)
    assert whole == split
    assert whole_decoder.last_event_id == split_decoder.last_event_id
    assert whole_decoder.retry == split_decoder.retry
    assert whole_decoder.truncated == split_decoder.truncated


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_arbitrary_bytes_decode_or_raise_remote_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    """Garbage never crashes the decoder with anything but our own error, whatever the split."""
    cuts = [c for c in cuts if c <= len(data)]
    try:
        whole, _ = decode_whole(data)
    except RemoteProtocolError:  # pragma: no cover - only the size limits raise
        return
    assert whole == decode_split(data, cuts)[0]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_with_tiny_limits_raise_only_remote_protocol_error(data: bytes) -> None:
    """With limits small enough to trip, the only failure is RemoteProtocolError."""
    decoder = SSEDecoder(max_line_size=16, max_event_size=16)
    try:
        for i in range(0, len(data), 7):
            decoder.feed(data[i : i + 7])
        decoder.close()
    except RemoteProtocolError:
        pass


@given(st.lists(field_text, min_size=1, max_size=4).map("\n".join).filter(bool))
def test_an_event_exactly_at_max_event_size_is_kept_and_one_over_is_refused(data: str) -> None:
    """The limit is on `len(event.data)`, however many lines make it, whatever the split."""
    stream = E(data=data).encode()
    for cuts in ([], list(range(len(stream)))):
        assert [E(data=data)] == decode_split(stream, cuts, max_event_size=len(data))[0]
        if len(data) > 1:
            with pytest.raises(RemoteProtocolError, match="max_event_size"):
                decode_split(stream, cuts, max_event_size=len(data) - 1)


# -- against a literal reading of the spec ---------------------------------------------------------


def reference_decode(stream: bytes) -> tuple[list[ServerSentEvent], str, int | None]:
    """WHATWG 9.2.6 step by step, on the whole stream at once: slow, short and obviously right.

    The decoder's fast paths (a whole event per read, reads cut at "\\n\\ndata: ") must agree
    with it on every input.
    """
    text = stream.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines.pop()  # the part after the last line ending is not a line: discarded at EOF
    events: list[ServerSentEvent] = []
    data: list[str] = []
    event_type, id_buffer, last_id, retry, event_retry = "", "", "", None, None
    for line in lines:
        if not line:
            last_id = id_buffer
            if data:
                events.append(E(event_type or "message", "\n".join(data), last_id, event_retry))
            data, event_type, event_retry = [], "", None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # Clamped at 2**63 - 1 (docs/decoder.md): 20 significant digits are always beyond it.
            retry = event_retry = min(int(value.lstrip("0")[:20] or "0"), 2**63 - 1)
    return events, last_id, retry


def assert_decodes_like_the_spec(stream: bytes, cuts: list[int]) -> None:
    """Read whole and cut at `cuts`, the decoder gives what `reference_decode` gives."""
    expected, last_id, retry = reference_decode(stream)
    for events, decoder in (
        decode_whole(stream),
        decode_split(stream, [c for c in cuts if c <= len(stream)]),
    ):
        assert expected == events
        assert (last_id, retry) == (decoder.last_event_id, decoder.retry)


sse_line = st.one_of(
    st.just(""),
    st.just(""),
    st.builds("data: {}".format, field_text),
    st.builds("data: {}".format, field_text),
    st.builds("data:{}".format, field_text),
    st.just("data"),
    st.builds("event: {}".format, field_text),
    st.builds("id: {}".format, field_text),
    st.just("id"),
    st.builds(
        "retry: {}".format,
        st.sampled_from(["10", "x1", "", "0" * 30 + "7", "9223372036854775808", "9" * 4400]),
    ),
    st.builds(": {}".format, field_text),
    st.builds("{}: {}".format, st.sampled_from(["foo", "Data", " data"]), field_text),
)


# A stream is blocks of lines, each ended by a blank line, then maybe an unfinished block.
# Most blocks are one `data: ` line, the shape of a chat stream and of the decoder's fast paths.
one_data_line = st.builds("data: {}".format, field_text).map(lambda line: [line])
sse_stream = st.tuples(
    st.lists(
        st.one_of(one_data_line, one_data_line, st.lists(sse_line, max_size=4)).map(
            lambda block: [*block, ""]
        ),
        max_size=10,
    ),
    st.lists(sse_line, max_size=3),
).map(
    lambda blocks_and_tail: (
        [line for block in blocks_and_tail[0] for line in block] + blocks_and_tail[1]
    )
)


@settings(max_examples=500)
@given(
    sse_stream,
    st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=3),
    st.sampled_from(["", "\ufeff"]),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_decoder_agrees_with_the_literal_spec(
    lines: list[str], eols: list[str], bom: str, cuts: list[int]
) -> None:
    """Any mix of fields, comments, blank lines and line endings, read whole and split anywhere,
    decodes to what the spec's algorithm gives, with the same last event ID and retry."""
    stream = (bom + "".join(line + eols[i % len(eols)] for i, line in enumerate(lines))).encode()
    assert_decodes_like_the_spec(stream, cuts)


# Bytes that matter to the decoder, and some that do not: any string of them is a stream.
stream_bytes = st.lists(
    st.sampled_from(
        [
            b"data: ",
            b"data:",
            b"data",
            b"\n",
            b"\n",
            b"\n\n",
            b"\r",
            b"\r\n",
            b"abc",
            b" ",
            b"\xe2\x82",
            b"\xac",
            b"\xff",
            b"\xef\xbb\xbf",
            b":",
            b"id: 7",
            b"event: x",
            b"retry: 5",
        ]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=500)
@given(stream_bytes, st.lists(st.integers(min_value=0, max_value=300), max_size=12))
def test_bytes_decode_like_the_literal_spec(stream: bytes, cuts: list[int]) -> None:
    """Byte soup too, invalid and split UTF-8 included, decodes as the spec's algorithm says."""
    assert_decodes_like_the_spec(stream, cuts)


def outcome(stream: bytes, cuts: list[int], **limits: int) -> object:
    """The events and the decoder's state at the end, or the error with the events delivered
    before it: those returned, and those it carries (`events`, from the read it refused)."""
    decoder = SSEDecoder(**limits)
    events: list[ServerSentEvent] = []
    start = 0
    try:
        for cut in [*sorted(cuts), len(stream)]:
            events += decoder.feed(stream[start:cut])
            start = cut
        events += decoder.close()
    except RemoteProtocolError as exc:
        events += exc.events  # type: ignore[attr-defined]
        return RemoteProtocolError, events, decoder.last_event_id, decoder.retry
    return events, decoder.last_event_id, decoder.retry, decoder.truncated


@st.composite
def any_stream(draw: st.DrawFn) -> bytes:
    """A stream of lines (fields, comments, multi-byte text, any line endings) or byte soup."""
    if draw(st.booleans()):
        return draw(stream_bytes)
    lines = draw(sse_stream)
    eols = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=3))
    bom = draw(st.sampled_from(["", "\ufeff"]))
    return (bom + "".join(line + eols[i % len(eols)] for i, line in enumerate(lines))).encode()


@settings(max_examples=1000)
@given(
    any_stream(),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=40),
)
def test_limits_give_the_same_outcome_however_the_stream_is_split(
    stream: bytes, cuts: list[int], max_line_size: int, max_event_size: int
) -> None:
    """With limits small enough to trip, any split gives the events, or the error and the
    events before it, that the stream fed whole gives."""
    limits = {"max_line_size": max_line_size, "max_event_size": max_event_size}
    cuts = [c for c in cuts if c <= len(stream)]
    assert outcome(stream, [], **limits) == outcome(stream, cuts, **limits)


def test_c_part_takes_chat_reads_and_leaves_the_rest(implementation: str) -> None:
    """The C part decodes plain `data:` reads itself and hands anything else back untouched."""
    if implementation != "C":
        pytest.skip("about the C part")
    from holysheep import _speedups

    decoder = SSEDecoder()
    decoder.feed(b"data: first\n\n")  # the first read clears the start-of-stream state
    assert [E(data="a"), E(data="b")] == _speedups.feed(decoder, b"data: a\n\ndata: b\n\ndata: c")
    assert [E(data="cd")] == _speedups.feed(decoder, b"d\n\n")
    assert [E(data="e")] == _speedups.feed(decoder, b"data: e\r\n\r\n")  # CRLF too
    typed = b"event: ping\ndata: p\n\ndata: q\nevent:\n\n"  # Anthropic's shape
    assert [E("ping", "p"), E(data="q")] == _speedups.feed(decoder, typed)
    assert [] == _speedups.feed(decoder, b"event: x\ndata: y\n")  # left open across reads
    assert [E("x", "y")] == _speedups.feed(decoder, b"\n")
    for other in (
        b"id: 1\ndata: y\n\n",
        b"data: y\r\r",  # bare CRs
        b"data: y\n\ndata: z\r",  # a CR that may start a CRLF in the next read
        b"data: 1\ndata: 2\n\n",
        b": hi\n",
    ):
        assert _speedups.feed(decoder, other) is None
    assert [] == decoder._data
    assert [] == decoder._pending


def test_c_part_events_are_the_tuples_python_makes(implementation: str) -> None:
    """The C part builds events itself: equal and hashed as Python's. It leaves them out of
    the garbage collector's lists (strings, None and an int, in a tuple: no cycle can run
    through one), which with thousands of open streams shortens every full collection."""
    decoder = SSEDecoder()
    decoder.feed(b":\n")  # clears the start-of-stream state
    (event,) = decoder.feed(b"data: x\n\n")
    python = ServerSentEvent("message", "x", "", None)
    assert (python, hash(python)) == (event, hash(event))
    assert (implementation != "C") == gc.is_tracked(event)
    assert (ServerSentEvent, 4) == (type(event), len(event))


def test_c_part_reads_a_subclass_by_name(implementation: str) -> None:
    """An `SSEDecoder` itself is read through its slots; a subclass through its attributes,
    which may be properties in front of those slots."""
    if implementation != "C":
        pytest.skip("about the C part")
    from holysheep import _speedups

    class Shadowed(SSEDecoder):
        __slots__ = ()

        @property
        def max_line_size(self) -> int:
            return 4

        @max_line_size.setter
        def max_line_size(self, value: int) -> None:
            vars(SSEDecoder)["max_line_size"].__set__(self, value)  # the slot's descriptor

    decoder = Shadowed()
    decoder.feed(b":\n")  # clears the start-of-stream state
    assert _speedups.feed(decoder, b"data: 1\n\n") is None  # over the property's limit
    with pytest.raises(RemoteProtocolError, match="max_line_size"):
        decoder.feed(b"data: 1\n\n")
