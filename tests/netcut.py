"""A network cut between servers and Redis, on loopback: a TCP relay whose link can be cut and healed.

``CutRelay(upstream_port)`` listens on a free loopback port and relays every connection to
``upstream_port``. ``cut()`` stops the bytes the way a pulled cable or a dead switch does, without a
reset or a close: the relay stops passing anything (``replies_only=True``: requests still reach Redis
and are carried out, but no answer comes back, the hardest case for exactly once), and new connections
are accepted but get nothing. ``heal()`` resets the connections that were cut (as a firewall that lost
their state does) and relays new ones again. One thread, ``selectors``; stdlib only.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

LOOPBACK = "127.0.0.1"

# Bytes moved per read: a Redis batch is a few hundred KiB at most.
CHUNK = 65536


class CutRelay:
    """A TCP relay on loopback that can be cut and healed (see the module's docstring)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = (LOOPBACK, upstream_port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}  # each side -> the other
        self._upstream_side: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut: str | None = None  # None, "both" or "replies"
        self._orders: list[tuple[str, threading.Event]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cut-relay", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def cut(self, *, replies_only: bool = False) -> None:
        """From now on nothing passes (or only requests, with ``replies_only``)."""
        self._order("replies" if replies_only else "both")

    def heal(self) -> None:
        """Reset every connection that lived through the cut, and relay again."""
        self._order("heal")

    def _order(self, what: str) -> None:
        """Have the relay's thread (the only one touching the selector) carry out ``what``; wait for it."""
        done = threading.Event()
        with self._lock:
            self._orders.append((what, done))
        if not done.wait(5):
            raise RuntimeError(f"the relay did not {what}")

    def close(self) -> None:
        """Stop relaying and close everything."""
        self._stop = True
        self._thread.join(5)
        for sock in list(self._peers):
            self._drop(sock, reset=False)
        self._listener.close()
        self._selector.close()

    def _drop(self, sock: socket.socket, *, reset: bool) -> None:
        with self._lock:
            other = self._peers.pop(sock, None)
            pair = [sock] + ([other] if other is not None else [])
            for side in pair:
                self._peers.pop(side, None)
                self._upstream_side.discard(side)
        for side in pair:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(side)
            if reset:  # RST instead of FIN: what a firewall that forgot the connection sends
                side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            side.close()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                orders, self._orders = self._orders, []
            for what, done in orders:
                self._carry_out(what)
                done.set()
            for key, _ in self._selector.select(0.02):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._relay(sock)

    def _carry_out(self, what: str) -> None:
        with self._lock:
            peers = list(self._peers)
            was = self._cut
            self._cut = None if what == "heal" else what
        if what == "heal":
            for sock in peers:
                if sock in self._peers:
                    self._drop(sock, reset=True)
        elif what == "both" and was != "both":  # out of the selector: nothing moves, nothing spins
            for sock in peers:
                self._selector.unregister(sock)
        elif what == "replies" and was == "both":
            for sock in peers:
                self._selector.register(sock, selectors.EVENT_READ)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        for side in (client, upstream):
            side.setblocking(False)
        with self._lock:
            self._peers[client], self._peers[upstream] = upstream, client
            self._upstream_side.add(upstream)
            silent = self._cut == "both"
        if not silent:
            self._selector.register(client, selectors.EVENT_READ)
            self._selector.register(upstream, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        with self._lock:
            other = self._peers.get(sock)
            cut = self._cut
            from_upstream = sock in self._upstream_side
        if other is None or cut == "both":
            return  # the bytes wait in the kernel, as behind a dead link
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock, reset=False)
            return
        if cut == "replies" and from_upstream:
            return  # carried out by Redis, never answered
        try:
            other.setblocking(True)
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._drop(sock, reset=False)
