"""Abuse resistance, proven from outside over real sockets on 127.0.0.1 (issue 5).

Every test here talks to the server the way a hostile or broken peer would: garbage before and
after the TLS handshake, handshakes cut short, resets mid-line, TLS alerts, nick tricks, floods,
and thousands of connections, then checks that the server is still alive, still relays between
normal clients, and has given back every session, thread and descriptor it took.

Every loop is bounded both in iterations and in time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import random
import re
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from securechat import protocol
from securechat.server import ChatServer
from tests.conftest import LOOPBACK, LineClient

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]

GREETING = "* " + protocol.GREETING

# Lines a client may ever see from the server about other people: relayed chat/actions/privates
# behind "[nick]", or one of these notices. Anything else would be a forged or garbled line.
NOTICE_RE = re.compile(
    r"\* (?:[A-Za-z0-9_-]{1,24} joined"
    r"|[A-Za-z0-9_-]{1,24} left(?: \(.*\))?"
    r"|[A-Za-z0-9_-]{1,24} is now [A-Za-z0-9_-]{1,24}"
    r"|server shutting down)\Z"
)
RELAYED_RE = re.compile(r"\[[A-Za-z0-9_-]{1,24}(?: -> [A-Za-z0-9_-]{1,24})?\] ")


# -- helpers -------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return predicate()


def raw_connect(server: ChatServer | int, timeout: float = 5.0) -> socket.socket:
    port = server if isinstance(server, int) else server.address[1]
    return socket.create_connection((LOOPBACK, port), timeout=timeout)


def hard_reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a killed process or a middlebox might."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def client_hello(client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A real ClientHello from ``client_ctx``, produced without a socket (MemoryBIO)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing, outgoing.read()


def await_eof(socks: Iterable[socket.socket], timeout: float) -> tuple[list[socket.socket], dict[int, float]]:
    """Read every socket until the server ends it (EOF or reset) or ``timeout`` passes.

    Returns the sockets still open at the deadline and, per fileno, when (``time.monotonic()``)
    each one ended.
    """
    start = time.monotonic()
    sel = selectors.DefaultSelector()
    open_ = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        open_[s.fileno()] = s
    ended: dict[int, float] = {}
    deadline = start + timeout
    try:
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    for _ in range(64):  # bounded: the server owes us at most a short notice
                        if not s.recv(65536):
                            raise EOFError
                except (BlockingIOError, InterruptedError):
                    continue
                except (EOFError, OSError):
                    pass
                ended[s.fileno()] = time.monotonic()
                sel.unregister(s)
                del open_[s.fileno()]
    finally:
        sel.close()
    return list(open_.values()), ended


def assert_healthy(server: ChatServer, connect: Connect, tag: str = "") -> None:
    """The server still accepts, registers and relays between two normal clients."""
    a = connect(server, f"calm_a{tag}")
    b = connect(server, f"calm_b{tag}")
    a.expect(f"* calm_b{tag} joined", timeout=10)
    a.send("still alive?")
    assert b.expect("[calm_a") == f"[calm_a{tag}] still alive?"
    b.send("/quit")
    b.expect("* goodbye")
    a.send("/quit")
    a.expect("* goodbye")


def session_count_returns_to(server: ChatServer, n: int, timeout: float = 10.0) -> None:
    assert wait_for(lambda: server.client_count == n, timeout), f"client_count stuck at {server.client_count}"


def assert_clean_stream(lines: Iterable[str], own_nick: str | None = None) -> None:
    """Everything a bystander received is a relayed line or a genuine notice, with nothing unsafe."""
    for line in lines:
        assert protocol.is_safe(line), repr(line)
        assert "\x1b" not in line and "\x00" not in line, repr(line)
        if line.startswith("* "):
            assert NOTICE_RE.match(line), f"not a server notice: {line!r}"
        else:
            assert RELAYED_RE.match(line), f"not a relayed line: {line!r}"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def garbage(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# -- garbage before the handshake ----------------------------------------------------------------


@pytest.mark.slow
def test_random_bytes_before_the_handshake(serve: Serve, connect: Connect) -> None:
    """300 connections send random bytes instead of a ClientHello, some dressed up as TLS records."""
    server = serve(handshake_timeout=1.0)
    threads_before, fds_before = threading.active_count(), fd_count()
    rng = random.Random(5)
    n = 300
    for batch in range(0, n, 50):
        socks = []
        for i in range(batch, batch + 50):
            s = raw_connect(server)
            kind = i % 6
            if kind == 0:  # a TLS handshake record header with a huge length, then junk
                data = b"\x16\x03\x01\xff\xff" + garbage(rng, rng.randrange(1, 2000))
            elif kind == 1:  # 0x16 then anything
                data = b"\x16" + garbage(rng, rng.randrange(0, 3000))
            elif kind == 2:  # a plausible record header around a garbage "ClientHello"
                body = garbage(rng, rng.randrange(4, 500))
                data = b"\x16\x03\x01" + struct.pack("!H", len(body)) + b"\x01" + body[1:]
            else:  # anything at all, NULs and high bytes included
                first = rng.choice([0x00, 0x17, 0x15, 0x80, 0xFF, 0x41])
                data = bytes([first]) + garbage(rng, rng.randrange(0, 4000))
            try:
                s.sendall(data)
            except OSError:
                pass  # the server may refuse us already
            end = i % 3
            if end == 0:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # already reset by the server
            elif end == 1:
                hard_reset(s)
                continue
            socks.append(s)  # end == 2: stall; the handshake timeout must end it
        # Non-TLS openers get an explanation in clear text, then everybody is closed.
        still_open, _ = await_eof(socks, timeout=5.0)
        assert not still_open, f"{len(still_open)} garbage connections still open after 5 s"
        for s in socks:
            s.close()
    session_count_returns_to(server, 0)
    assert wait_for(lambda: threading.active_count() <= threads_before + 1, 10), threading.active_count()
    assert wait_for(lambda: fd_count() <= fds_before + 2, 5), (fd_count(), fds_before)
    assert_healthy(server, connect)


def test_non_tls_garbage_is_told_tls_is_required(serve: Serve) -> None:
    """A first byte that is not a TLS handshake record gets the clear-text explanation, then EOF."""
    server = serve()
    rng = random.Random(7)
    for first in (0x00, 0x15, 0x17, 0x47, 0x80, 0xFF):
        s = raw_connect(server)
        s.sendall(bytes([first]) + garbage(rng, 100).replace(b"\n", b""))
        s.shutdown(socket.SHUT_WR)
        got = b""
        for _ in range(32):
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        s.close()
        assert got.startswith(b"* " + protocol.TLS_REQUIRED.encode()), (first, got)


# -- half-finished handshakes, alerts, closes in the middle --------------------------------------


@pytest.mark.slow
def test_truncated_client_hello_then_stall_is_closed_by_the_handshake_timeout(
    serve: Serve, connect: Connect, client_ctx: ssl.SSLContext
) -> None:
    """300 connections send part of a real ClientHello and stall: each is closed after ~0.5 s."""
    server = serve(handshake_timeout=0.5)
    threads_before = threading.active_count()
    rng = random.Random(11)
    socks = []
    opened: dict[int, float] = {}
    started = time.monotonic()
    for _ in range(300):
        hello = client_hello(client_ctx)[3]
        s = raw_connect(server)
        opened[s.fileno()] = time.monotonic()
        s.sendall(hello[: rng.randrange(1, len(hello))])
        socks.append(s)
    still_open, ended = await_eof(socks, timeout=6.0)
    elapsed = time.monotonic() - started
    for s in socks:
        s.close()
    assert not still_open, f"{len(still_open)} stalled handshakes still open after {elapsed:.1f} s"
    lifetimes = [ended[fd] - opened[fd] for fd in ended]
    # Closed by the timeout, not by some other accident: nobody before the deadline ...
    assert min(lifetimes) >= 0.45, min(lifetimes)
    # ... and nobody long after it (generous: 300 threads time out at once on 2 cores).
    assert max(lifetimes) < 3.0, max(lifetimes)
    session_count_returns_to(server, 0)
    assert wait_for(lambda: threading.active_count() <= threads_before + 1, 10)
    assert_healthy(server, connect)


def test_trickled_client_hello_cannot_extend_the_handshake_deadline(
    serve: Serve, client_ctx: ssl.SSLContext
) -> None:
    """A slowloris sending its ClientHello a byte at a time is cut off at the overall deadline.

    A server that applied the timeout to each read instead of the whole handshake would keep these
    open as long as the bytes kept trickling.
    """
    server = serve(handshake_timeout=0.5)
    hello = client_hello(client_ctx)[3]
    socks = [raw_connect(server) for _ in range(5)]
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    for i in range(len(hello)):
        now = time.monotonic() - started
        if now > 3.0 or len(closed_at) == len(socks):
            break
        for s in socks:
            if id(s) in closed_at:
                continue
            try:
                s.sendall(hello[i : i + 1])
            except OSError:
                closed_at[id(s)] = now
        time.sleep(0.05)
    for s in socks:
        if id(s) not in closed_at:
            still, _ = await_eof([s], 0.01)
            if not still:
                closed_at[id(s)] = time.monotonic() - started
        s.close()
    assert len(closed_at) == len(socks), "a trickling handshake outlived the deadline"
    assert max(closed_at.values()) < 2.5


@pytest.mark.slow
def test_truncated_handshakes_closed_or_reset_are_cleaned_up(
    serve: Serve, connect: Connect, client_ctx: ssl.SSLContext
) -> None:
    server = serve(handshake_timeout=5)
    threads_before, fds_before = threading.active_count(), fd_count()
    rng = random.Random(13)
    for i in range(300):
        hello = client_hello(client_ctx)[3]
        s = raw_connect(server)
        try:
            s.sendall(hello[: rng.randrange(0, len(hello))])
        except OSError:
            pass
        if i % 2:
            hard_reset(s)
        else:
            s.close()
    # With a 5 s handshake timeout, only noticing the close (not the timeout) gets us back in time.
    assert wait_for(lambda: threading.active_count() <= threads_before + 1, 4), threading.active_count()
    assert wait_for(lambda: fd_count() <= fds_before + 2, 2), (fd_count(), fds_before)
    session_count_returns_to(server, 0)
    assert_healthy(server, connect)


def _alert(level: int, description: int) -> bytes:
    return b"\x15\x03\x03\x00\x02" + bytes([level, description])


def _abuse_tls(
    kind: int, port: int, client_ctx: ssl.SSLContext, tls12_ctx: ssl.SSLContext, rng: random.Random
) -> None:
    """One hostile TLS conversation; which one depends on ``kind``."""
    s = socket.create_connection((LOOPBACK, port), timeout=5)
    tls: ssl.SSLSocket | None = None
    try:
        if kind in (0, 1, 2, 3, 4):
            obj, incoming, outgoing, hello = client_hello(client_ctx)
            s.sendall(hello)
            if kind == 0:  # a fatal alert instead of anything else
                s.sendall(_alert(2, 40))  # handshake_failure
                s.shutdown(socket.SHUT_WR)
                s.recv(4096)
                return
            # Read the server's first flight, then misbehave in the middle of the handshake.
            flight = s.recv(65536)
            if kind == 1:
                s.close()
            elif kind == 2:
                hard_reset(s)
            elif kind == 3:  # answer with a fatal alert mid-handshake (decrypt_error, bad_certificate)
                s.sendall(_alert(2, rng.choice([42, 51, 80])))
                s.recv(4096)
            else:  # feed the flight back, then send garbage where the Finished should be
                incoming.write(flight)
                try:
                    obj.do_handshake()
                except ssl.SSLError:
                    pass
                s.sendall(b"\x17\x03\x03\x00\x20" + rng.randbytes(32))
                s.recv(4096)
            return
        if kind == 5:  # an old client the TLS 1.3-only server refuses with an alert
            tls = tls12_ctx.wrap_socket(s, server_hostname="localhost", do_handshake_on_connect=False)
            tls.do_handshake()
            return
        tls = client_ctx.wrap_socket(s, server_hostname="localhost")
        tls.recv(4096)  # the greeting
        if kind == 6:  # complete handshake, then a forged application-data record on the raw socket
            raw = socket.socket(fileno=os.dup(tls.fileno()))
            raw.sendall(b"\x17\x03\x03\x00\x40" + rng.randbytes(64))
            raw.close()
            try:
                tls.recv(4096)
            except (ssl.SSLError, OSError):
                pass
        elif kind == 7:  # half a nick, then close_notify in the middle of the line
            tls.sendall(b"mid_line_")
            try:
                tls.unwrap().close()
            except (ssl.SSLError, OSError):
                pass
        elif kind == 8:  # a plaintext fatal alert after the handshake
            raw = socket.socket(fileno=os.dup(tls.fileno()))
            raw.sendall(_alert(2, 10))
            raw.close()
        else:  # plain TCP close without close_notify, half-way through a line
            tls.sendall(b"half a lin")
            tls.shutdown(socket.SHUT_RDWR)
    except (ssl.SSLError, OSError):
        pass  # the server is allowed (expected) to cut us off at any point
    finally:
        if tls is not None:
            tls.close()
        s.close()


@pytest.mark.slow
def test_tls_alerts_and_closes_in_the_middle(serve: Serve, connect: Connect, client_ctx: ssl.SSLContext,
                                             cert_files: dict[str, Path]) -> None:
    """Several hundred alerts, resets and closes at every point of the TLS conversation."""
    server = serve(handshake_timeout=2.0)
    threads_before, fds_before = threading.active_count(), fd_count()
    tls12 = ssl.create_default_context(cafile=str(cert_files["ca"]))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    port = server.address[1]
    n = 400

    def one(i: int) -> None:
        _abuse_tls(i % 10, port, client_ctx, tls12, random.Random(i))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n), timeout=40))
    session_count_returns_to(server, 0)
    assert wait_for(lambda: threading.active_count() <= threads_before + 1, 10), threading.active_count()
    assert wait_for(lambda: fd_count() <= fds_before + 2, 5), (fd_count(), fds_before)
    assert_healthy(server, connect)
