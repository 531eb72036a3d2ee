"""A real redis-server for tests: started on a free loopback port, restartable, killable; and a Sentinel group.

Tests that need one use the ``redis_server`` fixture (import it from here); they skip with a clear
reason when ``redis-server`` is not installed (Debian package ``redis-server``; ``.ci/run`` installs
it) or when the tests lack redis-py (``pip install -e '.[redis,test]'``).

``redis_sentinel`` starts a primary, a replica (replicating through a relay the test can cut,
``tests/netcut.py``) and one ``redis-sentinel`` (Debian package
``redis-sentinel``) watching them with quorum 1: on loopback there is no network to split the
Sentinels from Redis or from each other, so one judge is enough to test failover; a deployment runs
three on separate machines with quorum 2. Its timeouts are short (the primary is down after
DOWN_AFTER_MS without an answer) so that a failover takes a second or two, not half a minute.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from tests.netcut import CutRelay

REDIS_SERVER = shutil.which("redis-server")
REDIS_SENTINEL = shutil.which("redis-sentinel")

# The Sentinel group's name, and its timeouts: 500 ms without an answer and the primary is down (a
# loaded test machine still answers a PING well within that); a failover that stalls is retried after
# 3 s. Promotion itself takes about a second more (Sentinel polls the new primary's INFO every second).
MASTER = "chat"
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000

# redis-server starts in milliseconds; a loaded CI machine may take a few seconds.
START_TIMEOUT = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1, with its data (AOF, fsync always) in ``directory``.

    ``restart()`` keeps the port and the data, as an operator's restart does.
    """

    def __init__(self, directory: Path, *, password: str | None = None, tls: trustme.LeafCert | None = None,
                 ca: trustme.CA | None = None, persistent: bool = True, replica_of: int | None = None) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls
        self.persistent = persistent
        self.replica_of = replica_of  # the port it replicates from
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"
        if tls is not None:
            assert ca is not None
            tls.private_key_pem.write_to_path(str(directory / "redis.key"))
            tls.cert_chain_pems[0].write_to_path(str(directory / "redis.pem"))
            ca.cert_pem.write_to_path(str(directory / "ca.pem"))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def ca_file(self) -> str | None:
        return str(self.directory / "ca.pem") if self.tls else None

    def _args(self) -> list[str]:
        assert REDIS_SERVER is not None
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                "--logfile", str(self.log), "--daemonize", "no"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        # A replica's first sync at once (Redis waits 5 s by default for others to share the transfer).
        args += ["--repl-diskless-sync-delay", "0"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.directory / "redis.pem"),
                     "--tls-key-file", str(self.directory / "redis.key"), "--tls-ca-cert-file",
                     str(self.directory / "ca.pem"), "--tls-auth-clients", "no", "--tls-replication", "yes"]
        else:
            args += ["--port", str(self.port)]
        return args

    def start(self) -> None:
        """Start and wait until it accepts connections; pytest.skip if this build has no TLS."""
        self.log.write_text("")
        self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "Ready to accept connections" in text:
                return
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace") + text
                if self.tls and ("tls" in err.lower() or "ssl" in err.lower()):
                    pytest.skip(f"this redis-server has no TLS support: {err.strip()[-200:]}")
                raise RuntimeError(f"redis-server did not start: {err.strip()[-500:]}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not ready within {START_TIMEOUT} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: a clean shutdown; SIGKILL: a crash) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, sig: int = signal.SIGKILL, down_for: float = 0.0) -> None:
        """Stop it, stay down ``down_for`` seconds, start it again on the same port with its data."""
        self.stop(sig)
        time.sleep(down_for)
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``redis_server(password=..., tls=..., ca=..., persistent=...)`` starts a real redis-server on loopback."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    pytest.importorskip("redis", reason="redis-py is not installed (pip install -e '.[redis,test]')")
    servers: list[RedisServer] = []

    def start(**options: object) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, **options)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


class SentinelGroup:
    """A primary, a replica and one Sentinel watching them, all on loopback (see the module's docstring)."""

    def __init__(self, primary: RedisServer, replica: RedisServer, link: CutRelay, directory: Path) -> None:
        self.primary = primary
        self.replica = replica
        self.link = link  # replication goes through it: cut it, and the replica falls behind
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "sentinel.log"

    @property
    def url(self) -> str:
        """``redis+sentinel://`` (``rediss+sentinel://``) with the password, naming this one Sentinel."""
        auth = f":{self.primary.password}@" if self.primary.password else ""
        return f"{'rediss' if self.primary.tls else 'redis'}+sentinel://{auth}127.0.0.1:{self.port}/{MASTER}"

    def start(self) -> None:
        """Start the Sentinel and wait until it knows the primary and its replica."""
        assert REDIS_SENTINEL is not None
        primary = self.primary
        lines = ["bind 127.0.0.1", f"dir {self.directory}", f"logfile {self.log}",
                 f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 1",
                 f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}"]
        if primary.password:  # the same password for the Sentinel and the Redis it watches
            lines += [f"requirepass {primary.password}", f"sentinel auth-pass {MASTER} {primary.password}"]
        if primary.tls:
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {primary.directory / 'redis.pem'}",
                      f"tls-key-file {primary.directory / 'redis.key'}",
                      f"tls-ca-cert-file {primary.directory / 'ca.pem'}", "tls-auth-clients no", "tls-replication yes"]
        else:
            lines.append(f"port {self.port}")
        self.wait_synced()
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([REDIS_SENTINEL, str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_for(lambda text: f"+slave slave 127.0.0.1:{self.replica.port}" in text, "know the replica")

    def wait_synced(self) -> None:
        """Wait until the replica has the primary's data and follows it (so the Sentinel sees it at once)."""
        import redis

        options = {"ssl_ca_certs": self.replica.ca_file} if self.replica.tls else {}
        client = redis.Redis.from_url(self.replica.url, decode_responses=True, **options)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while client.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica did not sync with the primary"
                time.sleep(0.02)
        finally:
            client.close()

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the Sentinel's log says ``what``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and predicate(self.log.read_text(errors="replace")):
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-sentinel exited: {self.log.read_text(errors='replace')[-500:]}")
            time.sleep(0.02)
        raise RuntimeError(f"the Sentinel did not {what} within {timeout} s: {self.log.read_text()[-800:]}")

    def wait_failover(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the Sentinel has made the replica the primary; return when it did (time.monotonic())."""
        self.wait_for(lambda text: f"+switch-master {MASTER} " in text, "promote the replica", timeout)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self.link.close()


@pytest.fixture
def redis_sentinel(redis_server: Callable[..., RedisServer], tmp_path: Path) -> Iterator[Callable[..., SentinelGroup]]:
    """``redis_sentinel(password=..., tls=..., ca=...)``: a primary, its replica and a Sentinel, on loopback."""
    if REDIS_SENTINEL is None:
        pytest.skip("redis-sentinel is not installed (Debian package redis-sentinel; .ci/run installs it)")
    groups: list[SentinelGroup] = []

    def start(**options: object) -> SentinelGroup:
        primary = redis_server(**options)
        link = CutRelay(primary.port)
        replica = redis_server(**options, replica_of=link.port)
        directory = tmp_path / f"sentinel{len(groups)}"
        directory.mkdir()
        group = SentinelGroup(primary, replica, link, directory)
        groups.append(group)
        group.start()
        return group

    yield start
    for group in groups:
        group.stop()
