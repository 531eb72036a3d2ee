"""Sharing files end to end on loopback: real TLS, real files, and every way a client can lie or vanish."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from securechat.client import files as cf
from securechat.client.chat import ChatClient
from securechat.server import filehandler
from securechat.server import files as files_module
from securechat.server.engine import ChatServer
from securechat.server.transport import Transport
from securechat.store import files as store_files
from securechat.wire import filexfer, protocol, tls
from securechat.wire.filexfer import TransferError
from tests.filehelp import (
    RawFile,
    blobs,
    heard,
    partials,
    sha,
    ticket,
    wait_line,
)
from tests.server.test_catchup import Relay

MiB = 1 << 20


def _file(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def _shared(line: str) -> bool:
    return " shared " in line and "/get " in line


def _id_of(line: str) -> str:
    return line.rsplit("/get ", 1)[1]


def test_a_room_file_reaches_the_room_and_comes_back_whole(file_server: Callable[..., ChatServer],
                                                           chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice, bob = chat(server, "alice"), chat(server, "bob")
    path, data = _file(tmp_path, "report.pdf", int(2.1 * MiB))
    file_id, name, size = cf.send_file(alice, path, "-")
    assert (name, size) == ("report.pdf", len(data)) and filexfer.ID_RE.match(file_id)
    assert wait_line(bob, _shared) == f"* alice shared report.pdf (2.1 MiB): /get {file_id}"
    out = tmp_path / "bob"
    out.mkdir()
    saved = cf.get_file(bob, file_id, out)
    assert saved == out / "report.pdf" and saved.read_bytes() == data
    assert cf.get_file(alice, file_id, out).name == "report (1).pdf"  # never over an existing file
    assert (out / "report.pdf").read_bytes() == data
    assert not list(out.glob(".securechat-*"))  # no partial left behind
    # On the server: one blob named by its hash, 0600 in 0700 directories, nothing half-written.
    assert blobs(server) == [sha(data)] and partials(server) == []
    assert server.files is not None
    blob = server.files.store.blob_path(sha(data))
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600
    for d in (blob.parent, server.files.store.root, server.files.store.blobs, server.files.store.partial):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_a_download_never_writes_through_what_another_user_planted_at_its_partial_name(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    """Saving into a shared directory (/tmp): whoever knows a file's id can plant ``.securechat-ID.part``
    there before the download starts. A symbolic link (to the victim's ~/.bashrc) is never followed, a
    FIFO never hangs it: one line, and the file it points to is untouched."""
    server = file_server()
    alice = chat(server, "alice")
    path, _ = _file(tmp_path, "x.bin", 1000)
    file_id, _, _ = cf.send_file(alice, path, "-")
    out = tmp_path / "shared"
    out.mkdir()
    victim = tmp_path / "bashrc"
    victim.write_bytes(b"precious")
    part = cf.partial_path(out, file_id)
    part.symlink_to(victim)
    with pytest.raises(TransferError, match=f"^cannot save into {out}: {part.name} is not a regular file"):
        cf.get_file(alice, file_id, out)
    assert victim.read_bytes() == b"precious" and part.is_symlink()
    part.unlink()
    os.mkfifo(part)
    with pytest.raises(TransferError, match=f"{part.name} is not a regular file"):
        cf.get_file(alice, file_id, out)
    part.unlink()
    assert cf.get_file(alice, file_id, out).read_bytes() == path.read_bytes()
    assert server.files is not None  # a try the server refuses leaves no empty partial behind
    server.files.store.blob_path(sha(path.read_bytes())).unlink()
    with pytest.raises(TransferError, match="cannot be reached"):
        cf.get_file(alice, file_id, out)
    assert not list(out.glob(".securechat-*"))


def test_someone_not_in_the_room_probing_its_file_id_gets_no_such_file(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice, carol = chat(server, "alice"), chat(server, "carol")
    alice.send("/join dev")
    wait_line(alice, lambda line: "now talking in #dev" in line)
    path, _ = _file(tmp_path, "plans.txt", 1000)
    file_id, _, _ = cf.send_file(alice, path, "#dev")
    # carol knows the id (it leaked), but is not in #dev: the same answer as for an id that does not exist.
    with pytest.raises(TransferError, match=f"^no such file: {file_id}$"):
        ticket(carol, lambda tag: filexfer.get_request(tag, file_id))
    with pytest.raises(TransferError, match="^no such file: "):
        ticket(carol, lambda tag: filexfer.get_request(tag, filexfer.new_id()))
    with pytest.raises(TransferError):
        cf.get_file(carol, file_id, tmp_path)
    carol.send("/join dev")  # a member reads the room's files, as it reads its history
    wait_line(carol, lambda line: "now talking in #dev" in line)
    assert cf.get_file(carol, file_id, tmp_path).read_bytes() == path.read_bytes()


def test_a_private_file_is_for_its_two_people_only(file_server: Callable[..., ChatServer],
                                                   chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice, bob, carol = chat(server, "alice"), chat(server, "bob"), chat(server, "carol")
    path, data = _file(tmp_path, "salary.xlsx", 5000)
    file_id, _, _ = cf.send_file(alice, path, "bob")
    assert wait_line(bob, _shared) == f"[alice -> bob] * shared salary.xlsx (4.9 KiB): /get {file_id}"
    assert not [line for line in heard(carol) if _shared(line)]  # nothing said in the room
    with pytest.raises(TransferError, match="no such file"):
        cf.get_file(carol, file_id, tmp_path)
    for who in (bob, alice):
        out = tmp_path / str(who.nick)
        out.mkdir()
        assert cf.get_file(who, file_id, out).read_bytes() == data


def test_a_guest_who_takes_a_nick_later_cannot_fetch_its_earlier_holders_files(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice, bob, carol = chat(server, "alice"), chat(server, "bob"), chat(server, "carol")
    path, _ = _file(tmp_path, "secret.txt", 100)
    file_id, _, _ = cf.send_file(alice, path, "bob")
    bob.quit()
    mallory = chat(server, "bob")  # the nick is free again: a new guest takes it
    with pytest.raises(TransferError, match="no such file"):
        cf.get_file(mallory, file_id, tmp_path)
    mallory.quit()
    for _ in range(20):  # and one who renames to it, once the server has let go of the nick
        carol.send("/nick bob")
        if wait_line(carol, lambda line: line in ("* carol is now bob", "* nickname refused: 'bob' is taken")) \
                == "* carol is now bob":
            break
        time.sleep(0.1)
    with pytest.raises(TransferError, match="no such file"):
        cf.get_file(carol, file_id, tmp_path)


def test_an_empty_file_goes_and_comes_back(file_server: Callable[..., ChatServer],
                                            chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice = chat(server, "alice")
    (tmp_path / "empty").write_bytes(b"")
    file_id, _, size = cf.send_file(alice, tmp_path / "empty", "-")
    out = tmp_path / "out"
    out.mkdir()
    assert size == 0 and cf.get_file(alice, file_id, out).read_bytes() == b""


def test_malformed_ticket_requests_get_one_line(file_server: Callable[..., ChatServer],
                                                chat: Callable[..., ChatClient]) -> None:
    server = file_server()
    alice = chat(server, "alice")
    for size in ("9" * 4000, "-5", "1e9", "٣"):  # digits that would overflow a float; not digits at all
        with pytest.raises(TransferError, match="^usage: /ticket put"):
            ticket(alice, lambda tag, size=size: f"/ticket put {tag} - {size} x.bin")
    alice.send("/ticket frobnicate")
    assert wait_line(alice, lambda line: "usage" in line).startswith("* usage: /ticket put TAG")


def test_targets_the_sender_cannot_reach_are_refused(file_server: Callable[..., ChatServer],
                                                     chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice = chat(server, "alice")
    path, _ = _file(tmp_path, "x.bin", 10)
    with pytest.raises(TransferError, match=r"you are not in #dev: /join it first"):
        cf.send_file(alice, path, "#dev")
    with pytest.raises(TransferError, match="no such nick: nobody"):
        cf.send_file(alice, path, "nobody")
    alice.send("/part")
    wait_line(alice, lambda line: "you left" in line)
    with pytest.raises(TransferError, match="you are in no room"):
        cf.send_file(alice, path, "-")


def test_size_and_quota_limits_are_one_line_each(file_server: Callable[..., ChatServer],
                                                 chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server(max_size=3000, quota=5000)
    alice, bob = chat(server, "alice"), chat(server, "bob")
    big, _ = _file(tmp_path, "big.bin", 3001)
    with pytest.raises(TransferError, match=r"^too large: 2.9 KiB, this server takes files up to 2.9 KiB$"):
        cf.send_file(alice, big, "-")
    small, _ = _file(tmp_path, "small.bin", 3000)
    cf.send_file(alice, small, "-")
    # An upload in progress holds its share of the quota from its ticket on.
    held = ticket(alice, lambda tag: filexfer.put_request(tag, "-", 1500, "held.bin"))
    assert held
    with pytest.raises(TransferError, match=r"^over your quota: you share 4.4 KiB of 4.9 KiB; 500 bytes left$"):
        cf.send_file(alice, small, "-")
    cf.send_file(bob, small, "-")  # bob's quota is his own
    assert partials(server) == []


def _put(server: ChatServer, client: ChatClient, ca: Path, size: int, name: str = "f.bin") -> tuple[RawFile, str]:
    token = ticket(client, lambda tag: filexfer.put_request(tag, "-", size, name))
    raw = RawFile(server, ca)
    raw.send(filexfer.control(op="put", ticket=token))
    assert raw.control() == {"ok": "put", "offset": 0}
    return raw, token


def test_more_bytes_than_declared_ends_the_upload_and_removes_it(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path]) -> None:
    server = file_server(quota=10_000)
    alice, bob = chat(server, "alice"), chat(server, "bob")
    raw, token = _put(server, alice, cert_files["ca"], 1000)
    raw.data(os.urandom(3000))
    _, controls = raw.until_end()
    assert controls == [{"error": "more bytes than declared (1000): the upload was dropped"}]
    assert partials(server) == [] and blobs(server) == []
    again = RawFile(server, cert_files["ca"])  # the ticket died with it
    again.send(filexfer.control(op="put", ticket=token))
    assert again.until_end()[1] == [{"error": "the ticket is unknown or expired: ask for a new one"}]
    assert ticket(alice, lambda tag: filexfer.put_request(tag, "-", 10_000, "x"))  # its quota came back
    assert not [line for line in heard(bob) if _shared(line)]  # nothing was announced


def test_fewer_bytes_than_declared_is_refused_at_the_end(file_server: Callable[..., ChatServer],
                                                         chat: Callable[..., ChatClient],
                                                         cert_files: dict[str, Path]) -> None:
    server = file_server()
    alice = chat(server, "alice")
    raw, _ = _put(server, alice, cert_files["ca"], 1000)
    data = os.urandom(600)
    raw.data(data)
    raw.send(filexfer.control(op="end", sha256=sha(data)))
    assert raw.until_end()[1] == [{"error": "the size does not match: 600 bytes arrived, 1000 were declared"}]
    assert partials(server) == [] and blobs(server) == []


def test_a_lying_hash_stores_nothing_and_tells_nobody(file_server: Callable[..., ChatServer],
                                                      chat: Callable[..., ChatClient],
                                                      cert_files: dict[str, Path]) -> None:
    server = file_server()
    alice, bob = chat(server, "alice"), chat(server, "bob")
    data = os.urandom(3 * MiB)
    raw, _ = _put(server, alice, cert_files["ca"], len(data))
    raw.data(data)
    raw.send(filexfer.control(op="end", sha256=sha(data + b"!")))
    assert raw.until_end()[1] == [{"error": "the SHA-256 does not match the bytes that arrived: the file was dropped"}]
    assert partials(server) == [] and blobs(server) == []
    assert not [line for line in heard(bob) if _shared(line)]
    alice.send("still here")  # the chat connection is untouched
    assert wait_line(bob, lambda line: line.startswith("[alice]")) == "[alice] still here"


def test_a_transfer_cut_half_way_resumes_from_the_last_confirmed_byte(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path],
        tmp_path: Path) -> None:
    server = file_server()
    alice, bob = chat(server, "alice"), chat(server, "bob")
    data = os.urandom(12 * MiB)
    raw, token = _put(server, alice, cert_files["ca"], len(data), "video.mp4")
    raw.data(data[:7 * MiB])
    acked = raw.control()["ack"]
    assert acked >= filexfer.ACK_EVERY
    raw.sock.close()  # cut: no end, no goodbye
    # The partial file stays for the sender to resume; the room has heard nothing.
    deadline = time.monotonic() + 5
    while not partials(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(partials(server)) == 1 and not [line for line in heard(bob) if _shared(line)]
    resumed = _resume(server, cert_files["ca"], token)
    offset = resumed.control()["offset"]
    assert acked <= offset <= 7 * MiB  # at least what was confirmed; never more than was sent
    resumed.data(data[offset:])
    resumed.send(filexfer.control(op="end", sha256=sha(data)))
    _, controls = resumed.until_end()
    file_id = controls[-1]["id"]
    assert [c for c in controls if "ack" not in c] == [{"ok": "done", "id": file_id}]
    assert wait_line(bob, _shared).endswith(f"/get {file_id}")
    assert cf.get_file(bob, file_id, tmp_path).read_bytes() == data
    assert partials(server) == []


def _resume(server: ChatServer, ca: Path, token: str) -> RawFile:
    """A new connection with the upload's ticket; retried while the server is closing the cut one."""
    for _ in range(50):
        raw = RawFile(server, ca)
        raw.send(filexfer.control(op="put", ticket=token))
        event = raw.event()
        if isinstance(event, filexfer.Control) and event.msg.get("ok") == "put":
            raw.events.insert(0, event)
            return raw
        assert isinstance(event, filexfer.Control) and event.msg["error"].startswith("busy"), event
        raw.close()
        time.sleep(0.1)
    raise AssertionError("never resumed")


def test_transfers_at_once_are_bounded(file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient],
                                       cert_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "MAX_TRANSFERS", 1)
    server = file_server()
    alice = chat(server, "alice")
    first, _ = _put(server, alice, cert_files["ca"], 1000)  # moving (it holds its place until it ends)
    token = ticket(alice, lambda tag: filexfer.put_request(tag, "-", 10, "second.bin"))
    second = RawFile(server, cert_files["ca"])
    second.send(filexfer.control(op="put", ticket=token))
    assert second.until_end()[1] == [
        {"error": "busy: the server is moving as many files as it takes at once; try again"}]
    first.close()
    for _ in range(100):  # once the first has ended, the same ticket goes through
        again = RawFile(server, cert_files["ca"])
        again.send(filexfer.control(op="put", ticket=token))
        if again.control().get("ok") == "put":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the second upload never got its turn")
    again.data(b"0123456789")
    again.send(filexfer.control(op="end", sha256=sha(b"0123456789")))
    assert again.until_end()[1][-1]["ok"] == "done"


