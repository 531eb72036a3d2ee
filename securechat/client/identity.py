"""Knowing whom you talk to without a CA file: fingerprint pinning and trust on first use.

``securechat connect HOST --pin AA:BB:...`` trusts the server whose CA certificate (or, stricter,
whose own certificate) has that SHA-256 fingerprint: the server prints both at start, the CA's on
its ``[SERVER] CA SHA-256 fingerprint`` line. ``--tofu`` remembers the CA fingerprint seen at first
contact, like SSH's ``known_hosts``, and refuses loudly if it ever changes.

One verification path. A fingerprint only says *which* certificate to trust; whether the server is
acceptable is decided by OpenSSL exactly as with ``--ca``: the client first fetches the chain the
server presents over a probe connection (:func:`fetch_chain`: a TLS handshake with no client
certificate, then closed; not a byte of application data, no nickname), picks from it the one
certificate the fingerprint names (:meth:`ServerTrust.choose`), and then connects for real with a
normal verifying context that trusts only that certificate (:meth:`ServerTrust.context`): the leaf
must be a server certificate (serverAuth, not a CA), valid now, naming the host or address
connected to, and chain to the pinned certificate. So a *client* certificate from the same CA, or
anything else ``--ca`` would refuse, is refused here too, and the user's own client certificate is
only ever sent to a server that passed all of that.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from securechat.wire import options, tls

if TYPE_CHECKING:
    from cryptography import x509


class IdentityError(Exception):
    """The server is not the one the user asked for; the message says why and what to do."""


# OpenSSL X509_V_ERR_* codes, grouped by what they mean to the user.
X509_NOT_YET_VALID = 9
X509_EXPIRED = 10
X509_INVALID_PURPOSE = 26  # "unsuitable certificate purpose": e.g. a client certificate
X509_HOSTNAME_MISMATCH = 62
X509_IP_ADDRESS_MISMATCH = 64
X509_UNTRUSTED = frozenset({
    2,  # unable to get issuer certificate
    7,  # certificate signature failure
    18,  # self-signed certificate
    19,  # self-signed certificate in chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
})
X509_NOT_A_CA = frozenset({24, 25, 32})  # invalid CA certificate, path length exceeded, key usage lacks certSign

# Where the server shows each fingerprint (securechat.server.serve prints both lines at start).
SERVER_CA_LINE = "[SERVER] CA SHA-256 fingerprint"
SERVER_CERT_LINE = "[SERVER] Server certificate SHA-256 fingerprint"


def _unverified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the peer sent, leaf first, as DER (also after a failed handshake)."""
    public = getattr(sock, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        try:
            return [bytes(c) for c in public() or []]
        except (ValueError, ssl.SSLError):
            return []
    sslobj = getattr(sock, "_sslobj", None)  # 3.10-3.12 have the same method, not yet public
    if sslobj is not None and hasattr(sslobj, "get_unverified_chain"):
        import _ssl

        return [c.public_bytes(_ssl.ENCODING_DER) for c in sslobj.get_unverified_chain() or []]
    try:
        leaf = sock.getpeercert(binary_form=True)
    except ValueError:  # handshake not done
        return []
    return [leaf] if leaf else []


def fetch_chain(raw: socket.socket, server_hostname: str | None, *, tls_min: str = tls.DEFAULT_TLS_MIN,
                ) -> list[bytes]:
    """The certificate chain (DER, leaf first) the server on ``raw`` presents; ``raw`` is closed.

    The probe completes the TLS handshake without a client certificate and without checking
    anything, then closes: it sends no application data at all. A server that
    insists on a client certificate still shows its chain first (TLS 1.3 ends our side of the
    handshake before it can object; with TLS 1.2 its refusal comes after its certificate), so that
    refusal is not an error here. Raises ``ssl.SSLError``/``OSError`` as ``wrap_socket`` would when
    no chain could be had, and IdentityError when the server presented no certificate.
    """
    ctx = tls.client_context(tls_min=tls_min)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but hashes
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_hostname, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        try:
            sock.do_handshake()
        except ssl.SSLError:
            chain = _unverified_chain(sock)
            if not chain:
                raise
            return chain
        chain = _unverified_chain(sock)
        # Closed without reading on (no unwrap()): what the server sends next (tickets, its greeting,
        # or the alert of a server that wanted a certificate) is of no interest, and reading an alert
        # would leave an error in OpenSSL's queue for the next call to trip over.
    finally:
        sock.close()
    if not chain:
        raise IdentityError("the server presented no certificate")
    return chain


def _load(der: bytes) -> x509.Certificate | None:
    from cryptography import x509  # only for --pin / --tofu: every client start would pay for it

    try:
        return x509.load_der_x509_certificate(der)
    except Exception:  # ValueError, InvalidVersion...: unparseable here; OpenSSL has the last word
        return None


def top_of_chain(chain: Sequence[bytes]) -> int:
    """Index of the highest certificate in ``chain`` that provably signed the one below it.

    An unverified chain can carry anybody's public CA certificate, so a CA counts only when the
    certificate below it verifies under its key; whatever cannot be parsed ends the walk.
    """
    from cryptography.exceptions import InvalidSignature

    top = 0
    child = _load(chain[0]) if chain else None
    for i in range(1, len(chain)):
        parent = _load(chain[i])
        if child is None or parent is None:
            break
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            break
        top, child = i, parent
    return top


def describe_chain(chain: Sequence[bytes]) -> str:
    """``server certificate AA:..., CA certificate BB:...``: which fingerprint is which."""
    parts = [f"server certificate {tls.fingerprint(chain[0])}"]
    parts += [f"CA certificate {tls.fingerprint(der)}" for der in chain[1:]]
    return ", ".join(parts)


def kind_of(index: int) -> str:
    """What the certificate at ``index`` of a presented chain is, in the words of the server's lines."""
    return "server certificate" if index == 0 else "CA certificate"


def line_for(kind: str) -> str:
    """The server's start-up line that shows the fingerprint of a certificate of ``kind``."""
    return SERVER_CERT_LINE if kind == "server certificate" else SERVER_CA_LINE


class ServerTrust:
    """How ``--pin`` and ``--tofu`` recognise a server: pick one certificate, let OpenSSL do the rest.

    ``prepare(ctx)``, if given, is applied to every verifying context before use (the command line
    loads the user's client certificate there, so it is only sent once the server has passed).
    """

    def __init__(self, *, tls_min: str = tls.DEFAULT_TLS_MIN,
                 prepare: Callable[[ssl.SSLContext], object] | None = None) -> None:
        self.tls_min = tls_min
        self.prepare = prepare
        self.anchor_kind = "CA certificate"
        self.anchor_fingerprint = ""

    def choose(self, chain: Sequence[bytes]) -> bytes:
        """The DER certificate from ``chain`` to trust; IdentityError when none may be trusted."""
        raise NotImplementedError

    def context(self, anchor: bytes) -> ssl.SSLContext:
        """A normal verifying client context (host name checked) whose only trust anchor is ``anchor``.

        ``VERIFY_X509_PARTIAL_CHAIN`` lets the anchor be the server's own certificate or an
        intermediate, not only a self-signed root; every other check is OpenSSL's, as with ``--ca``.
        """
        ctx = tls.client_context(tls_min=self.tls_min)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        try:
            try:
                ctx.load_verify_locations(cadata=anchor)
            except ssl.SSLError:
                # CPython judges this call by the last error in OpenSSL's per-thread queue, which an
                # earlier TLS failure may have left behind; the failed call cleared it, so try once more.
                ctx.load_verify_locations(cadata=anchor)
        except (ssl.SSLError, ValueError):
            raise IdentityError("the server presented a malformed certificate (OpenSSL cannot load it): "
                                "it is not a securechat server, or its certificate file is damaged") from None
        if self.prepare is not None:
            self.prepare(ctx)
        return ctx

    def confirmed(self) -> None:
        """Called once the verified handshake has succeeded (TOFU remembers the server here)."""

    def explain(self, code: int, message: str, name: str) -> str:
        """Why OpenSSL refused the server, in words (``code`` is the X509_V_ERR_* number)."""
        what = f"the certificate the server presented (pinned {self.anchor_kind} {self.anchor_fingerprint})"
        if code == X509_INVALID_PURPOSE:
            return (f"the server's certificate is signed by the pinned {self.anchor_kind} but is not a server "
                    "certificate (unsuitable certificate purpose: a client certificate?): someone holding a "
                    "certificate from that CA may be posing as the server")
        if code in (X509_EXPIRED, X509_NOT_YET_VALID):
            state = "has expired" if code == X509_EXPIRED else "is not valid yet"
            return (f"the server's certificate {state}: check both clocks, or re-issue it on the server with "
                    "'securechat gen-certs'")
        if code in (X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH):
            option = "--ip" if code == X509_IP_ADDRESS_MISMATCH else "--host"
            return (f"the server's certificate is not valid for {name!r}: connect with a name or address it "
                    f"was issued for, or re-issue it on the server with 'securechat gen-certs {option} {name}' (a "
                    "running server loads it within seconds)")
        if code in X509_UNTRUSTED:
            return (f"the server's certificate is not signed by the pinned {self.anchor_kind} "
                    f"{self.anchor_fingerprint}: someone may be impersonating the server")
        if code in X509_NOT_A_CA:
            return f"{what} cannot sign server certificates ({message})"
        return f"{what} was refused: {message}"


class PinTrust(ServerTrust):
    """``--pin``: trust the certificate in the server's chain with this SHA-256 fingerprint."""

    def __init__(self, pin: str, *, tls_min: str = tls.DEFAULT_TLS_MIN,
                 prepare: Callable[[ssl.SSLContext], object] | None = None) -> None:
        super().__init__(tls_min=tls_min, prepare=prepare)
        self.pin = tls.normalise_fingerprint(pin)  # ValueError now rather than at connect time

    def choose(self, chain: Sequence[bytes]) -> bytes:
        for i, der in enumerate(chain):
            if tls.fingerprint(der) == self.pin:
                self.anchor_kind, self.anchor_fingerprint = kind_of(i), self.pin
                return der
        raise IdentityError(
            f"no certificate of the server matches the pinned fingerprint: expected {self.pin}, presented "
            f"{describe_chain(chain)}. Pin the fingerprint on the server's '{SERVER_CA_LINE}' line "
            "(or 'securechat fingerprint certs/ca.pem' on the server)")


def check_pin(chain: Sequence[bytes], pin: str) -> str:
    """The pinned fingerprint if a certificate in ``chain`` has it; IdentityError otherwise."""
    PinTrust(pin).choose(chain)
    return tls.normalise_fingerprint(pin)


def config_dir() -> Path:
    """The user's securechat configuration directory (XDG on Unix)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "securechat"


def known_hosts_path() -> Path:
    return config_dir() / "known_hosts"


class KnownHosts:
    """``host:port FINGERPRINT`` lines, one per server first met with ``--tofu``.

    The file is read as bytes, line by line: a line that is not UTF-8 or not two fields is ignored
    (as OpenSSH does), unless it is the entry for the server being checked, which is then an error
    (a damaged entry must not silently become a new first contact).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or known_hosts_path()

    @staticmethod
    def key(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def load(self) -> dict[str, str]:
        """Every readable entry: key -> fingerprint (``AA:BB:...``)."""
        entries: dict[str, str] = {}
        for raw in self._read().splitlines():
            parsed = self._parse(raw)
            if parsed is not None:
                entries[parsed[0]] = parsed[1]
        return entries

    @staticmethod
    def _parse(raw: bytes) -> tuple[str, str] | None:
        try:
            parts = raw.decode("utf-8").split()
            if len(parts) != 2 or parts[0].startswith("#"):
                return None
            return parts[0], tls.normalise_fingerprint(parts[1])
        except ValueError:  # UnicodeDecodeError included
            return None

    def lookup(self, host: str, port: int) -> str | None:
        """The fingerprint remembered for ``host:port``, None if never met; IdentityError if damaged."""
        key = self.key(host, port)
        found = None
        for number, raw in enumerate(self._read().splitlines(), 1):
            if not raw.startswith(key.encode() + b" ") and not raw.startswith(key.encode() + b"\t"):
                continue
            parsed = self._parse(raw)
            if parsed is None:
                raise IdentityError(f"line {number} of {self.path} (the entry for {key}) is damaged: fix it, or "
                                    "delete it to meet the server afresh")
            found = parsed[1]
        return found

    def remember(self, host: str, port: int, fingerprint: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a last line without its newline would swallow ours
                    f.write(b"\n")
            f.write(f"{self.key(host, port)} {fingerprint}\n".encode())


class TofuTrust(ServerTrust):
    """``--tofu``: trust what was seen at first contact (the CA, when the server sends it).

    What is remembered is the top of the chain the server proves (the local CA when the server sends
    it), so the server renewing its own certificate from the same CA is not a change; it is written
    only after the verified handshake succeeded. ``on_first_contact(key, fingerprint, path, kind)``
    is told about a first contact (``kind``: "CA certificate" or "server certificate"). ``ask``, with
    the same arguments, is asked before anything is trusted (a person at a terminal): False refuses
    the server, and nothing is saved.
    """

    def __init__(self, host: str, port: int, known: KnownHosts | None = None,
                 on_first_contact: Callable[[str, str, Path, str], None] | None = None, *,
                 tls_min: str = tls.DEFAULT_TLS_MIN,
                 prepare: Callable[[ssl.SSLContext], object] | None = None,
                 ask: Callable[[str, str, Path, str], bool] | None = None) -> None:
        super().__init__(tls_min=tls_min, prepare=prepare)
        self.host, self.port = host, port
        self.known = known or KnownHosts()
        self.on_first_contact = on_first_contact
        self.ask = ask
        self._first = False

    def choose(self, chain: Sequence[bytes]) -> bytes:
        key = self.known.key(self.host, self.port)
        try:
            remembered = self.known.lookup(self.host, self.port)
        except OSError as exc:
            raise IdentityError(f"cannot read the known hosts file {self.known.path} ({_strerror(exc)}): fix "
                                "it, or connect with --pin FINGERPRINT or --ca instead") from None
        if remembered is None:
            index = top_of_chain(chain)
            self._first = True
        else:
            prints = [tls.fingerprint(der) for der in chain]
            if remembered not in prints:
                raise IdentityError(
                    f"WARNING: the certificate of {key} has CHANGED since you first connected: it was "
                    f"{remembered}, it now presents {describe_chain(chain)}. Someone may be impersonating the "
                    f"server, or it was given a new CA. If you are sure it is legitimate, delete the line for "
                    f"{key} from {self.known.path}")
            index = prints.index(remembered)
        self.anchor_kind, self.anchor_fingerprint = kind_of(index), tls.fingerprint(chain[index])
        # Asked between the probe and the real connection: no server waits on a person reading a fingerprint.
        if self._first and self.ask is not None and \
                not self.ask(key, self.anchor_fingerprint, self.known.path, self.anchor_kind):
            raise IdentityError(f"not trusted, so nothing was saved in {self.known.path}; connect again once you "
                                f"have compared the fingerprint with the server's '{line_for(self.anchor_kind)}' line")
        return chain[index]

    def confirmed(self) -> None:
        if not self._first:
            return
        try:
            self.known.remember(self.host, self.port, self.anchor_fingerprint)
        except OSError as exc:
            raise IdentityError(f"cannot write the known hosts file {self.known.path} ({_strerror(exc)}): fix "
                                "it, or connect with --pin FINGERPRINT or --ca instead") from None
        self._first = False
        if self.on_first_contact is not None:
            self.on_first_contact(self.known.key(self.host, self.port), self.anchor_fingerprint, self.known.path,
                                  self.anchor_kind)


def _strerror(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


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
