"""`holysheep bench`: latency, a concurrency ramp, and retries under injected faults.

Theory of operation
-------------------
Three phases, each answering one question:

1. *sequential*: `--requests` streams one after another through a `Client`: the time to first
   token (TTFT) and the tokens/s one user sees, without queueing effects.
2. *ramp*: for each level N, N streams at once from one fresh `AsyncClient` (on
   `AsyncHTTPXTransport`, its default, or `--transport aiohttp`): how many succeed, their TTFT
   and tokens/s, and what each open stream costs the client in memory and CPU.
3. *faults* (`--faults`, embedded upstream only): one injected fault per stream, retried with
   resume; success means the text came out byte-identical to a clean run.

No retries are used in 1 and 2: a benchmark counts failures, it does not hide them.

The embedded upstream runs in a child process (`python -m holysheep.testing`; its flags and the
URL on its first line are the contract). In-process, the server's buffers and its share of the
GIL would be billed to the client: the RSS growth and CPU time measured here must be the
client's alone. The child is stopped in a `finally` (SIGTERM, then SIGKILL after a grace
period), and SIGTERM to the bench itself is turned into an exit through that `finally`, so
Ctrl-C, `timeout 60 holysheep bench` and errors never leave it behind. The fault phase keeps
an in-process upstream: it needs `MockUpstream.enqueue` (one fault per request, so the retry
gets a clean answer), and it measures recovery, not resources.

One release for all first tokens. With the embedded upstream, every stream of a level asks
(per request, in the `X-Mock-Config` header, computed as the request leaves: `_Released`) for
its first token to be held until one instant, `ramp_hold(N)` after the level starts: long
enough for the client to open all N streams first (2 s + 1 s per 1,000 streams, as in
`bench/client.py`, plus a term in N^2 on httpx, whose pool makes opening N streams from one
client cost O(N^2); see the constants). Then every first token leaves the upstream at once and
all N streams run at the same time, which is what "N concurrent streams" means: the memory
peak is the cost of N open streams, and the tokens of all N compete for the client. A level's
TTFT counts from that instant to the first token in the program (what the client adds when N
streams speak at once), and its tokens/s per stream is tokens over the time from that instant
to the stream's end, so a client that falls behind and then reads a burst of buffered tokens
is not credited with the burst's rate. `open` reports how many streams really were open at
once; fewer than N means the release came too early. Against `--base-url` nothing is held:
TTFT counts from the request, tokens/s is `StreamStats.tokens_per_s`, and the gateway's own
latency decides how much the streams overlap.

Memory and CPU. Before a level, one warm-up stream (lazy imports, the first connection) and a
garbage collection; then resident memory (`/proc/self/statm`) is sampled every 50 ms, and the
level's figure is (peak - baseline) / (streams open at the peak), with the kernel's high-water
mark (`getrusage`) catching a peak between samples. CPU is user + system time of this process
over the level, divided by the content events received; the upstream's CPU over the level
(from `/proc/PID/stat`) is reported beside it, to tell which side was the bottleneck. Where
`/proc` is missing (macOS) only the high-water mark is there, so the memory figure shows only
for a level that sets a new peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from holysheep.transports import AsyncBaseTransport, AsyncResponse

from ._cli import (
    BENCH_RAMP_MAX_TOKENS,
    BENCH_TOKENS_PER_S,
    BENCH_TTFT,
    EXIT_OK,
    PROG,
    UsageError,
    _print_table,
)
from ._config import API_KEY_ENV
from ._exceptions import ConfigurationError, HolySheepError
from ._exchange import Request
from ._version import __version__
from .testing._process import UpstreamProcess, raise_fd_limit

__all__ = ["Spread", "ramp_hold", "run_bench"]

# At each level the upstream sends every first token at one instant, RAMP_HOLD_BASE +
# RAMP_HOLD_PER_1000 * k seconds after the level starts, k = streams / 1000, plus a term in
# k**2 on httpx: long enough for the client to open all its streams first. Measured by this
# bench on 2 cores, all open after (1,000 / 3,000 / 5,000 streams): AiohttpTransport 0.5 / - /
# 3.4 s, linear; AsyncHTTPXTransport 1.7 / 13.4 / 36.4 s, because httpcore's pool scans every
# connection for each request it places and each response it closes, so one client opening N
# streams costs O(N^2). The release times (aiohttp 3 s / 7 s at 1,000 / 5,000; httpx 5 / 23 /
# 57 s at 1,000 / 3,000 / 5,000) leave a margin for a busy machine; 2 s covers start-up.
RAMP_HOLD_BASE = 2.0
RAMP_HOLD_PER_1000 = 1.0
RAMP_HOLD_PER_1000_SQUARED = {"httpx": 2.0, "aiohttp": 0.0}
TRANSPORTS = ("httpx", "aiohttp")
# Requests the ramp sends at once (streams then stay open without limit): enough to keep both
# cores busy opening, few enough that a request reaches the upstream within milliseconds of
# computing how long its first token must wait (`_Released`).
OPENING_AT_ONCE = 64
# 20 samples a second see every plateau of a level (the shortest lasts the 2 s hold) while
# costing the event loop next to nothing.
SAMPLE_INTERVAL = 0.05
# Sockets the process needs beyond one per stream: the interpreter, the sequential client's
# pool, the pipes to the upstream, and whatever the bench's own libraries open.
SPARE_FILES = 64
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
PLOT_INSTALL = "pip install 'holysheep[plot]'"

# The fault run uses its own fast upstream: it measures whether retries recover, not latency.
FAULT_TTFT = 0.05
FAULT_TOKENS_PER_S = 500.0
FAULT_SEED = 20250101
# What a gateway does wrong, in rotation. Status faults hit before any content (transparent
# retries); the others cut a stream after content and need resume with event ids.
_FAULT_ROTATION = ("drop", "status=503", "inband_error", "status=429", "stall", "drop")

_TRANSPORT_NAMES = {"httpx": "AsyncHTTPXTransport", "aiohttp": "AiohttpTransport"}

_BENCH_MESSAGES = ({"role": "user", "content": "Say something about sheep."},)


# -- statistics --------------------------------------------------------------------------------


@attrs.frozen
class Spread:
    """avg, p50 and p99 of a sample (nearest rank: p99 of 10 values is the largest)."""

    avg: float | None
    p50: float | None
    p99: float | None
    minimum: float | None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        sample = sorted(v for v in values if v is not None)
        if not sample:
            return cls(None, None, None, None)
        return cls(sum(sample) / len(sample), _rank(sample, 0.5), _rank(sample, 0.99), sample[0])


def _rank(sample: Sequence[float], q: float) -> float:
    """The nearest-rank quantile of a sorted, non-empty sample."""
    return sample[max(0, math.ceil(q * len(sample)) - 1)]


@attrs.define
class Samples:
    """Raw per-stream numbers for the plot; the JSON keeps only their summaries."""

    ttft: list[float | None] = attrs.Factory(list)
    tokens_per_s: list[float | None] = attrs.Factory(list)


# -- the command -------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    """`holysheep bench`: check everything that can fail cheaply, then measure."""
    if args.faults and args.base_url:
        raise UsageError("--faults injects faults into the embedded upstream; drop --base-url")
    plot: Path | None = None
    if args.plot is not None:
        plot = _check_plot_path(args.plot)
    if args.transport == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        raise ConfigurationError(
            "--transport aiohttp needs aiohttp, which is not installed:"
            " pip install 'holysheep[aiohttp]'"
        )
    key = os.environ.get(API_KEY_ENV) if args.base_url else "bench-key"
    if not key:
        raise ConfigurationError(
            f"no API key for --base-url: set the {API_KEY_ENV} environment variable"
            " (without --base-url the bench runs against the embedded upstream, which needs none)"
        )
    files = raise_fd_limit()
    needed = max(args.concurrency, default=0) + SPARE_FILES
    if files is not None and files < needed:
        raise UsageError(
            f"{max(args.concurrency):,} concurrent streams need about {needed:,} open files;"
            f" this system allows {files:,} (see `ulimit -Hn`)"
        )
    started = time.perf_counter()
    progress = _Progress.create()
    try:
        with _stop_on_sigterm():
            results = _measure(args, key, progress)
    finally:
        progress.close()
    samples: dict[str, Samples] = results.pop("samples")
    results["environment"] = {
        "holysheep": __version__,
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "cpus": os.cpu_count(),
        "open_files_limit": files,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if plot is not None:
        _draw_plot(plot, results, samples)
        results["plot"] = str(plot)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_bench(results)
    if plot is not None:
        print(f"{PROG} bench: plot written to {plot}", file=sys.stderr)
    return EXIT_OK


def _measure(args: argparse.Namespace, key: str, progress: _Progress) -> dict[str, Any]:
    """The three phases; the embedded upstream lives exactly as long as the first two."""
    samples: dict[str, Samples] = {}
    with contextlib.ExitStack() as stack:
        server_cpu: Callable[[], float | None] = _unknown
        if args.base_url:
            base_url, embedded = args.base_url, False
            target = args.base_url
        else:
            upstream = stack.enter_context(
                UpstreamProcess(ttft=BENCH_TTFT, tokens_per_s=BENCH_TOKENS_PER_S)
            )
            progress.note(f"embedded upstream at {upstream.base_url} (pid {upstream.pid})")
            base_url, embedded, server_cpu = upstream.base_url, True, upstream.cpu_seconds
            target = (
                f"embedded upstream (separate process; ttft {BENCH_TTFT:g} s,"
                f" {BENCH_TOKENS_PER_S:g} tokens/s)"
            )
        sequential = _bench_sequential(args, base_url, key, progress, samples)
        levels = [
            _bench_level(args, base_url, key, level, embedded, server_cpu, progress, samples)
            for level in args.concurrency
        ]
    results: dict[str, Any] = {
        "target": target,
        "base_url": None if embedded else base_url,
        "model": args.model,
        "transport": f"{_TRANSPORT_NAMES[args.transport]} (the ramp's AsyncClient)",
        "sequential": sequential,
        "concurrency": levels,
    }
    if args.faults:
        results["faults"] = _bench_faults(args, progress)
    results["samples"] = samples
    return results


def _unknown() -> float | None:
    return None  # a --base-url server's CPU time


def _check_plot_path(text: str) -> Path:
    """Fail before measuring anything: a 30-second bench should not end in a missing import."""
    path = Path(text)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {text}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {text}: no such directory: {path.parent}")
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        found = False
    if not found:
        raise ConfigurationError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL}")
    return path


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM exits through `finally` blocks (status 143), so the upstream child is stopped.

    By default SIGTERM ends the process on the spot, and the child would be left serving.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (main() called from a thread): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- progress ----------------------------------------------------------------------------------


class _Progress:
    """Progress on stderr: a `rich` bar on a terminal, one plain line per phase otherwise.

    Stdout carries only the results (the table, or the `--json` object), so progress never
    mixes with them, whatever is redirected where.
    """

    def __init__(self, bar: Any | None) -> None:
        self._bar = bar
        self._task: Any = None
        self._description = ""

    @classmethod
    def create(cls) -> _Progress:
        if not sys.stderr.isatty() or importlib.util.find_spec("rich") is None:
            return cls(None)
        progress = importlib.import_module("rich.progress")
        console = importlib.import_module("rich.console").Console(stderr=True)
        bar = progress.Progress(
            progress.SpinnerColumn(),
            progress.TextColumn("{task.description}"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TimeElapsedColumn(),
            console=console,
            transient=True,  # the table replaces it at the end
            refresh_per_second=5,
        )
        bar.start()
        return cls(bar)

    def start(self, description: str, total: int) -> None:
        if self._bar is None:
            print(f"{PROG} bench: {description}", file=sys.stderr, flush=True)
            return
        self._finish()
        self._task = self._bar.add_task(description, total=total)
        self._description = description

    def update(self, completed: int, description: str | None = None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=completed, description=description)

    def note(self, text: str) -> None:
        if self._bar is None:
            print(f"{PROG} bench: {text}", file=sys.stderr, flush=True)
        else:
            self._bar.console.print(f"{PROG} bench: {text}", markup=False, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._finish()
            self._bar.stop()
            self._bar = None

    def _finish(self) -> None:
        # The last phase shows as done, under its own name rather than its last live detail.
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task, completed=self._bar.tasks[-1].total, description=self._description
            )


# -- 1. sequential -----------------------------------------------------------------------------


def _bench_sequential(
    args: argparse.Namespace,
    base_url: str,
    key: str,
    progress: _Progress,
    samples: dict[str, Samples],
) -> dict[str, Any]:
    """N streams one after another: the latency one user sees, without queueing effects."""
    from ._client import Client
    from ._retry import RetryPolicy

    kept = samples["sequential"] = Samples()
    errors: dict[str, int] = {}
    first_error: HolySheepError | None = None
    progress.start(f"sequential: {_streams(args.requests)}, one at a time", args.requests)
    with Client(api_key=key, base_url=base_url, retry=RetryPolicy.none()) as client:
        for i in range(args.requests):
            try:
                with client.chat.stream(
                    model=args.model, messages=_BENCH_MESSAGES, max_tokens=args.max_tokens
                ) as stream:
                    stream.until_done()
            except HolySheepError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                first_error = first_error or exc
            else:
                kept.ttft.append(stream.stats.ttft)
                kept.tokens_per_s.append(stream.stats.tokens_per_s)
            progress.update(i + 1)
    if first_error is not None and not kept.ttft:
        # Nothing got through: the numbers would be empty; the first error says why.
        raise first_error
    return {
        "requests": args.requests,
        "ok": len(kept.ttft),
        "errors": errors,
        "max_tokens": args.max_tokens,
        "ttft_s": attrs.asdict(Spread.of(kept.ttft)),
        "tokens_per_s": attrs.asdict(Spread.of(kept.tokens_per_s)),
    }


# -- 2. the ramp -------------------------------------------------------------------------------


def ramp_hold(streams: int, transport: str) -> float:
    """Seconds from a level's start to the release of every first token (see the constants)."""
    k = streams / 1000
    return RAMP_HOLD_BASE + RAMP_HOLD_PER_1000 * k + RAMP_HOLD_PER_1000_SQUARED[transport] * k * k


