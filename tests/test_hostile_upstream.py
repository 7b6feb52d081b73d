"""Every transport against a hostile upstream: a raw socket on 127.0.0.1 that plays back exact
bytes, status line and headers included, with pauses and abrupt closes. The same bytes must
give the same text and the same error on every transport (docs/errors.md, docs/decoder.md,
docs/timeouts.md, docs/troubleshooting.md)."""

from __future__ import annotations

import contextlib
import email.utils
import enum
import functools
import gzip
import json
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any, Final

import anyio
import attrs
import pytest

import holysheep
from holysheep import HolySheepError, RetryPolicy, Timeouts
from holysheep.transports import (
    AiohttpTransport,
    AsyncHTTPXTransport,
    HTTPXTransport,
    RequestsTransport,
    _httpcore_body,
)

MESSAGES: Final = [{"role": "user", "content": "hi"}]
REQUEST_ID: Final = "req-hostile-7"
# Short limits so a stall fails fast; `connect` also bounds the wait for the response head.
FAST: Final = Timeouts(connect=2.0, ttft=2.0, idle=2.0, total=10.0)


class Act(enum.Enum):
    """What the server does besides sending bytes."""

    RESET = "reset"  # SO_LINGER 0, then close: the peer gets a TCP RST
    HOLD = "hold"  # keep the connection open, sending nothing, until the client leaves


Step = bytes | float | Act
Script = Sequence[Step]


class Hostile:
    """A server that answers the n-th connection with the n-th script (the last one repeats),
    step by step: bytes are sent as one write, a float pauses, an `Act` does what it says.
    After the script the server closes the connection cleanly (FIN)."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)  # close() does not wake accept(): poll for the stop
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"

    def __enter__(self) -> Hostile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            request = _read_request(conn)
            with self._lock:
                self.requests.append(request)
                script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
            for step in script:
                if isinstance(step, bytes):
                    conn.sendall(step)
                elif isinstance(step, float):
                    time.sleep(step)
                elif step is Act.RESET:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                elif step is Act.HOLD:
                    while not self._stop.is_set() and conn.recv(65536):
                        pass
            conn.shutdown(socket.SHUT_WR)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head


# --- building responses ---------------------------------------------------------------------


def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if text is not None:
        delta["content"] = text
    return {
        "id": "chatcmpl-h",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def event(obj: object, *, sep: bytes = b"\n", space: bytes = b" ") -> bytes:
    return b"data:" + space + json.dumps(obj, ensure_ascii=False).encode() + sep + sep


def sse(*texts: str, done: bool = True, finish: str | None = "stop") -> bytes:
    """A whole chat stream whose content pieces are `texts`."""
    body = event(chunk(role=True)) + b"".join(event(chunk(t)) for t in texts)
    if finish is not None:
        body += event(chunk(finish=finish))
    return body + (b"data: [DONE]\n\n" if done else b"")


def head(
    status: str = "200 OK",
    *headers: str,
    content_type: str | None = "text/event-stream",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{version} {status}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"X-Request-ID: {REQUEST_ID}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sized(body: bytes, *headers: str, status: str = "200 OK", **kw: Any) -> list[Step]:
    """A response with a Content-Length that fits `body`."""
    return [head(status, f"Content-Length: {len(body)}", *headers, **kw) + body]


def chunked(*pieces: bytes, trailer: bytes = b"", extension: bytes = b"") -> bytes:
    """`pieces` as HTTP/1.1 chunks, then the last chunk and `trailer` (header lines)."""
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces if p)
    return out + b"0\r\n" + trailer + b"\r\n"


# --- driving the clients --------------------------------------------------------------------

# The httpx transports read a plain HTTP/1.1 body from httpcore's connection itself (see
# `transports/_httpcore_body.py`); the "(layered)" kinds read it through httpx's public API,
# the path every other connection takes, and must give the same outcome.
LAYERED: Final = " (layered)"
KINDS: Final = [
    "requests",
    "httpx",
    "httpx-asyncio",
    "httpx-trio",
    "aiohttp",
    "httpx" + LAYERED,
    "httpx-asyncio" + LAYERED,
    "httpx-trio" + LAYERED,
]


@attrs.frozen
class Outcome:
    """What the caller saw: the text of the chunks it was handed, the completion's text (the
    stream's, or the error's partial one; None if there was none), and the error's type."""

    shown: str
    text: str | None
    error: str | None
    exc: HolySheepError | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def message(self) -> str:
        return str(self.exc)


def drive(kind: str, url: str, **options: Any) -> Outcome:
    """One `chat.stream()` read to its end through the transport `kind`, retries off unless
    `retry=` says otherwise."""
    options.setdefault("api_key", "k")
    options.setdefault("retry", RetryPolicy.none())
    options.setdefault("timeout", FAST)
    if kind.endswith(LAYERED):
        kind = kind.removesuffix(LAYERED)
        _httpcore_body.use_direct_reads = False
    try:
        if kind in ("requests", "httpx"):
            return _drive_sync(kind, url, options)
        backend = "trio" if kind == "httpx-trio" else "asyncio"
        return anyio.run(_drive_async, kind, url, options, backend=backend)
    finally:
        _httpcore_body.use_direct_reads = True


