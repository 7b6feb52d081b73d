"""Transports: the I/O edge of holysheep.

`RequestsTransport` (sync, the `Client` default), `HTTPXTransport` (sync),
`AsyncHTTPXTransport` (async, the `AsyncClient` default), `MockTransport` and
`AsyncMockTransport` (scripted responses for tests), and the base classes to write your own.
"""

from holysheep.transports._base import (
    AsyncBaseTransport,
    AsyncResponse,
    BaseTransport,
    Request,
    Response,
)
from holysheep.transports._httpx import AsyncHTTPXTransport, HTTPXTransport
from holysheep.transports._mock import AsyncMockTransport, MockResponse, MockTransport, sse_body
from holysheep.transports._requests import RequestsTransport

__all__ = [
    "AsyncBaseTransport",
    "AsyncHTTPXTransport",
    "AsyncMockTransport",
    "AsyncResponse",
    "BaseTransport",
    "HTTPXTransport",
    "MockResponse",
    "MockTransport",
    "Request",
    "RequestsTransport",
    "Response",
    "sse_body",
]