def test_downloads_told_busy_do_not_use_up_the_persons_tickets(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download answered "busy" has spent its ticket (the client asks a new one for each try): the
    refusals must not pile up until the person is told "you have 8 transfers going" with none going."""
    monkeypatch.setattr(files_module, "MAX_TRANSFERS", 1)
    server = file_server()
    alice, bob = chat(server, "alice"), chat(server, "bob")
    path, data = _file(tmp_path, "small.bin", 1000)
    file_id, _, _ = cf.send_file(alice, path, "-")
    holder, _ = _put(server, bob, cert_files["ca"], 1000)  # bob's upload holds the one place
    for _ in range(files_module.MAX_TICKETS_PER_OWNER + 2):
        refused = RawFile(server, cert_files["ca"])
        refused.send(filexfer.control(op="get", ticket=ticket(alice, lambda tag: filexfer.get_request(tag, file_id)),
                                      offset=0))
        assert refused.until_end()[1] == [
            {"error": "busy: the server is moving as many files as it takes at once; try again"}]
    holder.close()
    saved = _retry_get(server, alice, cert_files["ca"], file_id)
    assert saved == data


def _retry_get(server: ChatServer, client: ChatClient, ca: Path, file_id: str) -> bytes:
    """The file's bytes, asking again (a fresh ticket each time) while the server says busy."""
    for _ in range(100):
        raw = RawFile(server, ca)
        raw.send(filexfer.control(op="get", ticket=ticket(client, lambda tag: filexfer.get_request(tag, file_id)),
                                  offset=0))
        received, controls = raw.until_end()
        if controls and controls[-1].get("ok") == "done":
            return received
        assert controls[-1]["error"].startswith("busy"), controls
        time.sleep(0.05)
    raise AssertionError("the download never got its turn")


def test_transfers_take_no_thread_and_disk_work_runs_on_workers_while_reading_waits(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight uploads at once on the loop engine: no thread more; each write (and hash) on a worker, never on
    a loop; and while a connection's write is pending with the next batch full, its reading is paused."""
    server = file_server()
    alice = chat(server, "alice")
    writes: list[tuple[str, bool]] = []
    write, pause = store_files.Partial.write, Transport.pause_reading

    def slow_write(self: store_files.Partial, data: bytes) -> int:
        writes.append((threading.current_thread().name, False))
        time.sleep(0.02)  # a slow disk: the next batch fills meanwhile
        return write(self, data)

    def paused(self: Transport) -> None:
        writes.append((threading.current_thread().name, True))
        pause(self)

    monkeypatch.setattr(store_files.Partial, "write", slow_write)
    monkeypatch.setattr(Transport, "pause_reading", paused)
    threads = threading.active_count()
    uploads = [_put(server, alice, cert_files["ca"], 4 * MiB, f"f{i}.bin") for i in range(8)]
    assert threading.active_count() == threads  # connections of their own, and not one thread among them
    data = os.urandom(4 * MiB)
    for raw, _ in uploads:
        raw.data(data)
        raw.send(filexfer.control(op="end", sha256=sha(data)))
    for raw, _ in uploads:
        assert raw.until_end()[1][-1]["ok"] == "done"
    disk = [name for name, pausing in writes if not pausing]
    assert len(disk) >= 8 * 4 and all(name.startswith("securechat-worker") for name in disk), set(disk)
    assert any(pausing and name.startswith("securechat-loop") for name, pausing in writes), "never paused"


def _through(relay: Relay, ca: Path, reconnect: bool = True) -> ChatClient:
    """A chat client connected through ``relay`` (not registered yet)."""

    def factory() -> ssl.SSLContext:
        return tls.client_context(ca)

    client = ChatClient(reconnect=reconnect)
    client.connect("127.0.0.1", relay.port, ssl_context=factory(), context_factory=factory,
                   server_hostname="localhost")
    return client


def test_a_download_cut_half_way_resumes_by_itself_and_saves_the_file_whole(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path],
        tmp_path: Path) -> None:
    """The relay is cut once the partial holds an odd number of bytes past 5 MiB (not a multiple of the
    client's 1 MiB batches): get_file asks again from there and the saved file is the shared one."""
    server = file_server()
    path, data = _file(tmp_path, "disk.img", 40 * MiB + 12345)
    file_id, _, _ = cf.send_file(chat(server, "alice"), path, "-")
    relay = Relay(server.address)
    bob = _through(relay, cert_files["ca"])  # the chat comes back too: each try asks a fresh ticket on it
    out = tmp_path / "in"
    out.mkdir()
    try:
        bob.register("bob")
        said: list[str] = []
        result: list[Path] = []
        getter = threading.Thread(target=lambda: result.append(cf.get_file(bob, file_id, out, say=said.append)))
        getter.start()
        part = cf.partial_path(out, file_id)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (part.exists() and part.stat().st_size >= 5 * MiB):
            time.sleep(0.002)
        relay.cut()
        relay.restore()
        getter.join(60)
        assert result and any("connection lost" in s and "resuming" in s for s in said), said
        assert result[0].read_bytes() == data
        assert not part.exists()
    finally:
        bob.close()
        relay.close()


def test_an_upload_nobody_resumes_is_removed_and_its_quota_given_back(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path]) -> None:
    server = file_server(quota=2 * MiB)
    alice = chat(server, "alice")
    raw, token = _put(server, alice, cert_files["ca"], 2 * MiB)
    raw.data(os.urandom(MiB + 5))
    raw.sock.close()
    with pytest.raises(TransferError, match="over your quota"):
        ticket(alice, lambda tag: filexfer.put_request(tag, "-", 1, "x"))
    assert server.files is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the cut connection is noticed
        held = server.files._tickets[token]
        upload = held.upload  # dropped, and its last write done
        if upload is not None and upload.handler is None and upload.partial is not None and not upload.busy:
            break
        time.sleep(0.05)
    held.expires = time.monotonic() - 1  # as RESUME_SECONDS later
    server.files.clean()
    assert partials(server) == []
    assert ticket(alice, lambda tag: filexfer.put_request(tag, "-", 2 * MiB, "x"))


