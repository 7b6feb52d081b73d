"""What the two end-to-end property tests (`test_client_properties*.py`) share: the request,
a retry policy that never waits, and how a scripted body is cut into reads."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import attrs

from holysheep import RetryPolicy
from holysheep.transports import MockResponse

MESSAGES = [{"role": "user", "content": "Count sheep."}]
# No waits between attempts: the policy's backoff is zero and a 429 asks for 0 s.
NO_WAIT = RetryPolicy(wait_initial=0, wait_max=0, wait_jitter=0)
KEEP_ALIVE = b": keep-alive\n\n"
# The in-band errors a script may end a stream with: one retryable, one final.
ERRORS: dict[str, dict[str, str]] = {
    "error": {"type": "overloaded_error", "message": "busy, try again"},
    "fatal": {"type": "invalid_request_error", "message": "no such thing"},
}


def split(body: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """`body` as reads of `sizes` bytes, cycled; () is one read (none for an empty body)."""
    if not sizes:
        return [body] if body else []
    reads, at, n = [], 0, 0
    while at < len(body):
        size = sizes[n % len(sizes)]
        reads.append(body[at : at + size])
        at, n = at + size, n + 1
    return reads


def status_response(status: int, headers: dict[str, str]) -> MockResponse:
    """An error status as the API answers it: a JSON error body (`invalid_request_error` for
    a 400), and `Retry-After: 0` on a 429 so that no test waits."""
    headers = {**headers, "content-type": "application/json"}
    if status == 429:
        headers["retry-after"] = "0"
    error = {"message": f"status {status}", "type": "server_error"}
    if status == 400:
        error["type"] = "invalid_request_error"
    return MockResponse(status, chunks=[json.dumps({"error": error}).encode()], headers=headers)


W = TypeVar("W", bound=Any)


def retried(
    mode: str,
    *,
    interrupted: bool,
    reconnecting: bool,
    delivered: bool,
    retryable: bool,
    ids: bool,
    clean_end: bool,
    attempts_in_run: int,
    attempts: int,
) -> bool:
    """Whether a failed attempt is tried again, as resilience.md says (`Call.failed`): both
    property tests' models ask this one question the same way."""
    if interrupted and mode == "resume" and not ids:
        return False  # "the stream cannot be resumed: the server sent no event ids"
    if interrupted and mode == "complete" and not reconnecting and clean_end:
        return False  # "the server ended the stream before it was done"
    blocked = delivered and not (interrupted and mode != "raise")
    return retryable and not blocked and attempts_in_run < attempts


def as_complete(world: W) -> W:
    """`world` as `complete()` meets it: its text reaches nobody before the end, so the
    default mode (a "raise" world leaves it to the client) is "complete" (see `Call.completing`)."""
    return attrs.evolve(world, mode="complete") if world.mode == "raise" else world
