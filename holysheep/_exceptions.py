"""Every error holysheep raises, split by who is at fault.

    HolySheepError
    ├── ConfigurationError            the client was set up wrong (no API key)
    ├── LocalProtocolError            the caller misused an object (fed a closed decoder)
    ├── RemoteProtocolError           the server sent bytes we cannot make sense of
    │   └── UnexpectedContentTypeError  a 200 that is not an event stream (a proxy's HTML page)
    ├── APIConnectionError            no usable connection (refused, reset, DNS, TLS)
    │   └── ConnectError                no connection made: the request was never sent
    ├── APITimeoutError               one of the four timeouts fired (also a builtin TimeoutError)
    │   ├── ConnectTimeoutError
    │   ├── FirstTokenTimeoutError      no content before `ttft`
    │   ├── IdleTimeoutError            no content for `idle` (keep-alives do not count)
    │   └── TotalTimeoutError           the whole stream took longer than `total`
    ├── APIStatusError                the server answered with an error status
    │   ├── BadRequestError 400, AuthenticationError 401, PermissionDeniedError 403,
    │   ├── NotFoundError 404, ConflictError 409, UnprocessableEntityError 422,
    │   ├── RateLimitError 429 (with `retry_after`), InternalServerError 5xx
    └── StreamError                   the server reported an error inside a stream
        └── IncompleteStreamError     the stream ended before the server said it was done
            └── StreamInterruptedError  ... after content had reached the caller

Every error carries what is known of the request: `status_code`, `request_id` (the server's,
else ours), the server's `message`, and, for errors during a stream, the partial `completion`
accumulated so far, so text a user already saw is never lost with the exception.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._chat import ChatChunk, Completion, Usage
    from ._sse import ServerSentEvent

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "ConnectTimeoutError",
    "FirstTokenTimeoutError",
    "HolySheepError",
    "IdleTimeoutError",
    "IncompleteStreamError",
    "InternalServerError",
    "LocalProtocolError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RemoteProtocolError",
    "StreamError",
    "StreamInterruptedError",
    "TotalTimeoutError",
    "UnexpectedContentTypeError",
    "UnprocessableEntityError",
]


class HolySheepError(Exception):
    """Base of every exception this library raises on purpose.

    The attributes are None where they do not apply (a decoder error has no status code).
    """

    #: For an error raised by `ChatAccumulator.feed`: the chunks the same bytes completed
    #: before the bad event. They are accumulated already (in `completion`), so a caller that
    #: shows chunks must still show these; the clients hand them over before raising.
    chunks: Sequence[ChatChunk] = ()

    #: For a limit error raised by `SSEDecoder.feed`: the events the same bytes completed
    #: before the line over the limit. They are the stream's, as they would be had the read
    #: been cut before that line; `ChatAccumulator.feed` turns them into `chunks`.
    events: Sequence[ServerSentEvent] = ()

    #: For an error a client raised when it gave up: how many attempts the call made (shown
    #: in the message when there was more than one, so a final 503 does not read as the first).
    attempts: int | None = None

    #: For an error a client gave up on though its kind is retried: the limit that stopped
    #: the retry (a Retry-After past `max_retry_after`, the retry budget, the total timeout).
    not_retried: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        completion: Completion | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.completion = completion

    def _details(self) -> list[str]:
        details = []
        if self.status_code is not None:
            details.append(f"status={self.status_code}")
        if self.request_id is not None:
            details.append(f"request_id={self.request_id}")
        if self.attempts is not None and self.attempts > 1:
            details.append(f"attempts={self.attempts}")
        if self.not_retried is not None and self.not_retried not in self.message:
            details.append(f"not retried: {self.not_retried}")  # (an interruption says it)
        return details

    def __str__(self) -> str:
        text = self.message
        details = self._details()
        if details:
            text += f" ({', '.join(details)})"
        if self.completion is not None:
            # Every choice, reasoning and tool call: a cut tool call kept has no text at all.
            text += f" [partial completion kept: {len(self.completion.output_text)} chars]"
        return text


class ConfigurationError(HolySheepError, ValueError):
    """The client cannot work as configured (for example, no API key)."""


class LocalProtocolError(HolySheepError):
    """The caller used an object in a way its state does not allow.

    Like h11's error of the same name: a bug in the calling code, never the server's doing.
    """


class RemoteProtocolError(HolySheepError):
    """The server sent something that is not a valid stream (oversized line, invalid JSON).

    The decoder or accumulator that raised it is unusable afterwards: a stream that broke its
    framing once cannot be trusted to be in sync again.
    """


class UnexpectedContentTypeError(RemoteProtocolError):
    """A successful status with a body that is not `text/event-stream`.

    Typically a proxy's HTML error page served with 200; `body` holds its first bytes.
    """

    def __init__(
        self,
        message: str,
        *,
        content_type: str,
        body: str,
        status_code: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id)
        self.content_type = content_type
        self.body = body


class APIConnectionError(HolySheepError):
    """The request could not reach the server, or the connection broke before a response."""


class ConnectError(APIConnectionError):
    """No connection could be made (refused, DNS, TLS handshake): the request was never sent.

    Distinct because it is the one connection failure known to cost the server nothing: a
    rate limiter gives back the tokens such an attempt reserved.
    """


class APITimeoutError(HolySheepError, builtins.TimeoutError):
    """A timeout fired. `timeout` names which one, `limit` its setting, `elapsed` the wait."""

    timeout = "timeout"

    def __init__(
        self,
        message: str,
        *,
        limit: float,
        elapsed: float,
        request_id: str | None = None,
        completion: Completion | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(
            message, request_id=request_id, completion=completion, status_code=status_code
        )
        self.limit = limit
        self.elapsed = elapsed


class ConnectTimeoutError(APITimeoutError):
    """No connection within `connect` seconds."""

    timeout = "connect"


class FirstTokenTimeoutError(APITimeoutError):
    """No content within `ttft` seconds of sending the request."""

    timeout = "ttft"


class IdleTimeoutError(APITimeoutError):
    """No content for `idle` seconds in the middle of a stream; keep-alive comments don't count."""

    timeout = "idle"


