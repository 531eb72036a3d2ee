#!/usr/bin/env python3
"""Load generator for securechat, compared against ``ncat --chat --ssl`` in the same run.

Starts each server itself as a subprocess on a free 127.0.0.1 port, with the same throwaway ECDSA
P-256 certificate (minted with trustme unless --cert/--key/--ca are given), runs the same load
against each, stops it, and prints a table (or JSON with --json).

Modes (defaults in brackets; every option can override them):

* ``throughput``: N clients [100], S of them [10] send M lines each [200] flat out; delivered
  lines/s, loss, order violations, duplicates, latency.
* ``latency``: N [20] clients, S [4] senders at --rate [10] lines/s each for M [100] lines.
* ``hold``: N [10000] idle clients held at once; the server's RSS and thread count (and its CPU for
  connecting them), then one sender sends M [5] lines 0.5 s apart and the time for each line to reach
  all N-1 others is reported. Its clients are "light" by default (``--client``, below).
* ``handshakes``: full TLS handshakes per second for --duration seconds [5] with --concurrency
  [4] in flight, next to ``openssl s_time -new`` against the same server.
* ``web``: the ``hold`` load against one securechat server twice in one run, N [1000] WebSocket clients
  (the browser front door: TLS with ALPN ``http/1.1``, the upgrade at ``/ws``, one line per text message)
  beside N line clients: RSS and threads held, then the time for one line to reach all.
* ``cluster``: one securechat server alone, then 1, 2 and 3 servers (--cluster-sizes) sharing their
  rooms through one redis-server (``serve --redis``), N [100] clients spread round-robin over them,
  S [10] senders x M [200] lines flat out; then a light load (4 senders at 10 lines/s) for the
  latency of a line that crosses servers. Needs ``redis-server`` and redis-py. ``--sentinel``: through
  a primary, a replica and a Sentinel instead (``serve --redis redis+sentinel://``; the servers read
  from the replica), which needs ``redis-sentinel``. Pinned (see below), the generator has CPU 0,
  Redis (with its replica and Sentinel) the next CPU, and each server one of the CPUs after, round
  robin; with fewer CPUs than that, Redis and the servers share the CPU after the generator's.
* ``files``: a --file-mib [256] MiB file up (``securechat send``) and down (``securechat get``), each
  process timed from its start, next to the same bytes through ``ncat --ssl``; two chat clients trade a
  line every 10 ms meanwhile (lost lines, latency). See scripts/bench_files.py.

Every relayed line carries ``~B|sender|seq|send_ns|``, so each receiver checks loss, order and
duplicates per sender, and latency is receive time minus send time (one clock, one process).

The generator is one asyncio process (stdlib only). On a machine with two or more cores it pins
itself to CPU 0 and the server under test to CPU 1 (--no-pin to let the scheduler decide), so the
generator and the server do not steal each other's core and both servers get exactly the same
CPU. The generator's and the server's CPU seconds are reported, to show which side was the limit.

Clients (``--client``): ``asyncio`` uses asyncio's TLS transports (the default for every mode but
hold, and what the earlier figures used); ``light`` drives each client's non-blocking
``ssl.SSLSocket`` straight from the event loop's selector (``add_reader``). asyncio's TLS costs each
connection a 256 KiB buffer and several times the CPU per record (CPython #109534): at 10,000
clients on one core it would measure the generator, not the server, so hold uses ``light``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import compileall
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_files  # the files mode (beside this script)

LOOPBACK = "127.0.0.1"
MARK = b"~B|"
CLK_TCK = os.sysconf("SC_CLK_TCK")

MODE_DEFAULTS = {
    #              clients senders lines  rate
    "throughput": (100, 10, 200, 0.0),
    "latency": (20, 4, 100, 10.0),
    "hold": (10000, 1, 5, 2.0),
    "handshakes": (0, 0, 0, 0.0),
    "cluster": (100, 10, 200, 0.0),
    "web": (1000, 1, 5, 2.0),
    "files": (0, 0, 0, 0.0),
}

# ncat's broker loop uses select() (FD_SETSIZE 1024); here it resets connections from ~1000 clients.
NCAT_MAX_CLIENTS = 900


# -- environment -------------------------------------------------------------------------------


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (inherited by the servers we start); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def make_certs(directory: Path) -> dict[str, str]:
    """A throwaway CA and an ECDSA P-256 server certificate for localhost/127.0.0.1."""
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", key_type=trustme.KeyType.ECDSA)
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    paths["key"].chmod(0o600)  # securechat serve refuses a key others can read
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(paths["cert"]), append=i > 0)
    return {k: str(v) for k, v in paths.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, float]:
    """RSS, peak RSS (MiB) and threads of a process, from /proc/PID/status."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
                elif key == "Threads":
                    out[key] = int(value)
    except OSError:
        pass
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 15.0) -> None:
    """Wait until ``port`` is in LISTEN state (read from /proc, so no connection is made)."""
    hexport = ":%04X" % port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{name} exited: {stderr}")
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if parts[1].endswith(hexport) and parts[3] == "0A":
                    return
        time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on {port} after {timeout}s")


# -- servers under test ------------------------------------------------------------------------


class Adapter:
    """What differs between the servers: how to start one, and when a new client is in."""

    name = "?"

    def command(self, port: int, certs: dict[str, str], max_clients: int) -> list[str]:
        raise NotImplementedError

    def on_login_line(self, client: BenchClient, line: bytes) -> bool:
        """Handle a line received before the client is in; True once it is."""
        raise NotImplementedError


class SecurechatAdapter(Adapter):
    """Greeting, then the nick as first line, accepted with ``* welcome, NICK!``."""

    name = "securechat"

    def command(self, port: int, certs: dict[str, str], max_clients: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "securechat",
            "serve",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--cert",
            certs["cert"],
            "--key",
            certs["key"],
            "--flood-rate",
            "0",
            "--max-clients",
            str(max(max_clients, 1000)),
            "--login-timeout",
            "300",
            # History stays on (the default), in a throwaway directory beside the certificates.
            "--data",
            str(Path(certs["cert"]).parent / "history"),
        ]

    def on_login_line(self, client: BenchClient, line: bytes) -> bool:
        if line.startswith(b"* securechat: send your nickname"):
            write_line(client, b"b%d\n" % client.idx)
        elif line.startswith(b"* welcome, "):
            return True
        elif line.startswith(b"* nickname refused") or line.startswith(b"* server full"):
            raise RuntimeError(f"client {client.idx}: {line.decode(errors='replace')}")
        return False


