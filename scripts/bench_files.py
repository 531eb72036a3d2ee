"""``benchmark.py --mode files``: a big file up and down through securechat, next to ``ncat --ssl``, and chat meanwhile.

Same bytes, same certificate, same cores (the server side pinned to the server's core, the client
side to the generator's), in one run:

* ncat: ``ncat --ssl -l --recv-only > FILE`` and ``ncat --ssl --send-only < FILE`` (up), then
  ``ncat --ssl -l --send-only < FILE`` and ``ncat --ssl --recv-only > FILE`` (down). Timed from the
  client's start (process start included) until the receiving side has every byte. The upload's
  listener runs with ``NumTickets = 0`` (an OpenSSL setting, through ``OPENSSL_CONF``): otherwise it sends
  TLS 1.3 session tickets that the ``--send-only`` client never reads, so the client's close resets the
  connection and the last megabytes are lost (ncat then "wins" by delivering less).
* securechat: ``securechat serve`` (history on, files under a throwaway --data), then
  ``securechat send HOST FILE`` and ``securechat get HOST ID`` as processes, each timed from its start
  to its exit (login, ticket, transfer, SHA-256 checks, the room's announcement all included).
* Meanwhile two chat clients in this process trade a line every 10 ms; every line must arrive, and its
  latency (one clock) is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"
MiB = 1 << 20

# One chat line every this often during the transfers (100 lines/s: a busy room, far under the limit).
PROBE_INTERVAL = 0.01

# The probe's chat alone, before the transfers: what the machine gives without them.
IDLE_SECONDS = 1.0

# The transfer clients (ncat's and securechat's alike) run at this niceness: the chat probe shares
# their core, and stands for people on other machines, whom a transfer here would not slow down.
CLIENT_NICE = 10

ROWS = ["file_mib", "up_s", "down_s", "up_mib_per_s", "down_mib_per_s", "chat_lines", "chat_lost",
        "chat_p50_ms", "chat_p99_ms", "chat_max_ms", "idle_chat_p50_ms", "idle_chat_p99_ms", "server_cpu_s",
        "server_rss_peak_mib"]

_NO_TICKETS = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
NumTickets = 0
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file-mib", type=int, default=256, help="files mode: the file's size in MiB (default: 256)")


def _pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _client(*args: object, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """A transfer client (niced, see CLIENT_NICE), run to its end."""
    return subprocess.run(*args, check=False, timeout=600,  # type: ignore[call-overload]
                          preexec_fn=lambda: os.nice(CLIENT_NICE), **kw)


def _timed(cmd: list[str], stdout: object = subprocess.PIPE) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Run ``cmd``; (seconds from its start to its exit, the result)."""
    start = time.perf_counter()
    done = _client(cmd, stdout=stdout, stderr=subprocess.PIPE)
    return time.perf_counter() - start, done


def make_payload(directory: Path, mib: int) -> Path:
    path = directory / "payload.bin"
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return path