class _Released(AsyncBaseTransport):
    """The ramp's transport: the client's own, plus the embedded upstream's first-token hold.

    Each request asks the upstream (`X-Mock-Config`) to hold its first token until
    `release_at`, computed as the request leaves, so every stream's first token is sent at
    the same instant however long the others took to open. Requests leave at most
    `OPENING_AT_ONCE` at a time: that keeps the wait between computing the hold and the
    upstream starting its clock short. Streams stay open without limit; only opening is paced.
    """

    def __init__(self, inner: AsyncBaseTransport) -> None:
        import anyio

        self.inner = inner
        self.release_at: float | None = None  # None: no hold (the warm-up stream)
        self._opening = anyio.Semaphore(OPENING_AT_ONCE)

    async def send(self, request: Request) -> AsyncResponse:
        async with self._opening:
            hold = 0.0
            if self.release_at is not None:
                hold = max(0.0, self.release_at - time.perf_counter())
            config = ("X-Mock-Config", json.dumps({"ttft": round(hold, 4)}))
            return await self.inner.send(attrs.evolve(request, headers=(*request.headers, config)))

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define
class _Level:
    """What one level counts while it runs (one event loop: no locks needed)."""

    streams: int
    samples: Samples
    errors: dict[str, int] = attrs.Factory(dict)
    events: int = 0
    done: int = 0
    open_now: int = 0
    max_open: int = 0
    all_open_after: float | None = None
    rss_peak: int | None = None


