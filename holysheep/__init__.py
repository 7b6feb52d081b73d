"""holysheep: streaming LLM chat completions over Server-Sent Events.

The core (`SSEDecoder`, `ChatAccumulator`, `Exchange`) is sans-IO: bytes in, events out, no
sockets or clocks. The clients are loaded on first use, so `import holysheep` stays free of
requests, httpx and anyio for code that only needs the core. Everything public is importable
from here; the `_modules` are private.
"""

from typing import TYPE_CHECKING, Any

from ._call import Attempt, Call, OnInterrupt
from ._chat import (
    ChatAccumulator,
    ChatChunk,
    ChatDelta,
    Choice,
    Completion,
    ContentDelta,
    Finished,
    ReasoningDelta,
    RefusalDelta,
    Reset,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageReport,
    is_retryable_error,
)
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
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
    StreamError,
    StreamInterruptedError,
    TotalTimeoutError,
    UnexpectedContentTypeError,
    UnprocessableEntityError,
)
from ._exchange import Exchange, Request, StreamStats, Timeouts
from ._limiter import Admission, Admit, RateLimiter, Ticket, TicketState, Wait
from ._observe import Observer, RequestInfo
from ._pricing import Cost, Price, PriceTable, RoiRow, cost_of, estimate_tokens, monthly_roi
from ._retry import Classification, GiveUp, Retry, RetryDecision, RetryPolicy, classify
from ._sse import DEFAULT_MAX_EVENT_SIZE, DEFAULT_MAX_LINE_SIZE, ServerSentEvent, SSEDecoder
from ._version import __version__

if TYPE_CHECKING:
    from ._async_client import AsyncClient, AsyncStream
    from ._client import Client, Stream
    from ._otel import OpenTelemetryObserver

_LAZY = {
    "AsyncClient": "._async_client",
    "AsyncStream": "._async_client",
    "Client": "._client",
    "Stream": "._client",
    # Needs the `otel` extra; constructing one without it raises an ImportError saying so.
    "OpenTelemetryObserver": "._otel",
}


def __getattr__(name: str) -> Any:
    # The clients pull in their I/O libraries; load them when first asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'holysheep' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_MAX_LINE_SIZE",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "Admission",
    "Admit",
    "AsyncClient",
    "AsyncStream",
    "Attempt",
    "AuthenticationError",
    "BadRequestError",
    "Call",
    "ChatAccumulator",
    "ChatChunk",
    "ChatDelta",
    "Choice",
    "Classification",
    "Client",
    "Completion",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "ConnectTimeoutError",
    "ContentDelta",
    "Cost",
    "Exchange",
    "Finished",
    "FirstTokenTimeoutError",
    "GiveUp",
    "HolySheepError",
    "IdleTimeoutError",
    "IncompleteStreamError",
    "InternalServerError",
    "LocalProtocolError",
    "NotFoundError",
    "Observer",
    "OnInterrupt",
    "OpenTelemetryObserver",
    "PermissionDeniedError",
    "Price",
    "PriceTable",
    "RateLimitError",
    "RateLimiter",
    "ReasoningDelta",
    "RefusalDelta",
    "RemoteProtocolError",
    "Request",
    "RequestInfo",
    "Reset",
    "Retry",
    "RetryDecision",
    "RetryPolicy",
    "RoiRow",
    "SSEDecoder",
    "ServerSentEvent",
    "Stream",
    "StreamError",
    "StreamInterruptedError",
    "StreamStats",
    "Ticket",
    "TicketState",
    "Timeouts",
    "ToolCall",
    "ToolCallDelta",
    "TotalTimeoutError",
    "UnexpectedContentTypeError",
    "UnprocessableEntityError",
    "Usage",
    "UsageReport",
    "Wait",
    "__version__",
    "classify",
    "cost_of",
    "estimate_tokens",
    "is_retryable_error",
    "monthly_roi",
]
