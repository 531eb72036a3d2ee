"""What the browser front door serves: the page's files (no inline script, nothing from elsewhere, text never
parsed as HTML) and the onboarding page (the CA's public certificate only, its fingerprint, the https link).
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from securechat.pki import certs
from securechat.server import pages
from securechat.wire import tls

ROOT = Path(__file__).resolve().parents[2]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def _tags(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


@pytest.mark.parametrize("name", ["index.html", "onboard.html"])
def test_pages_have_no_inline_script_no_inline_style_and_nothing_from_elsewhere(name: str) -> None:
    html = (ROOT / "securechat" / "server" / "static" / name).read_text()
    parsed = _tags(html)
    assert parsed.script_text.strip() == ""
    for tag, attrs in parsed.tags:
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)  # no inline event handlers
        assert "style" not in attrs and tag != "style", tag
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not re.match(r"(?i)(https?:)?//|javascript:|data:", value) or value.startswith("${"), value
    if name == "index.html":
        assert ("script", {"type": "module", "src": "/app.js"}) in parsed.tags


def test_the_script_never_turns_text_into_html() -> None:
    js = (ROOT / "securechat" / "server" / "static" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout(\"", "srcdoc", "createContextualFragment"):
        assert sink not in js, sink
    assert not re.search(r"https?://", js)  # no other server, no CDN
    css = (ROOT / "securechat" / "server" / "static" / "app.css").read_text()
    assert "@import" not in css and "url(" not in css


def test_the_app_files_load_from_the_package_with_types_and_etags() -> None:
    app = pages.AppFiles()
    for path, kind in [("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css"),
                       ("/icon.svg", "image/svg+xml")]:
        asset = app.get(path)
        assert asset is not None and asset.content_type.startswith(kind) and asset.body
        assert re.fullmatch(r'"[0-9a-f]{32}"', asset.etag)
    assert app.get("/../pyproject.toml") is None and app.get("/static/app.js") is None


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pages") / "certs"
    certs.mint(directory, hosts=["chat.lan"], ips=["192.168.0.20"])
    return directory


def test_onboarding_offers_the_ca_certificate_in_pem_and_der_and_its_fingerprint(minted: Path) -> None:
    onboarding = pages.Onboarding.for_certificate(minted / "server.pem")
    ca = x509.load_pem_x509_certificate((minted / "ca.pem").read_bytes())
    der, pem = onboarding.get("/ca.crt"), onboarding.get("/ca.pem")
    assert der is not None and pem is not None
    assert der.body == ca.public_bytes(Encoding.DER) and der.content_type == "application/x-x509-ca-cert"
    assert x509.load_pem_x509_certificate(pem.body) == ca
    fingerprint = tls.file_fingerprint(minted / "ca.pem")
    page = onboarding.page("192.168.0.20:5555").body.decode()
    assert fingerprint in page
    assert 'href="https://192.168.0.20:5555/"' in page and 'href="/ca.crt"' in page and 'href="/ca.pem"' in page
    assert "Certificate Trust Settings" in page and "Install a certificate" in page  # iOS and Android steps
    assert "class=\"warning\"" not in page
    assert "class=\"warning\"" not in onboarding.page("chat.lan:5555").body.decode()


def test_onboarding_warns_about_an_address_the_certificate_does_not_cover(minted: Path) -> None:
    onboarding = pages.Onboarding.for_certificate(minted / "server.pem")
    page = onboarding.page("10.9.8.7:5555").body.decode()
    assert "does not cover the address 10.9.8.7" in page and "192.168.0.20" in page


def test_onboarding_never_serves_a_private_key(minted: Path, tmp_path: Path) -> None:
    # A careless operator's chain file with the CA's key pasted in: only the certificate is served.
    sloppy = tmp_path / "chain.pem"
    sloppy.write_bytes((minted / "server.pem").read_bytes() + (minted / "ca.key").read_bytes())
    onboarding = pages.Onboarding.for_certificate(sloppy)
    served = b"".join(a.body for a in onboarding.assets.values()) + onboarding.page("192.168.0.20").body
    assert b"PRIVATE KEY" not in served
    key_der = (minted / "ca.key").read_bytes()
    assert key_der not in served
    assert onboarding.get("/ca.crt") is not None


def test_onboarding_without_a_ca_says_so(tmp_path: Path) -> None:
    onboarding = pages.Onboarding(None)
    assert onboarding.get("/ca.crt") is None
    assert "no CA certificate to offer" in onboarding.page("192.168.0.20:5555").body.decode()


_BUILD = """
import sys, warnings
warnings.simplefilter("ignore")
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution
dist = Distribution({"script_name": "setup.py"})
apply_configuration(dist, "pyproject.toml")
build = dist.get_command_obj("build_py")
build.build_lib = sys.argv[1]
build.ensure_finalized()
build.run()
"""


def test_the_static_files_are_installed_with_the_package(tmp_path: Path) -> None:
    """setuptools' build_py (what a wheel or an install copies) takes the page's files along."""
    done = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    static = tmp_path / "securechat" / "server" / "static"
    assert sorted(p.name for p in static.iterdir()) == sorted(
        p.name for p in (ROOT / "securechat" / "server" / "static").iterdir())
