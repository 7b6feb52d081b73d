"""Watch streams as they happen: a lifecycle `Observer`, then OpenTelemetry spans and metrics.

    python examples/observe.py

Runs against the embedded upstream (no network, no key). The first request fails once with a
503 and is retried, so every callback shows. The OpenTelemetry part needs
`pip install 'holysheep[otel]' opentelemetry-sdk` and prints the span and metrics with the
SDK's console exporters; without them it says so and stops after the observer.
"""

from __future__ import annotations

import sys

import holysheep
from holysheep import Attempt, Completion, RequestInfo, StreamStats
from holysheep.testing import serve

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
RETRY = holysheep.RetryPolicy(wait_initial=0.05, wait_jitter=0)


class Printer(holysheep.Observer):
    """Prints each lifecycle callback on stderr."""

    def on_request(self, info: RequestInfo) -> None:
        print(f"request   {info.model} -> {info.url} ({info.request_id})", file=sys.stderr)

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        ttft = "-" if stats.ttft is None else f"{stats.ttft * 1000:.0f} ms"
        print(f"first     token after {ttft}", file=sys.stderr)

    def on_retry(self, info: RequestInfo, attempt: Attempt) -> None:
        print(f"retry     attempt {attempt.attempt}: {attempt.decision}", file=sys.stderr)

    def on_end(self, info: RequestInfo, completion: Completion, stats: StreamStats) -> None:
        print(f"end       {completion.finish_reason}: {stats.summary()}", file=sys.stderr)

    def on_error(self, info: RequestInfo, error: BaseException, stats: StreamStats) -> None:
        print(f"error     {type(error).__name__}: {error}", file=sys.stderr)


def with_observer(base_url: str) -> None:
    with holysheep.Client(
        api_key="demo", base_url=base_url, retry=RETRY, observers=[Printer()]
    ) as client:
        completion = client.chat.complete(model="gpt-4.1", messages=MESSAGES, max_tokens=40)
    print(completion.text, "\n")


def with_opentelemetry(base_url: str) -> None:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        print("(no OpenTelemetry SDK: pip install 'holysheep[otel]' opentelemetry-sdk)")
        return
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    # Export once, at shutdown: a very long interval keeps the periodic thread quiet.
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=1e9)
    meter_provider = MeterProvider(metric_readers=[reader])
    observer = holysheep.OpenTelemetryObserver(tracer_provider, meter_provider)
    with holysheep.Client(
        api_key="demo", base_url=base_url, retry=RETRY, observers=[observer]
    ) as client:
        client.chat.complete(model="gpt-4.1", messages=MESSAGES, max_tokens=40)
    tracer_provider.shutdown()
    meter_provider.shutdown()  # prints the metrics


def main() -> None:
    with serve(ttft=0.2, tokens_per_s=200) as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        with_observer(upstream.base_url)
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        with_opentelemetry(upstream.base_url)


if __name__ == "__main__":
    main()
