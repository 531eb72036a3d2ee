"""History in a real SQLite file: replay on join, /history paging, retention, restarts, kill -9, failures."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat.server.engine import ChatServer
from securechat.store import history
from securechat.store.history import HistoryError, SqliteLog
from tests.conftest import LOOPBACK, LineClient

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]

HISTORY_LINE = re.compile(r"\(history \d\d:\d\d\) (.*)\Z")


def _db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.sqlite3"


@pytest.fixture
def logged(serve: Serve, tmp_path: Path) -> Callable[..., ChatServer]:
    """A TLS server whose rooms keep history in a real SQLite file under tmp_path."""

    def start(**options: object) -> ChatServer:
        return serve(roomlog=SqliteLog(_db(tmp_path)), **options)

    return start


def _sync(client: LineClient) -> None:
    """Wait until the server has handled everything ``client`` sent (it answers in order)."""
    client.send("/rooms")
    client.expect(lambda line: re.match(r"\* \d+ rooms?: ", line) is not None)


def _replayed(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        m = HISTORY_LINE.match(line)
        if m:
            out.append(m[1])
    return out


def test_a_late_joiner_sees_the_last_lines_marked_then_now_live(logged: Callable[..., ChatServer],
                                                                 connect: Connect) -> None:
    server = logged(flood_rate=0, replay=3)
    alice = connect(server, "alice")
    for i in range(5):
        alice.send(f"line {i}")
    alice.send("/me waves")
    _sync(alice)
    bob = connect(server, "bob")
    assert bob.readline() == "* history of #lobby: 3 lines"
    assert [HISTORY_LINE.match(bob.readline())[1] for _ in range(3)] == [  # type: ignore[index]
        "[alice] line 3", "[alice] line 4", "[alice] * waves"]
    assert bob.readline() == "* now live in #lobby"
    alice.expect("* bob joined")
    alice.send("live one")
    assert bob.readline() == "[alice] live one"


def test_history_pages_back_by_id(logged: Callable[..., ChatServer], connect: Connect) -> None:
    server = logged(flood_rate=0, replay=2)
    alice = connect(server, "alice")
    for i in range(7):
        alice.send(f"n{i}")
    _sync(alice)
    bob = connect(server, "bob")
    assert _replayed(bob.lines_until_quiet()) == ["[alice] n5", "[alice] n6"]
    bob.send("/history 2")
    assert bob.readline() == "* history of #lobby: 2 earlier lines"
    assert _replayed([bob.readline(), bob.readline()]) == ["[alice] n3", "[alice] n4"]
    assert bob.readline() == "* end of history; now live in #lobby"
    bob.send("/history")  # the default page: everything that is left
    got = bob.lines_until_quiet()
    assert _replayed(got) == ["[alice] n0", "[alice] n1", "[alice] n2"]  # what was said (issue 18)
    bob.send("/history 5")
    assert bob.readline() == "* no earlier lines in #lobby"
    bob.send("/history many")
    assert bob.readline() == "* usage: /history [N] (N lines further back)"


def test_each_room_has_its_own_history(logged: Callable[..., ChatServer], connect: Connect) -> None:
    server = logged(flood_rate=0)
    alice = connect(server, "alice")
    alice.send("/join dev")
    alice.send("dev talk")
    alice.send("/join lobby")
    alice.send("lobby talk")
    _sync(alice)
    bob = connect(server, "bob")
    seen = bob.lines_until_quiet()
    assert "[alice] lobby talk" in _replayed(seen) and "[alice] dev talk" not in _replayed(seen)
    bob.send("/join DEV")
    seen = bob.lines_until_quiet()
    assert seen[0] == "* you joined #dev (2 here); now talking in #dev"
    assert _replayed(seen) == ["[alice] dev talk"]  # replays show what was said, not who came (issue 18)
    assert seen[-1] == "* now live in #dev"


def test_private_messages_are_not_stored_by_default(logged: Callable[..., ChatServer], connect: Connect,
                                                    tmp_path: Path) -> None:
    server = logged()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.send("/msg bob the secret")
    assert bob.expect("[alice ->") == "[alice -> bob] the secret"
    alice.send("public")
    bob.expect("[alice] public")
    server.rooms.log.flush()  # type: ignore[attr-defined]
    with sqlite3.connect(_db(tmp_path)) as db:
        texts = [row[0] for row in db.execute("SELECT text FROM lines")]
    assert "public" in texts and "the secret" not in texts


def test_the_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "d" / "h.sqlite3")
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "d" / "h.sqlite3").st_mode) == 0o600
        with sqlite3.connect(tmp_path / "d" / "h.sqlite3") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        log.close()


def test_a_loose_existing_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    SqliteLog(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_retention_by_lines_and_age_is_enforced_while_running(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "RETENTION_INTERVAL", 0.05)
    log = SqliteLog(tmp_path / "h.sqlite3", lines=5, days=0)
    log.start(lambda entry: None)
    try:
        for i in range(20):
            log.append("lobby", "chat", "alice", f"l{i}")
            log.append("dev", "chat", "alice", f"d{i}")
        log.flush()
        deadline = time.monotonic() + 5
        while len(log.read_after("lobby", None, 100)) > 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e.text for e in log.read_after("lobby", None, 100)] == [f"l{i}" for i in range(15, 20)]
        assert [e.text for e in log.read_after("dev", None, 100)] == [f"d{i}" for i in range(15, 20)]
    finally:
        log.close()
    aged = SqliteLog(tmp_path / "h.sqlite3", days=1 / 86400, lines=0)  # one second
    try:
        time.sleep(1.2)
        deadline = time.monotonic() + 5
        while aged.read_after("lobby", None, 100) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert aged.read_after("lobby", None, 100) == []
    finally:
        aged.close()


def test_ids_keep_increasing_after_a_restart(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "h.sqlite3")
    got: list[str] = []
    log.start(lambda entry: got.append(entry.id))
    log.append("lobby", "chat", "a", "x")
    log.close()
    again = SqliteLog(tmp_path / "h.sqlite3")
    again.start(lambda entry: got.append(entry.id))
    try:
        again.append("lobby", "chat", "a", "y")
        assert got[1] != got[0] and sorted(got, key=history.id_key) == got
        assert [e.text for e in again.read_after("lobby", None, 10)] == ["x", "y"]
    finally:
        again.close()


def test_a_damaged_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HistoryError, match="is not a securechat history database"):
        SqliteLog(path)


def test_a_second_server_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = SqliteLog(tmp_path / "h.sqlite3")
    try:
        with pytest.raises(HistoryError, match="in use by another securechat server"):
            SqliteLog(tmp_path / "h.sqlite3")
    finally:
        first.close()
    SqliteLog(tmp_path / "h.sqlite3").close()  # free again once the first is gone


# -- a real `securechat serve` ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port


@pytest.fixture
def run_serve(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, port: int | None = None, host: str = LOOPBACK, wait: bool = True,
              fsize: int | None = None) -> Proc:
        port = port or _free_port()
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
        proc = subprocess.Popen([sys.executable, "-m", "securechat", "serve", "--plain", "--host", host,
                                 "--port", str(port), "--flood-rate", "0", "--data", str(tmp_path / "data"), *args],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=limit)
        procs.append(proc)
        if wait:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("[SERVER] Waiting for connections"):
                    break
            else:
                raise AssertionError(f"server did not start: {proc.communicate(timeout=10)}")
        return Proc(proc, port)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _plain(port: int, nick: str, host: str = LOOPBACK) -> LineClient:
    client = LineClient(socket.create_connection((host, port), timeout=10))
    client.expect("* securechat")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


def _stored(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [row[0] for row in db.execute("SELECT text FROM lines WHERE kind = 'chat' ORDER BY ms, seq")]


@pytest.mark.slow
def test_a_graceful_stop_loses_nothing_and_a_restart_replays(run_serve: Callable[..., Proc],
                                                             tmp_path: Path) -> None:
    served = run_serve()
    senders = [_plain(served.port, f"s{i}") for i in range(3)]
    watcher = _plain(served.port, "watcher")
    for n in range(300):
        for i, sender in enumerate(senders):
            sender.send(f"s{i} {n}")
    # every line delivered before the stop
    want = {f"s{i} {n}" for i in range(3) for n in range(300)}
    got: set[str] = set()
    while got != want:
        line = watcher.readline()
        if line.startswith("[s"):
            got.add(line.split("] ", 1)[1])
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=10) == 0
    stored = _stored(tmp_path / "data" / f"history-{served.port}.sqlite3")
    assert sorted(stored) == sorted(want)
    again = run_serve(port=served.port)
    late = _plain(again.port, "late")
    assert _replayed(late.lines_until_quiet())[-1].startswith("[s")


@pytest.mark.slow
def test_kill_9_under_load_loses_at_most_a_second_and_never_corrupts(run_serve: Callable[..., Proc],
                                                                     tmp_path: Path) -> None:
    served = run_serve()
    watcher = _plain(served.port, "watcher")
    senders = [_plain(served.port, f"k{i}") for i in range(3)]
    delivered: list[tuple[float, str]] = []
    stop = threading.Event()

    def talk(i: int, sender: LineClient) -> None:
        n = 0
        while not stop.is_set():
            try:
                sender.send(f"k{i} {n}")
            except OSError:
                return
            n += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=talk, args=(i, s)) for i, s in enumerate(senders)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < 2.5:
            line = watcher.readline()
            if line.startswith("[k"):
                delivered.append((time.monotonic(), line.split("] ", 1)[1]))
        killed_at = time.monotonic()
        served.proc.kill()
        served.proc.wait(timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    stored = set(_stored(tmp_path / "data" / f"history-{served.port}.sqlite3"))
    assert stored, "nothing was stored at all"
    missing = [text for when, text in delivered if text not in stored]
    old_missing = [text for when, text in delivered if text not in stored and when < killed_at - 1.0]
    assert not old_missing, f"{len(old_missing)} lines older than a second were lost: {old_missing[:5]}"
    assert len(missing) < len(delivered)
    # and the file opens again: a restarted server replays it
    again = run_serve(port=served.port)
    late = _plain(again.port, "late")
    assert any(line.startswith("[k") for line in _replayed(late.lines_until_quiet()))


def test_cli_damaged_database_is_one_line_and_exit_1(run_serve: Callable[..., Proc], tmp_path: Path) -> None:
    port = _free_port()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f"history-{port}.sqlite3").write_bytes(b"garbage" * 1000)
    served = run_serve(port=port, wait=False)
    out, err = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 1
    db = tmp_path / "data" / f"history-{port}.sqlite3"
    assert err.strip().splitlines() == [
        f"securechat serve: history: {db} is not a securechat history database (damaged, or another file): "
        "move it away or pass --data"]
    assert "Waiting for connections" not in out


def test_cli_second_server_on_the_same_history_is_refused(run_serve: Callable[..., Proc]) -> None:
    first = run_serve(host="127.0.0.1")
    second = run_serve(port=first.port, host="127.0.0.2", wait=False)  # same port number: same file
    out, err = second.proc.communicate(timeout=20)
    assert second.proc.returncode == 1
    assert len(err.strip().splitlines()) == 1 and "in use by another securechat server" in err
    assert "Traceback" not in err
    assert first.proc.poll() is None


def test_cli_full_disk_at_start_is_one_line(run_serve: Callable[..., Proc]) -> None:
    served = run_serve(fsize=16384, wait=False)
    out, err = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 1
    assert len(err.strip().splitlines()) == 1 and "no space left" in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_cli_disk_full_mid_run_logs_once_and_chat_goes_on(run_serve: Callable[..., Proc]) -> None:
    served = run_serve(fsize=400_000)
    alice = _plain(served.port, "alice")
    bob = _plain(served.port, "bob")
    alice.expect("* bob joined")
    big = "x" * 3000
    for n in range(300):
        bob.send(f"{n} {big}")
        assert alice.readline() == f"[bob] {n} {big}"
    time.sleep(0.5)
    bob.send("still here")
    assert alice.readline() == "[bob] still here"
    served.proc.send_signal(signal.SIGTERM)
    out, err = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 0
    errors = [line for line in err.splitlines() if "history" in line]
    assert len(errors) == 1 and "history is off from now on" in errors[0] and "no space left" in errors[0], err
    assert "Traceback" not in err


def test_cli_no_history_keeps_nothing(run_serve: Callable[..., Proc], tmp_path: Path) -> None:
    served = run_serve("--no-history")
    alice = _plain(served.port, "alice")
    alice.send("hello")
    bob = _plain(served.port, "bob")
    assert not _replayed(bob.lines_until_quiet())
    bob.send("/history")
    assert bob.readline() == "* history is off on this server"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("option", ["--history-days", "--history-lines", "--replay", "--grace"])
def test_cli_negative_history_options_are_one_line_usage_errors(option: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "securechat", "serve", option, "-1"], capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "out of range" in lines[0] and "Traceback" not in proc.stderr


def test_a_replay_never_overflows_the_joiners_queue(logged: Callable[..., ChatServer], connect: Connect) -> None:
    server = logged(flood_rate=0, replay=200)
    alice = connect(server, "alice")
    big = "y" * 3900
    for i in range(200):  # 800 KB of history: more than half a client's 1 MiB queue
        alice.send(f"{i} {big}")
    _sync(alice)
    bob = connect(server, "bob")
    header = bob.readline()
    m = re.match(r"\* history of #lobby: (\d+) lines \((\d+) earlier not shown: /history pages back\)\Z", header)
    assert m, header
    shown, skipped = int(m[1]), int(m[2])
    assert shown + skipped == 200 and 100 < shown < 140
    replayed = [bob.readline() for _ in range(shown)]
    assert _replayed(replayed)[-1] == f"[alice] 199 {big}"
    assert bob.readline() == "* now live in #lobby"
    bob.send("/history 5")  # pages on from the oldest shown
    assert bob.readline() == "* history of #lobby: 5 earlier lines"
    assert _replayed([bob.readline()])[0] == f"[alice] {skipped - 5} {big}"


def test_a_directory_where_the_file_should_be_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "h.sqlite3").mkdir()
    with pytest.raises(HistoryError, match=r"cannot use .*h\.sqlite3: is a directory"):
        SqliteLog(tmp_path / "h.sqlite3")
