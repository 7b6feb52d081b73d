"""The async client: drives an `Exchange` with anyio, so it runs on asyncio and trio.

Every wait (sending the request, each body read) runs in a cancel scope whose deadline is the
exchange's next deadline, read just before the wait; when the scope expires the exchange names
the timeout. `close()` from another task cancels the pending read the same way. Cleanup runs
shielded and bounded, so cancelling a task never leaks its connection.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from ._chat import ChatChunk, Completion
from ._config import ClientConfig
from ._exceptions import APIConnectionError, HolySheepError
from ._exchange import MAX_ERROR_BODY, Exchange, StreamStats, Timeouts

if TYPE_CHECKING:
    from holysheep.transports import AsyncBaseTransport, AsyncResponse

__all__ = ["AsyncClient", "AsyncStream"]

# Closing a connection is local work; if it takes longer, something is wrong and we move on.
_CLOSE_TIMEOUT = 5.0


class AsyncClient:
    """Streams chat completions with `await`, on asyncio or trio.

    `transport` defaults to `AsyncHTTPXTransport()`; see `Client` for the other arguments.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: Timeouts | float | None = None,
        transport: AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        require_end: bool = True,
    ) -> None:
        self._config = ClientConfig.from_arguments(api_key, base_url, timeout, headers, require_end)
        if transport is None:
            from holysheep.transports import AsyncHTTPXTransport

            transport = AsyncHTTPXTransport()
        self.transport = transport
        self.chat = AsyncChat(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncChat:
    """`client.chat` for the async client."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def stream(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        timeout: Timeouts | float | None = None,
        request_id: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncStream:
        """Start a streamed completion: `async with client.chat.stream(...) as stream:`."""
        exchange = self._client._config.exchange(
            model, messages, params, timeout=timeout, request_id=request_id, headers=extra_headers
        )
        return AsyncStream(exchange, self._client.transport)

    async def complete(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        **params: Any,
    ) -> Completion:
        """Stream a completion to the end and return it."""
        async with self.stream(model=model, messages=messages, **params) as stream:
            return await stream.until_done()


class AsyncStream:
    """One streamed completion: `async for chunk in stream`; `completion` and `stats` after."""

    def __init__(self, exchange: Exchange, transport: AsyncBaseTransport) -> None:
        self._exchange = exchange
        self._transport = transport
        self._response: AsyncResponse | None = None
        self._body: AsyncIterator[bytes] | None = None
        self._scope: anyio.CancelScope | None = None
        self._pending: list[ChatChunk] = []
        self._index = 0
        self._closed = False
        self._exhausted = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncStream:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Send the request and read the response head. Raises on an error status."""
        if self._response is not None or self._closed:
            return
        exchange = self._exchange
        exchange.start(anyio.current_time())
        with self._deadline_scope() as scope:
            try:
                self._response = await self._transport.send(exchange.request)
            except HolySheepError as exc:
                raise self._timeout_or(exc) from exc
        response = self._response
        if scope.cancelled_caught or response is None:
            if self._stopped_by_caller():
                return
            raise self._timeout_or(None)
        action = exchange.on_headers(response.status_code, response.headers, anyio.current_time())
        if action == "read_error_body":
            body = await self._read_error_body(response)
            await self.aclose()
            raise exchange.error_for_body(body)
        self._body = response.stream

    async def aclose(self) -> None:
        """Close the connection; the server sees the client leave."""
        self.close()
        response, self._response = self._response, None
        body, self._body = self._body, None
        if response is not None:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + _CLOSE_TIMEOUT
                close_body = getattr(body, "aclose", None)
                if close_body is not None:
                    with contextlib.suppress(RuntimeError):  # still running in another task
                        await close_body()
                await response.aclose()

    def close(self) -> None:
        """Stop the stream from another task: a pending read ends at once, quietly.

        The connection itself is released by the reading task (or `aclose()`).
        """
        if self._closed:
            return
        self._closed = True
        self._exchange.finish(anyio.current_time())
        if self._scope is not None:
            self._scope.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- reading -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> ChatChunk:
        pending = self._pending
        if self._index < len(pending):
            chunk = pending[self._index]
            self._index += 1
            return chunk
        if self._body is None:
            await self.open()
        while not self._exhausted:
            chunks = await self._read()
            if chunks:
                self._pending = chunks
                self._index = 1
                return chunks[0]
        raise StopAsyncIteration

    async def _read(self) -> list[ChatChunk]:
        exchange = self._exchange
        body = self._body
        if body is None or self._closed:
            await self._finish()
            return []
        data = b""
        with self._deadline_scope() as scope:
            try:
                data = await body.__anext__()
            except StopAsyncIteration:
                pass
            except HolySheepError as exc:
                failure = self._timeout_or(exc)  # before _finish() forgets the body
                await self._finish()
                raise failure from exc
        now = anyio.current_time()
        if scope.cancelled_caught:  # a deadline passed, or close() was called
            error = None if self._stopped_by_caller() else self._timeout_or(None)
            await self._finish()
            if error is None:
                return []
            raise error
        if not data:
            await self._finish()
            exchange.on_eof(now)
            return []
        try:
            return exchange.on_data(data, now)
        except HolySheepError:
            await self._finish()
            raise

    async def text_stream(self) -> AsyncIterator[str]:
        """Only the content text, piece by piece."""
        async for chunk in self:
            if chunk.text:
                yield chunk.text

    async def until_done(self) -> Completion:
        """Read the stream to its end and return the completion."""
        async for _ in self:
            pass
        return self.completion

    @property
    def completion(self) -> Completion:
        return self._exchange.completion

    @property
    def stats(self) -> StreamStats:
        return self._exchange.stats(anyio.current_time())

    @property
    def request_id(self) -> str:
        return self._exchange.server_request_id or self._exchange.request_id

    # -- internals ---------------------------------------------------------------------------

    def _stopped_by_caller(self) -> bool:
        # A method, not an inline test: the flag changes while we await.
        return self._closed and self._exchange.timeout_error(anyio.current_time()) is None

    def _deadline_scope(self) -> anyio.CancelScope:
        due = self._exchange.deadline()
        scope = anyio.CancelScope(deadline=math.inf if due is None else due[0])
        if self._closed:
            scope.cancel()
        self._scope = scope
        return scope

    async def _finish(self) -> None:
        self._exhausted = True
        await self.aclose()

    def _timeout_or(self, exc: HolySheepError | None) -> HolySheepError:
        now = anyio.current_time()
        timeout = self._exchange.timeout_error(now)
        if timeout is not None:
            return timeout
        if exc is None:  # pragma: no cover - scopes only expire at a due deadline
            raise RuntimeError("deadline scope expired without a due timeout")
        if self._body is not None and isinstance(exc, APIConnectionError):
            return self._exchange.interrupted(exc, now)  # the transport lost the stream
        if exc.request_id is None:
            exc.request_id = self._exchange.server_request_id or self._exchange.request_id
        return exc

    async def _read_error_body(self, response: AsyncResponse) -> bytes:
        parts: list[bytes] = []
        size = 0
        with self._deadline_scope():
            try:
                async for data in response.stream:
                    parts.append(data)
                    size += len(data)
                    if size >= MAX_ERROR_BODY:
                        break
            except HolySheepError:
                pass  # what arrived is still worth quoting
        return b"".join(parts)
