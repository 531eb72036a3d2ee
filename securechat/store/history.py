"""History: the embedded room log, stored in SQLite (standard library) by a batching writer.

A line is delivered first, exactly as with :class:`~securechat.store.roomlog.LocalLog`; storing it costs
the sender one ``deque.append``. A writer thread wakes every :data:`FLUSH_INTERVAL`, takes
everything queued and writes it in one transaction (WAL mode), so a ``kill -9`` loses at most
the last fraction of a second and never corrupts the file, and a graceful :meth:`close` writes
everything. Retention (age and lines per room) is enforced by the same thread as it goes.

Readers (replay on join, ``/history``, catch-up) first let the writer pass everything appended so
far, so a line that was delivered is always found.

Trouble is reported in one clear line: :class:`HistoryError` at start (unreadable file, a second
server on the same file, a full disk); mid-run one logged error, and the chat goes on without
history.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from securechat.store.roomlog import Entry, LocalLog
from securechat.wire.ids import id_key, room_key

log = logging.getLogger("securechat.history")

# How often the writer stores what was said: the most a kill -9 can lose (a little more under a
# huge backlog), and few enough transactions that storage never competes with delivery.
FLUSH_INTERVAL = 0.2

# Lines waiting for the writer beyond which new ones are not stored (one logged error): at the
# benchmark's million lines a second that is a fifth of a second, and at most ~100 MiB of entries.
MAX_BACKLOG = 200_000

# Retention is checked this often (seconds): continuously, but not once per transaction.
RETENTION_INTERVAL = 5.0

# Defaults: a month of a busy room fits in a few MiB; a room's last 10,000 lines are kept.
DEFAULT_DAYS = 30.0
DEFAULT_LINES = 10_000

# Option bounds: a century of days, and a hundred million lines a room (a few tens of GiB).
MAX_HISTORY_DAYS = 36_500.0
MAX_HISTORY_LINES = 100_000_000

# How long a reader waits for the writer before reading what is there.
FLUSH_WAIT = 5.0

DB_NAME = "history-{port}.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lines (
    room TEXT NOT NULL,      -- roomlog.room_key(name)
    ms INTEGER NOT NULL,     -- the id "<ms>-<seq>", as numbers so they sort
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,      -- the room's display name
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (room, ms, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_ts ON lines (ts);
CREATE TABLE IF NOT EXISTS marks (
    person TEXT NOT NULL,
    room TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (person, room)
) WITHOUT ROWID;
"""


