"""The one place where securechat builds its TLS settings.

Both ends are ours, so the default is TLS 1.3 only (Mozilla's "modern" profile); ``tls_min="1.2"``
opens the door to older clients with Mozilla's "intermediate" cipher list (AEAD only, no CBC).
Certificate and hostname verification are always on for clients: ``--pin`` and ``--tofu`` only choose
which certificate a normal verifying context trusts (see :mod:`securechat.client.identity`).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import re
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("securechat.tls")

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


# Mozilla "modern" and "intermediate" (v5.7) key exchange groups, most preferred first: X25519, then
# the NIST curves P-256 (prime256v1) and P-384 (secp384r1). OpenSSL's default list also offers X448,
# P-521 and the finite-field groups (ffdhe2048...), which the profiles leave out.
MODERN_GROUPS = ("X25519", "P-256", "P-384")

# OpenSSL's SSL_CTRL_SET_GROUPS_LIST (ssl.h; the same number since 1.1.0, where it replaced
# SSL_CTRL_SET_CURVES_LIST) and SSL_CTRL_GET_MIN_PROTO_VERSION / SSL_CTRL_GET_MAX_PROTO_VERSION.
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
_SSL_CTRL_GET_MAX_PROTO_VERSION = 131

# The "cannot restrict the groups" warning is logged once per process, not for every context.
_groups_warned = False
_groups_lock = threading.Lock()
_ctrl_cache: list[object] = []  # [SSL_CTX_ctrl function or None], resolved once


def _ssl_ctx_ctrl() -> object | None:
    """``SSL_CTX_ctrl`` from the very OpenSSL that the ``_ssl`` module uses, or None.

    Loading ``libssl`` by name could pick another copy (another version, another struct layout) than
    the one behind ``ssl``; looking the symbol up through the ``_ssl`` extension's own handle gets the
    one it is linked against (dlsym searches a library's dependencies). On Windows the DLL lies beside
    ``_ssl.pyd``. A build that links OpenSSL statically and hides its symbols yields None.
    """
    if _ctrl_cache:
        return _ctrl_cache[0]
    func = None
    try:
        import _ssl

        candidates = [_ssl.__file__]
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            candidates = sorted(glob.glob(os.path.join(os.path.dirname(_ssl.__file__), "libssl*.dll")))
        for path in candidates:
            try:
                func = ctypes.CDLL(path).SSL_CTX_ctrl
                break
            except (OSError, AttributeError):
                continue
        if func is not None:
            func.restype = ctypes.c_long
            func.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    except (ImportError, AttributeError, OSError):
        func = None
    _ctrl_cache.append(func)
    return func


def _ssl_ctx_pointer(ctx: ssl.SSLContext, ctrl: Any) -> int | None:
    """The ``SSL_CTX *`` behind ``ctx``, confirmed by a round trip, or None.

    CPython's ``PySSLContext`` (Modules/_ssl.c, unchanged from 3.x through 3.14) starts with
    ``PyObject_HEAD`` followed by ``SSL_CTX *ctx``; ``object.__basicsize__`` is the size of that head
    on this very build (also for debug and free-threaded builds). The pointer is only trusted once
    OpenSSL reports, for two different settings made through the ssl module, the protocol versions
    that the ssl module set: a wrong pointer would not track them.
    """
    if sys.implementation.name != "cpython" or not isinstance(ctx, ssl.SSLContext):
        return None
    offset = object.__basicsize__
    if type(ctx).__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
        return None
    pointer = ctypes.c_void_p.from_address(id(ctx) + offset).value
    if not pointer:
        return None
    saved = ctx.minimum_version, ctx.maximum_version
    try:
        for low, high in (
            (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
            (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
        ):
            ctx.maximum_version = high
            ctx.minimum_version = low
            got = (
                ctrl(pointer, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None),
                ctrl(pointer, _SSL_CTRL_GET_MAX_PROTO_VERSION, 0, None),
            )
            if got != (low.value, high.value):
                return None
    finally:
        ctx.minimum_version, ctx.maximum_version = saved
    return pointer


def set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...] = MODERN_GROUPS) -> str | None:
    """Restrict the key exchange groups of ``ctx`` to ``groups``; return how, or None if impossible.

    Python before 3.15 has no way to set the group *list*: ``set_ecdh_curve`` takes a single curve.
    The choice here, in order:

    1. ``SSLContext.set_groups`` when the ssl module has it (CPython 3.15+).
    2. ``SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, "X25519:P-256:P-384")`` through ctypes, on the
       ``SSL_CTX`` found by :func:`_ssl_ctx_pointer` (layout known, confirmed by a round trip) and with
       the ``SSL_CTX_ctrl`` of the OpenSSL that ``_ssl`` is linked against. This is a stable public
       OpenSSL API (the ``SSL_CTX_set1_groups_list`` macro); only the way to the pointer is CPython
       specific, hence the checks.
    3. Otherwise keep OpenSSL's defaults (still only strong groups: X25519, P-256, X448, P-521, P-384
       and ffdhe2048+) and log one warning per process.

    An ``OPENSSL_CONF`` file (``Groups = ...``) was rejected: it must be in the environment before the
    ssl module initialises OpenSSL, it applies to every context in the process, and a system
    configuration or an ``OPENSSL_CONF`` set by the user would silently override or be overridden.
    """
    global _groups_warned
    text = ":".join(groups)
    native = getattr(ctx, "set_groups", None)
    if callable(native):
        for arg in (text, list(groups)):
            try:
                native(arg)
                return "set_groups"
            except (TypeError, ValueError, ssl.SSLError):
                continue
    ctrl = _ssl_ctx_ctrl()
    pointer = _ssl_ctx_pointer(ctx, ctrl) if ctrl is not None else None
    if ctrl is not None and pointer is not None:
        if ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, text.encode("ascii")) == 1:  # type: ignore[operator]
            return "ctypes"
    with _groups_lock:
        if not _groups_warned:
            _groups_warned = True
            log.warning(
                "cannot restrict TLS key exchange groups to %s with this Python/OpenSSL (%s): "
                "OpenSSL's default groups stay enabled",
                text,
                ssl.OPENSSL_VERSION,
            )
    return None


def _harden(ctx: ssl.SSLContext, tls_min: str) -> None:
    try:
        ctx.minimum_version = TLS_VERSIONS[tls_min]
    except KeyError:
        choices = ", ".join(TLS_VERSIONS)
        raise ValueError(f"unsupported TLS version {tls_min!r}: choose one of {choices}") from None
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tls_min == "1.2":
        ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    set_groups(ctx)


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


UNPARSEABLE = "it cannot be parsed"


def server_leaf_problem(der: bytes) -> str | None:
    """What makes a certificate that OpenSSL verified unfit to be a server's, or None.

    OpenSSL checks the chain, validity, host name and, when the extension is there, the purpose; it
    accepts a leaf that is itself a CA, or one without extendedKeyUsage. A server certificate here
    is what ``gen-certs`` mints: not a CA, and explicitly for serverAuth. Applied after every
    verified handshake (``--ca``, ``--pin``, ``--tofu`` alike), so all modes accept the same servers.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        cert = x509.load_der_x509_certificate(der)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except Exception:  # ValueError, InvalidVersion, ...: what OpenSSL took, cryptography could not
        return UNPARSEABLE
    if is_ca:
        return "it is a CA certificate, not a server certificate"
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "it does not say it is for TLS servers (no extendedKeyUsage serverAuth)"
    except Exception:
        return UNPARSEABLE
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        return "it is not a server certificate (no extendedKeyUsage serverAuth: a client certificate?)"
    return None


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
