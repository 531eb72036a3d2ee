"""/send and /get in the terminal client (tmux), and the transfers' bookkeeping without a screen."""

# The fixtures come from test_client.py; test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from securechat.client.chat import ChatClient
from securechat.client.transfers import USAGE_GET, USAGE_SEND, Transfers, _Running
from securechat.server import filehandler
from securechat.server.filehandler import install
from securechat.server.files import FileService
from securechat.store import files as store_files
from securechat.store.files import FileStore
from tests.client.test_client import Certs, certs, expect, peer, start_server  # noqa: F401
from tests.client.test_client_ui import terms  # noqa: F401
from tests.tmuxterm import Tmux, needs_tmux

MiB = 1 << 20


def test_progress_and_usage_lines_without_a_network() -> None:
    said: list[str] = []
    transfers = Transfers(ChatClient(), said.append)
    for line in ("/send", "/send a b c", '/send "unclosed', "/get", "/get 12345", "/get abcdefghjk a b"):
        assert transfers.take(line)
    assert not transfers.take("/sender is not a command of ours") and not transfers.take("hello")
    assert said == [USAGE_SEND, USAGE_SEND, f"No closing quotation: {USAGE_SEND}", USAGE_GET, USAGE_GET, USAGE_GET]
    assert transfers.status() == "" and not transfers.busy
    running = _Running("sending", "report.pdf", done=460_000, total=MiB)
    running.started -= 2
    assert running.text() == "sending report.pdf: 43% of 1.0 MiB, 225 KiB/s"


@needs_tmux
@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX")
def test_send_shows_progress_while_chat_goes_on_then_get_saves_it(
        certs: Certs, start_server, terms: list[Tmux], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's disk is made slow (each 1 MiB written or read takes 0.1 s) so transfers last long enough
    # to watch.
    write, open_at = store_files.Partial.write, filehandler.open_at

    def slow_write(self: store_files.Partial, data: bytes) -> int:
        time.sleep(0.1)
        return write(self, data)

    class SlowReader:
        def __init__(self, source: BinaryIO) -> None:
            self.source = source

        def read(self, size: int) -> bytes:
            time.sleep(0.1)
            return self.source.read(size)

        def close(self) -> None:
            self.source.close()

    monkeypatch.setattr(store_files.Partial, "write", slow_write)
    monkeypatch.setattr(filehandler, "open_at", lambda *args: SlowReader(open_at(*args)))
    server, port = start_server(certs.server_context())
    files = FileService(FileStore(tmp_path / "files"), server.rooms)
    install(server, files)
    files.start()
    (tmp_path / "movie.mkv").write_bytes(os.urandom(24 * MiB))
    bob = peer(port, "bob", certs)
    try:
        term = Tmux([sys.executable, "-m", "securechat", "connect", "127.0.0.1", "--port", str(port), "--ca",
                     str(certs.ca), "--nick", "alice"], cwd=tmp_path)
        terms.append(term)
        term.wait_until(lambda s: "alice>" in s, history=False)
        term.type("/send movie.mkv")
        term.keys("Enter")
        screen = term.wait_until(lambda s: "sending movie.mkv: " in s and "% of 24 MiB" in s, history=False)
        assert "failed" not in screen
        term.type("still chatting")  # the chat connection is not the file's
        term.keys("Enter")
        expect(bob, "[alice] still chatting")
        assert "shared" not in term.screen(history=True)  # ... while the file is still on its way
        line = expect(bob, lambda line: line.startswith("* alice shared movie.mkv (24 MiB): /get "))
        file_id = line.rsplit(" ", 1)[1]
        term.wait_for(f"* alice shared movie.mkv (24 MiB): /get {file_id}")
        (tmp_path / "in").mkdir()
        term.type(f"/get {file_id} in")
        term.keys("Enter")
        # The progress line names the file (from the server's answer, cleaned), not its id.
        term.wait_until(lambda s: "receiving movie.mkv: " in s and "% of 24 MiB" in s, history=False)
        term.wait_for("-!- saved in/movie.mkv (24 MiB)")
        assert (tmp_path / "in" / "movie.mkv").read_bytes() == (tmp_path / "movie.mkv").read_bytes()
        term.type("/get zzzzzzzzzz")
        term.keys("Enter")
        term.wait_for("-!- receiving zzzzzzzzzz failed: no such file: zzzzzzzzzz")
    finally:
        bob.close()
        files.close()