def _bench_level(
    args: argparse.Namespace,
    base_url: str,
    key: str,
    streams: int,
    embedded: bool,
    server_cpu: Callable[[], float | None],
    progress: _Progress,
    samples: dict[str, Samples],
) -> dict[str, Any]:
    """`streams` at once from one AsyncClient: success rate, latency, memory and CPU."""
    import asyncio

    import anyio

    release = ramp_hold(streams, args.transport) if embedded else None
    detail = "" if release is None else f" (first tokens released at {release:.2f} s)"
    progress.start(f"{streams:,} concurrent streams{detail}", streams)
    level = _Level(streams, samples.setdefault(f"{streams}", Samples()))
    server_before = server_cpu()
    try:
        measured: dict[str, Any] = anyio.run(
            _run_level, args.model, base_url, key, args.transport, level, release, progress
        )
    except asyncio.CancelledError:
        # Ctrl-C cancels the main task. On Python 3.10 tasks cannot be uncancelled, so the
        # runner cannot tell that cancellation from any other and lets it out as it is.
        raise KeyboardInterrupt from None
    server_after = server_cpu()
    ok = len(level.samples.ttft)
    per_stream = None
    rss_base, rss_peak = measured["rss_base"], level.rss_peak
    if rss_base is not None and rss_peak is not None and level.max_open:
        per_stream = max(0, rss_peak - rss_base) / level.max_open / 1024
    events = level.events
    return {
        "streams": streams,
        "ok": ok,
        "success_rate": ok / streams,
        "errors": level.errors,
        "max_open": level.max_open,
        "all_open_after_s": level.all_open_after,
        "release_after_s": None if release is None else round(release, 4),
        "wall_s": measured["wall_s"],
        "ttft_from": "request" if release is None else "release",
        "ttft_s": attrs.asdict(Spread.of(level.samples.ttft)),
        "tokens_per_s": attrs.asdict(Spread.of(level.samples.tokens_per_s)),
        "events": events,
        "client_cpu_s": round(measured["cpu_s"], 4),
        "cpu_per_event_us": round(measured["cpu_s"] / events * 1e6, 1) if events else None,
        "cpu_per_stream_ms": round(measured["cpu_s"] / streams * 1e3, 3),
        "server_cpu_s": None
        if server_before is None or server_after is None
        else round(server_after - server_before, 2),  # clock ticks: 10 ms
        "rss_base_mib": None if rss_base is None else rss_base / 2**20,
        "rss_peak_mib": None if rss_peak is None else rss_peak / 2**20,
        "rss_per_stream_kib": None if per_stream is None else round(per_stream, 1),
    }


