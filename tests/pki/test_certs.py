"""securechat.pki.certs: minted files work in real TLS handshakes and OpenSSL enforces the CA's limits."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat.pki import builders, certs
from securechat.pki.certdir import LOCK_NAME
from securechat.pki.certs import CertError, cert_not_after, issue_server_cert, mint
from securechat.wire import netinfo
from securechat.wire.tls import client_context, file_fingerprint, server_context

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")

HOSTS = ("chat.lan", "abc123")  # abc123: a bare single-label machine name must work too
IPS = ("10.9.8.7",)


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> certs.MintResult:
    """One EC CA + server + client "alice" for the read-only tests of this module."""
    return mint(tmp_path_factory.mktemp("certs"), hosts=HOSTS, ips=IPS, clients=("alice",))


@pytest.fixture(scope="module")
def minted_rsa(tmp_path_factory: pytest.TempPathFactory) -> certs.MintResult:
    return mint(tmp_path_factory.mktemp("certs-rsa"), key_type="rsa")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path):  # type: ignore[no-untyped-def]
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.name != LOCK_NAME  # the (empty) lock file of securechat.pki.certdir is no content
    }


def openssl_verify(ca: Path, leaf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), *extra, str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def rogue_leaf(result: certs.MintResult, tmp_path: Path, *, dns: str | None = None, ip: str | None = None):  # type: ignore[no-untyped-def]
    """A server certificate for ``dns``/``ip`` signed with the CA's own key, as a thief of ca.key would."""
    ca_cert, ca_key = load(result.ca_cert), load_key(result.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    if dns:
        sans.append(x509.DNSName(dns))
    if ip:
        sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cert = (
        x509.CertificateBuilder()
        # Not host-name-like: OpenSSL checks such a CN against the constraints when no DNS SAN exists.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue leaf")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "rogue.pem", tmp_path / "rogue.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------- handshakes


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1", "chat.lan", "abc123", "10.9.8.7"])
def test_handshake_verifies_for_every_san(minted, certs_handshake, name):  # type: ignore[no-untyped-def]
    certs_handshake(
        server_context(minted.server_cert, minted.server_key), client_context(minted.ca_cert), name
    )


def test_handshake_verifies_for_machine_hostname(minted, certs_handshake):  # type: ignore[no-untyped-def]
    names = netinfo.machine_names()
    if not names:
        pytest.skip("this machine's host name is not a usable DNS name")
    assert set(names) <= set(minted.dns_names)
    certs_handshake(
        server_context(minted.server_cert, minted.server_key), client_context(minted.ca_cert), names[0]
    )


@pytest.mark.parametrize("name", ["www.example.com", "other.lan", "10.9.8.6"])
def test_handshake_refuses_names_not_in_the_certificate(minted, certs_handshake, name):  # type: ignore[no-untyped-def]
    with pytest.raises(ssl.SSLCertVerificationError):
        certs_handshake(
            server_context(minted.server_cert, minted.server_key), client_context(minted.ca_cert), name
        )


def test_handshake_refuses_another_ca(minted, certs_handshake, tmp_path):  # type: ignore[no-untyped-def]
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        certs_handshake(
            server_context(minted.server_cert, minted.server_key),
            client_context(tmp_path / "other.pem"),
            "localhost",
        )


def test_client_certificate_passes_mutual_tls(minted, certs_handshake):  # type: ignore[no-untyped-def]
    cert, key = minted.clients["alice"]
    server = server_context(
        minted.server_cert, minted.server_key, client_ca=minted.ca_cert, require_client_cert=True
    )
    certs_handshake(server, client_context(minted.ca_cert, certfile=cert, keyfile=key), "localhost")
    with pytest.raises(ssl.SSLError):  # and the server really checks: no certificate, no chat
        certs_handshake(server, client_context(minted.ca_cert), "localhost")


def test_rsa_variant_handshakes(minted_rsa, certs_handshake):  # type: ignore[no-untyped-def]
    for path in (minted_rsa.ca_key, minted_rsa.server_key):
        key = load_key(path)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    usage = load(minted_rsa.server_cert).extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    for tls_min in ("1.2", "1.3"):
        certs_handshake(
            server_context(minted_rsa.server_cert, minted_rsa.server_key, tls_min=tls_min),
            client_context(minted_rsa.ca_cert, tls_min=tls_min),
            "127.0.0.1",
        )


# ---------------------------------------------------------------------------------------------- OpenSSL


@needs_openssl
def test_openssl_verifies_server_and_client(minted):  # type: ignore[no-untyped-def]
    done = openssl_verify(minted.ca_cert, minted.server_cert, "-purpose", "sslserver")
    assert done.returncode == 0, done.stdout + done.stderr
    done = openssl_verify(minted.ca_cert, minted.clients["alice"][0], "-purpose", "sslclient")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_openssl
@pytest.mark.parametrize(
    ("dns", "ip"), [("www.example.com", None), (None, "8.8.8.8"), ("localhost", "8.8.8.8")]
)
def test_name_constraints_make_openssl_refuse_outside_leaf(minted, tmp_path, dns, ip):  # type: ignore[no-untyped-def]
    leaf, _ = rogue_leaf(minted, tmp_path, dns=dns, ip=ip)
    done = openssl_verify(minted.ca_cert, leaf)
    assert done.returncode != 0
    assert "permitted subtree violation" in (done.stdout + done.stderr)


@needs_openssl
@pytest.mark.parametrize(
    ("dns", "ip"),
    [
        ("x.y.local", None),
        ("home.arpa", None),
        ("nas.internal", None),
        ("abc123", None),
        (None, "192.168.7.7"),
    ],
)
def test_name_constraints_permit_local_names(minted, tmp_path, dns, ip):  # type: ignore[no-untyped-def]
    # The control for the refusals above: the same rogue leaf builder passes for a permitted name.
    leaf, _ = rogue_leaf(minted, tmp_path, dns=dns, ip=ip)
    done = openssl_verify(minted.ca_cert, leaf)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("dns", "ip", "name"), [("www.example.com", None, "www.example.com"), (None, "8.8.8.8", "8.8.8.8")]
)
def test_name_constraints_make_python_handshake_refuse(minted, certs_handshake, tmp_path, dns, ip, name):  # type: ignore[no-untyped-def]
    leaf, key = rogue_leaf(minted, tmp_path, dns=dns, ip=ip)
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        certs_handshake(server_context(leaf, key), client_context(minted.ca_cert), name)
    assert caught.value.verify_code == 47  # X509_V_ERR_PERMITTED_VIOLATION, not some other failure


def test_python_handshake_accepts_permitted_rogue_leaf(minted, certs_handshake, tmp_path):  # type: ignore[no-untyped-def]
    leaf, key = rogue_leaf(minted, tmp_path, dns="printer.home.arpa")
    certs_handshake(server_context(leaf, key), client_context(minted.ca_cert), "printer.home.arpa")


# ---------------------------------------------------------------------------------------------- contents


def test_ca_certificate_profile(minted):  # type: ignore[no-untyped-def]
    ca = load(minted.ca_cert)
    ext = ca.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not (ku.value.digital_signature or ku.value.key_encipherment or ku.value.content_commitment)
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    permitted = {g.value for g in nc.value.permitted_subtrees}
    assert {"localhost", "local", "lan", "internal", "home.arpa", "abc123"} <= permitted
    assert ipaddress.ip_network("fc00::/7") in permitted
    assert ipaddress.ip_network("10.0.0.0/8") in permitted
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.startswith(
        "securechat local CA on "
    )
    assert ca.subject == ca.issuer
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)


