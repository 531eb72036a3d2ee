"""Command-line conventions shared by every subcommand: option types, one-line errors, safe stdout.

The convention, for every line securechat writes to stderr about a failure:

* it is ONE line, starting with the program that speaks: ``securechat serve: ...``,
  ``securechat connect: ...``, ``securechat gen-certs: ...``, ``securechat fingerprint: ...``, or
  ``securechat: ...`` for the dispatcher itself (unknown command);
* a usage error (a bad option value, a missing argument) exits with status 2 and says which option
  and why, followed by where to look (``see 'securechat serve --help'``); argparse's multi-line
  usage dump is not printed;
* any other failure exits with status 1; never a traceback.

The argparse ``type=`` functions below validate every value before anything runs: a port is
1-65535 (0 only where "any free port" makes sense), a duration is a finite number of seconds in a
sane range, a count is a whole number in range. Their error messages say what is wrong in words.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

from securechat.wire import addr

# Exit statuses shared by every subcommand (cli.py re-exports them).
EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed (connection refused, certificate refused, ...)
EXIT_USAGE = 2  # bad command line, as argparse does

MAX_PORT = 65535  # TCP ports are 16 bits
# An hour: a handshake, a login or a connection attempt that needs longer is a typo (or an attack);
# it also keeps every deadline far below what threading/socket timeouts can represent.
MAX_TIMEOUT = 3600.0
# Beyond this many simultaneous clients a thread-per-client server runs out of memory first
# (100 000 threads x 512 KiB stacks = 50 GiB of address space).
MAX_CLIENTS = 100_000
# Lines a second (and a burst) no human types; above it "no limit" (0) is what is meant.
MAX_LINE_RATE = 100_000.0


def error_line(prog: str, message: str) -> str:
    """The one-line error format: ``PROG: message`` (PROG is ``securechat serve`` etc.)."""
    return f"{prog}: {message.strip()}".replace("\r", " ").replace("\n", " ")


def print_error(prog: str, message: str) -> None:
    """Write :func:`error_line` to stderr; a broken stderr is ignored (nobody left to tell)."""
    with contextlib.suppress(OSError, ValueError):
        print(error_line(prog, message), file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``PROG: MESSAGE; see 'PROG --help'``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, error_line(self.prog, f"{message}; see '{self.prog} --help'") + "\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(message)
                sys.stderr.flush()
        raise SystemExit(status)

    def print_help(self, file: Any = None) -> None:
        # ``--help > /dev/full`` fails in one line (argparse itself would swallow the error and exit 0).
        out = file or sys.stdout
        try:
            out.write(self.format_help())
            out.flush()
        except (OSError, ValueError, OutputLost) as exc:
            silence_stdout()
            print_error(self.prog, f"cannot write to standard output ({_stdout_error(exc)})")
            raise SystemExit(EXIT_FAILURE) from None


def _type(name: str, check: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap ``check`` (which raises ValueError with a message in words) as an argparse type."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some of its own messages
    return convert


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number ({what})") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number ({what})") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number ({what})")
    return value


def _port(text: str, low: int) -> int:
    what = f"a TCP port is {low}-{MAX_PORT}"
    port = _int(text, what)
    if not low <= port <= MAX_PORT:
        raise ValueError(f"{port} is not a TCP port: {what}")
    return port


#: a port to connect to: 1-65535
port = _type("port", lambda text: _port(text, 1))
#: a port to listen on: 1-65535, or 0 for any free port (printed at start)
listen_port = _type("port", lambda text: _port(text, 0))


def duration(maximum: float = MAX_TIMEOUT) -> Callable[[str], float]:
    """Seconds: a finite number greater than 0 and at most ``maximum``."""

    def check(text: str) -> float:
        what = f"seconds, more than 0 and at most {maximum:g}"
        value = _float(text, what)
        if not 0 < value <= maximum:
            raise ValueError(f"{value:g} is out of range: {what}")
        return value

    return _type("duration", check)


def count(minimum: int = 1, maximum: int = MAX_CLIENTS, zero: str = "") -> Callable[[str], int]:
    """A whole number from ``minimum`` to ``maximum``; ``zero`` says what 0 means where it is allowed."""

    def check(text: str) -> int:
        what = f"a whole number from {minimum} to {maximum}" + (f", 0 {zero}" if zero else "")
        value = _int(text, what)
        if not minimum <= value <= maximum:
            raise ValueError(f"{value} is out of range: {what}")
        return value

    return _type("count", check)


def rate(maximum: float = MAX_LINE_RATE, zero: str = "for no limit") -> Callable[[str], float]:
    """A finite number from 0 to ``maximum``."""

    def check(text: str) -> float:
        what = f"a number from 0 to {maximum:g}, 0 {zero}"
        value = _float(text, what)
        if not 0 <= value <= maximum:
            raise ValueError(f"{value:g} is out of range: {what}")
        return value

    return _type("rate", check)


_DOTTED = re.compile(r"[0-9.]+")


def _host(text: str) -> str:
    """A host name or address. Only what can be judged without the network is refused here:
    empty text, control characters and things that look like an IPv4 address but are not one."""
    host = text.strip()
    if not host:
        raise ValueError("an empty host: give an IP address or a host name")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in host):
        raise ValueError(f"{text!r} contains control characters: give an IP address or a host name")
    if _DOTTED.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{host} is not an IPv4 address: it has four numbers from 0 to 255 separated by dots"
            ) from None
    return host


#: a host name or IP address (a listen address for serve, the server for connect)
host = _type("host", _host)


def _server_address(text: str) -> tuple[str, int | None]:
    try:
        name, given_port = addr.split_host_port(text)
    except addr.AddressError as exc:
        raise ValueError(str(exc)) from None
    return _host(name), given_port


#: a server's address as people type it, ``HOST``, ``HOST:PORT`` or ``[V6ADDR]:PORT``: ``(host, port or
#: None)``. Every command that names a server (connect, join, invite --host, the menu) parses it here.
server_address = _type("host", _server_address)


def server_port(address: tuple[str, int | None], option: int | None, default: int = addr.DEFAULT_PORT) -> int:
    """The port of ``address`` (from :data:`server_address`), else ``--port`` (``option``), else ``default``.

    ValueError when both name a port and they differ: which one was meant cannot be guessed.
    """
    host_, given = address
    if given is not None and option is not None and given != option:
        raise ValueError(f"two ports: {given} in {addr.join(host_, given)} and --port {option}; give one")
    return given or option or default


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("an empty path: name a file")  # Path("") would silently mean "."
    if "\0" in text:
        raise ValueError(f"{text!r} contains a NUL byte, which no file name can")
    return Path(text)


#: a file or directory name (not empty; whether it exists is checked where it is used)
path = _type("path", _path)


# -- stdout that may go away --------------------------------------------------------------

_silenced = threading.Event()


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so nothing written to stdout can fail any more.

    After stdout failed (a full disk, a reader that left), later writes and the interpreter's final
    flush would fail again (each a traceback or an "Exception ignored" message); writing to
    /dev/null instead always succeeds.
    """
    if _silenced.is_set():
        return
    _silenced.set()
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
            os.dup2(devnull, fd)
        except (OSError, ValueError):
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)