async def _run_level(
    model: str,
    base_url: str,
    key: str,
    transport: str,
    level: _Level,
    release: float | None,
    progress: _Progress,
) -> dict[str, Any]:
    """One level on its own event loop and client; see the module docstring for the method."""
    import anyio

    from ._async_client import AsyncClient
    from ._exchange import Timeouts
    from ._retry import RetryPolicy

    inner: AsyncBaseTransport
    if transport == "aiohttp":
        from holysheep.transports import AiohttpTransport

        inner = AiohttpTransport()
    else:
        from holysheep.transports import AsyncHTTPXTransport

        inner = AsyncHTTPXTransport()  # what AsyncClient() uses by default
    released = _Released(inner) if release is not None else None
    # Generous limits: at 5,000 streams the first token waits for the release, then its turn.
    timeouts = Timeouts(connect=60, ttft=120, idle=60, total=300)
    async with AsyncClient(
        api_key=key,
        base_url=base_url,
        retry=RetryPolicy.none(),
        timeout=timeouts,
        transport=released or inner,
    ) as client:
        # Lazy imports and the first connection are a one-off cost, not a per-stream one.
        with contextlib.suppress(HolySheepError):
            async with client.chat.stream(
                model=model, messages=_BENCH_MESSAGES, max_tokens=BENCH_RAMP_MAX_TOKENS
            ) as stream:
                await stream.until_done()
        gc.collect()
        rss_base, high_base, cpu_base = _rss_bytes(), _high_water_bytes(), _cpu_seconds()
        level.rss_peak = rss_base
        started = time.perf_counter()
        release_at = None if release is None else started + release
        if released is not None:
            released.release_at = release_at

        async def one() -> None:
            opened = False
            first: float | None = None
            try:
                async with client.chat.stream(
                    model=model, messages=_BENCH_MESSAGES, max_tokens=BENCH_RAMP_MAX_TOKENS
                ) as stream:
                    opened = True
                    level.open_now += 1
                    if level.open_now > level.max_open:
                        level.max_open = level.open_now
                        if level.max_open == level.streams:
                            level.all_open_after = time.perf_counter() - started
                    async for chunk in stream:
                        if chunk.text:
                            level.events += 1
                            if first is None:
                                first = time.perf_counter()
                ended = time.perf_counter()
            except HolySheepError as exc:
                level.errors[type(exc).__name__] = level.errors.get(type(exc).__name__, 0) + 1
                return
            finally:
                level.open_now -= opened
                level.done += 1
            stats = stream.stats
            if release_at is None or first is None:
                level.samples.ttft.append(stats.ttft)
                level.samples.tokens_per_s.append(stats.tokens_per_s)
            else:
                # From the instant the upstream sent every first token: what the client adds.
                level.samples.ttft.append(first - release_at)
                level.samples.tokens_per_s.append(stats.tokens / max(ended - release_at, 1e-6))

        def sample() -> None:
            rss = _rss_bytes()
            if rss is not None and (level.rss_peak is None or rss > level.rss_peak):
                level.rss_peak = rss
            progress.update(
                level.done, f"{level.streams:,} concurrent streams: {level.open_now:,} open"
            )

        async def watch() -> None:
            while True:
                sample()
                await anyio.sleep(SAMPLE_INTERVAL)

        async with anyio.create_task_group() as outer:
            outer.start_soon(watch)
            async with anyio.create_task_group() as group:
                for _ in range(level.streams):
                    group.start_soon(one)
            outer.cancel_scope.cancel()
        sample()
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_base
        high = _high_water_bytes()
        if high is not None and high_base is not None and high > high_base:
            # The kernel saw a peak the sampler missed (or there is no /proc to sample).
            level.rss_peak = max(level.rss_peak or 0, high)
            if rss_base is None:  # no /proc: the earlier high-water mark is the baseline
                rss_base = high_base
    return {"rss_base": rss_base, "wall_s": wall, "cpu_s": cpu}


