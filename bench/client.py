"""Benchmark holysheep's clients end to end against the peers, over real sockets, in one run.

Run from the repository root (the peers come from the `bench` dependency group, plus aiohttp):

    python bench/client.py                     # full run, about ten minutes
    python bench/client.py --quick             # tiny sizes, seconds: the smoke test
    python bench/client.py --only ttft         # one section: throughput, ttft or concurrency
    python bench/client.py --json              # machine-readable results on stdout

The upstream is `python -m holysheep.testing` in a separate process, so the server never
competes with the client for the GIL and its work is never billed to the client. Three
sections:

1. Throughput: one long stream at full speed, events per second from the first content to
   the end, for every contender; rounds are interleaved so noise hits all of them alike.
2. Time to first token added by the client: many short sequential streams on one client
   object, from just before the request to the first content; compared with raw reading on
   the same HTTP library, plus how many new connections the streams opened (the kernel's
   socket table is the witness, so it works for every library).
3. Concurrency: N slow streams at once in one async process, each contender in its own
   subprocess (clean CPU and RSS figures), N ramping up; a contender that fails a level skips
   the larger ones. Every level gets a fresh upstream.

A contender whose package is missing is listed as "not installed". The script exits 0 unless
it crashes; the PASS/FAIL lines at the end are for people. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import gc
import json
import operator
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import util
from pathlib import Path
from typing import Any

try:  # bench/ is on sys.path when this file runs as a script
    import _upstream_proc as upstream_proc
except ImportError:  # loaded some other way (runpy, a test): find the helper beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _upstream_proc as upstream_proc
import _report as report
from _report import Target, fmt, progress, versions

perf_counter = time.perf_counter

MODEL = "gpt-4.1"
MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
API_KEY = "bench-key"
# Every contender sends the same request, so the server does the same work for each.
HEADERS = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "accept-encoding": "identity",
    "authorization": f"Bearer {API_KEY}",
}
# Raw readers see the first content when the bytes hold a non-empty `"content":"...` string
# (the role chunk that comes first has an empty one).
_FIRST_CONTENT = re.compile(rb'"content":\s*"[^"]')
_DONE = b"data: [DONE]\n\n"


@functools.lru_cache(maxsize=8)
def request_body(tokens: int) -> bytes:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": tokens,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    throughput_tokens: int
    throughput_repeats: int
    ttft_streams: int  # sequential streams per block
    ttft_repeats: int  # blocks per contender
    ttft_tokens: int
    levels: tuple[int, ...]  # concurrent streams
    slow_tokens: int  # tokens per slow stream
    slow_rate: float  # tokens per second of each slow stream
    slow_ttft: float  # server TTFT at level 0; each 1,000 streams add a second (see below)
    level_timeout: float  # seconds one level may take before its streams count as failed
    settle_s: float  # pause before each concurrency contender
    # The concurrency workers' first-generation GC threshold (None: Python's, 700).
    gc_threshold: int | None = None


FULL = Sizes(
    throughput_tokens=20_000,
    throughput_repeats=5,
    ttft_streams=200,
    ttft_repeats=9,
    ttft_tokens=5,
    levels=(100, 1_000, 5_000, 10_000),
    slow_tokens=40,
    slow_rate=10.0,
    slow_ttft=2.0,
    level_timeout=90.0,
    settle_s=3.0,
)
QUICK = Sizes(
    throughput_tokens=2_000,
    throughput_repeats=1,
    ttft_streams=20,
    ttft_repeats=1,
    ttft_tokens=5,
    levels=(20,),
    slow_tokens=5,
    slow_rate=50.0,
    slow_ttft=0.2,
    level_timeout=15.0,
    settle_s=0.0,
)


def level_ttft(sizes: Sizes, streams: int) -> float:
    # The server holds the first token back long enough for the client to open every stream
    # (about a second per 1,000 on this kind of machine), so all N are open at once before
    # the tokens flow: the RSS peak is the cost of N open streams, and the tokens of all N
    # streams overlap in time, which is what "N concurrent streams" means.
    return sizes.slow_ttft + streams / 1000


# -- the contenders -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One stream as a contender saw it."""

    first: float | None  # perf_counter() at the first content, None if none came
    end: float  # perf_counter() when the stream was over
    events: int | None  # content events parsed; None for raw byte readers
    nbytes: int = 0  # body bytes, for raw byte readers
    done: bool = True  # raw readers: the body ended with `data: [DONE]`


class _RawTracker:
    """What a raw byte reader does besides reading: spot the first content and the end."""

    __slots__ = ("first", "head", "nbytes", "tail")

    def __init__(self) -> None:
        self.first: float | None = None
        self.head = b""
        self.tail = b""
        self.nbytes = 0

    def feed(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.first is None:
            self.head += data
            if _FIRST_CONTENT.search(self.head):
                self.first = perf_counter()
                self.head = b""
        self.tail = (self.tail + data)[-len(_DONE) :]

    def sample(self) -> Sample:
        return Sample(self.first, perf_counter(), None, self.nbytes, self.tail == _DONE)


def _first_if_none(first: float | None) -> float:
    return perf_counter() if first is None else first


class HolySheepSync:
    def __init__(self, base_url: str, transport: str) -> None:
        import holysheep
        from holysheep import transports

        chosen = transports.HTTPXTransport() if transport == "httpx" else None
        if transport == "requests":
            chosen = transports.RequestsTransport()
        self.client = holysheep.Client(api_key=API_KEY, base_url=base_url, transport=chosen)

    def stream(self, tokens: int) -> Sample:
        first = None
        events = 0
        with self.client.chat.stream(model=MODEL, messages=MESSAGES, max_tokens=tokens) as stream:
            for chunk in stream:
                if chunk.text:
                    events += 1
                    first = _first_if_none(first)
        return Sample(first, perf_counter(), events)

    def close(self) -> None:
        self.client.close()


class OpenAISync:
    def __init__(self, base_url: str) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)

    def stream(self, tokens: int) -> Sample:
        first = None
        events = 0
        stream = self.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    events += 1
                    first = _first_if_none(first)
        return Sample(first, perf_counter(), events)

    def close(self) -> None:
        self.client.close()