class NcatAdapter(Adapter):
    """No handshake: the first line, ``<announce> ... is connected as <userN>.``, means it is in.

    ncat prefixes ``<userN> `` to each *read* it relays, not to each line, so lines are recognised
    by their embedded marker, not by a prefix.
    """

    name = "ncat"

    def command(self, port: int, certs: dict[str, str], max_clients: int) -> list[str]:
        return [
            "ncat",
            "--chat",
            "--ssl",
            "--ssl-cert",
            certs["cert"],
            "--ssl-key",
            certs["key"],
            "--max-conns",
            str(max_clients + 16),
            "-l",
            LOOPBACK,
            str(port),
        ]

    def on_login_line(self, client: BenchClient, line: bytes) -> bool:
        return b"is connected as" in line


class FilesAdapter(SecurechatAdapter):
    """securechat serve taking the files mode's big file (no size limit in the way, no quota)."""

    def command(self, port: int, certs: dict[str, str], max_clients: int) -> list[str]:
        return [*super().command(port, certs, max_clients), "--max-file-size", "1G", "--files-quota", "0"]


class SecurechatWebAdapter(SecurechatAdapter):
    """The same server, its clients over WebSockets (:class:`WebBenchClient`)."""

    name = "securechat-web"
    web = True


ADAPTERS = {"securechat": SecurechatAdapter, "ncat": NcatAdapter, "securechat-web": SecurechatWebAdapter}


class Server:
    def __init__(
        self,
        adapter: Adapter,
        certs: dict[str, str],
        max_clients: int,
        cpu: int | None,
        server_env: list[str] = (),
    ) -> None:
        self.adapter = adapter
        self.port = free_port()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

        def preexec() -> None:  # runs in the child: its own descriptor limit, its own core
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        env = dict(os.environ, **dict(kv.split("=", 1) for kv in server_env))
        self.proc = subprocess.Popen(
            adapter.command(self.port, certs, max_clients),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
            env=env,
        )
        self.pid = self.proc.pid

    def wait_listening(self, timeout: float = 15.0) -> None:
        wait_port(self.port, self.proc, self.adapter.name, timeout)

    def status(self) -> dict[str, float]:
        return proc_status(self.pid)

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stderr.close()


# -- clients -----------------------------------------------------------------------------------


@dataclass
class Run:
    """Counters shared by every client of one run against one server."""

    senders: int
    lines: int
    per_line: bool = False
    delivered: int = 0
    duplicates: int = 0
    order_violations: int = 0
    other_lines: int = 0
    bad_lines: int = 0
    bytes_in: int = 0
    last_rx_ns: int = 0
    last_delivery_ns: int = 0
    lost_connections: int = 0
    latencies: list[int] = field(default_factory=list)
    servers: int = 1  # cluster mode: clients (and senders) are spread round-robin over this many servers
    cross: list[int] = field(default_factory=list)  # latencies of lines that crossed servers
    line_max: dict[tuple[int, int], int] = field(default_factory=dict)
    stopping: bool = False


class BenchClient(asyncio.Protocol):
    def __init__(self, run: Run, adapter: Adapter, idx: int, ready: asyncio.Future) -> None:
        self.run = run
        self.adapter = adapter
        self.idx = idx
        self.server_idx = idx % run.servers  # which server it is connected to (cluster mode)
        self.ready = ready
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = b""
        self.logged_in = False
        self.last = [-1] * run.senders
        self.seen = [bytearray(run.lines) for _ in range(run.senders)]
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.run.stopping:
            self.run.lost_connections += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"client {self.idx}: connection lost ({exc})"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        run = self.run
        run.bytes_in += len(data)
        run.last_rx_ns = now
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        if not self.logged_in:
            while lines:
                line = lines.pop(0)
                try:
                    if self.adapter.on_login_line(self, line):
                        self.logged_in = True
                        if not self.ready.done():
                            self.ready.set_result(now)
                        break
                except RuntimeError as exc:
                    if not self.ready.done():
                        self.ready.set_exception(exc)
                    return
        last, seen, lat = self.last, self.seen, run.latencies
        delivered = 0
        for line in lines:
            i = line.find(MARK)
            if i < 0:
                run.other_lines += 1
                continue
            try:
                sid_b, seq_b, t_b, _ = line[i + 3 :].split(b"|", 3)
                sid, seq, t = int(sid_b), int(seq_b), int(t_b)
                seen_s = seen[sid]
                if seen_s[seq]:
                    run.duplicates += 1
                    continue
            except (ValueError, IndexError):
                run.bad_lines += 1
                continue
            seen_s[seq] = 1
            if seq < last[sid]:
                run.order_violations += 1
            else:
                last[sid] = seq
            delivered += 1
            lat.append(now - t)
            if sid % run.servers != self.server_idx:
                run.cross.append(now - t)
            if run.per_line:
                key = (sid, seq)
                if run.line_max.get(key, 0) < now - t:
                    run.line_max[key] = now - t
        if delivered:
            run.delivered += delivered
            run.last_delivery_ns = now


