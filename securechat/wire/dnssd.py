"""What the server's DNS-SD announcement says and how both ends read it: service type, TXT keys, switches.

A ``securechat serve`` on the LAN announces itself as an instance of :data:`SERVICE_TYPE` over
multicast DNS (RFC 6762/6763, what Avahi and Bonjour speak), with a TXT record of the keys below.
Everything in an announcement is a hint: anyone on the LAN can announce anything, so the client
still verifies the server by TLS, a pin, known_hosts or the invite code, never by what was announced.

The ``zeroconf`` package (python-zeroconf) does the multicast; it is imported only when discovery is
used (:func:`import_zeroconf`), and its own log lines are caught (:class:`FirstProblem`) so that a
broken multicast route costs one line of ours, never a traceback or a failed start.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

from securechat.wire import netinfo, protocol

# The service type (RFC 6763 section 7: "_" + at most 15 characters, then the transport); the
# securechat chat port speaks TLS (or, with --plain, plain) line text over TCP.
SERVICE = "_securechat._tcp"
SERVICE_TYPE = SERVICE + ".local."

# Set to "off" (or 0, no, false) to switch every announcement and every search off, whatever the
# command line says: for machines where multicast must never leave (CI, the test suite).
ENV_SWITCH = "SECURECHAT_DISCOVERY"
_OFF = frozenset({"off", "0", "no", "false"})

# TXT keys (RFC 6763 section 6: short, lower case). "txtvers" first, as the RFC suggests.
TXTVERS = "txtvers"
PROTO = "proto"  # the chat protocol version the server speaks (securechat.wire.protocol.PROTOCOL_VERSION)
TLS = "tls"  # "1" TLS, "0" --plain
CA = "ca"  # SHA-256 fingerprint of the certificate to pin (the CA's), 64 hex digits, no colons
MUTUAL = "mtls"  # "1": only clients with a certificate from the CA may chat (--require-client-cert)
INVITES = "invites"  # "1": the server takes invite codes ('securechat join CODE' can use it)
TXT_VERSION = "1"

# An instance name is one DNS label: at most 63 bytes (RFC 6763 section 4.1.1).
MAX_NAME_BYTES = 63
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}\Z")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """False when :data:`ENV_SWITCH` turns discovery off for this process and its children."""
    value = (os.environ if environ is None else environ).get(ENV_SWITCH, "")
    return value.strip().lower() not in _OFF


class DiscoveryUnavailable(Exception):
    """Discovery cannot run here (the zeroconf package is missing or broken); ``str()`` says why."""


def import_zeroconf() -> ModuleType:
    """The ``zeroconf`` module, or DiscoveryUnavailable saying how to get it."""
    try:
        import zeroconf
    except ImportError as exc:
        raise DiscoveryUnavailable(f"the zeroconf package is not installed ({exc}): pip install zeroconf") from None
    except Exception as exc:  # a broken install (a compiled part for another Python): not our crash
        raise DiscoveryUnavailable(f"the zeroconf package cannot be loaded ({exc})") from None
    return zeroconf


@dataclass(frozen=True)
class Txt:
    """What a server's TXT record says about it (hints, checked by nobody but the connection)."""

    tls: bool = True
    ca: str | None = None  # "AA:BB:...", as tls.fingerprint() prints it
    mutual: bool = False
    invites: bool = False
    proto: int | None = None

    def encode(self) -> dict[str, str]:
        """The TXT record, key -> value."""
        txt = {TXTVERS: TXT_VERSION, PROTO: str(protocol.PROTOCOL_VERSION), TLS: _flag(self.tls)}
        if self.ca is not None:
            txt[CA] = self.ca.replace(":", "")
        txt[MUTUAL] = _flag(self.mutual)
        txt[INVITES] = _flag(self.invites)
        return txt


def _flag(value: bool) -> str:
    return "1" if value else "0"


def parse_txt(properties: Mapping[bytes, bytes | None]) -> Txt:
    """Read a TXT record as zeroconf hands it over; whatever is malformed reads as absent.

    Untrusted: a value that is not exactly what we write (a 64-digit fingerprint, "0"/"1", a small
    number) is ignored rather than shown or used.
    """
    def text(key: str) -> str | None:
        raw = properties.get(key.encode("ascii"))
        if raw is None or len(raw) > 64:
            return None
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None

    ca = text(CA)
    proto = text(PROTO)
    return Txt(tls=text(TLS) != "0", ca=format_hex(ca) if ca is not None and _HEX64.match(ca) else None,
               mutual=text(MUTUAL) == "1", invites=text(INVITES) == "1",
               proto=int(proto) if proto is not None and proto.isdigit() and len(proto) <= 4 else None)


def format_hex(digits: str) -> str:
    """``aabb...`` -> ``AA:BB:...`` (the form the server's fingerprint lines use)."""
    digits = digits.upper()
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def short_fingerprint(fingerprint: str) -> str:
    """``29:A6:4C:11:...:07:3D``: the first four and last two bytes, to recognise, not to verify."""
    parts = fingerprint.split(":")
    return fingerprint if len(parts) <= 6 else ":".join([*parts[:4], "...", *parts[-2:]])


def display_name(service_name: str) -> str:
    """The instance part of ``NAME._securechat._tcp.local.``, safe to print (untrusted text)."""
    instance = service_name[:-len(SERVICE_TYPE) - 1] if service_name.endswith("." + SERVICE_TYPE) else service_name
    instance = instance.replace("\\.", ".")  # zeroconf keeps the DNS escape of a dot inside the label
    clean = protocol.sanitize(instance).strip()
    return (clean[:MAX_NAME_BYTES] or "?")


def instance_name(hostname: str) -> str:
    """This machine's announcement name: its host name's first label, as Avahi names a host's services."""
    name = netinfo.dns_name_or_none(hostname)
    label = name.split(".")[0] if name else "securechat"
    return label[:MAX_NAME_BYTES]


def lan_ipv4() -> list[str]:
    """This machine's IPv4 addresses that are not loopback: the interfaces multicast DNS may use.

    Never 127.0.0.1: nothing is announced to, or searched on, the loopback interface.
    """
    return [str(a) for a in netinfo.local_addresses() if a.version == 4]


class FirstProblem(logging.Handler):
    """Catches python-zeroconf's log records while installed, reporting only the first problem.

    zeroconf logs a warning (with a traceback) when a multicast packet cannot be sent, once per
    error; installed, those go nowhere but to ``report(text)``, once, as a short phrase.
    """

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        super().__init__(logging.WARNING)
        self.report = report
        self.first: str | None = None
        self._logger = logging.getLogger("zeroconf")
        self._saved: tuple[bool, int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is not None:
            return
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.strerror:
            text = exc.strerror[:1].lower() + exc.strerror[1:]
        else:
            text = record.getMessage().splitlines()[0] if record.msg else "unknown problem"
        self.first = protocol.sanitize(text)[:200]
        if self.report is not None:
            self.report(self.first)

    def __enter__(self) -> FirstProblem:
        self._saved = (self._logger.propagate, self._logger.level)
        self._logger.propagate = False  # never the root logger (the server's console, Python's lastResort)
        self._logger.setLevel(logging.WARNING)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        if self._saved is not None:
            self._logger.propagate, level = self._saved
            self._logger.setLevel(level)
