"""``securechat serve`` as a subprocess for tests: the real command in its own directory, where it mints its
certificates on first run as a user's would be; its banner read line by line, its log in a file."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import LOOPBACK


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Server:
    """``securechat serve`` in ``home`` (certificates minted there on first run); stderr is its log file."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = home / "serve.log"
        self._log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "serve", "--listen", LOOPBACK, "--port", str(self.port),
             "--data", str(home / "data"), "-v", *args],
            cwd=home, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env())
        self.out: queue.Queue[str] = queue.Queue()
        self.printed: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_out("[SERVER] Waiting for connections")

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "ca.pem"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))

    def wait_out(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.1)
            except queue.Empty:
                continue
            self.printed.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"{prefix!r} never printed; got {self.printed!r}")

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never logged; log: {self.log_path.read_text()[-3000:]!r}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "securechat", *args], cwd=self.home, capture_output=True,
                              text=True, timeout=30, env=env())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
