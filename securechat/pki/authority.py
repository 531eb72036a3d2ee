"""The certificate authority inside a running server: enrollments and renewals, recorded in the ledger.

The exchange itself (what travels, and why it is safe) is described in :mod:`securechat.pki.enrollment`;
the joiner's end is :mod:`securechat.client.enroll`. What the ledger says (revoked certificates and
names) is enforced by the server, :mod:`securechat.server.trust`.

Enrollment connections are unauthenticated, so they are bounded like everything else unauthenticated:
the first line (``JOIN`` or ``RENEW``) must come within :data:`FIRST_LINE_DEADLINE`; only then does the
connection take a slot, from one of two pools so that joiners can never starve renewals: joins
(:data:`MAX_ENROLLING` at once, at most :data:`MAX_ENROLLING_PER_ADDRESS` from one address) and
renewals (:data:`MAX_RENEWING`, one per certificate).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from securechat.pki import builders, certs, enrollment
from securechat.pki.enrollment import ALPN, ID_JOINER, ID_SERVER, INTERCEPTED, Wire, b64, leaf_fingerprint, mac, unb64
from securechat.pki.ledger import InviteError, Refused, Store, StoreError, serial_hex
from securechat.wire import tls
from securechat.wire.conn import describe_error
from securechat.wire.console import announce

log = logging.getLogger("securechat.enroll")

# Joins at once; they count as unauthenticated, like handshakes: beyond this many, the next one is
# told to come back (a person joins once, a classroom in a minute).
MAX_ENROLLING = 16
# A quarter of them from one address: one machine cannot hold every joiner out.
MAX_ENROLLING_PER_ADDRESS = 4
# Renewals at once, a pool of their own (one per certificate): joiners never starve them.
MAX_RENEWING = 16
# The joiner's client sends its first line right after the handshake: a silent connection is gone
# after this, long before the whole exchange's deadline (enrollment.EXCHANGE_DEADLINE).
FIRST_LINE_DEADLINE = 5.0


class Slots:
    """At most ``total`` exchanges of one kind (``what``) at once, and at most ``per_key`` under one key
    (``per``: an address, a certificate); thread-safe."""

    def __init__(self, what: str, total: int, per_key: int, per: str) -> None:
        self.what = what
        self.total = total
        self.per_key = per_key
        self.per = per
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def take(self, key: str) -> str | None:
        """Take a slot for ``key``: None, or why not (for the peer)."""
        with self._lock:
            if sum(self._held.values()) >= self.total:
                return f"the server is busy with other {self.what}: try again in a minute"
            if self._held.get(key, 0) >= self.per_key:
                return f"the server is busy with other {self.what} from your {self.per}: try again in a minute"
            self._held[key] = self._held.get(key, 0) + 1
        return None

    def give(self, key: str) -> None:
        with self._lock:
            left = self._held.get(key, 1) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)


# -- the server's side ---------------------------------------------------------------------------


class _PublicKeyOnly:
    """What certs' certificate builder needs of a key: its public half (here, the CSR's)."""

    def __init__(self, public: Any) -> None:
        self._public = public

    def public_key(self) -> Any:
        return self._public


class Authority:
    """The CA's agent inside a running server: enrollments and renewals, each recorded in the ledger.

    Built by ``securechat serve`` when the local CA (``ca.pem`` + ``ca.key``) is beside the server
    certificate. ``clock`` replaces ``time.time`` for the store (tests).
    """

    def __init__(self, certs_dir: str | Path, *, require_client_cert: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(certs_dir)
        self.store = Store(self.dir, clock=clock)
        self.clock = clock
        self.require_client_cert = require_client_cert
        self._joins = Slots("joins", MAX_ENROLLING, MAX_ENROLLING_PER_ADDRESS, "address")
        self._renewals = Slots("renewals", MAX_RENEWING, 1, "certificate")
        self._ca_lock = threading.Lock()  # one signature at a time; also keeps ca.key reads simple
        self.store.generation()  # creates (or upgrades) the ledger now: a broken file fails the start

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

    # -- enrollment connections -------------------------------------------------------------

    @staticmethod
    def wants(sock: ssl.SSLSocket) -> bool:
        """Whether this finished handshake chose the enrollment protocol."""
        return sock.selected_alpn_protocol() == ALPN

    def serve(self, sock: ssl.SSLSocket, peer: tuple[Any, ...]) -> None:
        """Run one enrollment or renewal exchange (in the connection's thread), then return."""
        started = time.monotonic()
        wire = Wire(sock, started + min(FIRST_LINE_DEADLINE, enrollment.EXCHANGE_DEADLINE))
        try:
            first = wire.read()
        except (OSError, ValueError) as exc:
            log.info("enrollment from %s ended before its request: %s", peer,
                     describe_error(exc) if isinstance(exc, OSError) else exc)
            return
        verb, _, rest = first.partition(" ")
        handler = _HANDLERS.get(verb)
        if handler is None:
            log.warning("enrollment from %s refused: unknown request", peer)
            self._say(wire, "ERR unknown request")
            return
        slots, key = self._slot_for(verb, sock, peer)
        busy = slots.take(key)
        if busy is not None:
            log.warning("%s from %s refused: %s (%d at once, %d per %s)", verb, peer, busy, slots.total,
                        slots.per_key, slots.per)
            self._say(wire, f"ERR {busy}")
            return
        wire.deadline = started + enrollment.EXCHANGE_DEADLINE
        try:
            handler(self, wire, sock, peer, rest)
        except (OSError, ValueError, StoreError) as exc:
            log.warning("enrollment from %s failed: %s", peer, describe_error(exc) if isinstance(exc, OSError)
                        else exc)
        finally:
            slots.give(key)

    def _slot_for(self, verb: str, sock: ssl.SSLSocket, peer: tuple[Any, ...]) -> tuple[Slots, str]:
        """The pool a request draws on, and the key it counts under there."""
        if verb == "RENEW":
            der = sock.getpeercert(binary_form=True) or b""
            return self._renewals, hashlib.sha256(der).hexdigest()
        return self._joins, str(peer[0])

    @staticmethod
    def _say(wire: Wire, line: str) -> None:
        try:
            wire.send(line)
        except (OSError, ValueError):
            pass

    def _sign(self, public_key: Any, name: str, days: int) -> tuple[x509.Certificate, x509.Certificate]:
        """(a certificate for ``name`` and ``public_key``, the CA certificate): signed, not yet recorded,
        so not yet to be handed out."""
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise ValueError("the CSR's key is neither EC nor RSA")
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
            raise ValueError("the CSR's RSA key is too short")
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        with self._ca_lock:
            ca_cert, ca_key = certs._load_ca(self.dir, now)
            cert = builders.build_client(cast(builders.PrivateKey, _PublicKeyOnly(public_key)), ca_cert, ca_key,
                                       name, days, now)
        return cert, ca_cert

    def _issue(self, public_key: Any, name: str, days: int, nameplate: int | None) -> tuple[bytes, bytes]:
        """(certificate DER, CA certificate DER) for ``name``, recorded in the ledger (Refused: not issued)."""
        cert, ca_cert = self._sign(public_key, name, days)
        self.store.record(cert, name, days, nameplate)
        return (cert.public_bytes(serialization.Encoding.DER), ca_cert.public_bytes(serialization.Encoding.DER))

    def _join(self, wire: Wire, sock: ssl.SSLSocket, peer: tuple[Any, ...], rest: str) -> None:
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
        fields = wire.read().split(" ")
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

    def _renew(self, wire: Wire, sock: ssl.SSLSocket, peer: tuple[Any, ...], rest: str) -> None:
        """``RENEW <CSR>`` over a connection that presented the current certificate.

        Checked, signed and recorded by the ledger in one transaction (:meth:`Store.renew`): not revoked
        (nor its name), in the last third of its life, not renewed before. So a ``revoke`` racing a
        renewal either comes first and the renewal is refused, or comes second and revokes the renewed
        certificate too.
        """
        der = sock.getpeercert(binary_form=True)
        if not der:
            self._say(wire, "ERR renewing needs your current certificate")
            return
        old = x509.load_der_x509_certificate(der)  # verified by TLS: our CA, within its validity
        serial = serial_hex(old.serial_number)
        signed: list[x509.Certificate] = []  # the CA certificate the new one was signed with

        def sign(name: str, days: int) -> x509.Certificate:
            cert, ca_cert = self._sign(csr.public_key(), name, days)
            signed.append(ca_cert)
            return cert

        try:
            csr = x509.load_der_x509_csr(unb64(rest.strip()))
            if not csr.is_signature_valid:
                raise ValueError("the CSR's signature is not valid")
            recorded, cert_der = self.store.renew(old, csr.public_key(), sign)
        except Refused as exc:
            log.warning("renewal from %s refused: certificate %s (%s): %s", peer, serial, old.subject.rfc4514_string(),
                        exc)
            self._say(wire, f"ERR REFUSED {exc}")
            return
        ca_der = signed[0].public_bytes(serialization.Encoding.DER) if signed else self._ca_der()
        wire.send(f"OK {b64(cert_der)} {b64(ca_der)}")
        announce(f"[RENEW] {peer[:2]} {recorded.name}: certificate {serial} renewed as {recorded.serial}")


# Request verb -> handler: the whole enrollment protocol.
_HANDLERS: dict[str, Callable[[Authority, Wire, ssl.SSLSocket, tuple[Any, ...], str], None]] = {
    "JOIN": Authority._join,
    "RENEW": Authority._renew,
}
