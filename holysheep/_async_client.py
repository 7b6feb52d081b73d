"""The async client: drives an `Exchange` with anyio, so it runs on asyncio and trio.

Every wait (sending the request, each body read) ends at the exchange's next deadline; when it
expires the exchange names the timeout. `close()` from another task ends the pending wait the
same way. Cleanup runs shielded and bounded, so cancelling a task never leaks its connection.

How a read is bounded depends on the event loop. On trio, each read runs in a cancel scope
(cheap there). On asyncio an anyio cancel scope per read costs about as much as parsing the
event it brings, so body reads use one lazy timer per stream instead: it is armed at the
deadline, and when it fires it re-arms itself if the deadline moved later (content arrived) or
else cancels the reading task, the way `asyncio.timeout` does, and the read turns that into the
typed timeout. Content arriving costs nothing but a comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from ._call import Attempt, Call, OnInterrupt, ShownText, StreamView
from ._chat import ChatChunk, Completion
from ._config import ClientConfig, checked_limiter
from ._contract import check_response, check_transport, close_failed, transport_error
from ._exceptions import APIConnectionError, HolySheepError, LocalProtocolError
from ._exchange import MAX_ERROR_BODY, Exchange, StreamStats, Timeouts
from ._gate import Gate, gate_for
from ._limiter import RateLimiter, Ticket
from ._observe import Observer
from ._retry import GiveUp, RetryPolicy
from ._waiting import NO_RETRY_CLIENT_CLOSED, Waiting, gone_error

if TYPE_CHECKING:
    from holysheep.transports import AsyncBaseTransport, AsyncResponse

__all__ = ["AsyncClient", "AsyncStream"]

_NO_CHUNKS: list[ChatChunk] = []  # shared, never mutated

# Closing a connection is local work; if it takes longer, something is wrong and we move on.
_CLOSE_TIMEOUT = 5.0

# asyncio's own loops (`BaseEventLoop` and its subclasses) tell the time with this method,
# which returns `time.monotonic()`: the clock is read directly when a loop's class has not
# replaced it (uvloop's is its own, and asked), a Python frame less for each of the dozen clock
# reads of a stream. A test in `tests/test_client.py` checks the two clocks agree.
_BASE_TIME = asyncio.BaseEventLoop.time
_monotonic = time.monotonic


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
        retry: RetryPolicy | None = None,
        on_interrupt: OnInterrupt | None = None,
        limiter: RateLimiter | None = None,
        hooks: Iterable[Callable[[Attempt], None]] = (),
        observers: Iterable[Observer] = (),
    ) -> None:
        self._config = ClientConfig.from_arguments(
            api_key,
            base_url,
            timeout,
            headers,
            require_end,
            retry,
            on_interrupt,
            hooks,
            observers,
        )
        self.limiter = checked_limiter(limiter)
        if transport is None:
            from holysheep.transports import AsyncHTTPXTransport

            transport = AsyncHTTPXTransport()
        else:
            check_transport(transport, is_async=True)
        self.transport = transport
        self.chat = AsyncChat(self)
        self._closed = False
        self._waiting = Waiting()

    @property
    def base_url(self) -> str:
        return self._config.base_url

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} base_url={self.base_url!r} "
            f"transport={type(self.transport).__name__}{state}>"
        )

    async def aclose(self) -> None:
        """Close the transport. Streams waiting to send (in the rate limiter's queue, or to
        retry) are woken, and raise: the error they were to retry, or that nothing was sent."""
        self._closed = True
        self._waiting.close()
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
        retry: RetryPolicy | None = None,
        on_interrupt: OnInterrupt | None = None,
        **params: Any,
    ) -> AsyncStream:
        """Start a streamed completion: `async with client.chat.stream(...) as stream:`."""
        client = self._client
        if client._closed:
            raise LocalProtocolError("the AsyncClient is closed: make a new one to send requests")
        call = client._config.call(
            model,
            messages,
            params,
            timeout=timeout,
            request_id=request_id,
            headers=extra_headers,
            retry=retry,
            on_interrupt=on_interrupt,
            limited=client.limiter is not None,
        )
        gate = gate_for(client.limiter) if client.limiter is not None else None
        return AsyncStream(call, client.transport, gate, client._waiting)

    async def complete(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        **params: Any,
    ) -> Completion:
        """Stream a completion to the end and return it; left to the default `on_interrupt`, a
        broken connection or a stall after content starts over (see `Call.completing`)."""
        stream = self.stream(model=model, messages=messages, **params)
        stream._call.completing()
        async with stream:
            return await stream.until_done()


class AsyncStream(StreamView):
    """One streamed completion: `async for chunk in stream`; `completion` and `stats` after."""

    # Slots: no per-instance dict; one is open per stream, thousands at a time.
    __slots__ = (
        "_body",
        "_busy",
        "_call",
        "_cancelled_read",
        "_closed",
        "_ending",
        "_exhausted",
        "_expired",
        "_failure",
        "_gate",
        "_gone",
        "_index",
        "_lapsed",
        "_pending",
        "_read_to_end",
        "_reader",
        "_response",
        "_scope",
        "_ticket",
        "_timed",
        "_timer",
        "_timer_due",
        "_transport",
        "_waiting",
    )

    def __init__(
        self,
        call: Call,
        transport: AsyncBaseTransport,
        gate: Gate | None,
        waiting: Waiting,
    ) -> None:
        self._call = call
        self._waiting = waiting
        self._gone = False  # the client closed while this stream waited (see `Waiting`)
        self._transport = transport
        self._gate = gate
        self._ticket: Ticket | None = None
        self._response: AsyncResponse | None = None
        self._body: AsyncIterator[bytes] | None = None
        self._scope: anyio.CancelScope | None = None
        self._pending: list[ChatChunk] = _NO_CHUNKS  # chunks of the last read not yet handed out
        self._index = 0
        self._busy = False  # a task is in `__anext__` past the chunks already read
        self._closed = False
        self._exhausted = False
        self._read_to_end: AsyncIterator[bytes] | None = None
        # asyncio only (see the module docstring): the deadline timer, when it is due, the task
        # blocked in a body read, and whether we cancelled it.
        self._timed = False  # reads of this attempt are bounded by `_timer`, not a scope
        self._timer: asyncio.Handle | None = None
        self._timer_due = math.inf
        self._reader: asyncio.Task[Any] | None = None
        self._cancelled_read = False
        self._expired = False
        self._lapsed = False  # a ttft or idle deadline passed while nobody was reading
        self._ending = False  # [DONE] came: see `_received`
        # An error in a read's bytes after the chunks it completed: raised once they are out.
        self._failure: HolySheepError | None = None

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
        if exc is not None:  # `left` looks at nothing else: no clock read for a clean exit
            self._call.left(_now(), exc)
        await self.aclose()

    async def open(self) -> None:
        """Send the request and read the response head, retrying as the policy allows."""
        while self._body is None and not self._closed:
            exchange = self._call.start_attempt(_now())
            try:
                try:
                    await self._open_attempt(exchange)
                except HolySheepError as exc:
                    if self._gone:
                        raise  # the client closed while it waited (see `_gone_error`)
                    await self._after_failure(exc)  # waits to retry, or raises (reported)
            except BaseException as exc:
                # Cancelled while queued, sending, reading an error body or waiting to retry:
                # `__aexit__` will not run, so give back the connection and the rate limiter's
                # slot here, and tell observers how the request ended.
                await self._end_attempt()
                self._call.ended(_now(), exc)
                raise

    async def aclose(self) -> None:
        """Close the connection; the server sees the client leave."""
        self.close()
        if self._response is not None or self._ticket is not None or self._timer is not None:
            await self._end_attempt()
        # else: the attempt ended already (a stream read to its end): nothing to give back

    def close(self) -> None:
        """Stop the stream from another task: a pending read or wait ends at once, quietly.

        The connection itself is released by the reading task (or `aclose()`).
        """
        if self._closed:
            return
        self._closed = True
        self._pending = _NO_CHUNKS  # the rest of the last read's chunks are not handed out
        if self._call.exchange is not None:
            now = _now()
            self._call.exchange.finish(now)
            self._call.ended(now)
        if self._scope is not None:
            self._scope.cancel()
        self._cancel_read()

    # -- reading -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> ChatChunk:
        pending = self._pending
        if pending:
            index = self._index
            chunk = pending[index]
            index += 1
            if index == len(pending):
                # Hand over the last one and let go of the batch: with thousands of open
                # streams, chunks kept until the next read are a third of the memory.
                self._pending = _NO_CHUNKS
            self._index = index
            return chunk
        if self._busy:
            # Another task is in a read: two readers would take each other's chunks, and this
            # one would take over the first one's deadline and `close()`.
            raise RuntimeError("this stream is already being read by another task")
        self._busy = True
        try:
            if self._body is None and not self._exhausted:
                await self.open()
            away = True  # the caller had the stream until now; not on the loop's next turns
            while not self._exhausted:
                try:
                    if self._failure is not None:
                        failure, self._failure = self._failure, None
                        if not self._closed:  # closed by the caller: stop quietly
                            raise failure
                    body = self._body
                    if body is None or self._closed or not self._timed:
                        chunks = await self._read(away)  # trio, and the ends of a stream
                        away = False
                    else:
                        # asyncio's read, here rather than in `_read()`: a blocked read then holds
                        # one coroutine frame less, for each of thousands of open streams.
                        loop = asyncio.get_running_loop()  # once per read: its clock and task
                        if self._lapsed:
                            self._resume(_now())
                        if self._expired:
                            raise self._timeout_or(None)
                        self._reader = reader = asyncio.current_task(loop)
                        data = b""
                        # The end of the body, and a read cut short (by our timer or close()),
                        # are flags, not values of `data`: a body may yield an empty piece.
                        end = cut = False
                        try:
                            data = await body.__anext__()
                        except StopAsyncIteration:
                            end = True
                        except (HolySheepError, OSError) as exc:  # (OSError: `stray_error`)
                            # While the body is still known.
                            self._raise_for(transport_error(exc, self._transport))
                        except asyncio.CancelledError:
                            if not self._only_ours(reader):
                                raise  # the caller's task is being cancelled (too)
                            cut = True
                        finally:
                            self._reader = None
                        if not cut and self._cancelled_read:
                            # the body swallowed our cancellation and read anyway
                            if not self._only_ours(reader):
                                raise asyncio.CancelledError
                            cut = True
                        if cut:
                            chunks = await self._deadline_passed()
                        elif end:
                            chunks = await self._at_eof(body)
                        else:
                            # (None too: `on_data` says the transport broke its contract)
                            now = (
                                _monotonic() if type(loop).time is _BASE_TIME else loop.time()
                            )  # `loop.time()`: see `_BASE_TIME`
                            chunks = self._received(data, now) if data != b"" else []
                except HolySheepError as exc:
                    if self._exchange.complete_at_break(exc, _now()):
                        await self._complete()  # see `Exchange.complete_at_break`
                        continue
                    await self._after_failure(exc)
                    await self.open()
                    # Only once the new attempt is open (see `Stream.__iter__`).
                    reset = self._call.take_reset() if self._body is not None else None
                    chunks = [ChatChunk.for_reset(reset)] if reset is not None else []
                if chunks and not self._closed:  # (closed by an observer told of them)
                    if len(chunks) > 1:
                        self._pending = chunks
                        self._index = 1
                    return chunks[0]
            raise StopAsyncIteration
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            # Raised by the reading, not by the caller's code: a transport's bug, a cancelled
            # read, or an error reported already. Ended here: `__aexit__`, if any, would take
            # an exception for the caller's own, and end the request cleanly.
            self._call.ended(_now(), exc)
            raise
        finally:
            self._busy = False

    async def _read(self, away: bool = True) -> list[ChatChunk]:
        """One read, bounded by the next deadline. `away`: the caller had the stream since the
        last read, rather than this stream's own loop reading on past events with no chunk
        (keep-alive comments)."""
        body = self._body
        if body is None or self._closed:
            await self._finish()
            return []
        data = b""
        due, now = self._exchange.deadline(), _now()
        if away and due is not None and due[1] in ("ttft", "idle") and due[0] <= now:
            # Passed with no read pending: the caller was busy between chunks. As on asyncio,
            # the clocks start again (`total` stays, and the scope below raises it). Not when
            # the loop read on: a read can bring a keep-alive just after its deadline, before
            # the scope cut it, and starting the clocks again then let keep-alives that come on
            # the deadline's beat hold a stalled stream open on trio.
            self._exchange.resumed(now)
        end = False
        with self._deadline_scope() as scope:
            try:
                data = await body.__anext__()
            except StopAsyncIteration:
                end = True  # a flag: a body may also yield an empty piece, which is no end
            except (HolySheepError, OSError) as exc:  # (an OSError: see `stray_error`)
                self._raise_for(transport_error(exc, self._transport))  # while the body is known
        if scope.cancelled_caught:  # a deadline passed, or close() was called
            return await self._deadline_passed()
        if end:
            return await self._at_eof(body)
        return self._received(data, _now()) if data != b"" else []

    def _received(self, data: bytes, now: float) -> list[ChatChunk]:
        # The exchange itself, not `_exchange`: a body is being read, so there is one.
        exchange = self._call.exchange
        assert exchange is not None
        chunks = exchange.on_data(data, now)
        if exchange.done_at is not None and self._timed and not self._ending:
            # Only the end of the body is awaited now, for `AFTER_DONE` at most: a sooner
            # deadline for the timer. Usually the end is in these bytes already and the stream
            # is over before the loop runs the callback, which then has nothing to do: cheaper
            # than arming a timer for every stream.
            self._ending = True
            asyncio.get_running_loop().call_soon(self._arm_unless_over)
        if chunks:
            self._call.delivered(chunks, now)
            self._failure = exchange.failure
        return chunks

    async def _at_eof(self, body: AsyncIterator[bytes]) -> list[ChatChunk]:
        self._read_to_end = body
        now = _now()
        self._exchange.on_eof(now)
        await self._finish(now)
        return []

    async def _deadline_passed(self) -> list[ChatChunk]:
        """A read was cut short: by `close()` (end quietly) or by a deadline (raise)."""
        if self._stopped_by_caller():
            await self._finish()
            return []
        if self._exchange.done_at is not None:
            return await self._complete()  # the body lingered after [DONE]
        raise self._timeout_or(None)

    async def _complete(self) -> list[ChatChunk]:
        """`[DONE]` came: the answer is complete, whatever the connection did after it (broke,
        or lingered past `AFTER_DONE`); end as at the end of the body, closing it."""
        self._exchange.on_eof(_now())
        await self._finish()
        return []

    # -- the asyncio deadline timer ----------------------------------------------------------

    def _arm(self, now: float | None = None) -> None:
        """Make sure the timer fires no later than the exchange's next deadline (`now`: the
        clock, when the caller has just read it).

        Before the first content the deadline is `ttft`, but the first content will swap it
        for `idle`, which may come sooner; arming no later than `idle` from now covers that
        too (a timer that fires early only re-arms), so content never has to touch the timer.
        """
        exchange = self._exchange
        due = exchange.deadline()
        at = math.inf if due is None else due[0]
        idle = exchange.timeouts.idle
        if idle is not None and not exchange.progressed:
            at = min(at, (_now() if now is None else now) + idle)
        if at < self._timer_due:  # never for math.inf: no deadline, no timer
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)
            self._timer_due = at

    def _on_timer(self, again: bool = False) -> None:
        self._timer, self._timer_due = None, math.inf
        due = self._exchange.deadline()
        loop = asyncio.get_running_loop()
        if due is None or due[0] > loop.time():
            # The deadline moved later since we armed (content arrived), or there is none yet
            # (only `idle`, before the first content): wait for the new one.
            self._arm()
            return
        if self._reader is None and due[1] != "total":
            # Nobody is waiting on the server: the caller is busy between chunks. Its next
            # read starts the ttft and idle clocks again (`Exchange.resumed`).
            self._lapsed = True
            return
        if not again and due[1] != "total":
            # Look again after one more turn of the loop. Code that blocks the loop (the
            # caller's, or an observer's) for longer than `idle` leaves the bytes that came
            # meanwhile unread, and a read already waiting: the turn that runs this timer
            # runs the socket's callback too, but wakes the reader only on the next, so the
            # read would be cancelled as its bytes are there. (Costs a turn per timeout, not
            # a clock read per read.) Held as the timer, so that `_disarm` cancels it.
            self._timer = loop.call_soon(self._on_timer, True)
            self._timer_due = -math.inf  # due now: `_arm` must not replace it
            return
        self._expired = True
        self._cancel_read()

    def _arm_unless_over(self) -> None:
        if self._body is not None:
            self._arm()

    def _resume(self, now: float) -> None:
        self._lapsed = False
        if self._exchange.resumed(now) is not None:
            self._expired = True  # `total`, which ran on meanwhile: the read raises it
        else:
            self._arm()

    def _cancel_read(self) -> None:
        reader = self._reader
        if reader is not None and not self._cancelled_read:
            self._cancelled_read = True
            reader.cancel()

    def _only_ours(self, reader: asyncio.Task[Any] | None) -> bool:
        """Whether `reader` was cancelled by our deadline timer alone, after an await.

        Ours is taken back (Python 3.11+ counts cancellations, and `asyncio.timeout` or a
        task group would misread ours). False when none was ours, or when someone else
        cancelled the task too: that cancellation must go on.
        """
        if not self._cancelled_read:
            return False
        self._cancelled_read = False
        uncancel = getattr(reader, "uncancel", None)
        return uncancel is None or uncancel() == 0

    def _disarm(self) -> None:
        timer, self._timer, self._timer_due = self._timer, None, math.inf
        if timer is not None:
            timer.cancel()
        self._expired = self._lapsed = self._ending = False

    async def text_stream(self) -> AsyncIterator[str]:
        """Only the content text, piece by piece (as `Stream.text_stream`, restarts included)."""
        if self._call.on_interrupt != "restart":  # no Reset can come: nothing to match
            async for chunk in self:
                if chunk.text:
                    yield chunk.text
            return
        shown = ShownText(self._call)  # its errors are made by the call (see `Stream`'s)
        async for chunk in self:
            text = shown.take(chunk)
            if text is None:
                failure = shown.diverged(self.completion, self.request_id)
                self._call.ended(_now(), failure)  # before `aclose()` reports an end
                await self.aclose()
                raise failure
            if text:
                yield text
        early = shown.ended_early()
        if early is not None:
            raise early

    async def until_done(self) -> Completion:
        """Read the stream to its end and return the completion."""
        async for _ in self:
            pass
        return self.completion

    @property
    def stats(self) -> StreamStats:
        return self._exchange.stats(_now(), self._call)

    # -- internals ---------------------------------------------------------------------------

    async def _open_attempt(self, exchange: Exchange) -> None:
        if self._gate is not None:
            waited = _now()
            if not self._waiting.enter(self):
                raise self._gone_error()
            try:
                with anyio.CancelScope() as scope:  # `close()` cancels it
                    self._scope = scope
                    if self._closed or self._gone:
                        scope.cancel()
                    until = exchange.send_deadline()
                    within = None if until is None else until - waited
                    self._ticket = await self._gate.aacquire(self._call.cost, within)
            finally:
                self._waiting.leave(self)
            self._scope = None
            now = _now()
            self._call.queued += now - waited
            if self._gone and not self._closed:
                raise self._gone_error()  # (admitted as the close came: `open()` gives it back)
            if self._ticket is None:
                if scope.cancelled_caught or self._closed:
                    return  # closed while queued
                raise exchange.queue_timeout(now)  # a retry still queued at `total`
        self._call.sending()
        now = _now()
        exchange.start(now)
        timed = _on_asyncio()
        if timed:
            response = self._response = await self._send_timed(exchange, now)
        else:
            with self._deadline_scope() as scope:
                try:
                    response = await self._transport.send(exchange.request)
                except (HolySheepError, OSError) as exc:  # (an OSError: see `stray_error`)
                    error = transport_error(exc, self._transport)
                    exchange.send_failed(error)
                    self._raise_for(error)
                check_response(response, self._transport, is_async=True)
                self._response = response
            self._scope = None  # done with: it would otherwise live as long as the stream
            if scope.cancelled_caught:
                response = None
        if response is None:
            if self._stopped_by_caller():
                return
            raise self._timeout_or(None)
        action = exchange.on_headers(response.status_code, response.headers, _now())
        if action == "read_error_body":
            raise exchange.error_for_body(await self._read_error_body(response))
        self._body = response.stream
        # No `_arm()` here: `_send_timed` armed the timer for the deadline before the head,
        # and none after it comes sooner (the ttft clock runs from the same send, or later
        # after a resume; `total` stays; idle-before-content counts from the head, later than
        # from the send). So the timer is due early enough already, and arming would only cost
        # a `deadline()` for every stream.
        self._timed = timed

    async def _send_timed(self, exchange: Exchange, now: float) -> AsyncResponse | None:
        """asyncio: send, bounded by the deadline timer like a read; None if it was cut short.

        Not an anyio cancel scope: entering one gives the task anyio state that lives as long
        as the task, and costs more than the timer, on every stream.
        """
        if self._closed:
            return None
        self._arm(now)
        self._reader = reader = asyncio.current_task()
        try:
            response = await self._transport.send(exchange.request)
        except (HolySheepError, OSError) as exc:  # (an OSError: see `stray_error`)
            error = transport_error(exc, self._transport)
            exchange.send_failed(error)
            self._raise_for(error)
        except asyncio.CancelledError:
            if not self._only_ours(reader):
                raise  # the caller's task is being cancelled (too)
            return None
        finally:
            self._reader = None
        check_response(response, self._transport, is_async=True)
        if self._cancelled_read:  # the transport swallowed our cancellation and answered
            ours = self._only_ours(reader)
            await response.aclose()
            if not ours:
                raise asyncio.CancelledError
            return None
        return response

    async def _after_failure(self, error: HolySheepError) -> None:
        """End the failed attempt; wait and return to try again, or raise."""
        await self._end_attempt()
        decision = self._call.failed(error, _now(), time.time())
        if decision.pause is not None and self._gate is not None:
            self._gate.pause(decision.pause)  # a 429: the whole account waits
        if not isinstance(decision, GiveUp):
            if self._waiting.enter(self):
                try:
                    with anyio.CancelScope() as scope:
                        self._scope = scope
                        if self._closed or self._gone:
                            scope.cancel()
                        await anyio.sleep(decision.delay)
                finally:
                    self._waiting.leave(self)
            else:
                self._gone = True
            if self._gone and not self._closed:
                decision = NO_RETRY_CLIENT_CLOSED  # (see `Waiting`)
        if isinstance(decision, GiveUp):
            self._exhausted = True
            failure = self._call.error_to_raise(error, decision)
            self._call.ended(_now(), failure)
            if failure is error:
                raise error
            raise failure from error
        if self._closed:
            # The caller stopped the stream while it waited to retry: it ends quietly with what
            # it has (`close()` reported the end), as a close during a read does.
            self._exhausted = True

    async def _finish(self, now: float | None = None) -> None:
        self._exhausted = True
        await self._end_attempt()
        self._call.ended(_now() if now is None else now)

    async def _end_attempt(self) -> None:
        self._disarm()
        response, self._response = self._response, None
        body, self._body = self._body, None
        ticket, self._ticket = self._ticket, None
        try:
            if response is not None and body is not None and body is self._read_to_end:
                # Nothing left to wait for: the close returns at once (transport rule 4), so
                # the caller's cancellation cannot cut it short, and a scope would be a tenth
                # of the CPU a short stream costs.
                await _close(body, response, self._transport)
            elif response is not None:
                with anyio.CancelScope(shield=True, deadline=_now() + _CLOSE_TIMEOUT):
                    await _close(body, response, self._transport)
        finally:
            if ticket is not None and self._gate is not None:
                self._gate.release(ticket, self._call.tokens_used(self._exchange))

    def _client_closed(self) -> None:
        """The client closed while this stream waited to send: wake it (see `Waiting`)."""
        self._gone = True
        if self._scope is not None:
            self._scope.cancel()

    def _gone_error(self) -> HolySheepError:
        """The error to raise for `_gone` (see `gone_error`)."""
        self._gone = True
        return gone_error(self._call)

    def _stopped_by_caller(self) -> bool:
        # A method, not an inline test: the flag changes while we await.
        return self._closed and self._exchange.timeout_error(_now()) is None

    def _deadline_scope(self) -> anyio.CancelScope:
        due = self._exchange.deadline()
        scope = anyio.CancelScope(deadline=math.inf if due is None else due[0])
        if self._closed:
            scope.cancel()
        self._scope = scope
        return scope

    def _raise_for(self, exc: HolySheepError) -> NoReturn:
        """Raise what `exc`, raised by the transport, stands for (see `_timeout_or`)."""
        failure = self._timeout_or(exc)
        if failure is exc:
            # As it was: `raise exc from exc` made it its own cause, losing the HTTP
            # library's error it was raised from.
            raise exc
        raise failure from exc

    def _timeout_or(self, exc: HolySheepError | None) -> HolySheepError:
        now = _now()
        timeout = self._exchange.timeout_error(now, exc)
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
        stream = response.stream
        with self._deadline_scope():
            try:
                async for data in stream:
                    parts.append(data)
                    size += len(data)
                    if size >= MAX_ERROR_BODY:
                        break
            except (HolySheepError, OSError):
                pass  # what arrived is still worth quoting
            finally:
                # A body left mid-way is closed here: no body of the stream's own will be.
                close = getattr(stream, "aclose", None)
                if close is not None:
                    with contextlib.suppress(HolySheepError, OSError):
                        await close()
        return b"".join(parts)


async def _close(
    body: AsyncIterator[bytes] | None, response: AsyncResponse, transport: object
) -> None:
    try:
        close_body = getattr(body, "aclose", None)
        if close_body is not None:
            with contextlib.suppress(RuntimeError):  # still running in another task
                await close_body()
        await response.aclose()
    except Exception as exc:  # never instead of the stream's outcome
        close_failed(transport, exc)


def _now() -> float:
    """anyio's clock: on asyncio the loop's time, read without anyio's backend lookup (which
    costs more than the rest of a read's bookkeeping)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        return anyio.current_time()
    # `loop.time()`, without its frame for asyncio's own loops (see `_BASE_TIME`).
    return _monotonic() if type(loop).time is _BASE_TIME else loop.time()


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio (anyio's other backend)
        return False
    return True
