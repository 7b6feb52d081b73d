"""What the sync and async clients share: configuration and building an `Exchange`.

Kept apart from both clients so that neither imports the other and both stay I/O drivers only.
"""

from __future__ import annotations

import functools
import json
import os
import random as _random
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, final

import attrs

from ._call import Attempt, Call, OnInterrupt, check_on_interrupt
from ._chat import ChatAccumulator
from ._exceptions import ConfigurationError
from ._exchange import Exchange, Timeouts, encode_body, new_request_ids
from ._limiter import RateLimiter
from ._observe import Observer, RequestInfo
from ._retry import RetryPolicy

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "ClientConfig",
    "checked_limiter",
    "estimate_cost",
]

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
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    on_interrupt: OnInterrupt | None = None  # None: "raise", but `complete()` restarts
    hooks: tuple[Callable[[Attempt], None], ...] = ()
    observers: tuple[Observer, ...] = ()

    @classmethod
    def from_arguments(
        cls,
        api_key: str | None,
        base_url: str | None,
        timeout: Timeouts | float | None,
        headers: Mapping[str, str] | None,
        require_end: bool,
        retry: RetryPolicy | None = None,
        on_interrupt: OnInterrupt | None = None,
        hooks: Iterable[Callable[[Attempt], None]] = (),
        observers: Iterable[Observer] = (),
    ) -> ClientConfig:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        # A key read from a secrets file or `.env` often ends with a newline, which no HTTP
        # header can carry: whitespace around a key is never part of it.
        key = key.strip() if isinstance(key, str) else key
        if not key:
            raise ConfigurationError(
                f"no API key: pass api_key=... or set the {API_KEY_ENV} environment variable"
            )
        _check_header("the API key", key)
        if on_interrupt is not None:
            check_on_interrupt(on_interrupt)
        _check_retry(retry)
        _check_headers(headers)
        if base_url is not None and not isinstance(base_url, str):
            raise ConfigurationError(
                f"base_url must be a str such as 'https://api.holysheep.ai/v1', "
                f"not {type(base_url).__name__}"
            )
        url = _base_url(base_url or os.environ.get(BASE_URL_ENV, "").strip() or DEFAULT_BASE_URL)
        return cls(
            key,
            url,
            Timeouts.from_value(timeout),
            dict(headers or {}),
            require_end,
            retry if retry is not None else RetryPolicy(),
            on_interrupt,
            tuple(hooks),
            tuple(observers),
        )

    def call(
        self,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        timeout: Timeouts | float | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        on_interrupt: OnInterrupt | None = None,
        limited: bool = False,
    ) -> Call:
        """A `Call` whose attempts each build a fresh `Exchange` for this request.

        `limited`: a rate limiter will admit it, so estimate its token cost (a pass over the
        prompt that nothing else needs).
        """
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "stream": True,
            # Usage on the last chunk gives exact token counts for stats and cost.
            "stream_options": {"include_usage": True},
        }
        body.update(params)
        if not _SDK_OPTIONS.keys().isdisjoint(params):  # the usual call builds no set
            name = min(_SDK_OPTIONS.keys() & params.keys())
            raise ConfigurationError(
                f"{name}= is an option of the openai SDK, not a request field (it would be sent "
                f"in the JSON body, which the API refuses): {_SDK_OPTIONS[name]} (see "
                "docs/from-openai.md)"
            )
        if body["stream"] is not True:
            raise ConfigurationError(
                f"stream={body['stream']!r}: holysheep always streams; "
                "client.chat.complete() returns the whole Completion"
            )
        options = params.get("stream_options")
        if options is None or isinstance(options, Mapping):
            # Merged, not replaced: other options (or None) must not turn usage off unasked.
            body["stream_options"] = {"include_usage": True, **(options or {})}
        timeouts = self.timeouts if timeout is None else Timeouts.from_value(timeout)
        if on_interrupt is not None:
            check_on_interrupt(on_interrupt)
        _check_retry(retry)
        _check_headers(headers)
        extra = _merged_headers(self.headers, headers) if headers else self.headers
        # An `X-Request-ID` among the headers is the request id, as in `Exchange`.
        request_id = request_id or _header(extra, "x-request-id")
        # The caller's own key, if it set one, so a gateway can deduplicate across processes.
        idempotency_key = _header(extra, "idempotency-key")
        if not request_id or not idempotency_key:
            new_id, new_key = new_request_ids()  # both from one read of the OS's randomness
            request_id = request_id or new_id
            idempotency_key = idempotency_key or new_key
        url = _chat_url(self.base_url)
        # Encoded once and only the bytes kept: every attempt sends the same body, and the
        # dict (with its copy of the message list) would be held for the stream's whole life.
        make_exchange = _Exchanges(
            self, url, encode_body(body), timeouts, extra, request_id, choices_asked(body)
        )
        call = Call(
            make_exchange,
            policy=retry or self.retry,
            on_interrupt=on_interrupt or self.on_interrupt,
            random=_random.random,
            hooks=self.hooks,
            observers=self.observers,
            info=RequestInfo(model, url, request_id, idempotency_key, body)
            if self.observers
            else None,
            idempotency_key=idempotency_key,
        )
        if limited:
            call.cost = estimate_cost(body)
            call.prompt_cost = estimate_prompt(body)
        return call


