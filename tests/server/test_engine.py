"""The engine (issue 20): loops own connections, one owner per SSL object, and the protocol table.

Real sockets and real TLS on 127.0.0.1. The SSL-ownership test records, for every server-side
``ssl.SSLSocket``, which threads called into it (``SSLContext.sslsocket_class``, the standard hook):
exactly one, and a loop thread. The table tests plug toy protocols in the way the browser (#21) and
file transfer (#22) will: a chat over another framing that reuses Session, a plaintext HTTP route, a
streaming upload and download that keeps the outbox bounded and the loop unblocked.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from securechat.server.engine import ChatServer
from securechat.server.lines import FramedConn
from securechat.server.routes import PLAINTEXT_HTTP, looks_like_http
from securechat.server.session import Session
from securechat.server.transport import Handler, Transport
from securechat.store.history import SqliteLog
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def alpn_client(client_ctx: ssl.SSLContext, alpn: str) -> ssl.SSLContext:
    """A client context trusting the test server's CA that offers ``alpn`` (a plugged-in protocol)."""
    ctx = tls.client_context(None)
    ctx.load_verify_locations(cadata=client_ctx.get_ca_certs(binary_form=True)[0])
    ctx.set_alpn_protocols([alpn])
    return ctx


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- one owner per SSL object ----------------------------------------------------------------------

_TOUCHING = ("do_handshake", "recv", "recv_into", "read", "send", "sendall", "write", "pending", "getpeercert",
             "selected_alpn_protocol", "unwrap", "shutdown", "version", "cipher", "close")


class _Recorded(ssl.SSLSocket):
    """An SSLSocket that notes every thread calling into it (the server's context makes these)."""

    made: list[_Recorded] = []
    lock = threading.Lock()

    def _note(self) -> None:
        threads = self.__dict__.setdefault("threads", set())
        threads.add(threading.get_ident())
        if len(threads) == 1 and not self.__dict__.get("listed"):
            self.__dict__["listed"] = True
            with _Recorded.lock:
                _Recorded.made.append(self)


def _recording(name: str) -> Callable[..., Any]:
    base = getattr(ssl.SSLSocket, name)

    def method(self: _Recorded, *args: Any, **kwargs: Any) -> Any:
        self._note()
        return base(self, *args, **kwargs)

    return method


for _name in _TOUCHING:
    setattr(_Recorded, _name, _recording(_name))


@pytest.mark.slow
def test_every_ssl_object_is_touched_by_one_loop_thread_only(
        serve: Serve, cert_files: dict[str, Path], client_ctx: ssl.SSLContext, tmp_path: Path) -> None:
    """Concurrent senders, a reader that does not read, history on workers, evictions, a shutdown:
    through all of it each server-side SSL object sees exactly one thread, one of the loops."""
    ctx = tls.server_context(cert_files["cert"], cert_files["key"])
    ctx.sslsocket_class = _Recorded
    _Recorded.made.clear()
    server = serve(context=ctx, flood_rate=0, max_pending=4, max_pending_per_ip=0,
                   roomlog=SqliteLog(tmp_path / "history.sqlite3"), loops=3)
    port = server.address[1]

    def login(nick: str) -> LineClient:
        raw = socket.create_connection((LOOPBACK, port), timeout=10)
        c = LineClient(client_ctx.wrap_socket(raw, server_hostname="localhost"))
        c.expect("* securechat: send your nickname")
        c.send(nick)
        c.expect(f"* welcome, {nick}!")
        return c

    senders = [login(f"s{i}") for i in range(6)]
    for i, sender in enumerate(senders):  # each talks in a room of its own (and reads nothing)
        sender.send(f"/join r{i}")
        sender.expect(f"* you joined #r{i}")
    watcher = login("watcher")
    stalled = login("stalled")  # never reads
    for i in range(len(senders)):
        for follower in (watcher, stalled):
            follower.send(f"/join r{i}")
        watcher.expect(f"* you joined #r{i}")

    def send_all(i: int) -> None:
        for k in range(150):
            senders[i].send(f"line {k} from s{i} " + "x" * 200)

    threads = [threading.Thread(target=send_all, args=(i,)) for i in range(len(senders))]
    for t in threads:
        t.start()
    got = 0
    for _ in range(20_000):  # bounded: every line and a few notices
        line = watcher.readline(timeout=10)
        got += "[s" in line and " from s" in line
        if got == 6 * 150:
            break
    for t in threads:
        t.join(10)
    assert got == 6 * 150
    watcher.send("/join dev")
    watcher.send("/history 20")
    watcher.send("/nick watcher2")
    watcher.expect("* watcher is now watcher2")
    # Silent TLS connections beyond the pending pool: the oldest are evicted (abort from the accept thread).
    silent = []
    for _ in range(8):
        raw = socket.create_connection((LOOPBACK, port), timeout=10)
        silent.append(client_ctx.wrap_socket(raw, server_hostname="localhost"))
    assert wait_for(lambda: len(server.pending) <= 4, 5)
    server.shutdown()
    for s in [*silent, *(c.sock for c in [*senders, watcher, stalled])]:
        s.close()
    loops = {loop._ident for loop in server.loops}
    assert len(_Recorded.made) >= 6 + 2 + 8
    for sock in _Recorded.made:
        threads_seen = sock.__dict__["threads"]
        assert len(threads_seen) == 1 and threads_seen <= loops, (sock, threads_seen, loops)