class WebBenchClient(BenchClient):
    """A :class:`BenchClient` over a WebSocket, as the browser page speaks: the upgrade at ``/ws`` with the
    page's Origin, then each text message one line, masked by wsproto's frame writer as a browser's are.
    The server's frames are read by hand (unmasked, unfragmented): wsproto's Python parser would make the
    generator, not the server, the bottleneck of a thousand clients receiving one line at once."""

    def __init__(self, run: Run, adapter: Adapter, idx: int, ready: asyncio.Future) -> None:
        from wsproto.frame_protocol import FrameProtocol

        super().__init__(run, adapter, idx, ready)
        self.framer = FrameProtocol(True, [])
        self.key = base64.b64encode(os.urandom(16))
        self.head = b""  # the upgrade's answer, until its blank line
        self.frames = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\nOrigin: https://localhost\r\n\r\n"
                             % self.key)

    def write_line(self, data: bytes) -> None:
        self.transport.write(bytes(self.framer.send_data(data.rstrip(b"\n").decode())))

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            from wsproto.utilities import generate_accept_token

            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.head = None
            if not head.startswith(b"HTTP/1.1 101 ") or generate_accept_token(self.key) not in head:
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"client {self.idx}: upgrade refused: {head[:80]!r}"))
                return
        buf = self.frames + data
        lines = []
        at = 0
        while len(buf) - at >= 2:
            opcode, size = buf[at] & 0x0F, buf[at + 1] & 0x7F
            head = 2
            if size == 126:
                if len(buf) - at < 4:
                    break
                size, head = int.from_bytes(buf[at + 2:at + 4], "big"), 4
            elif size == 127:
                if len(buf) - at < 10:
                    break
                size, head = int.from_bytes(buf[at + 2:at + 10], "big"), 10
            if len(buf) - at < head + size:
                break
            if opcode == 1:
                lines.append(buf[at + head:at + head + size] + b"\n")
            elif opcode == 8 and not self.ready.done():
                self.ready.set_exception(ConnectionError(f"client {self.idx}: closed: {buf[at + head:][:size]!r}"))
            at += head + size
        self.frames = buf[at:]
        if lines:
            super().data_received(b"".join(lines))


def write_line(client: BenchClient, data: bytes) -> None:
    """One line from ``client``, framed as its transport wants."""
    frame = getattr(client, "write_line", None)
    if frame is not None:
        frame(data)
    else:
        client.transport.write(data)


