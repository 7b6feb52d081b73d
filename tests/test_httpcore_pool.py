"""The httpx transports' pool bookkeeping (`transports/_httpcore_pool.py`): httpcore's rules for
handing out connections, with idle connections counted right and in one pass."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpcore
import httpx
from hypothesis import given
from hypothesis import strategies as st

from holysheep.testing import serve
from holysheep.transports import AsyncHTTPXTransport, HTTPXTransport, _httpcore_pool
from holysheep.transports._httpcore_pool import _assign

BODY = b'{"model":"m","messages":[],"stream":true}'

# -- the pass, on connections whose state we choose ------------------------------------------

STATES = ("idle", "active", "closed", "connecting", "failed")


class FakeConnection:
    """The part of httpcore's connection interface the pass uses, counting its socket polls."""

    def __init__(self, origin: str, state: str = "connecting", expired: bool = False) -> None:
        self.origin = origin
        self.state = state
        self.expired = expired  # idle: the server closed it, or its keep-alive ran out
        self.polls = 0

    def can_handle_request(self, origin: Any) -> bool:
        return bool(origin == self.origin)

    def is_available(self) -> bool:
        return self.state == "idle"

    def has_expired(self) -> bool:
        if self.state == "idle":
            self.polls += 1
            return self.expired
        return self.state == "failed"

    def is_idle(self) -> bool:
        return self.state in ("idle", "failed")

    def is_closed(self) -> bool:
        return self.state == "closed"


class FakeRequest:
    def __init__(self, origin: str, connection: FakeConnection | None = None) -> None:
        self.request = type("R", (), {"url": type("U", (), {"origin": origin})()})()
        self.connection = connection

    def is_queued(self) -> bool:
        return self.connection is None

    def assign_to_connection(self, connection: FakeConnection) -> None:
        self.connection = connection


class FakePool:
    def __init__(
        self,
        connections: list[FakeConnection],
        requests: list[FakeRequest],
        max_connections: int,
        max_keepalive: int,
        swept: float,
    ) -> None:
        self._connections = connections
        self._requests = requests
        self._max_connections = max_connections
        self._max_keepalive_connections = min(max_connections, max_keepalive)
        self._swept = swept

    def create_connection(self, origin: str) -> FakeConnection:
        return FakeConnection(origin)


@st.composite
def pools(draw: st.DrawFn) -> FakePool:
    origins = ["a", "b", "c"][: draw(st.integers(1, 3))]
    connections = [
        FakeConnection(
            draw(st.sampled_from(origins)), draw(st.sampled_from(STATES)), draw(st.booleans())
        )
        for _ in range(draw(st.integers(0, 12)))
    ]
    requests = []
    for _ in range(draw(st.integers(0, 10))):
        origin = draw(st.sampled_from(origins))
        # A request holds an active connection (streaming), or an idle one it was handed and
        # has not started on yet, or waits for one.
        fitting = [c for c in connections if c.origin == origin and c.state in ("active", "idle")]
        holds = draw(st.sampled_from([None, *fitting]))
        requests.append(FakeRequest(origin, holds))
    return FakePool(
        connections,
        requests,
        max_connections=draw(st.integers(1, 15)),
        max_keepalive=draw(st.integers(0, 6)),
        swept=draw(st.sampled_from([0.0, time.monotonic() + 3600])),  # sweeping, or not
    )


