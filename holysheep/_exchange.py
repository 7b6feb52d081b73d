"""One streamed chat request, from the request bytes to the last chunk, without any I/O.

Theory of operation
-------------------
The sync and async clients differ only in how they wait; everything they decide is here, so it
is written once and tested without sockets. An `Exchange` is driven through four calls, each
given the time (`now`, seconds on the driver's monotonic clock; the core never reads a clock):

    request            the `Request` to send (URL, headers, JSON body)
    start(now)         the request is about to go out: the timeouts start counting
    on_headers(...)    the status line and headers arrived: stream on, or read an error body
    on_data(bytes, now) -> chunks    body bytes in, `ChatChunk`s out
    on_eof(now)        the body ended: raises `IncompleteStreamError` if it was cut short

At any moment `deadline()` says when the next timeout would fire and which one; a driver waits
no longer than that, and when it passes it asks `timeout_error(now)` for the typed error. Only
chunks that carry deltas (content, reasoning, tool calls, finish, usage) count as progress for
the `ttft` and `idle` timeouts: a keep-alive comment proves the connection is up, not that the
model is producing anything.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any, Literal, final

import attrs

try:
    from orjson import dumps as _orjson_dumps
except ImportError:  # pragma: no cover - depends on the environment
    _orjson_dumps = None  # type: ignore[assignment]

from . import _chat
from ._chat import ChatAccumulator, ChatChunk, Completion
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectError,
    ConnectTimeoutError,
    FirstTokenTimeoutError,
    HolySheepError,
    IdleTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    LocalProtocolError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RemoteProtocolError,
    TotalTimeoutError,
    UnexpectedContentTypeError,
    UnprocessableEntityError,
)
from ._pricing import estimate_tokens
from ._sse import ServerSentEvent
from ._validate import positive_or_none
from ._version import __version__

if TYPE_CHECKING:
    from ._call import Attempt, Call

__all__ = ["Exchange", "Request", "StreamStats", "Timeouts", "parse_retry_after"]

# An error body is read only to quote the server's message; 64 KiB holds any real one.
MAX_ERROR_BODY = 64 * 1024
# Shared by every exchange that does not track event ids (an empty frozenset is not a
# singleton: each `frozenset()` costs 216 bytes, which adds up over 10,000 streams).
_NO_IDS: frozenset[str] = frozenset()
# How much of an unexpected body (a proxy's HTML page) an error message quotes.
_BODY_SNIPPET = 300

TimeoutKind = Literal["connect", "ttft", "idle", "total"]
#: A deadline's kind: a timeout's, or "done": `[DONE]` came and the body has not ended since.
DeadlineKind = Literal["connect", "ttft", "idle", "total", "done"]

#: How long the end of the body may take after `[DONE]`; a server that keeps the connection
#: open longer (keep-alives after the end) is closed on, and the stream ends normally.
AFTER_DONE = 1.0

_TIMEOUT_ERRORS: dict[str, type[APITimeoutError]] = {
    "connect": ConnectTimeoutError,
    "ttft": FirstTokenTimeoutError,
    "idle": IdleTimeoutError,
    "total": TotalTimeoutError,
}

# The timeouts that end a stream which stalled (see `Exchange.complete_at_break`): not
# `connect`, which comes before any body.
_STALLS = FirstTokenTimeoutError | IdleTimeoutError | TotalTimeoutError

_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


_check_limit = positive_or_none("Timeouts", " of seconds")


@final
@attrs.frozen
class Timeouts:
    """The four limits on one streamed request, in seconds; None disables one.

    The defaults never let a stalled stream hang a caller, while leaving room for slow models:
    `connect` 10 s covers a cold TLS handshake across the world with retransmits; `ttft` 120 s
    lets a reasoning model with a long prompt think before its first token; `idle` 60 s is far
    above any real gap between tokens yet catches a stall within a minute; `total` 30 min lets
    a 32k-token answer finish at 20 tokens/s.
    """

    connect: float | None = attrs.field(default=10.0, validator=_check_limit)
    ttft: float | None = attrs.field(default=120.0, validator=_check_limit)
    idle: float | None = attrs.field(default=60.0, validator=_check_limit)
    total: float | None = attrs.field(default=1800.0, validator=_check_limit)

    @classmethod
    def from_value(cls, value: Timeouts | float | None) -> Timeouts:
        """Accept a `Timeouts`, a number (applied to `connect`, `ttft` and `idle`), or None."""
        if value is None:
            return cls()
        if isinstance(value, Timeouts):
            return value
        return cls(connect=value, ttft=value, idle=value)

    def head_timeout(self) -> float | None:
        """How long a transport may wait for the response head: `connect` covers it, and the
        first-token and total clocks run too (`Exchange.deadline` before the head).

        The sync client's watchdog cannot cut a send short, so this is what enforces it there.
        """
        limits = [t for t in (self.connect, self.ttft, self.total) if t is not None]
        return min(limits) + 0.05 if limits else None

    def read_backstop(self) -> float | None:
        """A socket read timeout for transports: a last line of defence, never the first.

        The drivers enforce `ttft`/`idle`/`total` themselves; this only makes sure a transport
        cannot block forever if a driver's timer fails to fire.
        """
        limits = [t for t in (self.ttft, self.idle, self.total) if t is not None]
        return max(limits) + 5.0 if limits else None


@final
@attrs.frozen
class Request:
    """What a transport sends: everything is already encoded."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    content: bytes
    timeouts: Timeouts = Timeouts()

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@final
@attrs.frozen
class StreamStats:
    """What one stream measured. Times are in seconds; None where not (yet) known.

    `ttft` runs from sending the request to the first chunk with a delta; `tokens_per_s` is
    output tokens over `generating`, the time from that first chunk to the last, the figure
    gateways quote (not to the end of the body: a server may hold it open after `[DONE]`).
    After retries, the figures cover every attempt: times run from the first send, and
    `events` and `bytes` add up over the attempts.
    """

    request_id: str
    server_request_id: str | None
    status_code: int | None
    ttft: float | None
    duration: float | None
    events: int
    bytes: int
    tokens: int
    tokens_estimated: bool
    attempts: int = 1
    #: One `Attempt` per failed attempt: the error, the decision and the wait.
    retries: tuple[Attempt, ...] = ()
    #: Seconds spent waiting for the rate limiter.
    queued: float = 0.0
    #: Seconds from the first chunk with a delta to the last (None before the first).
    generating: float | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """None until two reads brought chunks: an answer read in one piece has no rate."""
        if self.tokens == 0:
            return None
        generating = self.generating
        if generating is None:  # stats made without it: from the first token to the end
            if self.ttft is None or self.duration is None:
                return None
            generating = self.duration - self.ttft
        return self.tokens / generating if generating > 0 else None

    def summary(self) -> str:
        """One line for a terminal: the numbers people compare gateways by."""
        ttft = "-" if self.ttft is None else f"{self.ttft * 1000:.0f} ms"
        duration = "-" if self.duration is None else f"{self.duration:.2f} s"
        rate = self.tokens_per_s
        tokens = f"{'~' if self.tokens_estimated else ''}{self.tokens}"
        return (
            f"ttft {ttft} | {tokens} tokens in {duration}"
            f" | {'-' if rate is None else f'{rate:.1f}'} tokens/s"
            f" | {self.events} events, {self.bytes} bytes | attempts {self.attempts}"
            f" | request {self.server_request_id or self.request_id}"
        )


