"""Which servers are running with this CA right now, and where clients reach them: ``DIR/serving-PORT.json``.

``securechat invite`` runs beside the CA, usually on the server machine, but it cannot guess the port the
server was started with (``serve --port 46100``) nor which of the machine's addresses it listens on. So a
server that takes invites writes one small record beside the invite store while it runs: its port and
the addresses its start-up hint offers to clients, in the order it offers them. It holds an exclusive
``flock`` on that file for as long as it runs; the lock vanishes with the process, even after ``kill
-9``, so a record whose lock is free is a server that is gone (a pid could have been reused, a lock
cannot lie). The file holds no secret: the port and addresses the server prints at start anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no records, and invite says no server was found
    fcntl = None  # type: ignore[assignment]

RECORD_GLOB = "serving-*.json"
# A record is a port and a few addresses; anything bigger is not ours.
MAX_RECORD_BYTES = 64 * 1024
# A server writes its record right after taking the lock: a reader that finds it locked but not yet
# complete waits this long for the rest.
READ_RETRY = 0.05
READ_TRIES = 20


@dataclass(frozen=True)
class Serving:
    """A running server: its port, and the addresses clients use, the one its hint names first."""

    port: int
    hosts: tuple[str, ...]


def record_path(certs_dir: Path, port: int) -> Path:
    return certs_dir / f"serving-{port}.json"


class Record:
    """The record of this running server; :meth:`close` (at shutdown) removes it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: no reader takes a half-removed record for a live one
        os.close(self._fd)
        self._fd = None


def publish(certs_dir: Path, port: int, hosts: list[str]) -> Record | None:
    """Write and lock the record of a server listening on ``port``; None where that cannot be done.

    A record that cannot be written (a read-only directory, no flock) only costs ``invite`` its
    guess; the server serves either way.
    """
    if fcntl is None:  # pragma: no cover
        return None
    path = record_path(certs_dir, port)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"port": port, "hosts": hosts, "pid": os.getpid()}).encode("utf-8") + b"\n")
    except OSError:  # another live server holds it (same port, another --listen address): its record stands
        os.close(fd)
        return None
    return Record(path, fd)


def running(certs_dir: Path) -> list[Serving]:
    """The servers running with the CA in ``certs_dir`` now, by port."""
    if fcntl is None:  # pragma: no cover
        return []
    found = []
    for path in sorted(certs_dir.glob(RECORD_GLOB)):
        serving = _read_live(path)
        if serving is not None:
            found.append(serving)
    return sorted(found, key=lambda s: s.port)


def _read_live(path: Path) -> Serving | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # locked: its server is alive
        else:
            return None  # nobody holds it: that server is gone (its record stays until one starts there)
        for _ in range(READ_TRIES):
            serving = _parse(os.pread(fd, MAX_RECORD_BYTES, 0))
            if serving is not None:
                return serving
            time.sleep(READ_RETRY)
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse(data: bytes) -> Serving | None:
    try:
        meta = json.loads(data.decode("utf-8"))
        port, hosts = meta["port"], meta["hosts"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(hosts, list):
        return None
    return Serving(port, tuple(h for h in hosts if isinstance(h, str) and h))
