"""``/send PATH [NICK|#room]`` and ``/get ID [DIR]`` in ``securechat connect``: transfers beside the chat.

Each transfer runs in a thread of its own, on a connection of its own (:mod:`securechat.client.files`),
so chatting goes on meanwhile. :class:`Transfers` keeps them, reports their progress as one status
text (the terminal screen shows it above the input line) and their ends as lines of the client's own.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from securechat.client.files import ChatClient, get_file, send_file
from securechat.wire import filexfer, protocol
from securechat.wire.filexfer import TransferError, human_size

# Transfers one client runs at once (the server allows each person a few tickets more).
MAX_RUNNING = 4

# The client's own commands: typed lines the server never sees.
FILE_COMMANDS = frozenset({"/send", "/get"})

USAGE_SEND = "usage: /send PATH [NICK|#room] (quote a path with spaces: /send \"my file.pdf\")"
USAGE_GET = "usage: /get ID [DIR] (ID: what follows /get in the line that shared the file)"


@dataclass
class _Running:
    verb: str
    name: str
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        elapsed = time.monotonic() - self.started
        return filexfer.progress(self.verb, self.name, self.done, self.total,
                                 self.done / elapsed if elapsed > 0.5 else 0.0)


class Transfers:
    """The transfers of one chat client. ``say`` shows a line of the client's own (any thread);
    ``changed`` is called when the status text changes (any thread)."""

    def __init__(self, client: ChatClient, say: Callable[[str], None], changed: Callable[[], None] = lambda: None,
                 timeout: float = 10.0) -> None:
        self.client = client
        self.say = say
        self.changed = changed
        self.timeout = timeout
        self._lock = threading.Lock()
        self._running: list[_Running] = []
        self._threads: list[threading.Thread] = []

    def status(self) -> str:
        """``sending report.pdf: 45% of 2.1 MiB, 12 MiB/s | receiving ...`` (empty when idle)."""
        with self._lock:
            return " | ".join(r.text() for r in self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def take(self, text: str) -> bool:
        """If ``text`` is ``/send ...`` or ``/get ...``: start what it asks (or say why not) and return
        True; it is then not sent as a chat line."""
        parsed = protocol.parse(text.strip())
        if not (isinstance(parsed, protocol.Command) and "/" + parsed.name in FILE_COMMANDS):
            return False
        self._command(parsed)
        return True

    def _command(self, parsed: protocol.Command) -> None:
        try:
            words = shlex.split(parsed.arg)
        except ValueError as exc:
            self.say(f"{exc}: {USAGE_SEND if parsed.name == 'send' else USAGE_GET}")
            return
        if parsed.name == "send":
            if not 1 <= len(words) <= 2:
                self.say(USAGE_SEND)
                return
            path = Path(os.path.expanduser(words[0]))
            target = words[1] if len(words) > 1 else filexfer.CURRENT_ROOM
            self._start("sending", filexfer.clean_name(path.name), self._send, path, target)
        else:
            if not 1 <= len(words) <= 2 or not filexfer.ID_RE.match(words[0]):
                self.say(USAGE_GET)
                return
            directory = Path(os.path.expanduser(words[1])) if len(words) > 1 else Path(".")
            self._start("receiving", words[0], self._get, words[0], directory)

    def _start(self, verb: str, name: str, work: Callable[..., str], *args: object) -> None:
        with self._lock:
            if len(self._running) >= MAX_RUNNING:
                self.say(f"{MAX_RUNNING} transfers are going already: wait for one to end")
                return
            running = _Running(verb, name)
            self._running.append(running)
        thread = threading.Thread(target=self._run, args=(running, work, args), name="securechat-transfer",
                                  daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        self.changed()

    def wait(self) -> None:
        """Until every transfer started has ended (each is bounded by its own timeouts and retries)."""
        for thread in list(self._threads):
            thread.join()

    def _run(self, running: _Running, work: Callable[..., str], args: tuple[object, ...]) -> None:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            running.done, running.total = done, total
            now = time.monotonic()
            if now - last[0] >= 0.2:  # a status redraw five times a second is plenty
                last[0] = now
                self.changed()

        try:
            said = work(running, progress, *args)
            if said:
                self.say(said)
        except TransferError as exc:
            self.say(f"{running.verb} {running.name} failed: {exc}")
        except Exception as exc:  # a transfer's bug must not end the chat
            self.say(f"{running.verb} {running.name} failed: {exc.__class__.__name__}: {exc}")
        finally:
            with self._lock:
                self._running.remove(running)
            self.changed()

    def _send(self, running: _Running, progress: Callable[[int, int], None], path: Path, target: str) -> str:
        """Share; nothing more to say when the server's own line shows it (the room's, or our private
        line copied back under /cap echo)."""
        file_id, name, size = send_file(self.client, path, target, progress, self._note(running), self.timeout)
        if target == filexfer.CURRENT_ROOM or target.startswith("#") or getattr(self.client, "echo", False):
            return ""
        return f"shared {name} ({human_size(size)}) with {target}: /get {file_id}"

    def _get(self, running: _Running, progress: Callable[[int, int], None], file_id: str, directory: Path) -> str:
        def named(name: str) -> None:  # the progress line shows the file's name from now on
            running.name = name
            self.changed()

        path = get_file(self.client, file_id, directory, progress, self._note(running), self.timeout, named)
        running.name = path.name
        return f"saved {path} ({human_size(path.stat().st_size)})"

    def _note(self, running: _Running) -> Callable[[str], None]:
        return lambda text: self.say(f"{running.verb} {running.name}: {text}")
