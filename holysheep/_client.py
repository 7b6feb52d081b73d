"""The sync client: drives an `Exchange` with blocking reads and a watchdog thread.

A blocking read cannot time itself out on a deadline that moves (the idle timeout restarts
with every content chunk, but not with keep-alive comments), so one watchdog thread per client
watches the deadlines of its open streams and closes a stream whose deadline passed; the read
then fails and the stream raises the typed timeout. The same mechanism serves
`stream.close()` from another thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from ._call import Attempt, Call, OnInterrupt, ShownText, StreamView
from ._chat import ChatChunk, Completion
from ._config import ClientConfig, checked_limiter
from ._contract import (
    check_response,
    check_transport,
    close_failed,
    interrupt_failed,
    transport_error,
)
from ._exceptions import (
    APIConnectionError,
    APITimeoutError,
    ConnectTimeoutError,
    HolySheepError,
    LocalProtocolError,
)
from ._exchange import MAX_ERROR_BODY, Exchange, StreamStats, Timeouts
from ._gate import Gate, gate_for
from ._limiter import RateLimiter, Ticket
from ._observe import Observer
from ._retry import GiveUp, RetryPolicy
from ._waiting import NO_RETRY_CLIENT_CLOSED, Waiting, gone_error

if TYPE_CHECKING:
    from holysheep.transports import BaseTransport, Response

__all__ = ["Client", "Stream"]

_clock = time.monotonic

# How long the watchdog waits, with nothing to watch, before it looks again (see `_Watchdog`).
_IDLE_RECHECK = 1.0
# With nothing to watch for a while, how long the thread sleeps unless a stream wakes it: long
# enough to cost nothing, short enough that a stop it missed (see `release`) ends it anyway.
_IDLE_SLEEP = 30.0


class Client:
    """Streams chat completions synchronously.

    `api_key` and `base_url` default to `HOLYSHEEP_API_KEY` and `HOLYSHEEP_BASE_URL`;
    `transport` defaults to `RequestsTransport()`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: Timeouts | float | None = None,
        transport: BaseTransport | None = None,
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
            from holysheep.transports import RequestsTransport

            transport = RequestsTransport()
        else:
            check_transport(transport, is_async=False)
        self.transport = transport
        self.chat = Chat(self)
        self._watchdog = _Watchdog()
        self._waiting = Waiting()
        # A client dropped without `close()` ends its watchdog thread with it (streams still
        # open keep theirs until they end, as after `close()`).
        weakref.finalize(self, self._watchdog.release)
        self._closed = False

    @property
    def base_url(self) -> str:
        return self._config.base_url

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} base_url={self.base_url!r} "
            f"transport={type(self.transport).__name__}{state}>"
        )

    def close(self) -> None:
        """Close the transport; streams still open keep their timeouts until they end.

        Streams waiting to send (in the rate limiter's queue, or to retry) are woken, and
        raise: the error they were to retry, or that nothing was sent.
        """
        self._closed = True
        self._waiting.close()
        self._watchdog.stop()
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Chat:
    """`client.chat`: the chat completions endpoint."""

    def __init__(self, client: Client) -> None:
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
    ) -> Stream:
        """Start a streamed completion. Use as `with client.chat.stream(...) as stream:`.

        Extra keyword arguments (`max_tokens`, `temperature`, `tools`, ...) go into the JSON
        body as they are. `retry` and `on_interrupt` override the client's for this call.
        """
        client = self._client
        if client._closed:
            raise LocalProtocolError("the Client is closed: make a new one to send requests")
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
        return Stream(call, client.transport, client._watchdog, gate, client._waiting)

    def complete(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        **params: Any,
    ) -> Completion:
        """Stream a completion to the end and return it (the stream protects against timeouts
        a single long response cannot).

        Left to the default `on_interrupt`, a broken connection or a stall after content starts
        over: the caller sees no text before this returns, so none would be repeated to it
        (see `Call.completing`).
        """
        stream = self.stream(model=model, messages=messages, **params)
        stream._call.completing()
        with stream:
            return stream.until_done()


