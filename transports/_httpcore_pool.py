"""httpcore's connection pool, with its bookkeeping pass made linear (httpx transports only).

Why: httpcore 1.0's pool runs `_assign_requests_to_connections` each time a request starts or
ends. For every idle connection, its first loop decides whether to keep it alive by building a
list of every connection in the pool, so one pass costs O(idle x connections), and a burst of
streams O(idle x connections x streams). A batch job that sends 200 prompts at once, waits for
them, then sends 200 more spent 0.4 s of CPU on the first batch and 3.4 s on the second (raw
httpx alike), nearly all of it in this loop. That list also counts the busy connections with
the idle ones, so the pool closed every idle connection whenever more than
`max_keepalive_connections` were open in all, and the next streams had to connect again.
A connection handed to a waiting request, but not yet in use, looks idle: another pass could
close it, to keep within the keep-alive limit or to make room (encode/httpcore#1110). And one
made for a request that was cancelled before it started on it stayed in the pool for good,
neither idle nor in use: once `max_connections` of them had built up, every request timed
out waiting for a connection (encode/httpcore#1093).

`_assign` is the same pass with those four things done right: it counts idle connections
once, keeps up to `max_keepalive_connections` of them whatever else is open, never closes a
connection a request holds, and closes one nobody holds that is not idle. Which connection a
waiting request gets, and when a new one is opened, are httpcore's rules unchanged: the first
available connection to its origin, else a new one while under `max_connections`, else the
oldest idle one is closed for a new one.

How: `mend()` changes the class of the pool inside the `httpx.Client` or `httpx.AsyncClient` a
transport made itself (a client passed in is left as it is) to a subclass whose only change is
this method. It applies only to httpcore 1.0, whose pool keeps the state `_assign` reads
(`_connections`, `_requests`, the two limits); under any other version the pool is left alone.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import httpcore
import httpx

__all__ = ["mend"]

# The pool layout `_assign` was written against (httpcore/_async/connection_pool.py, 1.0.x).
_KNOWN_LAYOUT = httpcore.__version__.startswith("1.0.")


class _Connection(Protocol):
    def can_handle_request(self, origin: httpcore.Origin) -> bool: ...
    def is_available(self) -> bool: ...
    def has_expired(self) -> bool: ...
    def is_idle(self) -> bool: ...
    def is_closed(self) -> bool: ...


def _assign(pool: Any) -> list[Any]:
    """One pass of the pool's bookkeeping: drop closed connections, pick those to close, and
    give waiting requests a connection. Returns the connections to close (outside the lock)."""
    connections: list[_Connection] = pool._connections
    closing: list[_Connection] = []
    kept: list[_Connection] = []
    idle: list[_Connection] = []  # oldest first, as the pool keeps them
    busy: list[_Connection] = []  # connecting, or carrying a request
    for connection in connections:
        if connection.is_closed():
            continue
        if connection.is_idle() and connection.is_available():
            idle.append(connection)
        elif connection.has_expired():  # no socket poll: busy, connecting, or failed to connect
            closing.append(connection)
            continue
        else:
            busy.append(connection)
        kept.append(connection)
    # Connections a request holds: busy ones, and idle ones handed to a request that has not
    # started on them yet. Neither is closed to save room.
    held = {id(request.connection) for request in pool._requests if request.connection is not None}
    # A busy connection no request holds was made for a request cancelled before it started on
    # it (still connecting, or connected with nothing sent): nothing would ever use or close
    # it, and `max_connections` of them left the pool serving nobody (encode/httpcore#1093).
    closing.extend(connection for connection in busy if id(connection) not in held)
    if idle:
        idle = [connection for connection in idle if id(connection) not in held]
        # Whether an idle connection expired (its keep-alive ran out, or the server closed
        # it) is asked when it is handed out, and of all of them once a second: asking polls
        # its socket, which for a hundred idle connections on every pass was most of the pass.
        now = time.monotonic()
        if now - pool._swept >= _SWEEP_EVERY:
            pool._swept = now
            expired = [connection for connection in idle if connection.has_expired()]
            if expired:
                closing.extend(expired)
                idle = [connection for connection in idle if connection not in expired]
    surplus = len(idle) - pool._max_keepalive_connections
    if surplus > 0:
        closing.extend(idle[:surplus])
        del idle[:surplus]
    if closing or len(kept) != len(connections):
        gone = {id(connection) for connection in closing}
        # The same list object: the pool's own methods hold no copy.
        connections[:] = [connection for connection in kept if id(connection) not in gone]

    queued = [request for request in pool._requests if request.is_queued()]
    if not queued:
        return closing
    available = [connection for connection in connections if connection.is_available()]

    def close(connection: _Connection) -> None:
        connections.remove(connection)
        if connection in available:
            available.remove(connection)
        if connection in idle:
            idle.remove(connection)
        closing.append(connection)

    for request in queued:
        origin = request.request.url.origin
        chosen: _Connection | None = None
        for candidate in [c for c in available if c.can_handle_request(origin)]:
            # Asked when first handed out. One already handed to a request that has not
            # started on it is handed out again, as httpcore does: the request that finds it
            # taken waits its turn again, which paces the opening of new connections in a
            # burst of thousands (given one each at once, their connects starved each other
            # past the head timeout).
            if id(candidate) not in held and candidate.is_idle() and candidate.has_expired():
                close(candidate)
                continue
            chosen = candidate
            break
        if chosen is None:
            if len(connections) >= pool._max_connections:
                victim = next((c for c in idle if id(c) not in held), None)
                if victim is None:
                    continue  # waits for a connection to come free
                close(victim)
            chosen = pool.create_connection(origin)
            connections.append(chosen)
            if chosen.is_available():  # one that may become HTTP/2 takes more requests
                available.append(chosen)
        held.add(id(chosen))
        request.assign_to_connection(chosen)
    return closing


# How often every idle connection is asked whether it expired (see `_assign`).
_SWEEP_EVERY = 1.0


class _AsyncPool(httpcore.AsyncConnectionPool):
    _swept = 0.0  # when `_assign` last asked every idle connection whether it expired

    def _assign_requests_to_connections(self) -> list[Any]:
        return _assign(self)


class _Pool(httpcore.ConnectionPool):
    _swept = 0.0

    def _assign_requests_to_connections(self) -> list[Any]:
        return _assign(self)


_MENDED: dict[type, type] = {
    httpcore.AsyncConnectionPool: _AsyncPool,
    httpcore.ConnectionPool: _Pool,
}


def mend(client: httpx.Client | httpx.AsyncClient) -> bool:
    """Give `client`'s own connection pool the linear bookkeeping pass; False if it is not
    httpx's own transport over a plain httpcore 1.0 pool (then nothing is changed)."""
    if not _KNOWN_LAYOUT:
        return False
    transport = getattr(client, "_transport", None)
    if type(transport) not in (httpx.HTTPTransport, httpx.AsyncHTTPTransport):
        return False
    pool = getattr(transport, "_pool", None)
    mended = _MENDED.get(type(pool))
    if mended is None or not all(
        hasattr(pool, name)
        for name in ("_connections", "_requests", "_max_connections", "_max_keepalive_connections")
    ):
        return False
    pool.__class__ = mended  # a subclass adding no state: the same object, one method changed
    return True