def test_the_client_resumes_by_itself_through_a_cut(file_server: Callable[..., ChatServer],
                                                     cert_files: dict[str, Path], tmp_path: Path) -> None:
    """A relay in between is cut once the server has 5 MiB and restored: send_file carries on and finishes."""
    server = file_server()
    relay = Relay(server.address)
    alice = _through(relay, cert_files["ca"], reconnect=False)
    try:
        alice.register("alice")
        path, data = _file(tmp_path, "disk.img", 48 * MiB)
        said: list[str] = []
        result: list[str] = []
        sender = threading.Thread(target=lambda: result.append(cf.send_file(alice, path, "-", say=said.append)[0]))
        sender.start()
        assert server.files is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                t.upload is not None and t.upload.partial is not None and t.upload.partial.offset >= 5 * MiB
                for t in list(server.files._tickets.values())):
            time.sleep(0.005)
        relay.cut()  # the file's connection (and the chat's) drop half-way
        relay.restore()
        sender.join(60)
        assert result and any("connection lost" in s and "resuming" in s for s in said), said
        assert server.files.store.index.get(result[0]) is not None
        assert server.files.store.blob_path(sha(data)).read_bytes() == data
    finally:
        alice.close()
        relay.close()


def test_a_hostile_file_name_reaches_every_screen_harmless(file_server: Callable[..., ChatServer],
                                                           chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    server = file_server()
    alice, bob = chat(server, "alice"), chat(server, "bob")
    evil = "\x1b]0;pwned\x07\x1b[2J..\u202eexe.pdf"
    path = tmp_path / evil
    path.write_bytes(b"MZ...")
    file_id, name, _ = cf.send_file(alice, path, "-")
    assert name == "exe.pdf"
    line = wait_line(bob, _shared)
    assert line == f"* alice shared exe.pdf (5 bytes): /get {file_id}" and protocol.is_safe(line)
    out = tmp_path / "out"
    out.mkdir()
    assert cf.get_file(bob, file_id, out) == out / "exe.pdf"


def test_a_raw_client_cannot_name_a_file_with_a_path_either(file_server: Callable[..., ChatServer],
                                                            chat: Callable[..., ChatClient],
                                                            cert_files: dict[str, Path]) -> None:
    server = file_server()
    alice, bob = chat(server, "alice"), chat(server, "bob")
    raw, _ = _put(server, alice, cert_files["ca"], 3, name="../../../../root/.ssh/authorized_keys")
    raw.data(b"abc")
    raw.send(filexfer.control(op="end", sha256=sha(b"abc")))
    file_id = raw.until_end()[1][-1]["id"]
    assert wait_line(bob, _shared) == f"* alice shared root_.ssh_authorized_keys (3 bytes): /get {file_id}"


def test_tickets_are_single_purpose_and_checked(file_server: Callable[..., ChatServer],
                                                chat: Callable[..., ChatClient], cert_files: dict[str, Path],
                                                tmp_path: Path) -> None:
    server = file_server()
    alice = chat(server, "alice")
    path, _ = _file(tmp_path, "a.txt", 10)
    file_id, _, _ = cf.send_file(alice, path, "-")
    get_token = ticket(alice, lambda tag: filexfer.get_request(tag, file_id))
    wrong = RawFile(server, cert_files["ca"])  # a download ticket does not upload
    wrong.send(filexfer.control(op="put", ticket=get_token))
    assert wrong.until_end()[1] == [{"error": "the ticket is unknown or expired: ask for a new one"}]
    for _ in range(2):  # and it is good for one download
        raw = RawFile(server, cert_files["ca"])
        raw.send(filexfer.control(op="get", ticket=get_token, offset=0))
        data, controls = raw.until_end()
        if _ == 0:
            assert data == path.read_bytes() and controls[-1] == {"ok": "done"}
        else:
            assert controls == [{"error": "the ticket is unknown or expired: ask for a new one"}]
    forged = RawFile(server, cert_files["ca"])
    forged.send(filexfer.control(op="get", ticket="A" * 22, offset=0))
    assert forged.until_end()[1] == [{"error": "the ticket is unknown or expired: ask for a new one"}]


def test_garbage_and_silence_on_a_file_connection(file_server: Callable[..., ChatServer],
                                                  cert_files: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filehandler, "HELLO_SECONDS", 0.5)
    server = file_server()
    garbage = RawFile(server, cert_files["ca"])
    garbage.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert garbage.until_end()[1] == [{"error": "not a securechat file connection (unknown frame type)"}]
    silent = RawFile(server, cert_files["ca"])
    assert silent.until_end()[1] == [{"error": "no ticket in time"}]
    deadline = time.monotonic() + 5
    while len(server.pending) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.pending) == 0  # neither kept a place among the unauthenticated


