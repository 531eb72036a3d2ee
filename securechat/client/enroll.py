"""The joiner's end of the enrollment exchange: joining with an invite code, and renewing one's certificate.

The exchange and why it is safe: :mod:`securechat.pki.enrollment`. The command is :mod:`securechat.client.join`.
Whatever the server says (an ``ERR`` line before any proof, a name) is untrusted text: it is sanitised
(:func:`protocol.sanitize`) before it goes into a message a terminal will show.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securechat.pki import enrollment
from securechat.pki.codes import parse_code
from securechat.pki.enrollment import (
    ALPN,
    ID_JOINER,
    ID_SERVER,
    INTERCEPTED,
    JoinError,
    RenewalRefused,
    Wire,
    b64,
    mac,
    unb64,
)
from securechat.wire import protocol, tls
from securechat.wire.conn import describe_error

log = logging.getLogger("securechat.enroll")


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
    return key, csr_for(key)


def csr_for(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR (DER) for ``key``: the server decides the name (the invite's); the CSR only proves possession."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securechat joiner")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def _said(text: str) -> str:
    """What the server said, fit to show: no escape sequence or control character survives."""
    return protocol.sanitize(text)


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


@dataclass
class Started:
    """A join the server answered with its half of the PAKE: nothing is spent on the server yet.

    The server counts a try only when the joiner confirms (:func:`finish`); closing here instead
    (:meth:`close`) costs the invite nothing, so several servers can be asked which holds an invite.
    """

    where: str
    sock: ssl.SSLSocket
    wire: Wire
    key: bytes  # the SPAKE2 key
    seen: bytes  # SHA-256 of the certificate the server showed
    leaf: bytes  # that certificate, DER

    def close(self) -> None:
        self.sock.close()


def start(host: str, port: int, code: str, *, timeout: float = 10.0) -> Started:
    """Open the exchange for invite ``code`` with ``host:port``, up to the server's PAKE message.

    JoinError (one line) on any failure, the connection then closed.
    """
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
        wire = Wire(sock, time.monotonic() + enrollment.EXCHANGE_DEADLINE)
        pake = SPAKE2_A(password.encode("ascii"), idA=ID_JOINER, idB=ID_SERVER)
        wire.send(f"JOIN {nameplate} {b64(pake.start())}")
        verb, _, rest = wire.read().partition(" ")
        if verb == "ERR":
            raise JoinError(f"{where} refused the invite: {_said(rest)}")
        if verb != "PAKE":
            raise JoinError(f"{where} answered something unexpected: is it a securechat server?")
        try:
            k = pake.finish(unb64(rest))
        except Exception:  # SPAKEError, NotOnCurve (a bare Exception), ...: the peer's bytes are junk
            raise JoinError(f"{where} answered something unexpected: is it a securechat server?") from None
        return Started(where, sock, wire, k, seen, leaf)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, (OSError, ValueError)):
            detail = describe_error(exc) if isinstance(exc, OSError) else str(exc)
            raise JoinError(f"the exchange with {where} failed: {detail}") from None
        raise


def finish(started: Started) -> Enrolled:
    """Confirm the exchange :func:`start` opened and check the server's answer; the connection is closed.

    JoinError (one line) on any failure: a wrong code, a relay in the middle, a refusal.
    """
    where, wire, k, seen, leaf = started.where, started.wire, started.key, started.seen, started.leaf
    try:
        key, csr_der = new_key_and_csr()
        csr_hash = hashlib.sha256(csr_der).digest()
        wire.send(f"CONFIRM {seen.hex()} {b64(mac(k, b'client', seen, csr_hash))} {b64(csr_der)}")
        verb, _, rest = wire.read().partition(" ")
        if verb == "ERR":
            raise JoinError(f"{where} refused the invite: {_said(rest)}. Nothing was saved")
        fields = rest.split(" ")
        if verb != "OK" or len(fields) != 4:
            raise JoinError(f"{where} answered something unexpected: {INTERCEPTED}? Nothing was saved")
        name = None if fields[0] == "-" else fields[0]
        if name is not None and protocol.nick_error(name) is not None:
            raise JoinError(f"{where} gave a name no server would accept ({_said(name)!r}). Nothing was saved")
        cert_der = b"" if fields[1] == "-" else unb64(fields[1])
        ca_der = unb64(fields[2])
        if not hmac.compare_digest(unb64(fields[3]), mac(k, b"server", seen, csr_hash, (name or "").encode(),
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
        started.close()


def join(host: str, port: int, code: str, *, timeout: float = 10.0) -> Enrolled:
    """Use invite ``code`` with the server at ``host:port``; JoinError (one line) on any failure."""
    return finish(start(host, port, code, timeout=timeout))


def renew(host: str, port: int, ctx: ssl.SSLContext, *, key: ec.EllipticCurvePrivateKey | None = None,
          timeout: float = 10.0) -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    """Renew the client certificate loaded in ``ctx`` (which also verifies the server against our CA).

    ``key``: the new key, when a renewal with it was asked for before and its answer never came
    (the server then sends the same certificate again); a fresh one otherwise. Returns (new key,
    certificate PEM, CA PEM as the server sent it: the caller checks the certificate against the CA it
    trusts, never adopts this one). RenewalRefused when the server will not (revoked, too early);
    JoinError for anything else.
    """
    ctx.set_alpn_protocols([ALPN])
    where = f"{host}:{port}"
    sock = _open(host, port, ctx, timeout)
    try:
        if sock.selected_alpn_protocol() != ALPN:
            raise JoinError(f"{where} does not renew certificates (an older securechat?)")
        wire = Wire(sock, time.monotonic() + enrollment.EXCHANGE_DEADLINE)
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
        wire.send(f"RENEW {b64(csr_for(key))}")
        verb, _, rest = wire.read().partition(" ")
        if verb == "ERR":
            if rest.startswith("REFUSED "):
                raise RenewalRefused(_said(rest.removeprefix("REFUSED ")))
            raise JoinError(_said(rest))
        fields = rest.split(" ")
        if verb != "OK" or len(fields) != 2:
            raise JoinError(f"{where} answered something unexpected")
        cert = x509.load_der_x509_certificate(unb64(fields[0]))
        if cert.public_key() != key.public_key():
            raise JoinError(f"{where} sent a certificate for another key")
        ca = x509.load_der_x509_certificate(unb64(fields[1]))
        return (key, cert.public_bytes(serialization.Encoding.PEM), ca.public_bytes(serialization.Encoding.PEM))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason and "REVOKED" in exc.reason:
            raise RenewalRefused(protocol.CERT_REVOKED) from None
        detail = describe_error(exc) if isinstance(exc, OSError) else str(exc)
        raise JoinError(f"the exchange with {where} failed: {detail}") from None
    finally:
        sock.close()
