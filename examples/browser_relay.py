"""Stream a completion to a browser: a relay on the standard library's ThreadingHTTPServer.

The browser asks this server (EventSource: `GET /chat?q=...`; fetch: `POST /chat` with
`{"messages": [...]}`) and gets the answer as Server-Sent Events: `data: {"text": ...}` per
piece of text, then `event: done` or `event: error`, then the end of the response. See
docs/browsers.md for the wire format and the browser side.

    python examples/browser_relay.py           # asks its own relay once and prints the events
    python examples/browser_relay.py --serve   # serves; open the printed URL in a browser

No API key, no network: the upstream is holysheep.testing's local OpenAI-compatible server.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import holysheep
from holysheep import ServerSentEvent
from holysheep.testing import serve

# -- the relay (docs/browsers.md shows this part as it is) -------------------------------------

MODEL = "gpt-4.1"  # the relay chooses the model and the budget, never the browser
MAX_TOKENS = 400
# A comment line whenever nothing was sent for this long (a long time to first token, a wait
# before a retry): proxies and load balancers cut a response idle for 60 s by default (nginx's
# proxy_read_timeout, an AWS ALB's idle timeout), and browsers ignore comments.
KEEPALIVE = 15.0
# How often a quiet relay looks whether the browser left. A closed tab sends a FIN, which only
# a read sees: a write after it still succeeds (the browser answers it with a reset), so
# waiting for a failed write would keep the upstream running for two keep-alives.
LEAVE_CHECK = 0.5


def sse(event: str, payload: dict[str, Any]) -> bytes:
    # JSON in one `data:` line: text with newlines, CRs or leading spaces arrives intact.
    return ServerSentEvent(event, json.dumps(payload)).encode()


def pump(stream: holysheep.Stream, events: queue.SimpleQueue[bytes | None]) -> None:
    """Read the completion, in its own thread, and queue the events for the browser."""
    sent = 0  # characters of text queued: what the browser has if an error follows
    try:
        with stream:
            # Append-only text, also after an on_interrupt="restart": no text twice.
            for text in stream.text_stream():
                events.put(sse("message", {"text": text}))
                sent += len(text)
        completion, usage = stream.completion, stream.completion.usage
        done = {
            "finish_reason": completion.finish_reason,
            "usage": None if usage is None else usage.to_dict(),
            "request_id": stream.request_id,
        }
        events.put(sse("done", done))
    except holysheep.HolySheepError as exc:
        error = {
            "type": type(exc).__name__,  # the class in docs/errors.md
            "message": exc.message,
            "status": exc.status_code,
            "request_id": exc.request_id or stream.request_id,
            "text_length": sent,
        }
        events.put(sse("error", error))
    finally:
        events.put(None)  # the end, whatever happened


def gone(connection: socket.socket) -> bool:
    """Whether the browser closed the connection: it sends nothing after its request, so a
    connection with something to read has reached its end (or was reset)."""
    if not select.select([connection], [], [], 0)[0]:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class RelayHandler(BaseHTTPRequestHandler):
    server: RelayServer

    def do_GET(self) -> None:  # EventSource can only GET: the question is in the query
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/chat":
            self.send_error(404)
            return
        question = urllib.parse.parse_qs(url.query).get("q", [""])[0]
        self.relay([{"role": "user", "content": question}])

    def do_POST(self) -> None:  # fetch(): a whole conversation, as JSON
        if urllib.parse.urlsplit(self.path).path != "/chat":
            self.send_error(404)
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError(messages)
        except (ValueError, TypeError, KeyError):
            self.send_error(400, 'expected a JSON body {"messages": [...]}')
            return
        self.relay(messages)

    def relay(self, messages: list[dict[str, Any]]) -> None:
        # Made before the head goes, so a request the client refuses is still an HTTP error.
        stream = self.server.client.chat.stream(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS
        )
        # Always 200 and an event stream: an EventSource cannot read an error response's body,
        # so failures, the upstream's status included, come as an `error` event.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # nginx: pass every event on at once
        self.end_headers()  # the head goes now: the browser's EventSource opens
        events: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=pump, args=(stream, events), daemon=True).start()
        keepalive = self.server.keepalive
        quiet_since = time.monotonic()
        try:
            while True:
                try:
                    event = events.get(timeout=min(keepalive, LEAVE_CHECK))
                except queue.Empty:
                    if gone(self.connection):
                        break
                    if time.monotonic() - quiet_since < keepalive:
                        continue
                    event = b": keep-alive\n\n"
                if event is None:
                    break
                self.wfile.write(event)  # unbuffered (wbufsize = 0): on the wire now
                quiet_since = time.monotonic()
        except OSError:
            pass  # the browser left mid-answer: BrokenPipeError, ConnectionResetError
        finally:
            stream.close()  # at once: the gateway bills tokens until it sees us leave


class RelayServer(ThreadingHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        client: holysheep.Client,
        *,
        keepalive: float = KEEPALIVE,
        handler: type[RelayHandler] = RelayHandler,
    ) -> None:
        super().__init__(address, handler)
        self.client = client
        self.keepalive = keepalive


# -- the demo ----------------------------------------------------------------------------------

# What `--serve` shows at `/`: the EventSource code of docs/browsers.md, on a page.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>holysheep relay</title>
<form id="ask"><input id="q" value="Tell me about sheep." size="40"> <button>Ask</button></form>
<pre id="answer" style="white-space: pre-wrap"></pre>
<p id="status"></p>
<script>
document.getElementById("ask").onsubmit = (submitted) => {
  submitted.preventDefault();
  const answer = document.getElementById("answer");
  const status = document.getElementById("status");
  answer.textContent = status.textContent = "";
  const q = document.getElementById("q").value;
  const source = new EventSource("/chat?q=" + encodeURIComponent(q));
  source.onmessage = (e) => { answer.textContent += JSON.parse(e.data).text; };
  source.addEventListener("done", (e) => {
    source.close();  // else EventSource reconnects, and asks again
    const done = JSON.parse(e.data);
    status.textContent = `${done.finish_reason}, ${done.usage?.total_tokens} tokens`;
  });
  source.addEventListener("error", (e) => {  // ours (e.data), or the connection's (no data)
    source.close();
    status.textContent = e.data ? `error: ${JSON.parse(e.data).message}` : "connection lost";
  });
};
</script>
"""


