"""The `holysheep` command: `chat`, `mock`, `cost` and `bench`, on argparse (stdlib only).

Theory of operation
-------------------
`main(argv)` is the only place that turns outcomes into exit codes, so every subcommand can
just raise: 0 on success, 1 for an error (one line, `holysheep: error: <message>`; the
traceback only with `--debug`), 2 for a usage error (argparse's own convention), 130 for
Ctrl-C (128 + SIGINT, what shells report for a job stopped by Ctrl-C). Library errors already
say what happened, with status and request id, so the command prints `str(exc)` as it is.

Ctrl-C during `chat` is a normal way to stop a long answer, not a crash: Python raises
`KeyboardInterrupt` in the main thread, which is reading the stream; we close the stream (the
connection goes, so the server stops generating and billing), keep the text already printed
exactly as it was, and say "interrupted" on stderr. Stdout only ever carries the answer (or the
`--json` object), so `holysheep chat ... > answer.txt` captures nothing else.

The clients and the embedded upstream are imported by the subcommands that use them, so
`holysheep cost` starts without loading requests, httpx or anyio.

`bench` is deliberately small: sequential streams for latency, a concurrency ramp for capacity
and memory, and (embedded only) injected faults for retries. `bench/` in the repository has
the thorough versions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import attrs

from ._config import API_KEY_ENV, BASE_URL_ENV
from ._exceptions import ConfigurationError, HolySheepError
from ._pricing import Cost, PriceTable, RoiRow, cost_of, monthly_roi, parse_token_count
from ._version import __version__

if TYPE_CHECKING:
    from ._call import Attempt
    from ._chat import Completion
    from ._exchange import StreamStats

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a job stopped by Ctrl-C

PROG = "holysheep"
DEFAULT_MODEL = "gpt-4.1"
# `chat --mock` should feel like the real gateway, not like a local loopback: a first token
# after about 0.3 s and 60 tokens/s are typical of GPT-4.1-class models behind a gateway.
MOCK_TTFT = 0.3
MOCK_TOKENS_PER_S = 60.0
# The bench's embedded upstream: the same first-token delay, a slightly slower model, so the
# numbers it prints are recognisably "what the client adds" on top of a known server.
BENCH_TTFT = 0.3
BENCH_TOKENS_PER_S = 50.0
# Short completions keep the default bench under ~15 s while still timing a steady rate.
BENCH_MAX_TOKENS = 20
BENCH_RAMP_MAX_TOKENS = 10
BENCH_DEFAULT_LEVELS = (10, 100)
# The fault run uses its own fast upstream: it measures whether retries recover, not latency.
FAULT_TTFT = 0.05
FAULT_TOKENS_PER_S = 500.0
FAULT_SEED = 20250101
# What a gateway does wrong, in rotation. Status faults hit before any content (transparent
# retries); the others cut a stream after content and need resume with event ids.
_FAULT_ROTATION = ("drop", "status=503", "inband_error", "status=429", "stall", "drop")


class UsageError(Exception):
    """A bad combination of arguments: reported like argparse does, exit status 2."""


# -- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (`sys.exit(main())`)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["mock"]:
        return _mock(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, or argparse already printed a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug: bool = getattr(args, "debug", False)
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    try:
        result: int = args.handler(args)
        return result
    except KeyboardInterrupt:
        # Stopped outside a stream (while starting, or during cleanup): nothing to keep.
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        subparser = getattr(args, "subparser", parser)
        subparser.print_usage(sys.stderr)
        print(f"{subparser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`holysheep chat ... | head`): stop quietly, and point stdout
        # at /dev/null so the interpreter's final flush does not complain again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _describe(exc: BaseException) -> str:
    """Our errors and config errors read well as they are; anything else is a bug, so name it."""
    if isinstance(exc, HolySheepError | LookupError | ValueError | OSError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; `main` adds the `mock` pass-through (see `_mock`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stream chat completions from the holysheep gateway, estimate costs, "
        "and benchmark a gateway or the embedded upstream.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show tracebacks and the holysheep log"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser(
        "chat",
        parents=[common],
        help="stream one completion to stdout",
        description="Stream one completion to stdout as it arrives; timing and cost go to "
        f"stderr. Reads {API_KEY_ENV} and {BASE_URL_ENV}.",
    )
    chat.add_argument("prompt", help='the user message; "-" reads it from stdin')
    chat.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    chat.add_argument("--system", metavar="TEXT", help="a system message")
    chat.add_argument("--max-tokens", type=_positive_int, metavar="N")
    chat.add_argument("--temperature", type=float, metavar="T")
    chat.add_argument(
        "--json", action="store_true", help="print one JSON object at the end instead"
    )
    where = chat.add_mutually_exclusive_group()
    where.add_argument(
        "--mock", action="store_true", help="use the embedded upstream (no key, no network)"
    )
    where.add_argument("--base-url", metavar="URL", help=f"default: ${BASE_URL_ENV} or the gateway")
    chat.set_defaults(handler=_chat, subparser=chat)

    # Listed for --help only: `main` hands `mock` arguments to `python -m holysheep.testing`.
    commands.add_parser(
        "mock",
        add_help=False,
        help="run the embedded upstream until Ctrl-C (see `holysheep mock --help`)",
    )

    cost = commands.add_parser(
        "cost",
        parents=[common],
        help="monthly cost per route, and the savings vs direct",
        description="Monthly cost of a token volume on each route, from the pinned price "
        "table (override with HOLYSHEEP_PRICES=prices.toml).",
    )
    cost.add_argument(
        "--tokens-per-month",
        type=_token_count,
        required=True,
        metavar="N",
        help="e.g. 500M, 1.5B, 20000 (K, M, B suffixes)",
    )
    cost.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    cost.add_argument(
        "--output-share",
        type=_share,
        default=0.5,
        metavar="F",
        help="fraction of tokens that are output (only matters for split prices; default 0.5)",
    )
    cost.add_argument("--json", action="store_true", help="machine-readable rows")
    cost.set_defaults(handler=_cost, subparser=cost)

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="latency, concurrency and retry numbers",
        description="TTFT and tokens/s over sequential streams, a concurrency ramp, and "
        "(embedded only) retries under injected faults. Without --base-url, runs against "
        f"the embedded upstream (ttft {BENCH_TTFT} s, {BENCH_TOKENS_PER_S:g} tokens/s).",
    )
    bench.add_argument("--base-url", metavar="URL", help="benchmark this server instead")
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    bench.add_argument(
        "--requests", type=_positive_int, default=10, metavar="N", help="sequential streams"
    )
    bench.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=BENCH_MAX_TOKENS,
        metavar="N",
        help=f"per sequential stream (default {BENCH_MAX_TOKENS})",
    )
    bench.add_argument(
        "--concurrency",
        type=_levels,
        default=BENCH_DEFAULT_LEVELS,
        metavar="L1,L2",
        help="concurrent streams per ramp level (default 10,100; try 10,100,1000)",
    )
    bench.add_argument(
        "--faults", action="store_true", help="also measure retries under injected faults"
    )
    bench.add_argument("--json", action="store_true", help="machine-readable results")
    bench.set_defaults(handler=_bench, subparser=bench)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _token_count(text: str) -> int:
    try:
        return parse_token_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def _levels(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part.strip()) for part in text.split(",") if part.strip())


def _api_key() -> str:
    key = os.environ.get(API_KEY_ENV)
    if not key:
        raise ConfigurationError(
            f"no API key: set the {API_KEY_ENV} environment variable"
            " (or try --mock, which needs none)"
        )
    return key


# -- chat --------------------------------------------------------------------------------------


def _chat(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    # Read the prices before the request: a broken prices file should cost nothing.
    prices = PriceTable.from_environment()
    if args.mock:
        from .testing import serve

        with serve(ttft=MOCK_TTFT, tokens_per_s=MOCK_TOKENS_PER_S) as upstream:
            return _run_chat(args, messages, params, prices, "mock-key", upstream.base_url)
    return _run_chat(args, messages, params, prices, _api_key(), args.base_url)


def _run_chat(
    args: argparse.Namespace,
    messages: list[dict[str, str]],
    params: Mapping[str, Any],
    prices: PriceTable,
    api_key: str,
    base_url: str | None,
) -> int:
    from ._client import Client

    out, err = sys.stdout, sys.stderr
    interrupted = False
    last = ""  # the last text printed, to know whether a line is left open
    with Client(api_key=api_key, base_url=base_url, hooks=[_note_retry]) as client:
        stream = client.chat.stream(model=args.model, messages=messages, **params)
        try:
            for chunk in stream:
                if chunk.text and not args.json:
                    out.write(chunk.text)
                    out.flush()
                    last = chunk.text
        except KeyboardInterrupt:
            interrupted = True
        except HolySheepError:
            if last and not last.endswith("\n"):
                print(file=err)  # the error line starts on a line of its own
            raise
        finally:
            stream.close()  # at once, so the server sees us leave and stops generating
        completion, stats = stream.completion, stream.stats
    prompt_text = "\n".join(m["content"] for m in messages)
    cost = _cost_for(completion, args.model, prices, prompt_text)
    if args.json:
        report = _chat_json(completion, stats, cost, args.model, interrupted)
        print(json.dumps(report, ensure_ascii=False))
    elif last and not last.endswith("\n") and not interrupted:
        print()  # end the answer's line; an interrupted answer stays exactly as it arrived
    if interrupted:
        if last:
            print(file=err)
        print(f"{PROG}: interrupted after {stats.tokens} tokens; stream closed", file=err)
        return EXIT_INTERRUPTED
    if not args.json:
        print(_stats_line(stats, cost, completion), file=err)
    return EXIT_OK


def _note_retry(attempt: Attempt) -> None:
    """Say on stderr why we are waiting, so a retry is never a silent pause.

    Hooks also see the final attempt when the client gives up (`delay` None); that one is
    reported as the error itself, once.
    """
    if attempt.delay is not None:
        print(f"{PROG}: attempt {attempt.attempt} failed: {attempt.decision}", file=sys.stderr)


def _cost_for(
    completion: Completion, model: str, prices: PriceTable, prompt_text: str
) -> Cost | None:
    usage = completion.usage
    # The model the server reports is what was billed; fall back to the one asked for.
    for name in filter(None, (completion.model, model)):
        cost = cost_of(
            usage.prompt_tokens if usage is not None else None,
            usage.completion_tokens if usage is not None else None,
            name,
            prices,
            prompt_text=prompt_text,
            completion_text=completion.text,
        )
        if cost is not None:
            return cost
    return None


def _stats_line(stats: StreamStats, cost: Cost | None, completion: Completion) -> str:
    parts = [
        "ttft -" if stats.ttft is None else f"ttft {stats.ttft * 1000:.0f} ms",
        "- tokens/s" if stats.tokens_per_s is None else f"{stats.tokens_per_s:.1f} tokens/s",
        f"{'~' if stats.tokens_estimated else ''}{stats.tokens} tokens",
        "cost unknown" if cost is None else _money(cost.usd, estimated=cost.estimated),
    ]
    if stats.attempts > 1:
        parts.append(f"{stats.attempts} attempts")
    if completion.finish_reason not in (None, "stop"):
        parts.append(f"finish {completion.finish_reason}")
    return " | ".join(parts)


def _chat_json(
    completion: Completion,
    stats: StreamStats,
    cost: Cost | None,
    model: str,
    interrupted: bool,
) -> dict[str, Any]:
    usage = completion.usage
    return {
        "text": completion.text,
        "model": completion.model or model,
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "finish_reason": completion.finish_reason,
        "stats": {
            "ttft_s": stats.ttft,
            "tokens_per_s": stats.tokens_per_s,
            "tokens": stats.tokens,
            "tokens_estimated": stats.tokens_estimated,
            "duration_s": stats.duration,
            "attempts": stats.attempts,
            "request_id": stats.server_request_id or stats.request_id,
        },
        "cost": None if cost is None else {"usd": cost.usd, "estimated": cost.estimated},
        "interrupted": interrupted,
    }


def _money(usd: float, *, estimated: bool = False) -> str:
    """Dollars for people: cents for real money, more digits for a single request."""
    mark = "~" if estimated else ""
    if usd == 0 or abs(usd) >= 0.01:
        return f"{mark}${usd:,.2f}"
    return f"{mark}${usd:.6f}"


# -- mock --------------------------------------------------------------------------------------


def _mock(argv: list[str]) -> int:
    """`holysheep mock ...` is `python -m holysheep.testing ...`: one parser, one behaviour."""
    import signal

    from .testing import __main__ as standalone

    # `run` turns SIGINT and SIGTERM into a clean stop once the server is up; these cover the
    # moment before it is, so stopping the mock always ends with status 0.
    def stop(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return standalone.main(argv)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_OK
    except SystemExit as exc:  # its argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


# -- cost --------------------------------------------------------------------------------------


def _cost(args: argparse.Namespace) -> int:
    table = PriceTable.from_environment()
    try:
        rows = monthly_roi(args.tokens_per_month, args.model, table, output_share=args.output_share)
    except LookupError as exc:
        raise UsageError(str(exc).strip("'\"")) from None
    if args.json:
        report = {
            "tokens_per_month": args.tokens_per_month,
            "model": args.model,
            "output_share": args.output_share,
            "prices": table.source,
            "rows": [_row_json(row) for row in rows],
        }
        print(json.dumps(report, indent=2))
        return EXIT_OK
    volume = _human_count(args.tokens_per_month)
    print(f"{volume} tokens/month of {args.model} (USD per 1M tokens from {table.source})")
    print()
    table_rows = [
        [
            f"{row.provider} {row.route}",
            row.model + (" *" if row.selected else ""),
            _price_text(row),
            _money(row.monthly_usd),
            _saving_text(row),
        ]
        for row in rows
    ]
    _print_table(
        ["route", "model", "$/1M tokens", "per month", "saving vs direct"], table_rows, "llrrr"
    )
    selected = next(row for row in rows if row.selected)
    baseline = next((row for row in rows if row.baseline), None)
    print()
    if baseline is not None and selected.savings_usd is not None:
        ratio = f" ({selected.savings_ratio:.1%})" if selected.savings_ratio is not None else ""
        print(
            f"* {selected.model} through HolySheep: {_money(selected.monthly_usd)}/month instead"
            f" of {_money(baseline.monthly_usd)} direct: saves {_money(selected.savings_usd)}"
            f"/month{ratio}, {_money(selected.savings_usd * 12)}/year."
        )
    else:
        print(f"* {selected.model}: no direct price to compare with; add one in [direct].")
    return EXIT_OK


def _row_json(row: RoiRow) -> dict[str, Any]:
    return {
        "provider": row.provider,
        "route": row.route,
        "model": row.model,
        "input_per_million": row.price.input_per_million,
        "output_per_million": row.price.output_per_million,
        "monthly_usd": row.monthly_usd,
        "savings_usd": row.savings_usd,
        "savings_ratio": row.savings_ratio,
        "baseline": row.baseline,
        "selected": row.selected,
    }


def _price_text(row: RoiRow) -> str:
    price = row.price
    if price.is_blended:
        return f"{price.input_per_million:,.2f}"
    return f"{price.input_per_million:,.2f} in / {price.output_per_million:,.2f} out"


def _saving_text(row: RoiRow) -> str:
    if row.baseline:
        return "(baseline)"
    if row.savings_usd is None:
        return "-"
    ratio = "" if row.savings_ratio is None else f" ({row.savings_ratio:.1%})"
    return _money(row.savings_usd) + ratio


def _human_count(n: int) -> str:
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if n >= size and n % (size // 1000) == 0:
            return f"{n / size:g}{suffix}"
    return f"{n:,}"


# -- tables ------------------------------------------------------------------------------------


def _rich() -> Any | None:
    """`rich` when installed and stdout is a terminal; tables degrade to plain text otherwise.

    Imported by name: rich is optional, and the command must not depend on it.
    """
    if not sys.stdout.isatty() or importlib.util.find_spec("rich") is None:
        return None
    return importlib.import_module("rich.table")


def _print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], align: str, title: str | None = None
) -> None:
    rich_table = _rich()
    if rich_table is not None:
        console = importlib.import_module("rich.console").Console()
        table = rich_table.Table(title=title, title_justify="left")
        for header, side in zip(headers, align, strict=True):
            table.add_column(header, justify="right" if side == "r" else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    if title:
        print(title)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if side == "r" else cell.ljust(width)
            for cell, width, side in zip(cells, widths, align, strict=True)
        )
        return "  ".join(padded).rstrip()

    print(line(headers))
    for row in rows:
        print(line(row))


# -- bench -------------------------------------------------------------------------------------


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

        def rank(q: float) -> float:
            return sample[max(0, math.ceil(q * len(sample)) - 1)]

        return cls(sum(sample) / len(sample), rank(0.5), rank(0.99), sample[0])


def _bench(args: argparse.Namespace) -> int:
    if args.faults and args.base_url:
        raise UsageError("--faults injects faults into the embedded upstream; drop --base-url")
    progress = _Progress(enabled=not args.json)
    if args.base_url:
        key = _api_key()
        target = args.base_url
        results = _bench_target(args, target, key, embedded=False, progress=progress)
    else:
        from .testing import serve

        with serve(ttft=BENCH_TTFT, tokens_per_s=BENCH_TOKENS_PER_S) as upstream:
            target = f"embedded upstream (ttft {BENCH_TTFT:g} s, {BENCH_TOKENS_PER_S:g} tokens/s)"
            results = _bench_target(
                args, upstream.base_url, "bench-key", embedded=True, progress=progress
            )
    results = {"target": target, "model": args.model, **results}
    if args.faults:
        results["faults"] = _bench_faults(args, progress)
    progress.done()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_bench(results)
    return EXIT_OK


class _Progress:
    """One status line on stderr while the bench runs; silent for --json or a non-terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K{PROG} bench: {text}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _bench_target(
    args: argparse.Namespace, base_url: str, key: str, *, embedded: bool, progress: _Progress
) -> dict[str, Any]:
    sequential = _bench_sequential(args, base_url, key, progress)
    # One unreported stream first: the async stack's imports and first connection are a
    # one-off cost that would otherwise show up as memory per stream of the first level.
    _bench_level(args.model, base_url, key, 1, embedded, progress)
    levels = [
        _bench_level(args.model, base_url, key, level, embedded, progress)
        for level in args.concurrency
    ]
    return {"sequential": sequential, "concurrency": levels}


