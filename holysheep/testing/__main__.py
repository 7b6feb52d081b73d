"""`python -m holysheep.testing`: run the local upstream until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from holysheep.testing._server import Fault, MockUpstream, UpstreamConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m holysheep.testing",
        description="An OpenAI-compatible upstream on 127.0.0.1 for tests, demos and benchmarks.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument(
        "--tokens-per-s", type=float, default=None, help="token rate (default: max)"
    )
    parser.add_argument("--tokens", type=int, default=None, help="tokens per completion")
    parser.add_argument("--keepalive", type=float, default=None, help="keep-alive interval (s)")
    parser.add_argument("--event-ids", action="store_true", help="number events (for resume)")
    parser.add_argument("--fault", type=Fault.parse, default=None, help='e.g. "drop@5"')
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    config = UpstreamConfig(
        tokens=args.tokens,
        ttft=args.ttft,
        tokens_per_s=args.tokens_per_s,
        keepalive_interval=args.keepalive,
        event_ids=args.event_ids,
        fault=args.fault,
    )
    upstream = MockUpstream(config)
    await upstream.start(port=args.port)
    print(f"holysheep mock upstream listening on {upstream.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await upstream.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