class LightTransport:
    """A client's non-blocking ``ssl.SSLSocket`` driven by the event loop's selector (``--client light``).

    What BenchClient uses of an asyncio transport: ``write`` and ``abort``; ``data_received`` and
    ``connection_lost`` are called on its protocol, as asyncio would.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, proto: BenchClient) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.proto = proto
        self.out = b""
        self.closed = False
        loop.add_reader(self.fd, self._readable)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        self.out = data
        self._writable()

    def _writable(self) -> None:
        try:
            while self.out:
                n = self.sock.send(self.out)
                self.out = self.out[n:]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            pass
        except OSError as exc:
            self._lost(exc)
            return
        if self.out:
            self.loop.add_writer(self.fd, self._writable)
        else:
            self.loop.remove_writer(self.fd)

    def _readable(self) -> None:
        sock = self.sock
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    self._lost(None)
                    return
                self.proto.data_received(data)
                if not sock.pending():
                    break
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        self.abort()
        self.proto.connection_lost(exc)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.sock.close()


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writing: bool) -> None:
    ready = loop.create_future()
    (loop.add_writer if writing else loop.add_reader)(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        (loop.remove_writer if writing else loop.remove_reader)(fd)


async def connect_light(loop: asyncio.AbstractEventLoop, ctx: ssl.SSLContext, port: int,
                        proto: BenchClient) -> None:
    """Connect, handshake (non-blocking) and hand the socket to a LightTransport."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setblocking(False)
    try:
        await loop.sock_connect(raw, (LOOPBACK, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _wait_fd(loop, sock.fileno(), False)
            except ssl.SSLWantWriteError:
                await _wait_fd(loop, sock.fileno(), True)
    except BaseException:
        sock.close()
        raise
    proto.connection_made(LightTransport(loop, sock, proto))  # type: ignore[arg-type]


async def connect_all(
    run: Run, adapter: Adapter, port: int | list[int], ctx: ssl.SSLContext, n: int, concurrency: int,
    timeout: float, light: bool = False,
) -> tuple[list[BenchClient], list[float], float]:
    """Open ``n`` clients (``concurrency`` at a time) and log each in; per-client seconds and the total.

    With a list of ports, client i connects to ``port[i % len(port)]`` (cluster mode).
    """
    ports = [port] if isinstance(port, int) else port
    loop = asyncio.get_running_loop()
    kind = WebBenchClient if getattr(adapter, "web", False) else BenchClient
    sem = asyncio.Semaphore(concurrency)
    clients: list[BenchClient] = []
    times: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter_ns()
            ready = loop.create_future()
            if light:
                proto = kind(run, adapter, i, ready)
                await asyncio.wait_for(connect_light(loop, ctx, ports[i % len(ports)], proto), 60)
            else:
                _, proto = await loop.create_connection(
                    lambda: kind(run, adapter, i, ready),
                    LOOPBACK,
                    ports[i % len(ports)],
                    ssl=ctx,
                    server_hostname="localhost",
                    ssl_handshake_timeout=60,
                )
            t1 = await asyncio.wait_for(ready, timeout)
            clients.append(proto)
            times.append((t1 - t0) / 1e9)

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
    total = time.perf_counter() - t0
    clients.sort(key=lambda c: c.idx)
    return clients, times, total


async def wait_quiet(run: Run, quiet: float, timeout: float) -> float:
    """Wait until nothing has been received for ``quiet`` seconds (join notices settling)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        await asyncio.sleep(quiet / 3)
        if time.perf_counter_ns() - run.last_rx_ns > quiet * 1e9:
            break
    return time.perf_counter() - t0


async def send_lines(
    client: BenchClient, sid: int, lines: int, rate: float, start: float, stagger: float, pad: bytes
) -> None:
    """Send ``lines`` marked lines, flat out (yielding every 16) or at ``rate`` lines/s."""
    write = getattr(client, "write_line", None) or client.transport.write
    clock = time.perf_counter_ns
    if rate <= 0:
        for seq in range(lines):
            write(b"%s~B|%d|%d|%d|\n" % (pad, sid, seq, clock()))
            if seq % 16 == 15:
                await asyncio.sleep(0)
                if not client.can_write.is_set():
                    await client.can_write.wait()
        return
    for seq in range(lines):
        delay = start + stagger + seq / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        write(b"%s~B|%d|%d|%d|\n" % (pad, sid, seq, clock()))


def start_profiler(server: Server, path: str) -> subprocess.Popen:
    """``py-spy record`` on the server for the send phase (all threads; idle samples dropped).

    The format follows the file name: ``.svg`` a flame graph, ``.json`` speedscope, else collapsed
    stacks ("raw"), one ``stack count`` line each, for grep and sort.
    """
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(path).suffix, "raw")
    cmd = [
        "py-spy",
        "record",
        "--pid",
        str(server.pid),
        "--rate",
        "250",
        "--format",
        fmt,
        "--output",
        path,
        "--nonblocking",
    ]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen([py_spy, *cmd[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy needs a moment to attach
    return proc


def stop_profiler(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run_load(server: Server, certs: dict[str, str], args: argparse.Namespace, n: int) -> dict:
    """Connect ``n`` clients, send, drain, and measure; the result row for one server."""
    adapter = server.adapter
    senders = min(args.senders, n)
    spread = len(server.port) if isinstance(server.port, list) else 1
    run = Run(senders=max(senders, 1), lines=max(args.lines, 1), per_line=args.mode in ("hold", "web"),
              servers=spread)
    ctx = ssl.create_default_context(cafile=certs["ca"])
    if getattr(adapter, "web", False):
        ctx.set_alpn_protocols(["http/1.1"])  # what a browser offers: the server's route to HTTPS
    res: dict = {
        "server": adapter.name,
        "clients": n,
        "senders": senders,
        "lines_per_sender": args.lines,
        "rate": args.rate,
    }
    base = server.status()
    res["rss_idle_mib"] = round(base.get("VmRSS", 0), 1)
    res["client"] = args.client
    cpu_srv0, cpu_gen0 = server.cpu(), self_cpu()
    clients, times, total = await connect_all(
        run, adapter, server.port, ctx, n, args.connect_concurrency, args.connect_timeout, args.client == "light"
    )
    res["connect_server_cpu_s"] = round(server.cpu() - cpu_srv0, 2)
    res["connect_gen_cpu_s"] = round(self_cpu() - cpu_gen0, 2)
    times.sort()
    res["connect_total_s"] = round(total, 3)
    res["connect_per_s"] = round(n / total, 1) if total else None
    res["connect_p50_ms"] = round(pct(times, 50) * 1e3, 2)
    res["connect_p99_ms"] = round(pct(times, 99) * 1e3, 2)
    res["settle_s"] = round(await wait_quiet(run, 0.5, args.settle_timeout), 2)
    st = server.status()
    res["rss_connected_mib"] = round(st.get("VmRSS", 0), 1)
    res["threads_connected"] = int(st.get("Threads", 0))
    res["notice_lines"] = run.other_lines

    expected = senders * args.lines * (n - 1)
    pad = b"x" * max(0, args.size - 40)
    profiler = start_profiler(server, args.profile) if args.profile and adapter.name == "securechat" else None
    run.bytes_in = 0
    cpu_srv0, cpu_gen0 = server.cpu(), self_cpu()
    start = time.perf_counter()
    t_start_ns = time.perf_counter_ns()
    gap = 1.0 / (args.rate * senders) if args.rate > 0 else 0.0
    await asyncio.gather(
        *(send_lines(clients[i], i, args.lines, args.rate, start, i * gap, pad) for i in range(senders))
    )
    t_sent_ns = time.perf_counter_ns()
    # Drain: until everything arrived, or nothing new for --idle-timeout seconds.
    deadline = time.perf_counter() + args.drain_timeout
    while run.delivered + run.duplicates < expected and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
        if time.perf_counter_ns() - max(run.last_rx_ns, t_sent_ns) > args.idle_timeout * 1e9:
            break
    cpu_srv, cpu_gen = server.cpu() - cpu_srv0, self_cpu() - cpu_gen0
    if profiler is not None:
        stop_profiler(profiler)
    end_ns = run.last_delivery_ns or time.perf_counter_ns()
    elapsed = max(end_ns - t_start_ns, 1) / 1e9
    st = server.status()
    lat = sorted(run.latencies)
    res.update(
        expected=expected,
        delivered=run.delivered,
        lost=expected - run.delivered,
        loss_pct=round(100 * (expected - run.delivered) / expected, 3) if expected else 0.0,
        order_violations=run.order_violations,
        duplicates=run.duplicates,
        bad_lines=run.bad_lines,
        lost_connections=run.lost_connections,
        send_s=round((t_sent_ns - t_start_ns) / 1e9, 3),
        elapsed_s=round(elapsed, 3),
        lines_per_s=round(run.delivered / elapsed, 1),
        mib_per_s=round(run.bytes_in / elapsed / 2**20, 2),
        lat_p50_ms=round(pct(lat, 50) / 1e6, 2),
        lat_p99_ms=round(pct(lat, 99) / 1e6, 2),
        lat_max_ms=round(lat[-1] / 1e6, 2) if lat else None,
        server_cpu_s=round(cpu_srv, 2),
        gen_cpu_s=round(cpu_gen, 2),
        rss_end_mib=round(st.get("VmRSS", 0), 1),
        rss_peak_mib=round(st.get("VmHWM", 0), 1),
        threads_end=int(st.get("Threads", 0)),
    )
    if spread > 1:
        cross = sorted(run.cross)
        res["cross_lines"] = len(cross)
        res["cross_p50_ms"] = round(pct(cross, 50) / 1e6, 2)
        res["cross_p99_ms"] = round(pct(cross, 99) / 1e6, 2)
        res["cross_max_ms"] = round(cross[-1] / 1e6, 2) if cross else None
    if run.per_line:
        per_line = sorted(run.line_max.values())
        res["reach_all_max_ms"] = round(per_line[-1] / 1e6, 2) if per_line else None
        res["reach_all_p50_ms"] = round(pct(per_line, 50) / 1e6, 2) if per_line else None
    run.stopping = True
    for c in clients:
        c.transport.abort()
    await asyncio.sleep(0.2)
    return res


async def run_handshakes(server: Server, certs: dict[str, str], args: argparse.Namespace) -> dict:
    """Full handshakes (TCP connect + TLS 1.3 handshake + close) per second, ``concurrency`` in flight."""
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(cafile=certs["ca"])
    done = 0
    failed = 0
    stop_at = time.perf_counter() + args.duration

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < stop_at and server.proc.poll() is None:
            try:
                transport, _ = await loop.create_connection(
                    asyncio.Protocol,
                    LOOPBACK,
                    server.port,
                    ssl=ctx,
                    server_hostname="localhost",
                    ssl_handshake_timeout=10,
                )
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                failed += 1
                continue
            done += 1
            # A clean close: ncat --chat quits altogether ("getpeername ... failed. QUITTING.") when a
            # client resets its connection before ncat has looked at it.
            transport.close()

    cpu_srv0, cpu_gen0 = server.cpu(), self_cpu()
    stop_at = time.perf_counter() + args.duration
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    res = {
        "server": server.adapter.name,
        "handshakes": done,
        "failed": failed,
        "elapsed_s": round(elapsed, 2),
        "handshakes_per_s": round(done / elapsed, 1),
        "server_cpu_s": round(server.cpu() - cpu_srv0, 2),
        "gen_cpu_s": round(self_cpu() - cpu_gen0, 2),
    }
    await asyncio.sleep(0.5)  # let the server reap the closed connections
    if server.proc.poll() is not None:
        res["server_exited"] = (
            f"after {done} handshakes: {server.proc.stderr.read().decode(errors='replace')[-200:]}"
        )
    else:
        res.update(s_time(server.port, certs, args.duration, args.gen_cpu))
    st = server.status()
    res["rss_end_mib"] = round(st.get("VmRSS", 0), 1)
    res["threads_end"] = int(st.get("Threads", 0))
    return res


def s_time(port: int, certs: dict[str, str], seconds: float, cpu: int | None) -> dict:
    """``openssl s_time -new`` against the same server: the peer figure for handshakes/s."""
    if shutil.which("openssl") is None:
        return {}
    cmd = [
        "openssl",
        "s_time",
        "-connect",
        f"{LOOPBACK}:{port}",
        "-new",
        "-time",
        str(max(1, int(seconds))),
        "-CAfile",
        certs["ca"],
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + 15,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
        )
    except subprocess.TimeoutExpired:
        return {"s_time_error": "openssl s_time hung"}
    wall = time.perf_counter() - t0
    m = re.search(r"(\d+) connections in [\d.]+s", proc.stdout)
    if not m:
        return {"s_time_error": (proc.stdout + proc.stderr)[-200:]}
    count = int(m.group(1))
    return {"s_time_handshakes": count, "s_time_per_s": round(count / wall, 1)}


# -- reporting ---------------------------------------------------------------------------------

ROWS = {
    "throughput": [
        "clients",
        "senders",
        "lines_per_sender",
        "connect_total_s",
        "expected",
        "delivered",
        "lost",
        "order_violations",
        "duplicates",
        "lost_connections",
        "elapsed_s",
        "lines_per_s",
        "mib_per_s",
        "lat_p50_ms",
        "lat_p99_ms",
        "lat_max_ms",
        "server_cpu_s",
        "gen_cpu_s",
        "rss_connected_mib",
        "rss_peak_mib",
        "threads_connected",
    ],
    "latency": [
        "clients",
        "senders",
        "lines_per_sender",
        "rate",
        "connect_total_s",
        "expected",
        "delivered",
        "lost",
        "order_violations",
        "duplicates",
        "lat_p50_ms",
        "lat_p99_ms",
        "lat_max_ms",
        "server_cpu_s",
        "gen_cpu_s",
        "rss_connected_mib",
        "threads_connected",
    ],
    "hold": [
        "client",
        "clients",
        "connect_total_s",
        "connect_per_s",
        "connect_p50_ms",
        "connect_p99_ms",
        "connect_server_cpu_s",
        "connect_gen_cpu_s",
        "settle_s",
        "notice_lines",
        "rss_idle_mib",
        "rss_connected_mib",
        "rss_peak_mib",
        "threads_connected",
        "expected",
        "delivered",
        "lost",
        "order_violations",
        "reach_all_p50_ms",
        "reach_all_max_ms",
        "lat_p50_ms",
        "server_cpu_s",
        "gen_cpu_s",
        "lost_connections",
    ],
    "handshakes": [
        "handshakes",
        "failed",
        "elapsed_s",
        "handshakes_per_s",
        "s_time_per_s",
        "server_exited",
        "server_cpu_s",
        "gen_cpu_s",
        "rss_end_mib",
        "threads_end",
    ],
    "files": bench_files.ROWS,
    "cluster": [
        "servers",
        "clients",
        "senders",
        "lines_per_sender",
        "expected",
        "delivered",
        "lost",
        "order_violations",
        "duplicates",
        "lines_per_s",
        "vs_alone",
        "lat_p50_ms",
        "lat_p99_ms",
        "cross_p50_ms",
        "cross_p99_ms",
        "light_lost",
        "light_order_violations",
        "light_lat_p50_ms",
        "light_lat_p99_ms",
        "light_cross_p50_ms",
        "light_cross_p99_ms",
        "light_cross_max_ms",
        "server_cpu_s",
        "redis_cpu_s",
        "gen_cpu_s",
        "rss_connected_mib",
    ],
}
ROWS["web"] = ROWS["hold"]  # the same figures, for WebSocket clients beside line clients

# Ratio securechat/ncat, and whether bigger is better (for the arrow in the table).
HIGHER_BETTER = {"lines_per_s", "mib_per_s", "handshakes_per_s", "connect_per_s", "s_time_per_s"}


def table(mode: str, results: dict[str, dict]) -> str:
    names = list(results)
    pair = len(names) == 2 and mode != "cluster"  # the securechat/ncat (web: WebSocket/line) ratio column
    rows = [["metric", *names] + ([("web/lines" if mode == "web" else "sc/ncat")] if pair else [])]
    for key in ROWS[mode]:
        vals = [results[n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        row = [
            key,
            *(
                "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v).split(":")[0][:32]
                for v in vals
            ),
        ]
        if pair:
            a, b = vals
            ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
            row.append(
                f"{a / b:.2f}x"
                if ok and key not in ("clients", "senders", "lines_per_sender", "rate", "expected")
                else ""
            )
        rows.append(row)
        ranges = [results[n].get(key + "_range") for n in names]
        if any(ranges):
            rows.append(
                [f"  {key} min..max", *("-" if r is None else f"{r[0]:g}..{r[1]:g}" for r in ranges)]
                + ([""] if pair else [])
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append(
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )
        if j == 0:
            out.append(
                "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
            )
    return "\n".join(out)


# -- cluster mode: several servers sharing their rooms through Redis -------------------------------


class ClusterAdapter(SecurechatAdapter):
    """securechat serve with its history in a throwaway directory, and ``--redis URL`` when shared."""

    def __init__(self, data_dir: str, redis_url: str | None) -> None:
        self.data_dir = data_dir
        self.redis_url = redis_url

    def command(self, port: int, certs: dict[str, str], max_clients: int) -> list[str]:
        extra = ["--data", self.data_dir]
        if self.redis_url:
            extra += ["--redis", self.redis_url]
        return [*super().command(port, certs, max_clients), *extra]


def _pinned(cpu: int | None) -> Callable[[], None]:
    """A preexec_fn that pins the child to ``cpu`` (None: leaves it alone)."""

    def preexec() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return preexec


def _wait_listening(port: int, what: str) -> None:
    hexport = ":%04X" % port
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if any(line.split()[1].endswith(hexport) and line.split()[3] == "0A" for line in f):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


class RedisProc:
    """A throwaway redis-server on a free loopback port (AOF, fsync every second, as in production).

    ``sentinel``: also a replica of it and one redis-sentinel watching both (quorum 1, on loopback),
    and :attr:`url` is the ``redis+sentinel://`` URL; all of them on ``cpu``.
    """

    def __init__(self, directory: Path, cpu: int | None, sentinel: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("cluster mode needs redis-server (Debian package redis-server)")
        self.procs: list[subprocess.Popen] = []
        self.port = self._redis(binary, directory / "primary", cpu)
        self.pid = self.procs[0].pid
        self.sentinel_port: int | None = None
        if sentinel:
            sentinel_binary = shutil.which("redis-sentinel")
            if sentinel_binary is None:
                self.stop()
                raise RuntimeError("--sentinel needs redis-sentinel (Debian package redis-sentinel)")
            replica = self._redis(binary, directory / "replica", cpu, "--replicaof", LOOPBACK, str(self.port))
            time.sleep(0.5)  # the replica's first sync (at once: no diskless delay), before the Sentinel looks
            self.sentinel_port = free_port()
            config = directory / "sentinel.conf"
            config.write_text(f"port {self.sentinel_port}\nbind {LOOPBACK}\ndir {directory}\n"
                              f"sentinel monitor bench {LOOPBACK} {self.port} 1\n"
                              "sentinel down-after-milliseconds bench 5000\n")
            self.procs.append(subprocess.Popen([sentinel_binary, str(config)], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               preexec_fn=_pinned(cpu)))
            _wait_listening(self.sentinel_port, "redis-sentinel")
            del replica

    def _redis(self, binary: str, directory: Path, cpu: int | None, *extra: str) -> int:
        directory.mkdir()
        port = free_port()
        self.procs.append(subprocess.Popen(
            [binary, "--bind", LOOPBACK, "--port", str(port), "--dir", str(directory), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(directory / "redis.log"),
             "--repl-diskless-sync-delay", "0", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pinned(cpu)))
        try:
            _wait_listening(port, "redis-server")
        except RuntimeError:
            self.stop()
            raise
        return port

    @property
    def url(self) -> str:
        if self.sentinel_port is not None:
            return f"redis+sentinel://{LOOPBACK}:{self.sentinel_port}/bench"
        return f"redis://{LOOPBACK}:{self.port}/0"

    def cpu(self) -> float:
        """CPU seconds of every Redis process (primary, replica, Sentinel)."""
        return sum(proc_cpu(p.pid) for p in self.procs if p.poll() is None)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


class ServerGroup:
    """Several servers measured as one: ``port`` is the list clients are spread over."""

    def __init__(self, servers: list[Server], redis: RedisProc | None) -> None:
        self.servers = servers
        self.redis = redis
        self.adapter = servers[0].adapter
        self.port = [s.port for s in servers]
        self.pid = servers[0].pid

    def status(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for server in self.servers:
            for key, value in server.status().items():
                total[key] = total.get(key, 0) + value
        return total

    def cpu(self) -> float:
        return sum(s.cpu() for s in self.servers)

    def redis_cpu(self) -> float:
        return self.redis.cpu() if self.redis is not None else 0.0


def cluster_cpus(size: int, shared: bool) -> tuple[int | None, list[int | None], str]:
    """Where Redis and each of ``size`` servers run when pinned: (Redis's CPU, the servers', in words).

    The generator has the first CPU (main() pins it); Redis the next; the servers one each of the CPUs
    after, round robin. With two CPUs, Redis and every server share the second.
    """
    cpus = PIN["cpus"]
    if len(cpus) < 2:
        return None, [None] * size, "not pinned"
    rest = cpus[2:] or cpus[1:]
    redis_cpu = cpus[1] if shared else None
    servers = [rest[i % len(rest)] if shared else cpus[1] for i in range(size)]
    words = f"generator cpu {cpus[0]}" + (f"; Redis cpu {redis_cpu}" if shared else "") + \
        f"; server{'s' if size > 1 else ''} cpu {','.join(str(c) for c in servers)}"
    return redis_cpu, servers, words


# The CPUs main() pins to (empty when it does not): the generator has the first.
PIN: dict[str, list[int]] = {"cpus": []}


def run_cluster(size: int, shared: bool, certs: dict[str, str], args: argparse.Namespace,
                srv_cpu: int | None, tmp: Path, light: bool) -> dict:
    """Start ``size`` servers (sharing through a fresh Redis when ``shared``), run one load, stop."""
    phase = argparse.Namespace(**vars(args))
    if light:
        phase.senders, phase.lines, phase.rate = args.light_senders, args.light_lines, args.light_rate
    work = Path(tempfile.mkdtemp(dir=tmp))
    redis_cpu, server_cpus, pinning = cluster_cpus(size, shared)
    redis = RedisProc(work, redis_cpu, sentinel=args.sentinel) if shared else None
    servers: list[Server] = []
    try:
        for i in range(size):
            data = work / f"data{i}"
            data.mkdir()
            adapter = ClusterAdapter(str(data), redis.url if redis else None)
            servers.append(Server(adapter, certs, max(args.clients, 1), server_cpus[i], args.server_env))
        for server in servers:
            server.wait_listening()
        group = ServerGroup(servers, redis)
        redis_cpu0 = group.redis_cpu()
        res = asyncio.run(run_load(group, certs, phase, args.clients))  # type: ignore[arg-type]
        res["redis_cpu_s"] = round(group.redis_cpu() - redis_cpu0, 2) if redis else None
        res["pinning"] = pinning
        return res
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for server in servers:
            server.stop()
        if redis is not None:
            redis.stop()


def cluster_main(args: argparse.Namespace, certs: dict[str, str], srv_cpu: int | None, tmp: Path) -> dict:
    """One server alone, then each cluster size; each config: a flat-out run and a light one."""
    shared_name = "Redis+Sentinel" if args.sentinel else "Redis"
    configs = [("1 alone", 1, False)] + [(f"{k} + {shared_name}", k, True) for k in args.cluster_sizes]
    results: dict[str, dict] = {}
    for name, size, shared in configs:
        runs = [run_cluster(size, shared, certs, args, srv_cpu, tmp, light=False) for _ in range(args.repeat)]
        res = aggregate(runs)
        light = run_cluster(size, shared, certs, args, srv_cpu, tmp, light=True)
        if "error" in light:
            res.setdefault("error", "light load: " + light["error"])
        for key in ("lat_p50_ms", "lat_p99_ms", "lat_max_ms", "cross_p50_ms", "cross_p99_ms", "cross_max_ms",
                    "lost", "order_violations", "duplicates", "pinning"):
            if key in light:
                res["light_" + key] = light[key]
        res["servers"] = size
        results[name] = res
    alone = results["1 alone"].get("lines_per_s")
    for res in results.values():
        if isinstance(alone, (int, float)) and alone and isinstance(res.get("lines_per_s"), (int, float)):
            res["vs_alone"] = round(res["lines_per_s"] / alone, 2)
    return results


# -- files mode: a big file up and down (scripts/bench_files.py) --------------------------------------


def files_main(args: argparse.Namespace, certs: dict[str, str], srv_cpu: int | None, tmp: Path,
               names: list[str]) -> dict:
    """securechat and ncat alternately, --repeat times each; medians (the worst for losses)."""
    payload = bench_files.make_payload(tmp, args.file_mib)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeat):
        if "securechat" in runs:
            server = Server(FilesAdapter(), certs, 10, srv_cpu, args.server_env)
            try:
                server.wait_listening()
                runs["securechat"].append(bench_files.securechat_run(payload, certs, server, tmp))
            except Exception as exc:
                runs["securechat"].append({"server": "securechat", "error": f"{type(exc).__name__}: {exc}"})
            finally:
                server.stop()
                # What it stored goes, as ncat's received file does: the next writer recycles its pages.
                shutil.rmtree(Path(certs["cert"]).parent / "history" / "files", ignore_errors=True)
        if "ncat" in runs:
            runs["ncat"].append(bench_files.ncat_run(payload, certs, srv_cpu, tmp, wait_port, free_port))
    return {name: aggregate(rs) for name, rs in runs.items()}


def crossing_summary(results: dict[str, dict]) -> str:
    """The light-load p99 of lines that cross servers, beside one server's alone (the 2 ms goal's figures)."""
    alone = results.get("1 alone", {})
    out = [f"light load ({alone.get('pinning', '?')}): one server alone, every line: p99 "
           f"{alone.get('light_lat_p99_ms')} ms"]
    for name, res in results.items():
        if res.get("light_cross_p99_ms") is not None:
            out.append(f"  {name} ({res.get('pinning')}): crossing lines p50 {res.get('light_cross_p50_ms')} ms, "
                       f"p99 {res['light_cross_p99_ms']} ms (goal: under 2 ms)")
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", choices=list(MODE_DEFAULTS), default="throughput")
    p.add_argument("--server", choices=["securechat", "ncat", "both"], default="both")
    p.add_argument("--clients", type=int, help="connected clients (mode default)")
    p.add_argument("--senders", type=int, help="clients that send (mode default)")
    p.add_argument("--lines", type=int, help="lines each sender sends (mode default)")
    p.add_argument("--rate", type=float, help="lines/s per sender; 0 = flat out (mode default)")
    p.add_argument(
        "--size", type=int, default=48, help="approximate bytes per sent line (default: %(default)s)"
    )
    p.add_argument("--duration", type=float, default=5.0, help="handshakes mode: seconds per server")
    p.add_argument("--concurrency", type=int, default=4, help="handshakes mode: handshakes in flight")
    p.add_argument("--connect-concurrency", type=int, default=64, help="connections being opened at once")
    p.add_argument("--client", choices=["asyncio", "light"],
                   help="client transports: asyncio's TLS, or non-blocking SSLSockets on the selector "
                   "(default: light for hold and web, asyncio otherwise)")
    p.add_argument(
        "--connect-timeout", type=float, default=300.0, help="seconds allowed to connect all clients"
    )
    p.add_argument(
        "--settle-timeout", type=float, default=120.0, help="seconds allowed for join notices to settle"
    )
    p.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds allowed for delivery after sending"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=5.0, help="give up draining after this long with nothing"
    )
    p.add_argument(
        "--ncat-max-clients",
        type=int,
        default=NCAT_MAX_CLIENTS,
        help="cap on clients against ncat, whose select() loop stops at 1024 descriptors",
    )
    p.add_argument("--cert", help="server certificate chain (PEM); default: mint a throwaway ECDSA one")
    p.add_argument("--key", help="server key (PEM)")
    p.add_argument("--ca", help="CA that signed --cert")
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record the securechat server during the send phase "
        "into FILE (.svg flame graph, .json speedscope, anything else collapsed stacks)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin generator and server to separate cores")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the servers under test (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per server, alternating; medians are reported")
    p.add_argument("--cluster-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 3],
                   metavar="N,N", help="cluster mode: numbers of servers sharing through Redis (default: 1,2,3)")
    p.add_argument("--sentinel", action="store_true",
                   help="cluster mode: share through a primary, a replica and a Sentinel (needs redis-sentinel)")
    p.add_argument("--light-senders", type=int, default=4, help="cluster mode, light load: senders")
    p.add_argument("--light-lines", type=int, default=30, help="cluster mode, light load: lines each")
    p.add_argument("--light-rate", type=float, default=10.0, help="cluster mode, light load: lines/s each")
    bench_files.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    c, s, n, r = MODE_DEFAULTS[args.mode]
    args.clients = c if args.clients is None else args.clients
    args.senders = s if args.senders is None else args.senders
    args.lines = n if args.lines is None else args.lines
    args.rate = r if args.rate is None else args.rate
    if args.mode in ("hold", "web"):
        args.senders = 1
    if args.client is None:
        args.client = "light" if args.mode in ("hold", "web") else "asyncio"
    return args


def run_one(name: str, certs: dict[str, str], args: argparse.Namespace, srv_cpu: int | None) -> dict:
    """Start one server, run the mode against it, stop it."""
    adapter = ADAPTERS[name]()
    n = args.clients
    if name == "ncat" and n > args.ncat_max_clients:
        print(f"ncat: capping clients at {args.ncat_max_clients} (select() limit)", file=sys.stderr)
        n = args.ncat_max_clients
    server = Server(adapter, certs, max(n, 1), srv_cpu, args.server_env)
    try:
        server.wait_listening()
        if args.mode == "handshakes":
            return asyncio.run(run_handshakes(server, certs, args))
        return asyncio.run(run_load(server, certs, args, n))
    except Exception as exc:  # report what ran; one server failing must not hide the other
        return {"server": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        server.stop()


# Counters of wrong deliveries: the worst run is reported, not the median.
WORST = {"lost", "loss_pct", "order_violations", "duplicates", "bad_lines", "lost_connections", "failed",
         "chat_lost", "chat_max_ms"}


def aggregate(rs: list[dict]) -> dict:
    """One row from repeated runs: the median of each number (the worst for error counters)."""
    errors = [r for r in rs if "error" in r]
    if errors:
        return errors[0]
    if len(rs) == 1:
        return rs[0]
    out = dict(rs[0])
    for key, value in rs[0].items():
        vals = [r.get(key) for r in rs]
        if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in vals):
            if key in WORST:
                out[key] = max(vals)
            else:
                med = (
                    sorted(vals)[len(vals) // 2]
                    if len(vals) % 2
                    else sum(sorted(vals)[len(vals) // 2 - 1 : len(vals) // 2 + 1]) / 2
                )
                out[key] = round(med, 3) if isinstance(med, float) else med
    for key in ("lines_per_s", "handshakes_per_s", "lat_p99_ms", "lat_max_ms", "reach_all_max_ms"):
        vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key + "_range"] = [min(vals), max(vals)]
    out["runs"] = len(rs)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # As an installed package has: bytecode compiled at install time. A checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module in every `securechat` process the
    # files mode times (~80 ms each; ncat is a binary).
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "securechat"), quiet=1)
    loadavg_before = os.getloadavg()
    nofile = raise_nofile()
    names = ["securechat", "ncat"] if args.server == "both" else [args.server]
    if args.mode == "web":  # the same server, WebSocket clients beside line clients
        names = ["securechat-web", "securechat"]
    if "ncat" in names and shutil.which("ncat") is None:
        print("ncat not found on PATH: benchmarking securechat only", file=sys.stderr)
        names.remove("ncat")
    if not names:
        return 1
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    cpus = sorted(os.sched_getaffinity(0))
    gen_cpu, srv_cpu = (cpus[0], cpus[1]) if pin else (None, None)
    args.gen_cpu = gen_cpu
    if pin:
        PIN["cpus"] = cpus
        os.sched_setaffinity(0, {gen_cpu})
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="securechat-bench-") as tmp:
        if args.cert:
            certs = {"cert": args.cert, "key": args.key or args.cert, "ca": args.ca or args.cert}
        else:
            certs = make_certs(Path(tmp))
        if args.mode == "cluster":
            names = []
            results = cluster_main(args, certs, srv_cpu, Path(tmp))
        if args.mode == "files":
            results = files_main(args, certs, srv_cpu, Path(tmp), names)
            names = []
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.repeat):  # alternate the servers, so drifting background load hits both alike
            for name in names:
                runs[name].append(run_one(name, certs, args, srv_cpu))
        results.update({name: aggregate(rs) for name, rs in runs.items()})
    report = {
        "mode": args.mode,
        "loadavg_after": os.getloadavg(),
        "pinned": pin,
        "generator_cpu": gen_cpu,
        "server_cpu": srv_cpu,
        "nofile": nofile,
        "params": {k: getattr(args, k) for k in ("clients", "senders", "lines", "rate", "size")},
        "loadavg_before": loadavg_before,
        "results": results,
    }
    a, b = results.get("securechat", {}), results.get("ncat", {})
    ratios = {}
    for key in HIGHER_BETTER | {
        "lat_p50_ms",
        "lat_p99_ms",
        "lat_max_ms",
        "rss_connected_mib",
        "reach_all_max_ms",
        "up_s",
        "down_s",
    }:
        if isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float)) and b[key]:
            ratios[key] = round(a[key] / b[key], 2)
    report["ratios_securechat_over_ncat"] = ratios
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"mode={args.mode} pinned={pin} (generator cpu {gen_cpu}, server cpu {srv_cpu}) nofile={nofile} "
            f"loadavg before {loadavg_before[0]:.2f} after {os.getloadavg()[0]:.2f}"
        )
        for name, res in results.items():
            if "error" in res:
                print(f"{name}: ERROR {res['error']}")
        ok = {k: v for k, v in results.items() if "error" not in v}
        if ok:
            print(table(args.mode, ok))
        if args.mode == "cluster":
            print(crossing_summary(ok))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