# -- what a connection costs ----------------------------------------------------------------------

def test_connections_cost_one_descriptor_and_no_thread(serve: Serve, connect: Connect) -> None:
    server = serve(loops=2)
    connect(server, "warm").close()
    assert wait_for(lambda: server.connection_count == 0, 5)
    threads, fds = os_threads(), fd_count()
    clients = [connect(server, f"c{i}") for i in range(60)]
    assert server.connection_count == 60 and server.client_count == 60
    # Each connection: the client's socket (this process) and the server's, nothing else (no
    # eventfd per connection, no thread).
    assert fd_count() <= fds + 2 * 60 + 2, (fd_count(), fds)
    assert os_threads() == threads
    for c in clients:
        c.close()
    assert wait_for(lambda: server.connection_count == 0, 10), server.connection_count
    assert wait_for(lambda: fd_count() <= fds + 2, 5)


def test_connections_are_spread_over_the_loops(serve: Serve, connect: Connect) -> None:
    server = serve(loops=3)
    clients = [connect(server, f"c{i}") for i in range(30)]
    clients[0].send("to everyone")
    for c in clients[1:]:
        assert c.expect("[c0]") == "[c0] to everyone"
    assert sorted(loop.connections for loop in server.loops) == [10, 10, 10]


# -- the protocol table ---------------------------------------------------------------------------

TOY_ALPN = "securechat-test-netstring/1"


def _netstring(line: bytes) -> bytes:
    return b"%d:%s," % (len(line), line)


class NetstringChat(Handler):
    """A chat client whose messages are netstrings: the Session and Rooms of line clients, reused."""

    __slots__ = ("server", "buffer", "session")

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.buffer = b""
        self.session: Session | None = None

    def connection_made(self, transport: Transport) -> None:
        session = self.session = Session(self.server, FramedConn(transport, _netstring), transport.peer)
        session.admission = transport.admission
        self.server.add_session(session)
        session.start()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        messages = []
        while b":" in self.buffer:
            size, _, rest = self.buffer.partition(b":")
            if len(rest) < int(size) + 1:
                break
            messages.append(rest[:int(size)])
            self.buffer = rest[int(size) + 1:]
        assert self.session is not None
        self.session.on_lines(messages)

    def connection_lost(self, reason: str) -> None:
        assert self.session is not None
        self.session.connection_lost(reason)


def _read_netstrings(sock: ssl.SSLSocket, until: bytes, timeout: float = 10) -> list[bytes]:
    sock.settimeout(timeout)
    buffer, out = b"", []
    while not any(until in m for m in out):
        buffer += sock.recv(65536)
        while b":" in buffer:
            size, _, rest = buffer.partition(b":")
            if len(rest) < int(size) + 1:
                break
            out.append(rest[:int(size)])
            buffer = rest[int(size) + 1:]
    return out