def _outcome(shown: list[str], completion: holysheep.Completion | None, exc: Any) -> Outcome:
    if exc is None:
        return Outcome("".join(shown), completion.text if completion else None, None)
    partial = getattr(exc, "completion", None)
    text = partial.text if partial is not None else None
    return Outcome("".join(shown), text, type(exc).__name__, exc)


def _drive_sync(kind: str, url: str, options: dict[str, Any]) -> Outcome:
    transport = RequestsTransport() if kind == "requests" else HTTPXTransport()
    shown: list[str] = []
    with holysheep.Client(base_url=url, transport=transport, **options) as client:
        try:
            with client.chat.stream(model="m", messages=MESSAGES) as stream:
                for piece in stream:
                    shown.append(piece.text)
        except HolySheepError as exc:
            return _outcome(shown, None, exc)
        return _outcome(shown, stream.completion, None)


async def _drive_async(kind: str, url: str, options: dict[str, Any]) -> Outcome:
    transport = AiohttpTransport() if kind == "aiohttp" else AsyncHTTPXTransport()
    shown: list[str] = []
    async with holysheep.AsyncClient(base_url=url, transport=transport, **options) as client:
        try:
            async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                async for piece in stream:
                    shown.append(piece.text)
        except HolySheepError as exc:
            return _outcome(shown, None, exc)
        return _outcome(shown, stream.completion, None)


def run(kind: str, *scripts: Script, **options: Any) -> Outcome:
    with Hostile(*scripts) as server:
        return drive(kind, server.base_url, **options)


def ok(text: str) -> Outcome:
    return Outcome(text, text, None)


transports = pytest.mark.parametrize("kind", KINDS)


FIRST: Final = event(chunk(role=True))
FINISH: Final = event(chunk(finish="stop"))
DONE: Final = b"data: [DONE]\n\n"
STREAM: Final = sse("Hello", " world")


def aiohttp_fails(reason: str) -> list[Any]:
    """`KINDS`, aiohttp marked as failing strictly for `reason` (a divergence left in place)."""
    mark = pytest.mark.xfail(strict=True, reason=reason)
    return [pytest.param(kind, marks=mark) if kind == "aiohttp" else kind for kind in KINDS]


# --- framing: lengths, chunks, close-delimited bodies ---------------------------------------


@transports
def test_a_sized_body_is_read_whole(kind: str) -> None:
    """A plain Content-Length stream gives its text."""
    assert ok("Hello world") == run(kind, sized(STREAM))


@transports
def test_chunk_extensions_and_trailers_are_ignored(kind: str) -> None:
    """Chunk extensions (`2a;ext=1`) and trailer fields after the last chunk change nothing."""
    body = chunked(STREAM[:50], STREAM[50:], extension=b";ext=1", trailer=b"X-Trailer: v\r\n")
    assert ok("Hello world") == run(kind, [head("200 OK", "Transfer-Encoding: chunked") + body])


@transports
@pytest.mark.parametrize(
    ("version", "header"), [("HTTP/1.1", "Connection: close"), ("HTTP/1.0", "X-Old: 1")]
)
def test_a_close_delimited_body_is_read_to_the_close(kind: str, version: str, header: str) -> None:
    """A body with neither length nor chunks (HTTP/1.0, or `Connection: close`) ends at the
    server's close."""
    assert ok("Hello world") == run(kind, [head("200 OK", header, version=version) + STREAM])


@transports
def test_an_interim_100_continue_is_skipped(kind: str) -> None:
    """A `100 Continue` before the real head is not the answer."""
    script = [b"HTTP/1.1 100 Continue\r\n\r\n" + sized(STREAM)[0]]
    assert ok("Hello world") == run(kind, script)


@transports
def test_a_content_length_longer_than_the_body_ends_at_done(kind: str) -> None:
    """A Content-Length past the body: after `[DONE]` the answer is complete, whether the server
    then closes or keeps the connection open (`AFTER_DONE`, docs/timeouts.md)."""
    script = head("200 OK", f"Content-Length: {len(STREAM) + 20}") + STREAM
    assert (ok("Hello world"), ok("Hello world")) == (
        run(kind, [script]),
        run(kind, [script, Act.HOLD]),
    )


ALL_BUT_AIOHTTP_ON_ONE_PACKET: Final = aiohttp_fails(
    "aiohttp parses the bytes that came with the head before handing the response over, and "
    "fails the whole response on bad framing in them: the text before it is lost "
    "(APIConnectionError at send); nothing an adapter can reach"
)


