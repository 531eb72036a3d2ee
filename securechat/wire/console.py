"""Output that can never block the server.

A terminal paused with Ctrl-S, or a pipe that nobody reads, blocks every ``print`` once its buffer
is full. If connection threads printed directly, that would stall every new connection until the
connection limit turned everybody away. So the server's per-connection lines (``[NEW CLIENT] ...``
and its log records) go through bounded queues, each drained by one writer thread; when a queue is
full, lines are dropped and counted instead of waited for.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import queue
import sys
import threading
from typing import TextIO

# Lines waiting for a stalled terminal: a few seconds of a connection storm, then drop.
QUEUE_LINES = 10_000


class Console:
    """A stream written by one daemon thread; :meth:`write_line` never blocks."""

    def __init__(self, stream: TextIO | None = None, capacity: int = QUEUE_LINES) -> None:
        self._stream = stream
        self._queue: queue.Queue[str | threading.Event] = queue.Queue(capacity)
        self._dropped = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def start(self) -> None:
        """Start the writer thread (done on first use otherwise)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="securechat-console", daemon=True)
                self._thread.start()

    def write_line(self, line: str) -> None:
        """Queue ``line`` for the stream; drop it (and count it) if the stream is too far behind."""
        if self._thread is None:
            self.start()
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until what was queued has been written."""
        if self._thread is None:
            return
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def _drain(self) -> None:
        while True:
            line = self._queue.get()
            if isinstance(line, threading.Event):  # a flush() waiting for everything before it
                line.set()
                continue
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            try:
                if dropped:
                    self.stream.write(f"[SERVER] ({dropped} lines of output dropped: the terminal was not reading)\n")
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stdout closed: nobody to tell


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops records instead of blocking (or raising) when its queue is full."""

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            pass


LOG_FORMATS = ("console", "json")


class ConsoleFormatter(logging.Formatter):
    """What an operator reads, in the seed's style: ``[SERVER] WARNING: ...``, ``[SERVER] ...`` for info."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " (" + self.formatException(record.exc_info).splitlines()[-1] + ")"
        if record.levelno >= logging.WARNING:
            return f"[SERVER] {record.levelname}: {message}"
        return f"[SERVER] {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line for machines: time (UTC, ISO 8601), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        entry = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_formatter(kind: str) -> logging.Formatter:
    """The formatter for ``--log-format kind`` (one of :data:`LOG_FORMATS`)."""
    return JsonFormatter() if kind == "json" else ConsoleFormatter()


def nonblocking_logging(level: int, fmt: str | logging.Formatter,
                        stream: TextIO | None = None) -> logging.handlers.QueueListener:
    """Route the root logger through a bounded queue to ``stream`` (stderr); return the started listener."""
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LINES)
    target = logging.StreamHandler(stream if stream is not None else sys.stderr)
    target.setFormatter(fmt if isinstance(fmt, logging.Formatter) else logging.Formatter(fmt))
    listener = logging.handlers.QueueListener(records, target, respect_handler_level=False)
    root = logging.getLogger()
    root.handlers[:] = [DroppingQueueHandler(records)]
    root.setLevel(level)
    listener.start()
    return listener


stdout = Console()


def announce(line: str) -> None:
    """Print a user-facing server line (``[NEW CLIENT] ...``) without ever blocking the caller."""
    stdout.write_line(line)
