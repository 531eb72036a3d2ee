"""A real redis-server for tests: started on a free loopback port, restartable, killable.

Tests that need one use the ``redis_server`` fixture (import it from here); they skip with a clear
reason when ``redis-server`` is not installed (Debian package ``redis-server``; ``.ci/run`` installs
it) or when the tests lack redis-py (``pip install -e '.[redis,test]'``).
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

REDIS_SERVER = shutil.which("redis-server")

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
                 ca: trustme.CA | None = None, persistent: bool = True) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls
        self.persistent = persistent
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
            args += ["--requirepass", self.password]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.directory / "redis.pem"),
                     "--tls-key-file", str(self.directory / "redis.key"), "--tls-ca-cert-file",
                     str(self.directory / "ca.pem"), "--tls-auth-clients", "no"]
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
