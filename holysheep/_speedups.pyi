# The C part of the SSE decoder (_speedups.c); see holysheep/_sse.py for how it is used.
from typing import Any

def feed(decoder: Any, data: bytes, /) -> list[Any] | None: ...
def setup(event_class: type[tuple[Any, ...]], /) -> None: ...
def chat_chunk(accumulator: Any, event: Any, /) -> Any | None: ...
def chat_feed(accumulator: Any, data: bytes, /) -> list[Any] | None: ...
def setup_chat(
    accumulator: type,
    choice: type,
    chunk: type,
    delta: type,
    finished: type,
    usage_report: type,
    usage: type,
    later: type,
    decoder: type,
    error: type[BaseException],
    loads: Any,
    block: int,
    /,
) -> None: ...
