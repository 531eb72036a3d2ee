"""What the browser front door serves: the chat page's files, and the onboarding page with the CA certificate.

The files ship inside the package (``securechat/server/static/``: HTML, CSS, one JavaScript module, an
icon) and are read once, at start; nothing is fetched from anywhere else, nothing is built. The
onboarding page is the one thing served over plain HTTP (same port, before the browser trusts the
CA): the CA's *public* certificate in PEM and DER, its fingerprint to compare with the server's banner,
and the steps to install it. What it serves of the CA is re-encoded from the parsed certificate, so
even a certificate file that held a private key by mistake could not leak it here.
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import string
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from securechat.wire import tls

# path -> (file in static/, content type): the chat page over HTTPS.
APP_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
}

# ... and the onboarding page's own, over plain HTTP (the CA certificate is added per server).
ONBOARD_FILES = {
    "/onboard.css": ("onboard.css", "text/css; charset=utf-8"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
}

# What browsers are told about caching: ask again each time, 304 when unchanged (ETag), so a new
# version of the page after an upgrade is picked up at once and a phone re-downloads nothing.
CACHE = "no-cache"


@dataclass(frozen=True)
class Asset:
    """A file to serve: its bytes, content type and ETag."""

    body: bytes
    content_type: str
    etag: str
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(body: bytes, content_type: str, *headers: tuple[str, str]) -> Asset:
        return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', headers)


def _static(name: str) -> bytes:
    return files("securechat.server").joinpath("static").joinpath(name).read_bytes()


def _load(table: dict[str, tuple[str, str]]) -> dict[str, Asset]:
    cache: dict[str, bytes] = {}
    return {path: Asset.of(cache.setdefault(name, _static(name)), kind) for path, (name, kind) in table.items()}


class AppFiles:
    """The chat page's files, read once."""

    def __init__(self) -> None:
        self.assets = _load(APP_FILES)

    def get(self, path: str) -> Asset | None:
        return self.assets.get(path)


def load_ca(cert_file: str | Path) -> x509.Certificate | None:
    """The CA certificate for ``cert_file`` (a server's PEM chain): the last of the chain if it is a CA,
    else ``ca.pem`` beside it; None when neither is there."""
    candidates: list[x509.Certificate] = []
    try:
        candidates = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())[1:][-1:]
    except (OSError, ValueError):
        pass
    beside = Path(cert_file).parent / "ca.pem"
    try:
        candidates += x509.load_pem_x509_certificates(beside.read_bytes())[:1]
    except (OSError, ValueError):
        pass
    for cert in candidates:
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return cert
        except x509.ExtensionNotFound:
            continue
    return None


def certificate_names(cert_file: str | Path) -> frozenset[str]:
    """The DNS names and IP addresses (as text) the server certificate is valid for, lower case."""
    try:
        leaf = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return frozenset()
    return frozenset([*(n.lower() for n in san.get_values_for_type(x509.DNSName)),
                      *(str(a) for a in san.get_values_for_type(x509.IPAddress))])


def _host_name(host: str) -> str:
    """``host`` (a validated Host header) without its port and brackets."""
    if host.startswith("["):
        return host[1:host.index("]")].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class Onboarding:
    """The onboarding page and the CA certificate, for plain HTTP on the chat port."""

    def __init__(self, ca: x509.Certificate | None, names: frozenset[str] = frozenset()) -> None:
        self.names = names
        self.assets = _load(ONBOARD_FILES)
        self.template = string.Template(_static("onboard.html").decode("utf-8"))
        if ca is not None:
            der = ca.public_bytes(Encoding.DER)
            pem = ca.public_bytes(Encoding.PEM)
            self.fingerprint = tls.fingerprint(der)
            disposition = 'attachment; filename="securechat-ca.{}"'
            self.assets["/ca.crt"] = Asset.of(der, "application/x-x509-ca-cert",
                                              ("Content-Disposition", disposition.format("crt")))
            self.assets["/ca.pem"] = Asset.of(pem, "application/x-pem-file",
                                              ("Content-Disposition", disposition.format("pem")))
        else:
            self.fingerprint = ""

    @staticmethod
    def for_certificate(cert_file: str | Path) -> Onboarding:
        """The onboarding of a server that uses ``cert_file``."""
        return Onboarding(load_ca(cert_file), certificate_names(cert_file))

    def get(self, path: str) -> Asset | None:
        return self.assets.get(path)

    def page(self, host: str) -> Asset:
        """The page for a browser that reached us as ``host`` (a validated Host header)."""
        warning = ""
        name = _host_name(host)
        if self.names and name not in self.names:
            usable = sorted(self.names, key=lambda n: (not _is_ip(n), n))
            warning = (f'<p class="warning">The server\'s certificate does not cover the address {html.escape(name)}, '
                       "so the chat will not open there; use one it covers: "
                       f"{html.escape(', '.join(usable[:6]))}.</p>")
        if not self.fingerprint:
            warning += ('<p class="warning">This server has no CA certificate to offer (it was started with a '
                        "certificate from elsewhere): ask whoever runs it how to trust it.</p>")
        body = self.template.substitute(https=html.escape(f"https://{host}/"), host=html.escape(host),
                                        fingerprint=html.escape(self.fingerprint or "(none)"), warning=warning)
        return Asset.of(body.encode("utf-8"), "text/html; charset=utf-8")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