def test_a_protocol_plugged_in_by_alpn_chats_with_line_clients_through_the_same_rooms(
        serve: Serve, connect: Connect, client_ctx: ssl.SSLContext) -> None:
    server = serve(loops=2)
    server.routes.add(TOY_ALPN, lambda: NetstringChat(server))
    line = connect(server, "liner")
    ctx = alpn_client(client_ctx, TOY_ALPN)
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=10)
    framed = ctx.wrap_socket(raw, server_hostname="localhost")
    assert framed.selected_alpn_protocol() == TOY_ALPN
    assert _read_netstrings(framed, b"send your nickname")[-1] == b"* securechat: send your nickname"
    framed.sendall(_netstring(b"netty"))
    assert any(m.startswith(b"* welcome, netty!") for m in _read_netstrings(framed, b"welcome"))
    assert line.expect("* netty joined") == "* netty joined"
    framed.sendall(_netstring(b"hello from a netstring") + _netstring(b"/msg liner psst"))
    assert line.readline() == "[netty] hello from a netstring"
    assert line.readline() == "[netty -> liner] psst"
    line.send("hello back")
    assert b"[liner] hello back" in _read_netstrings(framed, b"hello back")
    framed.sendall(_netstring(b"/quit"))
    assert line.expect("* netty left") == "* netty left"
    framed.close()
    # A client offering only names the table does not hold gets the line protocol, as before.
    other = tls.client_context(None)
    other.load_verify_locations(cadata=client_ctx.get_ca_certs(binary_form=True)[0])
    other.set_alpn_protocols(["h2", "imap"])
    sock = other.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=10),
                             server_hostname="localhost")
    assert sock.selected_alpn_protocol() is None
    assert LineClient(sock).readline() == "* securechat: send your nickname"
    sock.close()


class TinyPage(Handler):
    __slots__ = ("transport", "seen")

    def __init__(self) -> None:
        self.seen = b""

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.seen += data
        if b"\r\n\r\n" in self.seen:
            body = b"onboarding: " + self.seen.split(b" ", 2)[1]
            self.transport.close(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_plaintext_that_looks_like_http_takes_its_own_route_and_anything_else_the_tls_notice(
        serve: Serve) -> None:
    assert looks_like_http(b"GET / HTTP/1.1") and looks_like_http(b"OPTIONS ")
    assert looks_like_http(b"GE") is None and looks_like_http(b"") is None
    assert looks_like_http(b"GEX") is False and looks_like_http(b"hello") is False
    server = serve()
    server.routes.add(PLAINTEXT_HTTP, TinyPage)

    def ask(*pieces: bytes) -> bytes:
        with socket.create_connection((LOOPBACK, server.address[1]), timeout=10) as s:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(0.05)  # the method may come in pieces
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out

    assert ask(b"GE", b"T /ca.pem HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"onboarding: /ca.pem")
    assert ask(b"HEAD / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
    assert ask(b"hello\n").startswith(b"* this server requires TLS")
    assert ask(b"G", b"ET", b"X\n").startswith(b"* this server requires TLS")


CHUNK = 64 * 1024


class Store(Handler):
    """``PUT n`` then n bytes, written to disk on a worker with reading paused meanwhile; ``GET``
    streams the file back, read on a worker, only while the outbox is under its high-water mark."""

    __slots__ = ("path", "transport", "buffer", "left", "file", "digest", "waiting", "peak", "chunks_held")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buffer = b""
        self.left = 0
        self.file: Any = None
        self.digest = hashlib.sha256()
        self.waiting = False
        self.peak = 0

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.file is None:
            self.buffer += data
            if b"\n" not in self.buffer:
                return
            command, _, data = self.buffer.partition(b"\n")
            self.buffer = b""
            verb, _, size = command.partition(b" ")
            if verb == b"GET":
                self.file = open(self.path, "rb")
                self._more()
                return
            self.left = int(size)
            self.file = open(self.path, "wb")
        chunk = data[:self.left]
        self.left -= len(chunk)
        self.digest.update(chunk)
        self.transport.pause_reading()  # no more bytes in memory until this chunk is on disk
        self.transport.offload(self.file.write, chunk, done=self._written)

    def _written(self, result: object, error: BaseException | None) -> None:
        assert error is None
        if self.left == 0:
            self.file.close()
            self.file = None
            self.transport.write(b"OK %s\n" % self.digest.hexdigest().encode())
        self.transport.resume_reading()

    def _more(self) -> None:
        self.transport.offload(self.file.read, CHUNK, done=self._read)

    def _read(self, chunk: bytes, error: BaseException | None) -> None:
        assert error is None
        if not chunk:
            self.file.close()
            self.transport.close()
            return
        self.transport.write(chunk)
        self.peak = max(self.peak, self.transport.outbox_size)
        if self.transport.outbox_size < self.transport.high_water:
            self._more()
        else:
            self.waiting = True  # resume_writing continues

    def resume_writing(self) -> None:
        if self.waiting:
            self.waiting = False
            self._more()


def test_a_stream_in_and_out_keeps_memory_bounded_and_the_chat_moving(
        serve: Serve, connect: Connect, client_ctx: ssl.SSLContext, tmp_path: Path) -> None:
    server = serve(loops=1, flood_rate=0)  # the chat shares the stream's loop
    handlers: list[Store] = []

    def store() -> Store:
        handlers.append(Store(tmp_path / "file.bin"))
        return handlers[-1]

    server.routes.add("securechat-test-store/1", store)
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    ctx = alpn_client(client_ctx, "securechat-test-store/1")
    payload = os.urandom(8 * 1024 * 1024 + 123)

    def upload() -> bytes:
        with ctx.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=20),
                             server_hostname="localhost") as s:
            s.sendall(b"PUT %d\n" % len(payload))
            s.sendall(payload)
            return LineClient(s, 20).readline().encode()

    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(upload()))
    thread.start()
    for i in range(20):  # chat goes on meanwhile
        bob.send(f"line {i}")
        assert alice.readline() == f"[bob] line {i}"
    thread.join(30)
    assert result == [b"OK " + hashlib.sha256(payload).hexdigest().encode()]
    with ctx.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=20),
                         server_hostname="localhost") as s:
        s.sendall(b"GET\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
            if len(got) < 2 * CHUNK:
                bob.send("while downloading")
                assert alice.readline() == "[bob] while downloading"
    assert bytes(got) == payload
    download = handlers[-1]
    # Never more than the high-water mark plus one chunk queued, however large the file.
    assert 0 < download.peak <= download.transport.high_water + CHUNK


def test_a_handler_that_raises_ends_its_connection_only(serve: Serve, connect: Connect,
                                                        client_ctx: ssl.SSLContext) -> None:
    class Broken(Handler):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("a bug in a plugged-in protocol")

    server = serve()
    server.routes.add("securechat-test-broken/1", Broken)
    alice = connect(server, "alice")
    ctx = alpn_client(client_ctx, "securechat-test-broken/1")
    with ctx.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=10),
                         server_hostname="localhost") as s:
        s.sendall(b"boom")
        s.settimeout(5)
        try:
            ended = s.recv(100) == b""
        except (ssl.SSLError, ConnectionError):  # a reset ends it too
            ended = True
        assert ended
    bob = connect(server, "bob")
    bob.send("still here")
    assert alice.expect("[bob]") == "[bob] still here"


