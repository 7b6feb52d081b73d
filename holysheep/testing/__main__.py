"""`python -m holysheep.testing`: run the local upstream until Ctrl-C (or SIGTERM).

Errors are one line on stderr, as `holysheep` promises for all its commands: a bad flag is a
usage error (exit status 2, argparse's usage line first), a port that cannot be listened on
is an error (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys

from holysheep.testing._server import MAX_TOKENS, Fault, MockUpstream, UpstreamConfig

PROG = "python -m holysheep.testing"
EXIT_ERROR = 1


# Each converter raises ArgumentTypeError with its own words: from a ValueError argparse
# would say "invalid _port value", naming the function instead of the problem.


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535; 0 picks a free one)")
    return port


def _count(text: str) -> int:
    """A token count: a whole number from 0 to MAX_TOKENS (`--tokens`)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 0 <= count <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_TOKENS:,}, not {count}")
    return count


def _seconds(text: str) -> float:
    """A time of 0 or more (`--ttft`)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _positive(text: str) -> float:
    """A rate or interval above 0 (`--tokens-per-s`, `--keepalive`)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text}")
    return value


def _fault(text: str) -> Fault:
    # argparse reports a ValueError from a type function as "invalid _fault value"; an
    # ArgumentTypeError keeps Fault.parse's message, which lists the valid faults.
    try:
        return Fault.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="An OpenAI-compatible upstream on 127.0.0.1 for tests, demos and benchmarks.",
    )
    parser.add_argument("--port", type=_port, default=0, help="0 picks a free port (default)")
    parser.add_argument("--ttft", type=_seconds, default=0.0, help="seconds before the first token")
    parser.add_argument(
        "--tokens-per-s", type=_positive, default=None, help="token rate (default: max)"
    )
    parser.add_argument("--tokens", type=_count, default=None, help="tokens per completion")
    parser.add_argument("--keepalive", type=_positive, default=None, help="keep-alive interval (s)")
    parser.add_argument("--event-ids", action="store_true", help="number events (for resume)")
    parser.add_argument("--fault", type=_fault, default=None, help='e.g. "drop@5"')
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, prog: str = PROG) -> int:
    config = UpstreamConfig(
        tokens=args.tokens,
        ttft=args.ttft,
        tokens_per_s=args.tokens_per_s,
        keepalive_interval=args.keepalive,
        event_ids=args.event_ids,
        fault=args.fault,
    )
    upstream = MockUpstream(config)
    try:
        await upstream.start(port=args.port)
    except OSError as exc:  # the port is taken, or not ours to bind
        # asyncio's own message repeats the address; the errno's text alone says why.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"{prog}: error: cannot listen on 127.0.0.1:{args.port}: {reason}", file=sys.stderr)
        return EXIT_ERROR
    print(f"holysheep mock upstream listening on {upstream.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await upstream.stop()
    print("stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Serve until stopped; a usage error exits (status 2) from argparse."""
    return asyncio.run(run(parse_args(argv, prog), prog))


if __name__ == "__main__":
    sys.exit(main())
