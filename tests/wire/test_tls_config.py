"""TLS profile: what a real `securechat serve` negotiates (versions, groups, ciphers), sslyze's verdict,
and the client's refusals (wrong CA, wrong host name)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securechat.pki import certs
from securechat.wire import tls

LOOPBACK = "127.0.0.1"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command line tool is not installed")


# -- a real `securechat serve` in a subprocess ------------------------------------------------------


@contextlib.contextmanager
def serve_process(
    cwd: Path, *args: str, timeout: float = 15.0
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run ``python -m securechat serve --host 127.0.0.1 --port 0 ARGS`` in ``cwd``; yield (port, process).

    Stops it with SIGTERM afterwards (and checks it stops promptly).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "securechat", "serve", "--host", LOOPBACK, "--port", "0", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    drains: list[threading.Thread] = []
    errors: list[str] = []
    try:
        assert proc.stdout is not None
        port = None
        seen = []
        for line in proc.stdout:  # ends at EOF if the server dies
            seen.append(line)
            match = re.search(r"Waiting for connections on [^ ]+:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        if port is None:
            proc.kill()
            err_text = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"serve did not start: {''.join(seen)}{err_text}")
        # Keep reading: the server prints a line per connection, and sslyze makes hundreds; a full pipe
        # would block the server in print().
        drains = [
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True),  # type: ignore[union-attr]
            threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True),  # type: ignore[arg-type]
        ]
        for drain in drains:
            drain.start()
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("serve did not stop within the timeout after SIGTERM") from None
        # what it logged, for the caller to check once it has stopped
        for drain in drains:
            drain.join(5)
        proc.stderr_text = "".join(errors)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding certs/ minted by securechat.pki.certs.mint, as `securechat serve` finds it."""
    root = tmp_path_factory.mktemp("serve")
    certs.mint(root / "certs")
    return root


@pytest.fixture(scope="module")
def modern_port(minted: Path) -> Iterator[int]:
    with serve_process(minted) as (port, _):
        yield port


@pytest.fixture(scope="module")
def intermediate_port(minted: Path) -> Iterator[int]:
    with serve_process(minted, "--tls-min", "1.2") as (port, _):
        yield port


def handshake(port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> tuple[str, str]:
    """(TLS version, cipher) of a completed handshake with the server on ``port``."""
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as sock,
    ):
        version, cipher = sock.version(), sock.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


def s_client(port: int, *options: str, ca: Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", "localhost",
         "-CAfile", str(ca), "-verify_return_error", *options],
        input="", capture_output=True, text=True, timeout=20, check=False,
    )


# -- the contexts themselves ----------------------------------------------------------------------