# -- blocking work stays off the loops ------------------------------------------------------------

def test_blocking_work_never_runs_on_a_loop_thread(serve: Serve, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An invite join (ledger, CA signature), a chat with the certificate it brought (the ledger read
    at admission), history read on joining and paging: every SQLite transaction and every signature
    happens on a worker, none on a loop."""
    from securechat.client import enroll
    from securechat.pki import certs
    from securechat.pki.authority import Authority
    from securechat.pki.ledger import Store
    from securechat.server.trust import LocalSource, Trust

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    calls: list[tuple[str, str]] = []

    def watch(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, threading.current_thread().name))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, watched)

    for cls, name in ((Store, "_tx"), (SqliteLog, "_select"), (Authority, "_issue"), (Trust, "admit")):
        watch(cls, name)
    certs.mint(tmp_path / "certs")
    authority = Authority(tmp_path / "certs")
    ctx = authority.configure(tls.server_context(tmp_path / "certs" / "server.pem", tmp_path / "certs" / "server.key"),
                              tmp_path / "certs" / "server.pem")
    server = serve(context=ctx, authority=authority, trust=Trust(LocalSource(authority.store)),
                   roomlog=SqliteLog(tmp_path / "history.sqlite3"))
    port = server.address[1]
    enrolled = enroll.join(LOOPBACK, port, authority.store.create("grace").code)
    assert enrolled.cert_pem is not None and enrolled.key_pem is not None
    (tmp_path / "grace.pem").write_bytes(enrolled.cert_pem)
    (tmp_path / "grace.key").write_bytes(enrolled.key_pem)
    client = tls.client_context(tmp_path / "certs" / "ca.pem", certfile=tmp_path / "grace.pem",
                                keyfile=tmp_path / "grace.key")
    grace = LineClient(client.wrap_socket(socket.create_connection((LOOPBACK, port), timeout=10),
                                          server_hostname="localhost"))
    grace.expect("* securechat: send your nickname")
    grace.send("grace")
    grace.expect("* welcome, grace!")
    grace.send("hello")
    grace.send("/history")
    grace.send("/join dev")
    grace.expect("* you joined #dev")
    grace.close()
    names = {name for name, _ in calls}
    assert {"_tx", "_select", "_issue", "admit"} <= names, names
    on_loops = [(name, thread) for name, thread in calls if thread.startswith("securechat-loop")]
    assert not on_loops, on_loops


def test_a_line_is_handed_to_each_loop_once_whatever_its_members(serve: Serve, connect: Connect) -> None:
    server = serve(loops=3, flood_rate=0)
    clients = [connect(server, f"c{i}") for i in range(30)]
    handed: list[int] = []
    for loop in server.loops:
        original = loop.fanout

        def counting(data: bytes, targets: Any, exclude: str | None, original: Any = original) -> None:
            handed.append(len(targets))
            original(data, targets, exclude)

        loop.fanout = counting  # type: ignore[method-assign]
    clients[0].send("one line")
    for c in clients[1:]:
        assert c.expect("[c0]") == "[c0] one line"
    assert sorted(handed) == [10, 10, 10]  # three hand-offs of ten members each, not thirty


def test_a_reset_while_reading_is_paused_ends_the_connection(serve: Serve, client_ctx: ssl.SSLContext) -> None:
    """A handler waiting for a worker pauses reading; the peer resets meanwhile: the connection ends
    then (the reset is reported whatever the interest mask), instead of the loop spinning on it."""
    lost: list[str] = []
    ended = threading.Event()

    class Paused(Handler):
        def connection_made(self, transport: Transport) -> None:
            transport.pause_reading()  # e.g. a disk write pending in the worker pool, for ever here

        def connection_lost(self, reason: str) -> None:
            lost.append(reason)
            ended.set()

    server = serve()
    server.routes.add("securechat-test-paused/1", Paused)
    ctx = alpn_client(client_ctx, "securechat-test-paused/1")
    sock = ctx.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=10),
                           server_hostname="localhost")
    sock.sendall(b"unread")
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, with bytes the server has not read
    assert ended.wait(3), "the reset went unnoticed while reading was paused"
    assert lost == ["connection reset by peer"]
    assert wait_for(lambda: server.connection_count == 0, 3)


def test_when_written_waits_for_the_socket_not_the_queue(serve: Serve, client_ctx: ssl.SSLContext) -> None:
    """``when_written`` (what paces kept private messages and moves their read position) fires once
    the socket took every byte sent before it, on the loop, from whichever thread it was asked; a
    peer that does not read holds it back, and a connection that ends first never fires it."""
    size, chunks = 200_000, 3
    fired: list[tuple[str, int, str]] = []
    lost = threading.Event()

    class Flood(Handler):
        def connection_made(self, transport: Transport) -> None:
            # A small kernel buffer (no autotuning): most of what is queued stays queued until read.
            transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            for _ in range(chunks):
                transport.write(b"x" * size)

            def record(tag: str) -> None:
                fired.append((tag, transport.outbox_size, threading.current_thread().name))

            transport.when_written(record, "loop")
            threading.Thread(target=transport.when_written, args=(record, "thread")).start()

        def connection_lost(self, reason: str) -> None:
            lost.set()

    server = serve()
    server.routes.add("securechat-test-written/1", Flood)
    ctx = alpn_client(client_ctx, "securechat-test-written/1")

    def open_reader() -> ssl.SSLSocket:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        raw.settimeout(10)
        raw.connect((LOOPBACK, server.address[1]))
        return ctx.wrap_socket(raw, server_hostname="localhost")

    reader = open_reader()
    time.sleep(0.5)
    assert fired == []  # queued is not written
    got = 0
    while got < size * chunks:
        got += len(reader.recv(65536))
    assert wait_for(lambda: len(fired) == 2, 5), fired
    assert sorted(tag for tag, _, _ in fired) == ["loop", "thread"]
    assert all(left == 0 and thread.startswith("securechat-loop") for _, left, thread in fired), fired
    reader.close()

    fired.clear()
    lost.clear()
    quitter = open_reader()
    time.sleep(0.3)
    quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    quitter.close()  # a reset with most of it unwritten
    assert lost.wait(5)
    time.sleep(0.2)
    assert fired == []
