"""This machine's host names and addresses, found without sending a packet.

The certificate authority names them in the server certificate; ``serve`` prints the ones clients can use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DNS_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def dns_name_or_none(name: str) -> str | None:
    """Canonical (lower case, no trailing dot) form of a host name, or None if it is not one."""
    name = name.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not name.isascii():
        return None
    labels = name.split(".")
    if not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # "10.1.2" is a botched address, not a name
        return None
    return name


def dedupe(items: Iterable[_T]) -> list[_T]:
    """Drop repeats, keep the first occurrence's position (SAN order is what users see)."""
    return list(dict.fromkeys(items))


def machine_names() -> list[str]:
    """This machine's host names for the server certificate.

    ``socket.gethostname()`` (may be a single label such as ``abc123``), ``<label>.local`` for mDNS,
    and the FQDN when it differs and is a plausible name (not ``localhost.localdomain``).
    """
    names: list[str] = []
    host = dns_name_or_none(socket.gethostname())
    if host and host != "localhost":
        names.append(host)
        first = host.split(".")[0]
        if "." not in host:
            names.append(f"{first}.local")  # what Avahi/Bonjour answer for; covered by the "local" suffix
    try:
        fqdn = dns_name_or_none(socket.getfqdn())  # /etc/hosts or the resolver: no connection to us
    except OSError:
        fqdn = None
    if (
        fqdn
        and "." in fqdn
        and fqdn not in names
        and not fqdn.endswith((".localdomain", ".localhost"))
        and not fqdn.startswith("localhost.")
    ):
        names.append(fqdn)
    return names


def _usable_address(addr: IPAddress) -> bool:
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
        return False
    # An IPv6 link-local address is useless in a certificate: clients must add a %scope to reach it.
    return not (addr.version == 6 and addr.is_link_local)


def parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0].split("/", 1)[0])
    except ValueError:
        return None


# if_inet6 flags (IFA_F_*) of addresses not worth a certificate entry: temporary (privacy) addresses
# rotate daily; dad-failed, deprecated and tentative ones are not (or no longer) usable.
_SKIP_INET6_FLAGS = 0x01 | 0x08 | 0x20 | 0x40


def _parse_fib_trie(text: str) -> list[IPAddress]:
    """Local IPv4 addresses in /proc/net/fib_trie: a ``|-- A.B.C.D`` line followed by ``/32 host LOCAL``."""
    found: list[IPAddress] = []
    for prev, line in itertools.pairwise(text.splitlines()):
        if line.strip() == "/32 host LOCAL" and "|--" in prev:
            addr = parse_ip(prev.split("|--", 1)[1].strip())
            if addr is not None:
                found.append(addr)
    return found


def _parse_if_inet6(text: str) -> list[IPAddress]:
    """IPv6 addresses in /proc/net/if_inet6 (hex address, index, prefix, scope, flags, interface)."""
    found: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            flags = int(fields[4], 16)
        except (IndexError, ValueError):
            continue
        if not flags & _SKIP_INET6_FLAGS:
            found.append(addr)
    return found


def _addresses_from_proc() -> list[IPAddress]:
    """Linux: read the kernel's own tables (files, no sockets)."""
    found: list[IPAddress] = []
    for path, parse in (("/proc/net/fib_trie", _parse_fib_trie), ("/proc/net/if_inet6", _parse_if_inet6)):
        with contextlib.suppress(OSError):
            found += parse(Path(path).read_text())
    return found


def _addresses_from_command() -> list[IPAddress]:
    """``ip -o addr`` (Linux without /proc) or ``ifconfig`` (BSD, macOS): both only read the kernel."""
    for cmd in (["ip", "-o", "addr", "show"], ["ifconfig", "-a"]):
        exe = shutil.which(cmd[0]) or (f"/sbin/{cmd[0]}" if os.path.exists(f"/sbin/{cmd[0]}") else None)
        if exe is None:
            continue
        try:
            out = subprocess.run(
                [exe, *cmd[1:]], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        tokens = out.split()
        found = [
            addr
            for key, value in itertools.pairwise(tokens)
            if key in ("inet", "inet6") and (addr := parse_ip(value)) is not None
        ]
        if found:
            return found
    return []


def _addresses_from_resolver() -> list[IPAddress]:
    """Last resort (Windows): what the host name resolves to, normally from the hosts file/NetBIOS."""
    found: list[IPAddress] = []
    with contextlib.suppress(OSError, UnicodeError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addr = parse_ip(str(info[4][0]))
            if addr is not None:
                found.append(addr)
    return found


def local_addresses() -> list[IPAddress]:
    """This machine's non-loopback addresses (IPv4 first), found without sending any packet.

    Never connects a socket anywhere (the "UDP connect to 8.8.8.8" trick would leak to the network and
    fails offline); reads the kernel's tables instead, falling back to resolving our own host name.
    """
    for source in (_addresses_from_proc, _addresses_from_command, _addresses_from_resolver):
        usable = [a for a in dedupe(source()) if _usable_address(a)]
        if usable:
            return sorted(usable, key=lambda a: a.version)  # stable: keeps kernel order within a family
    return []