def _rss_bytes() -> int | None:
    """Resident memory now (Linux `/proc/self/statm`); None where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _high_water_bytes() -> int | None:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if sys.platform == "win32":  # pragma: no cover - no getrusage there
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _cpu_seconds() -> float:
    # User + system time of every thread, at clock_gettime resolution (os.times() ticks at
    # 10 ms, too coarse for the 10-stream level).
    return time.process_time()


# -- 3. faults ---------------------------------------------------------------------------------


def _bench_faults(args: argparse.Namespace, progress: _Progress) -> dict[str, Any]:
    """Streams with a fault each, retried with resume: how many end byte-identical to a clean one.

    Faults are queued one per stream (`enqueue`), so the retry that follows gets a clean
    answer, as from a gateway whose hiccup passed. Fault positions are seeded: reruns agree.
    """
    from ._client import Client
    from ._exchange import Timeouts
    from ._retry import RetryPolicy
    from .testing import serve

    rng = random.Random(FAULT_SEED)
    # Fast waits so faults cost milliseconds; an idle timeout short enough to notice a stall.
    policy = RetryPolicy(attempts=4, timeout=20, wait_initial=0.01, wait_max=0.1, wait_jitter=0)
    timeouts = Timeouts(connect=5, ttft=5, idle=0.3, total=30)
    tokens = args.max_tokens
    outcomes: dict[str, int] = {}
    injected: dict[str, int] = {}
    ok = identical = attempts = 0
    progress.start(f"faults: {_streams(args.requests)}, one fault each", args.requests)
    with (
        serve(ttft=FAULT_TTFT, tokens_per_s=FAULT_TOKENS_PER_S, event_ids=True) as upstream,
        Client(
            api_key="bench-key",
            base_url=upstream.base_url,
            retry=policy,
            on_interrupt="resume",
            timeout=timeouts,
        ) as client,
    ):
        clean = client.chat.complete(model=args.model, messages=_BENCH_MESSAGES, max_tokens=tokens)
        reference = clean.text
        # Faults go where the answer has tokens: one placed past its end never fires, and the
        # stream would count as recovered from a fault it never met (the answer may be shorter
        # than --max-tokens: the mock's is 97 tokens).
        usage = clean.usage
        if usage is not None and usage.completion_tokens:
            tokens = min(tokens, usage.completion_tokens)
        for i in range(args.requests):
            fault = _fault_for(i, rng, tokens)
            name = _FAULT_ROTATION[i % len(_FAULT_ROTATION)]
            injected[name] = injected.get(name, 0) + 1
            upstream.enqueue({"fault": fault})
            try:
                with client.chat.stream(
                    model=args.model, messages=_BENCH_MESSAGES, max_tokens=tokens
                ) as stream:
                    text = stream.until_done().text
            except HolySheepError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
            else:
                ok += 1
                identical += text == reference
                attempts += stream.stats.attempts
            progress.update(i + 1)
    return {
        "streams": args.requests,
        "recovered": ok,
        "byte_identical": identical,
        "success_rate": identical / args.requests,
        "attempts_per_recovered_stream": attempts / ok if ok else None,
        "errors": outcomes,
        "faults": injected,
        "policy": "on_interrupt=resume, event ids, attempts 4, wait 0.01-0.1 s",
    }


def _fault_for(index: int, rng: random.Random, tokens: int) -> dict[str, Any]:
    spec = _FAULT_ROTATION[index % len(_FAULT_ROTATION)]
    # At least one token first for faults that cut a stream: that is the case needing resume.
    # A fault fires only where another token would follow, so a one-token stream can only be
    # cut before its token.
    after = rng.randint(1, tokens - 1) if tokens >= 2 else 0
    if spec.startswith("status="):
        status = int(spec.partition("=")[2])
        fault: dict[str, Any] = {"kind": "status", "status": status}
        if status == 429:
            fault["retry_after"] = 0.05
        return fault
    return {"kind": spec, "after": after}


# -- output ------------------------------------------------------------------------------------


def _print_bench(results: Mapping[str, Any]) -> None:
    seq = results["sequential"]
    print(f"{PROG} bench: {results['model']} against {results['target']}")
    print(f"ramp client: AsyncClient on {results['transport'].split()[0]}")
    print()
    ttft, rate = seq["ttft_s"], seq["tokens_per_s"]
    _print_table(
        ["sequential", "ok", "avg", "p50", "p99", "min"],
        [
            [
                "ttft",
                f"{seq['ok']}/{seq['requests']}",
                _ms(ttft["avg"]),
                _ms(ttft["p50"]),
                _ms(ttft["p99"]),
                _ms(ttft["minimum"]),
            ],
            [
                "tokens/s",
                "",
                _num(rate["avg"]),
                _num(rate["p50"]),
                _num(rate["p99"]),
                _num(rate["minimum"]),
            ],
        ],
        "lrrrrr",
    )
    _print_errors(seq["errors"])
    print()
    levels = results["concurrency"]
    _print_table(
        [
            "concurrent",
            "ok",
            "success",
            "open",
            "ttft p50",
            "ttft p99",
            "tokens/s",
            "rss/stream",
            "cpu/event",
        ],
        [
            [
                f"{level['streams']:,}",
                f"{level['ok']:,}/{level['streams']:,}",
                f"{level['success_rate']:.1%}",
                f"{level['max_open']:,}",
                _ms(level["ttft_s"]["p50"]),
                _ms(level["ttft_s"]["p99"]),
                _num(level["tokens_per_s"]["p50"]),
                _kib(level["rss_per_stream_kib"]),
                _us(level["cpu_per_event_us"]),
            ]
            for level in levels
        ],
        "rrrrrrrrr",
    )
    for level in levels:
        _print_errors(level["errors"], f"at {level['streams']:,}: ")
    if levels and levels[0]["ttft_from"] == "release":
        print("every first token of a level leaves the upstream at one instant, once all streams")
        print("are open (open: most open at once); ttft counts from that instant, tokens/s (p50")
        print("per stream) up to each stream's end; rss/stream and cpu/event are the client's:")
        print("this process's peak RSS growth per open stream, its CPU time per token")
    elif levels:
        print("ttft from each request; tokens/s: p50 per stream; open: most streams open at once;")
        print("rss/stream and cpu/event: this process's peak RSS growth per open stream, its CPU")
        print("time per token")
    faults = results.get("faults")
    if faults is not None:
        print()
        print(
            f"faults: {faults['byte_identical']}/{faults['streams']} streams recovered"
            f" byte-identical ({faults['success_rate']:.1%}) with {faults['policy']};"
            f" faults: {', '.join(f'{n} {name}' for name, n in faults['faults'].items())}"
        )
        _print_errors(faults["errors"])


def _streams(count: int) -> str:
    return f"{count:,} stream{'' if count == 1 else 's'}"


def _print_errors(errors: Mapping[str, int], prefix: str = "") -> None:
    if errors:
        listed = ", ".join(f"{count} {name}" for name, count in sorted(errors.items()))
        print(f"errors {prefix}{listed}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} KiB"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} us"


# -- the plot ----------------------------------------------------------------------------------


def _draw_plot(path: Path, results: Mapping[str, Any], samples: Mapping[str, Samples]) -> None:
    """Two panels: the TTFT distribution (a CDF per phase) and tokens/s against concurrency.

    Agg renders to a file without a display; it is chosen before pyplot is imported.
    """
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    ticker = importlib.import_module("matplotlib.ticker")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    levels = results["concurrency"]
    from_release = bool(levels) and levels[0]["ttft_from"] == "release"
    series = [("sequential" + (" (from the request)" if from_release else ""), "sequential")]
    series += [
        (
            f"{level['streams']:,} concurrent" + (" (from the release)" if from_release else ""),
            f"{level['streams']}",
        )
        for level in levels
    ]
    for index, (label, name) in enumerate(series):
        # A log axis has no zero: a first token within 0.1 ms of its release is drawn there.
        points = sorted(max(v * 1000, 0.1) for v in samples[name].ttft if v is not None)
        if points:
            fractions = [(i + 1) / len(points) for i in range(len(points))]
            left.step(
                [points[0], *points],
                [0.0, *fractions],
                where="post",
                color=colors[index % len(colors)],
                label=label,
            )
    left.set_xscale("log")
    # Round milliseconds at 1-2-3-5 steps: the default labels of a short log axis read 3x10^2.
    left.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    left.xaxis.set_major_formatter(
        ticker.FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    )
    left.xaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_xlabel("time to first token (ms, log scale)")
    left.set_ylabel("fraction of streams")
    left.set_ylim(0, 1.02)
    left.grid(True, which="both", alpha=0.3)
    title = "TTFT distribution"
    if from_release:
        title += ": a level counts from the instant all first tokens leave the upstream"
    left.set_title(title, fontsize=10)
    left.legend(loc="lower right", fontsize=8)

    streams = [level["streams"] for level in levels]
    p10, p50, p90 = [], [], []
    for level in levels:
        rates = sorted(r for r in samples[f"{level['streams']}"].tokens_per_s if r is not None)
        p10.append(_rank(rates, 0.1) if rates else math.nan)
        p50.append(_rank(rates, 0.5) if rates else math.nan)
        p90.append(_rank(rates, 0.9) if rates else math.nan)
    right.fill_between(streams, p10, p90, color=colors[0], alpha=0.2, label="p10-p90")
    right.plot(streams, p50, marker="o", color=colors[0], label="tokens/s per stream (p50)")
    sequential = results["sequential"]["tokens_per_s"]["p50"]
    if sequential is not None:
        right.axhline(sequential, color="gray", linestyle="--", label="sequential (p50)")
    # The success rate is written at each point: red where streams failed.
    for level, rate in zip(levels, p50, strict=True):
        share = level["success_rate"]
        right.annotate(
            f"{share:.1%} ok",
            (level["streams"], 0 if math.isnan(rate) else rate),
            textcoords="offset points",
            xytext=(0, -15),
            ha="center",
            fontsize=8,
            color="black" if share == 1 else "red",
        )
    right.set_xscale("log")
    right.set_xticks(streams, [f"{n:,}" for n in streams])
    right.minorticks_off()
    right.set_xlabel("concurrent streams (log scale)")
    right.set_ylabel("tokens/s per stream")
    top = max([v for v in (*p90, sequential or 0) if not math.isnan(v)], default=1)
    right.set_ylim(0, top * 1.15)
    right.grid(True, alpha=0.3)
    right.set_title("tokens/s per stream and success rate vs concurrency", fontsize=10)
    right.legend(loc="lower left", fontsize=8)

    fig.suptitle(f"{PROG} bench: {results['model']} against {results['target']}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