#: Header mappings that answer any spelling of a name with `str` values (`httpx.Headers`,
#: aiohttp's): handed over as they are, with no copy per open stream. The built-in transports
#: add theirs; any other class is probed once (see `_readable`).
CASELESS_HEADERS: set[type] = set()
# Classes probed and found to need a copy (case-sensitive, or values that are not `str`).
_COPIED_HEADERS: set[type] = set()


def _readable(headers: Any) -> Mapping[str, str]:
    """A transport's response headers as the clients read them: by lower-case name.

    The rule is a mapping that answers lower-case names. A plain dict that keeps it is taken
    as it is; one with the server's spelling is copied. Another class is probed once: if it
    answers a name in any case with the same `str` (urllib3's and requests' headers,
    `http.client`'s message), it is taken as it is from then on, as httpx's are; if not, it is
    copied each time (see `_header_map`).
    """
    cls = headers.__class__
    if cls is dict:
        return headers if _plain(headers) else _header_map(headers)
    if cls not in _COPIED_HEADERS:
        if _caseless(headers):
            CASELESS_HEADERS.add(cls)
            return headers  # type: ignore[no-any-return]
        _COPIED_HEADERS.add(cls)
    return _header_map(headers)


def _caseless(headers: Any) -> bool:
    get, items = getattr(headers, "get", None), getattr(headers, "items", None)
    if not callable(get) or not callable(items):
        return False
    try:
        pairs = list(items())
        if not pairs or not all(
            isinstance(pair, tuple)
            and len(pair) == 2
            and pair[0].__class__ is str
            and pair[1].__class__ is str
            for pair in pairs
        ):
            return False  # (none to probe with: a copy of nothing costs nothing)
        name, value = pairs[0]
        return bool(get(name.upper()) == value == get(name.lower()) == get(name.title()))
    except Exception:  # a mapping of the user's that fails a lookup: copy what it gives
        return False


