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
and memory, and (embedded only) injected faults for retries; it lives in `_bench.py`, with the
embedded upstream in a child process so the memory and CPU it reports are the client's.
`bench/` in the repository has the thorough versions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

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
# Short completions keep the default bench near 20 s while still timing a steady rate.
BENCH_MAX_TOKENS = 20
BENCH_RAMP_MAX_TOKENS = 10
# 5,000 is in reach (`--concurrency 10,100,1000,5000`) but adds a minute or more on httpx (the
# AsyncClient default; its pool makes opening N streams O(N^2)); the default stops at 1,000.
BENCH_DEFAULT_LEVELS = (10, 100, 1000)


class UsageError(Exception):
    """A bad combination of arguments: reported like argparse does, exit status 2."""


# -- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (`sys.exit(main())`)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if sys.stderr is None:
        # Started with stderr closed (`2>&-`): Python leaves it None, and print(file=None)
        # writes to stdout, which carries only the answer. Messages go nowhere instead.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
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
    chat.add_argument("--temperature", type=_temperature, metavar="T", help="0 to 2")
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
        metavar="N1,N2,...",
        help="concurrent streams per ramp level (default 10,100,1000; try 10,100,1000,5000)",
    )
    bench.add_argument(
        "--transport",
        choices=("httpx", "aiohttp"),
        default="httpx",
        help="the ramp's AsyncClient transport: httpx (AsyncHTTPXTransport, the default) or"
        " aiohttp (AiohttpTransport, for thousands of streams; pip install 'holysheep[aiohttp]')",
    )
    bench.add_argument(
        "--faults", action="store_true", help="also measure retries under injected faults"
    )
    bench.add_argument("--json", action="store_true", help="machine-readable results")
    bench.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the TTFT distribution and tokens/s vs concurrency to FILE (.png, .svg, .pdf;"
        " needs the plot extra: pip install 'holysheep[plot]')",
    )
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


def _temperature(text: str) -> float:
    # float() reads nan and inf, and the API refuses anything outside 0-2: say so here
    # rather than after a request.
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 2:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 2, got {text}")
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
    levels = tuple(_positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not levels:  # "" or ",": a ramp of nothing would "succeed" having measured nothing
        raise argparse.ArgumentTypeError(f"expected levels such as 10,100,1000, got {text!r}")
    if len(set(levels)) < len(levels):  # their figures would be merged into one row
        raise argparse.ArgumentTypeError(f"each level once, please: got {text!r}")
    return levels


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
    if sys.stdout is None:
        # Started with stdout closed (`>&-`): the answer would be paid for and lost.
        raise ConfigurationError("stdout is closed: there is nowhere to write the answer")
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
    prompt_text = "\n".join(m["content"] for m in messages)
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
        except HolySheepError as exc:
            if args.json:
                # Nothing was printed while streaming: the object is the only place the text
                # that did arrive can go, so it is printed before the error line (exit 1).
                stream.close()
                completion = exc.completion or stream.completion
                # An answer that never started (an error status, a refused connection) is
                # not known to be billed at all: no estimate for the prompt alone.
                started = completion.output_text or completion.usage
                cost = (
                    _cost_for(completion, args.model, prices, prompt_text, stream.stats)
                    if started
                    else None
                )
                report = _chat_json(completion, stream.stats, cost, args.model, False, exc)
                print(json.dumps(report, ensure_ascii=False))
            elif last and not last.endswith("\n"):
                print(file=err)  # the error line starts on a line of its own
            raise
        finally:
            stream.close()  # at once, so the server sees us leave and stops generating
        completion, stats = stream.completion, stream.stats
    cost = _cost_for(completion, args.model, prices, prompt_text, stats)
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
    completion: Completion, model: str, prices: PriceTable, prompt_text: str, stats: StreamStats
) -> Cost | None:
    usage = completion.usage
    # Without usage, the output is priced at the count the stats line shows (an estimate
    # too, which keeps the cost marked estimated through the prompt's estimate).
    output = usage.completion_tokens if usage is not None else stats.tokens
    # The model the server reports is what was billed; fall back to the one asked for.
    for name in filter(None, (completion.model, model)):
        cost = cost_of(
            usage.prompt_tokens if usage is not None else None,
            output,
            name,
            prices,
            prompt_text=prompt_text,
            completion_text=completion.output_text,
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
    error: HolySheepError | None = None,
) -> dict[str, Any]:
    usage = completion.usage
    return {
        "text": completion.text,
        "model": completion.model or model,
        "usage": None if usage is None else usage.to_dict(),
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
        "error": None
        if error is None
        else {
            "type": type(error).__name__,
            "message": error.message,
            "status": error.status_code,
            "request_id": error.request_id,
        },
    }


def _money(usd: float, *, estimated: bool = False) -> str:
    """Dollars for people: cents for real money, more digits for a single request; the sign
    before the dollar sign (-$3.00), as people write it."""
    mark = "~" if estimated else ""
    sign = "-" if usd < 0 else ""
    usd = abs(usd)
    if usd == 0 or usd >= 0.01:
        return f"{mark}{sign}${usd:,.2f}"
    return f"{mark}{sign}${usd:.6f}"


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
        return standalone.main(argv, prog=f"{PROG} mock")
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
        # A gateway dearer than direct "costs more", not "saves $-3.00".
        saves = selected.savings_usd >= 0
        verb, more = ("saves", "") if saves else ("costs", " more")
        amount, share = abs(selected.savings_usd), selected.savings_ratio
        ratio = "" if share is None else f" ({abs(share):.1%}{more})"
        print(
            f"* {selected.model} through HolySheep: {_money(selected.monthly_usd)}/month instead"
            f" of {_money(baseline.monthly_usd)} direct: {verb} {_money(amount)}/month{more}"
            f"{ratio}, {_money(amount * 12)}/year{more}."
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


def _bench(args: argparse.Namespace) -> int:
    # Its own module: the ramp, the upstream child process, progress and the plot.
    from ._bench import run_bench

    return run_bench(args)
