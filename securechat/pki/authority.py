"""The certificate authority inside a running server: enrollments, renewals, the revocation denylist.

The exchange itself (what travels, and why it is safe) is described in :mod:`securechat.pki.enrollment`;
the joiner's end is :mod:`securechat.client.enroll`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from securechat.pki import builders, certs
from securechat.pki.enrollment import ALPN, ID_JOINER, ID_SERVER, INTERCEPTED, b64, leaf_fingerprint, mac, unb64
from securechat.pki.ledger import InviteError, Store, StoreError, serial_hex
from securechat.wire import protocol, tls
from securechat.wire.conn import describe_error
from securechat.wire.console import announce

log = logging.getLogger("securechat.enroll")

# Enrollment connections at once; they count as unauthenticated, like handshakes: beyond this
# many, the next one is told to come back (a person joins once, a classroom in a minute).
MAX_ENROLLING = 16


# -- the server's side ---------------------------------------------------------------------------


class Sink(Protocol):
    """Where an exchange says its lines (the server's driver collects them and sends them)."""

    def send(self, line: str) -> None: ...


class Peer(Protocol):
    """What an exchange reads of its TLS connection."""

    @property
    def context(self) -> ssl.SSLContext: ...

    def getpeercert(self, binary_form: bool = ...) -> Any: ...


class _PublicKeyOnly:
    """What certs' certificate builder needs of a key: its public half (here, the CSR's)."""

    def __init__(self, public: Any) -> None:
        self._public = public

    def public_key(self) -> Any:
        return self._public


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

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate ``serial`` is on the denylist as last read (:meth:`refresh`)."""
        return serial_hex(serial) in self._revoked

    def reserved(self, nick: str) -> str | None:
        """Why a guest (no certificate) may not take ``nick``, or None."""
        if protocol.nick_key(nick) in self._held:
            return f"{nick!r} belongs to a certificate holder"
        return None

    def admit(self, der: bytes | None) -> tuple[str | None, int | None]:
        """(refusal notice or None, client certificate serial or None) for a chat connection whose
        client presented certificate ``der`` (DER bytes; None: none).

        After the handshake and before the greeting; it reads the store, so the server runs it on a
        worker thread. The denylist is read afresh here, so a revocation holds from the very next
        connection, whatever the poll.
        """
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

    def exchange(self, wire: Sink, sock: Peer, peer: tuple[Any, ...]) -> Generator[None, str, None]:
        """One enrollment or renewal exchange, sans I/O: a generator that yields whenever it needs the
        joiner's next line (pass it in with ``send``), and says its answers with ``wire.send(line)``.

        The connection's driver (the server's enrollment handler) runs each step on a worker thread:
        a step reads and writes the registry and may sign a certificate. It ends the exchange by
        throwing in what went wrong (the deadline passed, the line was too long, the joiner left),
        which is logged like any other failure. ``sock`` is what the exchange reads of the TLS
        connection: its ``context`` and ``getpeercert(binary_form=True)``.
        """
        if not self._slots.acquire(blocking=False):
            log.warning("join from %s refused: %d joins already in progress", peer, MAX_ENROLLING)
            self._say(wire, "ERR the server is busy with other joins: try again in a minute")
            return
        try:
            first = yield
            verb, _, rest = first.partition(" ")
            handler = _HANDLERS.get(verb)
            if handler is None:
                log.warning("enrollment from %s refused: unknown request", peer)
                self._say(wire, "ERR unknown request")
                return
            steps = handler(self, wire, sock, peer, rest)
            if steps is not None:
                yield from steps
        except (OSError, ValueError, StoreError) as exc:
            log.warning("enrollment from %s failed: %s", peer, describe_error(exc) if isinstance(exc, OSError)
                        else exc)
        finally:
            self._slots.release()

    @staticmethod
    def _say(wire: Sink, line: str) -> None:
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
            cert = builders.build_client(cast(builders.PrivateKey, _PublicKeyOnly(public_key)), ca_cert, ca_key,
                                       name, days, now)
        self.store.record(cert, name, days, nameplate)
        self.refresh()
        return (cert.public_bytes(serialization.Encoding.DER), ca_cert.public_bytes(serialization.Encoding.DER))

    def _join(self, wire: Sink, sock: Peer, peer: tuple[Any, ...], rest: str) -> Generator[None, str, None]:
        from spake2 import SPAKE2_B

        fields = rest.split(" ")
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError("malformed JOIN")
        nameplate, msg_a = int(fields[0]), unb64(fields[1])
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
        wire.send(f"PAKE {b64(msg_b)}")
        fields = (yield).split(" ")
        if len(fields) != 4 or fields[0] != "CONFIRM":
            raise ValueError("malformed CONFIRM")
        seen, mac_c, csr_der = bytes.fromhex(fields[1]), unb64(fields[2]), unb64(fields[3])
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
            if not hmac.compare_digest(mac_c, mac(key, b"client", own, csr_hash)):
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
            mac_s = mac(key, b"server", own, csr_hash, (name or "").encode(), cert_der, ca_der)
            wire.send(f"OK {name or '-'} {b64(cert_der) if cert_der else '-'} {b64(ca_der)} {b64(mac_s)}")
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

    def _renew(self, wire: Sink, sock: Peer, peer: tuple[Any, ...], rest: str) -> None:
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
        csr = x509.load_der_x509_csr(unb64(rest.strip()))
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature is not valid")
        cert_der, ca_der = self._issue(csr.public_key(), issued.name, issued.cert_days or 30, None)
        wire.send(f"OK {b64(cert_der)} {b64(ca_der)}")
        new_serial = serial_hex(x509.load_der_x509_certificate(cert_der).serial_number)
        announce(f"[RENEW] {peer[:2]} {issued.name}: certificate {serial} renewed as {new_serial}")


# Request verb -> handler (a generator when it needs another line): the whole enrollment protocol.
_HANDLERS: dict[str, Callable[[Authority, Sink, Peer, tuple[Any, ...], str], Generator[None, str, None] | None]] = {
    "JOIN": Authority._join,
    "RENEW": Authority._renew,
}