@pytest.mark.parametrize("kind", ALL_BUT_AIOHTTP_ON_ONE_PACKET)
def test_a_content_length_shorter_than_the_body_cuts_it(kind: str) -> None:
    """A Content-Length 20 bytes short of the body (sent in one write) ends it there: inside the
    finish event, so the text is kept and the stream is reported cut."""
    script = [head("200 OK", f"Content-Length: {len(STREAM) - 20}") + STREAM]
    outcome = run(kind, script)
    assert ("Hello world", "Hello world", "StreamInterruptedError") == (
        outcome.shown,
        outcome.text,
        outcome.error,
    )


@pytest.mark.parametrize("kind", ALL_BUT_AIOHTTP_ON_ONE_PACKET)
def test_an_invalid_chunk_size_after_content_keeps_the_text(kind: str) -> None:
    """A chunk header that is not hex, in the same write as the head: the text before it is
    kept and the stream is reported as broken."""
    body = chunked(FIRST + event(chunk("Hel")))[:-5] + b"zz\r\nfoo\r\n"
    outcome = run(kind, [head("200 OK", "Transfer-Encoding: chunked") + body])
    assert ("Hel", "Hel", "StreamInterruptedError") == (outcome.shown, outcome.text, outcome.error)
    assert "the connection broke after 2 chunks" in outcome.message


@pytest.mark.parametrize(
    "kind",
    aiohttp_fails(
        "aiohttp 3.14 leaves the body waiting when a chunk header it cannot parse "
        "arrives after the head (the error goes to the connection, not the payload): the "
        "read hangs until `idle`, then IdleTimeoutError"
    ),
)
def test_an_invalid_chunk_size_arriving_later_breaks_the_stream_at_once(kind: str) -> None:
    """A chunk header that is not hex, in a later write: the stream breaks there, with its text,
    without waiting for a timeout."""
    body = chunked(FIRST + event(chunk("Hel")))[:-5]
    script = [head("200 OK", "Transfer-Encoding: chunked") + body, 0.05, b"zz\r\nfoo\r\n"]
    outcome = run(kind, script, timeout=Timeouts(connect=2, ttft=2, idle=0.5))
    assert ("Hel", "Hel", "StreamInterruptedError") == (outcome.shown, outcome.text, outcome.error)


@transports
def test_a_chunked_body_closed_without_its_last_chunk_is_broken(kind: str) -> None:
    """The server closes a chunked body before `0\\r\\n\\r\\n`: the text is kept, the stream is
    reported as broken."""
    body = chunked(FIRST + event(chunk("Hel")))[:-5]
    outcome = run(kind, [head("200 OK", "Transfer-Encoding: chunked") + body])
    assert ("Hel", "Hel", "StreamInterruptedError") == (outcome.shown, outcome.text, outcome.error)
    assert "the connection broke after 2 chunks" in outcome.message


@pytest.mark.parametrize(
    "kind",
    aiohttp_fails(
        "aiohttp refuses a response with both Transfer-Encoding and "
        "Content-Length (RFC 9112 section 6.3 lets a client either take the chunks or "
        "refuse it); requests and httpx take the chunks"
    ),
)
def test_transfer_encoding_wins_over_content_length(kind: str) -> None:
    """A head with both Transfer-Encoding: chunked and a (wrong) Content-Length is read as
    chunks (RFC 9112 section 6.3)."""
    script = [head("200 OK", "Content-Length: 5", "Transfer-Encoding: chunked") + chunked(STREAM)]
    assert ok("Hello world") == run(kind, script)


# --- content encodings ----------------------------------------------------------------------


@transports
@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
    ids=["gzip", "deflate"],
)
def test_a_compressed_stream_is_decoded(kind: str, encoding: str, compress: Any) -> None:
    """A proxy that compresses the stream although we asked for `identity`: every transport
    decodes it, as `requests` does (httpx and aiohttp handed the compressed bytes over, read as
    a stream that never sent an event)."""
    script = sized(compress(STREAM), f"Content-Encoding: {encoding}")
    assert ok("Hello world") == run(kind, script)


@transports
def test_a_gzip_stream_in_chunks_is_decoded_as_it_comes(kind: str) -> None:
    """A gzip stream flushed event by event, in chunks with pauses, gives its text."""
    packer = zlib.compressobj(wbits=31)
    pieces = [packer.compress(FIRST) + packer.flush(zlib.Z_SYNC_FLUSH)]
    pieces += [packer.compress(event(chunk("Hel"))) + packer.flush(zlib.Z_SYNC_FLUSH)]
    pieces += [packer.compress(event(chunk("lo")) + FINISH + DONE) + packer.flush()]
    script: list[Step] = [head("200 OK", "Transfer-Encoding: chunked", "Content-Encoding: gzip")]
    for piece in pieces:
        script += [b"%x\r\n%s\r\n" % (len(piece), piece), 0.02]
    script.append(b"0\r\n\r\n")
    assert ok("Hello") == run(kind, script)


