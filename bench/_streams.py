"""Deterministic SSE streams and read patterns for the benchmarks.

Every generator takes a seed and returns the stream as a list of events, each one complete
wire bytes ending in its blank line, so "one read per event" is the list itself and any other
read pattern is `b"".join(events)` cut by `split_reads()`.

The payloads copy the shape of real streams (field order, compact JSON, raw UTF-8, `null`s)
because a decoder's cost depends on line lengths, and a chat layer's on the JSON it parses.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator

__all__ = [
    "anthropic_stream",
    "large_event_stream",
    "openai_chat_stream",
    "split_reads",
    "to_crlf",
]

# Pieces that tokens are cut from: mostly words with a leading space, as BPE tokens are, plus
# punctuation, newlines (escaped in JSON) and multi-byte UTF-8 (so reads split characters).
_WORDS = (
    " the", " of", " and", " to", " in", " is", " that", " stream", " event", " token",
    " decoder", " server", " client", " response", " function", " value", " example",
    "ing", "ed", "er", "s", ".", ",", ":", ";", "!", "?", "(", ")", '"', "'", "`", "\n", "\n\n",
    " -", " 1", "0", "42", " café", " naïve", " 日本語", " données", " 🙂", " über", " ß",
)  # fmt: skip


_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _dumps(obj: object) -> str:
    # How OpenAI and Anthropic serialize: no spaces, non-ASCII left as raw UTF-8.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _random_id(rng: random.Random, length: int, alphabet: str = _ID_CHARS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def _tokens(rng: random.Random, count: int) -> Iterator[str]:
    for _ in range(count):
        token = rng.choice(_WORDS)
        if rng.random() < 0.3:  # a longer word: 1-8 letters, sometimes spaced
            length = rng.randint(1, 8)
            token = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
            if rng.random() < 0.6 and length < 8:
                token = " " + token
        yield token[:8]


def openai_chat_stream(tokens: int = 20_000, seed: int = 1) -> list[bytes]:
    """An OpenAI `chat.completion.chunk` stream with `stream_options.include_usage` set.

    A role chunk, `tokens` content chunks of 1-8 characters, a finish chunk, a usage chunk and
    `data: [DONE]`: `tokens + 4` events.
    """
    rng = random.Random(seed)
    head = {
        "id": "chatcmpl-" + _random_id(rng, 29),
        "object": "chat.completion.chunk",
        "created": 1_727_000_000 + rng.randint(0, 10**6),
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_" + _random_id(rng, 10, "0123456789abcdef"),
    }

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {_dumps({**head, 'choices': [choice], 'usage': None})}\n\n".encode()

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events.extend(chunk({"content": token}) for token in _tokens(rng, tokens))
    events.append(chunk({}, "stop"))
    usage = {
        "prompt_tokens": 37,
        "completion_tokens": tokens,
        "total_tokens": 37 + tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    events.append(f"data: {_dumps({**head, 'choices': [], 'usage': usage})}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_stream(tokens: int = 20_000, seed: int = 2) -> list[bytes]:
    """An Anthropic Messages stream: named events, one text block, a ping every 500 deltas."""
    rng = random.Random(seed)

    def event(name: str, data: dict[str, object]) -> bytes:
        return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()

    message: dict[str, object] = {
        "id": "msg_01" + _random_id(rng, 22),
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    events = [
        event("message_start", {"type": "message_start", "message": message}),
        event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        event("ping", {"type": "ping"}),
    ]
    for i, token in enumerate(_tokens(rng, tokens)):
        delta = {"type": "text_delta", "text": token}
        events.append(
            event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        )
        if i % 500 == 499:
            events.append(event("ping", {"type": "ping"}))
    events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    events.append(
        event(
            "message_delta",
            {"type": "message_delta", "delta": stop, "usage": {"output_tokens": tokens}},
        )
    )
    events.append(event("message_stop", {"type": "message_stop"}))
    return events


def large_event_stream(count: int, size: int = 64 * 1024, seed: int = 3) -> list[bytes]:
    """`count` events whose data is one line of exactly `size` base64 characters.

    One long line per event is the hard case for a decoder: it arrives over many reads and
    must be buffered without copying it again on every read.
    """
    rng = random.Random(seed)
    raw = rng.randbytes(size)  # base64 of `size` bytes is longer than `size` characters
    events = []
    for i in range(count):
        # Rotate the text so events differ without generating fresh random bytes for each.
        text = base64.b64encode(raw[i % 251 :] + raw[: i % 251])[:size]
        events.append(b"data: " + text + b"\n\n")
    return events


def to_crlf(events: list[bytes]) -> list[bytes]:
    """The same events with CRLF line endings (JSON payloads never hold a raw LF)."""
    return [event.replace(b"\n", b"\r\n") for event in events]


def split_reads(data: bytes, size: int | tuple[int, int], seed: int = 4) -> list[bytes]:
    """Cut `data` into reads of `size` bytes, or of seeded random sizes in [low, high]."""
    if isinstance(size, int):
        return [data[i : i + size] for i in range(0, len(data), size)]
    low, high = size
    rng = random.Random(seed)
    reads = []
    start = 0
    while start < len(data):
        end = start + rng.randint(low, high)
        reads.append(data[start:end])
        start = end
    return reads
