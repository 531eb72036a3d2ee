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
from collections.abc import Callable
from typing import Any, Protocol

# TLS records start with content type 22 (handshake); anything else is not a TLS client.
TLS_HANDSHAKE_RECORD = 0x16

# After a burst of handshakes, hand freed memory back to the system at most this often.
TRIM_INTERVAL = 1.0


class Later(Protocol):
    """A loop's timer heap (:meth:`securechat.server.loop.Loop.call_later`)."""

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Any: ...


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
    """Trims the heap a moment after handshakes, at most once every :data:`TRIM_INTERVAL` per loop.

    A finished handshake calls :meth:`owe` (on its loop thread); the trim runs from the loop's timer
    heap, so it also happens after the last handshake of a burst, when the loop may sleep for hours.
    """

    __slots__ = ("loop", "armed", "_trim")

    def __init__(self, loop: Later) -> None:
        self.loop = loop
        self.armed = False
        self._trim = _malloc_trim()

    def owe(self) -> None:
        if not self.armed:
            self.armed = True
            self.loop.call_later(TRIM_INTERVAL, self._run)

    def _run(self) -> None:
        self.armed = False
        self._trim()