class GuardedStdout:
    """A stand-in for ``sys.stdout`` whose writes never raise.

    The first failure (ENOSPC on ``> /dev/full``, EPIPE from ``| head -1``, EBADF on a closed
    descriptor) calls ``on_failure`` once with the error, then stdout is silenced: the program keeps
    running (a server's users do not depend on its console) and what it prints is dropped.
    """

    def __init__(self, stream: IO[str], on_failure: Callable[[OSError | ValueError], None]) -> None:
        self._stream = stream
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self.failed = False

    def _fail(self, exc: OSError | ValueError) -> None:
        with self._lock:
            if self.failed:
                return
            self.failed = True
        silence_stdout()
        # What is still buffered would be flushed into the failing descriptor: discard it by
        # flushing into /dev/null, which now sits behind the same descriptor.
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()
        self._on_failure(exc)

    def write(self, text: str) -> int:
        if self.failed:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as exc:
            self._fail(exc)
            return len(text)

    def flush(self) -> None:
        if self.failed:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class OutputLost(Exception):
    """Standard output failed (a full disk, a reader that left, a closed descriptor); ``str()`` says how.

    Raised by :class:`StrictStdout` from ``print``: the dispatcher turns it into one line and exit
    status 1; a command whose output carries a consequence (an invite's code) catches it first.
    """


class StrictStdout:
    """``sys.stdout`` for one-shot commands: every write is flushed at once, and a failure raises
    :class:`OutputLost` (stdout then silenced, so nothing fails again at exit)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            written = self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:
            silence_stdout()
            with contextlib.suppress(OSError, ValueError):
                self.stream.flush()  # what is still buffered goes to /dev/null now
            raise OutputLost(_stdout_error(exc)) from None
        return written

    def flush(self) -> None:
        self.write("")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def strict_stdout(strict: bool = True) -> Iterator[None]:
    """Run a one-shot command with :class:`StrictStdout` as ``sys.stdout`` (restored afterwards); with
    ``strict=False``, a long-running one on the plain stream (it guards its own: :func:`guard_stdout`)."""
    previous = sys.stdout
    stream = previous.stream if isinstance(previous, StrictStdout) else previous
    sys.stdout = StrictStdout(stream) if strict else stream
    try:
        yield
    finally:
        sys.stdout = previous


def _stdout_error(exc: OSError | ValueError | OutputLost) -> str:
    return os.strerror(exc.errno).lower() if isinstance(exc, OSError) and exc.errno else str(exc)


def write_stdout(prog: str, text: str) -> bool:
    """Write a one-shot command's output; on failure say so in one line on stderr and return False.

    For commands that print a result and exit (gen-certs, fingerprint): output that could not be
    written is a failure (exit status 1), as for ``echo > /dev/full``.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        silence_stdout()
        print_error(prog, f"cannot write to standard output ({_stdout_error(exc)})")
        return False
    except OutputLost as exc:
        print_error(prog, f"cannot write to standard output ({exc})")
        return False
    return True


def guard_stdout(prog: str) -> GuardedStdout:
    """Replace ``sys.stdout`` by a :class:`GuardedStdout` that reports its first failure on stderr."""
    current = sys.stdout
    if isinstance(current, GuardedStdout):
        return current

    def report(exc: OSError | ValueError) -> None:
        print_error(prog, f"cannot write to standard output ({_stdout_error(exc)}); carrying on without it")

    guarded = GuardedStdout(current, report)
    sys.stdout = guarded
    return guarded