class HistoryError(Exception):
    """History cannot be used; the message is one line for the operator."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/securechat``, else ``~/.local/share/securechat``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "securechat"


def _explain(exc: BaseException, path: Path) -> str:
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return f"{path} is not a securechat history database (damaged, or another file): move it away or pass --data"
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return f"{path} is locked by another program"
    if _is_full(exc):
        return f"no space left for {path}: free some disk space, pass --data elsewhere, or --no-history"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot use {path}: {exc.strerror.lower()}"
    return f"cannot use {path}: {exc}"


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(exc)
    return isinstance(exc, sqlite3.Error) and ("full" in text or "disk I/O" in text)


class SqliteLog(LocalLog):
    """The embedded room log with history in an SQLite file (see the module docstring)."""

    def __init__(self, path: Path, *, days: float = DEFAULT_DAYS, lines: int = DEFAULT_LINES) -> None:
        """Open (creating, mode 0600) the database at ``path``; raises :class:`HistoryError`."""
        super().__init__()
        self.path = path
        self.days = days
        self.lines = lines
        self._queue: collections.deque[object] = collections.deque()
        self._failed = False  # a write failed: history is off for the rest of the run
        self._overflowing = False
        self._busy = False  # the writer holds lines taken from the queue and not yet committed
        self._stop = threading.Event()
        self._wake = threading.Event()  # a reader waits: write now, not at the next interval
        self._lock_fd = -1
        self._open()
        self._reader_lock = threading.Lock()
        self._touched: set[str] = set()  # rooms written since the last retention pass
        self._thread = threading.Thread(target=self._run, name="securechat-history", daemon=True)
        self._thread.start()

    # -- opening -------------------------------------------------------------------------

    def _open(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # One server per file: a second one would interleave ids and retention.
            self._lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HistoryError(f"{path} is in use by another securechat server: give this one its own "
                                   "--data directory (or --port), or --no-history") from None
            # Created 0600 before SQLite sees it: history is the chat in clear text.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            self._writer = self._connect()
            with self._writer:
                self._writer.executescript(_SCHEMA)
            # Proves the disk takes a write now, not at the first chat line.
            with self._writer:
                self._writer.execute("CREATE TABLE IF NOT EXISTS probe (x)")
                self._writer.execute("INSERT INTO probe VALUES (zeroblob(65536))")
                self._writer.execute("DELETE FROM probe")
            for suffix in ("-wal", "-shm"):
                extra = Path(str(path) + suffix)
                if extra.exists() and extra.stat().st_mode & 0o077:
                    os.chmod(extra, 0o600)
            self._reader = self._connect()
        except HistoryError:
            self._close_lock()
            raise
        except (OSError, sqlite3.Error) as exc:
            self._close_lock()
            raise HistoryError(_explain(exc, path)) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=2.0, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash of the process loses nothing committed; only a power cut may lose
        # the last transactions, and nothing is ever corrupted.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _close_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- the hot path --------------------------------------------------------------------

    @property
    def stores(self) -> bool:
        return not self._failed

    def _store(self, entry: Entry) -> None:
        queue = self._queue
        if len(queue) < MAX_BACKLOG:
            queue.append(entry)
        elif not self._overflowing:
            self._overflowing = True
            log.error("history: the writer is %d lines behind; lines are not stored until it catches up",
                      MAX_BACKLOG)

    # -- the writer ----------------------------------------------------------------------

    def _run(self) -> None:
        next_retention = time.monotonic()
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._write_queued()
            if time.monotonic() >= next_retention:
                self._retain()
                next_retention = time.monotonic() + RETENTION_INTERVAL
            if stopping:
                self._write_queued()
                return

    def _write_queued(self) -> None:
        self._busy = True  # before taking anything: flush() checks the queue, then this
        try:
            self._write_batch()
        finally:
            self._busy = False

    def _write_batch(self) -> None:
        queue = self._queue
        rows: list[tuple[object, ...]] = []
        marks: list[tuple[str, dict[str, str]]] = []
        done: list[threading.Event] = []
        while queue:
            item = queue.popleft()
            if isinstance(item, Entry):
                ms, seq = id_key(item.id)
                rows.append((room_key(item.room), ms, seq, item.room, item.ts, item.kind, item.sender, item.text,
                             item.target))
            elif isinstance(item, threading.Event):
                done.append(item)
            else:
                marks.append(item)  # type: ignore[arg-type]
        if (rows or marks) and not self._failed:
            try:
                with self._writer:
                    self._writer.executemany("INSERT OR IGNORE INTO lines VALUES (?,?,?,?,?,?,?,?,?)", rows)
                    for person, positions in marks:
                        self._writer.execute("DELETE FROM marks WHERE person = ?", (person,))
                        self._writer.executemany("INSERT INTO marks VALUES (?,?,?)",
                                                 [(person, room, i) for room, i in positions.items()])
                self._touched.update(row[0] for row in rows)  # type: ignore[misc]
                self._overflowing = False
            except sqlite3.Error as exc:
                self._fail(exc)
        for event in done:
            event.set()

    def _fail(self, exc: BaseException) -> None:
        self._failed = True
        log.error("history is off from now on, the chat goes on without it: %s", _explain(exc, self.path))

    def _retain(self) -> None:
        if self._failed:
            return
        touched, self._touched = self._touched, set()
        try:
            with self._writer:
                if self.days > 0:
                    self._writer.execute("DELETE FROM lines WHERE ts < ?", (time.time() - self.days * 86400,))
                if self.lines > 0:
                    for room in touched:
                        self._writer.execute(
                            "DELETE FROM lines WHERE room = ?1 AND (ms, seq) <= (SELECT ms, seq FROM lines "
                            "WHERE room = ?1 ORDER BY ms DESC, seq DESC LIMIT 1 OFFSET ?2)", (room, self.lines))
        except sqlite3.Error as exc:
            self._fail(exc)

    def flush(self, timeout: float = FLUSH_WAIT) -> bool:
        """Wait until everything appended so far is written; False on timeout."""
        if not self._thread.is_alive():
            return True
        if not self._queue and not self._busy:  # nothing waiting, nothing being written: no round trip
            return True
        done = threading.Event()
        self._queue.append(done)
        self._wake.set()
        return done.wait(timeout)

    # -- reading -------------------------------------------------------------------------

    def _select(self, sql: str, args: tuple[object, ...]) -> list[Entry]:
        if self._failed:
            return []
        self.flush()
        try:
            with self._reader_lock:
                rows = self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            log.error("history: cannot read: %s", _explain(exc, self.path))
            return []
        return [Entry(name, f"{ms}-{seq}", ts, kind, sender, text, target)
                for ms, seq, name, ts, kind, sender, text, target in rows]

    _COLUMNS = "ms, seq, name, ts, kind, sender, text, target"

    def read_after(self, room: str, after_id: str | None, limit: int) -> list[Entry]:
        ms, seq = id_key(after_id) if after_id else (-1, -1)
        return self._select(f"SELECT {self._COLUMNS} FROM lines WHERE room = ? AND (ms, seq) > (?, ?) "
                            "ORDER BY ms, seq LIMIT ?", (room_key(room), ms, seq, limit))

    def senders_after(self, room: str, after_id: str | None, limit: int) -> list[str]:
        if self._failed:
            return []
        self.flush()
        ms, seq = id_key(after_id) if after_id else (-1, -1)
        try:
            with self._reader_lock:
                rows = self._reader.execute("SELECT sender FROM lines WHERE room = ? AND (ms, seq) > (?, ?) ORDER BY "
                                            "ms, seq LIMIT ?", (room_key(room), ms, seq, limit)).fetchall()
        except sqlite3.Error as exc:
            log.error("history: cannot read: %s", _explain(exc, self.path))
            return []
        return [row[0] for row in rows]

    def read_before(self, room: str, before_id: str | None, limit: int) -> list[Entry]:
        ms, seq = id_key(before_id) if before_id else (1 << 62, 0)
        rows = self._select(f"SELECT {self._COLUMNS} FROM lines WHERE room = ? AND (ms, seq) < (?, ?) "
                            "ORDER BY ms DESC, seq DESC LIMIT ?", (room_key(room), ms, seq, limit))
        rows.reverse()
        return rows

    def last_id(self, room: str) -> str | None:
        # Called once per room and process, before its first line: nothing of it is queued.
        if self._failed:
            return None
        try:
            with self._reader_lock:
                row = self._reader.execute("SELECT ms, seq FROM lines WHERE room = ? ORDER BY ms DESC, seq DESC "
                                           "LIMIT 1", (room_key(room),)).fetchone()
        except sqlite3.Error:
            return None
        return f"{row[0]}-{row[1]}" if row else None

    def marks(self, person: str) -> dict[str, str]:
        if self._failed:
            return {}
        self.flush()
        try:
            with self._reader_lock:
                rows = self._reader.execute("SELECT room, id FROM marks WHERE person = ?", (person,)).fetchall()
        except sqlite3.Error as exc:
            log.error("history: cannot read read positions: %s", _explain(exc, self.path))
            return {}
        return dict(rows)

    def set_marks(self, person: str, marks: dict[str, str]) -> None:
        self._queue.append((person, dict(marks)))

    def close(self) -> None:
        """Write everything appended so far, then close the file."""
        super().close()
        self._stop.set()
        self._wake.set()
        self._thread.join(30)  # bounded: a disk that hangs must not hang the shutdown forever
        with contextlib.suppress(sqlite3.Error):
            self._reader.close()
            self._writer.close()
        self._close_lock()
