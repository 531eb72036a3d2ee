"""What ``securechat join`` remembers about a server, so ``securechat connect HOST`` needs no options.

One directory per server and port under the user's configuration directory
(``~/.config/securechat/servers/HOST_PORT/``, or under ``$XDG_CONFIG_HOST``)::

    ca.pem        the server's CA, delivered by the invite exchange
    client.pem    this machine's certificate (named invites only)
    client.key    its private key, made on this machine, mode 0600
    client.key.next  the key of a renewal whose answer has not arrived yet (asked again with it)
    profile.json  host, port, name

The directory is 0700 and every file is replaced atomically, as certs.py does for the CA.
:func:`renew_if_due` renews the client certificate over an authenticated connection once a third
of its lifetime is left; ``connect`` calls it before connecting.

The profile's CA changes only by the user's hand, as OpenSSH's ``known_hosts`` does: a renewed
certificate must be signed by the CA the profile already trusts, and the CA a renewal answer carries is
never adopted. A server whose CA really changed is joined again (``securechat join HOST CODE``: the
invite's code proves the new CA, and the profile is replaced).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securechat.client import identity
from securechat.client.enroll import Enrolled, key_pem, renew
from securechat.pki.certdir import write_atomic
from securechat.pki.enrollment import JoinError, RenewalRefused
from securechat.pki.ledger import RENEW_FRACTION  # the server's rule: the last third of the lifetime
from securechat.wire import tls

PROFILE = "profile.json"
CA = "ca.pem"
CERT = "client.pem"
KEY = "client.key"
NEXT_KEY = "client.key.next"


@dataclass(frozen=True)
class Profile:
    """A server joined with an invite."""

    host: str
    port: int
    name: str | None
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / CA

    @property
    def cert(self) -> Path:
        return self.dir / CERT

    @property
    def key(self) -> Path:
        return self.dir / KEY

    @property
    def has_cert(self) -> bool:
        return self.name is not None and self.cert.is_file() and self.key.is_file()


def servers_dir() -> Path:
    return identity.config_dir() / "servers"


def profile_dir(host: str, port: int) -> Path:
    """A directory name for ``host:port`` that no host name can escape (no ``/``, no ``..``)."""
    slug = re.sub(r"[^a-z0-9.-]", "_", host.lower()).strip(".") or "_"
    return servers_dir() / f"{slug}_{port}"


def prepare(host: str, port: int) -> Path:
    """Create the profile directory (0700) before anything is asked of the server, so an unwritable
    configuration directory fails before an invite is spent."""
    d = profile_dir(host, port)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    return d


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise renewals of one profile: two ``connect`` at once must not interleave key and certificate."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock; renewals there are not serialised
        yield
        return
    with open(d / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save(host: str, port: int, enrolled: Enrolled) -> Profile:
    """Store what a join brought (replacing an earlier profile for the same server)."""
    d = prepare(host, port)
    write_atomic(d / CA, enrolled.ca_pem, 0o644)
    if enrolled.cert_pem is not None and enrolled.key_pem is not None:
        write_atomic(d / KEY, enrolled.key_pem, 0o600)
        write_atomic(d / CERT, enrolled.cert_pem, 0o644)
    else:  # a guest invite: an older named certificate for this server no longer applies
        for stale in (d / KEY, d / CERT):
            stale.unlink(missing_ok=True)
    meta = {"host": host, "port": port, "name": enrolled.name}
    write_atomic(d / PROFILE, json.dumps(meta).encode("utf-8"), 0o644)
    return Profile(host, port, enrolled.name, d)


def load(host: str, port: int) -> Profile | None:
    """The profile for ``host:port``, or None if this machine never joined it."""
    d = profile_dir(host, port)
    try:
        meta = json.loads((d / PROFILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not (d / CA).is_file():
        return None
    name = meta.get("name")
    return Profile(host, port, name if isinstance(name, str) else None, d)


# Profiles read when a server is recognised by its CA (one per server joined, so a handful; bounded).
MAX_PROFILES = 1000


def every() -> list[Profile]:
    """Every saved profile, in directory order (a server found on the LAN is matched to them by its CA)."""
    try:
        dirs = sorted(servers_dir().iterdir())[:MAX_PROFILES]
    except OSError:
        return []
    found = []
    for d in dirs:
        try:
            meta = json.loads((d / PROFILE).read_text("utf-8"))
            host, port, name = meta["host"], meta["port"], meta.get("name")
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if isinstance(host, str) and isinstance(port, int) and (d / CA).is_file():
            found.append(Profile(host, port, name if isinstance(name, str) else None, d))
    return found


def context(profile: Profile, *, tls_min: str = tls.DEFAULT_TLS_MIN) -> ssl.SSLContext:
    """A client context that trusts the profile's CA and presents its certificate, if any."""
    if profile.has_cert:
        return tls.client_context(profile.ca, tls_min=tls_min, certfile=profile.cert, keyfile=profile.key)
    return tls.client_context(profile.ca, tls_min=tls_min)