class RawRequests:
    def __init__(self, base_url: str) -> None:
        import requests

        self.session = requests.Session()
        self.url = base_url + "/chat/completions"

    def stream(self, tokens: int) -> Sample:
        seen = _RawTracker()
        with self.session.post(
            self.url, data=request_body(tokens), headers=HEADERS, stream=True, timeout=60
        ) as response:
            for data in response.iter_content(None):
                seen.feed(data)
        return seen.sample()

    def close(self) -> None:
        self.session.close()


class RawHttpx:
    def __init__(self, base_url: str) -> None:
        import httpx

        self.client = httpx.Client(timeout=60)
        self.url = base_url + "/chat/completions"

    def stream(self, tokens: int) -> Sample:
        seen = _RawTracker()
        with self.client.stream(
            "POST", self.url, content=request_body(tokens), headers=HEADERS
        ) as response:
            for data in response.iter_raw():
                seen.feed(data)
        return seen.sample()

    def close(self) -> None:
        self.client.close()


class HttpxSSE:
    """httpx-sse's `EventSource` plus `json.loads`: what a hand-rolled chat client runs."""

    def __init__(self, base_url: str) -> None:
        import httpx

        self.client = httpx.Client(timeout=60)
        self.url = base_url + "/chat/completions"

    def stream(self, tokens: int) -> Sample:
        from httpx_sse import connect_sse

        first = None
        events = 0
        loads = json.loads
        with connect_sse(
            self.client, "POST", self.url, content=request_body(tokens), headers=HEADERS
        ) as source:
            for sse in source.iter_sse():
                if sse.data == "[DONE]":
                    continue
                choices = loads(sse.data).get("choices")
                if choices and choices[0].get("delta", {}).get("content"):
                    events += 1
                    first = _first_if_none(first)
        return Sample(first, perf_counter(), events)

    def close(self) -> None:
        self.client.close()


OnOpen = Callable[[], None]


def _nothing() -> None:
    pass


class HolySheepAsync:
    def __init__(self, base_url: str, transport: Any = "httpx") -> None:
        import holysheep
        from holysheep import transports

        # aiohttp: the transport for many concurrent streams; its session is made lazily,
        # inside the running loop, by the first request. Or a transport object.
        chosen = transport if not isinstance(transport, str) else None
        if transport == "aiohttp":
            chosen = transports.AiohttpTransport()
        self.client = holysheep.AsyncClient(api_key=API_KEY, base_url=base_url, transport=chosen)

    async def stream(self, tokens: int, on_open: OnOpen = _nothing) -> Sample:
        first = None
        events = 0
        async with self.client.chat.stream(
            model=MODEL, messages=MESSAGES, max_tokens=tokens
        ) as stream:
            on_open()
            async for chunk in stream:
                if chunk.text:
                    events += 1
                    first = _first_if_none(first)
        return Sample(first, perf_counter(), events)

    async def aclose(self) -> None:
        await self.client.aclose()


def _many_connections() -> Any:
    import httpx

    # Raised limits: httpx's default pool (100 connections) would queue the 101st stream.
    # Keep-alive stays at 100 like holysheep's transport: with it unbounded, httpcore 1.0
    # rescans every idle connection for each one it checks, and the pool turns cubic.
    return httpx.Limits(max_connections=None, max_keepalive_connections=100)


class RawHttpxAsync:
    def __init__(self, base_url: str) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            limits=_many_connections(), timeout=httpx.Timeout(60.0, pool=None)
        )
        self.url = base_url + "/chat/completions"

    async def stream(self, tokens: int, on_open: OnOpen = _nothing) -> Sample:
        seen = _RawTracker()
        async with self.client.stream(
            "POST", self.url, content=request_body(tokens), headers=HEADERS
        ) as response:
            on_open()
            async for data in response.aiter_raw():
                seen.feed(data)
        return seen.sample()

    async def aclose(self) -> None:
        await self.client.aclose()


class RawAiohttp:
    def __init__(self, base_url: str) -> None:
        import aiohttp

        # aiohttp's session must be made inside the running loop: see `start()`.
        self.aiohttp = aiohttp
        self.session: Any = None
        self.url = base_url + "/chat/completions"

    async def start(self) -> None:
        aiohttp = self.aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # no cap on connections
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=60),
        )

    async def stream(self, tokens: int, on_open: OnOpen = _nothing) -> Sample:
        seen = _RawTracker()
        async with self.session.post(
            self.url, data=request_body(tokens), headers=HEADERS
        ) as response:
            on_open()
            async for data in response.content.iter_any():
                seen.feed(data)
        return seen.sample()

    async def aclose(self) -> None:
        await self.session.close()


class OpenAIAsync:
    def __init__(self, base_url: str) -> None:
        import openai

        make_http = getattr(openai, "DefaultAsyncHttpxClient", None)
        if make_http is None:  # older SDKs: a plain httpx client does the same
            import httpx

            make_http = httpx.AsyncClient
        # The same raised pool limits as raw httpx, or 10,000 streams would queue at 1,000.
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=API_KEY,
            max_retries=0,
            http_client=make_http(limits=_many_connections()),
        )

    async def stream(self, tokens: int, on_open: OnOpen = _nothing) -> Sample:
        first = None
        events = 0
        stream = await self.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            on_open()
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    events += 1
                    first = _first_if_none(first)
        return Sample(first, perf_counter(), events)

    async def aclose(self) -> None:
        await self.client.close()


