"""A Server-Sent Events decoder: bytes in, events out, nothing else.

Theory of operation
-------------------
The WHATWG HTML standard, section 9.2.6 "Interpreting an event stream", defines the format as
lines of UTF-8 text. Lines end in CRLF, LF or CR; a blank line dispatches the event collected so
far; `field: value` lines fill the event; lines starting with `:` are comments.

`SSEDecoder.feed()` keeps the bytes after the last line ending of everything fed so far in
`_pending` (a list of chunks, joined once a line ending arrives, so reading one byte at a time
stays linear). Everything up to the last line ending is decoded to text in one call and split
into lines in one call. This is exact because CR and LF are ASCII: they never occur inside a
multi-byte UTF-8 sequence, so a split character always sits in `_pending` until it is whole,
and an invalid sequence is replaced by U+FFFD the same way whatever the chunking.

Two states survive between chunks besides `_pending`:

- `_skip_lf`: the last chunk ended in CR. The event that CR ended is dispatched at once (a
  peer that waits for the next byte to see whether it is LF stalls a live stream); if the next
  chunk starts with LF, that LF is the second half of the same CRLF and is dropped.
- `_at_start`: a single U+FEFF BYTE ORDER MARK is stripped from the very start of the stream,
  even when its three bytes arrive in separate chunks.

At end of stream (`close()`), the spec says an event without its blank line is discarded. We
discard it too, but say so: `truncated` is true, so a client can tell a cut stream from a
finished one.

Sizes are bounded (`max_line_size`, `max_event_size`); going over raises `RemoteProtocolError`
and the decoder refuses further input. The events the read completed before the offending line
go with the error, on its `events`: they are what the read would have returned had it been cut
before that line. A line is measured in bytes as received, without its
line ending, whether it is whole or still in `_pending`: one unit for both, so where the
stream is cut into reads changes nothing. An event is measured by its `data` as delivered.

Speed, without giving up any of the above: a chat stream is almost only `data:` lines and blank
lines. Where it was built, `_speedups.c` takes such reads and leaves every other read, untouched,
to this module. Here, a read that is one whole `data:` event takes a short path, and a read of
many is cut at "\n\ndata: " instead of line by line (see `_events()`). The line machine,
`_process()`, handles everything else. tests/test_sse.py holds all of them to a literal
transcription of the standard.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any, NamedTuple, final

from ._exceptions import ConfigurationError, LocalProtocolError, RemoteProtocolError

try:  # the common case in C (_speedups.c); built when the installing machine has a compiler
    from . import _speedups
except ImportError:  # pragma: no cover - the Python path below does everything on its own
    _speedups = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_MAX_LINE_SIZE",
    "SSEDecoder",
    "ServerSentEvent",
]

# 16 MiB. A chat chunk is typically 100-400 bytes, but one event may legitimately carry a whole
# tool-call argument string or a base64 image (a 2048x2048 PNG is ~8 MiB in base64). 16 MiB
# leaves room for those and still stops a server that never sends a line ending from growing
# our memory without bound.
DEFAULT_MAX_LINE_SIZE = 16 * 1024 * 1024
# An event's data is the sum of its lines, so the same reasoning and the same default apply.
DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024
# The largest reconnection time kept, in milliseconds: 2**63 - 1, the most a signed 64-bit
# integer holds, so every value a real server can mean is kept exactly. A `retry` field beyond
# it is clamped, not parsed: its digits may be more than int() accepts (4300 by default), and
# no longer wait means anything more. What a client actually waits is bounded elsewhere
# (`RetryPolicy.max_retry_after`), and (2**63 - 1) / 1000 seconds is still a finite float.
_MAX_RETRY = 2**63 - 1
_MAX_RETRY_DIGITS = len(str(_MAX_RETRY))

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_CUT = "\n\ndata: "  # a line ending, a blank line, and the next event's data field
_LF = 0x0A


@final
class ServerSentEvent(NamedTuple):
    """One dispatched event, as the WHATWG spec defines it.

    A frozen record. It is a NamedTuple rather than an attrs class, unlike our other values,
    because the decoder builds one per event and a tuple is built at C speed: a third of the
    cost of attrs' frozen `__init__` (bench/sse_decode.py shows it as events/s).

    `id` is the stream's last-event-ID at dispatch time: it persists across events until the
    server sends another `id` field, which is what a client must send back as `Last-Event-ID`.
    `retry` is the reconnection time (ms) set by a valid `retry` field *in this event's block*,
    else None; the decoder's `retry` keeps the latest one. A value beyond 2**63 - 1 is clamped
    to it.
    """

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None

    def json(self) -> Any:
        """Parse `data` as JSON."""
        return json.loads(self.data)

    def encode(self) -> bytes:
        """Serialize to the wire format; decoding the result yields an equal event.

        A value that would decode differently (a line break in `event` or `id`, a CR in
        `data`, an empty `event`, which decodes as "message") or cannot be sent (a lone
        surrogate, which UTF-8 cannot encode) is refused with `ConfigurationError` (a
        `ValueError`) rather than sent.

        An empty `id` is not written, so the event inherits the stream's last event ID, as a
        server that sends no `id` field does.
        """
        for name, value in (("event", self.event), ("id", self.id)):
            if "\n" in value or "\r" in value:
                raise ConfigurationError(f"SSE {name} cannot contain a line ending: {value!r}")
        if "\r" in self.data:
            raise ConfigurationError("SSE data cannot contain CR; a bare CR would end the line")
        if "\0" in self.id:
            raise ConfigurationError("SSE id cannot contain U+0000; a decoder ignores such an id")
        if not self.event:
            raise ConfigurationError('SSE event cannot be empty; a decoder reads it as "message"')
        lines = []
        if self.event != "message":
            lines.append(f"event: {self.event}\n")
        if self.id:
            lines.append(f"id: {self.id}\n")
        if self.retry is not None:
            # Beyond 2**63 - 1 it would decode clamped. (Not shown: str() refuses a huge int.)
            # A bool is an int to Python, but `retry: True` is no number to a decoder, nor is
            # `retry: 1.5` (only ASCII digits are).
            retry = self.retry
            if type(retry) is not int or not 0 <= retry <= _MAX_RETRY:
                raise ConfigurationError(
                    "SSE retry must be a whole number from 0 to 2**63 - 1 (milliseconds)"
                )
            lines.append(f"retry: {self.retry}\n")
        lines.extend(f"data: {line}\n" for line in self.data.split("\n"))
        lines.append("\n")
        try:
            return "".join(lines).encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, from "\ud800" or surrogateescape
            raise ConfigurationError(f"SSE event cannot be sent as UTF-8: {exc.reason}") from exc


_tuple = tuple.__new__


# HOLYSHEEP_NO_EXTENSIONS=1 runs the pure Python decoder even when the C part is built (the
# tests run both; so does bench/sse_decode.py). "0", "false", "no", "off" and "" leave it on,
# as they read.
_OFF_WORDS = ("", "0", "false", "no", "off")
_NO_EXTENSIONS = os.environ.get("HOLYSHEEP_NO_EXTENSIONS", "").strip().lower() not in _OFF_WORDS
_c_feed = None if _speedups is None or _NO_EXTENSIONS else _speedups.feed
# Not taken only where the C part is not built: tests/test_packaging.py checks that case in a
# subprocess, which coverage does not follow.
if _speedups is not None:  # pragma: no branch
    _speedups.setup(ServerSentEvent)


def _event(event: str, data: str, id: str, retry: int | None) -> ServerSentEvent:
    # The decoder's own constructor, without NamedTuple's keyword handling; the hot paths of
    # `SSEDecoder` inline it.
    return _tuple(ServerSentEvent, (event, data, id, retry))


def _copy_of(data: object) -> bytes:
    # A read that is not `bytes`: a `bytearray` the caller fills again with the next read
    # (`recv_into`, `readinto`) would change the line held in `_pending` under us.
    try:
        return memoryview(data).tobytes()  # type: ignore[arg-type]  # any buffer; str is none
    except TypeError as exc:
        raise TypeError(
            f"SSEDecoder.feed() takes bytes (or a bytes-like object), not {type(data).__name__}"
        ) from exc


def _reconnection_time(digits: str) -> int:
    # WHATWG: a `retry` value of ASCII digits only is the reconnection time, in base ten. Leading
    # zeros are dropped before the digits are counted: "000...05" is 5, however many zeros.
    digits = digits.lstrip("0")
    if len(digits) > _MAX_RETRY_DIGITS:
        return _MAX_RETRY
    return min(int(digits) if digits else 0, _MAX_RETRY)


def _check_sizes(max_line_size: object, max_event_size: object) -> None:
    for name, size in (("max_line_size", max_line_size), ("max_event_size", max_event_size)):
        # A size in bytes or characters, as the C part reads it (a Py_ssize_t): a float
        # (`10e6`, `inf`) or an int past sys.maxsize is no size it can compare with, and a
        # bool is an int to Python but never a limit.
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= sys.maxsize:
            raise ConfigurationError(
                f"{name} must be a positive int (a size, at most sys.maxsize), got {size!r}"
            )


class SSEDecoder:
    """Incremental, exact, bounded SSE parser.

    >>> decoder = SSEDecoder()
    >>> decoder.feed(b"data: hel")
    []
    >>> decoder.feed(b"lo\\n\\n")
    [ServerSentEvent(event='message', data='hello', id='', retry=None)]
    >>> decoder.close()
    []
    """

    # Slots: no per-instance dict; one is open per stream, thousands at a time.
    __slots__ = (
        "_at_start",
        "_data",
        "_data_size",
        "_event_retry",
        "_event_type",
        "_failed",
        "_fields",
        "_id_buffer",
        "_pending",
        "_pending_size",
        "_skip_lf",
        "_special",
        "closed",
        "last_event_id",
        "max_event_size",
        "max_line_size",
        "retry",
        "truncated",
    )

    def __init__(
        self,
        *,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    ) -> None:
        if not (
            max_line_size is DEFAULT_MAX_LINE_SIZE and max_event_size is DEFAULT_MAX_EVENT_SIZE
        ):  # the defaults are sizes: not checked again for every stream
            _check_sizes(max_line_size, max_event_size)
        self.max_line_size = max_line_size
        self.max_event_size = max_event_size
        #: The last event ID string (WHATWG): send it back as `Last-Event-ID` to resume.
        self.last_event_id = ""
        #: The latest reconnection time the server asked for, in milliseconds (at most
        #: 2**63 - 1), or None.
        self.retry: int | None = None
        #: True after `close()` if the stream ended in the middle of an event.
        self.truncated = False
        self.closed = False

        self._pending: list[bytes] = []
        self._pending_size = 0
        self._skip_lf = False
        self._at_start = True
        self._failed: RemoteProtocolError | None = None
        # True while any of closed, failed, _skip_lf, _at_start holds: one test per read.
        self._special = True
        # The event being collected. `_fields` is true once a line other than `data:` (an
        # `event`, `id` or `retry` field, an unknown field) is part of it.
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._id_buffer = ""
        self._event_retry: int | None = None
        self._fields = False

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Take the next bytes of the stream; return the events they complete.

        Any bytes-like object will do (a `bytearray`, a `memoryview`); what the decoder keeps
        of it is a copy, so the caller may reuse its buffer for the next read.
        """
        if data.__class__ is not bytes:
            data = _copy_of(data)
        if self._special:
            data = self._special_start(data)
        if not self._special and _c_feed is not None:
            # Reads of `data:`, `event:` and blank lines are done in C (_speedups.c); it
            # returns None, having changed nothing, for any read it leaves to the code below.
            events = _c_feed(self, data)
            if events is not None:
                return events
        if not data:
            return []
        last = data[-1]
        if last == _LF or last == _CR:  # noqa: SIM109 - two compares beat a tuple here
            # The common case: the read ends on a line ending, so all of it is complete lines.
            block = self._take_pending(data) if self._pending else data
            if last == _CR:
                self._skip_lf = self._special = True
        else:
            cut = data.rfind(b"\n")
            if data.find(b"\r", cut + 1) >= 0:  # a CR can only matter after the last LF
                cut = data.rfind(b"\r")
            if cut < 0:
                self._pending.append(data)
                self._pending_size += len(data)
                if self._pending_size > self.max_line_size:
                    self._line_too_long([])
                return []
            end = cut + 1
            block = self._take_pending(data[:end]) if self._pending else data[:end]
            self._pending.append(data[end:])
            self._pending_size = len(data) - end
            if self._pending_size > self.max_line_size:
                # The whole lines before it come first: their events go with the error.
                self._line_too_long(self._events_before_error(block))

        if len(block) > self.max_line_size:
            self._check_line_sizes(block)
        text = block.decode("utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        end = len(text) - 2
        if (
            text.startswith("data: ")
            and text.find("\n") == end
            and not (self._data or self._fields)  # no event open from an earlier read
        ):
            # One data line and a blank line, nothing open: the common case of one event per
            # read, on the shortest path.
            if end - 6 > self.max_event_size:
                self._event_too_large(end - 6)
            return [_tuple(ServerSentEvent, ("message", text[6:end], self._id_buffer, None))]
        return self._events(text)

    def _take_pending(self, data: bytes) -> bytes:
        pending = self._pending
        # One earlier piece is the usual case (the rest of the previous read): concatenating
        # two bytes objects is cheaper than a join.
        block = pending[0] + data if len(pending) == 1 else b"".join([*pending, data])
        pending.clear()
        self._pending_size = 0
        return block

    def close(self) -> list[ServerSentEvent]:
        """Signal end of stream. An unfinished event is discarded and sets `truncated`.

        Returns the events the end completes, which the WHATWG rules make always none; it
        returns a list anyway so a caller can treat it like `feed()`. Calling it again is a
        no-op; feeding afterwards raises `LocalProtocolError`.
        """
        if self.closed:
            return []
        self.closed = self._special = True
        self.truncated = self._pending_size > 0 or bool(self._data) or self._fields
        self._pending = []
        self._pending_size = 0
        self._data = []
        self._reset_fields()
        return []

    # -- internals ---------------------------------------------------------------------------

    def _events(self, text: str) -> list[ServerSentEvent]:
        # `text` is whole lines, each ended by LF. Almost every event of a chat stream is one
        # `data: {...}` line and a blank line, so the text is cut at "\n\ndata: " (one C-level
        # split, which beats splitting it into lines): every piece between two cuts is then the
        # value of a data line, plus any further lines of its event. A piece without LF is a
        # whole event, built at once. Every other piece, the first (it may finish an event begun
        # in an earlier read) and the last unless it is exactly one finished event, goes through
        # the line machine `_process()`. The cuts lose nothing: each one's first LF ends a line,
        # its second a blank line, and "data: " begins the next piece's first line.
        events: list[ServerSentEvent] = []
        try:
            pieces = text.split(_CUT)
            if len(pieces) == 1:
                lines = text.split("\n")
                lines.pop()  # `text` ends with LF: the last item is always ""
                self._process(lines, events)
                return events
            last = pieces.pop()
            lines = pieces[0].split("\n")
            lines.append("")
            self._process(lines, events)
            id_buffer = self._id_buffer
            limit = self.max_event_size
            for piece in itertools.islice(pieces, 1, None):
                if "\n" in piece:
                    lines = ("data: " + piece).split("\n")
                    lines.append("")
                    self._process(lines, events)
                    id_buffer = self._id_buffer
                else:
                    if len(piece) > limit:
                        self._event_too_large(len(piece))
                    events.append(_tuple(ServerSentEvent, ("message", piece, id_buffer, None)))
            end = len(last) - 2
            if last.find("\n") == end:  # exactly one data line and a blank line
                if end > limit:
                    self._event_too_large(end)
                events.append(_tuple(ServerSentEvent, ("message", last[:end], id_buffer, None)))
            else:
                lines = ("data: " + last).split("\n")
                lines.pop()
                self._process(lines, events)
        except RemoteProtocolError as exc:  # a limit: the events before it are the stream's
            exc.events = events  # see `_fail`
            raise
        return events

    def _process(self, lines: list[str], events: list[ServerSentEvent]) -> None:
        # The line machine: any line, any field. Almost every line of a chat stream is
        # `data: {...}` or blank, so those two are tested first, the rest goes to `_field()`.
        data = self._data
        for line in lines:
            if line:
                if line.startswith("data:"):
                    data.append(line[6:] if line.startswith(" ", 5) else line[5:])
                    if len(data) > 1:
                        self._count_data(data)
                elif line[0] != ":":
                    self._field(line)
                continue
            # A blank line dispatches the event (WHATWG "dispatch the event").
            self.last_event_id = self._id_buffer
            if data:
                payload = data[0] if len(data) == 1 else "\n".join(data)
                if len(payload) > self.max_event_size:
                    self._event_too_large(len(payload))
                if self._fields:
                    events.append(
                        _event(
                            self._event_type or "message",
                            payload,
                            self._id_buffer,
                            self._event_retry,
                        )
                    )
                    self._reset_fields()
                else:
                    events.append(_event("message", payload, self._id_buffer, None))
                # Emptied, not replaced: a new list per event would live until the next one.
                data.clear()
            elif self._fields:
                self._reset_fields()

    def _field(self, line: str) -> None:
        self._fields = True
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event_type = value
        elif name == "data":  # only reached as a bare `data` line with no colon
            self._data.append(value)
            if len(self._data) > 1:
                self._count_data(self._data)
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = self._event_retry = _reconnection_time(value)
        # Any other field name is ignored, as the spec says.

    def _count_data(self, data: list[str]) -> None:
        # Only events with several data lines get here; a single line is bounded at dispatch.
        # The size is that of the data as delivered: the lines and the LFs that join them.
        if len(data) == 2:
            self._data_size = len(data[0])
        self._data_size += 1 + len(data[-1])
        if self._data_size > self.max_event_size:
            self._event_too_large(self._data_size)

    def _reset_fields(self) -> None:
        self._event_type = ""
        self._event_retry = None
        self._fields = False

    def _special_start(self, data: bytes) -> bytes:
        # Everything that only matters at the start of some reads, kept off the hot path.
        if self.closed or self._failed is not None:
            self._refuse()
        if data and self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
        if data and self._at_start:
            data = self._strip_bom(data)
        self._special = self._skip_lf or self._at_start
        return data

    def _strip_bom(self, data: bytes) -> bytes:
        # The BOM may arrive split; hold its prefix in `_pending` until we can tell.
        if self._pending:
            data = b"".join(self._pending) + data
            self._pending = []
            self._pending_size = 0
        if len(data) < len(_BOM) and _BOM.startswith(data):
            self._pending.append(data)
            self._pending_size = len(data)
            return b""
        self._at_start = False
        return data[len(_BOM) :] if data.startswith(_BOM) else data

    def _check_line_sizes(self, block: bytes) -> None:
        # In bytes, as `_pending_size` counts a line not finished yet: a line is then judged
        # the same whether it arrived in one read or in several. The lines before the first
        # one too long are decoded first, as they would be had it come in a later read.
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = block.split(b"\n")
        limit = self.max_line_size
        for count, line in enumerate(lines):
            if len(line) > limit:
                before = b"".join(earlier + b"\n" for earlier in lines[:count])
                self._fail(
                    f"SSE line exceeds max_line_size ({limit} bytes): a line of {len(line)} bytes",
                    self._events_before_error(before),
                )

    def _events_before_error(self, block: bytes) -> list[ServerSentEvent]:
        # The events of `block`, whole lines, that precede an error in the same read (off the
        # hot path). An error among them comes first, with the events before it.
        if not block:
            return []
        if len(block) > self.max_line_size:
            self._check_line_sizes(block)
        text = block.decode("utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return self._events(text)

    def _line_too_long(self, events: list[ServerSentEvent]) -> None:
        self._fail(
            f"SSE line exceeds max_line_size ({self.max_line_size} bytes): "
            f"{self._pending_size} bytes received without a line ending",
            events,
        )

    def _event_too_large(self, size: int) -> None:
        self._fail(
            f"SSE event exceeds max_event_size ({self.max_event_size}): "
            f"{size} characters of data without a blank line"
        )

    def _fail(self, message: str, events: list[ServerSentEvent] | None = None) -> None:
        # The events the same read completed before the offending line go with the error, on
        # its `events` (`_events` puts them there for an error it meets): they are the
        # stream's, and had the read been cut before that line they would have been returned.
        self._failed = RemoteProtocolError(message)
        self._failed.events = [] if events is None else events
        self._special = True
        raise self._failed

    def _refuse(self) -> None:
        if self._failed is not None:
            raise LocalProtocolError(
                f"this SSEDecoder failed earlier and cannot take more input: {self._failed}"
            )
        raise LocalProtocolError("SSEDecoder.feed() called after close()")
