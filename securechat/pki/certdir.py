"""The certificate directory's two rules: one writer at a time, and nobody else can touch the keys.

**Lock.** Every read-modify-write of the set in a directory (``gen-certs``, ``serve``'s first-run
minting, renewal) holds an exclusive ``fcntl.flock`` on ``DIR/.lock`` from the first look at the
disk to the last rename; whoever reads the set as a whole (``serve`` loading ``server.pem`` with
``server.key``) holds a shared one. Each file is replaced atomically (temporary file + rename), so
with the lock a reader never sees the key of one run with the certificate of another, and two
writers never both mint a CA. flock locks belong to the open file and vanish when the process dies,
so a crashed ``gen-certs`` never leaves the directory locked. Where flock does not exist (Windows) or
the lock file cannot be created (a read-only directory of someone else's files) readers go without.

**Permissions** (POSIX; OpenSSH's ``StrictModes`` rule for its keys): a private key that anyone but
its owner may read or write, or a directory of keys that anyone but its owner may write (they could
swap a key or a certificate), is refused with one line giving the ``chmod`` to run.
:func:`check_key` and :func:`check_dir` are that one place, used by ``serve``, ``connect
--cert/--key``, ``gen-certs`` and renewal.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import stat
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

# Permission bits that must be clear. A key: anything for group or others (OpenSSH refuses 0640
# too). A directory: write for group or others, which would let them replace files in it.
KEY_FORBIDDEN = 0o077
DIR_FORBIDDEN = 0o022
# A PEM key (RSA-8192 with its chain beside it) is a few KiB; the marker is looked for in this much.
MAX_KEY_FILE = 1 << 20

__all__ = ["LOCK_NAME", "UnsafePermissions", "check_dir", "check_key", "locked"]


class UnsafePermissions(Exception):
    """A key or key directory others can read or write; the message is one line with the chmod to run."""


def _enforced() -> bool:
    # Windows has no POSIX modes (os.stat reports 0666/0777 for everything); its ACLs are not checked.
    return os.name == "posix"


def _quote(path: Path) -> str:
    return shlex.quote(str(path))


def _holds_private_key(path: Path) -> bool:
    """Whether ``path`` has a PEM private key block (a certificate passed as --key is the loader's business)."""
    try:
        with open(path, "rb") as fh:
            return b"PRIVATE KEY-----" in fh.read(MAX_KEY_FILE)
    except OSError:
        return False


def check_key(path: str | Path) -> None:
    """Refuse a file holding a private key that group or others may access.

    Missing, unreadable or key-less files are left to the code that loads them, which says so.
    """
    path = Path(path)
    if not _enforced():
        return
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & KEY_FORBIDDEN and _holds_private_key(path):
        raise UnsafePermissions(
            f"private key {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {_quote(path)}"
        )


def check_dir(path: str | Path) -> None:
    """Refuse a directory of keys that group or others may write to (unless it is sticky, like /tmp)."""
    path = Path(path)
    if not _enforced():
        return
    try:
        st = os.stat(path)
    except OSError:
        return
    # A sticky directory (/tmp) lets others add files but not replace or remove ours: not refused.
    if stat.S_ISDIR(st.st_mode) and st.st_mode & DIR_FORBIDDEN and not st.st_mode & stat.S_ISVTX:
        raise UnsafePermissions(
            f"directory {path} holds private keys but other users can write to it "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod go-w {_quote(path)}"
        )


def check_key_and_dir(path: str | Path) -> None:
    """:func:`check_dir` on the key's directory, then :func:`check_key` on the key."""
    path = Path(path)
    check_dir(path.parent if str(path.parent) else Path("."))
    check_key(path)


@contextlib.contextmanager
def locked(directory: str | Path, *, shared: bool = False) -> Iterator[None]:
    """Hold ``directory``'s lock: exclusive to change the set, ``shared`` to read it as a whole.

    The directory must exist for an exclusive lock (writers create it first). Never nest two of
    these on one directory in one process: flock locks of two open files conflict with each other.
    """
    if fcntl is None:
        yield
        return
    path = Path(directory) / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        if not shared:
            raise
        try:  # a directory we may not write to: a lock file someone else created still works
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            yield  # nobody can write the set here but its owner; read without a lock
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def client_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) paths of client ``name`` in ``out_dir``."""
    return Path(out_dir) / f"client-{name}.pem", Path(out_dir) / f"client-{name}.key"


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode`` and os.replace.

    The temporary file is created with O_EXCL and its final mode, so a key is never readable by others,
    not even for an instant and whatever the umask; readers see the old file or the new one, never half.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits colliding
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                # The umask can only have removed bits: restores 0644 for certificates; 0600 stays 0600.
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(directory: Path) -> None:
    # Make the renames durable too (POSIX only; Windows cannot open a directory).
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
