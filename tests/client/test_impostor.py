"""Issue 10 item 1: ``--pin``/``--tofu`` accept exactly the servers ``--ca`` accepts.

The CA's fingerprint names which certificate to trust; OpenSSL then verifies the server as with
``--ca``. The impostors here are real TLS servers on 127.0.0.1 presenting real certificates: a
client certificate minted by the real ``securechat gen-certs --client mallory`` (the attack: every
mutual-TLS user holds one), and leaves signed by that CA that are expired, CA-flagged, or for
another address, plus a leaf from another CA sent along with the real ca.pem. The client is the
real ``securechat connect`` in a subprocess. Each impostor records every byte every connection
sent it, and whether a client certificate was shown: it must get nothing at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat.wire import tls

LOOPBACK = "127.0.0.1"
NOW = dt.datetime.now(dt.timezone.utc)
GREETING = b"* securechat: send your nickname\n"


def securechat(*args: str | Path, cwd: Path, env: dict[str, str], stdin: str = "",
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securechat", *map(str, args)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class RealCerts:
    dir: Path  # what `securechat gen-certs --client mallory --client alice` wrote
    ca_fingerprint: str

    def path(self, name: str) -> Path:
        return self.dir / name


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealCerts:
    root = tmp_path_factory.mktemp("real")
    env = {**os.environ, "XDG_CONFIG_HOME": str(root / "config")}
    minted = securechat("gen-certs", "--client", "mallory", "--client", "alice", cwd=root, env=env)
    assert minted.returncode == 0, minted.stderr
    certs = root / "certs"
    assert (certs / "client-mallory.pem").is_file() and (certs / "client-mallory.key").is_file()
    return RealCerts(certs, tls.file_fingerprint(certs / "ca.pem"))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def sign_leaf(real: RealCerts, out: Path, *, ca_flag: bool = False, ips: tuple[str, ...] = (LOOPBACK,),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              foreign_signer: bool = False) -> tuple[Path, Path]:
    """A server certificate signed by the real CA's key (or another key), chained with the real ca.pem."""
    ca_cert = x509.load_pem_x509_certificate(real.path("ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key(real.path("ca.key").read_bytes(), password=None)
    signer = ec.generate_private_key(ec.SECP256R1()) if foreign_signer else ca_key
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.mkdir(parents=True, exist_ok=True)
    pem, key_file = out / "leaf.pem", out / "leaf.key"
    pem.write_bytes(_pem(leaf) + real.path("ca.pem").read_bytes())
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pem, key_file


class Impostor:
    """A TLS server on 127.0.0.1 that greets like securechat and records everything it is sent.

    It asks for (but does not require) a client certificate from the real CA, and records whether
    one was shown, so a client certificate leaking to it would be seen.
    """

    def __init__(self, certfile: Path, keyfile: Path, client_ca: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(certfile), str(keyfile))
        self.ctx.load_verify_locations(cafile=str(client_ca))
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.client_certs: list[object] = []
        self.connections = 0
        self._handlers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            handler = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            handler.start()
            self._handlers.append(handler)

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as sock:
                if sock.getpeercert():  # the handshake is over: a client certificate, if one was shown
                    self.client_certs.append(sock.getpeercert())
                sock.sendall(GREETING)
                while chunk := sock.recv(4096):
                    data += chunk
        except (OSError, ssl.SSLError):
            pass
        self.received.append(data)

    def close(self) -> bytes:
        """Everything sent to it, once every connection has ended."""
        self._stop.set()
        self._thread.join(5)
        for handler in self._handlers:
            handler.join(10)
        self.listener.close()
        return b"".join(self.received)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp_path / "config")}


def known_hosts(env: dict[str, str]) -> Path:
    return Path(env["XDG_CONFIG_HOME"]) / "securechat" / "known_hosts"


def connect(port: int, mode: str, real: RealCerts, env: dict[str, str], cwd: Path,
            *extra: str | Path) -> subprocess.CompletedProcess[str]:
    trust = ["--pin", real.ca_fingerprint] if mode == "pin" else ["--tofu"]
    if mode == "tofu":  # the user met the real server before: its CA is in known_hosts
        known_hosts(env).parent.mkdir(parents=True, exist_ok=True)
        known_hosts(env).write_text(f"{LOOPBACK}:{port} {real.ca_fingerprint}\n")
    return securechat("connect", LOOPBACK, "--port", str(port), *trust, "--nick", "alice", *extra,
                      cwd=cwd, env=env, stdin="my secret line\n")


