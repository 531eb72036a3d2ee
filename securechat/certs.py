"""Mint a local certificate authority, a server certificate and client certificates.

``securechat gen-certs`` (and ``scripts/gen_certs.py``) write into ``certs/``:

* ``ca.pem`` / ``ca.key``: a self-signed local CA (ECDSA P-256, or RSA-3072 with ``--key-type rsa``),
  valid 10 years, that may only sign leaves for local names and private addresses (critical
  NameConstraints), so a stolen ``ca.key`` cannot be used to impersonate public sites to anyone who
  trusts ``ca.pem``.
* ``server.pem`` / ``server.key``: a 90-day server certificate for this machine's names and addresses.
* ``client-NAME.pem`` / ``client-NAME.key``: optional client certificates for mutual TLS.

The code is shaped like trustme: one builder chain per certificate, every KeyUsage bit spelled out.
Re-running reuses the CA and re-issues the server certificate; replacing the CA needs ``force``.
Private keys are created 0600 from the start and every file is replaced atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import itertools
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat import certdir, options, protocol
from securechat.tls import fingerprint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_T = TypeVar("_T")

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertError",
    "MintResult",
    "cert_not_after",
    "client_paths",
    "issue_server_cert",
    "local_addresses",
    "machine_names",
    "main",
    "mint",
    "mint_if_missing",
    "validate_client_name",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

KEY_TYPES = ("ec", "rsa")
RSA_BITS = 3072  # NIST/ANSSI: 128-bit security, the same strength as P-256
DEFAULT_DAYS = 90  # Mozilla "modern" profile: leaf certificates live at most 90 days
MAX_DAYS = 825  # Apple clients refuse TLS server certificates valid longer than this, even from private CAs
CA_DAYS = 3650
# Validity starts in the past so that a client whose clock runs a little behind still accepts it.
CLOCK_SKEW = dt.timedelta(minutes=5)

# Name constraints of a new CA. A DNSName constraint without a leading dot permits the name itself and
# every name below it (OpenSSL 3 nc_dns and RFC 5280 4.2.1.10); with a leading dot it would permit only
# subdomains, so bare suffixes are used. Single-label host names (``abc123``) are added one by one.
PRIVATE_DNS_SUFFIXES = ("localhost", "local", "lan", "internal", "home.arpa")
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)

_DNS_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class CertError(Exception):
    """A refusal: minting would overwrite or contradict what is on disk. The message is one line."""


@dataclass(frozen=True)
class MintResult:
    """What :func:`mint` or :func:`issue_server_cert` did."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    #: every file written, in the order written
    written: tuple[Path, ...]
    #: SHA-256 fingerprints in ``AA:BB:...`` form (:func:`securechat.tls.fingerprint`)
    ca_fingerprint: str
    server_fingerprint: str
    #: True when an existing CA was loaded, False when a new one was minted
    ca_reused: bool
    #: subjectAltName entries of the server certificate
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    server_not_after: dt.datetime
    #: client name -> (certificate, key)
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    #: things the caller should tell the user (e.g. a detected address the reused CA does not cover)
    notes: tuple[str, ...] = ()
    #: False when only client certificates were issued and the server certificate was left alone
    server_issued: bool = True


# --------------------------------------------------------------------------------------------------
# validation of names


def validate_client_name(name: str) -> str:
    """Return ``name`` if the server would accept it as a nickname (:func:`protocol.nick_error`).

    A client certificate's name *is* its holder's nickname under mutual TLS, so a name the server
    refuses (``server``, ``admin``, ``bad name``) is refused here, when minting, instead.
    """
    why = protocol.nick_error(name)
    if why is not None:
        raise ValueError(f"invalid client name {name!r}: {why}")
    return name


def _check_client_names(out_dir: Path, names: Sequence[str]) -> None:
    """CertError when two names would be the same person to the server (``AIice`` and ``alice``).

    The server folds case and look-alike characters (:func:`protocol.nick_key`) and lets only one of
    them be online; a certificate for the second would be useless, or let its holder block the first.
    Compared with each other and with every client already issued in ``out_dir``.
    """
    seen: dict[str, str] = {}
    for existing in _issued_clients(out_dir):
        seen.setdefault(protocol.nick_key(existing), existing)
    asked: dict[str, str] = {}
    for name in names:
        key = protocol.nick_key(name)
        other = asked.get(key)
        if other is not None and other != name:
            raise CertError(
                f"client names {other!r} and {name!r} are the same nickname to the server "
                "(case and look-alike letters are folded): pick one"
            )
        asked[key] = name
        other = seen.get(key)
        if other is not None and other != name:
            raise CertError(
                f"client name {name!r} is the same nickname to the server as {other!r}, already issued "
                f"in {out_dir} (case and look-alike letters are folded): pick another name"
            )