def _plain(headers: dict[Any, Any]) -> bool:
    """A plain dict as the rule asks: lower-case `str` names, `str` values. Names are few: a
    cheap look, made for every response that comes as a dict."""
    for name, value in headers.items():
        if name.__class__ is not str or value.__class__ is not str or not name.islower():
            return False
    return True


def _header_map(headers: object) -> dict[str, str]:
    """A copy of a transport's response headers by lower-case name.

    A user's transport may hand over the server's spelling (`Content-Type`), `(name, value)`
    pairs (the shape of `Request.headers`), bytes, or a number for `Retry-After`. Read as they
    were, they gave an `AttributeError` from deep inside, or "the server sent '(none)'"
    blaming the server, with the request id and `Retry-After` lost. Several values of one name
    are joined with ", " (RFC 9110 section 5.3); a value of None is left out.
    """
    items = getattr(headers, "items", None)
    pairs: Any = items() if callable(items) else headers
    if isinstance(headers, str | bytes) or not hasattr(pairs, "__iter__"):
        raise _bad_headers(headers)
    out: dict[str, str] = {}
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise _bad_headers(headers)
        if pair[1] is None:
            continue
        name = _header_name(pair[0])
        value = _header_value(pair[1])
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _bad_headers(headers: object) -> LocalProtocolError:
    return LocalProtocolError(
        "a transport's response headers must be a mapping of names to values, or (name, value) "
        f"pairs, but they were {type(headers).__name__}: {headers!r:.80}"
    )


def _header_name(name: object) -> str:
    if isinstance(name, str):
        return name.lower()
    if isinstance(name, bytes | bytearray):
        return bytes(name).decode("latin-1").lower()  # what HTTP/1.1 header bytes decode as
    raise LocalProtocolError(
        f"a transport's response header name must be str, but it was "
        f"{type(name).__name__}: {name!r:.60}"
    )


def _header_value(value: object) -> str:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    if isinstance(value, list | tuple):  # several values of one name (`set-cookie`)
        return ", ".join(_header_value(part) for part in value)
    return str(value)  # `Retry-After: 2` handed over as the number


def _status_of(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)  # `HTTPStatus.OK`
    raise LocalProtocolError(
        f"a transport's response status_code must be an int, but it was "
        f"{type(value).__name__}: {value!r:.60}"
    )


def _as_bytes(data: object) -> bytes:
    """A body piece that is not `bytes`: a transport broke its contract, so say which way
    (deep in the decoder it would be a TypeError about `startswith`)."""
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise LocalProtocolError(
        f"a transport's body must yield bytes, but it yielded {type(data).__name__}: {data!r:.60}"
    )


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (RFC 9110 section 10.2.3).

    Only the delta-seconds form is read here; an HTTP-date needs a wall clock, which the
    retry policy is given by its driver. Delta-seconds is ASCII digits; gateways also send a
    fraction, which is read too. Anything else (`nan`, `inf`, `-4`, `1_0`, other scripts'
    digits, all of which `float()` would take) names no wait: backoff applies instead.
    """
    seconds = _delta(headers.get("retry-after-ms"))
    if seconds is not None:
        return seconds / 1000
    return _delta(headers.get("retry-after"))


def _delta(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    whole, _, fraction = value.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (
        fraction and not (fraction.isascii() and fraction.isdigit())
    ):
        return None
    return float(value)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The request body as compact UTF-8 JSON. orjson when it is installed (the `speedups`
    extra) takes 5 µs less per request, on the way to the first token; what it refuses (an
    integer over 64 bits, a key that is not a string) goes to the stdlib, which decides."""
    if _orjson_dumps is not None:
        try:
            # Copied to a bytes object of its own size: orjson's is cut down from a 4 KiB
            # buffer in place, which leaves the rest of that buffer stuck between the objects
            # of an open stream (4 KiB more memory per open stream, measured at 5,000).
            return memoryview(_orjson_dumps(body)).tobytes()
        except TypeError:
            pass
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


