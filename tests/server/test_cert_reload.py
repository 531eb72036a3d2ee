"""A certificate re-issued beside a running server is served within seconds (issue 18, bug 9).

Before: ``gen-certs --ip 127.0.0.2`` while the server ran left it on the old certificate until its
daily check (or a restart), and the client's hint told the person to run the command they had just
run. A real ``securechat serve`` listening on 127.0.0.2, real ``gen-certs`` and ``connect``.
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import LineClient

SECURECHAT = [sys.executable, "-m", "securechat"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# What a person waits, at most, for the server to serve what gen-certs just wrote.
WITHIN = 5.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _handshake(host: str, port: int, ca: Path) -> LineClient:
    raw = socket.create_connection((host, port), timeout=5)
    return LineClient(ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=host))


def test_gen_certs_beside_a_running_server_is_served_at_once_and_logged(tmp_path: Path) -> None:
    port = _free_port("127.0.0.2")
    log: queue.Queue[str] = queue.Queue()
    server = subprocess.Popen([*SECURECHAT, "serve", "--listen", "127.0.0.2", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert server.stdout is not None and server.stderr is not None
    threading.Thread(target=lambda: [log.put(line) for line in server.stderr], daemon=True).start()  # type: ignore[union-attr]
    try:
        while "Waiting for connections" not in server.stdout.readline():
            assert server.poll() is None, "serve ended"
        ca = tmp_path / "certs" / "ca.pem"
        refused = subprocess.run([*SECURECHAT, "connect", f"127.0.0.2:{port}", "--ca", str(ca), "--nick", "amy"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=30, env=ENV, input="")
        assert refused.returncode == 1
        assert "not valid for '127.0.0.2'" in refused.stderr and "gen-certs --ip 127.0.0.2" in refused.stderr

        done = subprocess.run([*SECURECHAT, "gen-certs", "--ip", "127.0.0.2"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=ENV)
        assert done.returncode == 0, done.stderr
        reissued = time.monotonic()
        while True:
            try:
                amy = _handshake("127.0.0.2", port, ca)  # verifies the name, as connect does
                break
            except ssl.SSLCertVerificationError:
                assert time.monotonic() - reissued < WITHIN, "the server still serves the old certificate"
                time.sleep(0.1)
        amy.expect("* securechat: send your nickname")
        amy.send("amy")
        amy.expect("* welcome, amy!")
        amy.close()
        said = ""
        while "changed on disk" not in said:
            said = log.get(timeout=WITHIN)
        assert said.startswith("[SERVER] WARNING: server certificate certs/server.pem changed on disk and was "
                               "loaded, no restart needed: valid for "), said
        assert "127.0.0.2" in said and "new SHA-256 fingerprint" in said

        chat = subprocess.run([*SECURECHAT, "connect", f"127.0.0.2:{port}", "--ca", str(ca), "--nick", "bea"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=30, env=ENV, input="hello\n")
        assert chat.returncode == 0, chat.stderr
        assert "* welcome, bea!" in chat.stdout
        assert "a running server loads it within seconds" in refused.stderr  # and the hint says so
    finally:
        server.terminate()
        server.communicate(timeout=30)
