"""Lifecycle observers against the real local upstream: order, exactly-once, and isolation."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import pytest

import holysheep
from holysheep import (
    Attempt,
    BadRequestError,
    Completion,
    Observer,
    RequestInfo,
    RetryPolicy,
    StreamStats,
)
from holysheep.testing import MockUpstream, UpstreamConfig, serve
from holysheep.transports import MockResponse, MockTransport

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
FAST = RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.02, wait_jitter=0.0)
FULL = "".join(UpstreamConfig().token_list(None))


class Recorder(Observer):
    """Keeps every callback, with what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.infos: set[int] = set()

    def on_request(self, info: RequestInfo) -> None:
        self.infos.add(id(info))
        self.events.append(("request", info))

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        self.infos.add(id(info))
        self.events.append(("first_token", stats))

    def on_retry(self, info: RequestInfo, attempt: Attempt) -> None:
        self.infos.add(id(info))
        self.events.append(("retry", attempt))

    def on_end(self, info: RequestInfo, completion: Completion, stats: StreamStats) -> None:
        self.infos.add(id(info))
        self.events.append(("end", (completion, stats)))

    def on_error(self, info: RequestInfo, error: BaseException, stats: StreamStats) -> None:
        self.infos.add(id(info))
        self.events.append(("error", (error, stats)))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def sync_client(
    upstream: MockUpstream, recorder: Observer, retry: RetryPolicy = FAST
) -> holysheep.Client:
    return holysheep.Client(
        api_key="k", base_url=upstream.base_url, retry=retry, observers=[recorder]
    )


def async_client(
    upstream: MockUpstream, recorder: Observer, retry: RetryPolicy = FAST
) -> holysheep.AsyncClient:
    return holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, retry=retry, observers=[recorder]
    )


def test_a_clean_stream_reports_request_first_token_end() -> None:
    recorder = Recorder()
    with serve() as upstream, sync_client(upstream, recorder) as client:
        completion = client.chat.complete(model="gpt-4.1", messages=MESSAGES, max_tokens=5)
    assert ["request", "first_token", "end"] == recorder.names
    assert 1 == len(recorder.infos)  # one info object for the whole request
    info = recorder.events[0][1]
    assert "gpt-4.1" == info.model
    assert info.url.endswith("/chat/completions")
    assert upstream.requests[0].headers["idempotency-key"] == info.idempotency_key
    assert upstream.requests[0].headers["x-request-id"] == info.request_id
    assert 5 == info.body["max_tokens"]
    first_stats = recorder.events[1][1]
    assert first_stats.ttft is not None
    assert first_stats.ttft > 0
    ended, stats = recorder.events[2][1]
    assert completion.text == ended.text
    assert "length" == ended.finish_reason
    assert 5 == stats.tokens


def test_retries_are_reported_between_request_and_first_token() -> None:
    recorder = Recorder()
    with serve() as upstream, sync_client(upstream, recorder) as client:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        assert FULL == client.chat.complete(model="m", messages=MESSAGES).text
    assert ["request", "retry", "first_token", "end"] == recorder.names
    attempt = recorder.events[1][1]
    assert 1 == attempt.attempt
    assert "503" in attempt.error
    assert isinstance(attempt.exception, holysheep.APIStatusError)
    assert 503 == attempt.exception.status_code


def test_a_final_error_is_reported_once_with_the_exception_the_caller_sees() -> None:
    recorder = Recorder()
    with (
        serve(fault={"kind": "status", "status": 400}) as upstream,
        sync_client(upstream, recorder) as client,
        pytest.raises(BadRequestError) as info,
    ):
        client.chat.complete(model="m", messages=MESSAGES)
    assert ["request", "error"] == recorder.names
    error, stats = recorder.events[1][1]
    assert info.value is error
    assert 400 == stats.status_code


