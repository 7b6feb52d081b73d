"""What the built-in transports take from the environment (proxies, ~/.netrc, CA bundles) and
from a session the user configured, over real sockets."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import holysheep
from holysheep import LocalProtocolError
from holysheep.testing import serve
from holysheep.transports import AiohttpTransport, HTTPXTransport, RequestsTransport

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("transport", [RequestsTransport, HTTPXTransport])
def test_netrc_credentials_never_replace_the_api_key(
    transport: type[RequestsTransport | HTTPXTransport],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """requests looked the host up in ~/.netrc on every request and sent its Basic credentials
    instead of the API key: a baffling 401, and the netrc password sent to the gateway."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with serve(tokens=2) as upstream:
        with holysheep.Client(
            api_key="sk-real", base_url=upstream.base_url, transport=transport()
        ) as client:
            client.chat.complete(model="m", messages=MESSAGES)
        assert "Bearer sk-real" == upstream.requests[-1].headers["authorization"]


class _RecordingSession(requests.Session):
    """A user's session that notes the `verify` each request is sent with."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_with: list[Any] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent_with.append(kwargs.get("verify"))
        return super().send(request, **kwargs)


def test_a_users_session_keeps_its_own_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session set up for a private CA was sent with verify=True (the transport's default won
    over the session's); a `verify` given to the transport still wins."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with serve(tokens=2) as upstream:
        for given, expected in ((None, "/etc/private-ca.pem"), (False, False)):
            session = _RecordingSession()
            session.verify = "/etc/private-ca.pem"
            transport = RequestsTransport(session) if given is None else RequestsTransport(
                session, verify=given
            )  # fmt: skip
            with holysheep.Client(
                api_key="k", base_url=upstream.base_url, transport=transport
            ) as client:
                client.chat.complete(model="m", messages=MESSAGES)
            assert [expected] == session.sent_with


def test_a_closed_requests_transport_sends_nothing() -> None:
    """After close(), a call that was queued (say, in a rate limiter) must not reach the server:
    requests' session stays usable after close, so the transport refuses, as httpx's does."""
    with serve(tokens=2) as upstream:
        transport = RequestsTransport()
        transport.close()  # what `Client.close()` does while the call waits its turn
        client = holysheep.Client(api_key="k", base_url=upstream.base_url, transport=transport)
        with pytest.raises(LocalProtocolError, match="RequestsTransport is closed"):
            client.chat.complete(model="m", messages=MESSAGES)
        assert [] == upstream.requests


def via_gateway() -> holysheep.AsyncClient:
    """A client on AiohttpTransport for a host that does not resolve: only a proxy reaches."""
    return holysheep.AsyncClient(
        api_key="k",
        base_url="http://gateway.invalid/v1",
        transport=AiohttpTransport(),
        retry=holysheep.RetryPolicy.none(),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aiohttp_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY was ignored by AiohttpTransport, where requests and httpx honour it: a proxy an
    organisation requires was bypassed. The upstream stands in for the proxy (it answers the
    absolute-form request line a proxy gets), and NO_PROXY still goes direct."""
    with serve(tokens=2) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url.removesuffix("/v1"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with via_gateway() as client:
            completion = await client.chat.complete(model="m", messages=MESSAGES)
            assert completion.text
            assert 1 == len(proxy.requests)
            monkeypatch.setenv("NO_PROXY", "gateway.invalid")
        async with via_gateway() as client:
            with pytest.raises(holysheep.APIConnectionError):
                await client.chat.complete(model="m", messages=MESSAGES)
        assert 1 == len(proxy.requests)


class _Signer(requests.auth.AuthBase):
    """A session's own auth, as a gateway that wants signed requests needs."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["x-gateway-signature"] = "sig"
        return request


def test_a_users_session_keeps_its_own_auth() -> None:
    """Keeping ~/.netrc out must not drop the auth of a session passed in."""
    session = requests.Session()
    session.auth = _Signer()
    with serve(tokens=2) as upstream:
        transport = RequestsTransport(session)
        with holysheep.Client(api_key="k", base_url=upstream.base_url, transport=transport) as c:
            c.chat.complete(model="m", messages=MESSAGES)
        headers = upstream.requests[-1].headers
    assert ("sig", "Bearer k") == (headers["x-gateway-signature"], headers["authorization"])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
async def test_aiohttp_reads_a_proxy_without_a_scheme_and_all_proxy(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`HTTP_PROXY=proxy.corp:3128` (no scheme) reached aiohttp as an invalid URL and failed
    every request; requests and httpx take it as http://. ALL_PROXY counts too."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with serve(tokens=2) as proxy:
        monkeypatch.setenv(variable, proxy.base_url.removesuffix("/v1").removeprefix("http://"))
        async with via_gateway() as client:
            assert (await client.chat.complete(model="m", messages=MESSAGES)).text
        assert 1 == len(proxy.requests)


CERTS = Path(__file__).parent / "certs"  # a self-signed certificate for 127.0.0.1


@contextlib.contextmanager
def tls_server(
    answer: Callable[[ssl.SSLObject, socket.socket], None],
) -> Iterator[tuple[str, list[bytes]]]:
    """A one-connection TLS server on 127.0.0.1 with our self-signed certificate: it reads one
    request, records its first line, then lets `answer` respond. Yields the base URL and the
    request lines received."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERTS / "localhost.pem", CERTS / "localhost-key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    received: list[bytes] = []

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as raw:
            raw.settimeout(10)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                try:
                    data += tls.read(65536)
                    continue
                except ssl.SSLWantReadError:
                    pass
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                piece = raw.recv(65536)
                if not piece:
                    return
                incoming.write(piece)
            received.append(data.split(b"\r\n", 1)[0])
            answer(tls, raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1", received
    finally:
        listener.close()
        thread.join(10)


def test_a_refused_certificate_is_a_connect_error() -> None:
    """A certificate the client does not trust: no request went out, so ConnectError (and a
    rate limiter gives the attempt's tokens back)."""
    with tls_server(lambda tls, raw: None) as (url, _):
        client = holysheep.Client(
            api_key="k", base_url=url, transport=RequestsTransport(verify=True),
            retry=holysheep.RetryPolicy.none(),
        )  # fmt: skip
        with pytest.raises(holysheep.ConnectError, match="could not connect"):
            client.chat.complete(model="m", messages=MESSAGES)
        client.close()


def test_a_tls_error_after_the_request_went_out_is_no_connect_error() -> None:
    """urllib3 calls any TLS error SSLError, one in the middle of the response too: the server
    had the request, so it must not count as never sent (and cost nothing)."""

    def plaintext(tls: ssl.SSLObject, raw: socket.socket) -> None:
        raw.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # not a TLS record: the client's read fails

    with tls_server(plaintext) as (url, received):
        client = holysheep.Client(
            api_key="k", base_url=url,
            transport=RequestsTransport(verify=str(CERTS / "localhost.pem")),
            retry=holysheep.RetryPolicy.none(),
        )  # fmt: skip
        with pytest.raises(holysheep.APIConnectionError) as info:
            client.chat.complete(model="m", messages=MESSAGES)
        client.close()
    assert not isinstance(info.value, holysheep.ConnectError)
    assert [b"POST /v1/chat/completions HTTP/1.1"] == received