def _issued_clients(out_dir: Path) -> list[str]:
    """Names of the client certificates and keys in ``out_dir`` (``client-NAME.pem``/``.key``)."""
    if not out_dir.is_dir():
        return []
    names = {
        p.name[len("client-") : -len(p.suffix)]
        for pattern in ("client-*.pem", "client-*.key")
        for p in out_dir.glob(pattern)
    }
    return sorted(names)


def _dns_name_or_none(name: str) -> str | None:
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


def _validate_host(name: str) -> str:
    dns = _dns_name_or_none(name)
    if dns is None:
        raise ValueError(f"invalid host name {name!r}: use letters, digits, '-' and dots (no wildcards)")
    return dns


def _validate_ip(text: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"{text!r} cannot be a server address")
    return addr


def _split_hosts_ips(
    hosts: Iterable[str], ips: Iterable[str | IPAddress]
) -> tuple[list[str], list[IPAddress]]:
    """Validate --host/--ip values; an address given as --host is treated as --ip."""
    names: list[str] = []
    addrs: list[IPAddress] = []
    for host in hosts:
        try:
            addrs.append(_validate_ip(host))
        except ValueError:
            names.append(_validate_host(host))
    for ip in ips:
        addrs.append(
            ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else _validate_ip(ip)
        )
    return _dedupe(names), _dedupe(addrs)


def _dedupe(items: Iterable[_T]) -> list[_T]:
    """Drop repeats, keep the first occurrence's position (SAN order is what users see)."""
    return list(dict.fromkeys(items))


def _validate_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, not {days}")
    return days


def _validate_key_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
    return key_type


# --------------------------------------------------------------------------------------------------
# this machine's names and addresses, found without sending a packet


def machine_names() -> list[str]:
    """This machine's host names for the server certificate.

    ``socket.gethostname()`` (may be a single label such as ``abc123``), ``<label>.local`` for mDNS,
    and the FQDN when it differs and is a plausible name (not ``localhost.localdomain``).
    """
    names: list[str] = []
    host = _dns_name_or_none(socket.gethostname())
    if host and host != "localhost":
        names.append(host)
        first = host.split(".")[0]
        if "." not in host:
            names.append(f"{first}.local")  # what Avahi/Bonjour answer for; covered by the "local" suffix
    try:
        fqdn = _dns_name_or_none(socket.getfqdn())  # /etc/hosts or the resolver: no connection to us
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


def _parse_ip(text: str) -> IPAddress | None:
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
            addr = _parse_ip(prev.split("|--", 1)[1].strip())
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
            if key in ("inet", "inet6") and (addr := _parse_ip(value)) is not None
        ]
        if found:
            return found
    return []


