"""Joining with an invite code, and renewing a client certificate: both ends of the wire exchange.

Enrollment shares the chat port. The joiner offers the ALPN protocol :data:`ALPN` in its TLS
ClientHello and the server selects it; a chat client (ours, ``openssl s_client``, ``ncat``) offers
no ALPN, or another one, and chats exactly as before. Nothing is ever guessed from the bytes.

The join, over that TLS connection (the joiner does not know the CA yet, so it does not verify the
certificate; the exchange below does, with the code)::

    joiner -> server   JOIN <nameplate> <SPAKE2 message A>
    server -> joiner   PAKE <SPAKE2 message B>                 (or ERR <why>: expired, used, ...)
    joiner -> server   CONFIRM <fingerprint it saw> <MAC_c> <CSR>
    server -> joiner   OK <name|-> <certificate|-> <CA certificate> <MAC_s>     (or ERR <why>)

Both sides derive the key K from SPAKE2 and the code. ``MAC_c = HMAC(K, "client", F, H(CSR))`` where
F is the SHA-256 of the server certificate *as the joiner saw it*; the server checks it against the
certificate it presents itself. A relay that terminates TLS with its own certificate gets a joiner's
MAC over the wrong F, which it cannot fix without K, and K needs the code: the server refuses
(logging it), issues nothing, and counts a wrong try. ``MAC_s`` covers F, the CSR and everything the
server sends, so the joiner only stores a CA the code holder vouched for. A recording of the whole
exchange gives no way to test guesses offline (that is what a PAKE is for); each online guess costs
one of the invite's tries, counted *before* the answer is computed, so concurrent guesses cannot
exceed the bound.

Renewal is the same ALPN on a connection that presents the current client certificate (verified by
TLS against the CA): ``RENEW <CSR>`` -> ``OK <certificate> <CA certificate>``. A revoked certificate
is refused.

The private key is made on the joiner's machine and never travels; only the CSR does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from securechat import DEFAULT_PORT, certs, options, protocol, tls
from securechat.conn import describe_error
from securechat.console import announce
from securechat.invites import (
    REVOCATION_POLL,
    InviteError,
    Store,
    StoreError,
    parse_code,
    serial_hex,
)

log = logging.getLogger("securechat.enroll")

ALPN = "securechat-enroll/1"

# SPAKE2 identities: both sides must use the same ones, and they tie K to this protocol.
ID_JOINER = b"securechat join (joiner)"
ID_SERVER = b"securechat join (server)"

# A line of the exchange: a certificate chain in base64 is ~2 KiB, a CSR ~0.6 KiB (RSA-3072 ~1.5).
MAX_WIRE_LINE = 16 * 1024
# The whole exchange, from the handshake on: a few round trips and one signature on the server.
EXCHANGE_DEADLINE = 20.0
# Enrollment connections at once; they count as unauthenticated, like handshakes: beyond this
# many, the next one is told to come back (a person joins once, a classroom in a minute).
MAX_ENROLLING = 16

INTERCEPTED = ("someone between you and the server is intercepting the connection (the certificate you "
               "were shown is not the server's)")


class JoinError(Exception):
    """A join or renewal failed; ``str()`` is one line saying why and what to do."""


class RenewalRefused(JoinError):
    """The server refused to renew (revoked, unknown certificate): retrying will not help."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64") from None


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts, so no two different inputs read the same."""
    h = hmac.new(key, label, hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class _Wire:
    """Newline-terminated ASCII lines over a blocking socket, under one deadline, bounded in length."""

    def __init__(self, sock: ssl.SSLSocket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self._buf = b""

    def _time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the exchange took too long")
        return left

    def send(self, line: str) -> None:
        self.sock.settimeout(self._time_left())
        self.sock.sendall(line.encode("ascii") + b"\n")

    def read(self) -> str:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_WIRE_LINE:
                raise ValueError("line too long")
            self.sock.settimeout(self._time_left())
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if len(line) > MAX_WIRE_LINE:
            raise ValueError("line too long")
        return line.decode("ascii", "replace").rstrip("\r")


def leaf_fingerprint(ctx: ssl.SSLContext) -> bytes:
    """SHA-256 of the certificate this server context presents (set by :meth:`Authority.configure`)."""
    return cast(bytes, ctx.securechat_leaf)  # type: ignore[attr-defined]


# -- the server's side ---------------------------------------------------------------------------


class _PublicKeyOnly:
    """What certs' certificate builder needs of a key: its public half (here, the CSR's)."""

    def __init__(self, public: Any) -> None:
        self._public = public

    def public_key(self) -> Any:
        return self._public


class SessionLike(Protocol):
    """What the revocation watcher needs of a chat session."""

    cert_serial: int | None
    nick: str
    quitting: bool

    @property
    def conn(self) -> Any: ...


class ServerLike(Protocol):
    def sessions(self) -> Sequence[SessionLike]: ...


class Authority:
    """The CA's agent inside a running server: enrollments, renewals, the revocation denylist.

    Built by ``securechat serve`` when the local CA (``ca.pem`` + ``ca.key``) is beside the server
    certificate. ``clock`` replaces ``time.time`` for the store (tests).
    """

    def __init__(self, certs_dir: str | Path, *, require_client_cert: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(certs_dir)
        self.store = Store(self.dir, clock=clock)
        self.clock = clock
        self.require_client_cert = require_client_cert
        self._slots = threading.BoundedSemaphore(MAX_ENROLLING)
        self._ca_lock = threading.Lock()  # one signature at a time; also keeps ca.key reads simple
        self._revoked: frozenset[str] = frozenset()
        self._held: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()

    @staticmethod
    def beside(cert_file: str | Path) -> Path | None:
        """The directory of ``cert_file`` if the local CA (with its key) is there too."""
        d = Path(cert_file).parent
        return d if (d / certs.CA_KEY).is_file() and (d / certs.CA_CERT).is_file() else None

    def configure(self, ctx: ssl.SSLContext, cert_file: str | Path) -> ssl.SSLContext:
        """Make a server context take enrollments and (optional) client certificates from our CA.

        Client certificates become optional at the TLS level even with ``--require-client-cert``: a
        joiner has none yet. :meth:`admit` then refuses chat connections without one.
        """
        ctx.set_alpn_protocols([ALPN])
        ctx.load_verify_locations(cafile=str(self.dir / certs.CA_CERT))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # The certificate the context was just loaded with (renewal builds a new context after
        # writing the file), to check what the joiner saw against.
        leaf = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())  # the first of the chain
        ctx.securechat_leaf = hashlib.sha256(  # type: ignore[attr-defined]
            leaf.public_bytes(serialization.Encoding.DER)).digest()
        return ctx

    # -- revocation and names ---------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the denylist and the names held by certificates."""
        try:
            self._revoked = self.store.revoked_serials()
            self._held = frozenset(protocol.nick_key(n) for n in self.store.held_names())
        except StoreError as exc:
            log.error("cannot read the certificate registry: %s", exc)

    def start(self, server: ServerLike) -> None:
        """Watch the denylist: end a revoked certificate's live session within a poll or two."""

        def watch() -> None:
            while not self._stop.wait(REVOCATION_POLL):
                self.refresh()
                revoked = self._revoked
                for session in server.sessions():
                    serial = session.cert_serial
                    if serial is not None and serial_hex(serial) in revoked and not session.conn.closing:
                        log.warning("ending %s's session: certificate %s revoked", session.nick or "?",
                                    serial_hex(serial))
                        session.quitting = True  # put out, not dropped: no nick to hold for a resume
                        session.conn.close(protocol.notice(f"{protocol.CERT_REVOKED}; goodbye"),
                                           reason="certificate revoked")

        self._thread = threading.Thread(target=watch, name="securechat-revocations", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def reserved(self, nick: str) -> str | None:
        """Why a guest (no certificate) may not take ``nick``, or None."""
        if protocol.nick_key(nick) in self._held:
            return f"{nick!r} belongs to a certificate holder"
        return None

    def admit(self, sock: socket.socket | ssl.SSLSocket) -> tuple[str | None, int | None]:
        """(refusal notice or None, client certificate serial or None) for a chat connection.

        Runs in the connection's own thread, after the handshake and before the greeting. The
        denylist is read afresh from the store here, so a revocation holds from the very next
        connection, whatever the poll.
        """
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not der:
            if self.require_client_cert:
                return (f"{protocol.CERT_REQUIRED}: join with an invite ('securechat join HOST CODE') or "
                        "pass --cert and --key"), None
            return None, None
        serial = x509.load_der_x509_certificate(der).serial_number
        try:
            if serial_hex(serial) in self.store.revoked_serials():
                return f"{protocol.CERT_REVOKED}: ask the server's admin for a new invite", serial
            self.store.seen(serial)
        except StoreError as exc:  # fail closed: a certificate we cannot check is not let in
            log.error("cannot check certificate %s: %s", serial_hex(serial), exc)
            return "the server cannot check certificates right now; try again later", serial
        return None, serial

    # -- enrollment connections -------------------------------------------------------------

    @staticmethod
    def wants(sock: ssl.SSLSocket) -> bool:
        """Whether this finished handshake chose the enrollment protocol."""
        return sock.selected_alpn_protocol() == ALPN

    def serve(self, sock: ssl.SSLSocket, peer: tuple[Any, ...]) -> None:
        """Run one enrollment or renewal exchange (in the connection's thread), then return."""
        wire = _Wire(sock, time.monotonic() + EXCHANGE_DEADLINE)
        if not self._slots.acquire(blocking=False):
            log.warning("join from %s refused: %d joins already in progress", peer, MAX_ENROLLING)
            self._say(wire, "ERR the server is busy with other joins: try again in a minute")
            return
        try:
            first = wire.read()
            verb, _, rest = first.partition(" ")
            handler = _HANDLERS.get(verb)
            if handler is None:
                log.warning("enrollment from %s refused: unknown request", peer)
                self._say(wire, "ERR unknown request")
                return
            handler(self, wire, sock, peer, rest)
        except (OSError, ValueError, StoreError) as exc:
            log.warning("enrollment from %s failed: %s", peer, describe_error(exc) if isinstance(exc, OSError)
                        else exc)
        finally:
            self._slots.release()

    @staticmethod
    def _say(wire: _Wire, line: str) -> None:
        try:
            wire.send(line)
        except (OSError, ValueError):
            pass

    def _issue(self, public_key: Any, name: str, days: int, nameplate: int | None) -> tuple[bytes, bytes]:
        """(certificate DER, CA certificate DER) for ``name``, recorded in the registry."""
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise ValueError("the CSR's key is neither EC nor RSA")
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
            raise ValueError("the CSR's RSA key is too short")
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        with self._ca_lock:
            ca_cert, ca_key = certs._load_ca(self.dir, now)
            cert = certs._build_client(cast(certs.PrivateKey, _PublicKeyOnly(public_key)), ca_cert, ca_key,
                                       name, days, now)
        self.store.record(cert, name, days, nameplate)
        self.refresh()
        return (cert.public_bytes(serialization.Encoding.DER), ca_cert.public_bytes(serialization.Encoding.DER))

    def _join(self, wire: _Wire, sock: ssl.SSLSocket, peer: tuple[Any, ...], rest: str) -> None:
        from spake2 import SPAKE2_B

        fields = rest.split(" ")
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError("malformed JOIN")
        nameplate, msg_a = int(fields[0]), _unb64(fields[1])
        try:
            invite = self.store.lookup(nameplate)
        except (InviteError, StoreError) as exc:
            log.warning("join from %s with invite %d refused: %s", peer, nameplate, exc)
            self._say(wire, f"ERR {exc}")
            return
        pake = SPAKE2_B(invite.code.encode("ascii"), idA=ID_JOINER, idB=ID_SERVER)
        msg_b = pake.start()
        try:
            key = pake.finish(msg_a)
        except Exception:  # SPAKEError, NotOnCurve (a bare Exception), ...: the peer's bytes are junk
            raise ValueError("malformed SPAKE2 message") from None
        wire.send(f"PAKE {_b64(msg_b)}")
        fields = wire.read().split(" ")
        if len(fields) != 4 or fields[0] != "CONFIRM":
            raise ValueError("malformed CONFIRM")
        seen, mac_c, csr_der = bytes.fromhex(fields[1]), _unb64(fields[2]), _unb64(fields[3])
        own = leaf_fingerprint(sock.context)
        # The answer to this message is what would let a guess be tested: count the try first.
        try:
            invite = self.store.reserve_try(nameplate)
        except (InviteError, StoreError) as exc:
            log.warning("join from %s with invite %d refused: %s", peer, nameplate, exc)
            self._say(wire, f"ERR {exc}")
            return
        decided = False
        try:
            csr_hash = hashlib.sha256(csr_der).digest()
            if not hmac.compare_digest(mac_c, _mac(key, b"client", own, csr_hash)):
                decided = True
                left = self.store.wrong_try(nameplate)
                burned = ("the invite is now burned: ask for a new one" if left == 0 else
                          f"{left} {'try' if left == 1 else 'tries'} left")
                if seen != own:
                    why = (f"the joiner was shown another certificate ({tls.format_fingerprint(seen)}) than "
                           "this server's: someone in the middle is intercepting the connection")
                    answer = f"the code was refused: {INTERCEPTED}; {burned}"
                else:
                    why = "wrong code"
                    answer = f"wrong code (or someone in the middle); {burned}"
                log.warning("join from %s with invite %d refused: %s; %s", peer, nameplate, why, burned)
                self._say(wire, f"ERR {answer}")
                return
            csr = x509.load_der_x509_csr(csr_der)
            if not csr.is_signature_valid:
                raise ValueError("the CSR's signature is not valid")
            try:
                invite = self.store.claim(nameplate)
            finally:
                decided = True
            name = invite.name
            if name is None:  # CA trust only: a guest
                cert_der, ca_der = b"", self._ca_der()
            else:
                cert_der, ca_der = self._issue(csr.public_key(), name, invite.cert_days, nameplate)
            mac_s = _mac(key, b"server", own, csr_hash, (name or "").encode(), cert_der, ca_der)
            wire.send(f"OK {name or '-'} {_b64(cert_der) if cert_der else '-'} {_b64(ca_der)} {_b64(mac_s)}")
            what = f"as {name} (serial {serial_hex(x509.load_der_x509_certificate(cert_der).serial_number)})" \
                if cert_der else "as a guest (CA certificate only)"
            announce(f"[JOIN] {peer[:2]} joined with invite {nameplate} {what}")
        except (InviteError, StoreError) as exc:
            log.warning("join from %s with invite %d refused: %s", peer, nameplate, exc)
            self._say(wire, f"ERR {exc}")
        finally:
            if not decided:
                self.store.release_try(nameplate)

    def _ca_der(self) -> bytes:
        pem = (self.dir / certs.CA_CERT).read_text("ascii")
        return ssl.PEM_cert_to_DER_cert(pem)

    def _renew(self, wire: _Wire, sock: ssl.SSLSocket, peer: tuple[Any, ...], rest: str) -> None:
        der = sock.getpeercert(binary_form=True)
        if not der:
            self._say(wire, "ERR renewing needs your current certificate")
            return
        old = x509.load_der_x509_certificate(der)  # verified by TLS: our CA, within its validity
        serial = serial_hex(old.serial_number)
        try:
            issued = self.store.get(old.serial_number)
        except StoreError as exc:
            self._say(wire, f"ERR {exc}")
            return
        if issued is None:
            log.warning("renewal from %s refused: certificate %s was not issued through an invite", peer, serial)
            self._say(wire, "ERR REFUSED this certificate was not issued through an invite: ask for an invite")
            return
        if issued.revoked is not None:
            log.warning("renewal from %s refused: certificate %s (%s) is revoked", peer, serial, issued.name)
            self._say(wire, f"ERR REFUSED {protocol.CERT_REVOKED}: it cannot be renewed")
            return
        csr = x509.load_der_x509_csr(_unb64(rest.strip()))
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature is not valid")
        cert_der, ca_der = self._issue(csr.public_key(), issued.name, issued.cert_days or 30, None)
        wire.send(f"OK {_b64(cert_der)} {_b64(ca_der)}")
        new_serial = serial_hex(x509.load_der_x509_certificate(cert_der).serial_number)
        announce(f"[RENEW] {peer[:2]} {issued.name}: certificate {serial} renewed as {new_serial}")


# Request verb -> handler: the whole enrollment protocol.
_HANDLERS: dict[str, Callable[[Authority, _Wire, ssl.SSLSocket, tuple[Any, ...], str], None]] = {
    "JOIN": Authority._join,
    "RENEW": Authority._renew,
}


# -- the joiner's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolled:
    """What a successful join brought home."""

    name: str | None  # None: a guest invite (CA trust only)
    ca_pem: bytes
    cert_pem: bytes | None
    key_pem: bytes | None
    server_fingerprint: str
    server_cert_der: bytes = b""

    def names_host(self, host: str) -> bool:
        """Whether the server's certificate is valid for ``host`` (else ``connect HOST`` will refuse it)."""
        try:
            san = x509.load_der_x509_certificate(self.server_cert_der).extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return False
        try:
            return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
        except ValueError:
            return host.lower().rstrip(".") in (n.lower() for n in san.get_values_for_type(x509.DNSName))


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key (made here, never sent) and a CSR for it, DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    # The server decides the name (the invite's); the CSR only proves possession of the key.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securechat joiner")]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.DER)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _open(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise JoinError(f"cannot find the host {host!r} ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise JoinError(f"connection refused by {where}: is the server running, and on that port (--port)?") \
            from None
    except OSError as exc:
        raise JoinError(f"cannot connect to {where}: {describe_error(exc)}") from None
    try:
        return ctx.wrap_socket(raw, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        raise JoinError(f"the certificate of {where} is not the one your profile trusts ({exc.verify_message}): "
                        "join again with a new invite") from None
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        raise JoinError(f"TLS handshake with {where} failed ({describe_error(exc)}): is it a securechat "
                        "server?") from None


def join(host: str, port: int, code: str, *, timeout: float = 10.0) -> Enrolled:
    """Use invite ``code`` with the server at ``host:port``; JoinError (one line) on any failure."""
    from spake2 import SPAKE2_A

    try:
        nameplate, password = parse_code(code)
    except ValueError as exc:
        raise JoinError(str(exc)) from None
    where = f"{host}:{port}"
    ctx = tls.client_context()
    # Not verified by a CA (we have none yet): the code, through the MACs below, vouches for it.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN])
    sock = _open(host, port, ctx, timeout)
    try:
        if sock.selected_alpn_protocol() != ALPN:
            raise JoinError(f"{where} does not take invites (an older securechat, or a server without its local "
                            "CA beside its certificate)")
        leaf = sock.getpeercert(binary_form=True) or b""
        seen = hashlib.sha256(leaf).digest()
        wire = _Wire(sock, time.monotonic() + EXCHANGE_DEADLINE)
        pake = SPAKE2_A(password.encode("ascii"), idA=ID_JOINER, idB=ID_SERVER)
        wire.send(f"JOIN {nameplate} {_b64(pake.start())}")
        verb, _, rest = wire.read().partition(" ")
        if verb == "ERR":
            raise JoinError(f"{where} refused the invite: {rest}")
        if verb != "PAKE":
            raise JoinError(f"{where} answered something unexpected: is it a securechat server?")
        try:
            k = pake.finish(_unb64(rest))
        except Exception:  # SPAKEError, NotOnCurve (a bare Exception), ...: the peer's bytes are junk
            raise JoinError(f"{where} answered something unexpected: is it a securechat server?") from None
        key, csr_der = new_key_and_csr()
        csr_hash = hashlib.sha256(csr_der).digest()
        wire.send(f"CONFIRM {seen.hex()} {_b64(_mac(k, b'client', seen, csr_hash))} {_b64(csr_der)}")
        verb, _, rest = wire.read().partition(" ")
        if verb == "ERR":
            raise JoinError(f"{where} refused the invite: {rest}. Nothing was saved")
        fields = rest.split(" ")
        if verb != "OK" or len(fields) != 4:
            raise JoinError(f"{where} answered something unexpected: {INTERCEPTED}? Nothing was saved")
        name = None if fields[0] == "-" else fields[0]
        cert_der = b"" if fields[1] == "-" else _unb64(fields[1])
        ca_der = _unb64(fields[2])
        if not hmac.compare_digest(_unb64(fields[3]), _mac(k, b"server", seen, csr_hash, (name or "").encode(),
                                                           cert_der, ca_der)):
            raise JoinError(f"the answer from {where} does not prove it knows the code: {INTERCEPTED}. "
                            "Nothing was saved")
        ca = x509.load_der_x509_certificate(ca_der)
        try:
            x509.load_der_x509_certificate(leaf).verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise JoinError(f"the certificate {where} showed is not signed by its CA: {INTERCEPTED}. Nothing "
                            "was saved") from None
        cert_pem = None
        if cert_der:
            cert = x509.load_der_x509_certificate(cert_der)
            if cert.public_key() != key.public_key():
                raise JoinError(f"{where} sent a certificate for another key. Nothing was saved")
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        return Enrolled(name, ca.public_bytes(serialization.Encoding.PEM), cert_pem,
                        key_pem(key) if cert_pem else None, tls.format_fingerprint(seen), leaf)
    except (OSError, ValueError) as exc:
        detail = describe_error(exc) if isinstance(exc, OSError) else str(exc)
        raise JoinError(f"the exchange with {where} failed: {detail}") from None
    finally:
        sock.close()


def renew(host: str, port: int, ctx: ssl.SSLContext, *, timeout: float = 10.0
          ) -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    """Renew the client certificate loaded in ``ctx`` (which also verifies the server against our CA).

    Returns (new key, certificate PEM, CA PEM). RenewalRefused when the server will not (revoked);
    JoinError for anything else.
    """
    ctx.set_alpn_protocols([ALPN])
    where = f"{host}:{port}"
    sock = _open(host, port, ctx, timeout)
    try:
        if sock.selected_alpn_protocol() != ALPN:
            raise JoinError(f"{where} does not renew certificates (an older securechat?)")
        wire = _Wire(sock, time.monotonic() + EXCHANGE_DEADLINE)
        key, csr_der = new_key_and_csr()
        wire.send(f"RENEW {_b64(csr_der)}")
        verb, _, rest = wire.read().partition(" ")
        if verb == "ERR":
            if rest.startswith("REFUSED "):
                raise RenewalRefused(rest.removeprefix("REFUSED "))
            raise JoinError(rest)
        fields = rest.split(" ")
        if verb != "OK" or len(fields) != 2:
            raise JoinError(f"{where} answered something unexpected")
        cert = x509.load_der_x509_certificate(_unb64(fields[0]))
        if cert.public_key() != key.public_key():
            raise JoinError(f"{where} sent a certificate for another key")
        ca = x509.load_der_x509_certificate(_unb64(fields[1]))
        return (key, cert.public_bytes(serialization.Encoding.PEM), ca.public_bytes(serialization.Encoding.PEM))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason and "REVOKED" in exc.reason:
            raise RenewalRefused(protocol.CERT_REVOKED) from None
        detail = describe_error(exc) if isinstance(exc, OSError) else str(exc)
        raise JoinError(f"the exchange with {where} failed: {detail}") from None
    finally:
        sock.close()


# -- command line ------------------------------------------------------------------------------


PROG = "securechat join"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog=PROG,
        description="Join a securechat server with the invite code its admin gave you ('securechat invite' "
        "on the server). Makes your key here (it never leaves this machine), fetches your certificate and "
        "the server's CA, and remembers them: afterwards 'securechat connect HOST' needs nothing else.")
    p.add_argument("host", type=options.host, help="the server's address, as given with the code")
    p.add_argument("code", help="the invite code, like 7-crayon-galaxy-lunar")
    p.add_argument("--port", type=options.port, default=DEFAULT_PORT, help="TCP port (default: %(default)s)")
    p.add_argument("--timeout", type=options.duration(), default=10.0, metavar="SECONDS",
                   help="time allowed to connect (default: %(default)g)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat join HOST CODE``: 0 once the profile is saved, 1 on any failure."""
    from securechat import profiles

    args = build_parser().parse_args(argv)
    try:
        where = profiles.prepare(args.host, args.port)
    except OSError as exc:
        options.print_error(PROG, f"cannot write the profile in {profiles.servers_dir()}: {describe_error(exc)}")
        return 1
    try:
        enrolled = join(args.host, args.port, args.code, timeout=args.timeout)
        profile = profiles.save(args.host, args.port, enrolled)
    except JoinError as exc:
        with contextlib.suppress(OSError):
            where.rmdir()  # only if empty: a profile from an earlier join stays
        options.print_error(PROG, str(exc))
        return 1
    except OSError as exc:
        options.print_error(PROG, f"cannot save the profile: {describe_error(exc)}")
        return 1
    port = "" if args.port == DEFAULT_PORT else f" --port {args.port}"
    who = f" as {enrolled.name}" if enrolled.name else " (you pick a nickname when you connect)"
    print(f"Joined {args.host}{who}. From now on: securechat connect {args.host}{port}")
    print(f"(server CA fingerprint {tls.fingerprint(enrolled.ca_pem.decode('ascii'))}; saved in {profile.dir})")
    if not enrolled.names_host(args.host):
        options.print_error(PROG, f"note: the server's certificate does not name {args.host!r}, so 'connect' will "
                            f"refuse it: ask the server's admin to run 'securechat gen-certs --ip/--host {args.host}'")
    return 0