@dataclass(frozen=True)
class Spec:
    name: str
    needs: tuple[str, ...]  # modules that must be importable
    build: Callable[[str], Any]
    is_async: bool = False

    def missing(self) -> list[str]:
        return [name for name in self.needs if util.find_spec(name) is None]


HS_REQUESTS = "holysheep Client (requests)"
HS_HTTPX = "holysheep Client (httpx)"
HS_ASYNC = "holysheep AsyncClient (httpx)"
HS_ASYNC_AIOHTTP = "holysheep AsyncClient (aiohttp)"
OPENAI = "openai"
OPENAI_ASYNC = "openai async"
RAW_REQUESTS = "raw requests"
RAW_HTTPX = "raw httpx"
RAW_HTTPX_ASYNC = "raw httpx async"
RAW_AIOHTTP = "raw aiohttp"
HTTPX_SSE = "httpx-sse + json"

SPECS = {
    spec.name: spec
    for spec in (
        Spec(HS_REQUESTS, ("holysheep", "requests"), lambda u: HolySheepSync(u, "requests")),
        Spec(HS_HTTPX, ("holysheep", "httpx"), lambda u: HolySheepSync(u, "httpx")),
        Spec(HS_ASYNC, ("holysheep", "httpx", "anyio"), HolySheepAsync, is_async=True),
        Spec(
            HS_ASYNC_AIOHTTP,
            ("holysheep", "aiohttp", "anyio"),
            lambda u: HolySheepAsync(u, "aiohttp"),
            is_async=True,
        ),
        Spec(OPENAI, ("openai",), OpenAISync),
        Spec(OPENAI_ASYNC, ("openai",), OpenAIAsync, is_async=True),
        Spec(RAW_REQUESTS, ("requests",), RawRequests),
        Spec(RAW_HTTPX, ("httpx",), RawHttpx),
        Spec(RAW_HTTPX_ASYNC, ("httpx",), RawHttpxAsync, is_async=True),
        Spec(RAW_AIOHTTP, ("aiohttp",), RawAiohttp, is_async=True),
        Spec(HTTPX_SSE, ("httpx", "httpx_sse"), HttpxSSE),
    )
}

THROUGHPUT = [
    HS_REQUESTS,
    HS_HTTPX,
    HS_ASYNC,
    HS_ASYNC_AIOHTTP,
    OPENAI,
    OPENAI_ASYNC,
    RAW_REQUESTS,
    RAW_HTTPX,
    RAW_HTTPX_ASYNC,
    RAW_AIOHTTP,
    HTTPX_SSE,
]
# The order they run in: each holysheep contender next to the peers it is compared with.
THROUGHPUT_RUN = [
    HS_REQUESTS,
    RAW_REQUESTS,
    OPENAI,
    HS_HTTPX,
    RAW_HTTPX,
    HTTPX_SSE,
    HS_ASYNC,
    RAW_HTTPX_ASYNC,
    OPENAI_ASYNC,
    HS_ASYNC_AIOHTTP,
    RAW_AIOHTTP,
]
TTFT = [
    HS_REQUESTS,
    RAW_REQUESTS,
    HS_HTTPX,
    RAW_HTTPX,
    OPENAI,
    HS_ASYNC,
    RAW_HTTPX_ASYNC,
    OPENAI_ASYNC,
    HS_ASYNC_AIOHTTP,
    RAW_AIOHTTP,
]
CONCURRENCY = [HS_ASYNC, HS_ASYNC_AIOHTTP, RAW_HTTPX_ASYNC, RAW_AIOHTTP, OPENAI_ASYNC]
# Who is compared with whom: (holysheep, raw reading on the same HTTP library, openai flavour).
PAIRS = [
    (HS_REQUESTS, RAW_REQUESTS, OPENAI),
    (HS_HTTPX, RAW_HTTPX, OPENAI),
    (HS_ASYNC, RAW_HTTPX_ASYNC, OPENAI_ASYNC),
    (HS_ASYNC_AIOHTTP, RAW_AIOHTTP, OPENAI_ASYNC),
]
RAW_OF = {mine: raw for mine, raw, _ in PAIRS} | {OPENAI: RAW_HTTPX, OPENAI_ASYNC: RAW_HTTPX_ASYNC}


@dataclass
class Live:
    """A built contender and how to drive it from sync code (async ones on a shared loop)."""

    spec: Spec
    impl: Any
    loop: asyncio.AbstractEventLoop
    error: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def stream(self, tokens: int) -> Sample:
        if self.spec.is_async:
            result: Sample = self.loop.run_until_complete(self.impl.stream(tokens))
            return result
        return self.impl.stream(tokens)  # type: ignore[no-any-return]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.spec.is_async:
                self.loop.run_until_complete(self.impl.aclose())
            else:
                self.impl.close()


async def _build_async(spec: Spec, base_url: str = "") -> Any:
    impl = spec.build(base_url)
    start = getattr(impl, "start", None)
    if start is not None:
        await start()
    return impl


def build_all(
    names: Iterable[str], base_url: str, loop: asyncio.AbstractEventLoop
) -> tuple[list[Live], dict[str, str]]:
    """Build every contender that is installed; the others get a note instead."""
    live: list[Live] = []
    notes: dict[str, str] = {}
    for name in names:
        spec = SPECS[name]
        missing = spec.missing()
        if missing:
            notes[name] = f"not installed ({', '.join(missing)})"
            continue
        try:
            if spec.is_async:
                impl = loop.run_until_complete(_build_async(spec, base_url))
            else:
                impl = spec.build(base_url)
        except Exception as exc:  # a peer's API changed: report it, keep measuring the rest
            notes[name] = f"error: {exc!r}"[:120]
            continue
        live.append(Live(spec, impl, loop))
    return live, notes


