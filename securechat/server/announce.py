"""Announcing a running server on its LAN with DNS-SD over multicast DNS, so clients can find it.

``securechat serve`` registers one instance of ``_securechat._tcp`` (:mod:`securechat.wire.dnssd`)
on the IPv4 interfaces it listens on, never on loopback, and withdraws it when it stops: zeroconf
sends the goodbye packets (TTL 0) that make Avahi, Bonjour and ``securechat servers`` drop it at
once. Like Avahi, the instance is named after the host (``alice-laptop``); a second server with
the same name on the LAN gets ``alice-laptop-2`` (zeroconf probes for conflicts first). Records
keep zeroconf's TTLs, the ones RFC 6762 recommends: 120 s for the address and SRV records, 75
minutes for PTR and TXT. A server killed without a goodbye therefore lingers in long-running
browsers' caches until those expire; ``securechat servers`` asks afresh each time, so it only
lists servers that answer.

Announcing is best effort: no zeroconf package, no multicast route, a socket that cannot be opened
or a packet that cannot be sent is ONE warning line, and the server serves on.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securechat.server import listen
from securechat.wire import console, dnssd, netinfo
from securechat.wire.conn import describe_error

log = logging.getLogger("securechat.server")

# How long stop() waits for a registration still under way: zeroconf waits up to 250 ms, sends three
# probes 250 ms apart and then announces, about 1.7 s in all; more means its loop is stuck.
REGISTER_WAIT = 5.0


@dataclass(frozen=True)
class Plan:
    """What to announce: the instance name, the addresses and port clients use, the TXT record, and
    the IPv4 addresses of the interfaces to announce on."""

    name: str
    port: int
    addresses: tuple[str, ...]
    interfaces: tuple[str, ...]
    txt: dnssd.Txt


def plan(host: str, port: int, *, dual: bool, cert: Path | None, txt: dnssd.Txt,
         lan: list[netinfo.IPAddress] | None = None, hostname: str | None = None) -> Plan | None:
    """The announcement for a server bound to ``host`` (as the socket reports it), or None.

    None when it listens on loopback only, or when this machine has no LAN address to announce.
    ``lan`` (this machine's non-loopback addresses) and ``hostname`` replace what the machine says
    (tests). With TLS, only the addresses the certificate covers are announced when there are any:
    a client connecting by another address would be refused by the host name check.
    """
    bound = ipaddress.ip_address(host.split("%", 1)[0])
    if bound.is_loopback:
        return None
    lan = netinfo.local_addresses() if lan is None else lan
    if bound.is_unspecified:
        candidates = [a for a in lan if dual or a.version == bound.version]
    else:
        candidates = [bound]
    covered = listen.certificate_ips(cert) if cert is not None else []
    if any(a in covered for a in candidates):
        candidates = [a for a in candidates if a in covered]
    # mDNS goes out over IPv4 (224.0.0.251) on the interfaces of the bound address, or all of them;
    # IPv6 addresses are announced (AAAA) over those same interfaces.
    interfaces = [str(bound)] if bound.version == 4 and not bound.is_unspecified else \
        [str(a) for a in lan if a.version == 4]
    if not candidates or not interfaces:
        return None
    name = dnssd.instance_name(socket.gethostname() if hostname is None else hostname)
    return Plan(name, port, tuple(str(a) for a in candidates), tuple(interfaces), txt)


class Announcer:
    """Registers a :class:`Plan` from a thread of its own (probing takes ~2 s; the server does not
    wait for it) and withdraws it in :meth:`stop`. Every failure is one warning, once."""

    def __init__(self, what: Plan) -> None:
        self.plan = what
        self.announced_as: str | None = None  # the instance name registered (zeroconf may rename it)
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._zc: Any = None
        self._stopping = False
        self._catch = dnssd.FirstProblem(self._tell)
        self._thread = threading.Thread(target=self._register, name="securechat-announce", daemon=True)

    def start(self) -> None:
        self._catch.__enter__()
        self._thread.start()

    def _tell(self, problem: str) -> None:
        with self._lock:
            if self.problem is not None:
                return
            self.problem = problem
        log.warning("cannot announce this server on the LAN (mDNS): %s; clients must be given its address "
                    "(--no-announce stays silent)", problem)

    def _register(self) -> None:
        try:
            zeroconf = dnssd.import_zeroconf()
            zc = zeroconf.Zeroconf(interfaces=list(self.plan.interfaces), ip_version=zeroconf.IPVersion.V4Only)
            with self._lock:
                if self._stopping:
                    zc.close()
                    return
                self._zc = zc
            info = zeroconf.ServiceInfo(
                dnssd.SERVICE_TYPE, f"{self.plan.name}.{dnssd.SERVICE_TYPE}", port=self.plan.port,
                properties=self.plan.txt.encode(), server=f"{self.plan.name}.local.",
                parsed_addresses=list(self.plan.addresses))
            zc.register_service(info, allow_name_change=True)
        except dnssd.DiscoveryUnavailable as exc:
            self._tell(str(exc))
            return
        except OSError as exc:
            self._tell(f"cannot open a multicast socket on {', '.join(self.plan.interfaces)} ({describe_error(exc)})")
            return
        except Exception as exc:  # zeroconf's own errors (EventLoopBlocked, ...): never the server's end
            self._tell(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        self.announced_as = dnssd.display_name(info.name)
        console.announce(f"[SERVER] Announced on the LAN as '{self.announced_as}' (DNS-SD {dnssd.SERVICE}; "
                         "'securechat servers' lists it; --no-announce to stay silent)")

    def stop(self) -> None:
        """Withdraw the announcement (goodbye packets) and close the multicast sockets."""
        with self._lock:
            self._stopping = True
        self._thread.join(REGISTER_WAIT)
        with self._lock:
            zc, self._zc = self._zc, None
        try:
            if zc is not None:
                zc.close()  # unregisters first: three goodbye packets, 125 ms apart
        except Exception as exc:  # a stuck loop: the records expire on their own (TTL)
            log.info("mDNS goodbye not sent: %s", exc)
        finally:
            self._catch.__exit__(None, None, None)


def start(host: str, port: int, *, dual: bool, cert: Path | None, txt: dnssd.Txt) -> Announcer | None:
    """Announce the server bound at ``host:port``; None when nothing is to be announced.

    Nothing is announced when the environment switches discovery off (:func:`dnssd.enabled`), or
    when the server listens on loopback only.
    """
    if not dnssd.enabled():
        return None
    what = plan(host, port, dual=dual, cert=cert, txt=txt)
    if what is None:
        if not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            log.info("not announcing this server on the LAN: this machine has no LAN address")
        return None
    announcer = Announcer(what)
    announcer.start()
    return announcer