class TotalTimeoutError(APITimeoutError):
    """The whole request, stream included, took longer than `total` seconds."""

    timeout = "total"


class APIStatusError(HolySheepError):
    """The server answered with an error status. `body` is the parsed JSON body, if any."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        request_id: str | None = None,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id)
        self.body = body
        self.headers: Mapping[str, str] = headers or {}
        self.type = type
        self.code = code


class BadRequestError(APIStatusError):
    """400: the request is malformed; sending it again will not help."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing, wrong or revoked."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but may not use this model or endpoint."""


class NotFoundError(APIStatusError):
    """404: no such endpoint or model."""


class ConflictError(APIStatusError):
    """409: the request conflicts with another in flight (retryable)."""


class UnprocessableEntityError(APIStatusError):
    """422: the request is well-formed but its values are not acceptable."""


class RateLimitError(APIStatusError):
    """429: slow down. `retry_after` is the server's wait in seconds, when it sent one."""

    #: The server's `Retry-After` in seconds, or None when it sent none.
    retry_after: float | None = None


class InternalServerError(APIStatusError):
    """5xx: the server or the gateway failed; usually worth retrying."""


class StreamError(HolySheepError):
    """The server reported an error in the middle of a stream (an in-band error event).

    `completion` holds what was accumulated before the error; `retryable` says whether the
    error class is transient (overloaded, rate limited, server error), so a caller or a retry
    policy can decide without parsing strings.
    """

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        retryable: bool = False,
        completion: Completion | None = None,
        request_id: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(
            message, status_code=status_code, request_id=request_id, completion=completion
        )
        self.type = type
        self.code = code
        self.retryable = retryable

    def _details(self) -> list[str]:
        details = [
            f"{name}={value}" for name, value in (("type", self.type), ("code", self.code)) if value
        ]
        return details + super()._details()


class IncompleteStreamError(StreamError):
    """The stream ended without `[DONE]` and without any `finish_reason`.

    Usually a dropped connection or a proxy that cut the response. The partial completion is on
    `.completion`. Servers known to omit both markers can be accepted with
    `ChatAccumulator(require_end=False)`.
    """


class StreamInterruptedError(IncompleteStreamError):
    """The stream broke after content had reached the caller, and was not resumed.

    Retrying silently would repeat text the caller already showed, so this is raised instead
    (a stream's default, `on_interrupt="raise"`); so it is when a resume or restart failed, and
    when `complete()` met a body the server ended too early. `completion` is everything
    received, `usage` the server's last usage report, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        completion: Completion | None = None,
        request_id: str | None = None,
        status_code: int | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(
            message, completion=completion, request_id=request_id, status_code=status_code
        )
        self.usage = usage