def test_server_certificate_profile(minted):  # type: ignore[no-untyped-def]
    cert = load(minted.server_cert)
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = load(minted.ca_cert).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", *HOSTS} <= set(dns)
    assert {"127.0.0.1", "::1", *IPS} <= ips
    assert {str(a) for a in netinfo.local_addresses()} <= ips
    # Every IPv4 address is also a dNSName, for ncat --ssl-verify, which checks only those.
    ipv4 = [a for a in ips if ipaddress.ip_address(a).version == 4]
    assert tuple(d for d in dns if d not in ipv4) == minted.dns_names
    assert set(ipv4) <= set(dns)
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc < now - dt.timedelta(minutes=4)  # clock skew margin
    assert dt.timedelta(days=89) < cert.not_valid_after_utc - now <= dt.timedelta(days=90)
    assert minted.server_fingerprint == file_fingerprint(minted.server_cert)
    assert minted.ca_fingerprint == file_fingerprint(minted.ca_cert)
    assert cert_not_after(minted.server_cert) == cert.not_valid_after_utc == minted.server_not_after


def test_client_certificate_profile(minted):  # type: ignore[no-untyped-def]
    cert_path, key_path = minted.clients["alice"]
    assert (cert_path.name, key_path.name) == ("client-alice.pem", "client-alice.key")
    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign


def test_keys_are_unencrypted_pkcs8(minted):  # type: ignore[no-untyped-def]
    for path in (minted.ca_key, minted.server_key, minted.clients["alice"][1]):
        assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_cert_not_after_is_aware_utc(minted):  # type: ignore[no-untyped-def]
    when = cert_not_after(minted.ca_cert)
    assert when.utcoffset() == dt.timedelta(0)