def _bench_sequential(
    args: argparse.Namespace, base_url: str, key: str, progress: _Progress
) -> dict[str, Any]:
    """N streams one after another: the latency one user sees, without queueing effects."""
    from ._client import Client
    from ._retry import RetryPolicy

    ttfts: list[float | None] = []
    rates: list[float | None] = []
    errors: dict[str, int] = {}
    # No retries: a benchmark must count failures, not hide them.
    with Client(api_key=key, base_url=base_url, retry=RetryPolicy.none()) as client:
        for i in range(args.requests):
            progress.show(f"sequential {i + 1}/{args.requests}")
            try:
                with client.chat.stream(
                    model=args.model, messages=_BENCH_MESSAGES, max_tokens=args.max_tokens
                ) as stream:
                    stream.until_done()
            except HolySheepError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            ttfts.append(stream.stats.ttft)
            rates.append(stream.stats.tokens_per_s)
    return {
        "requests": args.requests,
        "ok": len(ttfts),
        "errors": errors,
        "max_tokens": args.max_tokens,
        "ttft_s": attrs.asdict(Spread.of(ttfts)),
        "tokens_per_s": attrs.asdict(Spread.of(rates)),
    }


_BENCH_MESSAGES = ({"role": "user", "content": "Say something about sheep."},)