def test_default_server_context_is_tls13_only_without_compression_or_renegotiation(minted: Path) -> None:
    ctx = tls.server_context(minted / "certs/server.pem", minted / "certs/server.key")
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_groups_can_be_restricted_on_this_python() -> None:
    """The mechanism works here (ssl.set_groups or the verified ctypes path), not just the fallback."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tls.set_groups(ctx) in ("set_groups", "ctypes")
    # the round trip that confirms the SSL_CTX pointer leaves the context's versions as they were
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_unknown_group_name_is_refused_not_ignored() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert tls.set_groups(ctx, ("no-such-group",)) is None


def test_minted_certificate_fits_the_modern_profile(minted: Path) -> None:
    cert = x509.load_pem_x509_certificate((minted / "certs/server.pem").read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=90, minutes=10)


# -- what the real server negotiates ----------------------------------------------------------------


def test_default_server_speaks_tls13(minted: Path, modern_port: int) -> None:
    version, _ = handshake(modern_port, tls.client_context(minted / "certs/ca.pem"))
    assert version == "TLSv1.3"


def test_default_server_refuses_a_tls12_client(minted: Path, modern_port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(minted / "certs/ca.pem")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(modern_port, ctx)


@pytest.mark.parametrize("group,ok", [("X25519", True), ("P-256", True), ("P-384", True),
                                      ("X448", False), ("P-521", False), ("ffdhe2048", False)])
def test_python_client_offering_one_group(minted: Path, modern_port: int, group: str, ok: bool) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(minted / "certs/ca.pem")
    assert tls.set_groups(ctx, (group,)) is not None
    if ok:
        assert handshake(modern_port, ctx)[0] == "TLSv1.3"
    else:
        with pytest.raises(ssl.SSLError):
            handshake(modern_port, ctx)


@needs_openssl
@pytest.mark.parametrize("group,key", [("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")])
def test_openssl_client_gets_allowed_group(minted: Path, modern_port: int, group: str, key: str) -> None:
    out = s_client(modern_port, "-groups", group, ca=minted / "certs/ca.pem")
    assert out.returncode == 0, out.stderr
    assert "Protocol  : TLSv1.3" in out.stdout or "TLSv1.3" in out.stdout
    temp_key = re.search(r"Server Temp Key: (.*)", out.stdout)
    assert temp_key is not None and key in temp_key.group(1)
    assert "Verify return code: 0 (ok)" in out.stdout


@needs_openssl
@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048"])
def test_openssl_client_with_other_group_is_refused(minted: Path, modern_port: int, group: str) -> None:
    out = s_client(modern_port, "-groups", group, ca=minted / "certs/ca.pem")
    assert out.returncode != 0
    assert "handshake failure" in out.stderr
    assert "Cipher is (NONE)" in out.stdout


@needs_openssl
def test_openssl_tls12_client_is_refused_by_default(minted: Path, modern_port: int) -> None:
    out = s_client(modern_port, "-tls1_2", ca=minted / "certs/ca.pem")
    assert out.returncode != 0
    assert "protocol version" in out.stderr


def test_tls_min_12_server_accepts_tls12_with_an_aead_suite(minted: Path, intermediate_port: int) -> None:
    ctx = tls.client_context(minted / "certs/ca.pem", tls_min="1.2")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = handshake(intermediate_port, ctx)
    assert version == "TLSv1.2"
    assert cipher in tls.INTERMEDIATE_CIPHERS.split(":")
    # and TLS 1.3 clients still get TLS 1.3
    assert handshake(intermediate_port, tls.client_context(minted / "certs/ca.pem"))[0] == "TLSv1.3"


@needs_openssl
@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                                    "ECDHE-ECDSA-CHACHA20-POLY1305"])
def test_tls_min_12_accepts_aead_suites(minted: Path, intermediate_port: int, cipher: str) -> None:
    out = s_client(intermediate_port, "-tls1_2", "-cipher", cipher, ca=minted / "certs/ca.pem")
    assert out.returncode == 0, out.stderr
    assert f"Cipher is {cipher}" in out.stdout


@needs_openssl
@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256",
                                    "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES256-SHA"])
def test_tls_min_12_refuses_cbc_suites(minted: Path, intermediate_port: int, cipher: str) -> None:
    out = s_client(intermediate_port, "-tls1_2", "-cipher", cipher, ca=minted / "certs/ca.pem")
    assert out.returncode != 0
    assert "handshake failure" in out.stderr  # the server said no: the client did offer the suite
    assert "Cipher is (NONE)" in out.stdout


@needs_openssl
@pytest.mark.parametrize("group", ["X448", "ffdhe2048"])
def test_tls_min_12_refuses_other_groups_over_tls12(minted: Path, intermediate_port: int, group: str) -> None:
    out = s_client(intermediate_port, "-tls1_2", "-groups", group, ca=minted / "certs/ca.pem")
    assert out.returncode != 0


# -- the client's refusals ---------------------------------------------------------------------------


def test_client_refuses_a_server_from_another_ca(tmp_path: Path, server_ctx: ssl.SSLContext,
                                                 certs_handshake) -> None:  # type: ignore[no-untyped-def]
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        certs_handshake(server_ctx, tls.client_context(tmp_path / "other-ca.pem"), "localhost")
    assert info.value.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY


def test_client_refuses_a_wrong_host_name(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                                          certs_handshake) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        certs_handshake(server_ctx, client_ctx, "chat.example.lan")
    assert info.value.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH
    certs_handshake(server_ctx, client_ctx, "localhost")  # the right name passes


def test_client_refuses_a_wrong_ip_address(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                                           certs_handshake) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ssl.SSLCertVerificationError):
        certs_handshake(server_ctx, client_ctx, "127.0.0.2")
    certs_handshake(server_ctx, client_ctx, "127.0.0.1")


def test_client_without_ca_refuses_a_private_ca(server_ctx: ssl.SSLContext,
                                                certs_handshake) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ssl.SSLCertVerificationError):
        certs_handshake(server_ctx, tls.client_context(None), "localhost")


# -- sslyze ------------------------------------------------------------------------------------------

SSLYZE_SPEC = "sslyze>=6,<7"


def _sslyze_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "securechat-tests" / "sslyze-venv"


def _works(exe: str | Path) -> bool:
    try:
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "--mozilla_config" in out.stdout


@pytest.fixture(scope="session")
def sslyze_exe() -> str:
    """The sslyze command: $SECURECHAT_SSLYZE, on PATH, or installed into its own cached venv.

    sslyze pins its own cryptography (<47) and nassl, so it gets a venv of its own rather than an extra
    beside securechat's dependencies. Skips (with the reason) only when it cannot be installed.
    """
    explicit = os.environ.get("SECURECHAT_SSLYZE")
    if explicit:
        if not _works(explicit):
            pytest.fail(f"SECURECHAT_SSLYZE={explicit} does not run sslyze")
        return explicit
    on_path = shutil.which("sslyze")
    if on_path and _works(on_path):
        return on_path
    env_dir = _sslyze_cache()
    exe = env_dir / ("Scripts/sslyze.exe" if os.name == "nt" else "bin/sslyze")
    if exe.exists() and _works(exe):
        return str(exe)
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        out = subprocess.run([str(python), "-m", "pip", "install", "-q", SSLYZE_SPEC],
                             capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot install sslyze into {env_dir}: {exc}")
    if out.returncode != 0 or not _works(exe):
        why = (out.stderr or out.stdout).strip()[-500:]
        pytest.skip(f"cannot install {SSLYZE_SPEC} into {env_dir}: {why}")
    return str(exe)


def run_sslyze(exe: str, port: int, profile: str, ca: Path, tmp_path: Path) -> tuple[int, str, dict]:
    json_out = tmp_path / f"sslyze-{profile}.json"
    # HOST:PORT{IP}: connect to 127.0.0.1 but send SNI and check the certificate for "localhost".
    out = subprocess.run(
        [exe, f"--mozilla_config={profile}", f"--certinfo_ca_file={ca}", f"--json_out={json_out}",
         f"localhost:{port}{{{LOOPBACK}}}"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    report = json.loads(json_out.read_text()) if json_out.exists() else {}
    return out.returncode, out.stdout + out.stderr, report


def _cert_deployment(report: dict) -> dict:
    result = report["server_scan_results"][0]["scan_result"]["certificate_info"]["result"]
    return result["certificate_deployments"][0]


@pytest.mark.slow
def test_sslyze_default_server_is_mozilla_modern(sslyze_exe: str, minted: Path, modern_port: int,
                                                tmp_path: Path) -> None:
    rc, text, report = run_sslyze(sslyze_exe, modern_port, "modern", minted / "certs/ca.pem", tmp_path)
    assert rc == 0 and "OK - Compliant" in text, text
    info = report["server_scan_results"][0]["scan_result"]["certificate_info"]["result"]
    assert info["hostname_used_for_server_name_indication"] == "localhost"
    validations = {p["trust_store"]["name"]: p for p in _cert_deployment(report)["path_validation_results"]}
    # sslyze 6 validates the path for the host name (cryptography's server verifier): chain + name
    assert validations["Supplied CA file"]["was_validation_successful"] is True, validations
    curves = report["server_scan_results"][0]["scan_result"]["elliptic_curves"]["result"]
    assert {c["name"] for c in curves["supported_curves"]} == {"X25519", "secp256r1", "secp384r1"}


@pytest.mark.slow
def test_sslyze_tls_min_12_is_mozilla_intermediate(sslyze_exe: str, minted: Path, intermediate_port: int,
                                                   tmp_path: Path) -> None:
    rc, text, _ = run_sslyze(sslyze_exe, intermediate_port, "intermediate", minted / "certs/ca.pem", tmp_path)
    assert rc == 0 and "OK - Compliant" in text, text


@pytest.mark.slow
def test_sslyze_flags_tls12_against_modern(sslyze_exe: str, minted: Path, intermediate_port: int,
                                           tmp_path: Path) -> None:
    """The check bites: the TLS 1.2 server is not "modern"."""
    rc, text, _ = run_sslyze(sslyze_exe, intermediate_port, "modern", minted / "certs/ca.pem", tmp_path)
    assert rc != 0 and "Not compliant" in text and "tls_versions" in text, text


@pytest.mark.slow
def test_sslyze_flags_a_certificate_for_another_host_name(sslyze_exe: str, minted: Path, modern_port: int,
                                                        tmp_path: Path) -> None:
    """sslyze's verdict covers the host name: the same server under a name not in its certificate fails."""
    ca = minted / "certs/ca.pem"
    json_out = tmp_path / "other-name.json"
    out = subprocess.run(
        [sslyze_exe, "--mozilla_config=modern", f"--certinfo_ca_file={ca}", f"--json_out={json_out}",
         f"chat.example.lan:{modern_port}{{{LOOPBACK}}}"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode != 0 and "certificate_path_validation" in out.stdout, out.stdout


def test_groups_fallback_keeps_working_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, minted: Path
) -> None:
    """Without set_groups and without a confirmed SSL_CTX (another build), contexts still work."""
    if hasattr(ssl.SSLContext, "set_groups"):
        pytest.skip("this Python has SSLContext.set_groups: the fallback is never used")
    monkeypatch.setattr(tls, "_ctrl_cache", [None])
    monkeypatch.setattr(tls, "_groups_warned", False)
    with caplog.at_level(logging.WARNING, logger="securechat.tls"):
        server = tls.server_context(minted / "certs/server.pem", minted / "certs/server.key")
        client = tls.client_context(minted / "certs/ca.pem")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "cannot restrict TLS key exchange groups" in caplog.records[0].getMessage()
    assert server.minimum_version == ssl.TLSVersion.TLSv1_3 and client.verify_mode == ssl.CERT_REQUIRED


def test_ssl_ctx_pointer_is_refused_for_a_wrong_object() -> None:
    ctrl = tls._ssl_ctx_ctrl()
    assert ctrl is not None
    assert tls._ssl_ctx_pointer(object(), ctrl) is None  # type: ignore[arg-type]
