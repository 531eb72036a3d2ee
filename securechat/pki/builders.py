"""X.509 building blocks: keys, name validation, the CA's name constraints, and the three certificate shapes.

Shaped like trustme: one builder chain per certificate (CA, server, client), every KeyUsage bit spelled
out. Nothing here reads or writes a file: :mod:`securechat.pki.certs` decides what to issue and where.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat.wire.netinfo import dedupe, dns_name_or_none

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


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



def validate_host(name: str) -> str:
    dns = dns_name_or_none(name)
    if dns is None:
        raise ValueError(f"invalid host name {name!r}: use letters, digits, '-' and dots (no wildcards)")
    return dns


def validate_ip(text: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"{text!r} cannot be a server address")
    return addr


def split_hosts_ips(
    hosts: Iterable[str], ips: Iterable[str | IPAddress]
) -> tuple[list[str], list[IPAddress]]:
    """Validate --host/--ip values; an address given as --host is treated as --ip."""
    names: list[str] = []
    addrs: list[IPAddress] = []
    for host in hosts:
        try:
            addrs.append(validate_ip(host))
        except ValueError:
            names.append(validate_host(host))
    for ip in ips:
        addrs.append(
            ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else validate_ip(ip)
        )
    return dedupe(names), dedupe(addrs)


def validate_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, not {days}")
    return days


def validate_key_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
    return key_type


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


def name_constraints_of(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def nc_permits(nc: x509.NameConstraints | None, value: str | IPAddress) -> bool:
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


def ca_constraints(names: Sequence[str], addrs: Sequence[IPAddress]) -> x509.NameConstraints:
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


def new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def utc_now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.timezone.utc)


def build_ca(key: PrivateKey, constraints: x509.NameConstraints, now: dt.datetime) -> x509.Certificate:
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


def build_server(
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
                + [x509.DNSName(a) for a in _ncat_aliases(addrs) if nc_permits(name_constraints_of(ca_cert), a)]
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


def build_client(
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