def rotated(items: list[Live], by: int) -> list[Live]:
    if not items:
        return items
    k = by % len(items)
    return items[k:] + items[:k]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- 1. throughput --------------------------------------------------------------------------------


@dataclass
class ThroughputRow:
    contender: str
    events_per_s: float | None = None  # content events / (end - first content), median
    events_per_cpu_s: float | None = None  # content events / client CPU time, median
    vs_raw: float | None = None
    vs_openai: float | None = None
    note: str = ""


def run_throughput(sizes: Sizes, loop: asyncio.AbstractEventLoop) -> tuple[list[Any], dict]:
    tokens = sizes.throughput_tokens
    rates: dict[str, list[float]] = collections.defaultdict(list)
    # Per contender, per round, so that ratios are taken within a round (see `_paired`).
    cpu_rates: dict[str, dict[int, float]] = collections.defaultdict(dict)
    with upstream_proc.Upstream(tokens=tokens) as upstream:
        live, notes = build_all(THROUGHPUT_RUN, upstream.url, loop)
        reference_bytes: int | None = None
        for one in live:  # warm up: connect, fill caches, import lazily loaded modules
            try:
                sample = one.stream(tokens)
            except Exception as exc:
                one.error = f"error: {exc!r}"[:120]
                continue
            if sample.events is None and reference_bytes is None and sample.done:
                reference_bytes = sample.nbytes
        served = 0
        server_cpu0 = upstream.cpu_seconds()
        for repeat in range(sizes.throughput_repeats):
            progress(f"throughput: round {repeat + 1}/{sizes.throughput_repeats}")
            for one in rotated(live, repeat):
                if one.error:
                    continue
                gc.collect()
                cpu0 = time.process_time()
                try:
                    sample = one.stream(tokens)
                except Exception as exc:
                    one.error = f"error: {exc!r}"[:120]
                    continue
                cpu = time.process_time() - cpu0
                served += 1
                wrong = _wrong(sample, tokens, reference_bytes)
                if wrong:
                    one.error = wrong
                    continue
                assert sample.first is not None
                rates[one.name].append(tokens / max(sample.end - sample.first, 1e-9))
                cpu_rates[one.name][repeat] = tokens / max(cpu, 1e-9)
        server_cpu1 = upstream.cpu_seconds()
        for one in live:
            one.close()
    server = {}
    if served and server_cpu0 is not None and server_cpu1 is not None:
        per_stream = (server_cpu1 - server_cpu0) / served
        server["server events per CPU-second"] = round(tokens / per_stream) if per_stream else None
    errors = {one.name: one.error for one in live}
    rows = []
    for name in THROUGHPUT:
        row = ThroughputRow(name, _median(rates[name]), _median([*cpu_rates[name].values()]))
        row.note = notes.get(name) or errors.get(name, "")
        rows.append(row)
    # Ratios compare CPU rates: a raw reader outruns the server, so its wall-clock rate
    # measures the server (and the data buffered in the socket before the first content).
    by_name = {row.contender: row for row in rows}
    for row in rows:
        raw = RAW_OF.get(row.contender)
        if raw is not None:
            row.vs_raw = _paired(cpu_rates[row.contender], cpu_rates[raw], operator.truediv)
    for mine, _raw, theirs in PAIRS:
        by_name[mine].vs_openai = _paired(cpu_rates[mine], cpu_rates[theirs], operator.truediv)
    return rows, server


def _wrong(sample: Sample, tokens: int, reference_bytes: int | None) -> str:
    if sample.events is not None:
        if sample.events != tokens:
            return f"WRONG: {sample.events} content events, expected {tokens}"
        return ""
    if not sample.done:
        return "WRONG: the body did not end with data: [DONE]"
    if reference_bytes is not None and sample.nbytes != reference_bytes:
        return f"WRONG: {sample.nbytes} body bytes, expected {reference_bytes}"
    if sample.first is None:
        return "WRONG: no content seen"
    return ""


# -- 2. time to first token -----------------------------------------------------------------------


