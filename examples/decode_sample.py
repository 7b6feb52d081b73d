"""Decode a captured chat stream with the sans-IO core, as it would arrive off a socket.

Run: python examples/decode_sample.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from holysheep import ChatAccumulator

SAMPLE = Path(__file__).parent / "data" / "sample_stream.sse"


def reads(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut the stream the way a network does: at arbitrary points, 1-300 bytes at a time."""
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 300)
        out.append(data[i : i + n])
        i += n
    return out


def main() -> None:
    data = SAMPLE.read_bytes()
    chunks = reads(data, random.Random(0))

    acc = ChatAccumulator()
    for read in chunks:
        for chunk in acc.feed(read):
            print(chunk.text, end="", flush=True)
    acc.close()
    completion = acc.completion
    print()
    print(
        f"\nmodel={completion.model} finish_reason={completion.finish_reason} "
        f"usage={completion.usage}",
        file=sys.stderr,
    )

    # How fast is the core? Decode the same reads again and again, JSON and accumulation included.
    rounds, events = 200, 0
    start = time.perf_counter()
    for _ in range(rounds):
        acc = ChatAccumulator()
        for read in chunks:
            events += len(acc.feed(read))
        acc.close()
    elapsed = time.perf_counter() - start
    print(
        f"decoded {events:,} chat events in {elapsed:.3f} s: "
        f"{events / elapsed:,.0f} events/s, {rounds * len(data) / elapsed / 1e6:.1f} MB/s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
