"""A TCP relay on 127.0.0.1 that a test cuts, as a Wi-Fi outage or a phone's sleep does (both ends see
their connection end); the catch-up tests and the browser tests resume through it."""

from __future__ import annotations

import socket
import threading

from tests.conftest import LOOPBACK


class Relay:
    """A TCP relay on 127.0.0.1: every connection to it is piped to ``target``. :meth:`cut` drops them all
    (and refuses new ones) until :meth:`restore`, as a Wi-Fi outage would."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                a.close()  # like a network that is down: nothing gets through
                continue
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                a.close()
                continue
            b.settimeout(None)  # the timeout was for connecting: an idle chat is no reason to cut
            with self.lock:
                self.pairs.append((a, b))
            done: list[int] = []
            threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, done), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: list[int]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        done.append(1)
        if len(done) == 2:  # the pair's last pump closes it: no thread ever uses a closed descriptor
            src.close()
            dst.close()

    def cut(self) -> None:
        """Drop every relayed connection (both ends see it end) and refuse new ones."""
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.stopped = True
        self.cut()
        self.listener.close()
