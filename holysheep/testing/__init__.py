"""Test helpers: a local OpenAI-compatible upstream (`serve`, `MockUpstream`).

Stdlib only, so it works wherever holysheep does: `with serve() as upstream:` gives a real HTTP
server on 127.0.0.1 with `upstream.base_url` to point a client at; `UpstreamProcess` runs the
same server in a child process, for measurements. See docs/testing-upstream.md.
"""

from holysheep.testing._process import UpstreamProcess, raise_fd_limit
from holysheep.testing._server import (
    DEFAULT_TEXT,
    Fault,
    MockUpstream,
    RecordedRequest,
    UpstreamConfig,
    serve,
)

__all__ = [
    "DEFAULT_TEXT",
    "Fault",
    "MockUpstream",
    "RecordedRequest",
    "UpstreamConfig",
    "UpstreamProcess",
    "raise_fd_limit",
    "serve",
]