@transports
def test_a_corrupt_gzip_stream_is_a_broken_stream(kind: str) -> None:
    """Bytes that claim gzip but are not: every transport says the body could not be decoded,
    as the connection breaking before any content."""
    script = sized(b"\x1f\x8b\x08\x00garbage, not gzip at all", "Content-Encoding: gzip")
    outcome = run(kind, script)
    assert ("", "", "IncompleteStreamError") == (outcome.shown, outcome.text, outcome.error)
    assert "the connection broke after 0 chunks" in outcome.message


@transports
def test_a_compressed_error_body_is_quoted_decoded(kind: str) -> None:
    """A 401 whose JSON body came gzipped: the message quotes the server's words, not bytes."""
    body = json.dumps({"error": {"message": "bad key", "type": "auth"}}).encode()
    script = sized(
        gzip.compress(body),
        "Content-Encoding: gzip",
        status="401 Unauthorized",
        content_type="application/json",
    )
    outcome = run(kind, script)
    assert "AuthenticationError" == outcome.error
    assert outcome.message.endswith(": bad key (status=401, request_id=req-hostile-7)")


@transports
def test_an_encoding_nobody_decodes_is_named(kind: str) -> None:
    """A body in an encoding the transport cannot decode: a RemoteProtocolError naming it."""
    outcome = run(kind, sized(b"\x8b\x03\x80 not decodable", "Content-Encoding: br"))
    assert ("RemoteProtocolError", True) == (
        outcome.error,
        "Content-Encoding 'br'" in outcome.message,
    )


@transports
def test_an_error_status_in_an_encoding_nobody_decodes_keeps_its_status(kind: str) -> None:
    """A 429 whose body is in `br`: still a RateLimitError with its Retry-After (aiohttp's
    own decoding made it a connection error, retried, without its status)."""
    script = sized(b"\x8b\x03\x80", "Content-Encoding: br", "Retry-After: 7", status="429 Busy")
    outcome = run(kind, script)
    assert ("RateLimitError", 7.0) == (outcome.error, outcome.exc.retry_after)


@transports
def test_a_gzip_body_of_several_members_is_read_whole(kind: str) -> None:
    """RFC 1952 lets a gzip body hold several members one after another: all are read (only
    the first was, on the httpx transports)."""
    half = len(STREAM) // 2
    body = gzip.compress(STREAM[:half]) + gzip.compress(STREAM[half:])
    assert ok("Hello world") == run(kind, sized(body, "Content-Encoding: gzip"))


@transports
def test_trailing_bytes_after_a_gzip_body_are_ignored(kind: str) -> None:
    """What follows the last gzip member, if it is not gzip, is ignored, as urllib3 does."""
    body = gzip.compress(STREAM) + b"\r\n\x00 junk"
    outcome = run(kind, sized(body, "Content-Encoding: gzip"))
    # aiohttp's decoder is not used (the transport decodes), so all five agree.
    assert ok("Hello world") == outcome


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b"data: " + b"a" * (40 * 1024 * 1024), compresslevel=9)


@transports
def test_a_gzip_bomb_meets_the_event_size_limit_in_pieces(kind: str) -> None:
    """A small body that expands without end: the decoder's size limit stops it, and no
    transport expands more than a piece past it (httpx's expanded a whole read at once)."""
    outcome = run(kind, sized(_bomb(), "Content-Encoding: gzip"))
    received = re.search(r"max_line_size \(16777216 bytes\): (\d+) bytes received", outcome.message)
    assert ("RemoteProtocolError", True) == (outcome.error, received is not None)
    assert received is not None
    assert int(received.group(1)) <= 16 * 1024 * 1024 + 128 * 1024  # 67 MB on httpx before


# --- SSE framing over the wire --------------------------------------------------------------


@transports
@pytest.mark.parametrize(
    "body",
    [
        STREAM.replace(b"\n", b"\r\n"),
        STREAM.replace(b"\n", b"\r"),
        event(chunk(role=True), sep=b"\r\n")
        + event(chunk("Hello"), sep=b"\r")
        + event(chunk(" world"))
        + event(chunk(finish="stop"), sep=b"\r")
        + b"data: [DONE]\r\n\r\n",
        b"\xef\xbb\xbf" + STREAM,
        b"".join(event(chunk(t), space=b"") for t in ("Hello", " world"))
        + event(chunk(finish="stop"), space=b"")
        + b"data:[DONE]\n\n",
        b": hi\n\nevent: ping\ndata: {}\n\n" + STREAM.replace(DONE, b": bye\n\n" + DONE),
    ],
    ids=["crlf", "bare-cr", "mixed", "bom", "no-space", "comments-and-other-events"],
)
def test_line_endings_bom_and_spacing(kind: str, body: bytes) -> None:
    """CRLF, bare CR, mixed endings, a UTF-8 BOM, `data:` without its space, comments and
    other event types: the same text (docs/decoder.md)."""
    assert ok("Hello world") == run(kind, sized(body))


