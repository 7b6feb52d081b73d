"""Benchmark holysheep's SSE decoder and chat layer against the Python peers, in one process.

Run from the repository root (the peers come from the `bench` dependency group):

    PYTHONPATH=. python bench/sse_decode.py            # full run, 5 repeats, a few minutes
    PYTHONPATH=. python bench/sse_decode.py --quick    # tiny inputs, 1 repeat: a smoke test
    PYTHONPATH=. python bench/sse_decode.py --json     # machine-readable results on stdout

Every contender gets the same pre-cut list of reads, so the cost of cutting is not measured.
A contender is a small adapter `(chunks: list[bytes]) -> int` that decodes everything and
returns the number of events it saw; the count is checked against the number of events the
generator wrote, so a peer that drops or merges events gets a warning row, not a fast number.

The machine this runs on is shared and noisy, so: rounds are interleaved (each round runs
every contender once, so a burst of noise hits all of them alike), the garbage collector is
off while a contender runs, and the tables print medians. A repeat that runs past `--cap`
seconds is interrupted and the contender is marked "too slow" for that case: some peers are
quadratic in the event size and would otherwise hang the run.

Peers that are not installed are reported and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import holysheep
from holysheep import ChatAccumulator, SSEDecoder, _sse
from holysheep._chat import JSON_BACKEND

try:  # bench/ is on sys.path when this file runs as a script
    import _streams as streams
except ImportError:  # loaded some other way (runpy, a test): find the helper beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _streams as streams
import _report as report
from _report import Target, fmt, progress, versions

Adapter = Callable[[list[bytes]], int]

HOLYSHEEP = "holysheep"
PURE = "holysheep, pure Python"  # the C part (holysheep/_speedups.c) turned off
NAIVE = "naive split"
KIB = 1024


# -- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    tokens: int  # content chunks in the OpenAI and Anthropic streams
    one_byte_events: int  # 1-byte reads only cover this many events of each stream
    large_events: int  # 64 KiB events in the large-event stream
    large_one_byte_events: int
    flat_total: int  # bytes of stream per event size in the flatness test


FULL = Sizes(
    tokens=20_000,
    one_byte_events=1_000,
    large_events=256,
    large_one_byte_events=4,
    flat_total=8 * 1024 * KIB,
)
QUICK = Sizes(
    tokens=200, one_byte_events=20, large_events=4, large_one_byte_events=1, flat_total=512 * KIB
)


# -- the contenders -------------------------------------------------------------------------------


def holysheep_decoder(chunks: list[bytes]) -> int:
    decoder = SSEDecoder()
    feed = decoder.feed
    events = 0
    for chunk in chunks:
        events += len(feed(chunk))
    decoder.close()
    return events


def pure_python_decoder(chunks: list[bytes]) -> int:
    # What a machine that could not build holysheep/_speedups.c runs.
    built, _sse._c_feed = _sse._c_feed, None
    try:
        return holysheep_decoder(chunks)
    finally:
        _sse._c_feed = built


def naive_split(chunks: list[bytes]) -> int:
    # The floor: whole body at once, split on blank lines, decode each data line. It knows the
    # line ending in advance, handles no comments, no split reads, no multi-line data.
    body = b"".join(chunks)
    eol = b"\r\n" if b"\r\n" in body[:4096] else b"\n"
    events = 0
    for block in body.split(eol + eol):
        has_data = False
        for line in block.split(eol):
            if line.startswith(b"data:"):
                line[6:].decode()
                has_data = True
        events += has_data
    return events


def _openai_decoder() -> Adapter:
    from openai._streaming import SSEDecoder as OpenAIDecoder

    def openai_sdk(chunks: list[bytes]) -> int:
        # What openai.Stream._iter_events() runs over response.iter_bytes().
        return sum(1 for _ in OpenAIDecoder().iter_bytes(iter(chunks)))

    return openai_sdk


def _httpx_sse_decoder() -> Adapter:
    from httpx._decoders import TextDecoder
    from httpx_sse._decoders import SSEDecoder as HttpxSSEDecoder

    try:  # newer httpx-sse split lines on CR/LF only, with their own line decoder
        from httpx_sse._decoders import SSELineDecoder as LineDecoder
    except ImportError:  # older ones used httpx's Response.iter_lines()
        from httpx._decoders import LineDecoder  # type: ignore[assignment]

    def httpx_sse(chunks: list[bytes]) -> int:
        # EventSource.iter_sse(): Response.iter_text() (an incremental UTF-8 decoder that drops
        # empty strings), a line decoder, then SSEDecoder.decode() per line.
        text_decoder, lines, decoder = TextDecoder("utf-8"), LineDecoder(), HttpxSSEDecoder()
        events = 0

        def texts() -> Iterator[str]:
            for chunk in chunks:
                if text := text_decoder.decode(chunk):
                    yield text
            if text := text_decoder.flush():
                yield text

        for text in texts():
            for line in lines.decode(text):
                if decoder.decode(line.rstrip("\n")) is not None:
                    events += 1
        for line in lines.flush():
            if decoder.decode(line.rstrip("\n")) is not None:
                events += 1
        return events

    return httpx_sse


def _ld_eventsource_decoder() -> Adapter:
    from ld_eventsource.actions import Event  # type: ignore[import-untyped]
    from ld_eventsource.reader import _BufferedLineReader, _SSEReader  # type: ignore[import-untyped]

    def ld_eventsource(chunks: list[bytes]) -> int:
        # What SSEClient reads its connection's byte stream with (sse_client.py).
        reader = _SSEReader(_BufferedLineReader.lines_from(chunks))
        return sum(1 for item in reader.events_and_comments() if isinstance(item, Event))

    return ld_eventsource


def _sseclient_decoder() -> Adapter:
    from sseclient import SSEClient

    def sseclient_py(chunks: list[bytes]) -> int:
        return sum(1 for _ in SSEClient(iter(chunks)).events())

    return sseclient_py


def holysheep_chat(json_loads: Callable[[str], Any]) -> Adapter:
    def run(chunks: list[bytes]) -> int:
        accumulator = ChatAccumulator(json_loads=json_loads)
        feed = accumulator.feed
        for chunk in chunks:
            feed(chunk)
        accumulator.close()
        _ = accumulator.completion.text  # the join is part of the work
        return accumulator.chunk_count

    return run


def _orjson_chat() -> Adapter:
    import orjson

    return holysheep_chat(orjson.loads)


def _openai_chat(strict: bool) -> Callable[[], Adapter]:
    def build() -> Adapter:
        from openai import OpenAI
        from openai._streaming import SSEDecoder as OpenAIDecoder
        from openai.types.chat import ChatCompletionChunk

        # openai.Stream.__stream__ turns each event into a chunk with the client's
        # _process_response_data(): construct_type() (pydantic `construct`, no validation) by
        # default, validate_type() with _strict_response_validation. Building a client makes
        # no request.
        client = OpenAI(api_key="bench", _strict_response_validation=strict)
        process = client._process_response_data

        def openai_chat(chunks: list[bytes]) -> int:
            parts = []
            count = 0
            for sse in OpenAIDecoder().iter_bytes(iter(chunks)):
                if sse.data.startswith("[DONE]"):
                    break
                data = sse.json()
                if isinstance(data, dict) and data.get("error"):  # Stream checks this too
                    raise RuntimeError(data)
                chunk = process(data=data, cast_to=ChatCompletionChunk, response=None)  # type: ignore[arg-type]
                count += 1
                if chunk.choices and chunk.choices[0].delta.content:  # accumulate the text
                    parts.append(chunk.choices[0].delta.content)
            _ = "".join(parts)
            return count

        return openai_chat

    return build


@dataclass
class Contender:
    name: str
    run: Adapter | None
    version: str = ""
    missing: str = ""  # why it is not run ("not installed")


def _load(name: str, dist: str, build: Callable[[], Adapter]) -> Contender:
    try:
        version = metadata.version(dist)
        return Contender(name, build(), version)
    except metadata.PackageNotFoundError:
        return Contender(name, None, missing=f"not installed ({dist})")
    except ImportError as exc:
        return Contender(name, None, missing=f"not installed ({exc.name or dist})")


def decoders() -> list[Contender]:
    return [
        Contender(HOLYSHEEP, holysheep_decoder, holysheep.__version__),
        Contender(
            PURE,
            pure_python_decoder,
            holysheep.__version__,
            missing="" if _sse._c_feed else "the C part is not built (or turned off)",
        ),
        _load("openai", "openai", _openai_decoder),
        _load("httpx-sse", "httpx-sse", _httpx_sse_decoder),
        _load("ld-eventsource", "launchdarkly-eventsource", _ld_eventsource_decoder),
        _load("sseclient-py", "sseclient-py", _sseclient_decoder),
        Contender(NAIVE, naive_split, "floor"),
    ]


def chat_layers() -> list[Contender]:
    return [
        _load("holysheep + orjson", "orjson", _orjson_chat),
        Contender("holysheep + json", holysheep_chat(json.loads), "stdlib"),
        _load("openai construct", "openai", _openai_chat(strict=False)),
        _load("openai strict", "openai", _openai_chat(strict=True)),
    ]


# -- measuring ------------------------------------------------------------------------------------


class _TooSlow(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise _TooSlow


@dataclass
class Measurement:
    times: list[float] = field(default_factory=list)
    events: int = 0
    status: str = ""  # empty when measured; else "not installed", "too slow", an error

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(
    contenders: list[Contender], chunks: list[bytes], repeats: int, cap: float
) -> dict[str, Measurement]:
    """Time every contender `repeats` times on `chunks`, one round of all of them at a time."""
    results = {c.name: Measurement(status=c.missing) for c in contenders}
    timer = hasattr(signal, "SIGALRM") and signal.getsignal(signal.SIGALRM) is _on_alarm
    for _ in range(repeats):
        for contender in contenders:
            result = results[contender.name]
            if result.status or contender.run is None:
                continue
            gc.collect()
            gc.disable()
            if timer:
                signal.setitimer(signal.ITIMER_REAL, cap)
            try:
                start = time.perf_counter()
                events = contender.run(chunks)
                elapsed = time.perf_counter() - start
            except _TooSlow:
                result.status = f"too slow (a repeat > {cap:g} s)"
            except Exception as exc:  # a peer that chokes on valid input is a result too
                result.status = f"error: {type(exc).__name__}: {exc}"[:70]
            else:
                result.times.append(elapsed)
                result.events = events
            finally:
                if timer:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                gc.enable()
    return results


# -- the cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    key: str
    title: str
    events: list[bytes]
    one_byte_events: int


@dataclass(frozen=True)
class Case:
    pattern: str
    chunks: list[bytes]
    events: int  # what the generator wrote: the right answer
    size: int


ONE_BYTE = "1 B"  # over the first `Input.one_byte_events` events only
PER_EVENT = "per event"
RANDOM = "100-300 B"
TARGET_PATTERNS = (PER_EVENT, RANDOM, "16 KiB")


def cases(source: Input) -> Iterator[Case]:
    body = b"".join(source.events)
    head = source.events[: source.one_byte_events]
    yield Case(ONE_BYTE, streams.split_reads(b"".join(head), 1), len(head), sum(map(len, head)))
    for label, size in (("64 B", 64), ("1 KiB", KIB), ("16 KiB", 16 * KIB), (RANDOM, (100, 300))):
        yield Case(label, streams.split_reads(body, size), len(source.events), len(body))
    yield Case(PER_EVENT, source.events, len(source.events), len(body))


def inputs(sizes: Sizes) -> list[Input]:
    openai = streams.openai_chat_stream(sizes.tokens)
    anthropic = streams.anthropic_stream(sizes.tokens)
    crlf = streams.to_crlf(openai)
    large = streams.large_event_stream(sizes.large_events)
    return [
        Input("openai", "OpenAI chat stream, LF", openai, sizes.one_byte_events),
        Input("openai-crlf", "OpenAI chat stream, CRLF", crlf, sizes.one_byte_events),
        Input("anthropic", "Anthropic messages stream", anthropic, sizes.one_byte_events),
        Input("large", "64 KiB events", large, sizes.large_one_byte_events),
    ]


@dataclass
class Row:
    section: str
    input: str
    pattern: str
    contender: str
    reads: int
    bytes: int
    expected_events: int
    events: int = 0
    median_s: float | None = None
    events_per_s: float | None = None
    mb_per_s: float | None = None
    ratio: float | None = None  # see the table headers: a speedup of the reference row
    status: str = ""


def rows_for(
    section: str,
    input_key: str,
    case: Case,
    results: dict[str, Measurement],
    reference: str,
    ratio_of_reference: bool,
) -> list[Row]:
    """One row per contender. `ratio` = how many times faster the reference is than the row
    (ratio_of_reference), or how many times faster the row is than the reference."""
    ref = results.get(reference)
    ref_time = ref.median if ref is not None and ref.times else None
    rows = []
    for name, result in results.items():
        row = Row(section, input_key, case.pattern, name, len(case.chunks), case.size, case.events)
        row.status = result.status
        if result.times:
            row.events = result.events
            row.median_s = result.median
            row.events_per_s = result.events / result.median
            row.mb_per_s = case.size / result.median / 1e6
            if ref_time:
                ratio = result.median / ref_time
                row.ratio = ratio if ratio_of_reference else 1 / ratio
            if result.events != case.events:
                row.status = f"WRONG: {result.events:,} events, expected {case.events:,}"
        rows.append(row)
    return rows


def run_decoders(sizes: Sizes, repeats: int, cap: float) -> list[Row]:
    contenders = decoders()
    rows = []
    for source in inputs(sizes):
        for case in cases(source):
            progress(f"  decoders: {source.title}, {case.pattern} reads")
            results = measure(contenders, case.chunks, repeats, cap)
            rows += rows_for("decoders", source.key, case, results, HOLYSHEEP, True)
    return rows


def run_flatness(sizes: Sizes, repeats: int, cap: float) -> list[Row]:
    contenders = decoders()
    rows = []
    for event_size in (16 * KIB, 256 * KIB):
        count = max(1, sizes.flat_total // event_size)
        events = streams.large_event_stream(count, event_size)
        body = b"".join(events)
        case = Case(
            f"{event_size // KIB} KiB events", streams.split_reads(body, 64), count, len(body)
        )
        progress(f"  flatness: {case.pattern} at 64 B reads")
        results = measure(contenders, case.chunks, repeats, cap)
        rows += rows_for("flatness", "large", case, results, HOLYSHEEP, True)
    return rows


def run_chat(sizes: Sizes, repeats: int, cap: float) -> list[Row]:
    contenders = chat_layers()
    source = streams.openai_chat_stream(sizes.tokens)
    body = b"".join(source)
    chunks_wanted = len(source) - 1  # every event but [DONE] becomes a chunk
    rows = []
    for case in cases(Input("openai", "", source, 0)):
        if case.pattern not in TARGET_PATTERNS:
            continue
        case = Case(case.pattern, case.chunks, chunks_wanted, len(body))
        progress(f"  chat layer: {case.pattern} reads")
        results = measure(contenders, case.chunks, repeats, cap)
        rows += rows_for("chat", "openai", case, results, "openai construct", False)
    return rows


# -- the targets -------------------------------------------------------------------------------


def _rate(rows: list[Row], **match: str) -> float | None:
    for row in rows:
        if all(getattr(row, key) == value for key, value in match.items()):
            return row.events_per_s if not row.status else None
    return None


def targets(decoded: list[Row], flat: list[Row], chat: list[Row]) -> list[Target]:
    found = []
    # The pure Python decoder's lines are there to be read, not met: the target is for
    # holysheep as installed, which has the C part wherever there is a compiler (or a wheel).
    for contender, label in ((HOLYSHEEP, "(a) decoder"), (PURE, "(a) pure Python decoder")):
        if not _rate(decoded, input="openai", pattern=PER_EVENT, contender=contender):
            continue
        for pattern in TARGET_PATTERNS:
            mine = _rate(decoded, input="openai", pattern=pattern, contender=contender)
            peers = [
                (row.events_per_s, row.contender)
                for row in decoded
                if (row.input, row.pattern) == ("openai", pattern)
                and row.contender not in (HOLYSHEEP, PURE, NAIVE)
                and row.events_per_s
                and not row.status
            ]
            best, best_name = max(peers) if peers else (None, "none measured")
            found.append(
                Target(
                    f"{label} vs fastest peer, OpenAI stream, {pattern} reads",
                    mine / best if mine and best else None,
                    1.5,
                    True,
                    detail=f"fastest peer: {best_name}",
                )
            )
            naive = _rate(decoded, input="openai", pattern=pattern, contender=NAIVE)
            found.append(
                Target(
                    f"{label} vs naive split, OpenAI stream, {pattern} reads",
                    mine / naive if mine and naive else None,
                    0.65,
                    True,
                )
            )
    speeds = [
        row.mb_per_s
        for row in flat
        if row.contender == HOLYSHEEP and row.mb_per_s and not row.status
    ]
    found.append(
        Target(
            "(b) decoder MB/s, 16 KiB vs 256 KiB events at 64 B reads",
            max(speeds) / min(speeds) if len(speeds) == 2 else None,
            1.5,
            False,
            detail="slower / faster",
        )
    )
    for backend in ("orjson", "json"):
        for pattern in TARGET_PATTERNS:
            mine = _rate(chat, pattern=pattern, contender=f"holysheep + {backend}")
            theirs = _rate(chat, pattern=pattern, contender="openai construct")
            found.append(
                Target(
                    f"(c) chat layer ({backend}) vs openai decoder + ChatCompletionChunk, "
                    f"{pattern} reads",
                    mine / theirs if mine and theirs else None,
                    3.0,
                    True,
                    "",
                )
            )
    return found


# -- output ----------------------------------------------------------------------------------------


def _cells(row: Row, last_pattern: str) -> list[str]:
    pattern = row.pattern
    if pattern == ONE_BYTE:
        pattern += f" ({row.expected_events:,} ev.)"
    return [
        pattern if row.pattern != last_pattern else "",
        row.contender,
        fmt(row.events_per_s, ",.0f"),
        fmt(row.mb_per_s, ".1f"),
        fmt(row.ratio, ".2f") + ("x" if row.ratio is not None else ""),
        row.status,
    ]


def print_report(
    meta: dict[str, Any],
    decoded: list[Row],
    flat: list[Row],
    chat: list[Row],
    found: list[Target],
) -> None:
    print("SSE decoding benchmark")
    for key, value in meta.items():
        print(f"  {key}: {value}")
    print(
        "  events/s and MB/s (10^6 bytes) are medians over the repeats; every contender decodes\n"
        "  the same pre-cut reads. '1 B' reads cover only the first events of a stream (shown)."
    )
    headers = ["reads", "decoder", "events/s", "MB/s", "hs speedup", "note"]
    for key, title in (
        ("openai", "OpenAI chat stream, LF"),
        ("openai-crlf", "OpenAI chat stream, CRLF"),
        ("anthropic", "Anthropic messages stream"),
        ("large", "64 KiB events"),
    ):
        mine = [row for row in decoded if row.input == key]
        if not mine:
            continue
        full = mine[-1]
        print(f"\n== {title}: {full.expected_events:,} events, {full.bytes / 1e6:.2f} MB ==")
        print("   hs speedup = holysheep's rate / this row's rate")
        print(report.table(headers, _grouped(mine), names=2))

    print("\n== Flatness: 64 B reads, same total size, 16 KiB vs 256 KiB events ==")
    table = []
    for name in dict.fromkeys(row.contender for row in flat):
        small, large = (r for r in flat if r.contender == name)
        note = small.status or large.status
        slowdown = None
        if small.mb_per_s and large.mb_per_s and not note:
            slowdown = small.mb_per_s / large.mb_per_s
        table.append(
            [
                name,
                fmt(small.mb_per_s, ".1f"),
                fmt(large.mb_per_s, ".1f"),
                fmt(slowdown, ".2f") + ("x" if slowdown is not None else ""),
                note,
            ]
        )
    print(
        report.table(["decoder", "16 KiB MB/s", "256 KiB MB/s", "slowdown", "note"], table, names=1)
    )

    print(f"\n== Chat layer: OpenAI chat stream, {chat[0].expected_events:,} chunks ==")
    print(
        "   openai construct = openai's SSEDecoder + json.loads + _process_response_data\n"
        "   (ChatCompletionChunk.construct), as openai.Stream does per event; openai strict =\n"
        "   the same with _strict_response_validation (model validation). vs openai = this\n"
        "   row's rate / openai construct's rate."
    )
    print(
        report.table(
            ["reads", "chat layer", "chunks/s", "MB/s", "vs openai", "note"],
            _grouped(chat),
            names=2,
        )
    )

    print("\n== Targets ==")
    for target in found:
        sign = ">=" if target.higher_is_better else "<="
        value = fmt(target.value, ".2f") + "x" if target.value is not None else "n/a"
        detail = f"  ({target.detail})" if target.detail else ""
        print(f"{target.verdict}  {target.name}: {value} [{sign} {target.threshold:g}x]{detail}")


def _grouped(rows: list[Row]) -> list[list[str]]:
    table: list[list[str]] = []
    last = ""
    for row in rows:
        if row.pattern != last and table:
            table.append([""] * 6)
        table.append(_cells(row, last))
        last = row.pattern
    return table


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs and 1 repeat (smoke)")
    parser.add_argument("--repeats", type=int, help="timed runs per case (default 5, quick 1)")
    parser.add_argument("--cap", type=float, default=5.0, help="seconds one repeat may take")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    if hasattr(signal, "setitimer"):  # not on Windows: there a slow peer just runs long
        signal.signal(signal.SIGALRM, _on_alarm)

    started = time.perf_counter()
    decoded = run_decoders(sizes, repeats, args.cap)
    flat = run_flatness(sizes, repeats, args.cap)
    chat = run_chat(sizes, repeats, args.cap)
    found = targets(decoded, flat, chat)

    meta = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": f"{platform.machine()}, {platform.system()}",
        "versions": versions(
            "holysheep openai httpx-sse httpx launchdarkly-eventsource sseclient-py orjson pydantic"
        ),
        "holysheep default JSON backend": JSON_BACKEND,
        "repeats": repeats,
        "cap per repeat (s)": args.cap,
        "sizes": "quick" if args.quick else "full",
        "wall time (s)": round(time.perf_counter() - started, 1),
    }
    if args.json:
        json.dump(
            {
                "meta": meta,
                "decoders": [vars(row) for row in decoded],
                "flatness": [vars(row) for row in flat],
                "chat": [vars(row) for row in chat],
                "targets": [{**vars(t), "verdict": t.verdict} for t in found],
            },
            sys.stdout,
            indent=1,
        )
        print()
    else:
        print_report(meta, decoded, flat, chat, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