def _addresses_from_resolver() -> list[IPAddress]:
    """Last resort (Windows): what the host name resolves to, normally from the hosts file/NetBIOS."""
    found: list[IPAddress] = []
    with contextlib.suppress(OSError, UnicodeError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addr = _parse_ip(str(info[4][0]))
            if addr is not None:
                found.append(addr)
    return found


def local_addresses() -> list[IPAddress]:
    """This machine's non-loopback addresses (IPv4 first), found without sending any packet.

    Never connects a socket anywhere (the "UDP connect to 8.8.8.8" trick would leak to the network and
    fails offline); reads the kernel's tables instead, falling back to resolving our own host name.
    """
    for source in (_addresses_from_proc, _addresses_from_command, _addresses_from_resolver):
        usable = [a for a in _dedupe(source()) if _usable_address(a)]
        if usable:
            return sorted(usable, key=lambda a: a.version)  # stable: keeps kernel order within a family
    return []


# --------------------------------------------------------------------------------------------------
# name constraints


def _dns_permitted_by(name: str, base: str) -> bool:
    """OpenSSL's nc_dns: ``base`` permits itself and names below it; ``.base`` only names below it."""
    name, base = name.lower(), base.lower()
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _constraints(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _permitted(nc: x509.NameConstraints | None, value: str | IPAddress) -> bool:
    """Whether a leaf SAN entry passes ``nc``, the way OpenSSL decides it."""
    if nc is None:
        return True
    kind = x509.DNSName if isinstance(value, str) else x509.IPAddress

    def matches(general: x509.GeneralName) -> bool:
        if isinstance(value, str):
            return _dns_permitted_by(value, general.value)
        return value in general.value

    excluded = [g for g in nc.excluded_subtrees or () if isinstance(g, kind)]
    if any(matches(g) for g in excluded):
        return False
    permitted = [g for g in nc.permitted_subtrees or () if isinstance(g, kind)]
    return not permitted or any(matches(g) for g in permitted)


def _ncat_aliases(addrs: Iterable[IPAddress]) -> list[str]:
    """IPv4 addresses written as DNS names.

    ``ncat --ssl-verify`` (7.9x) matches only dNSName entries and the CN, so connecting it to
    ``192.168.1.20`` fails against a certificate that names the address as an iPAddress, as it
    should. The address is therefore also listed as a dNSName; clients that follow RFC 6125 keep
    using the iPAddress entry.
    """
    return [str(a) for a in addrs if a.version == 4]


def _ca_constraints(names: Sequence[str], addrs: Sequence[IPAddress]) -> x509.NameConstraints:
    """Private suffixes and networks, plus whatever named names/addresses they do not already cover."""
    dns = list(PRIVATE_DNS_SUFFIXES)
    for name in names:
        if not any(_dns_permitted_by(name, base) for base in dns):
            dns.append(name)
    nets = list(PRIVATE_NETWORKS)
    for addr in addrs:
        if not any(addr in net for net in nets):
            nets.append(ipaddress.ip_network(addr))  # a single address: /32 or /128
    # The dNSName twins of the server's IPv4 addresses (see _ncat_aliases): an IP literal is no
    # registrable domain, so permitting it as a DNS name vouches for nothing else.
    for alias in _ncat_aliases([ipaddress.ip_address("127.0.0.1"), *addrs]):
        if alias not in dns:
            dns.append(alias)
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(n) for n in dns] + [x509.IPAddress(n) for n in nets],
        excluded_subtrees=None,
    )


# --------------------------------------------------------------------------------------------------
# keys and certificates


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.timezone.utc)


def _build_ca(key: PrivateKey, constraints: x509.NameConstraints, now: dt.datetime) -> x509.Certificate:
    host = socket.gethostname() or "this machine"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securechat"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"securechat local CA on {host}"[:64]),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(constraints, critical=True)
        .sign(key, hashes.SHA256())
    )


def _leaf_validity(ca_cert: x509.Certificate, days: int, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    # A leaf outliving its CA would just fail verification later, so stop at the CA's end.
    return now - CLOCK_SKEW, min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)


def _build_server(
    key: PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    names: Sequence[str],
    addrs: Sequence[IPAddress],
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    not_before, not_after = _leaf_validity(ca_cert, days, now)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securechat"),
                    # Clients match the SANs; the CN is a label for humans (first SAN name).
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "securechat server"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,  # only meaningful for RSA key transport (TLS 1.2 clients)
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names]
                # Only the aliases this CA's constraints allow: an older CA predates them.
                + [x509.DNSName(a) for a in _ncat_aliases(addrs) if _permitted(_constraints(ca_cert), a)]
                + [x509.IPAddress(a) for a in addrs]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _build_client(
    key: PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    name: str,
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    not_before, not_after = _leaf_validity(ca_cert, days, now)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securechat"),
                    # No dots in a nick, so OpenSSL never mistakes this CN for a host name under the
                    # CA's name constraints.
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------------------------------
# files


def client_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) paths of client ``name`` in ``out_dir``."""
    return Path(out_dir) / f"client-{name}.pem", Path(out_dir) / f"client-{name}.key"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode`` and os.replace.

    The temporary file is created with O_EXCL and its final mode, so a key is never readable by others,
    not even for an instant and whatever the umask; readers see the old file or the new one, never half.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits colliding
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                # The umask can only have removed bits: restores 0644 for certificates; 0600 stays 0600.
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    # Make the renames durable too (POSIX only; Windows cannot open a directory).
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CertError(f"{out_dir} exists and is not a directory")
    # 0700: only the owner lists the directory that holds the keys (umask may narrow it further).
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def cert_not_after(path: str | Path) -> dt.datetime:
    """End of validity (timezone-aware, UTC) of the first certificate in the PEM file ``path``."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc


def _public_der(key: PrivateKey | x509.Certificate) -> bytes:
    """SubjectPublicKeyInfo of a private key or a certificate, to tell whether they belong together."""
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_ca(out_dir: Path, now: dt.datetime) -> tuple[x509.Certificate, PrivateKey]:
    """Load and check the CA in ``out_dir``; CertError (with the way out) if it cannot be used."""
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    has_cert, has_key = cert_path.exists(), key_path.exists()
    if has_key:
        try:
            certdir.check_key(key_path)
        except certdir.UnsafePermissions as exc:
            raise CertError(str(exc)) from None
    if not has_cert and not has_key:
        raise CertError(f"no CA in {out_dir}: run 'securechat gen-certs --out {out_dir}' first")
    if not has_key:
        raise CertError(
            f"{cert_path} exists but {key_path} is missing: restore the key, or use --force to mint a new CA"
        )
    if not has_cert:
        raise CertError(
            f"{key_path} exists but {cert_path} is missing: restore it, or use --force to mint a new CA"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, OSError) as exc:
        raise CertError(
            f"cannot read the CA certificate {cert_path} ({exc}); use --force to replace it"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        # TypeError: the key is encrypted. ValueError: not a key / unsupported.
        raise CertError(f"cannot read the CA key {key_path} ({exc}); use --force to mint a new CA") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertError(f"{key_path} is not an EC or RSA key; use --force to mint a new CA")
    if _public_der(key) != _public_der(cert):
        raise CertError(f"{key_path} does not match {cert_path}: use --force to mint a new CA")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{cert_path} is not a CA certificate; use --force to mint a new CA")
    if cert.not_valid_after_utc <= now:
        raise CertError(
            f"the CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; use --force to mint a new CA"
        )
    return cert, key


def _server_names(
    nc: x509.NameConstraints | None,
    hosts: Sequence[str],
    ips: Sequence[IPAddress],
    auto_names: Sequence[str],
    auto_addrs: Sequence[IPAddress],
) -> tuple[list[str], list[IPAddress], list[str]]:
    """SAN lists for the server: defaults + this machine + --host/--ip, checked against ``nc``.

    Names asked for explicitly must fit the CA (CertError otherwise); detected ones that do not fit a
    reused CA are left out with a note, since the user did not ask for them.
    """
    for name in hosts:
        if not _permitted(nc, name):
            raise CertError(
                f"the existing CA may not sign host name {name!r} (its name constraints predate it): "
                "use a name under .lan/.local/.internal/.home.arpa, or --force to mint a new CA"
            )
    for addr in ips:
        if not _permitted(nc, addr):
            raise CertError(
                f"the existing CA may not sign address {addr} (its name constraints predate it): "
                "use --force to mint a new CA"
            )
    notes: list[str] = []
    names: list[str] = []
    for name in ["localhost", *auto_names]:
        if _permitted(nc, name):
            names.append(name)
        else:
            notes.append(
                f"left out host name {name}: the existing CA may not sign it (--force mints one that may)"
            )
    addrs: list[IPAddress] = []
    for addr in [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), *auto_addrs]:
        if _permitted(nc, addr):
            addrs.append(addr)
        else:
            notes.append(
                f"left out address {addr}: the existing CA may not sign it (--force mints one that may)"
            )
    names, addrs = _dedupe([*names, *hosts]), _dedupe([*addrs, *ips])
    if not names and not addrs:
        raise CertError("the existing CA may sign none of this machine's names: use --force to mint a new CA")
    return names, addrs, notes


def _check_leaf_files_free(out_dir: Path) -> None:
    """Without a CA, server.pem/server.key are someone else's: refuse to replace them silently."""
    for name in (SERVER_CERT, SERVER_KEY):
        if (out_dir / name).exists():
            raise CertError(
                f"{out_dir / name} exists but there is no CA ({CA_CERT}/{CA_KEY}) in {out_dir}: "
                "move it away, or use --force to replace it"
            )


