"""Invites end to end: two "machines" (separate config directories) and a real ``securechat serve``.

The server runs as a subprocess in its own directory (it mints ``certs/`` there); the joiners are
``securechat join`` / ``connect`` subprocesses, each with its own ``XDG_CONFIG_HOME``. Everything is
real TLS on 127.0.0.1. The MITM is a real relay that terminates TLS with its own certificate.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from securechat.client import enroll, profiles
from securechat.pki import codes, enrollment, ledger
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient, issue_client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _env(config: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if config is not None:
        env["XDG_CONFIG_HOME"] = str(config)
    return env


class Server:
    """``securechat serve`` in ``home`` (its certs/ there); stderr (the log) goes to a file."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.port = _free_port()
        self.args = args
        self.log_path = home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "a")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "serve", "--host", LOOPBACK, "--port", str(self.port), *self.args],
            cwd=self.home, stdout=subprocess.PIPE, stderr=self.log, text=True, env=_env())
        self.out: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_out("[SERVER] Waiting for connections")

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))

    def wait_out(self, prefix: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"{prefix!r} never printed; got {seen!r}")

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never logged; log: {self.log_path.read_text()!r}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A server-side command (invite, revoke, certs) in the server's directory."""
        return subprocess.run([sys.executable, "-m", "securechat", *args], cwd=self.home, capture_output=True,
                              text=True, timeout=30, env=_env())

    def invite(self, *args: str) -> str:
        """Make an invite; return its code (checking the line the user is shown)."""
        done = self.cli("invite", *args, "--host", LOOPBACK, "--port", str(self.port))
        assert done.returncode == 0, done.stderr
        match = re.search(rf"^  securechat join {re.escape(LOOPBACK)}:{self.port} (\S+)$", done.stdout, re.M)
        assert match, done.stdout
        return match.group(1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Machine:
    """A joiner's machine: its own config directory, commands run from an empty directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config"
        root.mkdir(parents=True)

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "securechat", *args], cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, env=_env(self.config))

    def join(self, server: Server, code: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("join", LOOPBACK, code, "--port", str(port or server.port))

    def chat(self, server: Server, *args: str) -> subprocess.Popen[str]:
        """``securechat connect`` in line mode, stdin and stdout piped."""
        return subprocess.Popen([sys.executable, "-m", "securechat", "connect", LOOPBACK, "--port", str(server.port),
                                 *args], cwd=self.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(self.config))

    @property
    def profile_dir(self) -> Path:
        return self.config / "securechat" / "servers"


class Reader:
    """Lines of a subprocess's stdout, read by a thread, waited for with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, text: str, timeout: float = 10) -> tuple[str, float]:
        """The first line containing ``text`` and when it arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if text in line:
                return line, time.monotonic()
        raise AssertionError(f"{text!r} not seen; got {seen!r}")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def server(tmp_path: Path, servers: list[Server]) -> Server:
    srv = Server(tmp_path / "server")
    servers.append(srv)
    return srv


def _say(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _guest(server: Server, nick: str) -> LineClient:
    """A guest with the server's ca.pem (as if copied by hand), no client certificate."""
    ctx = ssl.create_default_context(cafile=str(server.home / "certs" / "ca.pem"))
    raw = socket.create_connection((LOOPBACK, server.port), timeout=10)
    client = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat: send your nickname")
    client.send(nick)
    return client


# -- the whole story -------------------------------------------------------------------------------


def test_invite_join_connect_chat_revoke_refused(server: Server, tmp_path: Path) -> None:
    alice, bob = Machine(tmp_path / "alice"), Machine(tmp_path / "bob")
    done = server.cli("invite", "alice", "--host", LOOPBACK, "--port", str(server.port))
    assert done.stdout.splitlines()[0] == "Give alice this line (valid 15 minutes, once):"
    code = re.search(r"join \S+ (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"\d{1,3}(-[a-z]+){3}", code) and len(code) < 30

    joined = alice.join(server, code)
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout.startswith(f"Joined {LOOPBACK} as alice. From now on: securechat connect {LOOPBACK}")
    server.wait_out("[JOIN]")
    (profile,) = alice.profile_dir.iterdir()
    assert stat.S_IMODE((profile / "client.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(profile.stat().st_mode) == 0o700
    # The key was made on alice's machine and never left it: nothing on the server holds it.
    key = (profile / "client.key").read_bytes()
    assert not any(key in p.read_bytes() for p in (server.home / "certs").iterdir() if p.is_file())
    assert stat.S_IMODE((server.home / "certs" / "invites.db").stat().st_mode) == 0o600

    guest_code = server.invite()  # no name: CA trust only
    joined = bob.join(server, guest_code)
    assert joined.returncode == 0, joined.stderr
    assert "(you pick a nickname when you connect)" in joined.stdout
    (bob_profile,) = bob.profile_dir.iterdir()
    assert not (bob_profile / "client.key").exists()

    # connect needs no --ca, --cert or --key: the profile is remembered.
    a = alice.chat(server)
    a_out = Reader(a)
    a_out.expect("* welcome, alice!")
    b = bob.chat(server, "--nick", "bob")
    b_out = Reader(b)
    b_out.expect("* welcome, bob!")
    a_out.expect("* bob joined")
    _say(a, "hello from alice")
    b_out.expect("[alice] hello from alice")

    revoked = server.cli("revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    assert revoked.stdout.startswith("Revoked alice (serial ")
    _, cut = a_out.expect("* your certificate has been revoked; goodbye", timeout=5)
    _, told = b_out.expect("* alice left (certificate revoked)", timeout=5)
    assert cut - started < 2.0 and told - started < 2.0
    assert a.wait(10) == 1

    again = alice.run("connect", LOOPBACK, "--port", str(server.port), "--nick", "alice")
    assert again.returncode == 1
    assert "refused the connection: your certificate has been revoked" in again.stderr
    assert "Traceback" not in again.stderr

    # The denylist survives a restart.
    _say(b, "/quit")
    b.wait(10)
    server.stop()
    server.start()
    again = alice.run("connect", LOOPBACK, "--port", str(server.port), "--nick", "alice")
    assert again.returncode == 1 and "your certificate has been revoked" in again.stderr
    listing = server.cli("certs")
    assert listing.returncode == 0
    (row,) = [line for line in listing.stdout.splitlines() if line.startswith("alice ")]
    assert "never" not in row and " no " not in row  # seen, and revoked


# -- the security properties -----------------------------------------------------------------------


class Relay:
    """A man in the middle: terminates TLS with its own certificate (offering the enrollment ALPN,
    so the joiner cannot tell by protocol) and re-originates TLS to the real server. Relays lines,
    and keeps everything the server said."""

    def __init__(self, target_port: int) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.ctx.set_alpn_protocols([enrollment.ALPN])
        self.target_port = target_port
        self.from_server: list[str] = []
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        raw, _ = self.listener.accept()
        with self.ctx.wrap_socket(raw, server_side=True) as joiner:
            out = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            out.check_hostname, out.verify_mode = False, ssl.CERT_NONE
            out.set_alpn_protocols([enrollment.ALPN])
            with out.wrap_socket(socket.create_connection((LOOPBACK, self.target_port), timeout=10)) as upstream:
                a, b = LineClient(joiner), LineClient(upstream)
                try:
                    while True:
                        b.send(a.readline())
                        line = b.readline()
                        self.from_server.append(line)
                        a.send(line)
                except (EOFError, OSError):
                    pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_man_in_the_middle_fails_loudly_on_both_sides_and_gets_no_certificate(server: Server,
                                                                              tmp_path: Path) -> None:
    code = server.invite("alice")
    relay = Relay(server.port)
    alice = Machine(tmp_path / "alice")
    joined = alice.join(server, code, port=relay.port)
    relay.close()
    assert joined.returncode == 1
    (line,) = joined.stderr.splitlines()
    assert line.startswith("securechat join: ")
    assert "intercepting the connection" in line and "Nothing was saved" in line
    server.wait_log("someone in the middle is intercepting the connection")
    # The relay saw the PAKE message and a refusal; no certificate, no CA certificate.
    assert [m.split(" ")[0] for m in relay.from_server] == ["PAKE", "ERR"]
    assert not any(p.is_file() for p in alice.profile_dir.rglob("*"))  # nothing saved
    assert server.cli("certs").stdout.startswith("No client certificates issued yet")
    # It cost the invite a try, nothing more: the real alice still gets in directly.
    assert alice.join(server, code).returncode == 0


def test_wrong_code_three_tries_then_burned(server: Server, tmp_path: Path) -> None:
    code = server.invite("alice")
    last = code.rsplit("-", 1)[1]
    wrong = code.rsplit("-", 1)[0] + "-" + ("zebra" if last != "zebra" else "acorn")
    alice = Machine(tmp_path / "alice")
    said = []
    for _ in range(3):
        joined = alice.join(server, wrong)
        assert joined.returncode == 1
        (line,) = joined.stderr.splitlines()
        said.append(line)
    assert "wrong code" in said[0] and "2 tries left" in said[0]
    assert "1 try left" in said[1]
    assert "the invite is now burned" in said[2]
    joined = alice.join(server, code)  # the right code, too late
    assert joined.returncode == 1
    assert joined.stderr.splitlines() == [f"securechat join: {LOOPBACK}:{server.port} refused the invite: this "
                                          "invite was cancelled after 3 wrong codes: ask for a new one"]
    server.wait_log("wrong code; the invite is now burned")


def test_reused_code_is_refused(server: Server, tmp_path: Path) -> None:
    code = server.invite("alice")
    assert Machine(tmp_path / "alice").join(server, code).returncode == 0
    again = Machine(tmp_path / "mallory").join(server, code)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [f"securechat join: {LOOPBACK}:{server.port} refused the invite: this "
                                         "invite has already been used: ask for a new one"]


def test_expired_code_says_it_expired(server: Server, tmp_path: Path) -> None:
    code = server.invite("alice", "--expires", "1s")
    time.sleep(1.2)
    joined = Machine(tmp_path / "alice").join(server, code)
    assert joined.returncode == 1
    (line,) = joined.stderr.splitlines()
    assert re.fullmatch(rf"securechat join: {re.escape(LOOPBACK)}:{server.port} refused the invite: this invite "
                        r"expired at \d{4}-\d\d-\d\d \d\d:\d\d UTC: ask for a new one", line)


def test_race_of_two_joins_with_one_code_gives_one_certificate(server: Server) -> None:
    code = server.invite("alice")
    barrier = threading.Barrier(2)
    results: list[object] = []

    def attempt() -> None:
        barrier.wait()
        try:
            results.append(enroll.join(LOOPBACK, server.port, code))
        except enrollment.JoinError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if isinstance(r, enroll.Enrolled)]
    lost = [r for r in results if isinstance(r, enrollment.JoinError)]
    assert len(won) == 1 and len(lost) == 1
    # The loser hears it at the claim (both proved the code) or, if it came late, at the lookup.
    assert re.fullmatch(rf"{re.escape(LOOPBACK)}:{server.port} refused the invite: this invite has already been "
                        r"used: ask for a new one(\. Nothing was saved)?", str(lost[0])), str(lost[0])
    assert len([line for line in server.cli("certs").stdout.splitlines() if line.startswith("alice ")]) == 1


def test_invite_list_and_cancel(server: Server, tmp_path: Path) -> None:
    code = server.invite("carol", "--uses", "3", "--expires", "2h")
    listing = server.cli("invite", "--list")
    assert re.search(rf"^\s+{code.split('-')[0]}\s+carol\s+3\s+0/3\s", listing.stdout, re.M), listing.stdout
    assert code.split("-", 1)[1] not in listing.stdout  # the secret part is shown only once
    cancelled = server.cli("invite", "--cancel", "carol")
    assert cancelled.returncode == 0 and cancelled.stdout.startswith("Cancelled invite ")
    joined = Machine(tmp_path / "carol").join(server, code)
    assert joined.returncode == 1 and "this invite was cancelled" in joined.stderr
    missing = server.cli("invite", "--cancel", "carol")
    assert missing.returncode == 1 and missing.stderr.startswith("securechat invite: no usable invite")


def test_guests_cannot_take_a_certificate_holders_name(server: Server, tmp_path: Path) -> None:
    assert Machine(tmp_path / "alice").join(server, server.invite("alice")).returncode == 0
    mallory = _guest(server, "Alice")
    assert mallory.readline().startswith("* nickname refused: 'Alice' belongs to a certificate holder")
    mallory.close()


def test_clients_without_alpn_or_with_another_alpn_chat_as_before(server: Server) -> None:
    # (http/1.1 is the browsers' route since the web client: tests/server/test_web.py)
    for nick, alpn in (("dave", None), ("erin", ["imap", "xmpp-client"])):
        ctx = ssl.create_default_context(cafile=str(server.home / "certs" / "ca.pem"))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection((LOOPBACK, server.port), timeout=10)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert sock.selected_alpn_protocol() is None
        client = LineClient(sock)
        client.expect("* securechat: send your nickname")
        client.send(nick)  # not the same nick twice: the first one's departure may not be processed yet
        client.expect(f"* welcome, {nick}!")
        client.close()


def test_join_against_a_server_without_invites_is_one_line(servers: list[Server], tmp_path: Path,
                                                           cert_files: dict[str, Path]) -> None:
    srv = Server(tmp_path / "other", "--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]))
    servers.append(srv)
    joined = Machine(tmp_path / "alice").join(srv, "7-crayon-galaxy-lunar")
    assert joined.returncode == 1
    assert joined.stderr.splitlines() == [f"securechat join: {LOOPBACK}:{srv.port} does not take invites (an older "
                                          "securechat, or a server without its local CA beside its certificate)"]


def test_mutual_tls_server_takes_invites_and_still_requires_certificates(servers: list[Server],
                                                                         tmp_path: Path) -> None:
    srv = Server(tmp_path / "server", "--require-client-cert")
    servers.append(srv)
    alice = Machine(tmp_path / "alice")
    assert alice.join(srv, srv.invite("alice")).returncode == 0
    a = alice.chat(srv)
    Reader(a).expect("* welcome, alice!")
    _say(a, "/quit")
    a.wait(10)
    guest = Machine(tmp_path / "guest")
    assert guest.join(srv, srv.invite()).returncode == 0
    refused = guest.run("connect", LOOPBACK, "--port", str(srv.port), "--nick", "guest")
    assert refused.returncode == 1
    assert "refused the connection: this server requires a client certificate" in refused.stderr


# -- renewal -----------------------------------------------------------------------------------------


def test_client_renews_in_the_last_third_once_and_the_renewal_replaces_the_old_certificate(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "alice-config"))
    enrolled = enroll.join(LOOPBACK, server.port, server.invite("alice", "--cert-days", "30"))
    profile = profiles.save(LOOPBACK, server.port, enrolled)
    now = dt.datetime.now(dt.timezone.utc)
    said: list[str] = []
    assert not profiles.renew_if_due(profile, now=now + dt.timedelta(days=19), say=said.append)
    assert said == [] and profile.cert.read_bytes() == enrolled.cert_pem
    # A client whose clock runs ahead asks too early: the server keeps the window, whatever the client thinks.
    assert not profiles.renew_if_due(profile, now=now + dt.timedelta(days=21), say=said.append)
    assert said == [f"your certificate for {LOOPBACK} cannot be renewed: too early: a certificate is renewed in the "
                    f"last third of its life, from {ledger.utc(renewal_opens(profile.cert))}"]
    assert profile.cert.read_bytes() == enrolled.cert_pem and not (profile.dir / "client.key.next").exists()

    # 25 days on (a certificate the CA issued then): in its window, renewed.
    old_cert, old_key = issue_client(server.home / "certs", "alice", tmp_path / "then")
    shutil.copy(old_cert, profile.cert)
    shutil.copy(old_key, profile.key)
    first = x509.load_pem_x509_certificate(profile.cert.read_bytes())
    said.clear()
    assert profiles.renew_if_due(profile, say=said.append)
    second = x509.load_pem_x509_certificate(profile.cert.read_bytes())
    assert second.serial_number != first.serial_number
    assert second.subject == first.subject and second.public_key() != first.public_key()
    assert stat.S_IMODE(profile.key.stat().st_mode) == 0o600 and not (profile.dir / "client.key.next").exists()
    assert said[0].startswith(f"renewed your certificate for {LOOPBACK}: valid until ")
    # The renewed certificate chats; the one it replaced does not, and cannot be renewed a second time.
    alice = Machine(tmp_path / "alice")
    alice.config = tmp_path / "alice-config"
    a = alice.chat(server)
    Reader(a).expect("* welcome, alice!")
    _say(a, "/quit")
    a.wait(10)
    replaced = alice.run("connect", LOOPBACK, "--port", str(server.port), "--ca", str(profile.ca), "--cert",
                         str(old_cert), "--key", str(old_key))
    assert replaced.returncode == 1 and "it was replaced by its renewal" in replaced.stderr
    with pytest.raises(enrollment.RenewalRefused, match="already renewed"):
        enroll.renew(LOOPBACK, server.port, tls.client_context(profile.ca, certfile=old_cert, keyfile=old_key))

    said.clear()
    assert not profiles.renew_if_due(profile, now=now + dt.timedelta(days=75), say=said.append)
    assert said[0].startswith(f"your certificate for {LOOPBACK} expired on ") and "ask for a new invite" in said[0]

    assert server.cli("revoke", "alice").returncode == 0
    said.clear()
    assert not profiles.renew_if_due(profile, now=now + dt.timedelta(days=25), say=said.append)
    assert said == [f"your certificate for {LOOPBACK} cannot be renewed: {invites_revoked()}: it cannot be renewed"]
    assert x509.load_pem_x509_certificate(profile.cert.read_bytes()).serial_number == second.serial_number
    server.wait_log("cannot be renewed")


def renewal_opens(cert_file: Path) -> float:
    return ledger.renewal_opens(x509.load_pem_x509_certificate(cert_file.read_bytes()))


def invites_revoked() -> str:
    from securechat.wire import protocol

    return protocol.CERT_REVOKED


# -- the store alone -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("typed", "why"), [
    ("7-crayon-galaxy", "is not an invite code"),
    ("seven-crayon-galaxy-lunar", "is not an invite code"),
    ("7-crayn-galaxy-lunar", "'crayn' is not one of the invite words"),
    ("0-crayon-galaxy-lunar", "the number is 1 to 999"),
])
def test_mistyped_codes_are_explained(typed: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        codes.parse_code(typed)


def test_codes_forgive_case_and_spaces() -> None:
    assert codes.parse_code(" 7 Crayon GALAXY-lunar ") == (7, "7-crayon-galaxy-lunar")
    assert len(set(codes.WORDS)) == 256


def test_one_use_is_claimed_once_under_concurrency(tmp_path: Path) -> None:
    store = ledger.Store(tmp_path)
    invite = store.create("alice")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def claim() -> None:
        other = ledger.Store(tmp_path)  # its own connections, as another process would have
        barrier.wait()
        try:
            other.reserve_try(invite.nameplate)
            other.claim(invite.nameplate)
            outcomes.append("won")
        except ledger.InviteError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("won") == 1
    assert len(outcomes) == 8


def test_concurrent_wrong_guesses_never_exceed_three(tmp_path: Path) -> None:
    store = ledger.Store(tmp_path)
    invite = store.create("alice")
    barrier = threading.Barrier(10)
    answered: list[int] = []

    def guess() -> None:
        barrier.wait()
        try:
            ledger.Store(tmp_path).reserve_try(invite.nameplate)
        except ledger.InviteError:
            return
        answered.append(ledger.Store(tmp_path).wrong_try(invite.nameplate))

    threads = [threading.Thread(target=guess) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answered) <= ledger.MAX_WRONG_TRIES
    with pytest.raises(ledger.InviteError, match="after 3 wrong codes"):
        store.lookup(invite.nameplate)


@pytest.mark.parametrize(("args", "status", "said"), [
    (["invite", "alice", "--expires", "9d"], 2, "argument --expires: an invite lives more than 0 and at most 7 days"),
    (["invite", "alice", "--uses", "0"], 2, "0 is out of range: a whole number from 1 to 200"),
    (["invite", "admin"], 2, "invalid client name 'admin': 'admin' is reserved"),
    (["invite", "alice"], 1, "securechat invite: no certificate directory certs"),
    (["invite", "--list"], 1, "securechat invite: no certificate directory certs"),
    (["revoke", "alice"], 1, "securechat revoke: no certificate directory certs"),
    (["join", LOOPBACK, "7-crayon-galaxy"], 1, "securechat join: '7-crayon-galaxy' is not an invite code"),
])
def test_command_line_mistakes_are_one_line(tmp_path: Path, args: list[str], status: int, said: str) -> None:
    done = subprocess.run([sys.executable, "-m", "securechat", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, env=_env(tmp_path / "config"))
    assert done.returncode == status
    (line,) = done.stderr.splitlines()
    assert said in line and line.startswith(f"securechat {args[0]}: ")
    assert "Traceback" not in done.stderr


def test_revoking_what_does_not_exist_is_one_line(server: Server) -> None:
    done = server.cli("revoke", "nobody")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["securechat revoke: no unrevoked certificate named or numbered 'nobody' "
                                        "('securechat certs' lists them)"]


def test_openssl_s_client_without_a_certificate_chats_with_an_invite_server(server: Server) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (.ci/run installs it)")
    proc = subprocess.Popen(["openssl", "s_client", "-quiet", "-connect", f"{LOOPBACK}:{server.port}", "-CAfile",
                             str(server.home / "certs" / "ca.pem"), "-verify_return_error"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out = Reader(proc)
        out.expect("* securechat: send your nickname")
        _say(proc, "frank")
        out.expect("* welcome, frank!")
    finally:
        proc.kill()
        proc.wait(5)


def test_join_with_an_unwritable_config_fails_before_spending_the_invite(server: Server, tmp_path: Path) -> None:
    code = server.invite("alice")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "securechat", "join", LOOPBACK, code, "--port", str(server.port)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30, env=_env(blocker))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("securechat join: cannot write the profile in ")
    assert Machine(tmp_path / "alice").join(server, code).returncode == 0  # still unused
