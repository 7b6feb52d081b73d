"""OpenTelemetryObserver against the real local upstream: spans, events and metrics as recorded
by the SDK's in-memory exporter and reader, on private providers (never the global ones)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import attrs
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import holysheep
from holysheep import BadRequestError, OpenTelemetryObserver, RetryPolicy
from holysheep.testing import MockUpstream, UpstreamConfig, serve

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
FAST = RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.02, wait_jitter=0.0)
FULL = "".join(UpstreamConfig().token_list(None))
# The conventions' advice for gen_ai.client.operation.duration and .time_to_first_chunk.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
DURATION_BUCKETS_TAIL = (20.48, 40.96, 81.92)


@attrs.define
class Telemetry:
    """An observer wired to in-memory exporters, and what they caught."""

    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def observer(self, **options: Any) -> OpenTelemetryObserver:
        return OpenTelemetryObserver(self.tracer_provider, self.meter_provider, **options)

    def span(self) -> ReadableSpan:
        (span,) = self.spans.get_finished_spans()
        return span

    def points(self, name: str) -> list[Any]:
        """The data points of metric `name` (none if it was never recorded)."""
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        found: list[Any] = []
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def histogram(self, name: str) -> HistogramDataPoint:
        (point,) = self.points(name)
        assert isinstance(point, HistogramDataPoint)
        return point


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield Telemetry(spans, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def sync_client(upstream: MockUpstream, observer: OpenTelemetryObserver) -> holysheep.Client:
    return holysheep.Client(
        api_key="k", base_url=upstream.base_url, retry=FAST, observers=[observer]
    )


def async_client(upstream: MockUpstream, observer: OpenTelemetryObserver) -> holysheep.AsyncClient:
    return holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, retry=FAST, observers=[observer]
    )


def test_a_clean_stream_is_one_client_span_with_the_genai_attributes(
    telemetry: Telemetry,
) -> None:
    observer = telemetry.observer()
    with serve() as upstream, sync_client(upstream, observer) as client:
        completion = client.chat.complete(
            model="gpt-4.1", messages=MESSAGES, max_tokens=5, temperature=0.5, top_p=0.9
        )
    port = int(upstream.base_url.split(":")[-1].split("/")[0])
    assert completion.usage is not None
    span = telemetry.span()
    assert "chat gpt-4.1" == span.name
    assert SpanKind.CLIENT == span.kind
    assert StatusCode.UNSET == span.status.status_code
    assert span.attributes is not None
    attributes = dict(span.attributes)
    ttft = attributes.pop("gen_ai.response.time_to_first_chunk")
    rate = attributes.pop("holysheep.output_token_rate")
    assert {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1",
        "gen_ai.request.stream": True,
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9,
        "server.address": "127.0.0.1",
        "server.port": port,
        "holysheep.request_id": upstream.requests[0].headers["x-request-id"],
        "holysheep.attempts": 1,
        "gen_ai.response.id": completion.id,
        "gen_ai.response.model": "gpt-4.1",
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": 5,
    } == attributes
    assert isinstance(ttft, float)
    assert ttft > 0
    assert isinstance(rate, float)
    assert rate > 0
    assert ["holysheep.first_token"] == [event.name for event in span.events]
    assert {"gen_ai.response.time_to_first_chunk": ttft} == dict(span.events[0].attributes or {})
    assert "gen_ai.input.messages" not in attributes  # capture_content is off by default
    assert not observer._streams  # nothing kept once the span ended


def test_a_clean_stream_records_the_genai_metrics(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve() as upstream, sync_client(upstream, observer) as client:
        completion = client.chat.complete(model="gpt-4.1", messages=MESSAGES, max_tokens=5)
    span = telemetry.span()
    assert span.attributes is not None
    assert span.end_time is not None
    assert span.start_time is not None
    common = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1",
        "gen_ai.response.model": "gpt-4.1",
        "server.address": "127.0.0.1",
        "server.port": span.attributes["server.port"],
    }

    duration = telemetry.histogram("gen_ai.client.operation.duration")
    assert common == dict(duration.attributes or {})
    assert 1 == duration.count
    assert DURATION_BUCKETS + DURATION_BUCKETS_TAIL == tuple(duration.explicit_bounds)
    span_seconds = (span.end_time - span.start_time) / 1e9
    assert duration.sum == pytest.approx(span_seconds, abs=0.05)

    usage = {
        p.attributes["gen_ai.token.type"]: p for p in telemetry.points("gen_ai.client.token.usage")
    }
    assert {"input", "output"} == set(usage)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == usage["input"].sum
    assert 5 == usage["output"].sum
    assert {**common, "gen_ai.token.type": "output"} == dict(usage["output"].attributes)
    assert 67108864 == usage["output"].explicit_bounds[-1]

    first_chunk = telemetry.histogram("gen_ai.client.operation.time_to_first_chunk")
    assert span.attributes["gen_ai.response.time_to_first_chunk"] == first_chunk.sum
    assert DURATION_BUCKETS + DURATION_BUCKETS_TAIL == tuple(first_chunk.explicit_bounds)

    rate = telemetry.histogram("holysheep.client.operation.output_token_rate")
    assert span.attributes["holysheep.output_token_rate"] == rate.sum
    assert [] == telemetry.points("holysheep.client.operation.retries")


def test_a_retry_is_a_span_event_and_a_count(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve() as upstream, sync_client(upstream, observer) as client:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        assert FULL == client.chat.complete(model="m", messages=MESSAGES).text
    span = telemetry.span()
    assert StatusCode.UNSET == span.status.status_code
    assert ["holysheep.retry", "holysheep.first_token"] == [e.name for e in span.events]
    retry = dict(span.events[0].attributes or {})
    assert 1 == retry["holysheep.retry.attempt"]
    assert "InternalServerError" == retry["error.type"]
    assert "503" in str(retry["holysheep.retry.error"])
    assert 0.01 == retry["holysheep.retry.delay"]
    assert "transient" in str(retry["holysheep.retry.reason"])
    assert span.attributes is not None
    assert 2 == span.attributes["holysheep.attempts"]
    (counted,) = telemetry.points("holysheep.client.operation.retries")
    assert 1 == counted.value
    assert "InternalServerError" == counted.attributes["error.type"]
    assert "m" == counted.attributes["gen_ai.request.model"]


def test_time_to_first_chunk_counts_from_the_first_attempts_send(telemetry: Telemetry) -> None:
    """As its description says (it said "from sending the attempt that got it"): a 429 asking
    for 0.3 s before the answer makes the first chunk at least that late."""
    observer = telemetry.observer()
    with serve() as upstream, sync_client(upstream, observer) as client:
        upstream.enqueue({"fault": {"kind": "status", "status": 429, "retry_after": 0.3}})
        client.chat.complete(model="m", messages=MESSAGES)
    assert telemetry.histogram("gen_ai.client.operation.time_to_first_chunk").sum >= 0.3
    data = telemetry.reader.get_metrics_data()
    assert data is not None
    (description,) = {
        metric.description
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "gen_ai.client.operation.time_to_first_chunk"
    }
    assert "from the first attempt's send" in description
    assert "retries and their waits included" in description


def test_a_final_error_sets_status_error_and_error_type(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with (
        serve(fault={"kind": "status", "status": 400}) as upstream,
        sync_client(upstream, observer) as client,
        pytest.raises(BadRequestError) as raised,
    ):
        client.chat.complete(model="m", messages=MESSAGES)
    span = telemetry.span()
    assert StatusCode.ERROR == span.status.status_code
    assert str(raised.value) == span.status.description
    assert span.attributes is not None
    assert "BadRequestError" == span.attributes["error.type"]
    assert 400 == span.attributes["http.response.status_code"]
    assert 1 == span.attributes["holysheep.attempts"]
    assert ["exception"] == [event.name for event in span.events]
    duration = telemetry.histogram("gen_ai.client.operation.duration")
    assert "BadRequestError" == dict(duration.attributes or {})["error.type"]
    assert [] == telemetry.points("gen_ai.client.token.usage")
    assert [] == telemetry.points("gen_ai.client.operation.time_to_first_chunk")
    assert not observer._streams


def test_leaving_early_ends_the_span_without_finish_reasons(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with (
        serve() as upstream,
        sync_client(upstream, observer) as client,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        for chunk in stream:
            if chunk.text:
                break
    span = telemetry.span()
    assert span.attributes is not None
    assert StatusCode.UNSET == span.status.status_code
    assert "gen_ai.response.finish_reasons" not in span.attributes
    assert 1 == telemetry.histogram("gen_ai.client.operation.duration").count


def test_the_span_is_a_child_of_the_callers_span(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    tracer = telemetry.tracer_provider.get_tracer("test")
    with (
        serve() as upstream,
        sync_client(upstream, observer) as client,
        tracer.start_as_current_span("handler") as parent,
    ):
        client.chat.complete(model="m", messages=MESSAGES, max_tokens=2)
    chat, handler = telemetry.spans.get_finished_spans()
    assert "chat m" == chat.name
    assert chat.parent is not None
    assert parent.get_span_context().span_id == chat.parent.span_id
    assert chat.context is not None
    assert handler.context is not None
    assert handler.context.trace_id == chat.context.trace_id


def test_request_parameters_become_request_attributes(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve() as upstream, sync_client(upstream, observer) as client:
        client.chat.complete(
            model="m",
            messages=MESSAGES,
            max_completion_tokens=3,
            stop="\n",
            seed=7,
            n=1,
            frequency_penalty=0,
            response_format={"type": "json_object"},
        )
    attributes = telemetry.span().attributes
    assert attributes is not None
    assert 3 == attributes["gen_ai.request.max_tokens"]
    assert ("\n",) == attributes["gen_ai.request.stop_sequences"]
    assert 7 == attributes["gen_ai.request.seed"]
    assert 0.0 == attributes["gen_ai.request.frequency_penalty"]
    assert "json" == attributes["gen_ai.output.type"]
    assert "gen_ai.request.choice.count" not in attributes  # only recorded when not 1


def test_capture_content_records_messages_in_the_conventions_shape(
    telemetry: Telemetry,
) -> None:
    observer = telemetry.observer(capture_content=True)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "look", "arguments": '{"at": "image"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a sheep"},
    ]
    with serve() as upstream, sync_client(upstream, observer) as client:
        completion = client.chat.complete(model="m", messages=messages, max_tokens=3)
    attributes = telemetry.span().attributes
    assert attributes is not None
    assert [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {
            "role": "user",
            "parts": [{"type": "text", "content": "What is this?"}, {"type": "image_url"}],
        },
        {
            "role": "assistant",
            "parts": [
                {"type": "tool_call", "id": "call_1", "name": "look", "arguments": {"at": "image"}}
            ],
        },
        {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": "call_1", "response": "a sheep"}],
        },
    ] == json.loads(str(attributes["gen_ai.input.messages"]))
    assert [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": completion.text}],
            "finish_reason": "length",
        }
    ] == json.loads(str(attributes["gen_ai.output.messages"]))


def test_one_observer_serves_a_client_shared_by_threads(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve(ttft=0.01) as upstream, sync_client(upstream, observer) as client:

        def ask() -> None:
            client.chat.complete(model="m", messages=MESSAGES, max_tokens=3)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    spans = telemetry.spans.get_finished_spans()
    assert 8 == len(spans)
    assert 8 == len({span.context.span_id for span in spans if span.context is not None})
    assert 8 == telemetry.histogram("gen_ai.client.operation.duration").count
    assert not observer._streams


@pytest.mark.anyio
async def test_async_clean_stream_and_retry(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@0"})
        async with async_client(upstream, observer) as client:
            completion = await client.chat.complete(model="gpt-4.1", messages=MESSAGES)
    assert FULL == completion.text
    span = telemetry.span()
    assert "chat gpt-4.1" == span.name
    assert ["holysheep.retry", "holysheep.first_token"] == [e.name for e in span.events]
    assert span.attributes is not None
    assert ("stop",) == span.attributes["gen_ai.response.finish_reasons"]
    assert 2 == span.attributes["holysheep.attempts"]
    (counted,) = telemetry.points("holysheep.client.operation.retries")
    assert 1 == counted.value
    assert 1 == telemetry.histogram("gen_ai.client.operation.duration").count
    assert not observer._streams


@pytest.mark.anyio
async def test_async_final_error(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve(fault={"kind": "status", "status": 400}) as upstream:
        async with async_client(upstream, observer) as client:
            with pytest.raises(BadRequestError):
                await client.chat.complete(model="m", messages=MESSAGES)
    span = telemetry.span()
    assert StatusCode.ERROR == span.status.status_code
    assert span.attributes is not None
    assert "BadRequestError" == span.attributes["error.type"]


@pytest.mark.anyio
async def test_async_cancellation_ends_the_span_as_an_error(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    with serve(ttft=0.0, tokens_per_s=20) as upstream:
        async with async_client(upstream, observer) as client:
            with anyio.move_on_after(0.3):
                async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                    async for _ in stream:
                        pass
    span = telemetry.span()
    assert StatusCode.ERROR == span.status.status_code
    assert span.attributes is not None
    assert anyio.get_cancelled_exc_class().__qualname__ == span.attributes["error.type"]
    assert not observer._streams


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio warns of the dropped body
async def test_a_stream_dropped_without_an_end_is_let_go_and_its_span_ended(
    telemetry: Telemetry,
) -> None:
    """Left with `break` outside `async with` and dropped, a stream reports no end: the
    observer kept its span open and its state, request body included, for good."""
    observer = telemetry.observer()
    with serve() as upstream:
        client = holysheep.AsyncClient(
            api_key="k",
            base_url=upstream.base_url,
            timeout=holysheep.Timeouts(idle=0.05),  # asyncio's timer holds a stream that long
            observers=[observer],
        )
        async with client:
            async for chunk in client.chat.stream(model="dropped", messages=MESSAGES):
                if chunk.text:
                    break
            await anyio.sleep(0.2)
            gc.collect()
            assert not observer._streams  # let go with the stream
            await client.chat.complete(model="next", messages=MESSAGES)  # ends the other span
    dropped, completed = sorted(telemetry.spans.get_finished_spans(), key=lambda s: s.name)
    assert ("chat dropped", "chat next") == (dropped.name, completed.name)
    assert StatusCode.ERROR == dropped.status.status_code
    assert "dropped without being closed" in str(dropped.status.description)
    assert dropped.attributes is not None
    assert "holysheep.abandoned" == dropped.attributes["error.type"]
    assert StatusCode.UNSET == completed.status.status_code
    assert 1 == telemetry.histogram("gen_ai.client.operation.duration").count  # the one ended


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_import_holysheep_does_not_import_opentelemetry() -> None:
    """The observer is exported lazily: the API loads only when one is constructed."""
    result = run_python(
        "import sys, holysheep; holysheep.OpenTelemetryObserver;"
        " print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    assert 0 == result.returncode, result.stderr
    assert "[]" == result.stdout.strip()


def test_without_the_extra_constructing_says_what_to_install() -> None:
    result = run_python(
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import holysheep\n"
        "try:\n"
        "    holysheep.OpenTelemetryObserver()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert 0 == result.returncode, result.stderr
    assert "pip install 'holysheep[otel]'" in result.stdout
