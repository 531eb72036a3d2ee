"""The ALPN protocols a TLS ClientHello offers, read from its cleartext bytes before the handshake, sans I/O.

A server picks its TLS context before OpenSSL sees the ClientHello, and the context decides whether the
server asks for a client certificate (a CertificateRequest in its first flight). securechat asks every
client for one when its CA is at hand (invited people chat under their certificate's name); a browser must
not be asked: Chrome on Android shows a certificate picker for it, and a WebSocket whose handshake meets a
CertificateRequest is cancelled outright. Browsers announce themselves in the ClientHello's ALPN extension
(``http/1.1``, ``h2``), in the clear, so the server reads that list first (RFC 8446 4.1.2, RFC 7301 3.1).

Nothing inside TLS is read: the route itself is still the ALPN protocol the handshake settles on. A
ClientHello that cannot be parsed is treated as offering nothing (the default context), never as an error.
"""

from __future__ import annotations

# TLS record content type "handshake" and handshake type "client_hello".
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_ALPN_EXTENSION = 16

# A ClientHello fits one TLS record (at most 2^14 bytes plus its 5-byte header); a browser's is about
# 2 KiB with a post-quantum key share. Past this, it is not worth waiting for.
MAX_HELLO_BYTES = 5 + 16384

# A server looks at an incomplete ClientHello again 2, 4 ... 512 ms later: about a second in all, well
# within a handshake deadline, for the second TCP segment of a browser's ClientHello a slow Wi-Fi delays.
HELLO_WAITS = 9


# What browsers offer for HTTPS; our own clients offer nothing, or names of our own (securechat-...).
BROWSER_ALPN = ("http/1.1", "h2")


def is_browser(offered: tuple[str, ...]) -> bool:
    """Whether a ClientHello offering ``offered`` is a browser's (HTTP, and nothing of securechat's own)."""
    return any(name in BROWSER_ALPN for name in offered) and not any(name.startswith("securechat") for name in offered)


def offered_alpn(data: bytes) -> tuple[str, ...] | None:
    """The ALPN names the ClientHello starting ``data`` offers; None while more bytes are needed.

    ``()`` for a ClientHello without the extension, and for anything that is not a well-formed
    ClientHello in its first record (the caller then uses its default context).
    """
    if len(data) < 5:
        return None
    if data[0] != _HANDSHAKE:
        return ()
    record_length = int.from_bytes(data[3:5], "big")
    if record_length < 4 or record_length > 16384:
        return ()
    if len(data) < 5 + record_length:
        return None
    body = data[5:5 + record_length]
    if body[0] != _CLIENT_HELLO:
        return ()
    hello_length = int.from_bytes(body[1:4], "big")
    if hello_length > len(body) - 4:  # split over several records: rare; not worth reassembling
        return ()
    try:
        return _alpn(memoryview(body)[4:4 + hello_length])
    except (IndexError, ValueError):
        return ()


def _alpn(hello: memoryview) -> tuple[str, ...]:
    at = 2 + 32  # legacy_version, random
    at += 1 + hello[at]  # legacy_session_id
    at += 2 + int.from_bytes(hello[at:at + 2], "big")  # cipher_suites
    at += 1 + hello[at]  # legacy_compression_methods
    if at + 2 > len(hello):
        return ()  # no extensions at all
    end = at + 2 + int.from_bytes(hello[at:at + 2], "big")
    if end > len(hello):
        raise ValueError("extensions overrun the ClientHello")
    at += 2
    while at + 4 <= end:
        kind = int.from_bytes(hello[at:at + 2], "big")
        size = int.from_bytes(hello[at + 2:at + 4], "big")
        at += 4
        if at + size > end:
            raise ValueError("an extension overruns the list")
        if kind == _ALPN_EXTENSION:
            return _names(hello[at:at + size])
        at += size
    return ()


def _names(ext: memoryview) -> tuple[str, ...]:
    total = int.from_bytes(ext[0:2], "big")
    if total + 2 > len(ext):
        raise ValueError("the ALPN list overruns its extension")
    names = []
    at = 2
    while at < 2 + total:
        size = ext[at]
        name = bytes(ext[at + 1:at + 1 + size])
        if not size or len(name) != size:
            raise ValueError("a malformed ALPN name")
        names.append(name.decode("ascii", "replace"))
        at += 1 + size
    return tuple(names)