def recycle_pages(directory: Path, size: int) -> None:
    """Write ``size`` bytes twice and remove them: the timed transfer right after writes into recycled pages.

    On a virtual machine, memory the guest has not used lately is expensive (free pages are handed back
    to the host, and faulting them in again costs): writing 256 MiB to a new file took 0.7 s of system
    time on the project's VM with such pages, 0.05 s with pages freed a moment before. Whichever side
    happened to write after a pause (a server starting, the chat probe's idle second) paid for the
    hypervisor; so every timed transfer, ncat's and securechat's alike, starts right after this.
    """
    junk = directory / "recycle.bin"
    block = os.urandom(MiB)
    for _ in range(2):
        with open(junk, "wb") as f:
            for _ in range(max(1, size // MiB)):
                f.write(block)
        junk.unlink()


def ncat_run(payload: Path, certs: dict[str, str], srv_cpu: int | None, tmp: Path,
             wait_port: Callable[[int, subprocess.Popen[bytes], str], None], free_port: Callable[[], int]) -> dict:
    size = payload.stat().st_size
    conf = tmp / "no-tickets.cnf"
    conf.write_text(_NO_TICKETS)
    tls = ["--ssl", "--ssl-cert", certs["cert"], "--ssl-key", certs["key"]]
    res: dict = {"server": "ncat", "file_mib": size // MiB}
    # Up: the listener receives into a file.
    port, got = free_port(), tmp / "ncat-up.bin"
    with open(got, "wb") as out:
        listener = subprocess.Popen(["ncat", *tls, "-l", LOOPBACK, str(port), "--recv-only"], stdout=out,
                                    stderr=subprocess.DEVNULL, preexec_fn=_pinned(srv_cpu),
                                    env=dict(os.environ, OPENSSL_CONF=str(conf)))
        wait_port(port, listener, "ncat")
        recycle_pages(tmp, size)
        start = time.perf_counter()
        with open(payload, "rb") as src:
            _client(["ncat", "--ssl", "--send-only", LOOPBACK, str(port)], stdin=src, stderr=subprocess.DEVNULL)
        listener.wait(600)
        res["up_s"] = round(time.perf_counter() - start, 3)
    res["up_complete"] = got.stat().st_size == size
    got.unlink()
    # Down: the listener sends the file.
    port, got = free_port(), tmp / "ncat-down.bin"
    with open(payload, "rb") as src:
        listener = subprocess.Popen(["ncat", *tls, "-l", LOOPBACK, str(port), "--send-only"], stdin=src,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    preexec_fn=_pinned(srv_cpu))
        wait_port(port, listener, "ncat")
        recycle_pages(tmp, size)
        with open(got, "wb") as out:
            res["down_s"], _ = _timed(["ncat", "--ssl", "--recv-only", LOOPBACK, str(port)], stdout=out)
        listener.wait(600)
    res["down_s"] = round(res["down_s"], 3)
    res["down_complete"] = got.stat().st_size == size
    got.unlink()
    _rates(res, size)
    return res


def _rates(res: dict, size: int) -> None:
    for way in ("up", "down"):
        if res.get(f"{way}_s"):
            res[f"{way}_mib_per_s"] = round(size / MiB / res[f"{way}_s"], 1)


class ChatProbe:
    """Two chat clients: one says a timestamped line every PROBE_INTERVAL, the other times its arrival."""

    def __init__(self, port: int, ca: str) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        self.tx = self._join(ctx, port, "probe-tx")
        self.rx = self._join(ctx, port, "probe-rx")
        self.sent = 0
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]

    @staticmethod
    def _join(ctx: ssl.SSLContext, port: int, nick: str) -> ssl.SSLSocket:
        raw = socket.create_connection((LOOPBACK, port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as chat clients do: no Nagle delay
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(nick.encode() + b"\n")
        buf = b""
        while b"* welcome, " not in buf:
            buf += sock.recv(4096)
        return sock

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        next_at = time.perf_counter()
        while not self.stop.is_set():
            self.sent += 1
            self.tx.sendall(b"~P|%d|%d|\n" % (self.sent, time.perf_counter_ns()))
            next_at += PROBE_INTERVAL
            time.sleep(max(0.0, next_at - time.perf_counter()))

    def _receive(self) -> None:
        buf = b""
        self.rx.settimeout(2)
        while True:
            try:
                data = self.rx.recv(65536)
            except (TimeoutError, OSError):
                if self.stop.is_set():
                    return
                continue
            if not data:
                return
            now = time.perf_counter_ns()
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                m = re.search(rb"~P\|(\d+)\|(\d+)\|", line)
                if m:
                    self.latencies.append((now - int(m.group(2))) / 1e6)

    def mark(self) -> int:
        """How many latencies so far (the end of the idle part)."""
        return len(self.latencies)

    def finish(self, idle: int) -> dict:
        """Stop; the figures for the lines after the first ``idle`` ones, and for those (idle_...)."""
        self.stop.set()
        self.threads[0].join(5)
        deadline = time.monotonic() + 5
        while len(self.latencies) < self.sent and time.monotonic() < deadline:
            time.sleep(0.02)
        for sock in (self.tx, self.rx):
            sock.close()
        lat, quiet = sorted(self.latencies[idle:]), sorted(self.latencies[:idle])

        def pct(values: list[float], p: float) -> float:
            if not values:
                return float("nan")
            return round(values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))], 2)

        return {"chat_lines": self.sent - idle, "chat_lost": self.sent - len(self.latencies),
                "chat_p50_ms": pct(lat, 50), "chat_p99_ms": pct(lat, 99),
                "chat_max_ms": round(lat[-1], 2) if lat else None,
                "idle_chat_p50_ms": pct(quiet, 50), "idle_chat_p99_ms": pct(quiet, 99)}


def securechat_run(payload: Path, certs: dict[str, str], server: object, tmp: Path) -> dict:
    """One upload and one download through a running securechat server, with the chat probe going."""
    size = payload.stat().st_size
    port = server.port  # type: ignore[attr-defined]
    res: dict = {"server": "securechat", "file_mib": size // MiB}
    base = [sys.executable, "-m", "securechat"]
    where = f"{LOOPBACK}:{port}"
    probe = ChatProbe(port, certs["ca"])
    probe.start()
    time.sleep(IDLE_SECONDS)
    idle = probe.mark()
    cpu0 = server.cpu()  # type: ignore[attr-defined]
    recycle_pages(tmp, size)
    res["up_s"], sent = _timed([*base, "send", where, str(payload), "--ca", certs["ca"], "--nick", "up"])
    if sent.returncode != 0:
        probe.finish(idle)
        raise RuntimeError(f"securechat send: {sent.stderr.decode(errors='replace').strip()}")
    file_id = sent.stdout.decode().strip()
    out = tmp / "download"
    out.mkdir(exist_ok=True)
    recycle_pages(tmp, size)
    res["down_s"], got = _timed([*base, "get", where, file_id, "--ca", certs["ca"], "--nick", "down", "--out",
                                 str(out)])
    res.update(probe.finish(idle))
    res["server_cpu_s"] = round(server.cpu() - cpu0, 2)  # type: ignore[attr-defined]
    if got.returncode != 0:
        raise RuntimeError(f"securechat get: {got.stderr.decode(errors='replace').strip()}")
    saved = Path(got.stdout.decode().strip())
    res["down_complete"] = saved.stat().st_size == size and _sha(saved) == _sha(payload)
    saved.unlink()
    res["up_s"], res["down_s"] = round(res["up_s"], 3), round(res["down_s"], 3)
    res["server_rss_peak_mib"] = round(server.status().get("VmHWM", 0), 1)  # type: ignore[attr-defined]
    _rates(res, size)
    return res


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()
