"""Knowing whom you talk to without a CA file: fingerprint pinning and trust on first use.

``securechat connect HOST --pin AA:BB:...`` trusts exactly the server whose certificate has that
SHA-256 fingerprint (the server prints it at start; ``securechat fingerprint certs/server.pem``
shows it too). ``--tofu`` remembers the fingerprint seen at first contact, like SSH's
``known_hosts``, and refuses loudly if it ever changes.

In both modes the CA chain and host name are not checked: the exact fingerprint replaces them,
and it is the stronger statement of the two.
"""

from __future__ import annotations

import argparse
import datetime
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from securechat import options, tls


class IdentityError(Exception):
    """The server is not the one the user asked for; the message says why and what to do."""


def pinned_context(*, tls_min: str = tls.DEFAULT_TLS_MIN, certfile: str | Path | None = None,
                   keyfile: str | Path | None = None) -> ssl.SSLContext:
    """A client context for pinning/TOFU: no CA, no host name; the caller checks the fingerprint."""
    ctx = tls.client_context(tls_min=tls_min, certfile=certfile, keyfile=keyfile)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _unverified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the peer sent, leaf first, as DER."""
    public = getattr(sock, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        return [bytes(c) for c in public() or []]
    sslobj = getattr(sock, "_sslobj", None)  # 3.10-3.12 have the same method, not yet public
    if sslobj is not None and hasattr(sslobj, "get_unverified_chain"):
        import _ssl

        return [c.public_bytes(_ssl.ENCODING_DER) for c in sslobj.get_unverified_chain() or []]
    leaf = sock.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def presented_identities(sock: ssl.SSLSocket) -> list[str]:
    """Fingerprints that identify the server: its certificate's, then each CA's that provably signed it.

    An unverified chain can carry anybody's public CA certificate, so a CA counts only when the
    certificate below it verifies under its key, and the leaf only while it is in its validity period.
    """
    chain = _unverified_chain(sock)
    if not chain:
        raise IdentityError("the server presented no certificate")
    prints = [tls.fingerprint(chain[0])]
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    now = datetime.datetime.now(datetime.timezone.utc)
    if not certs[0].not_valid_before_utc <= now <= certs[0].not_valid_after_utc:
        raise IdentityError(f"the server's certificate is not valid now (valid {certs[0].not_valid_before_utc:%Y-%m-%d}"
                            f" to {certs[0].not_valid_after_utc:%Y-%m-%d})")
    for child, parent, der in zip(certs, certs[1:], chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            break
        prints.append(tls.fingerprint(der))
    return prints


def check_pin(sock: ssl.SSLSocket, pin: str) -> str:
    """Raise IdentityError unless the server's certificate (or a CA that signed it) has fingerprint ``pin``."""
    expected = tls.normalise_fingerprint(pin)
    presented = presented_identities(sock)
    if expected not in presented:
        raise IdentityError(
            f"the server's certificate does not match the pinned fingerprint: expected {expected}, "
            f"presented {presented[0]}. Check the fingerprint the server printed at start "
            "(or 'securechat fingerprint certs/server.pem' on the server)")
    return expected


def config_dir() -> Path:
    """The user's securechat configuration directory (XDG on Unix)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "securechat"


def known_hosts_path() -> Path:
    return config_dir() / "known_hosts"


class KnownHosts:
    """``host:port FINGERPRINT`` lines, one per server first met with ``--tofu``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or known_hosts_path()

    @staticmethod
    def key(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def load(self) -> dict[str, str]:
        entries: dict[str, str] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return entries
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                entries[parts[0]] = parts[1]
        return entries

    def remember(self, host: str, port: int, fingerprint: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{self.key(host, port)} {fingerprint}\n")

    def check(self, sock: ssl.SSLSocket, host: str, port: int) -> tuple[str, bool]:
        """Check the server against what was seen before; remember it on first contact.

        What is remembered is the top of the verified chain (the local CA when the server sends it),
        so the server renewing its own certificate from the same CA is not a change.
        Returns (fingerprint, first_contact). Raises IdentityError when it changed.
        """
        identities = presented_identities(sock)
        presented = identities[-1]
        key = self.key(host, port)
        known = self.load().get(key)
        if known is None:
            self.remember(host, port, presented)
            return presented, True
        if known not in identities:
            raise IdentityError(
                f"WARNING: the certificate of {key} has CHANGED since you first connected: it was {known}, "
                f"it is now {presented}. Someone may be impersonating the server, or it was given a new "
                f"certificate. If you are sure it is legitimate, delete the line for {key} from {self.path}")
        return presented, False


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="securechat fingerprint",
        description="Print the SHA-256 fingerprint of certificate files, to compare with what a server shows "
        "(or to pass to 'securechat connect --pin').")
    p.add_argument("files", nargs="+", type=options.path, metavar="FILE", help="PEM certificate file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat fingerprint FILE...``: 0, or 1 if a file could not be read (or stdout written)."""
    prog = "securechat fingerprint"
    args = build_parser().parse_args(argv)
    status = 0
    for path in args.files:
        try:
            fp = tls.file_fingerprint(path)
        except (OSError, ValueError) as exc:
            options.print_error(prog, f"{path}: {exc.strerror if isinstance(exc, OSError) else exc}")
            status = 1
            continue
        if not options.write_stdout(prog, (fp if len(args.files) == 1 else f"{fp}  {path}") + "\n"):
            return 1
    return status
