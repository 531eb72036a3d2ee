"""The browser front door on a real server: HTTPS pages, the WebSocket chat, the onboarding page, their bounds.

Real TLS on 127.0.0.1 with ALPN ``http/1.1`` (what browsers offer); the WebSocket peer is wsproto's client
(tests/webclient.py), the line peer the plain line client. The browser itself: test_web_browser.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from wsproto import events as ws

from securechat.pki import certs
from securechat.server import pages, web
from securechat.server.engine import ChatServer
from securechat.wire import tls
from securechat.wire.web import frame_lines
from tests.conftest import LOOPBACK, LineClient
from tests.serving import Server  # the real `securechat serve`
from tests.webclient import Refused, WebClient, http_get, tls_context


@pytest.fixture(scope="module")
def web_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minted CA and server certificate (localhost, 127.0.0.1), as `securechat serve` makes them."""
    directory = tmp_path_factory.mktemp("web") / "certs"
    certs.mint(directory)
    return directory


@pytest.fixture
def web_server(web_certs: Path) -> Iterator[Callable[..., ChatServer]]:
    servers: list[ChatServer] = []

    def start(**options: object) -> ChatServer:
        context = web.spare_browsers(tls.server_context(web_certs / "server.pem", web_certs / "server.key"),
                                     web_certs / "server.pem", web_certs / "server.key")
        server = ChatServer(LOOPBACK, 0, context, **options)  # type: ignore[arg-type]
        web.install(server, pages.Onboarding.for_certificate(web_certs / "server.pem"))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def _line_client(server: ChatServer, ca: Path, nick: str) -> LineClient:
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=10)
    client = LineClient(tls.client_context(ca).wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat: send your nickname")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


def _web_client(server: ChatServer, ca: Path, nick: str) -> WebClient:
    client = WebClient.open(server.address[1], ca)
    client.expect("* securechat: send your nickname")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


# -- pages ------------------------------------------------------------------------------------------


def test_the_page_is_served_over_https_with_its_headers(web_server: Callable[..., ChatServer], web_certs: Path) -> None:
    port = web_server().address[1]
    status, headers, body = http_get(port, "/", ca=web_certs / "ca.pem")
    assert status == 200 and b'<script type="module" src="/app.js">' in body
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and "set-cookie" not in headers
    status, headers, body = http_get(port, "/app.js", ca=web_certs / "ca.pem")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"WebSocket" in body
    status, again, body = http_get(port, "/app.js", ca=web_certs / "ca.pem",
                                   headers={"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""
    assert http_get(port, "/nothing-here", ca=web_certs / "ca.pem")[0] == 404
    assert http_get(port, "/../../etc/passwd", ca=web_certs / "ca.pem")[0] == 404


def test_one_port_serves_line_clients_browsers_and_the_onboarding_page(web_server: Callable[..., ChatServer],
                                                                       web_certs: Path) -> None:
    server = web_server()
    port = server.address[1]
    # Plain HTTP: the onboarding page, with the CA and its fingerprint, and nothing private.
    status, headers, page = http_get(port, "/")
    assert status == 200 and tls.file_fingerprint(web_certs / "ca.pem").encode() in page
    assert f'href="https://localhost:{port}/"'.encode() in page
    assert "default-src 'self'" in headers["content-security-policy"]
    status, headers, der = http_get(port, "/ca.crt")
    assert status == 200 and der == ssl.PEM_cert_to_DER_cert((web_certs / "ca.pem").read_text())
    assert http_get(port, "/ca.pem")[2].startswith(b"-----BEGIN CERTIFICATE-----")
    assert http_get(port, "/ca.key")[0] == 404 and http_get(port, "/server.key")[0] == 404
    # Plaintext that is not HTTP still hears that TLS is required.
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        raw.sendall(b"alice\n")
        assert raw.recv(4096).startswith(b"* this server requires TLS")
    # TLS without ALPN: the line protocol, unchanged.
    _line_client(server, web_certs / "ca.pem", "carol").close()


def test_a_websocket_client_and_a_line_client_see_each_others_lines_exactly(web_server: Callable[..., ChatServer],
                                                                           web_certs: Path) -> None:
    server = web_server()
    ca = web_certs / "ca.pem"
    browser = _web_client(server, ca, "alice")
    line = _line_client(server, ca, "bob")
    browser.expect("* bob joined")
    browser.send("hello <b>bob</b> 👋")
    assert line.expect("[alice]") == "[alice] hello <b>bob</b> 👋"
    line.send("/me waves back")
    line.send("/msg alice psst")
    assert browser.expect("[bob]") == "[bob] * waves back"
    assert browser.expect("[bob -> alice]") == "[bob -> alice] psst"
    browser.send("/who")
    assert browser.expect("* 2 online") == "* 2 online: alice, bob"
    # A message with a newline in it is two lines, as the same bytes are on the line protocol.
    browser.send("one\ntwo")
    assert line.expect("[alice] one") == "[alice] one"
    assert line.expect("[alice] two") == "[alice] two"
    browser.send("/quit")
    assert browser.expect("* goodbye") == "* goodbye"
    assert browser.wait_closed() is not None
    assert line.expect("* alice left") == "* alice left"


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost:{port}", "null", None,
                                    "https://localhost:1"])
def test_an_upgrade_from_another_origin_is_refused(web_server: Callable[..., ChatServer], web_certs: Path,
                                                   origin: str | None) -> None:
    port = web_server().address[1]
    with pytest.raises(Refused) as refused:
        WebClient.open(port, web_certs / "ca.pem", origin=None if origin is None else origin.format(port=port))
    assert refused.value.status == 403


def test_a_plain_get_of_the_websocket_address_is_told_to_upgrade(web_server: Callable[..., ChatServer],
                                                                 web_certs: Path) -> None:
    port = web_server().address[1]
    status, headers, _ = http_get(port, "/ws", ca=web_certs / "ca.pem")
    assert status == 426 and headers["upgrade"] == "websocket"


# -- the same bounds as every client ----------------------------------------------------------------


def test_flood_control_and_the_line_limit_apply_to_websockets(web_server: Callable[..., ChatServer],
                                                              web_certs: Path) -> None:
    server = web_server(flood_rate=5, flood_burst=5)
    ca = web_certs / "ca.pem"
    flooder = _web_client(server, ca, "flooder")
    for i in range(30):
        flooder.send(f"line {i}")
    assert flooder.expect("* slow down").startswith("* slow down: at most 5 lines a second")
    long = _web_client(server, ca, "long")
    long.send("x" * 5000)
    assert long.expect("* line too long").startswith("* line too long")
    closed = long.wait_closed()
    assert closed is not None and closed.code == 1009


def test_binary_messages_close_the_websocket(web_server: Callable[..., ChatServer], web_certs: Path) -> None:
    client = _web_client(web_server(), web_certs / "ca.pem", "alice")
    client.send_raw(client.conn.send(ws.BytesMessage(b"\x00\x01")))
    closed = client.wait_closed()
    assert closed is not None and closed.code == 1003


def test_a_websocket_that_never_logs_in_is_closed_at_the_login_timeout(web_server: Callable[..., ChatServer],
                                                                       web_certs: Path) -> None:
    server = web_server(login_timeout=1)
    client = WebClient.open(server.address[1], web_certs / "ca.pem")
    client.expect("* securechat: send your nickname")
    started = time.monotonic()
    assert client.expect("* no nickname within", timeout=5).startswith("* no nickname within 1 s")
    assert client.wait_closed() is not None and time.monotonic() - started < 3


def test_websockets_and_page_loads_hold_places_among_the_unauthenticated(web_server: Callable[..., ChatServer],
                                                                        web_certs: Path) -> None:
    server = web_server(max_pending=4, max_pending_per_ip=0)
    ca = web_certs / "ca.pem"
    silent = [WebClient.open(server.address[1], ca) for _ in range(4)]
    for client in silent:
        client.expect("* securechat: send your nickname")
    assert len(server.pending) == 4
    newcomer = _web_client(server, ca, "alice")  # the pool is full: the oldest silent one made room
    assert silent[0].wait_closed(5) is not None  # evicted: the oldest of the pool
    assert len(server.pending) <= 4
    newcomer.send("still here")
    newcomer.close()


def test_many_browsers_cost_no_thread_and_get_every_line(web_server: Callable[..., ChatServer],
                                                          web_certs: Path) -> None:
    server = web_server()
    ca = web_certs / "ca.pem"
    _web_client(server, ca, "warm-up").close()  # the loops and workers exist from here on
    time.sleep(0.2)
    threads = threading.active_count()
    browsers = [_web_client(server, ca, f"b{i}") for i in range(20)]
    assert threading.active_count() <= threads + 1  # no thread per browser (a worker may start)
    line = _line_client(server, ca, "sender")
    for i in range(10):  # within the flood burst (20, the nickname line included)
        line.send(f"message {i}")
    for b in browsers:
        got = [b.expect(f"[sender] message {i}") for i in range(10)]
        assert got == [f"[sender] message {i}" for i in range(10)]
    assert frame_lines(b"[sender] x\n") == b"\x81\x0a[sender] x"


# -- browser devices (invite NAME --web) on the real command --------------------------------------


def test_a_browser_device_chats_under_its_name_and_is_cut_within_two_seconds_of_revoke(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", "--require-client-cert")
    try:
        port = server.port
        # Without a device: refused, as a line client without a certificate is.
        guest = WebClient.open(port, server.ca)
        guest.send("mallory")
        assert "one-time link from 'securechat invite NAME --web'" in guest.expect("* this server requires a client")
        done = server.cli("invite", "alice", "--web", "--host", "localhost", "--port", str(port))
        token = done.stdout.splitlines()[1].split("#invite=")[1]
        secret = secrets.token_urlsafe(32)
        alice = WebClient.open(port, server.ca)
        alice.send(f"/device {secret} {token}")
        assert alice.expect("* device:") == "* device: alice"
        alice.send("mallory")  # whatever it asks for, the name is the device's
        assert alice.expect("* welcome, ").startswith("* welcome, alice!")
        alice.send("/nick mallory")
        assert alice.expect("* nickname refused").startswith("* nickname refused: your nickname is bound")
        # The link worked once; the secret works again, for alice only.
        again = WebClient.open(port, server.ca)
        again.send(f"/device {secrets.token_urlsafe(32)} {token}")
        assert "already been used" in again.expect("* device refused")
        assert "alice (browser)" in server.cli("certs").stdout
        revoked = server.cli("revoke", "alice")
        assert revoked.returncode == 0
        since = time.monotonic()
        assert alice.expect("* your certificate has been revoked", timeout=3)
        assert alice.wait_closed(3) is not None and time.monotonic() - since < 2.0
        back = WebClient.open(port, server.ca)
        back.send(f"/device {secret}")
        assert "revoked" in back.expect("* device refused")
        server.wait_log("refused the browser device")
    finally:
        server.stop()


def test_a_device_on_a_server_without_mutual_tls_binds_the_name_and_guests_still_join(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    try:
        port = server.port
        guest = WebClient.open(port, server.ca)
        guest.expect("* securechat: send your nickname")  # greeted at once, as line clients are
        guest.send("bob")
        assert guest.expect("* welcome, ").startswith("* welcome, bob!")
        done = server.cli("invite", "alice", "--web", "--host", "localhost", "--port", str(port))
        token = done.stdout.splitlines()[1].split("#invite=")[1]
        alice = WebClient.open(port, server.ca)
        alice.expect("* securechat: send your nickname")
        alice.send(f"/device {secrets.token_urlsafe(32)} {token}")
        assert alice.expect("* device:") == "* device: alice"
        alice.send("alice")
        assert alice.expect("* welcome, ").startswith("* welcome, alice!")
        other = WebClient.open(port, server.ca)
        other.expect("* securechat: send your nickname")
        other.send("AIice")  # a look-alike of a device's name is held too
        assert "belongs to a certificate holder" in other.expect("* nickname refused")
        # A junk first message is refused in one line, the connection closed.
        junk = WebClient.open(port, server.ca)
        junk.send("/device")
        assert junk.expect("* device refused: usage") and junk.wait_closed() is not None
    finally:
        server.stop()


def test_frames_bigger_than_a_line_are_refused_before_they_are_buffered(web_server: Callable[..., ChatServer],
                                                                       web_certs: Path) -> None:
    client = _web_client(web_server(), web_certs / "ca.pem", "alice")
    # One frame announcing 100 MB, its first 64 KiB sent: cut at the line bound, not buffered whole.
    header = b"\x81\xff" + (100 * 2**20).to_bytes(8, "big") + b"\x00\x00\x00\x00"
    client.send_raw(header + b"a" * 65536)
    assert client.expect("* line too long").startswith("* line too long")


def test_browsers_are_not_asked_for_a_client_certificate_and_everyone_else_still_is(tmp_path: Path) -> None:
    """A CertificateRequest makes Android's Chrome show a certificate picker and cancels WebSockets; the
    server leaves it out of handshakes that offer HTTP only (what openssl s_client shows: the request's
    signature algorithms), and keeps it for line clients, enrollment and anything offering our names."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    server = Server(tmp_path / "server")
    try:
        def requested(*alpn: str) -> bool:
            args = ["-alpn", ",".join(alpn)] if alpn else []
            done = subprocess.run(["openssl", "s_client", "-connect", f"{LOOPBACK}:{server.port}", "-CAfile",
                                   str(server.ca), *args], input="", capture_output=True, text=True, timeout=20)
            assert "Verify return code: 0 (ok)" in done.stdout, done.stdout[-1500:]
            return "Requested Signature Algorithms" in done.stdout

        assert not requested("http/1.1") and not requested("h2", "http/1.1")
        assert requested() and requested("securechat-enroll/1") and requested("securechat-enroll/1", "http/1.1")
    finally:
        server.stop()


def test_the_banner_names_the_browsers_address_and_no_web_turns_the_front_door_off(tmp_path: Path) -> None:
    server = Server(tmp_path / "on")
    try:
        browsers = server.wait_out("[SERVER] Browsers: ")
        assert browsers == f"[SERVER] Browsers: https://127.0.0.1:{server.port}/"
        assert f"http://127.0.0.1:{server.port}/ offers the CA" in server.wait_out("[SERVER] First time on a phone")
    finally:
        server.stop()
    off = Server(tmp_path / "off", "--no-web")
    try:
        time.sleep(0.3)
        assert not any("Browsers" in line for line in off.printed + list(off.out.queue))
        raw = socket.create_connection((LOOPBACK, off.port), timeout=5)
        with tls_context(off.ca).wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.selected_alpn_protocol() is None  # http/1.1 is not taken: no HTTPS here
        with socket.create_connection((LOOPBACK, off.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP: the TLS notice, no page
            assert raw.recv(4096).startswith(b"* this server requires TLS")
        _line_client_to(off, "alice").close()  # line clients as ever
    finally:
        off.stop()


def _line_client_to(server: Server, nick: str) -> LineClient:
    raw = socket.create_connection((LOOPBACK, server.port), timeout=10)
    client = LineClient(tls.client_context(server.ca).wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat: send your nickname")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


def _handshake_in_two_segments(port: int, ca: Path, pause: float) -> tuple[str | None, bool]:
    """A TLS handshake offering http/1.1 whose ClientHello is sent in two TCP segments ``pause`` apart, as
    a browser's often is on a LAN: (the ALPN agreed, whether the server sent a CertificateRequest)."""
    ctx = tls_context(ca)
    requested = []
    ctx._msg_callback = lambda conn, direction, version, content, msg_type, data: requested.append(  # type: ignore[attr-defined]
        direction == "read" and msg_type == ssl._TLSMessageType.CERTIFICATE_REQUEST)  # type: ignore[attr-defined]
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        sock.sendall(hello[:60])
        time.sleep(pause)
        sock.sendall(hello[60:])
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                data = sock.recv(65536)
                assert data, "the server closed during the handshake"
                incoming.write(data)
        if out := outgoing.read():
            sock.sendall(out)
    return obj.selected_alpn_protocol(), any(requested)


def test_a_clienthello_in_two_segments_is_waited_for_without_spinning(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")  # with its CA at hand: everyone else is asked for a certificate
    try:
        assert _handshake_in_two_segments(server.port, server.ca, 0.05) == ("http/1.1", False)
        # Half a ClientHello and silence: the server looks again a few times, it does not spin.
        with socket.create_connection((LOOPBACK, server.port), timeout=10) as sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = tls_context(server.ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                obj.do_handshake()
            sock.sendall(outgoing.read()[:60])
            before = _cpu_seconds(server.proc.pid)
            time.sleep(1.5)
            assert _cpu_seconds(server.proc.pid) - before < 0.5
    finally:
        server.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
