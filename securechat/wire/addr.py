"""Host and port as people type and read them: ``HOST``, ``HOST:PORT``, ``[V6ADDR]:PORT``.

One place decides how an address is split and printed, so the menu, ``connect`` and every message
agree, and an IPv6 address is always shown in brackets (``[::1]:5555``), never as an ambiguous
``::1:5555``.
"""

from __future__ import annotations

import ipaddress

# The seed's: '[SERVER] Waiting for connections on 0.0.0.0:5555'.
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 5555


class AddressError(ValueError):
    """Text that is not ``HOST``, ``HOST:PORT`` or ``[V6ADDR]:PORT``; ``str()`` says why."""


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AddressError(f"{whole!r}: the port after ':' must be a number from 1 to 65535")
    return int(text)


def split_host_port(text: str) -> tuple[str, int | None]:
    """``(host, port)`` from ``HOST``, ``HOST:PORT``, ``[V6]:PORT``, ``[V6]`` or a bare IPv6 address.

    The port is None when the text has none. Raises :class:`AddressError` for empty text, a bad
    port or an unclosed bracket.
    """
    text = text.strip()
    if not text:
        raise AddressError("the server's address is empty")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError(f"{text!r}: a '[' must be closed, as in [fe80::1]:5555")
        host, rest = text[1:close], text[close + 1:]
        if not host:
            raise AddressError(f"{text!r}: nothing between the brackets")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise AddressError(f"{text!r}: expected ':PORT' after ']'")
        return host, _port(rest[1:], text)
    if text.count(":") > 1:  # a bare IPv6 address: no port possible without brackets
        return text, None
    host, sep, port = text.partition(":")
    if not sep:
        return host, None
    if not host:
        raise AddressError(f"{text!r}: the host before ':' is missing")
    return host, _port(port, text)


def is_ipv6(host: str) -> bool:
    """True for an IPv6 address literal (with or without a ``%scope``)."""
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def host_text(host: str) -> str:
    """``host`` as it is written before ``:PORT``: IPv6 addresses bracketed."""
    return f"[{host}]" if is_ipv6(host) else host


def join(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host bracketed: ``[::1]:5555``."""
    return f"{host_text(host)}:{port}"


def unmap(host: str) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, from a dual-stack socket) as plain IPv4."""
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host