def test_leaving_early_is_an_end_with_the_partial_completion() -> None:
    recorder = Recorder()
    with (
        serve() as upstream,
        sync_client(upstream, recorder) as client,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        for chunk in stream:
            if chunk.text:
                break
    assert ["request", "first_token", "end"] == recorder.names
    completion, _ = recorder.events[2][1]
    assert completion.finish_reason is None
    assert FULL.startswith(completion.text)
    assert completion.text


def test_an_observer_that_raises_is_logged_and_costs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Observer):
        def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
            raise ValueError("metrics backend down")

    recorder = Recorder()
    with serve() as upstream:
        client = holysheep.Client(
            api_key="k", base_url=upstream.base_url, observers=[Broken(), recorder]
        )
        with client, caplog.at_level(logging.ERROR, logger="holysheep"):
            assert FULL == client.chat.complete(model="m", messages=MESSAGES).text
    assert ["request", "first_token", "end"] == recorder.names  # the next observer still ran
    (record,) = [r for r in caplog.records if "observer" in r.getMessage()]
    assert "on_first_token" in record.getMessage()
    assert record.exc_info is not None
    assert "metrics backend down" in str(record.exc_info[1])


@pytest.mark.anyio
async def test_async_clean_stream_and_retry() -> None:
    recorder = Recorder()
    with serve() as upstream:
        upstream.enqueue({"fault": "drop@0"})
        async with (
            async_client(upstream, recorder) as client,
            client.chat.stream(model="m", messages=MESSAGES) as stream,
        ):
            text = "".join([chunk.text async for chunk in stream])
            # Ended once the body ended, before the `async with` closes the stream.
            assert "end" == recorder.names[-1]
    assert FULL == text
    assert ["request", "retry", "first_token", "end"] == recorder.names


@pytest.mark.anyio
async def test_async_cancellation_is_an_error() -> None:
    """A cancelled reading task closes the span as failed: nothing completed."""
    recorder = Recorder()
    with serve(ttft=0.0, tokens_per_s=20) as upstream:
        async with async_client(upstream, recorder) as client:
            with anyio.move_on_after(0.3):
                async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                    async for _ in stream:
                        pass
    assert ["request", "first_token", "error"] == recorder.names
    error, stats = recorder.events[2][1]
    assert isinstance(error, anyio.get_cancelled_exc_class())
    assert stats.tokens > 0


SLOW_RETRY = RetryPolicy(wait_initial=5, wait_jitter=0)


@pytest.mark.anyio
async def test_a_cancellation_while_waiting_to_retry_reports_the_error() -> None:
    """Cancelled in `__aenter__`'s retry wait: `__aexit__` never runs, so `open()` reports
    the end (the request got `on_request` and `on_retry`, then nothing)."""
    recorder = Recorder()
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        async with async_client(upstream, recorder, SLOW_RETRY) as client:
            with anyio.move_on_after(0.3):
                async with client.chat.stream(model="m", messages=MESSAGES):
                    pass
    assert ["request", "retry", "error"] == recorder.names
    error, _ = recorder.events[-1][1]
    assert isinstance(error, anyio.get_cancelled_exc_class())


def test_an_interrupt_while_opening_reports_the_error() -> None:
    """Ctrl-C during the send in `__enter__`, the sync twin of the case above."""
    recorder = Recorder()

    def interrupted(request: Any) -> MockResponse:
        raise KeyboardInterrupt

    client = holysheep.Client(
        api_key="k", transport=MockTransport(interrupted), observers=[recorder]
    )
    with pytest.raises(KeyboardInterrupt), client.chat.stream(model="m", messages=MESSAGES):
        pass
    assert ["request", "error"] == recorder.names
    client.close()


@pytest.mark.anyio
async def test_a_close_while_waiting_to_retry_ends_quietly_as_observers_are_told() -> None:
    """`close()` from another task during the retry wait: the stream ends quietly, as its
    docstring says, and observers get `on_end`; the caller got the last 503 instead."""
    recorder = Recorder()
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        async with async_client(upstream, recorder, SLOW_RETRY) as client:
            stream = client.chat.stream(model="m", messages=MESSAGES)
            async with anyio.create_task_group() as group:
                group.start_soon(stream.open)
                await anyio.sleep(0.2)
                stream.close()
            assert [] == [chunk async for chunk in stream]
            await stream.aclose()
    assert ["request", "retry", "end"] == recorder.names


def test_sync_a_close_while_waiting_to_retry_ends_quietly() -> None:
    recorder = Recorder()
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        client = sync_client(upstream, recorder, SLOW_RETRY)
        stream = client.chat.stream(model="m", messages=MESSAGES)
        threading.Timer(0.2, stream.close).start()
        with stream:
            assert [] == list(stream)
        client.close()
    assert ["request", "retry", "end"] == recorder.names