@dataclass
class TtftRow:
    contender: str
    p50_ms: float | None = None  # medians over the blocks of each block's percentile
    p99_ms: float | None = None
    added_p50_ms: float | None = None  # minus the raw reader on the same HTTP library
    added_p99_ms: float | None = None
    streams_per_s: float | None = None
    vs_raw: float | None = None
    new_connections: int | None = None  # over all timed streams, after one warm-up each
    streams: int = 0
    note: str = ""


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_ttft(sizes: Sizes, loop: asyncio.AbstractEventLoop) -> tuple[list[Any], dict]:
    tokens = sizes.ttft_tokens
    # Per contender, per block: the blocks pair each contender with its raw peer, run next to
    # it, so a comparison is made within each block and the machine's drift cancels out.
    p50s: dict[str, dict[int, float]] = collections.defaultdict(dict)
    p99s: dict[str, dict[int, float]] = collections.defaultdict(dict)
    speeds: dict[str, dict[int, float]] = collections.defaultdict(dict)
    new: dict[str, int | None] = {}
    counted: dict[str, int] = collections.defaultdict(int)
    with upstream_proc.Upstream(tokens=tokens) as upstream:
        live, notes = build_all(TTFT, upstream.url, loop)
        for repeat in range(sizes.ttft_repeats):
            progress(f"ttft: block {repeat + 1}/{sizes.ttft_repeats}")
            for one in rotated(live, repeat):
                if one.error:
                    continue
                try:
                    latencies, seconds, opened = _ttft_block(one, tokens, sizes, upstream.port)
                except Exception as exc:
                    one.error = f"error: {exc!r}"[:120]
                    continue
                p50s[one.name][repeat] = _percentile(latencies, 50)
                p99s[one.name][repeat] = _percentile(latencies, 99)
                speeds[one.name][repeat] = len(latencies) / seconds
                counted[one.name] += len(latencies)
                if opened is None or new.get(one.name, 0) is None:
                    new[one.name] = None
                else:
                    new[one.name] = (new.get(one.name) or 0) + opened
        for one in live:
            one.close()
    errors = {one.name: one.error for one in live}
    rows = []
    for name in TTFT:
        p50, p99 = _median([*p50s[name].values()]), _median([*p99s[name].values()])
        rows.append(
            TtftRow(
                name,
                None if p50 is None else p50 * 1000,
                None if p99 is None else p99 * 1000,
                streams_per_s=_median([*speeds[name].values()]),
                new_connections=new.get(name),
                streams=counted[name],
                note=notes.get(name) or errors.get(name, ""),
            )
        )
    for row in rows:
        raw = RAW_OF.get(row.contender)
        if raw is None:
            continue
        mine = row.contender
        added_p50 = _paired(p50s[mine], p50s[raw], operator.sub)
        added_p99 = _paired(p99s[mine], p99s[raw], operator.sub)
        row.added_p50_ms = None if added_p50 is None else added_p50 * 1000
        row.added_p99_ms = None if added_p99 is None else added_p99 * 1000
        row.vs_raw = _paired(speeds[mine], speeds[raw], operator.truediv)
    return rows, {}


def _paired(
    mine: dict[int, float], raw: dict[int, float], compare: Callable[[float, float], float]
) -> float | None:
    """The median of `compare(mine, raw)` over the blocks (or rounds) both ran in."""
    return _median([compare(mine[block], raw[block]) for block in mine.keys() & raw.keys()])


def _ttft_block(
    one: Live, tokens: int, sizes: Sizes, port: int
) -> tuple[list[float], float, int | None]:
    """`ttft_streams` sequential streams: latencies, seconds for all, connections opened."""
    if one.spec.is_async:
        return one.loop.run_until_complete(_ttft_block_async(one.impl, tokens, sizes, port))
    stream = one.impl.stream
    _check(stream(tokens), tokens)  # warm-up: the block starts on an open connection
    before = upstream_proc.client_ports(port)
    latencies = []
    started = perf_counter()
    for _ in range(sizes.ttft_streams):
        t0 = perf_counter()
        sample = stream(tokens)
        latencies.append(_check(sample, tokens) - t0)
    seconds = perf_counter() - started
    return latencies, seconds, _opened(before, upstream_proc.client_ports(port))


async def _ttft_block_async(
    impl: Any, tokens: int, sizes: Sizes, port: int
) -> tuple[list[float], float, int | None]:
    # The twin of the sync loop above, so both measure the same thing.
    stream = impl.stream
    _check(await stream(tokens), tokens)
    before = upstream_proc.client_ports(port)
    latencies = []
    started = perf_counter()
    for _ in range(sizes.ttft_streams):
        t0 = perf_counter()
        sample = await stream(tokens)
        latencies.append(_check(sample, tokens) - t0)
    seconds = perf_counter() - started
    return latencies, seconds, _opened(before, upstream_proc.client_ports(port))


def _check(sample: Sample, tokens: int) -> float:
    wrong = _wrong(sample, tokens, None)
    if wrong:
        raise RuntimeError(wrong)
    assert sample.first is not None
    return sample.first


def _opened(before: set[int] | None, after: set[int] | None) -> int | None:
    return None if before is None or after is None else len(after - before)


# -- 3. concurrency -------------------------------------------------------------------------------


@dataclass
class ConcurrencyRow:
    streams: int
    contender: str
    ok: int | None = None
    max_open: int | None = None
    seconds_to_open_all: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    gc_s: float | None = None  # of `cpu_s`, the time spent in Python's garbage collector
    us_per_event: float | None = None  # client CPU (user + system) per content event
    rss_delta_mb: float | None = None  # peak RSS minus RSS before the streams
    kb_per_stream: float | None = None  # the same divided by the streams open at the peak
    rss_vs_aiohttp: float | None = None
    server_cpu_s: float | None = None
    events: int | None = None
    rss_base: int | None = None
    rss_peak: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""


