"""Lifecycle observers: what a stream did, told as it happens, for logs, metrics and traces.

An `Observer` is told five things about each logical request (all its attempts together):
it started, its first token arrived, an attempt failed and will be retried, it ended, or it
failed for good. Exactly one of `on_end` and `on_error` closes every `on_request`, however the
stream stops (read to the end, closed early, cancelled, or an error), so an observer that opens
a span or a timer in `on_request` always gets to close it.

Observers run inline, in the thread or task that reads the stream (but for the end of a stream
closed with `close()` from another one, told there): keep them cheap. One that
raises is logged (logger `holysheep`) and otherwise ignored: a metrics bug must not cost a user
their completion.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, final

import attrs

if TYPE_CHECKING:
    from ._call import Attempt
    from ._chat import Completion
    from ._exchange import StreamStats

__all__ = ["Observer", "RequestInfo"]

logger = logging.getLogger("holysheep")


@final
@attrs.frozen(eq=False)
class RequestInfo:
    """The logical request an observer is told about; the same object for every callback.

    Compared and hashed by identity, so an observer can key its own per-stream state (a span,
    a start time) by it.
    """

    model: str
    url: str
    request_id: str
    idempotency_key: str
    #: The JSON body as sent (messages included): observers choose what to record.
    body: Mapping[str, Any]


class Observer:
    """Subclass and override what you need; every method does nothing by default."""

    def on_request(self, info: RequestInfo) -> None:
        """The first attempt is about to be sent (after any wait in the rate limiter)."""

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        """The first content reached the caller; `stats.ttft` says how long it took."""

    def on_retry(self, info: RequestInfo, attempt: Attempt) -> None:
        """An attempt failed and another follows after `attempt.delay` seconds."""

    def on_end(self, info: RequestInfo, completion: Completion, stats: StreamStats) -> None:
        """The stream ended without an error: read to its end, or closed early by the caller
        (then `completion.finish_reason` is usually None)."""

    def on_error(self, info: RequestInfo, error: BaseException, stats: StreamStats) -> None:
        """The request failed for good with `error` (the exception the caller sees: one of
        holysheep's, or whatever else the reading raised, a transport's bug say), or the
        reading task was cancelled."""


def notify(observers: tuple[Observer, ...], method: str, *args: Any) -> None:
    """Call `method` on every observer; one that raises is logged, never propagated."""
    for observer in observers:
        try:
            getattr(observer, method)(*args)
        except Exception:
            logger.exception("holysheep observer %r failed in %s", observer, method)