# Options of the openai SDK's `create()` that people bring along: every other keyword goes into
# the JSON body as it is, and these would too, to be refused by the API (or worse, ignored).
_SDK_OPTIONS = {
    "extra_body": "pass its keys as keyword arguments, which go into the JSON body",
    "extra_query": "put the query string in base_url (https://.../v1?key=value)",
    "max_retries": "pass retry=RetryPolicy(attempts=max_retries + 1)",
}


def checked_limiter(limiter: RateLimiter | None) -> RateLimiter | None:
    """`limiter`, or a clear error for what is not a `RateLimiter` (`limiter=10`: a
    TypeError from deep in the first call)."""
    if limiter is not None and not isinstance(limiter, RateLimiter):
        raise ConfigurationError(
            f"limiter must be a RateLimiter (for example RateLimiter(max_concurrent=10)), "
            f"not {type(limiter).__name__}"
        )
    return limiter


def _check_retry(retry: object) -> None:
    """A `retry` that is not a `RetryPolicy` (`retry=3`, as openai's `max_retries=3`) fails
    here, not with an AttributeError at the first failure worth retrying."""
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigurationError(
            f"retry must be a RetryPolicy (for example RetryPolicy(attempts=3), or "
            f"RetryPolicy.none()), not {type(retry).__name__}"
        )


def _check_headers(headers: object) -> None:
    if headers is None:
        return
    if not isinstance(headers, Mapping):
        raise ConfigurationError(
            f"headers must be a mapping of names to values (a dict), not {type(headers).__name__}"
        )
    for name, value in headers.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"a header name must be a str, not {type(name).__name__}")
        _check_header(f"header {name!r}", value)


def _merged_headers(client: Mapping[str, str], call: Mapping[str, str]) -> Mapping[str, str]:
    """The client's headers with the call's on top; names match whatever their case, so a
    call's `idempotency-key` replaces the client's `Idempotency-Key` (with both kept, the
    client's was found first and sent)."""
    replaced = {name.lower() for name in call}
    merged = {name: value for name, value in client.items() if name.lower() not in replaced}
    merged.update(call)
    return merged


def _check_header(what: str, value: object) -> None:
    """A header value HTTP cannot carry fails here, named, rather than deep in a transport
    (which reports it as a connection failure, retried, or quotes the value).

    Only printable ASCII goes everywhere (httpx refuses the rest, and a CR or LF would end the
    header); the value itself is never quoted, since it may be a secret. Typical cases: an API
    key pasted with a typographic dash, or a header value read from a file with its newline.
    """
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a string, not {type(value).__name__}")
    if not (value.isascii() and value.isprintable()):  # the common case skips the scan
        bad = next((i for i, c in enumerate(value) if not _header_safe(c)), None)
        if bad is not None:
            char = value[bad]
            raise ConfigurationError(
                f"{what} has a character HTTP headers cannot carry: {char!r} "
                f"(U+{ord(char):04X}) at position {bad}; only printable ASCII is allowed"
            )
    if value != value.strip(" \t"):
        raise ConfigurationError(f"{what} starts or ends with whitespace, which HTTP drops")


def _header_safe(char: str) -> bool:
    return char.isascii() and (char.isprintable() or char == "\t")


