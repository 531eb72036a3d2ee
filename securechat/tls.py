"""The one place where securechat builds its TLS settings.

Both ends are ours, so the default is TLS 1.3 only (Mozilla's "modern" profile); ``tls_min="1.2"``
opens the door to older clients with Mozilla's "intermediate" cipher list (AEAD only, no CBC).
Certificate and hostname verification are always on for clients; the only way to relax them is to
pin a fingerprint instead (see :func:`client_context`'s ``pin`` parameter in the identity work).
"""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path

TLS_VERSIONS = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_TLS_MIN = "1.3"

# Mozilla "intermediate" (v5.7) TLS 1.2 suites: forward secret AEAD only, no CBC, no RSA key exchange.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


def _harden(ctx: ssl.SSLContext, tls_min: str) -> None:
    try:
        ctx.minimum_version = TLS_VERSIONS[tls_min]
    except KeyError:
        raise ValueError(f"unsupported TLS version {tls_min!r}: choose one of {', '.join(TLS_VERSIONS)}") from None
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tls_min == "1.2":
        ctx.set_ciphers(INTERMEDIATE_CIPHERS)


def server_context(
    certfile: str | Path,
    keyfile: str | Path,
    *,
    tls_min: str = DEFAULT_TLS_MIN,
    client_ca: str | Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """Build the server's context from a certificate chain and its key.

    With ``require_client_cert`` only clients presenting a certificate signed by ``client_ca``
    complete the handshake (mutual TLS).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, tls_min)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    ctx.load_cert_chain(str(certfile), str(keyfile))
    if require_client_cert:
        if client_ca is None:
            raise ValueError("require_client_cert needs the CA that signs client certificates")
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    cafile: str | Path | None = None,
    *,
    tls_min: str = DEFAULT_TLS_MIN,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
) -> ssl.SSLContext:
    """Build a client's context that verifies the server against ``cafile`` (certificate and host name).

    ``certfile``/``keyfile`` present a client certificate for mutual TLS.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    _harden(ctx, tls_min)
    if cafile is not None:
        ctx.load_verify_locations(cafile=str(cafile))
    if certfile is not None:
        ctx.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None)
    return ctx


def format_fingerprint(digest: bytes) -> str:
    """``AA:BB:...`` form of a digest, as OpenSSL and browsers show it."""
    return ":".join(f"{b:02X}" for b in digest)


def fingerprint(cert: bytes | str) -> str:
    """SHA-256 fingerprint (``AA:BB:...``) of a certificate given as DER bytes or PEM text."""
    der = ssl.PEM_cert_to_DER_cert(cert) if isinstance(cert, str) else cert
    return format_fingerprint(hashlib.sha256(der).digest())


_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def file_fingerprints(path: str | Path) -> list[str]:
    """SHA-256 fingerprints of every certificate in a PEM file, in order (keys and other blocks skipped)."""
    prints = [fingerprint(m.group(0)) for m in _PEM_CERT.finditer(Path(path).read_text("ascii", "replace"))]
    if not prints:
        raise ValueError(f"no PEM certificate in {path}")
    return prints


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 fingerprint of the first certificate in a PEM file."""
    return file_fingerprints(path)[0]


def normalise_fingerprint(text: str) -> str:
    """Accept ``aa:bb``, ``AABB`` or ``aa bb`` and return the canonical ``AA:BB:...`` form.

    Raises ValueError unless it is exactly 32 bytes of hex (SHA-256).
    """
    hexdigits = "".join(ch for ch in text if ch not in ": ").strip()
    try:
        raw = bytes.fromhex(hexdigits)
    except ValueError:
        raise ValueError(f"not a hex fingerprint: {text!r}") from None
    if len(raw) != 32:
        raise ValueError(f"a SHA-256 fingerprint has 32 bytes, this one has {len(raw)}")
    return format_fingerprint(raw)