@transports
def test_multi_line_data_is_joined(kind: str) -> None:
    """An event whose JSON spans several `data:` lines is one event (lines joined with \\n)."""
    pretty = json.dumps(chunk("Hello"), indent=1).encode()
    multi = b"".join(b"data: " + line + b"\n" for line in pretty.split(b"\n")) + b"\n"
    assert ok("Hello") == run(kind, sized(FIRST + multi + FINISH + DONE))


@transports
def test_a_utf8_character_split_across_writes_is_whole(kind: str) -> None:
    """A three-byte character cut in the middle by the server's writes (and by chunks)."""
    text = "h\u00e9\u20ac\U0001f411"
    one = event(chunk(text))
    cut = len(FIRST) + one.index("\u20ac".encode()) + 1
    body = FIRST + one + FINISH + DONE
    chunks = [head("200 OK", "Transfer-Encoding: chunked") + chunked(body[:cut])[:-5], 0.05]
    plain = [head("200 OK") + body[:cut], 0.05, body[cut:]]
    assert (ok(text), ok(text)) == (
        run(kind, [*chunks, chunked(body[cut:])]),
        run(kind, plain),
    )


@transports
def test_invalid_utf8_becomes_replacement_characters(kind: str) -> None:
    """Bytes that are not UTF-8 become U+FFFD, as the standard's decoder does."""
    bad = event(chunk("ab")).replace(b"ab", b"a\xff\xfeb")
    assert ok("a\ufffd\ufffdb") == run(kind, sized(FIRST + bad + FINISH + DONE))


@transports
def test_a_five_megabyte_event_passes(kind: str) -> None:
    """One 5 MiB event, well inside the 16 MiB limits, arrives whole."""
    big = "x" * (5 * 1024 * 1024)
    outcome = run(kind, sized(FIRST + event(chunk(big)) + FINISH + DONE))
    assert (len(big), len(big), None) == (
        len(outcome.shown),
        len(outcome.text or ""),
        outcome.error,
    )


@transports
def test_a_line_over_the_limit_names_it_and_keeps_the_text(kind: str) -> None:
    """A 17 MiB line without an ending: RemoteProtocolError naming `max_line_size`, with the
    text before it kept."""
    huge = b"data: " + b"x" * (17 * 1024 * 1024) + b"\n\n"
    outcome = run(kind, sized(FIRST + event(chunk("A")) + huge + FINISH + DONE))
    assert ("A", "A", "RemoteProtocolError") == (outcome.shown, outcome.text, outcome.error)
    assert outcome.message.startswith("SSE line exceeds max_line_size (16777216 bytes): ")


@transports
def test_an_event_over_the_limit_names_it(kind: str) -> None:
    """Five 4 MiB `data:` lines make one 20 MiB event: RemoteProtocolError naming
    `max_event_size`."""
    line = b"data: " + b"x" * (4 * 1024 * 1024) + b"\n"
    outcome = run(kind, sized(FIRST + event(chunk("A")) + line * 5 + b"\n" + FINISH + DONE))
    assert ("A", "A", "RemoteProtocolError") == (outcome.shown, outcome.text, outcome.error)
    assert outcome.message.startswith("SSE event exceeds max_event_size (16777216): ")


# --- heads: content types and statuses ------------------------------------------------------


@transports
@pytest.mark.parametrize(
    "content_type", ["text/event-stream; charset=utf-8", "Text/Event-Stream", "TEXT/EVENT-STREAM"]
)
def test_event_stream_parameters_and_casing_are_accepted(kind: str, content_type: str) -> None:
    """A charset parameter or odd casing of the media type is still an event stream."""
    assert ok("Hello world") == run(kind, sized(STREAM, content_type=content_type))


@transports
def test_odd_casing_of_the_header_name_is_accepted(kind: str) -> None:
    """`cOnTeNt-TyPe` is Content-Type."""
    script = head("200 OK", f"Content-Length: {len(STREAM)}", "cOnTeNt-TyPe: text/event-stream")
    assert ok("Hello world") == run(kind, [script.replace(b"Content-Type", b"X-Was") + STREAM])


@transports
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"choices": [{"message": {"content": "hi"}}]}'),
        ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    ],
    ids=["json", "html"],
)
def test_a_200_that_is_not_a_stream_is_quoted(kind: str, content_type: str, body: bytes) -> None:
    """A 200 with a JSON or HTML body: UnexpectedContentTypeError quoting it, with the status
    and the server's request id."""
    outcome = run(kind, sized(body, content_type=content_type))
    assert (
        "UnexpectedContentTypeError",
        f"expected an event stream (text/event-stream) but the server sent {content_type!r}; "
        f"the body starts: {body.decode()!r} (status=200, request_id={REQUEST_ID})",
    ) == (outcome.error, outcome.message)


