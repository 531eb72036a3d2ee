"""Shared files on the server's disk: content-addressed blobs, uploads in progress, the index, limits.

Layout under ``--data DIR`` (every directory 0700, every file 0600 from its first byte)::

    DIR/files/PORT/blobs/ab/ab12...ef   a file's bytes, named by their SHA-256 (one copy per content)
    DIR/files/PORT/partial/KEY          an upload in progress, streamed to disk as it arrives
    DIR/files/PORT/index.sqlite3        id -> name, size, hash, who shared it with whom, when

An upload is written to ``partial/`` chunk by chunk (memory does not grow with the file) while its
SHA-256 is computed; once the sender's declared size and hash match, it is renamed into
``blobs/`` (or dropped, when that content is already there) and indexed. A failed upload's partial
file is removed at once; a dropped one waits :data:`RESUME_SECONDS` for its sender to resume it.

Limits: the size of one file (``--max-file-size``), the bytes one person may keep shared
(``--files-quota``, counting uploads in progress), and retention (``--files-days``), enforced by a
sweeper thread that forgets old entries and removes blobs nothing refers to any more.

The index is a :class:`FileIndex`: :class:`SqliteIndex` here, a Redis one for several servers
(:mod:`securechat.store.redis_files`), which also fetches blobs that another server holds.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from securechat.wire.filexfer import SHA256_RE, TransferError, human_size

log = logging.getLogger("securechat.files")

# Defaults of the serve options: a document or a phone video; a person's gigabyte; a month, as history.
DEFAULT_MAX_FILE_SIZE = 100 << 20
DEFAULT_QUOTA = 1 << 30
DEFAULT_DAYS = 30.0

# The largest --max-file-size: a video; beyond, this is not the tool (and every upload is hashed twice).
MAX_FILE_SIZE = 64 << 30

# How long a dropped upload's partial file waits for its sender to resume it.
RESUME_SECONDS = 600.0

# Retention is enforced this often (seconds).
SWEEP_INTERVAL = 60.0

# Bytes read from a blob at a time when serving it (the size of a few data frames).
READ_SIZE = 1 << 20

INDEX_NAME = "index.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    owner TEXT NOT NULL,          -- whose quota it counts against
    sender TEXT NOT NULL,         -- the nick that shared it
    sender_key TEXT NOT NULL,     -- who may fetch it as its sender (see server.files)
    room TEXT NOT NULL,           -- the room it was shared in ("" for a private file)
    recipient TEXT NOT NULL,      -- the nick it was sent to ("" for a room's file)
    recipient_key TEXT NOT NULL,
    created REAL NOT NULL,
    origin TEXT NOT NULL          -- the server holding its bytes ("" on a server alone)
);
CREATE INDEX IF NOT EXISTS files_created ON files (created);
"""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One shared file (an upload that completed), as the index keeps it."""

    id: str
    sha256: str
    name: str
    size: int
    owner: str
    sender: str
    sender_key: str
    room: str
    recipient: str
    recipient_key: str
    created: float
    origin: str = ""

    def row(self) -> tuple[object, ...]:
        return (self.id, self.sha256, self.name, self.size, self.owner, self.sender, self.sender_key, self.room,
                self.recipient, self.recipient_key, self.created, self.origin)


class FilesError(Exception):
    """The file store cannot be used; one line for the operator."""


class FileIndex(abc.ABC):
    """Where the records of shared files are kept (one server: SQLite; several: Redis)."""

    @abc.abstractmethod
    def add(self, record: FileRecord) -> None:
        """Keep ``record`` (blocking I/O: a worker's job)."""

    @abc.abstractmethod
    def get(self, file_id: str) -> FileRecord | None:
        """The record with this id, or None (blocking I/O)."""

    @abc.abstractmethod
    def used(self, owner: str) -> int:
        """Bytes of the files ``owner`` shared that are still kept."""

    @abc.abstractmethod
    def expire(self, before: float) -> list[FileRecord]:
        """Forget the records created before ``before``; return them."""

    @abc.abstractmethod
    def referenced(self, sha256: str) -> bool:
        """Whether a record of this server still refers to that content."""

    def close(self) -> None:  # noqa: B027 - optional: most indexes hold nothing to release
        """Release what the index holds."""

    # -- a shared index: bytes another server holds -------------------------------------------

    def start(self, store: FileStore) -> None:  # noqa: B027 - optional: only a shared index serves others
        """Begin serving ``store``'s contents to the other servers (a shared index)."""

    def fetch(self, record: FileRecord, store: FileStore) -> bool:
        """Bring ``record``'s blob here from the server that holds it; False when it cannot be had."""
        return False

    def holding(self, sha256: str, held: bool = True) -> None:  # noqa: B027 - optional: only a shared index tells
        """This server now holds that content, or no longer does (a shared index tells the others)."""


class SqliteIndex(FileIndex):
    """The index of a server alone: every record in memory, kept in SQLite (writes are one per upload)."""

    def __init__(self, path: Path) -> None:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(path, timeout=2.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            rows = self._db.execute("SELECT * FROM files").fetchall()
        except sqlite3.Error as exc:
            raise FilesError(f"cannot use {path}: {exc}") from None
        self._lock = threading.Lock()
        self._records = {row[0]: FileRecord(*row) for row in rows}
        self._used: dict[str, int] = {}
        self._refs: dict[str, int] = {}
        for record in self._records.values():
            self._count(record, 1)

    def _count(self, record: FileRecord, sign: int) -> None:
        self._used[record.owner] = self._used.get(record.owner, 0) + sign * record.size
        self._refs[record.sha256] = self._refs.get(record.sha256, 0) + sign
        if not self._used[record.owner]:
            del self._used[record.owner]
        if not self._refs[record.sha256]:
            del self._refs[record.sha256]

    def add(self, record: FileRecord) -> None:
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", record.row())
            self._records[record.id] = record
            self._count(record, 1)

    def get(self, file_id: str) -> FileRecord | None:
        return self._records.get(file_id)

    def used(self, owner: str) -> int:
        return self._used.get(owner, 0)

    def expire(self, before: float) -> list[FileRecord]:
        with self._lock:
            gone = [r for r in self._records.values() if r.created < before]
            if gone:
                self._db.execute("DELETE FROM files WHERE created < ?", (before,))
            for record in gone:
                del self._records[record.id]
                self._count(record, -1)
        return gone

    def referenced(self, sha256: str) -> bool:
        return sha256 in self._refs

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


def _disk_error(exc: OSError) -> TransferError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TransferError("the server's disk is full: the upload was dropped")
    return TransferError(f"the server cannot store the file ({os.strerror(exc.errno or 0).lower() or exc})")


class Partial:
    """An upload being written to ``partial/``: its file, how much is there, and the SHA-256 so far.

    Its methods block on the disk: a worker's (or the connection thread's) job, one at a time.
    """

    __slots__ = ("path", "_file", "offset", "_hash", "touched")

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)
        self.offset = 0
        self._hash = hashlib.sha256()
        self.touched = time.monotonic()

    def write(self, data: bytes) -> int:
        """Append ``data``; the new offset. Raises TransferError when the disk refuses."""
        assert self._file is not None, "closed"
        view = memoryview(data)
        try:
            while view:
                n = self._file.write(view)
                assert n is not None
                view = view[n:]
        except OSError as exc:
            raise _disk_error(exc) from None
        self._hash.update(data)  # after the write: the hash always covers exactly what is on disk
        self.offset += len(data)
        self.touched = time.monotonic()
        return self.offset

    def digest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Close and remove the partial file."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FileStore:
    """The server's shared files: limits, uploads, blobs, and the index (see the module docstring)."""

    def __init__(self, root: Path, *, max_size: int = DEFAULT_MAX_FILE_SIZE, quota: int = DEFAULT_QUOTA,
                 days: float = DEFAULT_DAYS, index: FileIndex | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """Open (creating, 0700) the store in ``root``; raises :class:`FilesError` in one line."""
        self.root = root
        self.max_size = max_size
        self.quota = quota
        self.days = days
        self.clock = clock
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self._lock = threading.Lock()
        # Held from a blob's arrival in blobs/ until its record is indexed, and while the sweeper
        # looks for blobs nothing refers to: a new blob is never taken for an orphan.
        self._commit_lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # owner -> bytes of uploads in progress
        self._lock_fd = -1
        try:
            for d in (root.parent, root, self.blobs, self.partial):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                if d.stat().st_mode & 0o077:
                    d.chmod(0o700)
            self._lock_fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FilesError(f"{root} is in use by another securechat server: give this one its own --data "
                                 "directory (or --port), or --no-files") from None
            for stale in self.partial.iterdir():  # uploads of an earlier run cannot be resumed: no hash state
                stale.unlink()
            self.index = index if index is not None else SqliteIndex(root / INDEX_NAME)
        except OSError as exc:
            self._unlock()
            raise FilesError(f"cannot use {root}: {os.strerror(exc.errno or 0).lower() or exc}") from None
        except FilesError:
            self._unlock()
            raise
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def start(self) -> None:
        """Sweep now and every :data:`SWEEP_INTERVAL` (retention, orphans) in a thread of its own."""
        self.index.start(self)
        self.sweep()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="securechat-files", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(5)
        self.index.close()
        self._unlock()

    # -- limits -------------------------------------------------------------------------------

    def reserve(self, owner: str, size: int) -> str | None:
        """Hold ``size`` bytes of ``owner``'s quota for an upload; or say why not (one line)."""
        if size > self.max_size:
            return f"too large: {human_size(size)}, this server takes files up to {human_size(self.max_size)}"
        used = self.index.used(owner)  # blocking for a shared index: before the lock
        with self._lock:
            held = self._reserved.get(owner, 0)
            if self.quota and used + held + size > self.quota:
                left = max(0, self.quota - used - held)
                return (f"over your quota: you share {human_size(used + held)} of {human_size(self.quota)}; "
                        f"{human_size(left)} left")
            self._reserved[owner] = held + size
        return None

    def release(self, owner: str, size: int) -> None:
        """Give back what :meth:`reserve` held (the upload ended, stored or not)."""
        with self._lock:
            left = self._reserved.get(owner, 0) - size
            if left > 0:
                self._reserved[owner] = left
            else:
                self._reserved.pop(owner, None)

    # -- uploads ------------------------------------------------------------------------------

    def begin(self, key: str) -> Partial:
        """A new partial file for the upload ``key`` (blocking); TransferError when it cannot be made."""
        try:
            return Partial(self.partial / key)
        except OSError as exc:
            raise _disk_error(exc) from None

    def finish(self, partial: Partial, declared_sha: str, size: int, make: Callable[[str], FileRecord]) -> FileRecord:
        """Check ``partial`` against the declared size and hash, store its bytes and index it (blocking).

        ``make(sha256)`` builds the record. On a mismatch or a disk error the partial file is
        removed and TransferError says why, in one line for the sender.
        """
        partial.close()
        try:
            if partial.offset != size:
                raise TransferError(f"the size does not match: {partial.offset} bytes arrived, {size} were declared")
            sha = partial.digest()
            if not SHA256_RE.match(declared_sha) or sha != declared_sha:
                raise TransferError("the SHA-256 does not match the bytes that arrived: the file was dropped")
            record = make(sha)
            with self._commit_lock:
                self.adopt(partial.path, sha)
                self.index.add(record)
        except TransferError:
            partial.discard()
            raise
        except (OSError, sqlite3.Error) as exc:
            partial.discard()
            if isinstance(exc, OSError):
                raise _disk_error(exc) from None
            raise TransferError(f"the server cannot index the file ({exc})") from None
        self.index.holding(sha)
        return record

    def adopt(self, path: Path, sha: str) -> None:
        """Move a verified file into ``blobs/`` under its hash (or drop it: that content is there)."""
        target = self.blob_path(sha)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        if target.exists():
            path.unlink()
        else:
            os.replace(path, target)

    # -- blobs --------------------------------------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        if not SHA256_RE.match(sha):
            raise ValueError("not a SHA-256")
        return self.blobs / sha[:2] / sha

    def open(self, record: FileRecord) -> BinaryIO:
        """``record``'s bytes for reading (blocking; fetched from the server holding them if need be).

        Raises TransferError when they cannot be had.
        """
        path = self.blob_path(record.sha256)
        if not path.exists() and not self.index.fetch(record, self):
            raise TransferError("the server holding this file cannot be reached: try again later")
        try:
            return open(path, "rb", buffering=0)
        except OSError as exc:
            raise TransferError(f"the file cannot be read on the server ({exc.strerror or exc})") from None

    def blobs_held(self) -> Iterator[str]:
        for sub in self.blobs.iterdir():
            if sub.is_dir():
                for blob in sub.iterdir():
                    yield blob.name

    # -- retention ----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Forget expired files, remove blobs no record refers to, and partial files nobody resumed."""
        try:
            if self.days > 0:
                for record in self.index.expire(self.clock() - self.days * 86400):
                    log.info("file %s (%s) expired", record.id, record.name)
            with self._commit_lock:
                for sha in list(self.blobs_held()):
                    if not self.index.referenced(sha):
                        with contextlib.suppress(FileNotFoundError):
                            (self.blobs / sha[:2] / sha).unlink()
                        self.index.holding(sha, False)
        except Exception as exc:  # storage trouble must not end the sweeper (Redis away, a disk error)
            log.error("files: cannot enforce retention now: %s", exc)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_INTERVAL):
            self.sweep()
