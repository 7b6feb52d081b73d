"""Stream a completion to a browser from aiohttp.web (`pip install 'holysheep[aiohttp]'`).

The same relay as examples/browser_relay.py, speaking the same events (docs/browsers.md), on
asyncio: one `AsyncClient` per application, on `AiohttpTransport`, made when the app starts.

    python examples/browser_relay_aiohttp.py           # asks its own relay once, prints events
    python examples/browser_relay_aiohttp.py --serve   # serves; try the printed curl command

No API key, no network: the upstream is holysheep.testing's local OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientSession, web

import holysheep
from holysheep import ServerSentEvent
from holysheep.transports import AiohttpTransport

# -- the relay (docs/browsers.md shows this part as it is) -------------------------------------

MODEL = "gpt-4.1"  # the relay chooses the model and the budget, never the browser
MAX_TOKENS = 400
KEEPALIVE = 15.0  # seconds without an event before a comment line (see browser_relay.py)
LEAVE_CHECK = 0.5  # how often a quiet relay looks whether the browser left (ditto)
CLIENT = web.AppKey("client", holysheep.AsyncClient)
KEEPALIVE_AFTER = web.AppKey("keepalive", float)


def sse(event: str, payload: dict[str, Any]) -> bytes:
    # JSON in one `data:` line: text with newlines, CRs or leading spaces arrives intact.
    return ServerSentEvent(event, json.dumps(payload)).encode()


async def pump(stream: holysheep.AsyncStream, events: asyncio.Queue[bytes | None]) -> None:
    """Read the completion, in its own task, and queue the events for the browser."""
    sent = 0  # characters of text queued: what the browser has if an error follows
    try:
        async with stream:
            # Append-only text, also after an on_interrupt="restart": no text twice.
            async for text in stream.text_stream():
                events.put_nowait(sse("message", {"text": text}))
                sent += len(text)
        completion, usage = stream.completion, stream.completion.usage
        done = {
            "finish_reason": completion.finish_reason,
            "usage": None if usage is None else usage.to_dict(),
            "request_id": stream.request_id,
        }
        events.put_nowait(sse("done", done))
    except holysheep.HolySheepError as exc:
        error = {
            "type": type(exc).__name__,  # the class in docs/errors.md
            "message": exc.message,
            "status": exc.status_code,
            "request_id": exc.request_id or stream.request_id,
            "text_length": sent,
        }
        events.put_nowait(sse("error", error))
    finally:
        events.put_nowait(None)  # the end, whatever happened


async def chat(request: web.Request) -> web.StreamResponse:
    if request.method == "POST":  # fetch(): a whole conversation, as JSON
        try:
            messages = (await request.json())["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError(messages)
        except (ValueError, TypeError, KeyError):
            raise web.HTTPBadRequest(text='expected a JSON body {"messages": [...]}') from None
    else:  # EventSource can only GET: the question is in the query
        messages = [{"role": "user", "content": request.query.get("q", "")}]
    # Always 200 and an event stream: an EventSource cannot read an error response's body,
    # so failures, the upstream's status included, come as an `error` event.
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass every event on at once
        }
    )
    await response.prepare(request)  # the head goes now: the browser's EventSource opens
    stream = request.app[CLIENT].chat.stream(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
    events: asyncio.Queue[bytes | None] = asyncio.Queue()
    reader = asyncio.create_task(pump(stream, events))
    keepalive = request.app[KEEPALIVE_AFTER]
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), min(keepalive, LEAVE_CHECK))
            except asyncio.TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the browser left while nothing was written (see browser_relay.py)
                if loop.time() - quiet_since < keepalive:
                    continue
                event = b": keep-alive\n\n"
            if event is None:
                break
            await response.write(event)  # one chunk each, on the wire now
            quiet_since = loop.time()
    except ConnectionError:
        pass  # the browser left: aiohttp cannot write to its closed connection
    finally:
        reader.cancel()  # at once: the gateway bills tokens until it sees us leave
        await asyncio.wait([reader])  # until its `async with` closed the stream
    return response


def make_app(keepalive: float = KEEPALIVE, **client_options: Any) -> web.Application:
    """The relay; `client_options` go to `holysheep.AsyncClient` (`base_url=`, `retry=`, ...)."""

    async def holysheep_client(app: web.Application) -> AsyncIterator[None]:
        # Made on the app's event loop, which its connections belong to; closed at shutdown.
        async with holysheep.AsyncClient(transport=AiohttpTransport(), **client_options) as client:
            app[CLIENT] = client
            yield

    app = web.Application()
    app[KEEPALIVE_AFTER] = keepalive
    app.cleanup_ctx.append(holysheep_client)
    app.router.add_route("GET", "/chat", chat)
    app.router.add_route("POST", "/chat", chat)
    return app


# -- the demo ----------------------------------------------------------------------------------


async def main() -> None:
    from holysheep.testing import serve

    serving = "--serve" in sys.argv[1:]
    # Paced like a gateway: the first token after 0.5 s, then 80 tokens/s.
    with serve(ttft=0.5, tokens_per_s=80, tokens=30) as upstream:
        # A keep-alive after 0.2 s without events (15 s in earnest), so the demo shows some.
        app = make_app(
            keepalive=0.2, api_key="demo", base_url=upstream.base_url, on_interrupt="restart"
        )
        runner = web.AppRunner(app)
        await runner.setup()
        listener = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, listener).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        try:
            if serving:
                print(f"relay: curl -N '{url}/chat?q=hi' (Ctrl-C stops it)")
                await asyncio.Event().wait()
            else:
                print(f"POST {url}/chat\n")
                question = {"messages": [{"role": "user", "content": "Tell me about sheep."}]}
                async with (
                    ClientSession() as session,
                    session.post(f"{url}/chat", json=question) as response,
                ):
                    async for line in response.content:  # each line as it arrives
                        print(line.decode().rstrip("\n"), flush=True)
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
