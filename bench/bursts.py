"""Bursts: B batches of N concurrent short streams, one after another, on one async client.

A batch job sends N prompts at once, waits for them all, then sends the next N. From the second
batch on, httpx's pool holds idle connections, and httpcore 1.0's bookkeeping pass costs
O(idle x connections) each time a stream starts or ends. The httpx transports mend their own
pool (transports/_httpcore_pool.py); this measures it side by side with raw httpx, with our
transport on httpcore's own pool, and with aiohttp, in one run against the local upstream.

Run: python bench/bursts.py [--streams 200] [--batches 5] [--tokens 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _upstream_proc as upstream_proc
import client as peers

import holysheep
from holysheep.transports import AiohttpTransport, AsyncHTTPXTransport, _httpcore_pool


def _stock_pool() -> AsyncHTTPXTransport:
    """Our transport on httpcore's pool as it ships (the mend taken back)."""
    transport = AsyncHTTPXTransport()
    pool = transport.client._transport._pool  # type: ignore[attr-defined]
    pool.__class__ = type(pool).__mro__[1]
    return transport


def _contenders(url: str) -> dict[str, Callable[[], Any]]:
    def ours(transport: Any) -> Callable[[], Any]:
        def build() -> Any:
            return peers.HolySheepAsync(url, transport())

        return build

    return {
        "raw httpx": lambda: peers.RawHttpxAsync(url),
        "AsyncClient (httpx)": ours(AsyncHTTPXTransport),
        "AsyncClient (httpx, httpcore's pool)": ours(_stock_pool),
        "AsyncClient (aiohttp)": ours(AiohttpTransport),
    }


async def _batches(impl: Any, streams: int, batches: int, tokens: int) -> list[float]:
    """CPU seconds of each batch after the first (which opens the connections)."""
    spent = []
    for _ in range(batches + 1):
        started = time.process_time()
        samples = await asyncio.gather(*(impl.stream(tokens) for _ in range(streams)))
        if not all(sample.done or sample.events == tokens for sample in samples):
            raise RuntimeError("a stream did not finish")
        spent.append(time.process_time() - started)
    return spent[1:]


async def _run(url: str, streams: int, batches: int, tokens: int) -> dict[str, list[float]]:
    results = {}
    for name, build in _contenders(url).items():
        impl = build()
        start: Callable[[], Awaitable[None]] | None = getattr(impl, "start", None)
        if start is not None:
            await start()
        try:
            results[name] = await _batches(impl, streams, batches, tokens)
        finally:
            await impl.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=5)
    args = parser.parse_args()
    with upstream_proc.Upstream(tokens=args.tokens) as upstream:
        results = asyncio.run(_run(upstream.url, args.streams, args.batches, args.tokens))
    raw = sum(results["raw httpx"])
    print(
        f"{args.batches} batches of {args.streams} concurrent {args.tokens}-token streams after "
        f"a first one: client CPU in all, and of the worst batch (holysheep "
        f"{holysheep.__version__}, httpcore pool mended: {_httpcore_pool._KNOWN_LAYOUT})"
    )
    print(f"{'contender':38} {'CPU ms':>8} {'vs raw httpx':>12} {'worst batch ms':>15}")
    for name, spent in results.items():
        total = sum(spent)
        print(f"{name:38} {total * 1000:8.0f} {total / raw:11.2f}x {max(spent) * 1000:15.0f}")


if __name__ == "__main__":
    main()