def _bench_level(
    model: str, base_url: str, key: str, level: int, embedded: bool, progress: _Progress
) -> dict[str, Any]:
    """`level` streams at once from one AsyncClient: success rate, latency, memory per stream."""
    import anyio

    progress.show(f"concurrency {level}")
    # Each stream holds a socket, twice over when the upstream is in this process.
    _raise_fd_limit(level * (2 if embedded else 1) + 256)
    rss_before = _peak_rss_kib()
    started = time.perf_counter()
    ttfts, errors = anyio.run(_run_level, model, base_url, key, level)
    wall = time.perf_counter() - started
    rss_after = _peak_rss_kib()
    growth = None
    if rss_before is not None and rss_after is not None:
        growth = max(0.0, rss_after - rss_before) / level
    spread = Spread.of(ttfts)
    return {
        "level": level,
        "ok": len(ttfts),
        "success_rate": len(ttfts) / level,
        "errors": errors,
        "wall_s": wall,
        "ttft_p50_s": spread.p50,
        "ttft_p99_s": spread.p99,
        "rss_growth_per_stream_kib": growth,
        "rss_includes_upstream": embedded,
    }


async def _run_level(
    model: str, base_url: str, key: str, level: int
) -> tuple[list[float | None], dict[str, int]]:
    import anyio

    from ._async_client import AsyncClient
    from ._exchange import Timeouts
    from ._retry import RetryPolicy

    ttfts: list[float | None] = []
    errors: dict[str, int] = {}
    # Generous limits: at 1,000 streams the first token may queue behind the others.
    timeouts = Timeouts(connect=30, ttft=60, idle=60, total=120)
    async with AsyncClient(
        api_key=key, base_url=base_url, retry=RetryPolicy.none(), timeout=timeouts
    ) as client:

        async def one() -> None:
            try:
                async with client.chat.stream(
                    model=model, messages=_BENCH_MESSAGES, max_tokens=BENCH_RAMP_MAX_TOKENS
                ) as stream:
                    await stream.until_done()
                ttfts.append(stream.stats.ttft)
            except HolySheepError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        async with anyio.create_task_group() as group:
            for _ in range(level):
                group.start_soon(one)
    return ttfts, errors


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
        reference = client.chat.complete(
            model=args.model, messages=_BENCH_MESSAGES, max_tokens=tokens
        ).text
        for i in range(args.requests):
            progress.show(f"faults {i + 1}/{args.requests}")
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
                continue
            ok += 1
            identical += text == reference
            attempts += stream.stats.attempts
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
    after = rng.randint(1, max(1, tokens - 1))
    if spec.startswith("status="):
        status = int(spec.partition("=")[2])
        fault: dict[str, Any] = {"kind": "status", "status": status}
        if status == 429:
            fault["retry_after"] = 0.05
        return fault
    return {"kind": spec, "after": after}


