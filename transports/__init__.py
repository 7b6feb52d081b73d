"""Transports: the I/O edge of holysheep.

`RequestsTransport` (sync, the `Client` default), `HTTPXTransport` (sync),
`AsyncHTTPXTransport` (async, the `AsyncClient` default), `AiohttpTransport` (async, asyncio
only, for thousands of concurrent streams; needs the `aiohttp` extra), `MockTransport` and
`AsyncMockTransport` (scripted responses for tests), and the base classes to write your own.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from holysheep.transports._aiohttp import AiohttpTransport as AiohttpTransport

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


if not TYPE_CHECKING:  # for mypy the import above is the whole story; typos stay errors

    def __getattr__(name: str) -> Any:
        # aiohttp is optional, so its transport is imported when first asked for, not with the
        # package; without aiohttp this raises an ImportError naming the extra to install.
        if name == "AiohttpTransport":
            from holysheep.transports._aiohttp import AiohttpTransport

            return AiohttpTransport
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