class DemoHandler(RelayHandler):
    def do_GET(self) -> None:
        if self.path != "/":
            super().do_GET()
            return
        page = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log in the demo's output


def main() -> None:
    serving = "--serve" in sys.argv[1:]
    # Paced like a gateway: the first token after 0.5 s, then 80 tokens/s.
    with (
        serve(ttft=0.5, tokens_per_s=80, tokens=30) as upstream,
        holysheep.Client(
            api_key="demo", base_url=upstream.base_url, on_interrupt="restart"
        ) as client,
    ):
        # A keep-alive after 0.2 s without events (15 s in earnest), so the demo shows some.
        relay = RelayServer(("127.0.0.1", 0), client, keepalive=0.2, handler=DemoHandler)
        threading.Thread(target=relay.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{relay.server_address[1]}"
        try:
            if serving:
                print(f"relay: open {url}/ in a browser, or: curl -N '{url}/chat?q=hi'")
                print("Ctrl-C stops it.")
                threading.Event().wait()
            else:
                print(f"GET {url}/chat?q=Tell+me+about+sheep\n")
                with urllib.request.urlopen(f"{url}/chat?q=Tell+me+about+sheep") as response:
                    for line in response:  # each line as it arrives
                        print(line.decode().rstrip("\n"), flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            relay.shutdown()
            relay.server_close()


if __name__ == "__main__":
    main()