def renewal_due(cert_file: Path, now: dt.datetime) -> bool:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) * RENEW_FRACTION


def renew_if_due(profile: Profile, *, now: dt.datetime | None = None, tls_min: str = tls.DEFAULT_TLS_MIN,
                 timeout: float = 10.0, say: Callable[[str], None] = lambda _: None) -> bool:
    """Renew the profile's certificate when a third of its life is left; True if renewed.

    Failures are told through ``say`` and otherwise ignored: the current certificate still works
    until it expires (and the server then says so). ``now`` replaces the clock (tests).
    """
    if not profile.has_cert:
        return False
    with _locked(profile.dir):
        return _renew_if_due(profile, now or dt.datetime.now(dt.timezone.utc), tls_min, timeout, say)


def _renew_if_due(profile: Profile, now: dt.datetime, tls_min: str, timeout: float,
                  say: Callable[[str], None]) -> bool:
    try:
        if not renewal_due(profile.cert, now):
            return False
        if now >= x509.load_pem_x509_certificate(profile.cert.read_bytes()).not_valid_after_utc:
            say(f"your certificate for {profile.host} expired on {_not_after(profile.cert)}: ask for a new "
                f"invite and run 'securechat join {profile.host} CODE' again")
            return False
        # The key is kept before it is used: if the answer is lost, the server (which recorded the
        # renewal, and from then on refuses the old certificate) sends the same certificate again.
        key = _next_key(profile)
        key, cert_pem, _ = renew(profile.host, profile.port, context(profile, tls_min=tls_min), key=key,
                                 timeout=timeout)
    except RenewalRefused as exc:
        say(f"your certificate for {profile.host} cannot be renewed: {exc}")
        _drop_next_key(profile)
        return False
    except (JoinError, OSError, ValueError, ssl.SSLError) as exc:
        say(f"could not renew your certificate for {profile.host} ({exc}); it stays valid until "
            f"{_not_after(profile.cert)}")
        return False
    why = _not_a_renewal(profile, cert_pem)
    if why is not None:
        say(f"refused the renewed certificate from {profile.host}: {why}; nothing was changed")
        _drop_next_key(profile)
        return False
    # Key first: a crash between the two leaves a new key with the old certificate, which the
    # mismatch check in connect reports, rather than a certificate nobody holds the key of.
    try:
        write_atomic(profile.key, key_pem(key), 0o600)
        write_atomic(profile.cert, cert_pem, 0o644)
        _drop_next_key(profile)
    except OSError as exc:
        say(f"could not save the renewed certificate in {profile.dir} ({exc.strerror or exc}): join again with "
            "a new invite if connecting fails")
        return False
    say(f"renewed your certificate for {profile.host}: valid until {_not_after(profile.cert)}")
    return True


def _next_key(profile: Profile) -> ec.EllipticCurvePrivateKey:
    """The key of an unanswered renewal, or a new one, saved (0600) before it is asked for."""
    path = profile.dir / NEXT_KEY
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    except (OSError, ValueError, TypeError):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    write_atomic(path, key_pem(key), 0o600)
    return key


def _drop_next_key(profile: Profile) -> None:
    (profile.dir / NEXT_KEY).unlink(missing_ok=True)


def _not_a_renewal(profile: Profile, cert_pem: bytes) -> str | None:
    """Why ``cert_pem`` is not a renewal of the profile's certificate by the profile's own CA, or None.

    The CA the server sent along is ignored: trusting it would let anyone holding any server key from
    the CA (any server of a cluster) replace this profile's trust anchor for good.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(profile.ca.read_bytes())
        current = x509.load_pem_x509_certificate(profile.cert.read_bytes())
    except (OSError, ValueError) as exc:
        return f"it cannot be checked ({exc})"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        fingerprint = tls.fingerprint(ca.public_bytes(serialization.Encoding.DER))
        return (f"it is not signed by the CA this profile trusts ({fingerprint}); if the server's CA really "
                f"changed, join again with a new invite")
    if cert.subject != current.subject:
        return "it is for another name"
    return None


def _not_after(cert_file: Path) -> str:
    try:
        return f"{x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    except (OSError, ValueError):
        return "its expiry"
