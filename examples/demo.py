"""`make demo`: stream a completion from the embedded upstream to the terminal.

No API key, no network: `holysheep.testing.serve()` runs an OpenAI-compatible server on
127.0.0.1 with a realistic time to first token and token rate, and `Client` streams from it
exactly as it would from the gateway.
"""

from __future__ import annotations

import sys

import holysheep
from holysheep.testing import serve


def main() -> None:
    with serve(ttft=0.35, tokens_per_s=60) as upstream:
        print(f"upstream: {upstream.base_url} (embedded, OpenAI-compatible)\n", file=sys.stderr)
        with holysheep.Client(api_key="demo", base_url=upstream.base_url) as client:
            with client.chat.stream(
                model="gpt-4.1",
                messages=[{"role": "user", "content": "Tell me about sheep."}],
                max_tokens=120,
            ) as stream:
                for text in stream.text_stream():
                    print(text, end="", flush=True)
            print("\n")
            completion = stream.completion
            print(
                f"finish_reason={completion.finish_reason} usage={completion.usage}",
                file=sys.stderr,
            )
            print(stream.stats.summary(), file=sys.stderr)


if __name__ == "__main__":
    main()