# ---------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_modes_whatever_the_umask(tmp_path, umask):  # type: ignore[no-untyped-def]
    old = os.umask(umask)
    try:
        result = mint(tmp_path / "out", clients=("bob",))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700 & ~umask
    keys = [result.ca_key, result.server_key, result.clients["bob"][1]]
    pems = [result.ca_cert, result.server_cert, result.clients["bob"][0]]
    assert sorted(result.written) == sorted(keys + pems)
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for pem in pems:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o644, pem
    lock = tmp_path / "out" / LOCK_NAME  # securechat.pki.certdir's lock file: empty, owner only
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and lock.stat().st_size == 0
    # The CA's ledger records the client certificate (securechat.pki.ledger): owner only, like ca.key.
    ledger = tmp_path / "out" / "invites.db"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([LOCK_NAME, ledger.name,
                                                                           *(p.name for p in keys + pems)])


def test_rerun_keeps_ca_and_issues_new_server_cert(tmp_path):  # type: ignore[no-untyped-def]
    first = mint(tmp_path)
    ca_bytes = first.ca_cert.read_bytes()
    key_bytes = first.ca_key.read_bytes()
    second = mint(tmp_path, hosts=("new.lan",))
    assert second.ca_reused and not first.ca_reused
    assert second.ca_fingerprint == first.ca_fingerprint
    assert (first.ca_cert.read_bytes(), first.ca_key.read_bytes()) == (ca_bytes, key_bytes)
    assert second.server_fingerprint != first.server_fingerprint
    assert "new.lan" in second.dns_names
    assert second.written == (second.server_key, second.server_cert)


def test_force_replaces_ca(tmp_path):  # type: ignore[no-untyped-def]
    first = mint(tmp_path)
    second = mint(tmp_path, force=True)
    assert not second.ca_reused
    assert second.ca_fingerprint != first.ca_fingerprint
    assert second.ca_fingerprint == file_fingerprint(tmp_path / "ca.pem")


def test_refuses_missing_ca_key_and_leaves_files_untouched(tmp_path):  # type: ignore[no-untyped-def]
    mint(tmp_path)
    (tmp_path / "ca.key").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(CertError, match="ca.key is missing.*--force"):
        mint(tmp_path)
    with pytest.raises(CertError):
        issue_server_cert(tmp_path)
    assert snapshot(tmp_path) == before