@given(pools())
def test_the_pass_keeps_httpcores_rules(pool: FakePool) -> None:
    before = list(pool._connections)
    held = {id(r.connection) for r in pool._requests if r.connection is not None}
    queued = [r for r in pool._requests if r.connection is None]
    closing = _assign(pool)
    after = pool._connections

    assert not {id(c) for c in closing} & {id(c) for c in after}
    assert all(c in before for c in closing), "only connections of the pool are closed"
    assert not any(id(c) in held for c in closing), "a connection a request holds is closed"
    assert not any(c.is_closed() for c in after + closing)
    assert all(c in after for c in before if id(c) in held), "a held connection left the pool"
    assert all(c in after or c in closing for c in before if not c.is_closed())
    assert all(c.state != "failed" for c in after), "one that failed to connect stays"
    orphans = [c for c in after if c.state in ("active", "connecting") and id(c) not in held]
    assert not [c for c in orphans if c in before], "a busy connection nobody holds stays"
    spare = [c for c in after if c.is_idle() and id(c) not in held]
    assert len(spare) <= pool._max_keepalive_connections
    assert len(after) <= max(pool._max_connections, len(before))
    for request in queued:
        chosen = request.connection
        if chosen is not None:
            assert chosen in after
            assert chosen.can_handle_request(request.request.url.origin)
            if chosen in before:
                assert chosen.state == "idle"
                # (One held already was asked when it was first handed out, and is handed
                # out again as httpcore does: see `_assign`.)
                if id(chosen) not in held:
                    assert not chosen.expired, "handed out a connection the server closed"
        else:
            # Left waiting only when nothing could serve it: no live idle connection to its
            # origin nobody was handed, no room for a new one, and no spare one to close.
            origin = request.request.url.origin
            taken = {id(r.connection) for r in pool._requests if r.connection is not None}
            assert not any(
                c.can_handle_request(origin) and c.is_available() and not c.expired
                for c in after
                if id(c) not in taken
            )
            assert len(after) >= pool._max_connections
            assert not [c for c in after if c.is_idle() and id(c) not in taken]


@given(pools())
def test_an_idle_connection_handed_out_was_asked_whether_it_expired(pool: FakePool) -> None:
    queued = [r for r in pool._requests if r.connection is None]
    held = {id(r.connection) for r in pool._requests if r.connection is not None}
    before = list(pool._connections)
    _assign(pool)
    for request in queued:
        chosen = request.connection
        if chosen is not None and chosen in before and id(chosen) not in held:
            assert chosen.polls >= 1
            assert not chosen.expired


def test_evicts_only_idle_connections_past_the_keepalive_limit() -> None:
    """httpcore 1.0 counted every connection against `max_keepalive_connections`, so with more
    open than that it closed every idle one; the limit is on idle ones."""
    busy = [FakeConnection("a", "active") for _ in range(8)]
    idle = [FakeConnection("a", "idle") for _ in range(3)]
    pool = FakePool(busy + idle, [FakeRequest("a", c) for c in busy], 100, 5, time.monotonic())
    assert _assign(pool) == []
    assert pool._connections == busy + idle

    spare = [FakeConnection("a", "idle") for _ in range(4)]
    pool = FakePool(busy + idle + spare, [FakeRequest("a", c) for c in busy], 100, 5, 0.0)
    assert _assign(pool) == idle[:2]  # 7 idle, room for 5: the oldest 2 go
    assert pool._connections == busy + idle[2:] + spare


def test_a_pass_polls_no_idle_socket_but_the_one_it_hands_out() -> None:
    """Asking an idle connection whether it expired polls its socket (~10 µs through anyio);
    httpcore asked every one on every pass, and its keep-alive check built a list of all
    connections for each idle one: a burst of N streams cost O(N³)."""
    idle = [FakeConnection("a", "idle") for _ in range(100)]
    waiting = FakeRequest("a")
    pool = FakePool(list(idle), [waiting], 10_000, 100, time.monotonic())
    _assign(pool)
    assert waiting.connection is idle[0]
    assert [c.polls for c in idle] == [1] + [0] * 99

    pool._swept = 0.0  # a second later, every idle connection is asked once
    idle[5].expired = True
    assert _assign(pool) == [idle[5]]
    assert all(c.polls == 1 for c in idle[1:])


def test_a_dead_idle_connection_is_closed_not_handed_out() -> None:
    dead, alive = FakeConnection("a", "idle", expired=True), FakeConnection("a", "idle")
    waiting = FakeRequest("a")
    pool = FakePool([dead, alive], [waiting], 10, 10, time.monotonic())
    assert _assign(pool) == [dead]
    assert waiting.connection is alive


def test_a_full_pool_closes_a_spare_idle_connection_never_a_held_one() -> None:
    handed = FakeConnection("b", "idle")  # handed to a request that has not started on it
    spare = FakeConnection("b", "idle")
    waiting = FakeRequest("a")
    pool = FakePool([handed, spare], [FakeRequest("b", handed), waiting], 2, 10, time.monotonic())
    assert _assign(pool) == [spare]
    assert waiting.connection is not None
    assert waiting.connection.origin == "a"
    assert pool._connections == [handed, waiting.connection]


# -- the transports' own pools, against the local upstream -----------------------------------