@transports
def test_a_204_is_not_a_stream(kind: str) -> None:
    """A 204 No Content: UnexpectedContentTypeError, status 204."""
    outcome = run(kind, [head("204 No Content", content_type=None)])
    assert ("UnexpectedContentTypeError", 204) == (outcome.error, outcome.exc.status_code)


@transports
def test_a_redirect_is_not_followed(kind: str) -> None:
    """A 302 is not followed (the API key would go along): APIStatusError with its status."""
    script = head("302 Found", "Location: http://127.0.0.1:9/x", "Content-Length: 0")
    outcome = run(kind, [script])
    assert ("APIStatusError", "HTTP 302 from ") == (outcome.error, outcome.message[:14])
    assert outcome.message.endswith(": (empty body) (status=302, request_id=req-hostile-7)")


ERROR_BODY: Final = json.dumps(
    {"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}
).encode()


@transports
@pytest.mark.parametrize(
    ("status", "body", "content_type", "error", "said"),
    [
        ("401 Unauthorized", ERROR_BODY, "application/json", "AuthenticationError", "bad key"),
        ("500 Internal Server Error", b"upstream exploded", "text/plain", "InternalServerError",
         "upstream exploded"),
        ("503 Service Unavailable", b"", None, "InternalServerError", "(empty body)"),
        ("429 Too Many Requests", b'{"error": "slow down"}', "application/json",
         "RateLimitError", "slow down"),
    ],
    ids=["401-json", "500-text", "503-empty", "429-string-error"],
)  # fmt: skip
def test_an_error_status_says_status_message_and_request_id(
    kind: str, status: str, body: bytes, content_type: str | None, error: str, said: str
) -> None:
    """An error status: its error class, with the status, the server's message (from JSON,
    else the body's text, else "(empty body)") and the server's request id."""
    outcome = run(kind, sized(body, status=status, content_type=content_type))
    code = status.split()[0]
    assert (error, f": {said} (status={code}, request_id={REQUEST_ID})") == (
        outcome.error,
        outcome.message[outcome.message.index(": ") :],
    )


@transports
def test_an_error_body_ended_by_the_close_is_read(kind: str) -> None:
    """A 503 whose body has no length and ends at the close is quoted whole."""
    script = [head("503 Service Unavailable", "Connection: close", content_type="text/plain")]
    outcome = run(kind, [script[0] + b"try later"])
    assert ("InternalServerError", "try later") == (outcome.error, outcome.exc.body)


@transports
def test_a_request_id_header_without_x_is_the_request_id(kind: str) -> None:
    """`request-id` (no `x-`) is the server's request id too."""
    script = head("500 Internal Server Error", "request-id: rid-2", "Content-Length: 2")
    script = script.replace(f"X-Request-ID: {REQUEST_ID}\r\n".encode(), b"")
    outcome = run(kind, [script + b"{}"])
    assert ("InternalServerError", "rid-2") == (outcome.error, outcome.exc.request_id)


@transports
def test_retry_after_in_seconds_is_on_the_error(kind: str) -> None:
    """`Retry-After: 7` on a 429 gives `retry_after` 7.0."""
    outcome = run(kind, sized(ERROR_BODY, "Retry-After: 7", status="429 Too Many Requests"))
    assert ("RateLimitError", 7.0) == (outcome.error, outcome.exc.retry_after)


@transports
def test_retry_after_as_a_date_is_on_the_error(kind: str) -> None:
    """`Retry-After` as an HTTP date 30 s ahead gives `retry_after` of about 30 (RFC 9110)."""
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    outcome = run(kind, sized(ERROR_BODY, f"Retry-After: {date}", status="429 Too Many Requests"))
    assert ("RateLimitError", True) == (
        outcome.error,
        25 <= (outcome.exc.retry_after or 0) <= 30,
    )


@transports
def test_a_retried_503_then_the_stream(kind: str) -> None:
    """A 503 with `Retry-After: 0` is retried on the same server and the stream then read.

    The 503 says `Connection: close`, as the server then closes: without it a client may send
    the retry on the pooled connection while the server's FIN is on its way (a race every HTTP
    client has, httpx's lost it now and then here)."""
    fast = RetryPolicy(attempts=2, wait_initial=0.01, wait_jitter=0)
    busy = sized(b"busy", "Retry-After: 0", "Connection: close", status="503 Service Unavailable")
    with Hostile(busy, sized(STREAM)) as server:
        outcome = drive(kind, server.base_url, retry=fast)
        assert (ok("Hello world"), 2) == (outcome, len(server.requests))


@transports
def test_the_request_asks_for_identity(kind: str) -> None:
    """Every transport sends `Accept-Encoding: identity` (no compression asked for)."""
    with Hostile(sized(STREAM)) as server:
        drive(kind, server.base_url)
        assert [b"identity"] == [
            line.split(b":", 1)[1].strip()
            for line in server.requests[0].split(b"\r\n")
            if line.lower().startswith(b"accept-encoding:")
        ]


# --- what the server says in the stream -----------------------------------------------------


@transports
@pytest.mark.parametrize(
    ("error", "message"),
    [
        ({"message": "model overloaded", "type": "server_error", "code": "overloaded"},
         "model overloaded (type=server_error, code=overloaded, "),
        ({"message": "filtered", "type": "invalid_request_error", "code": "content_filter"},
         "filtered (type=invalid_request_error, code=content_filter, "),
    ],
    ids=["retryable", "final"],
)  # fmt: skip
def test_an_in_band_error_keeps_the_text(kind: str, error: dict[str, str], message: str) -> None:
    """`data: {"error": ...}` after content: StreamError with the server's message, type and
    code, and the text before it (`on_interrupt` "raise")."""
    outcome = run(kind, [head() + FIRST + event(chunk("Hel")) + event({"error": error})])
    assert ("Hel", "Hel", "StreamError") == (outcome.shown, outcome.text, outcome.error)
    assert outcome.message.startswith(f"the server reported an error in the stream: {message}")
    assert f"request_id={REQUEST_ID}) [partial completion kept: 3 chars]" in outcome.message


@transports
def test_an_anthropic_error_event_keeps_the_text(kind: str) -> None:
    """`event: error` (Anthropic's form) after content: StreamError with the text before it."""
    error = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
    error += b'"message": "Overloaded"}}\n\n'
    outcome = run(kind, [head() + FIRST + event(chunk("Hel")) + error])
    assert ("Hel", "Hel", "StreamError") == (outcome.shown, outcome.text, outcome.error)


@transports
@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (b"data: {nope\n\n", "invalid JSON in stream event: "),
        (b"data: [1, 2]\n\n", "expected a JSON object in stream event, got '[1, 2]'"),
    ],
    ids=["invalid-json", "not-an-object"],
)
def test_bad_json_keeps_the_text(kind: str, bad: bytes, said: str) -> None:
    """Invalid JSON, or JSON that is not an object, after content: RemoteProtocolError quoting
    it, with the text before it."""
    outcome = run(kind, [head() + FIRST + event(chunk("Hel")) + bad])
    assert ("Hel", "Hel", "RemoteProtocolError", True) == (
        outcome.shown,
        outcome.text,
        outcome.error,
        outcome.message.startswith(said),
    )


