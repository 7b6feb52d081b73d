"""A client's streams that are waiting to send: queued in a rate limiter, or for a retry.

Closing the client wakes them. Left waiting, they went on for the whole queue or backoff, then
failed on the closed transport ("RequestsTransport is closed"), with the error that had them
retry (a 503's status, message and request id) lost.
"""

from __future__ import annotations

import threading
from typing import Protocol

from ._call import Call
from ._exceptions import HolySheepError, LocalProtocolError
from ._retry import GiveUp

__all__ = ["CLIENT_CLOSED", "NO_RETRY_CLIENT_CLOSED", "Waiting", "gone_error"]

#: Why a stream woken by its client's close did not retry (`HolySheepError.not_retried`).
CLIENT_CLOSED = "the client was closed before the retry was sent"
#: The decision for a retry its client's close stopped: give up, saying so.
NO_RETRY_CLIENT_CLOSED = GiveUp(CLIENT_CLOSED, None, CLIENT_CLOSED)


class _Wakeable(Protocol):
    def _client_closed(self) -> None: ...


class Waiting:
    """The streams of one client that are waiting; `close()` hands them over to be woken."""

    __slots__ = ("_lock", "_streams", "closed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A plain set: each stream leaves it when its wait ends (in a `finally`).
        self._streams: set[_Wakeable] = set()
        self.closed = False

    def enter(self, stream: _Wakeable) -> bool:
        """`stream` starts waiting; False if the client is closed already (do not wait)."""
        with self._lock:
            if self.closed:
                return False
            self._streams.add(stream)
            return True

    def leave(self, stream: _Wakeable) -> None:
        with self._lock:
            self._streams.discard(stream)

    def close(self) -> None:
        """The client closes: wake the streams waiting now; none will wait after this.

        Under the lock: a stream that stopped waiting just before must not be marked, or its
        next error (a 429 to retry, say) would be taken for the close's.
        """
        with self._lock:
            self.closed = True
            for stream in self._streams:
                stream._client_closed()
            self._streams.clear()


def gone_error(call: Call) -> HolySheepError:
    """What a stream raises when its client closed while it waited to send: the last failed
    attempt's error (not retried, saying why), or, before its first send, that none was."""
    error = None
    if call.history:
        last = call.history[-1].exception
        error = last if isinstance(last, HolySheepError) else None
    if error is None:
        failure: HolySheepError = LocalProtocolError(
            "the client was closed before this stream's request was sent (it was never sent)"
        )
        failure.request_id = call.exchange.request_id if call.exchange is not None else None
        return failure
    return call.error_to_raise(error, NO_RETRY_CLIENT_CLOSED)
