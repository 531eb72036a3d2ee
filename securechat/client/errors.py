"""Why a connection to a server failed, in words a person can act on: the client's errors.

Every failure a user can meet (wrong port, wrong CA file, a certificate for another address, TLS against
a ``--plain`` server, a client certificate the server refuses, ...) becomes one :class:`ChatError` whose
text says what to do; the command line prints it on one line and exits 1, never with a traceback.
"""

from __future__ import annotations

import socket
import ssl

from securechat.wire.conn import describe_error

# OpenSSL X509_V_ERR_* codes that mean "the certificate is fine but names another host/address".
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_ADDRESS_MISMATCH = 64
# ... and those that mean "signed by a CA we were not given" (wrong or missing ca.pem).
_X509_UNTRUSTED = {
    2,  # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
    7,  # certificate signature failure
}
_X509_EXPIRED = 10
_X509_NOT_YET_VALID = 9

# OpenSSL reasons seen when the peer answers a ClientHello with plaintext (a --plain server's
# "* securechat: ..." greeting is not a TLS record).
_PLAINTEXT_PEER_REASONS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                           "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"}
# ... and those seen when the certificate the server sent is not one OpenSSL can parse.
_BAD_CERTIFICATE_REASONS = {"ASN1_LIB", "X509_LIB", "BAD_CERTIFICATE", "WRONG_TAG", "HEADER_TOO_LONG",
                            "NESTED_ASN1_ERROR", "TOO_LONG", "BAD_PACKET_LENGTH", "LENGTH_MISMATCH",
                            "UNKNOWN_CERTIFICATE_TYPE", "CCS_RECEIVED_EARLY"}

CA_HELP = ("copy ca.pem from the server's certs/ folder (the server mints it on first run) and pass "
            "--ca PATH")

MINT_HELP = "securechat gen-certs --client NAME"

# TLS alerts a server sends when it refuses our client certificate (mutual TLS), as OpenSSL 3 names
# them (ssl.SSLError.reason). With TLS 1.3 our side of the handshake completes first and the alert
# arrives on the first read; with TLS 1.2 it ends the handshake itself.
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        f"the server requires a client certificate: pass --cert and --key (mint one with {MINT_HELP} "
        "on the server)"),
    "SSLV3_ALERT_CERTIFICATE_REQUIRED": (
        f"the server requires a client certificate: pass --cert and --key (mint one with {MINT_HELP} "
        "on the server)"),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the server does not accept this client certificate (signed by another CA?): ask for one minted "
        f"with {MINT_HELP} on that server"),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "the server does not accept this client certificate (signed by another CA, or not valid yet?): ask "
        f"for one minted with {MINT_HELP} on that server, and check both clocks"),
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (
        "the server does not accept this client certificate (not made for client authentication?): ask "
        f"for one minted with {MINT_HELP}"),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        "the server does not accept this client certificate (signed by another CA?): ask for one minted "
        f"with {MINT_HELP} on that server"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        f"your client certificate has expired: ask for a new one ({MINT_HELP} on the server)"),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "your client certificate has been revoked: ask the server's admin",
}
# TLS 1.2 has no "certificate required" alert: a server wanting a certificate we did not send
# answers with a generic handshake failure.
_HANDSHAKE_FAILURE = "SSLV3_ALERT_HANDSHAKE_FAILURE"


def explain_alert(reason: str | None) -> str | None:
    """Words for a TLS alert by which the server refused our client certificate, or None."""
    return _CLIENT_CERT_ALERTS.get(reason or "")


class ChatError(Exception):
    """A failure explained for people: ``str(exc)`` is one line saying what happened and what to do."""