def _base_url(url: str) -> str:
    """`url` as the clients join paths to it, or a clear error for one they cannot use.

    People paste the whole endpoint (`.../v1/chat/completions`) or a trailing slash; both
    mean the base. A query string (`?api-version=...`) stays at the end of every request's
    URL. A path without a scheme is left to a transport whose own client has a base URL.
    """
    url = url.strip()
    base, sep, query = url.partition("?")
    relative = base.startswith("/")
    # The scheme before the slashes go: stripped, "http://" was "http:", which has none, and
    # the error asked for the http:// it had.
    scheme = base.partition("://")[0].lower() if "://" in base else ""
    base = base.rstrip("/")
    base = base.removesuffix("/chat/completions").rstrip("/")
    shown = _without_userinfo(url)  # quoted in errors: never a password
    if scheme not in ("http", "https") and not relative:
        raise ConfigurationError(
            f"base_url {shown!r} needs http:// or https:// (for example "
            "https://api.holysheep.ai/v1)"
        )
    if scheme:
        try:
            parts = urllib.parse.urlsplit(base)
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError as exc:  # also an unclosed IPv6 bracket
            raise ConfigurationError(f"base_url {shown!r} is not a valid URL: {exc}") from None
        if not parts.hostname:
            raise ConfigurationError(
                f"base_url {shown!r} has no host (for example https://api.holysheep.ai/v1)"
            )
    return base + sep + query


def _without_userinfo(url: str) -> str:
    """`url` with any `user:password@` before the host masked."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if not sep or "@" not in host:
        return url
    return f"{scheme}://***@{host.rpartition('@')[2]}{slash}{path}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


@functools.lru_cache(maxsize=64)
def _chat_url(base_url: str) -> str:
    # One string per client, not one per stream. A query string stays at the end.
    base, sep, query = base_url.partition("?")
    return f"{base}/chat/completions{sep}{query}"


@final
@attrs.define
class _Exchanges:
    """Builds each attempt's `Exchange` for one request.

    An object with slots rather than a closure: a closure over these seven names is a function
    and seven cells, held for the stream's whole life, thousands of streams at a time.
    """

    config: ClientConfig
    url: str
    body: bytes
    timeouts: Timeouts
    extra: Mapping[str, str]
    request_id: str
    choices: int

    def __call__(
        self, attempt_headers: Mapping[str, str], accumulator: ChatAccumulator | None
    ) -> Exchange:
        config = self.config
        return Exchange(
            url=self.url,
            api_key=config.api_key,
            body=self.body,
            timeouts=self.timeouts,
            headers={**self.extra, **attempt_headers} if self.extra else attempt_headers,
            request_id=self.request_id,
            require_end=config.require_end,
            accumulator=accumulator,
            choices=self.choices,
        )


def estimate_cost(body: Mapping[str, Any]) -> int:
    """Tokens to reserve from a tokens-per-minute budget: the prompt (about 4 characters a
    token) plus `max_tokens` for each of the `n` choices; reconciled with the real usage when
    the stream ends."""
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return estimate_prompt(body) + (limit * choices_asked(body) if isinstance(limit, int) else 0)


def choices_asked(body: Mapping[str, Any]) -> int:
    """The choices the request asks for: `n`, when it is a number the API takes."""
    n = body.get("n")
    return n if type(n) is int and n > 1 else 1


# Request fields the model reads as part of its prompt, besides the messages.
_PROMPT_FIELDS = ("tools", "functions", "response_format")


# What the chat format adds to the content's tokens: OpenAI's models count about 3 for each
# message (its role and separators) and 3 more that prime the reply. Without them a prompt of
# short messages was estimated at half its real count, and a tokens-per-minute limiter let
# through more than its budget.
_PER_MESSAGE = 3
_PER_PROMPT = 3


def estimate_prompt(body: Mapping[str, Any]) -> int:
    """The prompt's tokens, about 4 characters a token: the messages' content, and the tool
    definitions and response schema, which gateways bill as prompt too; plus what the chat
    format adds for each message."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, Mapping)]
    size = sum(len(str(m.get("content", ""))) for m in messages)
    for field in _PROMPT_FIELDS:
        value = body.get(field)
        if value:
            size += len(json.dumps(value, default=str))
    framing = _PER_MESSAGE * len(messages) + _PER_PROMPT if messages else 0
    return size // 4 + framing