def run_concurrency(sizes: Sizes, loop: asyncio.AbstractEventLoop) -> tuple[list[Any], dict]:
    del loop  # every contender runs in its own process
    rows: list[ConcurrencyRow] = []
    failed: dict[str, str] = {}
    ran = False  # a contender has run: the next one waits for the kernel to settle
    for spec_name in CONCURRENCY:
        missing = SPECS[spec_name].missing()
        if missing:
            failed[spec_name] = f"not installed ({', '.join(missing)})"
    for index, streams in enumerate(sizes.levels):
        order = CONCURRENCY[index % len(CONCURRENCY) :] + CONCURRENCY[: index % len(CONCURRENCY)]
        level_rows = {}
        for name in order:
            row = ConcurrencyRow(streams, name)
            level_rows[name] = row
            if name in failed:
                row.note = failed[name]
                continue
            progress(f"concurrency: {streams:,} streams, {name}")
            if ran:
                # Let the kernel finish tearing down the previous contender's thousands of
                # sockets (and a killed worker's), so that work is not billed to this one.
                time.sleep(sizes.settle_s)
            with upstream_proc.Upstream(
                tokens=sizes.slow_tokens,
                tokens_per_s=sizes.slow_rate,
                ttft=level_ttft(sizes, streams),
            ) as upstream:
                cpu0 = upstream.cpu_seconds()
                result = _run_worker(name, upstream.url, streams, sizes)
                ran = True
                cpu1 = upstream.cpu_seconds()
            if cpu0 is not None and cpu1 is not None:
                row.server_cpu_s = cpu1 - cpu0
            _fill(row, result)
            if row.ok != streams:
                failed[name] = f"skipped: failed at {streams:,}"
        aiohttp = level_rows[RAW_AIOHTTP].kb_per_stream
        for name in CONCURRENCY:
            row = level_rows[name]
            row.rss_vs_aiohttp = _ratio(row.kb_per_stream, aiohttp)
            rows.append(row)
    return rows, {
        "slow stream": f"{sizes.slow_tokens} tokens at {sizes.slow_rate:g}/s after a server "
        f"TTFT of {sizes.slow_ttft:g} s + 1 s per 1,000 streams",
        "time limit per level (s)": sizes.level_timeout,
    }


def _run_worker(name: str, url: str, streams: int, sizes: Sizes) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--url",
        url,
        "--streams",
        str(streams),
        "--tokens",
        str(sizes.slow_tokens),
        "--deadline",
        str(sizes.level_timeout),
    ]
    if sizes.gc_threshold is not None:
        command += ["--gc-threshold", str(sizes.gc_threshold)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=sizes.level_timeout + 60,
            env=upstream_proc.python_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"note": "worker hung past its deadline; killed"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"note": f"worker exit status {done.returncode}: {tail}"[:200]}


def _fill(row: ConcurrencyRow, result: dict[str, Any]) -> None:
    row.note = result.get("note", "")
    if "ok" not in result:
        row.ok = 0
        return
    row.ok = result["ok"]
    row.max_open = result["max_open"]
    row.seconds_to_open_all = result["seconds_to_open_all"]
    row.wall_s = result["wall_s"]
    row.cpu_s = result["cpu_s"]
    row.gc_s = result.get("gc_s")
    row.errors = result["errors"]
    row.events = events = result["events"]
    row.rss_base, row.rss_peak = result["rss_base"], result["rss_peak"]
    if row.ok < row.streams / 2:
        # Per-event and per-stream figures of a level that mostly failed mislead; the JSON
        # keeps the raw numbers.
        row.note = f"{row.note}; per-event and per-stream figures not shown".lstrip("; ")
    elif events:
        row.us_per_event = row.cpu_s / events * 1e6
    if (
        result["rss_base"] is not None
        and result["rss_peak"] is not None
        and row.ok >= row.streams / 2
    ):
        delta = result["rss_peak"] - result["rss_base"]
        row.rss_delta_mb = delta / 1e6
        row.kb_per_stream = delta / max(row.max_open or 0, 1) / 1e3
    notes = [row.note] if row.note else []
    if row.max_open is not None and row.max_open < row.streams:
        notes.append(f"only {row.max_open:,} open at once")
    if row.errors:
        notes.append(", ".join(f"{kind} x{count}" for kind, count in row.errors.items()))
    row.note = "; ".join(notes)