def _current_server_names(out_dir: Path, ca_cert: x509.Certificate) -> tuple[list[str], list[IPAddress]]:
    """Names and addresses of the server certificate in ``out_dir``, if ``ca_cert`` issued it.

    Re-issuing keeps them (as renewal does): a client that connects by ``chat.lan`` keeps working
    after the next ``gen-certs``. IPv4 addresses listed as DNS names (the ncat aliases) come back
    as addresses. A certificate from another CA is not ours to copy names from.
    """
    try:
        cert = x509.load_pem_x509_certificate((out_dir / SERVER_CERT).read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return [], []
    names: list[str] = []
    addrs: list[IPAddress] = []
    for dns in san.get_values_for_type(x509.DNSName):
        addr = _parse_ip(dns)
        if addr is not None:
            addrs.append(addr)
        elif (name := _dns_name_or_none(dns)) is not None:
            names.append(name)
    addrs += [a for a in san.get_values_for_type(x509.IPAddress) if isinstance(a, (ipaddress.IPv4Address,
                                                                                   ipaddress.IPv6Address))]
    return _dedupe(names), _dedupe(addrs)


def _existing_server(out_dir: Path) -> tuple[str, tuple[str, ...], tuple[str, ...], dt.datetime] | None:
    """(fingerprint, names, addresses, end) of the server certificate left untouched, or None if unreadable."""
    try:
        cert = x509.load_pem_x509_certificate((out_dir / SERVER_CERT).read_bytes())
    except (OSError, ValueError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n) for n in san.get_values_for_type(x509.DNSName))
        addrs = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names, addrs = (), ()
    der = cert.public_bytes(serialization.Encoding.DER)
    return fingerprint(der), names, addrs, cert.not_valid_after_utc


