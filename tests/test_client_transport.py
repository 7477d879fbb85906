"""Where the device client's bearer token may travel: only to the server's own origin, over https
unless that server is on loopback. Real HTTP servers on 127.0.0.1; redirects are answered as
ClientErrors and never followed, and a plain-http URL to another host is refused before any
connection is made."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler

import pytest
from loopback import LoopbackServer

from device_runtime.client import ClientConfig, ClientError, fetch_patch

ONE_TRY = ClientConfig(timeout_s=5.0, retries=0, backoff_s=0.01)
FINGERPRINT = "0" * 64


class Recorder(LoopbackServer):
    """A server on loopback that answers every GET and POST with `status`, a `Location` header
    when given, and a few body bytes; `.requests` keeps (method, path, Authorization header)."""

    def __init__(self, status: int = 200, location: str | None = None):
        self.requests: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"patch")

            do_GET = do_POST = answer

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_token_stays_home(status):
    with Recorder() as elsewhere:
        target = f"{elsewhere.url}/v1/patches"
        with Recorder(status, location=target) as server:
            with pytest.raises(ClientError) as refused:
                fetch_patch(server.url, FINGERPRINT, [1, 2], device_id="d", token="secret-token", config=ONE_TRY)
            assert server.requests == [("POST", "/v1/patches", "Bearer secret-token")]
        assert elsewhere.requests == []  # no request at all, so no token, went to the other origin
    message = str(refused.value)
    assert f"redirects ({status}) to '{target}'" in message and "\n" not in message
    assert refused.value.status == status


def test_same_server_without_redirect_still_gets_the_token():
    with Recorder() as server:
        data, attempts = fetch_patch(server.url, FINGERPRINT, [1], device_id="d", token="secret-token", config=ONE_TRY)
    assert (data, attempts) == (b"patch", 1)
    assert server.requests == [("POST", "/v1/patches", "Bearer secret-token")]


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every connection attempt the client makes, recorded and refused (no network is touched)."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError("test: nothing listens")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize(
    "url",
    [
        "http://patches.example.com",
        "http://192.0.2.10:8080",
        "http://[2001:db8::1]:8000",
        "http://127.0.0.1.example.com",
        "http://localhost.example.com:8000",
        "ftp://patches.example.com",
        "patches.example.com",
        "https://",
    ],
)
def test_plain_http_to_another_host_is_refused_before_connecting(connections, url):
    with pytest.raises(ClientError, match=r"must be https://") as refused:
        fetch_patch(url, FINGERPRINT, [1], device_id="d", token="secret-token", config=ONE_TRY)
    assert connections == [] and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "url, host",
    [
        ("http://127.0.0.1:8123", "127.0.0.1"),
        ("http://127.3.2.1:8123", "127.3.2.1"),
        ("http://localhost:8123", "localhost"),
        ("http://LOCALHOST:8123", "LOCALHOST"),
        ("http://[::1]:8123", "::1"),
        ("https://patches.example.com:8443", "patches.example.com"),
    ],
)
def test_https_and_loopback_http_are_allowed(connections, url, host):
    with pytest.raises(ClientError, match="failed 1 times"):
        fetch_patch(url, FINGERPRINT, [1], device_id="d", token="secret-token", config=ONE_TRY)
    assert [address[0] for address in connections] == [host]
