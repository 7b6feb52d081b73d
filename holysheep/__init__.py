"""holysheep: streaming LLM chat completions over Server-Sent Events.

The core (`SSEDecoder`, `ChatAccumulator`) is sans-IO: bytes in, events out, no sockets or
clocks. Everything public is importable from here; the `_modules` are private.
"""

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
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageReport,
    is_retryable_error,
)
from ._exceptions import (
    HolySheepError,
    IncompleteStreamError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamError,
)
from ._sse import DEFAULT_MAX_EVENT_SIZE, DEFAULT_MAX_LINE_SIZE, ServerSentEvent, SSEDecoder

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_MAX_LINE_SIZE",
    "ChatAccumulator",
    "ChatChunk",
    "ChatDelta",
    "Choice",
    "Completion",
    "ContentDelta",
    "Finished",
    "HolySheepError",
    "IncompleteStreamError",
    "LocalProtocolError",
    "ReasoningDelta",
    "RefusalDelta",
    "RemoteProtocolError",
    "SSEDecoder",
    "ServerSentEvent",
    "StreamError",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "UsageReport",
    "__version__",
    "is_retryable_error",
]