@transports
@pytest.mark.parametrize(
    "after",
    [
        event({"error": {"message": "late", "type": "server_error"}}),
        b"data: {nope\n\n",
        b"",
    ],
    ids=["in-band-error", "invalid-json", "reset"],
)
def test_nothing_after_done_fails_the_answer(kind: str, after: bytes) -> None:
    """An error after `[DONE]` (in-band, invalid JSON, a reset) does not fail a complete
    answer (docs/timeouts.md)."""
    script: list[Step] = [head() + FIRST + event(chunk("Hi")) + FINISH + DONE, 0.05]
    script += [after] if after else [Act.RESET]
    assert ok("Hi") == run(kind, script)


@transports
def test_content_after_done_is_not_part_of_the_answer(kind: str) -> None:
    """Events after `[DONE]` are not part of the answer."""
    script = [head() + FIRST + event(chunk("Hi")) + FINISH + DONE, 0.05, event(chunk(" extra"))]
    assert ok("Hi") == run(kind, script)


@transports
def test_a_finish_without_done_is_a_whole_answer(kind: str) -> None:
    """A finish_reason and a clean close without `[DONE]` is a complete answer."""
    assert ok("Hi") == run(kind, [head() + FIRST + event(chunk("Hi")) + FINISH])


@transports
def test_a_close_without_finish_or_done_keeps_the_text(kind: str) -> None:
    """A clean close before any finish_reason: StreamInterruptedError with the text."""
    outcome = run(kind, [head() + FIRST + event(chunk("Hi"))])
    assert ("Hi", "Hi", "StreamInterruptedError") == (outcome.shown, outcome.text, outcome.error)
    assert "stream ended without [DONE] and without a finish_reason" in outcome.message


@transports
def test_comments_only_is_an_incomplete_stream(kind: str) -> None:
    """A stream of keep-alive comments and nothing else: IncompleteStreamError, nothing kept."""
    outcome = run(kind, sized(b": hi\n\n: there\n\n"))
    assert ("", "", "IncompleteStreamError") == (outcome.shown, outcome.text, outcome.error)


# --- resets and stalls ----------------------------------------------------------------------


