"""Files for browsers on a real server: the upload socket (/files, binary WebSocket) and GET /files/ID downloads.

The peers are wsproto clients (what a browser speaks) over real TLS with ALPN ``http/1.1``; the page itself
in a real Chromium is test_web_browser.py's business.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from securechat.pki import certs
from securechat.server import filehandler, pages, web
from securechat.server import files as files_module
from securechat.server.engine import ChatServer
from securechat.server.filehandler import install
from securechat.server.files import FileService
from securechat.store.files import FileStore
from securechat.wire import filexfer, tls
from tests.conftest import LOOPBACK
from tests.webclient import Refused, WebClient, http_get, tls_context

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)


@pytest.fixture(scope="module")
def web_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("webfiles") / "certs"
    certs.mint(directory)
    return directory


@pytest.fixture
def server(web_certs: Path, tmp_path: Path) -> Iterator[ChatServer]:
    context = web.spare_browsers(tls.server_context(web_certs / "server.pem", web_certs / "server.key"),
                                 web_certs / "server.pem", web_certs / "server.key")
    s = ChatServer(LOOPBACK, 0, context)
    web.install(s, pages.Onboarding.for_certificate(web_certs / "server.pem"))
    files = FileService(FileStore(tmp_path / "files"), s.rooms)
    install(s, files)
    files.start()
    s.start()
    yield s
    s.shutdown()
    files.close()


def _chat(server: ChatServer, ca: Path, nick: str) -> WebClient:
    client = WebClient.open(server.address[1], ca)
    client.expect("* securechat: send your nickname")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


def _ticket(chat: WebClient, request: str) -> str:
    chat.send(request)
    answer = chat.expect("* ticket ")
    parsed = filexfer.parse_ticket_reply(answer)
    assert parsed is not None and parsed[1] is not None, answer
    return parsed[1]


class FileSocket:
    """The page's upload socket, as a browser opens it: a WebSocket at /files with binary messages."""

    def __init__(self, port: int, ca: Path, origin: str | None = None) -> None:
        raw = socket.create_connection((LOOPBACK, port), timeout=10)
        self.sock = tls_context(ca).wrap_socket(raw, server_hostname="localhost")
        self.conn = WSConnection(ConnectionType.CLIENT)
        where = f"localhost:{port}"
        self.sock.sendall(self.conn.send(ws.Request(host=where, target="/files", extra_headers=[
            (b"origin", (origin or f"https://{where}").encode())])))
        self.decoder = filexfer.Decoder()
        self.messages: list[dict[str, object]] = []
        while True:
            self.conn.receive_data(self.sock.recv(65536) or None)
            for event in self.conn.events():
                if isinstance(event, ws.AcceptConnection):
                    return
                if isinstance(event, ws.RejectConnection):
                    raise Refused(event.status_code, b"")

    def send(self, frame: bytes) -> None:
        self.sock.sendall(self.conn.send(ws.Message(data=frame)))

    def control(self, timeout: float = 10) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while not self.messages and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            self.conn.receive_data(data or None)
            for event in self.conn.events():
                if isinstance(event, ws.BytesMessage):
                    self.messages += [e.msg for e in self.decoder.feed(event.data) if isinstance(e, filexfer.Control)]
                elif isinstance(event, ws.CloseConnection):
                    self.messages.append({"closed": event.code})
            if not data:
                break
        return self.messages.pop(0)


def _upload(server: ChatServer, ca: Path, chat: WebClient, name: str, data: bytes) -> str:
    token = _ticket(chat, filexfer.put_request("t1", "-", len(data), name))
    sock = FileSocket(server.address[1], ca)
    sock.send(filexfer.control(op="put", ticket=token))
    assert sock.control() == {"ok": "put", "offset": 0}
    for i in range(0, len(data), filexfer.CHUNK):
        piece = data[i:i + filexfer.CHUNK]
        sock.send(filexfer.data_header(len(piece)) + piece)
    sock.send(filexfer.control(op="end", sha256=hashlib.sha256(data).hexdigest()))
    while "ack" in (answer := sock.control()):
        pass
    assert answer["ok"] == "done", answer
    return str(answer["id"])


def test_a_browser_uploads_on_its_own_socket_and_the_room_hears_of_it(server: ChatServer, web_certs: Path) -> None:
    ca = web_certs / "ca.pem"
    alice, bob = _chat(server, ca, "alice"), _chat(server, ca, "bob")
    data = os.urandom(filexfer.ACK_EVERY + 12345)
    file_id = _upload(server, ca, alice, "holiday.jpg", data)
    assert bob.expect("* alice shared") == f"* alice shared holiday.jpg (4.0 MiB): /get {file_id}"
    token = _ticket(bob, filexfer.get_request("t2", file_id))
    status, headers, body = http_get(server.address[1], f"/files/{file_id}?t={token}", ca=ca)
    assert status == 200 and body == data
    # Not a JPEG by its bytes (random): saved, never shown, whatever its name says.
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == "attachment; filename=\"holiday.jpg\"; filename*=UTF-8''holiday.jpg"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["connection"] == "close"
    assert http_get(server.address[1], f"/files/{file_id}?t={token}", ca=ca)[0] == 404  # the ticket is used up