class Stream(StreamView):
    """One streamed completion: iterate it for `ChatChunk`s; `completion` and `stats` after."""

    # Slots: no per-instance dict; one is open per stream, thousands at a time.
    __slots__ = (
        "_away",
        "_body",
        "_call",
        "_closed",
        "_exhausted",
        "_expired",
        "_expiry",
        "_gate",
        "_gone",
        "_in_with",
        "_lapsed",
        "_lock",
        "_reading",
        "_response",
        "_sending",
        "_stop",
        "_ticket",
        "_transport",
        "_waiting",
        "_watchdog",
    )

    def __init__(
        self,
        call: Call,
        transport: BaseTransport,
        watchdog: _Watchdog,
        gate: Gate | None,
        waiting: Waiting,
    ) -> None:
        self._call = call
        self._waiting = waiting
        self._gone = False  # the client closed while this stream waited (see `Waiting`)
        self._transport = transport
        self._watchdog = watchdog
        self._gate = gate
        self._ticket: Ticket | None = None
        self._response: Response | None = None
        self._body: Iterator[bytes] | None = None
        self._lock = threading.Lock()
        # Set by close(): ends a wait for the rate limiter or a retry. Made when one starts
        # (`_stop_event`): most streams never wait, and an Event (a Condition and a lock
        # inside, and set() taking them) cost some 15,000 instructions per stream.
        self._stop: threading.Event | None = None
        self._closed = False
        self._expired = False
        self._expiry: APITimeoutError | None = None  # what the watchdog found, see `_expire`
        self._exhausted = False
        self._reading = False  # an iteration is under way (see `__iter__`)
        self._sending = False  # a thread is in `transport.send` (see `close`)
        # Whether the caller has the stream and is not reading it (see `_lapse`), and whether
        # a ttft or idle deadline passed meanwhile.
        self._away = True
        self._lapsed = False
        self._in_with = False  # inside `with stream:`, whose `__exit__` reports (see `__iter__`)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Stream:
        self.open()
        self._in_with = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._in_with = False
        if exc is not None:  # `left` looks at nothing else, as in the async twin
            self._call.left(_clock(), exc)
        self.close()
        # An iteration the caller left in this block closed the stream, and left its end for
        # here, where the exception the caller left with is known (see `__iter__`).
        self._call.ended(_clock())
        if self._away or not self._reading:
            # Nobody is in a read: this thread may close (see `close`); a thread that is
            # reading ends the attempt itself, having seen `_closed`.
            self._end_attempt()

    def open(self) -> None:
        """Send the request and read the response head, retrying as the policy allows.

        Raises the typed error for a status that cannot be retried (or no longer can).
        """
        self._away = False
        while self._body is None and not self._closed:
            exchange = self._call.start_attempt(_clock())
            try:
                try:
                    self._open_attempt(exchange)
                except HolySheepError as exc:
                    # `closed`, not `_closed`, which the loop's test narrows for mypy: another
                    # thread may have set it while the request was sent (a send cannot be cut
                    # short, see `close`). The caller stopped the stream, and hears of no
                    # failure after that, as in a read.
                    if self.closed and not self._expired:
                        break
                    if self._gone:
                        raise  # the client closed while it waited (see `_gone_error`)
                    self._after_failure(exc)  # waits to retry, or raises (reported already)
            except BaseException as exc:
                # Ctrl-C or a transport's bug while queued, sending, reading an error body or
                # waiting to retry: `__exit__` will not run (this is `__enter__`), so give back
                # the connection and the rate limiter's slot here, as the async client does,
                # and tell observers how the request ended.
                self._end_attempt()
                self._away = True
                self._call.ended(_clock(), exc)
                raise
        self._away = True
        if self._closed:
            self._end_attempt()  # closed by another thread while this one was opening

    def close(self) -> None:
        """Close the connection. Safe to call from another thread while one is reading.

        Only the thread reading a stream may close its connection while it reads: a socket
        closed under a read about to start lets the kernel give its number to the next
        connection opened, and the read then waits on that one, for good. So when a read may
        be under way (the reader is not `_away`) this only wakes it (`Response.interrupt`),
        and the reader, which checks `_closed` after saying it reads, ends the attempt.
        """
        self._close(report=True)

    def _close(self, *, report: bool) -> None:
        """`close()`; `report`: tell observers of the end, or leave that to `__exit__`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sending = self._sending
            stop = self._stop  # under the lock: see `_stop_event`
        if stop is not None:
            stop.set()
            if self._gate is not None:
                self._gate.wake()  # a wait in the limiter's queue sees it now, not at its next look
        if sending:
            # The request is still going out, or its head still coming, in another thread,
            # which cannot be cut short. It ends the attempt when `send` returns, and only then
            # gives back the rate limiter's slot: the server still holds a request until then.
            pass
        elif self._away:
            self._end_attempt()
        else:
            self._interrupt()
        if self._call.exchange is not None:
            now = _clock()
            self._call.exchange.finish(now)
            if report:
                self._call.ended(now)

    # -- reading -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ChatChunk]:
        with self._lock:
            if self._reading:
                # Two iterations would take each other's chunks, and the second one would
                # take over the first one's deadline and reads: refuse it, as the async
                # client refuses a second task.
                raise RuntimeError("this stream is already being read (by another iteration)")
            if self._exhausted and not self._exchange.accumulator.closed:
                # An earlier iteration ended it early; reading on would look like a normal
                # end with nothing more, which it is not.
                raise LocalProtocolError(
                    "this stream was closed before its end, by close() or by an earlier "
                    "iteration that stopped early (a `break`, an error, or an iterator dropped "
                    "after `next()`: a sync stream closes when its iterator goes); what arrived "
                    "is in `stream.completion`"
                )
            self._reading = True
        try:
            self.open()
        except BaseException:
            self._reading = False
            raise
        stopped = False  # by the caller: a `break`, or an exception in its loop body
        try:
            while self._body is not None and not self._exhausted:
                try:
                    yield from self._read_attempt()
                    return
                except (HolySheepError, OSError) as raised:  # (an OSError: see `stray_error`)
                    exc = transport_error(raised, self._transport)
                    if self._closed and not self._expired:
                        return  # closed by the caller: stop quietly, the partial result stays
                    # What the read's failure stands for (the watchdog's timeout, a cut
                    # stream), as the async client sees it, before asking the core.
                    failure = self._timeout_or(exc)
                    if failure is not exc and failure.__cause__ is None:
                        # As the async client raises it: from the transport's error, which
                        # holds the HTTP library's (it was missing from the chain).
                        failure.__cause__ = exc
                    if self._exchange.complete_at_break(failure, _clock()):
                        # `[DONE]` came: the answer is complete, whatever the connection did
                        # after it (broke, or lingered past `AFTER_DONE` and was closed); or
                        # it broke after the finish, where a clean end would be accepted.
                        self._exchange.on_eof(_clock())
                        self._end_attempt()
                        return
                    self._after_failure(failure)
                    self.open()
                    # Only once the new attempt is open: if it fails for good, the caller keeps
                    # what it showed, and the error carries it; if the caller closed the stream
                    # meanwhile, the completion still is what it showed.
                    if self._body is not None:
                        reset = self._call.take_reset()
                        if reset is not None:
                            yield ChatChunk.for_reset(reset)
        except GeneratorExit:
            stopped = True
            raise
        except BaseException as exc:
            # Raised by the reading, never by the caller's code (which runs outside this
            # generator): a transport's bug, Ctrl-C during a read, or an error reported already.
            self._call.ended(_clock(), exc)
            raise
        finally:
            self._exhausted = True
            self._reading = False
            # A `for` loop left by an exception closes this generator before the `with` block's
            # `__exit__` runs, and nothing here tells Ctrl-C or `SystemExit` (an error, see
            # `Call.left`) from a `break` (an end): inside `with stream:`, that is left to
            # `__exit__`, which is told. Outside one, it is an end (observability.md says so).
            self._close(report=not (stopped and self._in_with))
            self._end_attempt()

    def _read_attempt(self) -> Iterator[ChatChunk]:
        exchange, body = self._exchange, self._body
        assert body is not None
        on_data, delivered = exchange.on_data, self._call.delivered
        waiting_for_first = waiting_for_end = True
        # Before every read: say so (`_away` False), then look whether `close()` or the
        # watchdog stopped the stream; they set their flag, then look at `_away` (see `close`).
        self._away = False
        if self._lapsed:
            self._resume()
        if self._closed or self._expired:
            body = iter(())
        for data in body:
            now = _clock()
            chunks = on_data(data, now)
            if waiting_for_end and exchange.done_at is not None:
                # After [DONE] only the end of the body is awaited, briefly: the deadline
                # moves earlier, so the watchdog must know.
                waiting_for_end = False
                self._watchdog.watch(self)
            if chunks:
                if waiting_for_first and exchange.progressed:
                    # The first content swaps the ttft deadline for the idle one, which may
                    # come sooner: the only time a deadline moves earlier.
                    waiting_for_first = False
                    self._watchdog.watch(self)
                # Away first: `delivered` runs the observers, whose time is the caller's, as
                # the loop body's is (a slow one was taken for a stalled server).
                self._away = True
                delivered(chunks, now)
                for chunk in chunks:
                    if self._closed:  # by the loop body, an observer, another thread
                        break
                    yield chunk
                self._away = False
                if self._lapsed:
                    self._resume()
                if self._closed or self._expired:
                    break
                if exchange.failure is not None:
                    raise exchange.failure  # in the bytes after these chunks (`Exchange.on_data`)
        if self._expired and exchange.done_at is None:
            raise self._timeout_or(None)
        if not self._closed:
            exchange.on_eof(_clock())
            self._end_attempt()

    def text_stream(self) -> Iterator[str]:
        """Only the content text, piece by piece (skips chunks without any).

        After a restart (`on_interrupt="restart"`) only text beyond what was already yielded
        comes, since printed text cannot be taken back (see `ShownText`).
        """
        if self._call.on_interrupt != "restart":  # no Reset can come: nothing to match
            for chunk in self:
                if chunk.text:
                    yield chunk.text
            return
        # Its errors are made by the call (`Call.error_to_raise`, `Call.ended`), so that
        # observers are told of the exception raised here, not of another, or of an end.
        shown = ShownText(self._call)
        for chunk in self:
            text = shown.take(chunk)
            if text is None:
                failure = shown.diverged(self.completion, self.request_id)
                self._call.ended(_clock(), failure)  # before `close()` reports an end
                self.close()
                raise failure
            if text:
                yield text
        early = shown.ended_early()
        if early is not None:
            raise early

    def until_done(self) -> Completion:
        """Read the stream to its end and return the completion."""
        for _ in self:
            pass
        return self.completion

    @property
    def stats(self) -> StreamStats:
        return self._exchange.stats(_clock(), self._call)

    # -- internals ---------------------------------------------------------------------------

    def _open_attempt(self, exchange: Exchange) -> None:
        self._expired = False
        if self._gate is not None:
            waited = _clock()
            stop = self._stop_event()
            until = exchange.send_deadline()
            within = None if until is None else until - waited
            if not self._waiting.enter(self):
                raise self._gone_error()
            try:
                self._ticket = self._gate.acquire(self._call.cost, stop.is_set, within)
            finally:
                self._waiting.leave(self)
            now = _clock()
            self._call.queued += now - waited
            if self._gone and not self._closed:
                # (Admitted as the close came, too: the transport is closed; `open()` gives
                # the ticket back.)
                raise self._gone_error()
            if self._ticket is None:
                if stop.is_set():
                    return  # closed while queued
                raise exchange.queue_timeout(now)  # a retry still queued at `total`
        self._call.sending()
        exchange.start(_clock())
        self._watchdog.watch(self)
        with self._lock:
            closed = self._closed
            self._sending = not closed
        if closed:  # just now: give back what `close()` may have found not yet taken
            self._end_attempt()
            return
        try:
            response = self._transport.send(exchange.request)
        except (HolySheepError, OSError) as exc:  # (an OSError: see `stray_error`)
            error = transport_error(exc, self._transport)
            exchange.send_failed(error)
            self._raise_for(error)
        finally:
            with self._lock:
                self._sending = False
        check_response(response, self._transport, is_async=False)
        with self._lock:
            closed = self._closed
            self._response = response
        if closed:
            # `close()` came while we were queued or sending, and found no response to close
            # (or no ticket to give back yet).
            self._end_attempt()
            return
        if self._expired:
            # The head came just after the watchdog gave up on it (the socket waits `connect`
            # plus a little): that timeout stands, as on the async client.
            raise self._timeout_or(None)
        action = exchange.on_headers(response.status_code, response.headers, _clock())
        if action == "read_error_body":
            raise exchange.error_for_body(self._read_error_body(response))
        self._body = response.stream

    def _after_failure(self, error: HolySheepError) -> None:
        """End the failed attempt; wait and return to try again, or raise."""
        self._end_attempt()
        decision = self._call.failed(error, _clock(), time.time())
        if decision.pause is not None and self._gate is not None:
            self._gate.pause(decision.pause)  # a 429: the whole account waits
        if not isinstance(decision, GiveUp):
            if self._waiting.enter(self):
                try:
                    self._stop_event().wait(decision.delay)
                finally:
                    self._waiting.leave(self)
            else:
                self._gone = True
            if self._gone and not self._closed:
                decision = NO_RETRY_CLIENT_CLOSED  # (see `Waiting`)
        if isinstance(decision, GiveUp):
            failure = self._call.error_to_raise(error, decision)
            self._call.ended(_clock(), failure)
            if failure is error:
                raise error
            raise failure from error
        # Closed while waiting to retry: the caller stopped the stream, which ends quietly
        # with what it has (`close()` reported the end), as a close during a read does.

    def _client_closed(self) -> None:
        """The client closed while this stream waited to send: wake it (see `Waiting`)."""
        self._gone = True
        self._stop_event().set()
        if self._gate is not None:
            self._gate.wake()

    def _gone_error(self) -> HolySheepError:
        """The error to raise for `_gone` (see `gone_error`)."""
        self._gone = True
        return gone_error(self._call)

    def _end_attempt(self) -> None:
        self._watchdog.unwatch(self)
        with self._lock:  # the owner's thread and `close()` may both get here
            response, self._response, self._body = self._response, None, None
            ticket, self._ticket = self._ticket, None
        try:
            if response is not None:
                try:
                    response.close()
                except Exception as exc:  # never instead of the stream's outcome
                    close_failed(self._transport, exc)
        finally:  # as in the async client: a close that raises must not keep the ticket
            if ticket is not None and self._gate is not None:
                self._gate.release(ticket, self._call.tokens_used(self._exchange))

    def _stop_event(self) -> threading.Event:
        """The event `close()` sets, made on first use, and set already if `close()` came
        first. Both look at the other's flag under `_lock`, so one of them always sets it."""
        with self._lock:
            stop = self._stop
            if stop is None:
                stop = self._stop = threading.Event()
                if self._closed:
                    stop.set()
        return stop

    def _raise_for(self, exc: HolySheepError) -> NoReturn:
        """Raise what `exc`, raised by the transport, stands for (see `_timeout_or`)."""
        failure = self._timeout_or(exc)
        if failure is exc:
            # As it was: `raise exc from exc` made it its own cause, losing the HTTP
            # library's error it was raised from.
            raise exc
        raise failure from exc

    def _timeout_or(self, exc: HolySheepError | None) -> HolySheepError:
        now = _clock()
        if self._expired and not isinstance(exc, ConnectTimeoutError):
            timeout = self._expiry
        else:  # the transport's own connect timeout says more than the watchdog knew
            timeout = self._exchange.timeout_error(now, exc)
        if timeout is not None:
            return timeout
        if exc is None:  # pragma: no cover - the watchdog only expires streams that are due
            raise RuntimeError("stream expired without a due timeout")
        if self._body is not None and isinstance(exc, APIConnectionError):
            return self._exchange.interrupted(exc, now)  # the transport lost the stream
        if exc.request_id is None:
            exc.request_id = self._exchange.server_request_id or self._exchange.request_id
        return exc

    def _read_error_body(self, response: Response) -> bytes:
        parts: list[bytes] = []
        size = 0
        try:
            for data in response.stream:
                parts.append(data)
                size += len(data)
                if size >= MAX_ERROR_BODY:
                    break
        except (HolySheepError, OSError):
            pass  # what arrived is still worth quoting
        return b"".join(parts)

    def _lapse(self) -> bool:
        """Called by the watchdog, under its lock, when a ttft or idle deadline passed.

        True if the caller was not reading (busy between chunks, or not iterating yet): its
        next read then starts those clocks again instead (`Exchange.resumed`), since the
        server may well have sent on time. The caller sets `_away` before it reads `_lapsed`,
        and we the other way round, so one of us always sees the other's flag.
        """
        self._lapsed = True
        if self._away:
            return True
        self._lapsed = False
        return False

    def _resume(self) -> None:
        """The caller is back after a lapse: restart the clocks and have them watched again."""
        with self._watchdog.lock:
            self._lapsed = False
            if self._expired or self._closed:
                return  # the watchdog expired the stream first: the read reports that
            late = self._exchange.resumed(_clock())
            if late is not None:
                self._expire(late)
                return
        self._watchdog.watch(self)

    def _expire(self, error: APITimeoutError | None) -> None:
        """Called by the watchdog when a deadline passed.

        `error` is kept for the reader: content may still arrive between this and the read
        failing, and move the deadline later, but the connection is closed by then.
        """
        self._expiry = error
        self._expired = True
        if not self._away:
            try:
                self._interrupt()
            except Exception as exc:
                # The transport's own bug: in the watchdog's thread it ended the thread, and
                # every stream of the client lost its timeouts. Its close must wake the read.
                interrupt_failed(self._transport, exc)
                response = self._response
                if response is not None:
                    with contextlib.suppress(Exception):
                        response.close()
        # else: the reader is not reading; it finds `_expired` before its next read.

    def _interrupt(self) -> None:
        """Wake a read under way in another thread, leaving the close to it (see `close`)."""
        response = self._response
        if response is not None:
            (response.interrupt or response.close)()