_CONSTANT_HEADERS = (
    ("content-type", "application/json"),
    ("accept", "text/event-stream"),
    # Compression makes proxies and clients buffer; an event stream must flow.
    ("accept-encoding", "identity"),
    ("user-agent", f"holysheep/{__version__}"),
)
# Every name `_fixed_headers` may send.
_FIXED_NAMES = frozenset([*(name for name, _ in _CONSTANT_HEADERS), "authorization"])


@functools.lru_cache(maxsize=16)
def _fixed_headers(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The headers every request of a client sends: one tuple per client, shared by its
    requests, instead of fresh pairs held by every open stream."""
    if api_key:
        return (*_CONSTANT_HEADERS, ("authorization", f"Bearer {api_key}"))
    return _CONSTANT_HEADERS


@functools.lru_cache(maxsize=256)
def _lower(name: str) -> str:
    """`name.lower()`, one string object per header name for all requests: `lower()` makes a
    new string every time, even of a lower-case name, and each request holds its names for
    as long as its stream is open (`idempotency-key` alone: 64 bytes per open stream)."""
    return name.lower()


def new_request_id() -> str:
    return f"hs-{os.urandom(16).hex()}"  # what uuid4().hex carries, without the object


def new_request_ids() -> tuple[str, str]:
    """A new request id and a new idempotency key (`Call`'s), each 128 random bits from the
    OS, as `new_request_id()` and `new_idempotency_key()` make them, in one `os.urandom` call:
    a system call less for every request."""
    random = os.urandom(32).hex()
    return f"hs-{random[:32]}", f"hs-idem-{random[32:]}"


class Exchange:
    """The state of one streamed request: see the module docstring for the protocol."""

    # Slots: no per-instance dict; one is open per stream, thousands at a time.
    __slots__ = (
        "_connected",
        "_ended",
        "_expect_id",
        "_first_progress",
        "_ids",
        "_last_progress",
        "_resumed",
        "_skip_ids",
        "_started",
        "_total_since",
        "accumulator",
        "bytes",
        "content_chunks",
        "done_at",
        "eof",
        "events",
        "failure",
        "never_sent",
        "request",
        "request_id",
        "response_headers",
        "server_request_id",
        "status_code",
        "timeouts",
    )

    def __init__(
        self,
        *,
        url: str,
        api_key: str | None,
        body: Mapping[str, Any] | bytes,
        timeouts: Timeouts,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
        require_end: bool = True,
        accumulator: ChatAccumulator | None = None,
        choices: int = 1,
    ) -> None:
        # `body` may come encoded already: a retrying caller encodes it once for all attempts.
        fixed = _fixed_headers(api_key)
        given = {_lower(name): value for name, value in headers.items()} if headers else {}
        if not given.keys().isdisjoint(_FIXED_NAMES):  # the caller overrides one of ours
            fixed = tuple(pair for pair in fixed if pair[0] not in given)
        # An `X-Request-ID` header the caller set is the request id, unless `request_id` says
        # otherwise: the id reported in stats and errors is always the one sent.
        self.request_id = request_id or given.get("x-request-id") or new_request_id()
        given["x-request-id"] = self.request_id
        self.request = Request(
            "POST",
            url,
            (*fixed, *given.items()),
            body if isinstance(body, bytes) else encode_body(body),
            timeouts,
        )
        self.timeouts = timeouts
        self.accumulator = accumulator or ChatAccumulator(require_end=require_end, choices=choices)
        #: Event ids this exchange received, when tracking them for a resume.
        self._ids: set[str] | None = None  # a set once tracking starts
        self._skip_ids: frozenset[str] | None = None
        self._expect_id: str | None = None  # see `track_event_ids`
        self.status_code: int | None = None
        self.response_headers: Mapping[str, str] = {}
        self.server_request_id: str | None = None
        self.bytes = 0
        self.events = 0
        #: An error in the bytes after chunks `on_data` returned: raise it once they are handed
        #: over (see `on_data`).
        self.failure: HolySheepError | None = None
        #: The transport could not connect, so the request never left (see `send_failed`).
        self.never_sent = False
        self.content_chunks = 0
        self._started: float | None = None
        #: Since when `total` counts: the first attempt's send (see `continues`).
        self._total_since: float | None = None
        self._connected: float | None = None
        self._first_progress: float | None = None
        self._last_progress: float | None = None
        self._resumed: float | None = None  # see `resumed`
        #: When `[DONE]` came (None before): the answer is complete, whatever the connection
        #: does after it, and only the end of the body is awaited (see `deadline`).
        self.done_at: float | None = None
        self._ended: float | None = None
        #: The body ended, closed by the server, rather than breaking (see `on_eof`).
        self.eof = False

    # -- the protocol ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self._started = now
        since = self._total_since
        if since is None:
            self._total_since = now
        elif since < now and self.timeouts.total is not None:
            # A later attempt: what a transport may wait for the head is bounded by what is
            # left of `total`, which counts from the first attempt.
            left = max(self.timeouts.total - (now - since), 0.001)
            self.request = attrs.evolve(
                self.request, timeouts=attrs.evolve(self.timeouts, total=left)
            )

    def send_failed(self, error: HolySheepError) -> None:
        """The transport raised `error` instead of returning a response head."""
        # Only a connection never made is known not to have reached the server (and so to
        # have cost nothing): anything later may have been read, and answered, unseen.
        self.never_sent = isinstance(error, ConnectError | ConnectTimeoutError)

    def send_deadline(self) -> float | None:
        """Until when this attempt may wait to be sent, in a rate limiter's queue: a later
        attempt has what `total` leaves (it counts from the first attempt's send). None for a
        first attempt, or without `total`."""
        since, total = self._total_since, self.timeouts.total
        return None if since is None or total is None else since + total

    def queue_timeout(self, now: float) -> TotalTimeoutError:
        """The error for a later attempt still queued at `send_deadline()`."""
        since, total = self._total_since, self.timeouts.total
        assert since is not None  # see `send_deadline`
        assert total is not None
        return TotalTimeoutError(
            f"total timeout: the stream did not finish within {total:g} s (waited "
            f"{now - since:.2f} s; the retry was still waiting in the rate limiter's queue)",
            limit=total,
            elapsed=now - since,
            request_id=self.request_id,
        )

    def continues(self, since: float | None) -> None:
        """This attempt continues a call whose first attempt was sent at `since`: `total` is
        the budget of the whole stream, so it keeps counting from there."""
        self._total_since = since

    def on_headers(
        self, status_code: int, headers: Mapping[str, str], now: float
    ) -> Literal["stream", "read_error_body"]:
        """Record the response head; say whether to stream it or read it as an error."""
        if status_code.__class__ is not int or headers.__class__ not in CASELESS_HEADERS:
            try:
                if status_code.__class__ is not int:
                    status_code = _status_of(status_code)
                headers = _readable(headers)
            except HolySheepError as exc:
                exc.request_id = self.request_id
                raise
        self.status_code = status_code
        self.response_headers = headers
        self.server_request_id = headers.get("x-request-id") or headers.get("request-id")
        self._connected = now
        if not 200 <= status_code < 300:
            return "read_error_body"
        content_type = headers.get("content-type", "")
        if not content_type.lower().startswith("text/event-stream"):
            return "read_error_body"
        return "stream"

    def error_for_body(self, body: bytes) -> HolySheepError:
        """The error a non-stream response stands for, quoting the server."""
        status = self.status_code or 0
        text = body[:MAX_ERROR_BODY].decode("utf-8", "replace")
        request_id = self.server_request_id or self.request_id
        if 200 <= status < 300:
            content_type = self.response_headers.get("content-type", "(none)")
            snippet = text[:_BODY_SNIPPET] + ("..." if len(text) > _BODY_SNIPPET else "")
            return UnexpectedContentTypeError(
                f"expected an event stream (text/event-stream) but the server sent "
                f"{content_type!r}; the body starts: {snippet!r}",
                content_type=content_type,
                body=text,
                status_code=status,
                request_id=request_id,
            )
        parsed: Any = None
        message, kind, code = text.strip()[:_BODY_SNIPPET] or "(empty body)", None, None
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
        if isinstance(parsed, dict):
            error = parsed.get("error", parsed)
            if isinstance(error, dict):
                message = str(error.get("message") or message)
                kind = error.get("type") if isinstance(error.get("type"), str) else None
                code = None if error.get("code") is None else str(error.get("code"))
            elif isinstance(error, str):
                message = error
        cls = _STATUS_ERRORS.get(status, InternalServerError if status >= 500 else APIStatusError)
        exc = cls(
            f"HTTP {status} from {self.request.url}: {message}",
            status_code=status,
            request_id=request_id,
            body=parsed if parsed is not None else text,
            headers=self.response_headers,
            type=kind,
            code=code,
        )
        if isinstance(exc, RateLimitError):
            exc.retry_after = parse_retry_after(self.response_headers)
        return exc

    def track_event_ids(self, skip: frozenset[str], expect_id: str | None = None) -> None:
        """Record event ids, and drop events whose id an earlier attempt already delivered.

        `expect_id` is the completion id a resumed stream must go on with when it starts by
        replaying events already delivered (ids in `skip`): a server that ignores
        `Last-Event-ID` and generates a new answer, numbered from the start again, would
        otherwise have its events spliced onto the old one's (those numbered like delivered
        ones dropped, the rest appended), a text nobody generated. A stream that goes on after
        `Last-Event-ID` is not checked: some gateways vary the id from chunk to chunk.
        """
        self._skip_ids = skip
        self._ids = set()
        self._expect_id = expect_id

    @property
    def ids_seen(self) -> Set[str]:
        """Event ids this exchange received, when tracking them for a resume."""
        return _NO_IDS if self._ids is None else self._ids

    def on_data(self, data: bytes, now: float) -> list[ChatChunk]:
        """Body bytes in, chunks out; progress is stamped with `now`."""
        if data.__class__ is not bytes:
            try:
                data = _as_bytes(data)
            except HolySheepError as exc:
                self._identify(exc)  # the text so far goes with it, as with any other error
                raise
        self.bytes += len(data)
        try:
            if self._skip_ids is None:
                # `accumulator.feed(data)`, calling its C part (`_chat._c_feed`) here: a Python
                # call less for every read. It answers None, having done nothing, for anything
                # but a `ChatAccumulator` itself, whose own `feed` is then called.
                fast = _chat._c_feed
                chunks = None if fast is None else fast(self.accumulator, data)
                if chunks is None:
                    chunks = self.accumulator.feed(data)
            else:
                chunks = self._feed_tracking_ids(data)
        except HolySheepError as exc:
            self._identify(exc)
            if not exc.chunks:
                raise
            # The same bytes completed chunks before the bad event: they are accumulated, and
            # must reach the caller before the error does, or the caller would never see text
            # the completion has (and a resume would skip it as delivered).
            chunks = list(exc.chunks)
            self.failure = exc
        if self.done_at is None and self.accumulator.done:
            self.done_at = now
        if chunks:
            self.events += len(chunks)
            # Every chunk of a read has the same `now`: stamp progress once, after the loop.
            progressed = False
            texts = 0
            for chunk in chunks:
                if chunk.deltas:
                    progressed = True
                    if chunk.text:
                        texts += 1
            if progressed:
                self._last_progress = now
                if self._first_progress is None:
                    self._first_progress = now
                self.content_chunks += texts
        return chunks

    def _feed_tracking_ids(self, data: bytes) -> list[ChatChunk]:
        chunks = []
        skip, seen = self._skip_ids, self._ids
        assert skip is not None
        assert seen is not None
        try:
            events, failure = _chat._decode(self.accumulator.decoder, data)
            for event in events:
                if self._expect_id is not None and event.data:
                    if event.id in skip:
                        self._check_same_completion(event.data)
                    else:
                        self._expect_id = None  # the server went on after Last-Event-ID
                if event.id:
                    if event.id in skip and not _ends_stream(event):
                        continue  # delivered before the resume: never twice
                    seen.add(event.id)
                chunk = self.accumulator.feed_event(event)
                if chunk is not None:
                    chunks.append(chunk)
            if failure is not None:
                raise failure
        except HolySheepError as exc:
            if chunks:
                exc.chunks = chunks
            raise
        return chunks

    def _check_same_completion(self, data: str) -> None:
        """The first event of a resumed stream must belong to the completion it resumes."""
        expected, self._expect_id = self._expect_id, None
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):  # json recurses once per level of nesting
            return  # not a chunk ([DONE], or invalid JSON the accumulator reports)
        found = parsed.get("id") if isinstance(parsed, dict) else None
        if isinstance(found, str) and found != expected:
            raise RemoteProtocolError(
                f"the server did not resume the stream: it answered with another completion "
                f"({found!r} instead of {expected!r}), so its events cannot continue the text "
                f"received so far"
            )

    def on_eof(self, now: float) -> None:
        """The body ended. Raises `IncompleteStreamError` if it ended too early."""
        self.eof = True
        self._end(now)

    def _end(self, now: float) -> None:
        """End the accumulation at `now`, as at the end of the body, which `complete_at_break`
        asks about a read that broke or stalled: that body did not end (`eof` stays)."""
        self._ended = now
        try:
            self.accumulator.close()
        except HolySheepError as exc:
            self._identify(exc)
            raise

    def _identify(self, exc: HolySheepError) -> None:
        """Fill in what the accumulator cannot know: the status, the request id and, once
        chunks were delivered, the partial completion."""
        # No accumulator error carries a request id today; one that did (a server's own, from
        # an in-band error) would be the more precise one, so it is kept.
        if exc.request_id is None:  # pragma: no branch - a guard, see above
            exc.request_id = self.server_request_id or self.request_id
        if exc.status_code is None:
            exc.status_code = self.status_code
        if exc.completion is None and (self.events or exc.chunks):
            exc.completion = self.accumulator.completion

    def complete_at_break(self, error: HolySheepError, now: float) -> bool:
        """Whether the answer is complete although the connection broke (`error`) at `now`:
        `[DONE]` came, or a `finish_reason` did with no event cut in the middle, which is what
        a clean end of the body at the same point would be accepted for. The driver then ends
        the stream as at the end of the body; the usage chunk may be missing, as it may then.

        A stall there is the same: once every choice finished, the model has said all it will,
        and a gateway that never sends the usage or `[DONE]` must not turn the whole answer into
        an `IdleTimeoutError` (or `TotalTimeoutError`) for what it left out. A resumed stream
        that brings nothing new after the finish stalls on `ttft` (its clock runs until this
        attempt's first content): a `FirstTokenTimeoutError` there is that stall too. (Before
        the finish it is not: the accumulation must be finished, and on a fresh attempt it
        cannot be before content came.)
        """
        if self.done_at is not None:
            return True
        broke = isinstance(error, APIConnectionError | IncompleteStreamError | _STALLS)
        if not broke or not self.accumulator.finished:
            return False
        if self.accumulator.closed:
            # The body did end, and `on_eof` found an event cut in the middle (`error`): that
            # is the verdict. Closing again would return quietly, and pass the cut stream.
            return False
        try:
            self._end(now)
        except HolySheepError:
            return False  # an event cut in the middle after the finish: the usage, likely
        return True

    def interrupted(self, cause: BaseException, now: float) -> HolySheepError:
        """The error for a body read that failed: a timeout if one is due, else a cut stream."""
        timeout = self.timeout_error(now)
        self._ended = now
        if timeout is not None:
            return timeout
        return IncompleteStreamError(
            f"the connection broke after {self.events} chunks ({self.bytes} bytes): {cause}",
            completion=self.accumulator.completion,
            request_id=self.server_request_id or self.request_id,
            status_code=self.status_code,
        )

    @property
    def started(self) -> float | None:
        """When the request was sent (the driver's clock)."""
        return self._started

    @property
    def first_progress(self) -> float | None:
        """When the first content arrived."""
        return self._first_progress

    @property
    def last_progress(self) -> float | None:
        """When the last content arrived."""
        return self._last_progress

    @property
    def progressed(self) -> bool:
        """Whether any content (a chunk with deltas) has arrived."""
        return self._first_progress is not None

    def finish(self, now: float) -> None:
        """The caller stopped early (closed the stream); stamp the end for the stats."""
        if self._ended is None:
            self._ended = now

    # -- timeouts --------------------------------------------------------------------------------

    def resumed(self, now: float) -> APITimeoutError | None:
        """The caller asks for more at `now`, after its `ttft` or `idle` deadline passed while
        it was not reading (busy with the last chunk, or not iterating yet).

        Those two clocks measure how long the client waits for the server, and nobody was
        waiting: the server may well have sent on time, its bytes unread. They start again at
        `now`. `total` counts the caller's time too and is not moved: returns its timeout if
        it ran out meanwhile, for the driver to raise before reading on.
        """
        self._resumed = now
        return self.timeout_error(now)

    def deadline(self) -> tuple[float, DeadlineKind] | None:
        """When the next timeout fires (on the driver's clock) and which one; None if never.

        After `[DONE]` only the end of the body is awaited, for `AFTER_DONE` at most: that
        deadline ("done") is not a timeout, and the drivers end the stream normally at it.
        """
        started = self._started
        if started is None:
            return None
        if self.done_at is not None:
            return (self.done_at + AFTER_DONE, "done")
        t = self.timeouts
        best: tuple[float, DeadlineKind] | None = None
        if t.total is not None:
            assert self._total_since is not None  # set by `start`
            best = (self._total_since + t.total, "total")
        if self._connected is None:
            candidate: tuple[float, TimeoutKind] | None = (
                None if t.connect is None else (started + t.connect, "connect")
            )
            # Until the head arrives, the first-token clock runs too.
            if t.ttft is not None and (candidate is None or started + t.ttft < candidate[0]):
                candidate = (started + t.ttft, "ttft")
        else:
            kind: TimeoutKind = "ttft" if self._last_progress is None else "idle"
            limit = t.ttft if kind == "ttft" else t.idle
            candidate = None if limit is None else (self._waiting_since(kind) + limit, kind)
        if candidate is not None and (best is None or candidate[0] < best[0]):
            best = candidate
        return best

    def _waiting_since(self, kind: TimeoutKind) -> float:
        """Since when the clock of `kind` has been running."""
        since = self._total_since if kind == "total" else self._started
        assert since is not None
        if kind == "idle" and self._last_progress is not None:
            since = self._last_progress
        if kind in ("ttft", "idle") and self._resumed is not None and self._resumed > since:
            since = self._resumed
        return since

    def timeout_error(
        self, now: float, cause: HolySheepError | None = None
    ) -> APITimeoutError | None:
        """The typed error for the timeout that has fired by `now`, or None.

        `cause`: what the transport raised when it gave up, if it did; a `ConnectTimeoutError`
        of its own says no connection was made, which "no response head" would not.
        """
        due = self.deadline()
        if due is None or now < due[0] or due[1] == "done":
            return None
        kind = due[1]
        limit = getattr(self.timeouts, kind)
        since = self._waiting_since(kind)
        what = {
            # Whether a connection was made is the transport's to know (`cause`).
            "connect": "no connection or response head",
            "ttft": "no first token",
            "idle": "no new content",
            "total": "the stream did not finish",
        }[kind]
        if kind == "connect" and isinstance(cause, ConnectTimeoutError):
            what = f"no connection to {self.request.url}"
        partial = self.accumulator.completion if self.events else None
        return _TIMEOUT_ERRORS[kind](
            f"{kind} timeout: {what} within {limit:g} s (waited {now - since:.2f} s)",
            limit=limit,
            elapsed=now - since,
            request_id=self.server_request_id or self.request_id,
            completion=partial,
            status_code=self.status_code,  # the head's, when it came before the timeout
        )

    # -- results -------------------------------------------------------------------------------

    @property
    def completion(self) -> Completion:
        return self.accumulator.completion

    def stats(self, now: float, call: Call | None = None) -> StreamStats:
        """This attempt's figures, and with `call` those of the attempts before it too."""
        started, first, last = self._started, self._first_progress, self._last_progress
        events, nbytes = self.events, self.bytes
        if call is not None:
            earlier = call.earlier
            started = earlier.sent if earlier.sent is not None else started
            first = earlier.first_content if earlier.first_content is not None else first
            last = last if last is not None else earlier.last_content
            events += earlier.events
            nbytes += earlier.bytes
        end = self._ended if self._ended is not None else now
        usage = self.accumulator.usage
        tokens = usage.completion_tokens if usage and usage.completion_tokens is not None else None
        if tokens is None:
            # No count from the server: the larger of two estimates. A chunk per token holds
            # for OpenAI-style streams (and for scripts where a token is one or two
            # characters); four characters a token holds for gateways that batch. The text
            # covers every attempt of a resumed completion, the chunks only this one's; and all
            # of it, as `Completion.cost` counts it (every choice, reasoning, tool calls): choice
            # 0's content alone counted 1 token for 300 chunks of reasoning before "Yes.".
            output = self.accumulator.completion.output_text
            tokens = max(self.content_chunks, estimate_tokens(output))
            estimated = True
        else:
            estimated = False
        return StreamStats(
            request_id=self.request_id,
            server_request_id=self.server_request_id,
            status_code=self.status_code,
            ttft=None if started is None or first is None else first - started,
            duration=None if started is None else end - started,
            events=events,
            bytes=nbytes,
            tokens=tokens,
            tokens_estimated=estimated,
            attempts=call.sent if call is not None else 1,
            retries=tuple(call.history) if call is not None else (),
            queued=call.queued if call is not None else 0.0,
            generating=None if first is None or last is None else last - first,
        )


def _ends_stream(event: ServerSentEvent) -> bool:
    """Whether `event` is an in-band error or `[DONE]`: never a replay of something delivered.

    An event without an `id:` line takes the last one (WHATWG), so the error a server sends
    right after replaying delivered events carries a delivered id; skipped with them, a final
    error (a content filter, say) would become an early end, and be retried.
    """
    data = event.data
    if event.event == "error" or data == "[DONE]":
        return True
    if '"error"' not in data:  # no chunk has it: nothing to parse for the replayed ones
        return False
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("error") is not None
