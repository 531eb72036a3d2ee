"""Finding securechat servers on the LAN: a DNS-SD browse for ``_securechat._tcp`` over multicast DNS.

:func:`browse` asks the network for a couple of seconds and returns what answered, read through
:mod:`securechat.wire.dnssd`. It is a hint and nothing more: the connection that follows verifies the
server exactly as if its address had been typed (TLS with the CA, a pin, known_hosts, the invite code).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass
from typing import Any

from securechat.wire import addr, dnssd
from securechat.wire.conn import describe_error

# How long a search listens: zeroconf asks at once and again after a second; an mDNS responder
# answers a shared question within 20-120 ms (RFC 6762 section 6), so two seconds is ample on a LAN.
BROWSE_SECONDS = 2.0
# Servers kept from one search: a LAN with more chat servers than this is someone flooding it.
MAX_SERVERS = 64
# After the listening window, how long records still missing (SRV, TXT, A) may take to arrive.
RESOLVE_SECONDS = 1.0


class DiscoveryError(Exception):
    """The search could not be made (switched off, no zeroconf, no network); ``str()`` says why."""


@dataclass(frozen=True)
class Found:
    """One server that answered: its announced name (sanitised), where to reach it, and its TXT."""

    name: str
    host: str
    port: int
    txt: dnssd.Txt

    @property
    def where(self) -> str:
        """``10.0.0.5:5555`` or ``[fd00::5]:5555``: what ``connect`` takes."""
        return addr.join(self.host, self.port)


def _usable(text: str) -> bool:
    """An announced address worth connecting to: not loopback, unspecified or multicast (a LAN
    server never announces those; a hostile announcement might, to send us somewhere odd)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast)


def _found(info: Any) -> Found | None:
    """A resolved zeroconf ServiceInfo as a :class:`Found`, or None if it cannot be used."""
    port = info.port
    hosts = [a for a in info.parsed_addresses() if _usable(a)]  # IPv4 first, as zeroconf orders them
    if not hosts or not isinstance(port, int) or not 0 < port < 65536:
        return None
    return Found(dnssd.display_name(info.name), hosts[0], port, dnssd.parse_txt(info.properties or {}))


def browse(timeout: float = BROWSE_SECONDS) -> list[Found]:
    """The securechat servers that answered within ``timeout`` seconds, sorted by name and address.

    A server that said goodbye during the search is left out. Raises DiscoveryError when no search
    could be made at all; a search that found nothing returns an empty list.
    """
    if not dnssd.enabled():
        raise DiscoveryError(f"searching the network is switched off ({dnssd.ENV_SWITCH}=off)")
    try:
        zeroconf = dnssd.import_zeroconf()
    except dnssd.DiscoveryUnavailable as exc:
        raise DiscoveryError(str(exc)) from None
    interfaces = dnssd.lan_ipv4()
    if not interfaces:
        raise DiscoveryError("this machine has no network address (IPv4) to search from")
    names: dict[str, None] = {}  # insertion-ordered set of service names, bounded
    lock = threading.Lock()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        with lock:
            if state_change.name == "Removed":
                names.pop(name, None)
            elif len(names) < MAX_SERVERS:
                names[name] = None

    with dnssd.FirstProblem() as problem:
        try:
            zc = zeroconf.Zeroconf(interfaces=interfaces, ip_version=zeroconf.IPVersion.V4Only)
        except OSError as exc:
            raise DiscoveryError(f"cannot open a multicast socket ({describe_error(exc)})") from None
        try:
            # QM questions (answers multicast), not zeroconf's QU first: a unicast answer goes to ONE of
            # the sockets sharing port 5353 on this machine (Avahi's, another securechat's), maybe not ours.
            browser = zeroconf.ServiceBrowser(zc, dnssd.SERVICE_TYPE, handlers=[on_change],
                                              question_type=zeroconf.DNSQuestionType.QM)
            time.sleep(timeout)
            browser.cancel()
            with lock:
                listed = list(names)
            found = _resolve(zeroconf, zc, listed)
        finally:
            zc.close()
    if not found and problem.first is not None:
        raise DiscoveryError(f"cannot search the network: {problem.first}")
    return sorted(found, key=lambda f: (f.name.lower(), f.where))


def _resolve(zeroconf: Any, zc: Any, names: list[str]) -> list[Found]:
    """Each name's records, from what arrived with the answers (the usual case) or asked for, all
    within :data:`RESOLVE_SECONDS`."""
    deadline = time.monotonic() + RESOLVE_SECONDS
    found: list[Found] = []
    for name in names:
        info = zeroconf.ServiceInfo(dnssd.SERVICE_TYPE, name)
        left = deadline - time.monotonic()
        if not info.load_from_cache(zc) and (left <= 0 or not info.request(
                zc, int(left * 1000), question_type=zeroconf.DNSQuestionType.QM)):
            continue
        entry = _found(info)
        if entry is not None:
            found.append(entry)
    return found