class _Watchdog:
    """One thread per client that closes streams whose deadline passed.

    Streams only register and unregister; the thread recomputes deadlines when it wakes, so a
    deadline that moved later (new content arrived) costs the reading thread nothing. A stream
    wakes the thread only when its deadline comes before the thread's next look.

    With nothing to watch the thread looks again a second later, and only after a second look
    finds nothing does it sleep until woken (a stream that wakes it starts that over). Sleeping
    at once made every stream wake it when streams are short: each had ended before the thread
    ran, so the thread always found nothing and the next stream woke it again, a thread switch
    per stream (a third of the client's CPU for a stream from `MockTransport`).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._streams: set[Stream] = set()
        self._thread: threading.Thread | None = None
        self._wake_at: float | None = None
        self._stopped = False
        #: How many times the thread has looked at its streams (for tests and debugging).
        self.looks = 0

    @property
    def lock(self) -> threading.Condition:
        """Held while the thread looks at its streams."""
        return self._cond

    def watch(self, stream: Stream) -> None:
        due = stream._exchange.deadline()
        if due is None or stream._closed:
            return
        with self._cond:
            self._streams.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="holysheep-watchdog", daemon=True
                )
                self._thread.start()
            elif self._wake_at is None or due[0] < self._wake_at:
                self._cond.notify()

    def unwatch(self, stream: Stream) -> None:
        with self._cond:
            self._streams.discard(stream)

    def stop(self) -> None:
        """Stop once the streams still watched have ended; a later `watch` starts it again."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread if not self._streams else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def release(self) -> None:
        """`stop()` without waiting: for a client the garbage collector takes unclosed, whose
        thread would otherwise sleep for the rest of the process."""
        self._stopped = True
        # Not waiting for the lock: the collector may run this in a thread that holds a lock a
        # transport's close needs, while the thread holds ours closing a stream. Without the
        # notice, the thread sees `_stopped` at its next look (`_IDLE_SLEEP` at the latest).
        if self._cond.acquire(blocking=False):
            try:
                self._cond.notify()
            finally:
                self._cond.release()

    def _run(self) -> None:
        with self._cond:
            try:
                idle = False  # the last look found nothing to watch
                # Stopped by `Client.close()`: streams still open keep their deadlines until
                # they end.
                while not self._stopped or self._streams:
                    self.looks += 1
                    now = _clock()
                    soonest = self._look(now)
                    if soonest is None and not idle:
                        idle, soonest = True, now + _IDLE_RECHECK
                    elif soonest is not None:
                        idle = False
                    self._wake_at = soonest
                    wait = _IDLE_SLEEP if soonest is None else max(0.0, soonest - now) + 0.001
                    if self._cond.wait(wait):
                        # Woken by a stream: if it has ended before this look, look again in a
                        # while rather than sleeping until the next one wakes us too.
                        idle = False
            finally:
                # Under the lock: a `watch` from now on starts a new one (after an error too,
                # or the client's streams would have no timeouts from then on).
                self._thread = None

    def _look(self, now: float) -> float | None:
        """Expire the streams that are due; the soonest deadline of the others.

        A method of its own so that no stream outlives the look in a local variable of the
        sleeping thread: that kept the last stream, its transport and its socket alive.
        """
        soonest: float | None = None
        for stream in list(self._streams):
            exchange = stream._exchange
            due = exchange.deadline()
            if due is None:
                self._streams.discard(stream)
            elif due[0] <= now and due[1] == "done":
                self._streams.discard(stream)
                stream._expire(None)  # the body lingers after [DONE]: close it
            elif due[0] <= now and (error := exchange.timeout_error(now)) is not None:
                # (None: content moved the deadline since `deadline()`; look again.)
                self._streams.discard(stream)
                if error.timeout == "total" or not stream._lapse():
                    stream._expire(error)
            elif soonest is None or due[0] < soonest:
                soonest = due[0]
        return soonest
