"""``securechat send`` / ``get`` and ``/send`` / ``/get`` as real processes against a real ``securechat serve``."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat.pki import certs
from securechat.wire import filexfer, tls
from tests.pki.test_invites import Machine, Server, servers  # noqa: F401  (servers: a fixture)

LOOPBACK = "127.0.0.1"
SECURECHAT = [sys.executable, "-m", "securechat"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("minted") / "certs"
    certs.mint(d)
    return d


class Served:
    """A ``securechat serve`` process; its output is read (and kept) by a thread, so it never blocks."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port, self.lines = proc, port, []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("[SERVER] Waiting for connections"):
                self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(20), self.lines


@pytest.fixture
def served(tmp_path: Path, minted: Path) -> Iterator[Callable[..., Served]]:
    """``served(*serve_options, preexec=None)``: a real server in tmp_path (its certs/ and data/ there)."""
    shutil.copytree(minted, tmp_path / "certs")
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, preexec: Callable[[], None] | None = None) -> Served:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([*SECURECHAT, "serve", "--listen", LOOPBACK, "--port", str(port), "--data",
                                 str(tmp_path / "data"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=preexec)
        procs.append(proc)
        server = Served(proc, port)
        server.wait_ready()
        return server

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(tmp_path: Path, *argv: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SECURECHAT, *argv], cwd=tmp_path, capture_output=True, text=True, input=stdin,
                          timeout=timeout, check=False, stdin=None if stdin is not None else subprocess.DEVNULL)


def send(tmp_path: Path, server: Served, path: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(tmp_path, "send", f"{LOOPBACK}:{server.port}", str(path), "--ca", "certs/ca.pem", *extra)


def get(tmp_path: Path, server: Served, file_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(tmp_path, "get", f"{LOOPBACK}:{server.port}", file_id, "--ca", "certs/ca.pem", *extra)


def one_line(result: subprocess.CompletedProcess[str], prog: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"securechat {prog}: "), result.stderr
    return result.stderr[len(f"securechat {prog}: "):].rstrip("\n")


def test_send_then_get_through_real_processes(served: Callable[..., Served], tmp_path: Path) -> None:
    server = served()
    data = os.urandom(3 * MiB + 7)
    (tmp_path / "report.pdf").write_bytes(data)
    sent = send(tmp_path, server, "report.pdf", "--nick", "alice")
    assert sent.returncode == 0 and sent.stderr == "", sent.stderr
    file_id = sent.stdout.strip()
    assert filexfer.ID_RE.match(file_id)
    (tmp_path / "out").mkdir()
    for expected in ("report.pdf", "report (1).pdf"):  # never over an existing file
        got = get(tmp_path, server, file_id, "--out", "out", "--nick", "bob")
        assert got.returncode == 0 and got.stderr == "", got.stderr
        assert got.stdout.strip() == f"out/{expected}"
        assert (tmp_path / "out" / expected).read_bytes() == data
    assert sorted(os.listdir(tmp_path / "out")) == ["report (1).pdf", "report.pdf"]


def test_a_room_file_from_the_command_line_needs_the_room(served: Callable[..., Served], tmp_path: Path) -> None:
    server = served()
    (tmp_path / "notes.txt").write_text("dev only\n")
    file_id = send(tmp_path, server, "notes.txt", "--to", "#dev", "--nick", "alice").stdout.strip()
    assert filexfer.ID_RE.match(file_id)
    refused = one_line(get(tmp_path, server, file_id, "--nick", "bob"), "get")
    assert refused == f"no such file: {file_id} (a room's file is for its members: pass --room NAME)"
    got = get(tmp_path, server, file_id, "--nick", "bob", "--room", "dev")
    assert got.returncode == 0 and (tmp_path / "notes.txt").exists()
    assert Path(tmp_path / got.stdout.strip()).read_text() == "dev only\n"


def test_a_private_file_and_a_pinned_server(served: Callable[..., Served], tmp_path: Path) -> None:
    """--pin (no CA file): the file connection trusts exactly what the chat connection trusted."""
    server = served()
    pin = tls.file_fingerprint(tmp_path / "certs" / "ca.pem")
    (tmp_path / "x.bin").write_bytes(b"x" * 1000)
    bob = subprocess.Popen([*SECURECHAT, "connect", f"{LOOPBACK}:{server.port}", "--pin", pin, "--nick", "bob"],
                           cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert bob.stdout is not None and bob.stdin is not None
        assert bob.stdout.readline().startswith("* welcome, bob!")
        sent = run(tmp_path, "send", f"{LOOPBACK}:{server.port}", "x.bin", "--pin", pin, "--to", "bob",
                   "--nick", "alice")
        assert sent.returncode == 0, sent.stderr
        file_id = sent.stdout.strip()
        line = bob.stdout.readline().rstrip("\n")
        while "shared" not in line:
            line = bob.stdout.readline().rstrip("\n")
        assert line == f"[alice -> bob] * shared x.bin (1000 bytes): /get {file_id}"
        (tmp_path / "bob").mkdir()
        bob.stdin.write(f"/get {file_id} bob\n")
        bob.stdin.flush()
        line = bob.stdout.readline().rstrip("\n")
        while not line.startswith("-!- "):  # "* alice left", ...
            line = bob.stdout.readline().rstrip("\n")
        assert line == "-!- saved bob/x.bin (1000 bytes)", line
    finally:
        if bob.stdin is not None:
            bob.stdin.close()
        bob.wait(10)
    assert (tmp_path / "bob" / "x.bin").read_bytes() == b"x" * 1000


def test_line_mode_sends_a_file_before_leaving_at_the_end_of_input(served: Callable[..., Served],
                                                                    tmp_path: Path) -> None:
    server = served()
    (tmp_path / "a b.txt").write_text("spaces\n")
    result = run(tmp_path, "connect", f"{LOOPBACK}:{server.port}", "--ca", "certs/ca.pem", "--nick", "alice",
                 stdin='/send "a b.txt"\n/send\n/get nope\n')
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "-!- usage: /send PATH [NICK|#room] (quote a path with spaces: /send \"my file.pdf\")" in out
    assert any(line.startswith("-!- usage: /get ID [DIR]") for line in out)
    shared = [line for line in out if line.startswith("* alice shared a b.txt (7 bytes): /get ")]
    assert shared, out  # the room's line says it (no second line of the client's own)


def test_what_a_sender_can_get_wrong_is_one_line(served: Callable[..., Served], tmp_path: Path) -> None:
    server = served("--max-file-size", "1K", "--files-quota", "2K")
    assert one_line(send(tmp_path, server, "missing.pdf", "--nick", "alice"), "send") == \
        "cannot read missing.pdf: no such file or directory"
    (tmp_path / "dir").mkdir()
    assert one_line(send(tmp_path, server, "dir", "--nick", "alice"), "send") == "dir is not a file"
    os.mkfifo(tmp_path / "fifo")  # refused at once, not waited on
    assert one_line(send(tmp_path, server, "fifo", "--nick", "alice"), "send") == "fifo is not a file"
    (tmp_path / "big.bin").write_bytes(b"b" * 1025)
    assert one_line(send(tmp_path, server, "big.bin", "--nick", "alice"), "send") == \
        "too large: 1.0 KiB, this server takes files up to 1.0 KiB"
    (tmp_path / "ok.bin").write_bytes(b"o" * 1024)
    assert send(tmp_path, server, "ok.bin", "--nick", "alice").returncode == 0
    assert send(tmp_path, server, "ok.bin", "--nick", "alice").returncode == 0
    assert one_line(send(tmp_path, server, "ok.bin", "--nick", "alice"), "send") == \
        "over your quota: you share 2.0 KiB of 2.0 KiB; 0 bytes left"
    assert one_line(send(tmp_path, server, "ok.bin", "--nick", "alice", "--to", "nobody"), "send") == \
        "no such nick: nobody"
    assert one_line(get(tmp_path, server, "not-an-id"), "get") == \
        "'not-an-id' is not a file id (the 10 characters after /get)"
    assert one_line(get(tmp_path, server, filexfer.new_id(), "--out", "nowhere"), "get") == \
        "nowhere is not a directory"


def _small_disk() -> None:
    """In the server's process: files of at most 2 MiB, and a write past it fails (EFBIG) instead of killing."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, 2 * MiB))


def test_a_full_disk_on_the_server_is_one_line_to_the_sender_and_nothing_else(
        served: Callable[..., Served], tmp_path: Path) -> None:
    """The server runs under RLIMIT_FSIZE 2 MiB (SIGXFSZ ignored): its writes fail as on a full disk."""
    server = served(preexec=_small_disk)
    (tmp_path / "big.bin").write_bytes(os.urandom(6 * MiB))
    assert one_line(send(tmp_path, server, "big.bin", "--nick", "alice"), "send") == \
        "the server's disk is full: the upload was dropped"
    assert os.listdir(tmp_path / "data" / "files" / str(server.port) / "partial") == []
    (tmp_path / "small.bin").write_bytes(b"s" * 1000)  # the server is fine, and the quota came back
    file_id = send(tmp_path, server, "small.bin", "--nick", "alice").stdout.strip()
    assert filexfer.ID_RE.match(file_id)
    assert get(tmp_path, server, file_id, "--out", ".", "--nick", "bob").stdout.strip() == "small (1).bin"


def test_a_hostile_file_name_is_saved_and_shown_harmless(served: Callable[..., Served], tmp_path: Path) -> None:
    server = served()
    evil = "\x1b[2J\x1b]0;owned\x07..\u202eexe.pdf"
    (tmp_path / evil).write_bytes(b"%PDF")
    file_id = send(tmp_path, server, evil, "--nick", "alice").stdout.strip()
    (tmp_path / "out").mkdir()
    got = get(tmp_path, server, file_id, "--out", "out", "--nick", "bob")
    assert got.stdout == "out/exe.pdf\n" and os.listdir(tmp_path / "out") == ["exe.pdf"]


def test_the_server_banner_and_no_files(served: Callable[..., Served], tmp_path: Path) -> None:
    on = served()
    assert any(line.startswith(f"[SERVER] Shared files (unencrypted) in {tmp_path / 'data' / 'files'}")
               and line.endswith("up to 100 MiB each, 1.0 GiB per person, kept 30 days") for line in on.lines)
    off = served("--no-files")
    time.sleep(0.1)
    assert "[SERVER] File sharing is off (--no-files)" in off.lines
    (tmp_path / "a.txt").write_text("a")
    assert one_line(send(tmp_path, off, "a.txt", "--nick", "alice"), "send") == "file sharing is off on this server"


def test_send_and_get_need_nothing_but_what_join_saved(servers: list[Server], tmp_path: Path) -> None:  # noqa: F811
    """The profile 'securechat join' saved (the server's CA, this machine's certificate) is all send and get
    need, as for connect: on a mutual-TLS server each shares and fetches under its certificate's name."""
    server = Server(tmp_path / "server", "--require-client-cert")
    servers.append(server)
    alice, bob = Machine(tmp_path / "alice"), Machine(tmp_path / "bob")
    for machine, name in ((alice, "alice"), (bob, "bob")):
        joined = machine.join(server, server.invite(name))
        assert joined.returncode == 0, joined.stderr
    (alice.root / "plan.txt").write_text("the plan\n")
    sent = alice.run("send", f"{LOOPBACK}:{server.port}", "plan.txt", "--to", "#ops")
    assert sent.returncode == 0, sent.stderr
    file_id = sent.stdout.strip()
    (bob.root / "in").mkdir()
    got = bob.run("get", f"{LOOPBACK}:{server.port}", file_id, "--room", "ops", "--out", "in")
    assert got.returncode == 0 and got.stdout == "in/plan.txt\n", got.stderr
    assert (bob.root / "in" / "plan.txt").read_text() == "the plan\n"
    stranger = Machine(tmp_path / "stranger")  # the CA file alone, no certificate: not let in
    shutil.copy(server.home / "certs" / "ca.pem", stranger.root / "ca.pem")
    refused = stranger.run("get", f"{LOOPBACK}:{server.port}", file_id, "--room", "ops", "--ca", "ca.pem")
    assert refused.returncode == 1 and refused.stderr.startswith("securechat get: ") and \
        "requires a client certificate" in refused.stderr and refused.stderr.count("\n") == 1
    assert not (stranger.root / "plan.txt").exists()
