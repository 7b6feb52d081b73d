"""What the sync and async clients share: configuration and building an `Exchange`.

Kept apart from both clients so that neither imports the other and both stay I/O drivers only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._exceptions import ConfigurationError
from ._exchange import Exchange, Timeouts

__all__ = ["API_KEY_ENV", "BASE_URL_ENV", "DEFAULT_BASE_URL", "ClientConfig"]

API_KEY_ENV = "HOLYSHEEP_API_KEY"
BASE_URL_ENV = "HOLYSHEEP_BASE_URL"
DEFAULT_BASE_URL = "https://api.holysheep.ai/v1"


@attrs.frozen
class ClientConfig:
    api_key: str
    base_url: str
    timeouts: Timeouts
    headers: Mapping[str, str]
    require_end: bool

    @classmethod
    def from_arguments(
        cls,
        api_key: str | None,
        base_url: str | None,
        timeout: Timeouts | float | None,
        headers: Mapping[str, str] | None,
        require_end: bool,
    ) -> ClientConfig:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            raise ConfigurationError(
                f"no API key: pass api_key=... or set the {API_KEY_ENV} environment variable"
            )
        url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        return cls(
            key, url.rstrip("/"), Timeouts.from_value(timeout), dict(headers or {}), require_end
        )

    def exchange(
        self,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        timeout: Timeouts | float | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Exchange:
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "stream": True,
            # Usage on the last chunk gives exact token counts for stats and cost.
            "stream_options": {"include_usage": True},
        }
        body.update(params)
        return Exchange(
            url=f"{self.base_url}/chat/completions",
            api_key=self.api_key,
            body=body,
            timeouts=self.timeouts if timeout is None else Timeouts.from_value(timeout),
            headers={**self.headers, **(headers or {})},
            request_id=request_id,
            require_end=self.require_end,
        )