def test_a_file_connection_that_stops_moving_is_closed_and_gives_its_place_up(
        file_server: Callable[..., ChatServer], chat: Callable[..., ChatClient], cert_files: dict[str, Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload that goes silent half-way, and a download whose reader stops: each is closed after the
    idle time, and neither keeps its place among the transfers; the upload stays resumable."""
    monkeypatch.setattr(filehandler, "IDLE_SECONDS", 0.5)
    monkeypatch.setattr(files_module, "MAX_TRANSFERS", 1)  # a place held shows: the next one is "busy"
    server = file_server()
    alice = chat(server, "alice")
    ca = cert_files["ca"]
    silent, token = _put(server, alice, ca, 2 * MiB)
    silent.data(os.urandom(MiB))  # ... and nothing more
    assert silent.until_end()[1] == [{"error": "nothing moved for 0.5 s"}]
    assert partials(server) == [token]  # kept for a resume

    path, data = _file(tmp_path, "big.bin", 16 * MiB)  # far more than the outbox and both sockets' buffers
    file_id, _, _ = cf.send_file(alice, path, "-")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a small window, as a stalled reader's
    raw.settimeout(10)
    raw.connect(server.address[:2])
    context = tls.client_context(ca)
    context.set_alpn_protocols([filexfer.ALPN])
    stalled = context.wrap_socket(raw, server_hostname="localhost")
    stalled.sendall(filexfer.control(op="get", ticket=ticket(alice, lambda tag: filexfer.get_request(tag, file_id)),
                                     offset=0))
    got = stalled.recv(1024)  # the answer's first bytes; then it reads no more
    answers = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # while it stalls it holds the one place; once closed, it is free
        other = RawFile(server, ca)
        other.send(filexfer.control(op="get", ticket=ticket(alice, lambda tag: filexfer.get_request(tag, file_id)),
                                    offset=0))
        answers.append(other.control())
        other.close()
        if "ok" in answers[-1]:
            break
        time.sleep(0.2)
    assert answers[0] == {"error": "busy: the server is moving as many files as it takes at once; try again"}
    assert answers[-1]["ok"] == "get", answers
    try:
        while chunk := stalled.recv(1 << 20):
            got += chunk
    except (ssl.SSLError, OSError):
        pass
    assert len(got) < len(data)  # cut short, never the whole file


def test_a_server_without_files_says_so(serve: Callable[..., ChatServer], chat: Callable[..., ChatClient],
                                        tmp_path: Path) -> None:
    server = serve()
    alice = chat(server, "alice")
    path, _ = _file(tmp_path, "a.txt", 10)
    with pytest.raises(TransferError, match="^file sharing is off on this server$"):
        cf.send_file(alice, path, "-")
    with pytest.raises(TransferError, match="does not take files"):
        cf.open_connection(alice, 5)


def test_the_same_bytes_twice_are_stored_once_and_counted_twice(file_server: Callable[..., ChatServer],
                                                                chat: Callable[..., ChatClient],
                                                                tmp_path: Path) -> None:
    server = file_server(quota=3000)
    alice = chat(server, "alice")
    path, data = _file(tmp_path, "a.bin", 1500)
    first, _, _ = cf.send_file(alice, path, "-")
    second, _, _ = cf.send_file(alice, path, "-")
    assert first != second and blobs(server) == [sha(data)]
    with pytest.raises(TransferError, match="over your quota"):
        cf.send_file(alice, path, "-")


@pytest.mark.slow
def test_chat_lines_keep_flowing_during_a_big_transfer(file_server: Callable[..., ChatServer],
                                                      chat: Callable[..., ChatClient], tmp_path: Path) -> None:
    """While alice uploads 64 MiB, every one of bob's lines reaches carol, in order."""
    server = file_server()
    alice, bob, carol = chat(server, "alice"), chat(server, "bob"), chat(server, "carol")
    path, _ = _file(tmp_path, "big.bin", 64 * MiB)
    done = threading.Event()
    result: list[object] = []

    def upload() -> None:
        try:
            result.append(cf.send_file(alice, path, "-"))
        finally:
            done.set()

    threading.Thread(target=upload, daemon=True).start()
    sent = 0
    while not done.is_set() or sent < 20:
        sent += 1
        bob.send(f"line {sent}")
        time.sleep(0.05)
    assert result and isinstance(result[0], tuple)
    got = []
    while len(got) < sent:
        line = carol.recv_line(5)
        assert line is not None, got
        if line.startswith("[bob] "):
            got.append(line)
    assert got == [f"[bob] line {i}" for i in range(1, sent + 1)]
