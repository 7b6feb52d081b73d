"""Test helpers: a local OpenAI-compatible upstream (`serve`, `MockUpstream`).

Stdlib only, so it works wherever holysheep does: `with serve() as upstream:` gives a real HTTP
server on 127.0.0.1 with `upstream.base_url` to point a client at. See docs/testing-upstream.md.
"""

from holysheep.testing._server import (
    DEFAULT_TEXT,
    Fault,
    MockUpstream,
    RecordedRequest,
    UpstreamConfig,
    serve,
)

__all__ = ["DEFAULT_TEXT", "Fault", "MockUpstream", "RecordedRequest", "UpstreamConfig", "serve"]