def _raise_fd_limit(wanted: int) -> None:
    """Lift the soft open-files limit toward `wanted` (1,000 streams need 2,000+ sockets)."""
    if sys.platform == "win32":  # pragma: no cover - no rlimits there
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _peak_rss_kib() -> float | None:
    """This process's peak resident memory in KiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if sys.platform == "win32":  # pragma: no cover - no getrusage there
        return None
    import resource

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 1024 if sys.platform == "darwin" else peak


def _print_bench(results: Mapping[str, Any]) -> None:
    seq = results["sequential"]
    print(f"{PROG} bench: {results['model']} against {results['target']}")
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
        ["concurrent", "ok", "success", "wall", "ttft p50", "ttft p99", "rss/stream"],
        [
            [
                str(level["level"]),
                f"{level['ok']}/{level['level']}",
                f"{level['success_rate']:.1%}",
                f"{level['wall_s']:.2f} s",
                _ms(level["ttft_p50_s"]),
                _ms(level["ttft_p99_s"]),
                _kib(level["rss_growth_per_stream_kib"]),
            ]
            for level in levels
        ],
        "rrrrrrr",
    )
    for level in levels:
        _print_errors(level["errors"], f"at {level['level']}: ")
    if any(level["rss_includes_upstream"] for level in levels):
        print("rss/stream: peak RSS growth of this process per stream, embedded upstream included")
    faults = results.get("faults")
    if faults is not None:
        print()
        print(
            f"faults: {faults['byte_identical']}/{faults['streams']} streams recovered"
            f" byte-identical ({faults['success_rate']:.1%}) with {faults['policy']};"
            f" faults: {', '.join(f'{n} {name}' for name, n in faults['faults'].items())}"
        )
        _print_errors(faults["errors"])


def _print_errors(errors: Mapping[str, int], prefix: str = "") -> None:
    if errors:
        listed = ", ".join(f"{count} {name}" for name, count in sorted(errors.items()))
        print(f"errors {prefix}{listed}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} KiB"
