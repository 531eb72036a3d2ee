"""Automatic renewal of the server certificate from the local CA, without a restart.

Server certificates live 90 days (Mozilla "modern"). When the server's certificate directory also
holds the local CA (``ca.pem`` + ``ca.key``, as ``securechat gen-certs`` leaves it), a
:class:`CertRenewer` re-issues ``server.pem``/``server.key`` once the certificate is within
:data:`RENEW_BEFORE` of its end, at start and then every :data:`CHECK_INTERVAL`, keeping the
certificate's names and addresses. It then builds a *new* context and assigns it to
``server.ssl_context``: the server reads that attribute afresh for every handshake, so new
connections get the new certificate while connections already open keep theirs.

Without the CA key nothing can be re-issued: the renewer logs a warning with the days left (an error
once expired) at start and at every check within :data:`RENEW_BEFORE`. Certificate files replaced
(``securechat gen-certs --ip ADDR`` run beside a running server, or files copied over from the CA's
machine) are noticed within :data:`WATCH_INTERVAL` and loaded the same way, and the log says so.

The clock is injectable (``now``) and :meth:`CertRenewer.check_once` runs one check directly, so
tests use short-lived certificates and a fake clock instead of waiting.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from securechat.pki import builders, certdir, certs
from securechat.wire import tls

log = logging.getLogger("securechat.renewal")

#: renew (or start warning) when the certificate has less than this left
RENEW_BEFORE = dt.timedelta(days=30)
#: seconds between two checks while the server runs
CHECK_INTERVAL = 24 * 60 * 60.0
#: seconds between two looks at the files' metadata (two stat() calls): a certificate re-issued with
#: ``gen-certs`` (a new name, a new address) is served within about this long, no restart needed
WATCH_INTERVAL = 1.0


class HasContext(Protocol):
    """What the renewer needs of a server: the attribute read at every handshake."""

    ssl_context: ssl.SSLContext | None


class Outcome(enum.Enum):
    """What one :meth:`CertRenewer.check_once` did."""

    VALID = "valid for more than the renewal margin"
    RENEWED = "renewed from the local CA and loaded"
    RELOADED = "certificate file changed on disk and was loaded"
    EXPIRING = "expires soon and cannot be renewed here"
    EXPIRED = "expired and cannot be renewed here"
    FAILED = "renewal or reading the certificate failed"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _days(delta: dt.timedelta) -> float:
    return delta.total_seconds() / 86400


def read_sans(path: str | Path) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of the subjectAltName of the first certificate in ``path``."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    addrs = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    return names, addrs


def _key_type(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return "rsa" if isinstance(cert.public_key(), rsa.RSAPublicKey) else "ec"


def ca_dir_for(cert: str | Path, key: str | Path) -> tuple[Path | None, str]:
    """The directory whose CA can renew ``cert``/``key``, or None and why not.

    Renewal writes ``DIR/server.pem`` and ``DIR/server.key`` (what ``gen-certs`` writes), so it only
    manages a certificate that is exactly those files beside ``ca.pem`` and ``ca.key``.
    """
    cert, key = Path(cert), Path(key)
    directory = cert.parent
    if not (directory / certs.CA_KEY).exists():
        return None, f"no CA key ({certs.CA_KEY}) beside {cert}"
    if not (directory / certs.CA_CERT).exists():
        return None, f"no CA certificate ({certs.CA_CERT}) beside {cert}"
    managed = (directory / certs.SERVER_CERT, directory / certs.SERVER_KEY)
    if (cert.resolve(), key.resolve()) != (managed[0].resolve(), managed[1].resolve()):
        return None, (
            f"renewal writes {managed[0]} and {managed[1]}, but the server uses {cert} and {key}"
        )
    return directory, ""


class CertRenewer:
    """Keep ``server.ssl_context`` on a valid certificate: renew from the local CA, or warn.

    ``build_context`` builds a fresh server context from the (new) files; by default
    ``tls.server_context(cert, key, tls_min=tls_min)``. ``auto_renew=False`` only warns.
    """

    def __init__(
        self,
        server: HasContext,
        cert: str | Path,
        key: str | Path,
        *,
        tls_min: str = tls.DEFAULT_TLS_MIN,
        build_context: Callable[[], ssl.SSLContext] | None = None,
        now: Callable[[], dt.datetime] = utc_now,
        renew_before: dt.timedelta = RENEW_BEFORE,
        interval: float = CHECK_INTERVAL,
        days: int = builders.DEFAULT_DAYS,
        auto_renew: bool = True,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self.server = server
        self.cert = Path(cert)
        self.key = Path(key)
        self.build_context = build_context or (
            lambda: tls.server_context(self.cert, self.key, tls_min=tls_min)
        )
        self.now = now
        self.renew_before = renew_before
        self.interval = interval
        self.watch_interval = watch_interval
        self.days = days
        self.ca_dir, self.why_not = ca_dir_for(self.cert, self.key) if auto_renew else (None, "--no-renew")
        self._loaded = self._file_fingerprint()  # what the server's current context was built from
        self._seen = self._files()  # the files' metadata at the last check
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one check at a time (the thread and a direct call)

    @property
    def can_renew(self) -> bool:
        return self.ca_dir is not None

    def _files(self) -> tuple[tuple[int, int, int], ...] | None:
        """(inode, size, mtime) of the certificate and key files: any replacement changes one of them."""
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (self.cert.stat(), self.key.stat()))
        except OSError:
            return None

    def _file_fingerprint(self) -> str | None:
        try:
            return tls.file_fingerprint(self.cert)
        except (OSError, ValueError):
            return None

    # -- one check -----------------------------------------------------------------------

    def check_once(self) -> Outcome:
        """Check the certificate now: renew and load it, load a replaced file, or warn."""
        with self._lock:
            self._seen = self._files()  # before reading them: a change made meanwhile is seen next time
            try:
                return self._check()
            except Exception:  # a renewal bug must never take the server down
                log.exception("certificate check failed")
                return Outcome.FAILED

    def _check(self) -> Outcome:
        now = self.now()
        try:
            not_after = certs.cert_not_after(self.cert)
        except (OSError, ValueError) as exc:
            log.error("cannot read the server certificate %s: %s", self.cert, exc)
            return Outcome.FAILED
        left = not_after - now
        if left > self.renew_before:
            if self._file_fingerprint() != self._loaded:
                return self._reload(not_after, Outcome.RELOADED, "changed on disk and was loaded")
            log.info("server certificate %s valid until %s (%.0f days left)", self.cert,
                     f"{not_after:%Y-%m-%d %H:%M} UTC", _days(left))
            return Outcome.VALID
        if self.ca_dir is not None:
            return self._renew(now, left)
        ends = f"{not_after:%Y-%m-%d %H:%M} UTC"
        hint = (f"renew it with 'securechat gen-certs' where the CA is and copy server.pem/server.key "
                f"here (picked up within a day), or restart ({self.why_not})")
        if left <= dt.timedelta(0):
            log.error("server certificate %s EXPIRED %.0f days ago (%s): clients refuse it; %s",
                      self.cert, -_days(left), ends, hint)
            return Outcome.EXPIRED
        log.warning("server certificate %s expires in %.1f days (%s); %s", self.cert, _days(left), ends, hint)
        return Outcome.EXPIRING

    def _renew(self, now: dt.datetime, left: dt.timedelta) -> Outcome:
        assert self.ca_dir is not None
        names, addrs = read_sans(self.cert)
        try:
            result = certs.issue_server_cert(
                self.ca_dir,
                hosts=names,
                ips=[ipaddress.ip_address(a) for a in addrs],
                days=self.days,
                key_type=_key_type(self.cert),
                now=now,
            )
        except (certs.CertError, OSError, ValueError) as exc:
            level = logging.ERROR if left <= dt.timedelta(0) else logging.WARNING
            log.log(level, "cannot renew the server certificate %s (%.1f days left): %s",
                    self.cert, _days(left), exc)
            return Outcome.FAILED
        for note in result.notes:
            log.info("renewal: %s", note)
        return self._reload(result.server_not_after, Outcome.RENEWED, "renewed from the local CA and loaded")

    def _reload(self, not_after: dt.datetime, outcome: Outcome, why: str) -> Outcome:
        try:
            # Shared lock: never the key of one gen-certs/renewal run with the certificate of another.
            with certdir.locked(self.cert.parent, shared=True):
                context = self.build_context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("cannot load the server certificate %s (%s): %s; still serving the old one",
                      self.cert, why, exc)
            return Outcome.FAILED
        self.server.ssl_context = context  # new handshakes use it; open connections keep theirs
        self._loaded = self._file_fingerprint()
        try:
            names, addrs = read_sans(self.cert)
        except (OSError, ValueError):
            names, addrs = [], []
        log.warning("server certificate %s %s, no restart needed: valid for %s until %s UTC; new SHA-256 "
                    "fingerprint %s (clients that pinned the old fingerprint must update it)", self.cert, why,
                    ", ".join(dict.fromkeys([*names, *addrs])) or "no names", f"{not_after:%Y-%m-%d %H:%M}",
                    self._loaded)
        return outcome

    # -- background thread ---------------------------------------------------------------

    def start(self) -> None:
        """Check every ``interval`` seconds in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="securechat-renewal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, min(self.watch_interval, due - time.monotonic()))):
            if time.monotonic() >= due:
                due = time.monotonic() + self.interval
                self.check_once()
            elif self._files() != self._seen:  # replaced (gen-certs here, or copied over): load it now
                self.check_once()

    def stop(self, timeout: float = 5.0) -> None:
        """End the background thread; returns at once unless a check is running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
