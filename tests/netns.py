"""A LAN of its own for a test: two network namespaces joined by a veth pair, so multicast never leaves.

``Lan`` makes a "server" and a "client" namespace (``ip netns``), each with loopback up and one end of
a veth pair carrying a private address; commands run inside with ``ip netns exec``. Deleting the
namespaces deletes the link. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): :func:`unavailable` says why
not, for a skip.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from securechat.wire import dnssd

SECURECHAT = [sys.executable, "-m", "securechat"]
REPO = Path(__file__).resolve().parent.parent


def unavailable() -> str | None:
    """Why this machine cannot make network namespaces for a test, or None if it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces (ip netns) needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Lan:
    """Two namespaces on one link: ``server`` at :attr:`SERVER_IP`, ``client`` at :attr:`CLIENT_IP`."""

    SERVER_IP = "10.77.0.1"
    CLIENT_IP = "10.77.0.2"

    def __init__(self) -> None:
        tag = f"securechat-{os.getpid()}-{secrets.token_hex(3)}"
        self.server, self.client = f"{tag}-s", f"{tag}-c"
        self.made: list[str] = []
        self.processes: list[Process] = []
        try:
            for ns in (self.server, self.client):
                _ip("netns", "add", ns)
                self.made.append(ns)
            # Created directly inside the namespaces: no interface ever appears on the host's side.
            _ip("link", "add", "lan0", "netns", self.server, "type", "veth", "peer", "name", "lan0", "netns",
                self.client)
            for ns, address in ((self.server, self.SERVER_IP), (self.client, self.CLIENT_IP)):
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "lan0")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", "lan0", "up")
        except BaseException:
            self.close()
            raise

    def argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def start(self, ns: str, argv: list[str], *, cwd: Path, environment: dict[str, str], log: Path) -> Process:
        """A long-running command in namespace ``ns``, stopped by :meth:`close` if the test did not."""
        process = Process(self.argv(ns, *argv), cwd=cwd, environment=environment, log=log)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:  # a process left inside would keep its namespace alive
            process.stop()
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        self.made = []


def env(config: Path | None = None, *, discovery: bool = True) -> dict[str, str]:
    """The environment of a command in a namespace: discovery switched back on (the suite's conftest
    switches it off for everything else), its own configuration directory."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", dnssd.ENV_SWITCH: "on" if discovery else "off"}
    environment["PYTHONPATH"] = str(REPO)  # for `python -m tests.dnssd_rogue`
    if config is not None:
        environment["XDG_CONFIG_HOME"] = str(config)
    return environment


class Process:
    """A long-running command in a namespace: stdout lines in a queue, stderr in a file."""

    def __init__(self, argv: list[str], *, cwd: Path, environment: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "a")  # closed in stop()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._out: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.put(line.rstrip("\n"))
        self._out.put(None)

    def wait_out(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._out.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{prefix!r} never printed, it exited; got {self.lines!r}; "
                                     f"stderr: {self.log_path.read_text()!r}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"{prefix!r} never printed; got {self.lines!r}; stderr: {self.log_path.read_text()!r}")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit status (killed if it does not stop); again, the same status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait(5)
        self._log.close()
        return status

    @property
    def stderr(self) -> str:
        return self.log_path.read_text()


def mdns_sockets(pid: int) -> int:
    """How many UDP sockets of process ``pid`` are bound to the mDNS port, 5353 (read from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("udp", "udp6"):
        rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for row in rows:
            fields = row.split()
            if fields[1].rsplit(":", 1)[1] == f"{5353:04X}" and fields[9] in inodes:
                count += 1
    return count