# The worker: one contender, one level, in a process of its own. -----------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _max_rss() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS, where /proc is missing anyway).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _GCClock:
    """CPU seconds the garbage collector takes in this thread (where the streams run).

    With thousands of streams open, each full collection walks every object they hold: the
    collector's share of the CPU is what says whether a difference between two contenders is
    their code or the size of their heaps.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        del info
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._started


async def concurrency_worker(
    name: str, url: str, streams: int, tokens: int, deadline: float, gc_threshold: int | None
):
    upstream_proc.raise_fd_limit()
    if gc_threshold is not None:
        gc.set_threshold(gc_threshold)  # the first generation's; the older two stay
    impl = await _build_async(SPECS[name], url)
    _check(await impl.stream(tokens), tokens)  # warm-up: lazy imports, the first connection
    gc.collect()
    gc_clock = _GCClock()
    gc.callbacks.append(gc_clock)
    rss_base, max_rss_base, cpu_base = _rss(), _max_rss(), _cpu_seconds()
    peak = rss_base or 0
    open_now = max_open = 0
    all_open: float | None = None
    ok = events = 0
    errors: collections.Counter[str] = collections.Counter()
    started = perf_counter()

    async def one() -> None:
        nonlocal ok, events, open_now
        opened = False

        def on_open() -> None:
            nonlocal opened, open_now, max_open, all_open
            opened = True
            open_now += 1
            if open_now > max_open:
                max_open = open_now
                if max_open == streams:
                    all_open = perf_counter() - started

        try:
            sample = await impl.stream(tokens, on_open)
        except Exception as exc:
            errors[type(exc).__name__] += 1
            return
        finally:
            if opened:
                open_now -= 1
        if sample.events is None:
            if sample.done:
                ok += 1
                events += tokens
        else:
            events += sample.events
            ok += sample.events == tokens

    async def watch_memory() -> None:
        nonlocal peak
        while True:
            rss = _rss()
            if rss is not None and rss > peak:
                peak = rss
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch_memory())
    tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
    _done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    if pending:
        errors["timed out"] += len(pending)
        await asyncio.wait(pending, timeout=10)
    wall = perf_counter() - started
    cpu = _cpu_seconds() - cpu_base
    gc.callbacks.remove(gc_clock)
    watcher.cancel()
    max_rss = _max_rss()
    if max_rss > max_rss_base:  # the kernel's high-water mark saw a peak the sampler missed
        peak = max(peak, max_rss)
    result = {
        "ok": ok,
        "events": events,
        "max_open": max_open,
        "seconds_to_open_all": all_open,
        "wall_s": wall,
        "cpu_s": cpu,
        "gc_s": gc_clock.seconds,
        "rss_base": rss_base,
        "rss_peak": peak if rss_base is not None else None,
        "errors": dict(errors),
    }
    with contextlib.suppress(Exception):
        await asyncio.wait_for(impl.aclose(), 10)
    return result


# -- the targets ----------------------------------------------------------------------------------


def targets(results: dict[str, list[Any]]) -> list[Target]:
    found: list[Target] = []
    throughput = {row.contender: row for row in results.get("throughput", [])}
    for mine, raw, theirs in PAIRS if throughput else []:
        row = throughput[mine]
        found.append(Target(f"1 throughput: {mine} vs {theirs}", row.vs_openai, 10.0, True))
        found.append(Target(f"1 throughput: {mine} vs {raw}", row.vs_raw, 0.6, True))
    ttft = {row.contender: row for row in results.get("ttft", [])}
    for mine, raw, _theirs in PAIRS if ttft else []:
        row = ttft[mine]
        found.append(
            Target(f"2 TTFT added p50: {mine} over {raw}", row.added_p50_ms, 0.1, False, " ms")
        )
        found.append(
            Target(f"2 TTFT added p99: {mine} over {raw}", row.added_p99_ms, 0.5, False, " ms")
        )
        found.append(Target(f"2 streams/s: {mine} vs {raw}", row.vs_raw, 0.9, True))
        found.append(
            Target(
                f"2 connection reuse: {mine}, new connections",
                None if row.new_connections is None else float(row.new_connections),
                0.0,
                False,
                "",
                f"over {row.streams:,} sequential streams after a warm-up",
            )
        )
    # The AsyncClient targets hold on each of its transports.
    for mine in (HS_ASYNC, HS_ASYNC_AIOHTTP):
        found.extend(_concurrency_targets(results, mine))
    return found


def _concurrency_targets(results: dict[str, list[Any]], mine: str) -> list[Target]:
    concurrency = [r for r in results.get("concurrency", []) if r.contender == mine]
    measured = [r for r in concurrency if r.ok is not None]
    if not measured:
        return []
    found: list[Target] = []
    top = measured[-1]
    top_level = max(row.streams for row in concurrency)
    # A level skipped after a failure counts as none succeeded there.
    detail = ""
    if top.streams != top_level:
        detail = f"{top.ok or 0:,} of {top.streams:,} succeeded at {top.streams:,}; skipped above"
    found.append(
        Target(
            f"3 concurrency: {mine}, streams that succeeded at {top_level:,}",
            float(top.ok or 0) if top.streams == top_level else 0.0,
            float(top_level),
            True,
            "",
            detail,
        )
    )
    # CPU and memory from the largest level that has them (a mostly failed level has not).
    top = next((r for r in reversed(measured) if r.us_per_event is not None), top)
    found.append(
        Target(
            f"3 concurrency: {mine}, client CPU per event at {top.streams:,}",
            top.us_per_event,
            50.0,
            False,
            " us",
        )
    )
    found.append(
        Target(
            f"3 concurrency: {mine}, RSS per stream vs raw aiohttp at {top.streams:,}",
            top.rss_vs_aiohttp,
            1.15,
            False,
            "x",
            "" if top.kb_per_stream is None else f"{top.kb_per_stream:.1f} KB per stream",
        )
    )
    return found


# -- output ---------------------------------------------------------------------------------------


def print_report(meta: dict[str, Any], results: dict[str, list[Any]], found: list[Target]) -> None:
    print("Client benchmark: holysheep vs peers, against a local upstream in another process")
    for key, value in meta.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"  {key}: {value}")
    if "throughput" in results:
        print(f"\n== 1. Throughput: one {meta['sizes']['throughput_tokens']:,}-token stream ==")
        print(
            "   events/s = content events / (last byte - first content); per CPU-s = content\n"
            "   events / the client's CPU time for the stream; medians over rounds. The ratios\n"
            "   compare per CPU-s (a wall-clock rate above the server's own rate measures the\n"
            "   server): vs raw = over raw reading on the same HTTP library, vs openai = over\n"
            "   the openai SDK of the same flavour, each taken within a round (they run next\n"
            "   to each other) and the median over rounds printed."
        )
        table = [
            [
                row.contender,
                fmt(row.events_per_s, ",.0f"),
                fmt(row.events_per_cpu_s, ",.0f"),
                fmt(row.vs_raw, ".2f", "x"),
                fmt(row.vs_openai, ".1f", "x"),
                row.note,
            ]
            for row in results["throughput"]
        ]
        headers = ["contender", "events/s", "per CPU-s", "vs raw", "vs openai", "note"]
        print(report.table(headers, table))
    if "ttft" in results:
        sizes = meta["sizes"]
        print(
            f"\n== 2. Time to first token: {sizes['ttft_repeats']} blocks of "
            f"{sizes['ttft_streams']} sequential {sizes['ttft_tokens']}-token streams, "
            "server TTFT 0 =="
        )
        print(
            "   From just before the request to the first content; p50/p99 and streams/s are\n"
            "   medians over the blocks; added and vs raw compare with raw reading on the same\n"
            "   library (openai: raw httpx) within each block, then take the median over the\n"
            "   blocks (a pair runs back to back, so the machine's drift cancels); new conns =\n"
            "   connections opened during the timed streams (kernel socket table)."
        )
        table = [
            [
                row.contender,
                fmt(row.p50_ms, ".3f"),
                fmt(row.p99_ms, ".3f"),
                fmt(row.added_p50_ms, "+.3f"),
                fmt(row.added_p99_ms, "+.3f"),
                fmt(row.streams_per_s, ",.0f"),
                fmt(row.vs_raw, ".2f", "x"),
                "-" if row.new_connections is None else f"{row.new_connections}",
                row.note,
            ]
            for row in results["ttft"]
        ]
        headers = [
            "contender",
            "p50 ms",
            "p99 ms",
            "added p50",
            "added p99",
            "streams/s",
            "vs raw",
            "new conns",
            "note",
        ]
        print(report.table(headers, table))
    if "concurrency" in results:
        print("\n== 3. Concurrency: N slow streams in one asyncio process per contender ==")
        print(
            f"   {meta['concurrency']['slow stream']}. ok = streams that got every token;\n"
            "   open = most streams open at once; CPU = client user+system time; GC = its\n"
            "   share in Python's garbage collector; us/event = CPU per content event;\n"
            "   KB/stream = (peak RSS - RSS before) / open; vs aio = over raw aiohttp at the\n"
            "   same N; server = the upstream's CPU seconds."
        )
        threshold = meta["sizes"].get("gc_threshold")
        if threshold is not None:
            print(f"   Every worker ran with gc.set_threshold({threshold}).")
        table = []
        last = None
        for row in results["concurrency"]:
            if last is not None and row.streams != last:
                table.append([""] * 13)
            table.append(
                [
                    f"{row.streams:,}" if row.streams != last else "",
                    row.contender,
                    "-" if row.ok is None else f"{row.ok:,}",
                    "-" if row.max_open is None else f"{row.max_open:,}",
                    fmt(row.seconds_to_open_all, ".1f"),
                    fmt(row.wall_s, ".1f"),
                    fmt(row.cpu_s, ".1f"),
                    fmt(_share(row.gc_s, row.cpu_s), ".0f", "%"),
                    fmt(row.us_per_event, ".1f"),
                    fmt(row.kb_per_stream, ".1f"),
                    fmt(row.rss_vs_aiohttp, ".2f", "x"),
                    fmt(row.server_cpu_s, ".1f"),
                    row.note,
                ]
            )
            last = row.streams
        headers = [
            "N",
            "contender",
            "ok",
            "open",
            "all open s",
            "wall s",
            "CPU s",
            "GC",
            "us/event",
            "KB/stream",
            "vs aio",
            "server s",
            "note",
        ]
        print(report.table(headers, table, names=2))
    print("\n== Targets ==")
    for target in found:
        sign = ">=" if target.higher_is_better else "<="
        value = "n/a" if target.value is None else f"{target.value:.3g}{target.unit}"
        if target.value is not None and not target.unit and target.value == int(target.value):
            value = f"{target.value:,.0f}"  # a count
        detail = f"  ({target.detail})" if target.detail else ""
        print(
            f"{target.verdict}  {target.name}: {value} [{sign} {target.threshold:g}{target.unit}]"
            f"{detail}"
        )


# -- main -----------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Sizes, asyncio.AbstractEventLoop], tuple[list[Any], dict]]] = {
    "throughput": run_throughput,
    "ttft": run_ttft,
    "concurrency": run_concurrency,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run this")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--levels", help="concurrency levels, e.g. 100,1000")
    parser.add_argument("--repeats", type=int, help="throughput rounds and TTFT blocks")
    parser.add_argument("--level-timeout", type=float, help="seconds per concurrency level")
    parser.add_argument(
        "--gc-threshold",
        type=int,
        help="the concurrency workers' first GC threshold, as a service tuned for many "
        "streams sets it (see docs/transports.md); every contender gets the same",
    )
    # The concurrency worker: this script again, in a process of its own.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = asyncio.run(
            concurrency_worker(
                args.worker, args.url, args.streams, args.tokens, args.deadline, args.gc_threshold
            )
        )
        print(json.dumps(result))
        return 0

    sizes = QUICK if args.quick else FULL
    if args.levels:
        sizes = _replace(sizes, levels=tuple(int(n) for n in args.levels.split(",")))
    if args.repeats:
        sizes = _replace(sizes, throughput_repeats=args.repeats, ttft_repeats=args.repeats)
    if args.level_timeout:
        sizes = _replace(sizes, level_timeout=args.level_timeout)
    if args.gc_threshold is not None:
        if args.gc_threshold < 1:
            parser.error("--gc-threshold must be at least 1 (0 turns the collector off)")
        sizes = _replace(sizes, gc_threshold=args.gc_threshold)
    upstream_proc.raise_fd_limit()
    started = perf_counter()
    results: dict[str, list[Any]] = {}
    extra: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    try:
        for name, run in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            results[name], extra[name] = run(sizes, loop)
    finally:
        loop.close()
    found = targets(results)
    meta = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs",
        "versions": versions(
            "holysheep openai httpx httpcore httpx-sse requests urllib3 aiohttp anyio orjson"
        ),
        "sizes": asdict(sizes),
        **{name: info for name, info in extra.items() if info},
        "wall time (s)": round(perf_counter() - started, 1),
    }
    if args.json:
        json.dump(
            {
                "meta": meta,
                **{name: [asdict(row) for row in rows] for name, rows in results.items()},
                "targets": [{**asdict(t), "verdict": t.verdict} for t in found],
            },
            sys.stdout,
            indent=1,
        )
        print()
    else:
        print_report(meta, results, found)
    return 0


def _share(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return part / whole * 100


def _replace(sizes: Sizes, **changes: Any) -> Sizes:
    return Sizes(**{**asdict(sizes), **changes})


if __name__ == "__main__":
    sys.exit(main())