def assert_refused(result: subprocess.CompletedProcess[str], port: int, *phrases: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"securechat connect: refusing {LOOPBACK}:{port}: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert result.stdout == ""


CASES = {
    # name: (how the impostor's certificate is made, what the refusal says)
    "client certificate (gen-certs --client mallory)": ("mallory", "is not a server certificate"),
    "CA-flagged leaf": ({"ca_flag": True}, "it is a CA certificate, not a server certificate"),
    "expired leaf": ({"not_before": NOW - dt.timedelta(days=3), "not_after": NOW - dt.timedelta(days=1)},
                     "has expired"),
    "leaf for another address": ({"ips": ("10.1.2.3",)}, f"is not valid for '{LOOPBACK}'"),
    "leaf not signed by the pinned CA": ({"foreign_signer": True}, "not signed by the pinned CA certificate"),
}


def impostor_files(case: str, real: RealCerts, tmp_path: Path) -> tuple[Path, Path]:
    how = CASES[case][0]
    tmp_path.mkdir(parents=True, exist_ok=True)
    if how == "mallory":
        # The attack as an outsider runs it: mallory's own files, plus the public ca.pem as the chain.
        chain = tmp_path / "mallory-chain.pem"
        chain.write_bytes(real.path("client-mallory.pem").read_bytes() + real.path("ca.pem").read_bytes())
        return chain, real.path("client-mallory.key")
    assert isinstance(how, dict)
    return sign_leaf(real, tmp_path / "leaf", **how)


@pytest.mark.parametrize("mode", ["pin", "tofu"])
@pytest.mark.parametrize("case", list(CASES))
def test_impostor_is_refused_and_gets_nothing(case: str, mode: str, real: RealCerts, env: dict[str, str],
                                              tmp_path: Path) -> None:
    impostor = Impostor(*impostor_files(case, real, tmp_path), client_ca=real.path("ca.pem"))
    try:
        result = connect(impostor.port, mode, real, env, tmp_path,
                         "--cert", real.path("client-alice.pem"), "--key", real.path("client-alice.key"))
    finally:
        received = impostor.close()
    assert_refused(result, impostor.port, CASES[case][1])
    assert received == b"", received  # not the nickname, not a line
    assert impostor.client_certs == []  # and alice's certificate was never shown to it
    if mode == "tofu":  # nothing learnt from an impostor
        assert known_hosts(env).read_text() == f"{LOOPBACK}:{impostor.port} {real.ca_fingerprint}\n"


@pytest.mark.parametrize("case", [c for c in CASES if c != "leaf not signed by the pinned CA"])
def test_pinning_the_leaf_itself_still_gets_every_check(case: str, real: RealCerts, env: dict[str, str],
                                                        tmp_path: Path) -> None:
    """--pin with the presented certificate's own fingerprint: it is trusted as it is, but OpenSSL (and
    the leaf rules) still check purpose, validity and address; only the issuer check is moot."""
    certfile, keyfile = impostor_files(case, real, tmp_path)
    impostor = Impostor(certfile, keyfile, client_ca=real.path("ca.pem"))
    try:
        result = securechat("connect", LOOPBACK, "--port", str(impostor.port), "--pin",
                            tls.file_fingerprint(certfile), "--nick", "alice", cwd=tmp_path, env=env, stdin="hi\n")
    finally:
        received = impostor.close()
    assert_refused(result, impostor.port)
    assert received == b""


def test_tofu_first_contact_with_an_impostor_remembers_nothing(real: RealCerts, env: dict[str, str],
                                                               tmp_path: Path) -> None:
    impostor = Impostor(*impostor_files("client certificate (gen-certs --client mallory)", real, tmp_path),
                        client_ca=real.path("ca.pem"))
    try:
        result = securechat("connect", LOOPBACK, "--port", str(impostor.port), "--tofu", "--nick", "alice",
                            cwd=tmp_path, env=env, stdin="hi\n")
    finally:
        received = impostor.close()
    assert_refused(result, impostor.port, "is not a server certificate")
    assert received == b""
    assert not known_hosts(env).exists()


def test_ca_mode_refuses_the_same_impostors(real: RealCerts, env: dict[str, str], tmp_path: Path) -> None:
    """The reference: --ca refuses each of them too (the CA-flagged leaf only since this fix)."""
    for i, case in enumerate(CASES):
        impostor = Impostor(*impostor_files(case, real, tmp_path / str(i)), client_ca=real.path("ca.pem"))
        try:
            result = securechat("connect", LOOPBACK, "--port", str(impostor.port), "--ca", real.path("ca.pem"),
                                "--nick", "alice", cwd=tmp_path, env=env, stdin="hi\n")
        finally:
            received = impostor.close()
        assert result.returncode == 1 and "Traceback" not in result.stderr, (case, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (case, result.stderr)
        assert received == b"", case


@pytest.mark.parametrize("mode", ["pin", "tofu"])
def test_the_real_server_certificate_is_accepted(mode: str, real: RealCerts, env: dict[str, str],
                                                 tmp_path: Path) -> None:
    """The control: the same client, the real server.pem: the nickname and the line do arrive."""
    server = Impostor(real.path("server.pem"), real.path("server.key"), client_ca=real.path("ca.pem"))
    try:
        result = connect(server.port, mode, real, env, tmp_path, "--timeout", "1",
                         "--cert", real.path("client-alice.pem"), "--key", real.path("client-alice.key"))
    finally:
        received = server.close()
    assert "Traceback" not in result.stderr
    assert received == b"alice\n", (received, result.stderr)  # it never welcomes: the client gives up
    assert server.connections == 2  # the probe (which sent nothing) and the real connection
    # alice's certificate went to the verified connection only, not to the probe.
    assert [dict(c["subject"][-1])["commonName"] for c in server.client_certs] == ["alice"]  # type: ignore[index]


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def _der_body(data: bytes) -> bytes:
    if data[1] < 0x80:
        return data[2:2 + data[1]]
    n = data[1] & 0x7F
    return data[2 + n:2 + n + int.from_bytes(data[2:2 + n], "big")]


def malformed_leaf(real: RealCerts, out: Path) -> tuple[Path, Path]:
    """A leaf signed by the real CA whose notBefore/notAfter are UTCTime without seconds.

    OpenSSL loads and sends it; cryptography's strict DER parser refuses it (the traceback on main).
    """
    pem, key = sign_leaf(real, out)
    leaf = x509.load_pem_x509_certificate(pem.read_bytes())
    body = _der_body(leaf.tbs_certificate_bytes)
    start = body.index(b"\x30\x1e\x17\x0d")  # Validity: two 13-character UTCTimes
    validity = body[start:start + 32]
    short = _der(0x30, _der(0x17, validity[4:14] + b"Z") + _der(0x17, validity[19:29] + b"Z"))
    tbs = _der(0x30, body[:start] + short + body[start + 32:])
    ca_key = serialization.load_pem_private_key(real.path("ca.key").read_bytes(), password=None)
    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]
    ecdsa_sha256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
    der = _der(0x30, tbs + ecdsa_sha256 + _der(0x03, b"\x00" + signature))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(der)
    pem.write_text(ssl.DER_cert_to_PEM_cert(der) + real.path("ca.pem").read_text())
    return pem, key


@pytest.mark.parametrize("mode", ["pin", "tofu", "tofu-first-contact"])
def test_a_malformed_certificate_is_one_line(mode: str, real: RealCerts, env: dict[str, str],
                                             tmp_path: Path) -> None:
    impostor = Impostor(*malformed_leaf(real, tmp_path / "leaf"), client_ca=real.path("ca.pem"))
    try:
        if mode == "tofu-first-contact":
            result = securechat("connect", LOOPBACK, "--port", str(impostor.port), "--tofu", "--nick", "alice",
                                cwd=tmp_path, env=env, stdin="hi\n")
        else:
            result = connect(impostor.port, mode, real, env, tmp_path)
    finally:
        received = impostor.close()
    assert_refused(result, impostor.port, "format error in certificate's notBefore field")
    assert received == b""


@pytest.mark.parametrize("damage", ["other lines", "this server's line"])
def test_non_utf8_known_hosts_through_the_command_line(damage: str, real: RealCerts, env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """A byte that is not UTF-8 in known_hosts: skipped on others' lines, one clear line on ours."""
    server = Impostor(real.path("server.pem"), real.path("server.key"), client_ca=real.path("ca.pem"))
    known_hosts(env).parent.mkdir(parents=True)
    ours = f"{LOOPBACK}:{server.port} ".encode()
    if damage == "other lines":
        known_hosts(env).write_bytes(b"\xff\xfe\x00garbage\n" + ours + real.ca_fingerprint.encode() + b"\n")
    else:
        known_hosts(env).write_bytes(ours + b"\xff" + real.ca_fingerprint.encode()[1:] + b"\n")
    try:
        result = securechat("connect", LOOPBACK, "--port", str(server.port), "--tofu", "--nick", "alice",
                            "--timeout", "1", cwd=tmp_path, env=env, stdin="hi\n")
    finally:
        received = server.close()
    assert "Traceback" not in result.stderr and result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    if damage == "other lines":
        assert received == b"alice\n"  # recognised: the chat went ahead (this fake server never welcomes)
        assert "first contact" not in result.stderr
    else:
        assert received == b""
        assert f"line 1 of {known_hosts(env)} (the entry for {LOOPBACK}:{server.port}) is damaged" in result.stderr
