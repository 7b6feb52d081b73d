"""What the clients check of a transport, which may be a user's.

docs/transports.md states the rules. Where breaking one would surface far away as an obscure
error, lose the text received so far, or stop the timeouts of other streams, the clients check
it here and say which rule was broken, in the transport's name.
"""

from __future__ import annotations

import inspect
import warnings

from ._exceptions import (
    APIConnectionError,
    ConfigurationError,
    ConnectError,
    HolySheepError,
    LocalProtocolError,
)

__all__ = [
    "check_response",
    "check_transport",
    "close_failed",
    "interrupt_failed",
    "stray_error",
    "transport_error",
]

_RULES = "see docs/transports.md"


def check_transport(transport: object, *, is_async: bool) -> None:
    """Refuse, at construction, a transport of the other kind (`AsyncMockTransport` given to
    `Client`), which failed at the first request with "'coroutine' object has no attribute
    'status_code'" or "object Response can't be used in 'await' expression"."""
    name = type(transport).__name__
    send = getattr(transport, "send", None)
    if not callable(send):
        raise ConfigurationError(f"the transport must have a send(request) method; {name} has not")
    if is_async:
        if not callable(getattr(transport, "aclose", None)):
            raise ConfigurationError(
                f"{name} is not an async transport (it has no `async def aclose()`): give "
                "AsyncClient an AsyncBaseTransport (AsyncHTTPXTransport, AiohttpTransport, "
                f"AsyncMockTransport), or use {name} with Client"
            )
    elif inspect.iscoroutinefunction(send):
        raise ConfigurationError(
            f"{name} is an async transport (its send is a coroutine): give Client a "
            "BaseTransport (RequestsTransport, HTTPXTransport, MockTransport), or use "
            f"{name} with AsyncClient"
        )
    elif not callable(getattr(transport, "close", None)):
        raise ConfigurationError(
            f"the transport must have a close() method, which Client.close() calls; {name} "
            "has not (subclass BaseTransport for one that does nothing)"
        )


def check_response(response: object, transport: object, *, is_async: bool) -> None:
    """Refuse something other than a response from `send` (None, a sync `Response` from an
    async transport), which failed later as an `AttributeError` from inside the client, or as
    an internal error about deadlines."""
    if is_async:
        stream = getattr(response, "stream", None)
        fine = hasattr(response, "aclose") and hasattr(stream, "__anext__")
        kind = "an AsyncResponse whose stream is an async iterator of bytes"
    else:
        fine = hasattr(response, "close") and hasattr(response, "stream")
        kind = "a Response"
    if not (fine and hasattr(response, "status_code")):
        raise LocalProtocolError(
            f"{type(transport).__name__}.send() must return {kind}, but it returned "
            f"{type(response).__name__}: {response!r:.80} ({_RULES})"
        )


def stray_error(exc: OSError, transport: object) -> APIConnectionError:
    """The holysheep error for an OS error a transport let through.

    The rule is that transports translate their errors, but an `OSError` (a reset, a socket
    timeout) left as it is is the commonest slip in a transport of one's own. Raised as it was,
    it was not retried, carried no request id, and under `complete()` took the text received so
    far with it. It is what the built-in transports raise for it instead: a connection that
    failed (`ConnectError` for one refused, which never reached the server).
    """
    cls = ConnectError if isinstance(exc, ConnectionRefusedError) else APIConnectionError
    error = cls(
        f"the connection failed: {type(transport).__name__} raised {exc!r} (a transport "
        f"should raise holysheep's APIConnectionError for it: {_RULES})"
    )
    error.__cause__ = exc
    return error


def transport_error(exc: HolySheepError | OSError, transport: object) -> HolySheepError:
    """What a transport raised, as the holysheep error it stands for: its own, or the one an
    `OSError` it let through is taken for (see `stray_error`)."""
    return exc if isinstance(exc, HolySheepError) else stray_error(exc, transport)


def close_failed(transport: object, exc: Exception) -> None:
    """A response's close raised: say so, as a warning.

    Raised, it took the place of the stream's outcome: a 503 about to be retried, a stream cut
    short with its partial completion, even a complete answer. The outcome stands; the
    connection may not have been released, which is the transport's to fix.
    """
    warnings.warn(
        f"{type(transport).__name__}: closing a response raised {exc!r}; the stream's outcome "
        f"stands, but its connection may not have been released ({_RULES})",
        RuntimeWarning,
        stacklevel=2,
    )


def interrupt_failed(transport: object, exc: Exception) -> None:
    """A response's `interrupt` raised in the watchdog thread: the same warning's twin."""
    warnings.warn(
        f"{type(transport).__name__}: interrupting a read raised {exc!r}; the response was "
        f"closed instead, to end the read ({_RULES})",
        RuntimeWarning,
        stacklevel=2,
    )
