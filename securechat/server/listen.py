"""Where ``securechat serve`` listens, and what it tells the operator to give the clients.

``--listen`` takes an address of this machine (``serve --host`` is its older spelling). Without it
the server listens on every interface, IPv6 and IPv4 on one dual-stack socket where the OS allows
it. At start the server prints the seed's ``Waiting for connections on 0.0.0.0:5555`` line, then the
addresses clients can actually use (this machine's LAN addresses that the certificate covers) and
the exact ``securechat connect`` line to hand them.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from cryptography import x509

from securechat.wire import addr, netinfo
from securechat.wire.addr import DEFAULT_PORT

ANY_IPV4 = "0.0.0.0"
ANY_IPV6 = "::"


class ListenError(ValueError):
    """A ``--listen`` value that cannot be an address of this machine; ``str()`` says why."""


def check_listen(text: str) -> str:
    """The address to bind for ``--listen TEXT``; ListenError for a name that is not this machine's.

    Names are not resolved (a DNS query is no way to find our own addresses): ``localhost`` and this
    machine's host name are accepted, any other name is explained as the certificate-name mix-up it
    usually is.
    """
    text = text.strip().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0])) + (
            "%" + text.split("%", 1)[1] if "%" in text else "")
    except ValueError:
        pass
    if text.lower() in ("localhost", socket.gethostname().lower()):
        return text
    raise ListenError(
        f"--listen {text}: {text!r} is not an address of this machine. --listen (formerly serve --host) "
        "takes one of this machine's IP addresses, such as 192.168.0.20 or ::1, to listen on only that one; "
        "leave it out to listen on all of them. To put a name in the server's certificate, use "
        f"'securechat gen-certs --host {text}'")


def plan(listen: str | None) -> tuple[str, bool]:
    """(address to bind, dual stack) for ``--listen`` (None: every interface, both families if possible)."""
    if listen is not None:
        return check_listen(listen), False
    if socket.has_ipv6 and socket.has_dualstack_ipv6():
        return ANY_IPV6, True
    return ANY_IPV4, False


def banner(host: str, port: int, dual: bool) -> list[str]:
    """The "Waiting for connections" lines; the seed's line first and word for word."""
    if dual and host == ANY_IPV6:
        return [f"[SERVER] Waiting for connections on {ANY_IPV4}:{port}",
                f"[SERVER] Waiting for connections on [{ANY_IPV6}]:{port} too (IPv6)"]
    return [f"[SERVER] Waiting for connections on {addr.join(host, port)}"]


def certificate_ips(cert: Path) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP addresses a PEM server certificate is valid for (its first certificate's SAN)."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return list(san.get_values_for_type(x509.IPAddress))  # type: ignore[arg-type]


def reachable(host: str, dual: bool, cert: Path | None) -> tuple[list[str], list[str]]:
    """(this machine's LAN addresses, loopback addresses) clients can use to reach a server listening on
    ``host``: with TLS (``cert``) only those the certificate covers, since clients refuse the others."""
    if host in (ANY_IPV4, ANY_IPV6):
        candidates = [a for a in netinfo.local_addresses() if dual or host == ANY_IPV4 and a.version == 4
                      or host == ANY_IPV6 and a.version == 6]
        loopback = ["127.0.0.1", "::1"] if dual else (["127.0.0.1"] if host == ANY_IPV4 else ["::1"])
    else:
        bound = ipaddress.ip_address(host.split("%", 1)[0]) if addr.is_ipv6(host) or "." in host else None
        candidates = [bound] if bound is not None and not bound.is_loopback else []
        loopback = [host] if bound is None or bound.is_loopback else []
    covered = certificate_ips(cert) if cert is not None else None
    if covered is not None:
        candidates = [a for a in candidates if a in covered]
        loopback = [h for h in loopback if ipaddress.ip_address(h) in covered or h == "localhost"]
    return [str(a) for a in candidates], loopback


def connect_hint(host: str, port: int, dual: bool, *, cert: Path | None, mutual: bool = False) -> list[str]:
    """Lines telling the operator which addresses clients can use, and the command to give them.

    ``cert`` is the server certificate (None with ``--plain``): with TLS only the addresses it
    covers work, so only those are offered.
    """
    candidates, loopback = reachable(host, dual, cert)
    covered = cert is not None
    port_part = "" if port == DEFAULT_PORT else f":{port}"
    trust = "--plain" if cert is None else "--ca ca.pem"
    if mutual:
        trust += " --cert client-NAME.pem --key client-NAME.key"
    lines = []
    if candidates:
        first = addr.host_text(candidates[0])
        lines.append(f"[SERVER] Clients on the network connect with: securechat connect {first}{port_part} {trust}")
        others = [addr.host_text(a) for a in candidates[1:]]
        if others:
            lines.append(f"[SERVER] Other addresses of this machine they can use: {', '.join(others)}")
    elif loopback:
        first = addr.host_text(loopback[0])
        why = ("no LAN address of this machine is in the certificate (re-issue it with 'securechat gen-certs "
               "--ip ADDR')" if covered and host in (ANY_IPV4, ANY_IPV6) else
               "listening on this machine only")
        lines.append(f"[SERVER] Only this machine can connect ({why}): securechat connect {first}{port_part} {trust}")
    if candidates and loopback:
        lines.append(f"[SERVER] On this machine: {', '.join(addr.host_text(h) for h in loopback)}")
    return lines


def browser_hint(host: str, port: int, dual: bool, *, cert: Path, mutual: bool = False) -> list[str]:
    """The browsers' address (the chat page, HTTPS) and the onboarding page's (plain HTTP, the same port)."""
    candidates, loopback = reachable(host, dual, cert)
    where = candidates[0] if candidates else loopback[0] if loopback else None
    if where is None:
        return []
    hostport = addr.join(where, port)
    how = "browsers join with a link from 'securechat invite NAME --web'; " if mutual else ""
    return [f"[SERVER] Browsers: https://{hostport}/",
            f"[SERVER] First time on a phone or computer: {how}http://{hostport}/ offers the CA certificate "
            "('securechat invite --qr' shows that address as a QR code)"]
