"""Every error holysheep raises, split by who is at fault.

    HolySheepError
    ├── LocalProtocolError        the caller misused an object (fed a closed decoder)
    ├── RemoteProtocolError       the server sent bytes we cannot make sense of
    └── StreamError               the server reported an error inside a stream
        └── IncompleteStreamError the stream ended before the server said it was done

Errors that happen *during* a stream carry the partial `Completion` accumulated so far, so
the text a user already saw is never lost with the exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._chat import Completion

__all__ = [
    "HolySheepError",
    "IncompleteStreamError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "StreamError",
]


class HolySheepError(Exception):
    """Base of every exception this library raises on purpose."""


class LocalProtocolError(HolySheepError):
    """The caller used an object in a way its state does not allow.

    Like h11's error of the same name: a bug in the calling code, never the server's doing.
    """


class RemoteProtocolError(HolySheepError):
    """The server sent something that is not a valid stream (oversized line, invalid JSON).

    The decoder or accumulator that raised it is unusable afterwards: a stream that broke its
    framing once cannot be trusted to be in sync again.
    """


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
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code
        self.retryable = retryable
        self.completion = completion
        self.request_id = request_id
        self.status_code = status_code

    def __str__(self) -> str:
        parts = [self.message]
        details = [
            f"{name}={value}"
            for name, value in (
                ("type", self.type),
                ("code", self.code),
                ("status", self.status_code),
                ("request_id", self.request_id),
            )
            if value is not None
        ]
        if details:
            parts.append(f"({', '.join(details)})")
        if self.completion is not None:
            parts.append(f"[partial completion: {len(self.completion.text)} chars kept]")
        return " ".join(parts)


class IncompleteStreamError(StreamError):
    """The stream ended without `[DONE]` and without any `finish_reason`.

    Usually a dropped connection or a proxy that cut the response. The partial completion is on
    `.completion`. Servers known to omit both markers can be accepted with
    `ChatAccumulator(require_end=False)`.
    """