@pytest.mark.parametrize("name, content, inline", [
    ("photo.png", PNG, "image/png"),
    ("scan.jpg", b"\xff\xd8\xff\xe0" + os.urandom(500), "image/jpeg"),
    ("cat.gif", b"GIF89a" + os.urandom(100), "image/gif"),
    ("sticker.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + os.urandom(100), "image/webp"),
    ("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', None),
    ("trap.png", b"<html><script>alert(document.cookie)</script></html>", None),
    ("r\u00e9sum\u00e9 \u00e9t\u00e9.pdf", b"%PDF-1.7\n" + os.urandom(100), None),
])
def test_only_real_images_are_shown_inline_and_nothing_runs(server: ChatServer, web_certs: Path, name: str,
                                                            content: bytes, inline: str | None) -> None:
    ca = web_certs / "ca.pem"
    alice = _chat(server, ca, "alice")
    file_id = _upload(server, ca, alice, name, content)
    token = _ticket(alice, filexfer.get_request("t2", file_id))
    status, headers, body = http_get(server.address[1], f"/files/{file_id}?t={token}", ca=ca)
    assert status == 200 and body == content
    assert headers["content-type"] == (inline or "application/octet-stream")
    assert headers["content-disposition"].startswith("inline; " if inline else "attachment; ")
    assert headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in headers["content-security-policy"]  # the file's own policy (the page's comes first)
    assert headers["repr-digest"].startswith("sha-256=:")


def _download_status(server: ChatServer, ca: Path, chat: WebClient, file_id: str) -> int:
    token = _ticket(chat, filexfer.get_request("t9", file_id))
    return http_get(server.address[1], f"/files/{file_id}?t={token}", ca=ca)[0]


def test_a_download_whose_reader_stops_is_cut_and_gives_its_place_up(server: ChatServer, web_certs: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A browser that asks for a file and then reads nothing more must not hold its place among the
    transfers (nor the open file) for as long as its TCP connection lives."""
    monkeypatch.setattr(filehandler, "IDLE_SECONDS", 0.5)
    monkeypatch.setattr(files_module, "MAX_TRANSFERS", 1)  # so a held place shows: the next one is refused
    ca = web_certs / "ca.pem"
    alice = _chat(server, ca, "alice")
    data = os.urandom(16 << 20)  # far more than the outbox (1 MiB) and both sockets' buffers hold
    file_id = _upload(server, ca, alice, "big.bin", data)
    token = _ticket(alice, filexfer.get_request("t2", file_id))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a small window, as a stalled reader's
    raw.settimeout(10)
    raw.connect((LOOPBACK, server.address[1]))
    stalled = tls_context(ca).wrap_socket(raw, server_hostname="localhost")
    stalled.sendall(f"GET /files/{file_id}?t={token} HTTP/1.1\r\nHost: localhost:{server.address[1]}\r\n\r\n"
                    .encode())
    got = stalled.recv(65536)
    assert got.startswith(b"HTTP/1.1 200 "), got[:100]
    # ... and reads nothing more. While it stalls it holds the one place; once cut, the place is free.
    statuses = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        statuses.append(_download_status(server, ca, alice, file_id))
        if statuses[-1] == 200:
            break
        time.sleep(0.2)
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    # The stalled reader got a connection cut short, never the whole file.
    try:
        while chunk := stalled.recv(1 << 20):
            got += chunk
    except (ssl.SSLError, OSError):
        pass
    stalled.close()
    assert len(got) < len(data)


def test_downloads_need_their_ticket(server: ChatServer, web_certs: Path) -> None:
    ca = web_certs / "ca.pem"
    alice = _chat(server, ca, "alice")
    file_id = _upload(server, ca, alice, "a.txt", b"hello")
    for path in (f"/files/{file_id}", f"/files/{file_id}?t=AAAAAAAAAAAAAAAAAAAAAA", f"/files/{file_id}?t=../../x",
                 "/files/../certs/ca.key", "/files/zzzzzzzzzz?t=x"):
        assert http_get(server.address[1], path, ca=ca)[0] == 404, path
    other = _upload(server, ca, alice, "b.txt", b"other")
    token = _ticket(alice, filexfer.get_request("t3", other))  # a ticket for another file opens nothing here
    assert http_get(server.address[1], f"/files/{file_id}?t={token}", ca=ca)[0] == 404


def test_the_upload_socket_opens_only_from_the_page_and_takes_tickets_only(server: ChatServer,
                                                                           web_certs: Path) -> None:
    ca = web_certs / "ca.pem"
    with pytest.raises(Refused) as refused:
        FileSocket(server.address[1], ca, origin="https://evil.example")
    assert refused.value.status == 403
    sock = FileSocket(server.address[1], ca)
    sock.send(filexfer.control(op="put", ticket="A" * 22))
    assert sock.control() == {"error": "the ticket is unknown or expired: ask for a new one"}
    assert sock.control()["closed"] == 1000


def test_a_plain_chat_socket_still_refuses_binary_messages(server: ChatServer, web_certs: Path) -> None:
    chat = _chat(server, web_certs / "ca.pem", "alice")
    chat.send_raw(chat.conn.send(ws.Message(data=b"\x00\x01")))
    closed = chat.wait_closed()
    assert closed is not None and closed.code == 1003


def test_no_files_no_route(web_certs: Path) -> None:
    context = web.spare_browsers(tls.server_context(web_certs / "server.pem", web_certs / "server.key"),
                                 web_certs / "server.pem", web_certs / "server.key")
    s = ChatServer(LOOPBACK, 0, context)
    web.install(s, None)
    s.start()
    try:
        assert http_get(s.address[1], "/files/zzzzzzzzzz?t=x", ca=web_certs / "ca.pem")[0] == 404
    finally:
        s.shutdown()
