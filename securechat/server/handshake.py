"""What a server connection does before it has a protocol: the first byte, the TLS handshake, memory after.

The steps themselves run in :class:`securechat.server.transport.Transport`, non-blocking on the
connection's loop thread, under one deadline for the whole opening (``--handshake-timeout``): the
first byte decides TLS (a handshake record) or plaintext; a TLS handshake is driven by
``do_handshake()`` on ``SSLWantReadError``/``SSLWantWriteError``; the ALPN it settles picks the
handler (:mod:`securechat.server.routes`). A client that connects and never speaks costs a
descriptor, a small object and a timer entry until its deadline, never a thread, and delays nobody.

Here: the constants of that opening, and the memory housekeeping a burst of handshakes calls for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

# TLS records start with content type 22 (handshake); anything else is not a TLS client.
TLS_HANDSHAKE_RECORD = 0x16

# After a burst of handshakes, hand freed memory back to the system at most this often.
TRIM_INTERVAL = 1.0


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or a no-op elsewhere.

    A handshake allocates tens of KiB that it frees at the end, interleaved with the ~14 KiB an
    established connection keeps; after a connection storm glibc holds on to the holes (about
    2.6 KiB a connection at 3000 connections, measured with mallinfo2). Trimming returns whole
    free pages without moving anything.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class Trimmer:
    """Trims the heap once handshakes have happened and the loop has a moment (at most once a second).

    Registered with ``Loop.when_idle``; a finished handshake calls :meth:`owe`.
    """

    __slots__ = ("owed", "last", "_trim")

    def __init__(self) -> None:
        self.owed = 0
        self.last = 0.0
        self._trim = _malloc_trim()

    def owe(self) -> None:
        self.owed += 1

    def __call__(self) -> None:
        if self.owed:
            now = time.monotonic()
            if now - self.last >= TRIM_INTERVAL:
                self._trim()
                self.owed = 0
                self.last = now