@transports
@pytest.mark.parametrize("framing", ["chunked", "close-delimited"])
def test_a_reset_mid_event_keeps_the_text(kind: str, framing: str) -> None:
    """A TCP RST (SO_LINGER 0) in the middle of an event: StreamInterruptedError with the text
    delivered before it, never more, never twice."""
    partial = FIRST + event(chunk("Hel")) + b'data: {"id'
    if framing == "chunked":
        sent = head("200 OK", "Transfer-Encoding: chunked") + chunked(partial)[:-5]
        sent += b"40\r\ndata: {"
    else:
        sent = head() + partial
    outcome = run(kind, [sent, 0.05, Act.RESET])
    assert ("Hel", "Hel", "StreamInterruptedError") == (outcome.shown, outcome.text, outcome.error)


@pytest.mark.parametrize(
    "kind",
    aiohttp_fails(
        "aiohttp ends a close-delimited body at a reset as at a clean close "
        "(its parser's feed_eof), so the message says 'the connection closed in the "
        "middle of an event' rather than naming the reset"
    ),
)
def test_a_reset_of_a_close_delimited_body_is_named(kind: str) -> None:
    """A reset that ends a close-delimited body is reported as the connection breaking."""
    sent = head() + FIRST + event(chunk("Hel")) + b'data: {"id'
    outcome = run(kind, [sent, 0.05, Act.RESET])
    assert "the connection broke after" in outcome.message


@transports
def test_a_reset_before_the_head_is_a_connection_error(kind: str) -> None:
    """A reset, a clean close, or bytes that are not HTTP before any head: APIConnectionError
    saying "could not reach"."""
    outcomes = [run(kind, [Act.RESET]), run(kind, []), run(kind, [b"SSH-2.0-OpenSSH\r\n\r\n"])]
    assert [("APIConnectionError", "could not reach http://127.0.0.1:")] * 3 == [
        (outcome.error, outcome.message[:33]) for outcome in outcomes
    ]


@transports
def test_no_error_message_carries_the_api_key(kind: str) -> None:
    """A response aiohttp cannot parse put its request headers, the API key among them, into
    the error message (the repr of `ClientResponseError`)."""
    with Hostile([b"SSH-2.0-OpenSSH\r\n\r\n"]) as server:
        outcome = drive(kind, server.base_url, api_key="sk-SECRET-42")
    assert ("APIConnectionError", False) == (outcome.error, "SECRET" in outcome.message)


@transports
def test_a_stall_mid_event_fires_idle_with_the_text(kind: str) -> None:
    """The server stops in the middle of an event and keeps the connection open: the idle
    timeout fires, with the text and the request id."""
    script = [head() + FIRST + event(chunk("Hel")) + b'data: {"id', Act.HOLD]
    outcome = run(kind, script, timeout=Timeouts(connect=2, ttft=2, idle=0.3))
    assert ("Hel", "Hel", "IdleTimeoutError") == (outcome.shown, outcome.text, outcome.error)
    assert outcome.message.startswith("idle timeout: no new content within 0.3 s")
    assert f"request_id={REQUEST_ID}) [partial completion kept: 3 chars]" in outcome.message


@transports
def test_keep_alive_comments_do_not_hold_off_idle(kind: str) -> None:
    """Keep-alive comments every 0.1 s after the content do not count: idle (0.3 s) fires on
    time. On trio a comment read just past the deadline started the clocks again, as if the
    caller had been busy, so comments on the deadline's beat kept a stalled stream open."""
    pings: list[Step] = []
    for _ in range(15):
        pings += [0.1, b": ping\n\n"]
    script = [head() + FIRST + event(chunk("Hel")), *pings, Act.HOLD]
    started = time.monotonic()
    outcome = run(kind, script, timeout=Timeouts(connect=2, ttft=2, idle=0.3))
    assert ("Hel", "IdleTimeoutError", True) == (
        outcome.shown,
        outcome.error,
        time.monotonic() - started < 1.0,
    )


@transports
def test_a_stall_after_the_head_fires_ttft(kind: str) -> None:
    """A head and then nothing: FirstTokenTimeoutError, status 200, no completion."""
    outcome = run(kind, [head(), Act.HOLD], timeout=Timeouts(connect=2, ttft=0.3, idle=2))
    assert (None, "FirstTokenTimeoutError", 200) == (
        outcome.text,
        outcome.error,
        outcome.exc.status_code,
    )


@transports
def test_a_stall_inside_the_head_fires_connect(kind: str) -> None:
    """Half a head and then nothing: ConnectTimeoutError (`connect` bounds the head)."""
    script = [b"HTTP/1.1 200 OK\r\nContent-Type: text/ev", Act.HOLD]
    outcome = run(kind, script, timeout=Timeouts(connect=0.3, ttft=2, idle=2))
    assert "ConnectTimeoutError" == outcome.error


@transports
def test_a_finish_then_a_stall_is_a_whole_answer(kind: str) -> None:
    """A finish_reason, then silence without `[DONE]`: when idle runs out the answer is
    complete (docs/timeouts.md)."""
    script = [head() + FIRST + event(chunk("Hi")) + FINISH, Act.HOLD]
    assert ok("Hi") == run(kind, script, timeout=Timeouts(connect=2, ttft=2, idle=0.3))