def test_refuses_mismatched_ca_key(tmp_path):  # type: ignore[no-untyped-def]
    mint(tmp_path / "a")
    mint(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    before = snapshot(tmp_path / "a")
    with pytest.raises(CertError, match="does not match"):
        mint(tmp_path / "a")
    assert snapshot(tmp_path / "a") == before


def test_refuses_server_cert_without_ca(tmp_path):  # type: ignore[no-untyped-def]
    (tmp_path / "server.pem").write_text("someone else's certificate\n")
    before = snapshot(tmp_path)
    with pytest.raises(CertError, match="no CA"):
        mint(tmp_path)
    assert snapshot(tmp_path) == before
    assert not mint(tmp_path, force=True).ca_reused


@pytest.mark.parametrize(("hosts", "ips"), [(("www.example.com",), ()), ((), ("8.8.8.8",))])
def test_reused_ca_refuses_names_outside_its_constraints(tmp_path, hosts, ips):  # type: ignore[no-untyped-def]
    mint(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CertError, match="--force") as caught:
        mint(tmp_path, hosts=hosts, ips=ips)
    assert "\n" not in str(caught.value)
    assert snapshot(tmp_path) == before
    # a new CA built for them may sign them (the user asked for it explicitly)
    assert not mint(tmp_path, hosts=hosts, ips=ips, force=True).ca_reused


def test_reused_ca_leaves_out_detected_names_it_cannot_sign(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    mint(tmp_path)
    # The machine was renamed since the CA was minted.
    monkeypatch.setattr(netinfo, "machine_names", lambda: ["renamed-box", "renamed-box.local"])
    result = mint(tmp_path)
    assert "renamed-box" not in result.dns_names and "renamed-box.local" in result.dns_names
    assert any("renamed-box" in note for note in result.notes)


def test_issue_server_cert_with_injected_clock(tmp_path):  # type: ignore[no-untyped-def]
    first = mint(tmp_path)
    now = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    result = issue_server_cert(tmp_path, hosts=("renewed.lan",), days=30, now=now)
    assert result.ca_reused and result.ca_fingerprint == first.ca_fingerprint
    cert = load(tmp_path / "server.pem")
    assert cert.not_valid_after_utc == (now + dt.timedelta(days=30)).replace(microsecond=0)
    assert cert.not_valid_before_utc == (now - dt.timedelta(minutes=5)).replace(microsecond=0)
    assert cert_not_after(tmp_path / "server.pem") == cert.not_valid_after_utc
    assert "renewed.lan" in result.dns_names


def test_leaf_never_outlives_its_ca(tmp_path):  # type: ignore[no-untyped-def]
    mint(tmp_path)
    ca_end = cert_not_after(tmp_path / "ca.pem")
    issue_server_cert(tmp_path, now=ca_end - dt.timedelta(days=10))
    assert cert_not_after(tmp_path / "server.pem") == ca_end
    with pytest.raises(CertError, match="expired"):
        issue_server_cert(tmp_path, now=ca_end + dt.timedelta(days=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clients": ("bad name",)},
        {"clients": ("x" * 25,)},
        {"clients": ("",)},
        {"hosts": ("*.lan",)},
        {"hosts": ("under_score.lan",)},
        {"ips": ("10.0.0.0/8",)},
        {"days": 0},
        {"days": 826},
        {"key_type": "dsa"},
    ],
)
def test_invalid_arguments_raise_value_error_and_write_nothing(tmp_path, kwargs):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        mint(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_host_given_as_address_becomes_ip_san(tmp_path):  # type: ignore[no-untyped-def]
    result = mint(tmp_path, hosts=("192.168.50.5", "Chat.LAN."))
    assert "192.168.50.5" in result.ip_addresses
    assert "chat.lan" in result.dns_names


def test_local_addresses_are_usable_and_found_without_network():  # type: ignore[no-untyped-def]
    addrs = netinfo.local_addresses()
    assert all(not a.is_loopback and not a.is_unspecified for a in addrs)
    assert all(not (a.version == 6 and a.is_link_local) for a in addrs)
    assert [a.version for a in addrs] == sorted(a.version for a in addrs)


def test_client_name_rule():  # type: ignore[no-untyped-def]
    for ok in ("a", "alice_01", "B-2", "x" * 24):
        assert certs.validate_client_name(ok) == ok
    for bad in ("", "x" * 25, "al ice", "é", "a.b", "a/b"):
        with pytest.raises(ValueError):
            certs.validate_client_name(bad)


def test_machine_names_are_sane():  # type: ignore[no-untyped-def]
    for name in netinfo.machine_names():
        assert name == name.lower() and " " not in name and name != "localhost"
    if netinfo.machine_names():
        assert socket.gethostname().lower().rstrip(".") in netinfo.machine_names()


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.168.1.0/24 2 0 2
           |-- 192.168.1.0
              /24 link UNICAST
           |-- 192.168.1.20
              /32 host LOCAL
"""

IF_INET6 = """fd000000000000000000000000000002 04 40 00 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
20010db8000000000000000000000099 04 40 00 01     eth0
"""


def test_proc_parsers():  # type: ignore[no-untyped-def]
    assert [str(a) for a in netinfo._parse_fib_trie(FIB_TRIE)] == ["127.0.0.1", "192.168.1.20"]
    # the 2001:db8::99 entry has IFA_F_TEMPORARY (a rotating privacy address): left out
    assert [str(a) for a in netinfo._parse_if_inet6(IF_INET6)] == ["fd00::2", "::1", "fe80::fc:ff:fe00:1"]


@needs_openssl
@pytest.mark.parametrize(
    "name",
    [
        "local",
        "a.local",
        "xlocal",
        "evil-lan",
        "lan.example.com",
        "abc123",
        "abc1234",
        "sub.abc123",
        "home.arpa",
    ],
)
def test_constraint_check_agrees_with_openssl(minted, tmp_path, name):  # type: ignore[no-untyped-def]
    # builders.nc_permits decides whether a reused CA can sign a --host: it must judge as OpenSSL does.
    # A bare suffix ("local") permits itself and subdomains but not "xlocal".
    nc = load(minted.ca_cert).extensions.get_extension_for_class(x509.NameConstraints).value
    leaf, _ = rogue_leaf(minted, tmp_path, dns=name)
    accepted = openssl_verify(minted.ca_cert, leaf).returncode == 0
    assert builders.nc_permits(nc, name) == accepted
    assert accepted == (name not in {"xlocal", "evil-lan", "lan.example.com", "abc1234"})


def test_force_notes_client_certs_of_the_old_ca(tmp_path):  # type: ignore[no-untyped-def]
    mint(tmp_path, clients=("alice", "bob"))
    result = mint(tmp_path, clients=("bob",), force=True)
    assert [n for n in result.notes if "client-" in n] == [
        f"{tmp_path / 'client-alice.pem'} was signed by the replaced CA: reissue it with --client alice"
    ]