def _load_client_key(path: Path) -> PrivateKey:
    """An existing client key, reused when its certificate is re-issued (CertError if unusable)."""
    certdir.check_key(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise CertError(
            f"cannot read the existing client key {path} ({exc}): move it away to issue a new one"
        ) from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertError(f"{path} is not an EC or RSA key: move it away to issue a new one")
    return key


def _issue(
    out_dir: Path,
    *,
    ca: tuple[x509.Certificate, PrivateKey] | None,
    hosts: Iterable[str],
    ips: Iterable[str | IPAddress],
    clients: Iterable[str],
    days: int,
    key_type: str,
    now: dt.datetime,
    server: bool = True,
    keep_names: bool = True,
) -> MintResult:
    """Everything after the refusal checks: build in memory, then write (keys before certificates).

    Runs with the directory locked. ``server=False`` leaves server.pem/server.key alone (adding a
    client). ``keep_names`` adds the names of the current server certificate (if the reused CA
    issued it) to the new one. An existing client key is reused (only its certificate is
    re-issued) unless the CA is being replaced.
    """
    host_names, addrs = _split_hosts_ips(hosts, ips)
    client_names = _dedupe(validate_client_name(c) for c in clients)
    _validate_days(days)
    _validate_key_type(key_type)
    _check_client_names(out_dir, client_names)

    auto_names, auto_addrs = machine_names(), local_addresses()
    if ca is not None and keep_names:
        kept_names, kept_addrs = _current_server_names(out_dir, ca[0])
        auto_names, auto_addrs = _dedupe([*auto_names, *kept_names]), _dedupe([*auto_addrs, *kept_addrs])

    written: list[tuple[Path, bytes, int]] = []
    nc: x509.NameConstraints | None
    if ca is None:
        # The new CA permits the private suffixes/networks plus every name and address of this server.
        nc = _ca_constraints([*auto_names, *host_names], [*auto_addrs, *addrs])
        ca_key = _new_key(key_type)
        ca_cert = _build_ca(ca_key, nc, now)
        written += [
            (out_dir / CA_KEY, _key_pem(ca_key), 0o600),
            (out_dir / CA_CERT, _cert_pem(ca_cert), 0o644),
        ]
    else:
        ca_cert, ca_key = ca
        nc = _constraints(ca_cert)
    notes: list[str] = []
    if ca is None:
        # Client certificates signed by a CA that --force replaces no longer work: say which.
        for name in _issued_clients(out_dir):
            if name not in client_names:
                notes.append(f"{client_paths(out_dir, name)[0]} was signed by the replaced CA: "
                             f"reissue it with --client {name}")

    server_cert: x509.Certificate | None = None
    names: list[str] = []
    san_addrs: list[IPAddress] = []
    if server:
        names, san_addrs, name_notes = _server_names(nc, host_names, addrs, auto_names, auto_addrs)
        notes += name_notes
        server_key = _new_key(key_type)
        server_cert = _build_server(server_key, ca_cert, ca_key, names, san_addrs, days, now)
        written += [
            (out_dir / SERVER_KEY, _key_pem(server_key), 0o600),
            # The full chain, so a client that pins the CA's fingerprint (--pin, --tofu) is shown the CA.
            (out_dir / SERVER_CERT, _cert_pem(server_cert) + _cert_pem(ca_cert), 0o644),
        ]
    clients_out: dict[str, tuple[Path, Path]] = {}
    for name in client_names:
        cert_path, key_path = client_paths(out_dir, name)
        if ca is not None and key_path.exists():
            # Re-running --client alice renews alice's certificate; her key stays hers.
            key = _load_client_key(key_path)
            notes.append(f"kept the existing key {key_path} and re-issued {cert_path} for it "
                         f"(to give {name} a new key, move {key_path} away first)")
        else:
            key = _new_key(key_type)
            written.append((key_path, _key_pem(key), 0o600))
        cert = _build_client(key, ca_cert, ca_key, name, days, now)
        written.append((cert_path, _cert_pem(cert), 0o644))
        clients_out[name] = (cert_path, key_path)

    for path, data, mode in written:
        _write_atomic(path, data, mode)
    _fsync_dir(out_dir)

    if server_cert is not None:
        server_print = fingerprint(server_cert.public_bytes(serialization.Encoding.DER))
        dns_names, ip_addresses = tuple(names), tuple(str(a) for a in san_addrs)
        server_not_after = server_cert.not_valid_after_utc
    else:
        existing = _existing_server(out_dir)
        if existing is None:  # pragma: no cover - _mint only skips the server when the file is readable
            raise CertError(f"cannot read {out_dir / SERVER_CERT}")
        server_print, dns_names, ip_addresses, server_not_after = existing
    return MintResult(
        out_dir=out_dir,
        ca_cert=out_dir / CA_CERT,
        ca_key=out_dir / CA_KEY,
        server_cert=out_dir / SERVER_CERT,
        server_key=out_dir / SERVER_KEY,
        written=tuple(path for path, _, _ in written),
        ca_fingerprint=fingerprint(ca_cert.public_bytes(serialization.Encoding.DER)),
        server_fingerprint=server_print,
        ca_reused=ca is not None,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        server_not_after=server_not_after,
        clients=clients_out,
        notes=tuple(notes),
        server_issued=server_cert is not None,
    )


@contextlib.contextmanager
def _locked_dir(out_dir: Path) -> Iterator[None]:
    """Create ``out_dir`` (0700), refuse it if others can write to it, and hold its lock.

    Permission refusals become CertError, so every caller reports them as one line.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CertError(f"{out_dir} exists and is not a directory")
    try:
        _prepare_dir(out_dir)
        certdir.check_dir(out_dir)
        with certdir.locked(out_dir):
            yield
    except certdir.UnsafePermissions as exc:
        raise CertError(str(exc)) from None


def mint(
    out_dir: str | Path,
    *,
    hosts: Iterable[str] = (),
    ips: Iterable[str | IPAddress] = (),
    clients: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    key_type: str = "ec",
    force: bool = False,
    reset_names: bool = False,
    now: dt.datetime | None = None,
) -> MintResult:
    """Mint (or reuse) the local CA in ``out_dir`` and issue a server certificate and client certificates.

    An existing ``ca.pem``/``ca.key`` pair is reused unless ``force``; a half-present, mismatched,
    unreadable or expired CA, a ``server.pem`` without a CA, or a ``hosts``/``ips`` entry outside a
    reused CA's name constraints raises :class:`CertError` before anything is written.
    ``hosts`` entries that are IP addresses are treated as ``ips``. Invalid names raise ValueError.

    With a reused CA, asking only for ``clients`` leaves an existing server certificate alone;
    re-issuing the server certificate keeps the names it had unless ``reset_names``. The whole
    read-modify-write runs under the directory's lock (:mod:`securechat.certdir`).
    """
    out_dir = Path(out_dir)
    current = _now(now)
    # Validate arguments before looking at the disk, so a typo never turns into a refusal message.
    _split_hosts_ips(hosts := list(hosts), ips := list(ips))
    clients = list(clients)
    for client in clients:
        validate_client_name(client)
    _validate_days(days)
    _validate_key_type(key_type)
    with _locked_dir(out_dir):
        return _mint_locked(out_dir, hosts=hosts, ips=ips, clients=clients, days=days, key_type=key_type,
                            force=force, reset_names=reset_names, now=current)


def _mint_locked(out_dir: Path, *, hosts: list[str], ips: list[str | IPAddress], clients: list[str], days: int,
                 key_type: str, force: bool, reset_names: bool, now: dt.datetime) -> MintResult:
    ca: tuple[x509.Certificate, PrivateKey] | None = None
    if not force:
        if (out_dir / CA_CERT).exists() or (out_dir / CA_KEY).exists():
            ca = _load_ca(out_dir, now)
        else:
            _check_leaf_files_free(out_dir)
    # Adding clients to a working set must not touch the server certificate.
    server = not (
        ca is not None
        and clients
        and not hosts
        and not ips
        and not reset_names
        and (out_dir / SERVER_KEY).exists()
        and _existing_server(out_dir) is not None
    )
    return _issue(out_dir, ca=ca, hosts=hosts, ips=ips, clients=clients, days=days, key_type=key_type,
                  now=now, server=server, keep_names=not reset_names)


def mint_if_missing(out_dir: str | Path, check: Callable[[Path], None] | None = None) -> MintResult | None:
    """``serve``'s first run: mint a CA and server certificate unless ``server.pem`` exists, under the lock.

    Two servers started at once in one directory mint one set between them; the second finds it.
    ``check(out_dir)`` runs under the lock before minting, to refuse what is there in the caller's words.
    """
    out_dir = Path(out_dir)
    with _locked_dir(out_dir):
        if (out_dir / SERVER_CERT).exists():
            return None
        if check is not None:
            check(out_dir)
        return _mint_locked(out_dir, hosts=[], ips=[], clients=[], days=DEFAULT_DAYS, key_type="ec",
                            force=False, reset_names=False, now=_now(None))


def issue_server_cert(
    out_dir: str | Path,
    *,
    hosts: Iterable[str] = (),
    ips: Iterable[str | IPAddress] = (),
    days: int = DEFAULT_DAYS,
    key_type: str = "ec",
    now: dt.datetime | None = None,
) -> MintResult:
    """(Re)issue ``server.pem``/``server.key`` from the existing CA in ``out_dir`` (for renewal).

    ``now`` (timezone-aware) replaces the clock, for tests. Raises :class:`CertError` if the CA is
    missing or unusable (or others may read its key), or a ``hosts``/``ips`` entry is outside its
    name constraints. Runs under the directory's lock.
    """
    out_dir = Path(out_dir)
    current = _now(now)
    with _locked_dir(out_dir):
        ca = _load_ca(out_dir, current)
        return _issue(out_dir, ca=ca, hosts=hosts, ips=ips, clients=(), days=days, key_type=key_type,
                      now=current)


# --------------------------------------------------------------------------------------------------
# command line


def _arg(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a validator's ValueError into argparse's usage error (exit status 2)."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def build_parser(prog: str = "securechat gen-certs") -> argparse.ArgumentParser:
    """The gen-certs argument parser (shared by ``securechat gen-certs`` and ``scripts/gen_certs.py``)."""
    parser = options.Parser(
        prog=prog,
        description=(
            "Mint a local certificate authority (ca.pem/ca.key) and a certificate for this chat server "
            "(server.pem/server.key). Re-running keeps the CA, so clients that trust ca.pem keep working, "
            "and issues a fresh server certificate. The CA may only sign local names (localhost, *.local, "
            "*.lan, *.internal, *.home.arpa, this machine's names and --host names) and private addresses."
        ),
        epilog=(
            "Copy ca.pem (never ca.key) to each client machine. Keys are written 0600; never commit them. "
            "Example: %(prog)s --host chat.lan --ip 192.168.1.20 --client alice"
        ),
    )
    parser.add_argument(
        "--out",
        type=options.path,
        default=Path("certs"),
        metavar="DIR",
        help="directory to write into (default: certs)",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        type=_arg(_host_arg),
        metavar="NAME",
        help="extra DNS name for the server certificate (repeatable; an address counts as --ip); "
        "localhost and this machine's names are always included",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        type=_arg(_validate_ip),
        metavar="ADDR",
        help="extra IP address for the server certificate (repeatable); 127.0.0.1, ::1 and this "
        "machine's addresses are always included",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        type=_arg(validate_client_name),
        metavar="NAME",
        help="also write client-NAME.pem/.key for mutual TLS (repeatable; NAME is the nickname, so the "
        "server's nickname rules apply). Adding a client leaves the server certificate alone; re-running "
        "for an existing NAME re-issues its certificate and keeps its key",
    )
    parser.add_argument(
        "--days",
        type=_arg(_days_arg),
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"validity of server and client certificates in days (default: {DEFAULT_DAYS}, max {MAX_DAYS})",
    )
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ec",
        help="key algorithm for new keys: ec = ECDSA P-256 (default), rsa = RSA-3072",
    )
    parser.add_argument(
        "--reset-names",
        action="store_true",
        help="issue the server certificate for exactly localhost, this machine's names and addresses and "
        "the --host/--ip given; without it, re-issuing keeps every name the current certificate has",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="mint a new CA instead of reusing it, with a new server key and certificate and new keys for "
        "the --client names given; clients must then get the new ca.pem, and other client certificates "
        "stop working (they are listed)",
    )
    return parser


def _days_arg(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise ValueError(f"not a number of days: {text!r}") from None
    return _validate_days(days)


def _host_arg(text: str) -> str:
    """--host accepts a name, or an address (then treated like --ip)."""
    try:
        return str(_validate_ip(text))
    except ValueError:
        return _validate_host(text)


def _connect_target(result: MintResult, hosts: Sequence[str], ips: Sequence[object]) -> str:
    """What a client most likely types to reach us: an asked-for name, else a LAN address."""
    if hosts:
        return hosts[0]
    if ips:
        return str(ips[0])
    loopback = {"127.0.0.1", "::1"}
    addrs = [a for a in result.ip_addresses if a not in loopback]
    if addrs:
        return addrs[0]
    names = [n for n in result.dns_names if n != "localhost"]
    return names[0] if names else "<this machine's IP>"


def _report(result: MintResult, args: argparse.Namespace) -> str:
    out = result.out_dir
    lines: list[str] = []
    ca_cert = x509.load_pem_x509_certificate(result.ca_cert.read_bytes())
    if result.ca_reused:
        lines.append(
            f"Reused the local CA in {out} (clients that trust it keep working; --force replaces it)."
        )
    else:
        kind = "RSA" if isinstance(ca_cert.public_key(), rsa.RSAPublicKey) else "ECDSA"
        lines.append(f"Created a new local CA ({kind}), valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}.")
    lines.append("Wrote:")
    labels = {
        CA_KEY: "CA private key: keep it here, never copy or commit it",
        CA_CERT: "CA certificate: copy it to every client",
        SERVER_KEY: "server private key",
        SERVER_CERT: f"server certificate, valid until {result.server_not_after:%Y-%m-%d %H:%M} UTC",
    }
    client_files = {p: name for name, paths in result.clients.items() for p in paths}
    for path in result.written:
        if path in client_files:
            label = f"client {client_files[path]}: give the .pem and .key to that user only"
        else:
            label = labels.get(path.name, "")
        lines.append(f"  {path}  ({label})")
    if not result.server_issued:
        lines.append(f"Left {result.server_cert} as it was (valid until {result.server_not_after:%Y-%m-%d %H:%M} "
                     "UTC).")
    lines.append(f"Server names:     {', '.join(result.dns_names)}")
    lines.append(f"Server addresses: {', '.join(result.ip_addresses)}")
    lines.append(f"CA SHA-256 fingerprint:     {result.ca_fingerprint}")
    lines.append(f"Server SHA-256 fingerprint: {result.server_fingerprint}")
    lines.append("")
    target = _connect_target(result, args.host, args.ip)
    if not result.clients:
        lines.append(
            f"Copy {result.ca_cert} to each client machine, then run: securechat connect {target} --ca {CA_CERT}"
        )
        return "\n".join(lines)
    lines.append("Start the server with: securechat serve --require-client-cert")
    for name, (cert_path, key_path) in result.clients.items():
        lines.append(
            f"Give {name} {cert_path}, {key_path} and {result.ca_cert} (only theirs), then {name} runs: "
            f"securechat connect {target} --ca {CA_CERT} --cert {cert_path.name} --key {key_path.name}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str = "securechat gen-certs") -> int:
    """``securechat gen-certs``: 0 on success, 1 on refusal or I/O error, 2 on a usage error."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): return instead of exiting the caller
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result = mint(
            args.out,
            hosts=args.host,
            ips=args.ip,
            clients=args.client,
            days=args.days,
            key_type=args.key_type,
            force=args.force,
            reset_names=args.reset_names,
        )
    except CertError as exc:
        options.print_error(prog, str(exc))
        return 1
    except OSError as exc:
        where = exc.filename or args.out
        options.print_error(prog, f"cannot write {where}: {exc.strerror or exc}")
        return 1
    for note in result.notes:
        options.print_error(prog, f"note: {note}")
    return 0 if options.write_stdout(prog, _report(result, args) + "\n") else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
