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

import contextlib
import datetime as dt
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from securechat.pki import certdir
from securechat.pki.builders import (
    DEFAULT_DAYS,
    IPAddress,
    PrivateKey,
    build_ca,
    build_client,
    build_server,
    ca_constraints,
    cert_to_pem,
    name_constraints_of,
    nc_permits,
    new_key,
    private_key_pem,
    split_hosts_ips,
    utc_now,
    validate_days,
    validate_key_type,
)
from securechat.wire import netinfo, protocol
from securechat.wire.netinfo import dedupe, dns_name_or_none, parse_ip
from securechat.wire.tls import fingerprint

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertError",
    "MintResult",
    "cert_not_after",
    "issue_server_cert",
    "mint",
    "mint_if_missing",
    "validate_client_name",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


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
    #: SHA-256 fingerprints in ``AA:BB:...`` form (:func:`securechat.wire.tls.fingerprint`)
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


def _record_clients(out_dir: Path, issued: Sequence[tuple[x509.Certificate, str]], days: int) -> None:
    """Enter client certificates in the CA's ledger before their files are written (the one name rule:
    :mod:`securechat.pki.names`); CertError, and nothing written, when it refuses one."""
    if not issued:
        return
    from securechat.pki.ledger import Store, StoreError

    store = Store(out_dir)
    try:
        for _, name in issued:  # every name first, so a refusal leaves nothing recorded
            why = store.name_refusal(name)
            if why is not None:
                raise CertError(why)
        for cert, name in issued:
            store.record(cert, name, days)
    except StoreError as exc:
        raise CertError(str(exc)) from None


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
        if not nc_permits(nc, name):
            raise CertError(
                f"the existing CA may not sign host name {name!r} (its name constraints predate it): "
                "use a name under .lan/.local/.internal/.home.arpa, or --force to mint a new CA"
            )
    for addr in ips:
        if not nc_permits(nc, addr):
            raise CertError(
                f"the existing CA may not sign address {addr} (its name constraints predate it): "
                "use --force to mint a new CA"
            )
    notes: list[str] = []
    names: list[str] = []
    for name in ["localhost", *auto_names]:
        if nc_permits(nc, name):
            names.append(name)
        else:
            notes.append(
                f"left out host name {name}: the existing CA may not sign it (--force mints one that may)"
            )
    addrs: list[IPAddress] = []
    for addr in [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), *auto_addrs]:
        if nc_permits(nc, addr):
            addrs.append(addr)
        else:
            notes.append(
                f"left out address {addr}: the existing CA may not sign it (--force mints one that may)"
            )
    names, addrs = dedupe([*names, *hosts]), dedupe([*addrs, *ips])
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
        addr = parse_ip(dns)
        if addr is not None:
            addrs.append(addr)
        elif (name := dns_name_or_none(dns)) is not None:
            names.append(name)
    addrs += [a for a in san.get_values_for_type(x509.IPAddress) if isinstance(a, (ipaddress.IPv4Address,
                                                                                   ipaddress.IPv6Address))]
    return dedupe(names), dedupe(addrs)


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
    this_machine: bool = True,
) -> MintResult:
    """Everything after the refusal checks: build in memory, then write (keys before certificates).

    Runs with the directory locked. ``server=False`` leaves server.pem/server.key alone (adding a
    client). ``keep_names`` adds the names of the current server certificate (if the reused CA
    issued it) to the new one. An existing client key is reused (only its certificate is
    re-issued) unless the CA is being replaced.
    """
    host_names, addrs = split_hosts_ips(hosts, ips)
    client_names = dedupe(validate_client_name(c) for c in clients)
    validate_days(days)
    validate_key_type(key_type)
    _check_client_names(out_dir, client_names)

    auto_names, auto_addrs = (netinfo.machine_names(), netinfo.local_addresses()) if this_machine else ([], [])
    if ca is not None and keep_names:
        kept_names, kept_addrs = _current_server_names(out_dir, ca[0])
        auto_names, auto_addrs = dedupe([*auto_names, *kept_names]), dedupe([*auto_addrs, *kept_addrs])

    written: list[tuple[Path, bytes, int]] = []
    nc: x509.NameConstraints | None
    if ca is None:
        # The new CA permits the private suffixes/networks plus every name and address of this server.
        nc = ca_constraints([*auto_names, *host_names], [*auto_addrs, *addrs])
        ca_key = new_key(key_type)
        ca_cert = build_ca(ca_key, nc, now)
        written += [
            (out_dir / CA_KEY, private_key_pem(ca_key), 0o600),
            (out_dir / CA_CERT, cert_to_pem(ca_cert), 0o644),
        ]
    else:
        ca_cert, ca_key = ca
        nc = name_constraints_of(ca_cert)
    notes: list[str] = []
    if ca is None:
        # Client certificates signed by a CA that --force replaces no longer work: say which.
        for name in _issued_clients(out_dir):
            if name not in client_names:
                notes.append(f"{certdir.client_paths(out_dir, name)[0]} was signed by the replaced CA: "
                             f"reissue it with --client {name}")

    server_cert: x509.Certificate | None = None
    names: list[str] = []
    san_addrs: list[IPAddress] = []
    if server:
        names, san_addrs, name_notes = _server_names(nc, host_names, addrs, auto_names, auto_addrs)
        notes += name_notes
        server_key = new_key(key_type)
        server_cert = build_server(server_key, ca_cert, ca_key, names, san_addrs, days, now)
        written += [
            (out_dir / SERVER_KEY, private_key_pem(server_key), 0o600),
            # The full chain, so a client that pins the CA's fingerprint (--pin, --tofu) is shown the CA.
            (out_dir / SERVER_CERT, cert_to_pem(server_cert) + cert_to_pem(ca_cert), 0o644),
        ]
    clients_out: dict[str, tuple[Path, Path]] = {}
    issued: list[tuple[x509.Certificate, str]] = []
    for name in client_names:
        cert_path, key_path = certdir.client_paths(out_dir, name)
        if ca is not None and key_path.exists():
            # Re-running --client alice renews alice's certificate; her key stays hers.
            key = _load_client_key(key_path)
            notes.append(f"kept the existing key {key_path} and re-issued {cert_path} for it "
                         f"(to give {name} a new key, move {key_path} away first)")
        else:
            key = new_key(key_type)
            written.append((key_path, private_key_pem(key), 0o600))
        cert = build_client(key, ca_cert, ca_key, name, days, now)
        written.append((cert_path, cert_to_pem(cert), 0o644))
        clients_out[name] = (cert_path, key_path)
        issued.append((cert, name))
    _record_clients(out_dir, issued, days)

    for path, data, mode in written:
        certdir.write_atomic(path, data, mode)
    certdir.fsync_dir(out_dir)

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
    this_machine: bool = True,
    now: dt.datetime | None = None,
) -> MintResult:
    """Mint (or reuse) the local CA in ``out_dir`` and issue a server certificate and client certificates.

    An existing ``ca.pem``/``ca.key`` pair is reused unless ``force``; a half-present, mismatched,
    unreadable or expired CA, a ``server.pem`` without a CA, or a ``hosts``/``ips`` entry outside a
    reused CA's name constraints raises :class:`CertError` before anything is written.
    ``hosts`` entries that are IP addresses are treated as ``ips``. Invalid names raise ValueError.

    With a reused CA, asking only for ``clients`` leaves an existing server certificate alone;
    re-issuing the server certificate keeps the names it had unless ``reset_names``. ``this_machine=False``
    issues it for another machine (another server of the chat): without this machine's names and
    addresses, and without the names the current one had (localhost and loopback stay). The whole
    read-modify-write runs under the directory's lock (:mod:`securechat.pki.certdir`).
    """
    out_dir = Path(out_dir)
    current = utc_now(now)
    # Validate arguments before looking at the disk, so a typo never turns into a refusal message.
    split_hosts_ips(hosts := list(hosts), ips := list(ips))
    clients = list(clients)
    for client in clients:
        validate_client_name(client)
    validate_days(days)
    validate_key_type(key_type)
    with _locked_dir(out_dir):
        return _mint_locked(out_dir, hosts=hosts, ips=ips, clients=clients, days=days, key_type=key_type,
                            force=force, reset_names=reset_names or not this_machine, now=current,
                            this_machine=this_machine)


def _mint_locked(out_dir: Path, *, hosts: list[str], ips: list[str | IPAddress], clients: list[str], days: int,
                 key_type: str, force: bool, reset_names: bool, now: dt.datetime,
                 this_machine: bool = True) -> MintResult:
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
                  now=now, server=server, keep_names=not reset_names, this_machine=this_machine)


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
                            force=False, reset_names=False, now=utc_now(None))


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
    current = utc_now(now)
    with _locked_dir(out_dir):
        ca = _load_ca(out_dir, current)
        return _issue(out_dir, ca=ca, hosts=hosts, ips=ips, clients=(), days=days, key_type=key_type,
                      now=current)