def test_the_transports_mend_their_own_pools_only() -> None:
    assert type(HTTPXTransport().client._transport._pool) is _httpcore_pool._Pool  # type: ignore[attr-defined]
    assert type(AsyncHTTPXTransport().client._transport._pool) is _httpcore_pool._AsyncPool  # type: ignore[attr-defined]
    mine = httpx.AsyncClient()
    AsyncHTTPXTransport(mine)
    assert type(mine._transport._pool) is httpcore.AsyncConnectionPool  # type: ignore[attr-defined]
    proxied = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert _httpcore_pool.mend(proxied) is False


def _pool(client: httpx.AsyncClient) -> Any:
    return client._transport._pool  # type: ignore[attr-defined]


def test_idle_connections_stay_pooled_while_more_are_busy() -> None:
    """8 busy connections and 3 idle ones, with room for 5 idle: the next 3 streams reuse the
    idle ones (httpcore 1.0 closed them, as 11 were open in all, and connected 3 times again)."""

    async def main(base_url: str) -> tuple[int, int, int]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=5)
        async with httpx.AsyncClient(limits=limits) as client:
            assert _httpcore_pool.mend(client)
            pool = _pool(client)
            made = []
            create = pool.create_connection
            pool.create_connection = lambda origin: made.append(origin) or create(origin)
            url = base_url + "/chat/completions"

            async def one() -> None:
                async with client.stream("POST", url, content=BODY) as response:
                    await response.aread()

            busy = [client.stream("POST", url, content=BODY) for _ in range(8)]
            for stream in busy:
                await stream.__aenter__()  # 8 busy connections
            await asyncio.gather(*(one() for _ in range(3)))  # and 3 idle ones
            before = len(made)
            await asyncio.gather(*(one() for _ in range(3)))
            again = len(made) - before
            idle = sum(c.is_idle() for c in pool.connections)
            for stream in busy:
                await stream.__aexit__(None, None, None)
            return before, again, idle

    with serve(tokens=3, tokens_per_s=20) as upstream:
        assert asyncio.run(main(upstream.base_url)) == (11, 0, 3)


def test_a_connection_past_its_keepalive_is_not_reused() -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=5, keepalive_expiry=0.05)
    with serve(tokens=2) as upstream, httpx.Client(limits=limits) as client:
        assert _httpcore_pool.mend(client)
        url = upstream.base_url + "/chat/completions"
        with client.stream("POST", url, content=BODY) as response:
            response.read()
        first = _pool(client).connections[0]  # type: ignore[arg-type]
        time.sleep(0.1)
        with client.stream("POST", url, content=BODY) as response:
            assert response.read().endswith(b"data: [DONE]\n\n")
        assert first.is_closed()
        assert first not in _pool(client).connections  # type: ignore[arg-type]


def test_a_connection_made_for_a_cancelled_request_is_closed() -> None:
    """A request cancelled after the pool made it a connection, before it started on it, left
    that connection in the pool for good (encode/httpcore#1093)."""
    orphan, mine = FakeConnection("a", "connecting"), FakeConnection("a", "active")
    pool = FakePool([orphan, mine], [FakeRequest("a", mine)], 10, 10, time.monotonic())
    assert _assign(pool) == [orphan]
    assert pool._connections == [mine]


def test_cancelled_requests_leave_the_pool_serving() -> None:
    """Requests cancelled at every stage, many times over, on a pool of 5: httpcore 1.0 was
    left with 5 connections nobody used or closed, and the next request waited for one until
    its pool timeout."""

    async def main(url: str) -> int:
        limits = httpx.Limits(max_connections=5, max_keepalive_connections=5)
        async with httpx.AsyncClient(limits=limits) as client:
            assert _httpcore_pool.mend(client)

            async def one() -> None:
                async with client.stream("POST", url, content=BODY) as response:
                    await response.aread()

            for round in range(40):
                tasks = [asyncio.ensure_future(one()) for _ in range(20)]
                await asyncio.sleep(round % 10 / 1000)  # cancelled at every stage
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            response = await client.post(url, content=BODY, timeout=httpx.Timeout(5, pool=2))
            return response.status_code

    with serve(tokens=3, ttft=0.005) as upstream:
        assert 200 == asyncio.run(main(upstream.base_url + "/chat/completions"))