class NickRefused(ChatError):
    """The server refused the nickname; ``reason`` is its explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"nickname refused: {reason}")
        self.reason = reason


class ServerFull(ChatError):
    """The server has as many clients as it accepts."""


class TLSRequired(ChatError):
    """A plain (``--plain``) client reached a server that only speaks TLS."""


class CertificateRefused(ChatError):
    """The server refused our client certificate (or wanted one): mutual TLS."""


class IdentityRefused(ChatError):
    """The server is not the one ``--pin`` or ``--tofu`` expects; nothing was sent to it."""


class BoundNickUnusable(ChatError):
    """With mutual TLS the nickname is the certificate's, and the server cannot let it join (already
    connected elsewhere, ...); the server has closed the connection, so asking again is pointless."""


class Disconnected(ChatError):
    """The connection ended; ``shutdown`` is True when the server announced its own shutdown."""

    def __init__(self, message: str, *, shutdown: bool = False) -> None:
        super().__init__(message)
        self.shutdown = shutdown


def handshake_error(exc: ssl.SSLError, where: str) -> ChatError:
    """The ChatError for a TLS handshake that failed (not a certificate verification failure)."""
    refusal = explain_alert(exc.reason)
    if refusal is not None:
        return CertificateRefused(f"{where} refused the connection: {refusal}")
    if exc.reason == _HANDSHAKE_FAILURE:
        return ChatError(f"TLS handshake with {where} failed ({exc.reason}): the server may require a client "
                         "certificate (pass --cert and --key), or accept other TLS versions (check --tls-min)")
    if exc.reason in _PLAINTEXT_PEER_REASONS:
        return ChatError(f"{where} did not answer in TLS: the server probably runs without encryption "
                         "(--plain); connect with --plain only if you accept that anyone on the network can read "
                         "the chat")
    if exc.reason in _BAD_CERTIFICATE_REASONS:
        return ChatError(f"{where} presented a certificate that cannot be read ({exc.reason}): it is not a "
                         "securechat server, or its certificate is damaged")
    return ChatError(f"TLS handshake with {where} failed ({exc.reason or exc}): check --tls-min "
                     "(the server may require TLS 1.3, or allow only 1.2)")


def handshake_timed_out(where: str, timeout: float) -> ChatError:
    return ChatError(f"{where} accepted the connection but did not complete the TLS handshake within "
                     f"{timeout:g} s: is it a securechat server?")


def handshake_lost(where: str, exc: OSError) -> ChatError:
    return ChatError(f"the server at {where} closed the connection during the TLS handshake "
                     f"({describe_error(exc)}): is it a securechat server, with a compatible --tls-min?")


def explain_verification(exc: ssl.SSLCertVerificationError, name: str) -> str:
    code = exc.verify_code
    if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_ADDRESS_MISMATCH):
        option = "--ip" if _looks_like_ip(name) else "--host"
        return (f"the server's certificate is not valid for {name!r}: connect with the name or address it "
                f"was issued for, or re-issue it on the server with 'securechat gen-certs {option} {name}' (a "
                "running server loads it within seconds)")
    if code in _X509_UNTRUSTED:
        return ("the server's certificate is not signed by the CA in the --ca file (wrong or old ca.pem): "
                f"{CA_HELP}")
    if code in (_X509_EXPIRED, _X509_NOT_YET_VALID):
        return (f"the server's certificate {'has expired' if code == _X509_EXPIRED else 'is not valid yet'}: "
                "check both clocks, or re-issue it with 'securechat gen-certs'")
    return f"the server's certificate was refused ({exc.verify_message}): {CA_HELP}"


def _looks_like_ip(name: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name)
            return True
        except OSError:
            pass
    return False


def ended_in_words(reason: str, where: str, *, shut_down: bool, overflow: str, last_notice: str) -> str:
    """One line for people about why a connection to ``where`` ended (``reason``: the connection's own word)."""
    if shut_down:
        return "the server shut down"
    if overflow:
        return overflow
    reason = reason or "closed"
    refusal = explain_alert(reason.removeprefix("TLS error: "))
    if refusal is not None:
        return f"{where} refused the connection: {refusal}"
    if reason == "closed by peer":
        if last_notice:
            return f"the server closed the connection: {last_notice}"
        return "the server closed the connection"
    return f"connection to the server lost: {reason}"
