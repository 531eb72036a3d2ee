"""A real terminal for tests: a private tmux server running one command in a window of known size.

tmux renders what the program writes exactly as a user's terminal would, so ``screen()`` is what a
person would see (``capture-pane``), history included; keys go in with ``send-keys``, pastes with
``paste-buffer -p`` (bracketed, as a terminal pastes when the program asked for it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


class Tmux:
    def __init__(self, argv: list[str], *, width: int = 100, height: int = 24, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.socket = f"securechat-test-{uuid.uuid4().hex[:12]}"
        self.status_file = Path(f"/tmp/{self.socket}.status")
        environment = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", **(env or {})}
        environment.pop("TMUX", None)
        environment.pop("NO_COLOR", None)
        # The exit status lands in a file; the pane then stays until the test has read it.
        command = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self.status_file))}; sleep 600"
        self._tmux("new-session", "-d", "-x", str(width), "-y", str(height), command, env=environment,
                   cwd=cwd)
        self._tmux("set-option", "-g", "history-limit", "5000")

    def _tmux(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                              text=True, env=env, cwd=cwd, timeout=10, check=False)
        if done.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def keys(self, *keys: str) -> None:
        """Named keys (``Enter``, ``Tab``, ``C-c``, ``PageUp``) or words, as tmux send-keys takes them."""
        self._tmux("send-keys", *keys)

    def type(self, text: str) -> None:
        """Literal text, typed as fast as tmux can write it."""
        self._tmux("send-keys", "-l", text)

    def paste(self, text: str) -> None:
        """A bracketed paste of ``text``, as a terminal pastes it, once the screen has stopped changing:
        prompt_toolkit turns bracketed paste off while it prints a line above the prompt, and a paste
        landing then arrives as typed lines (under CI's load, a 30-line paste was sent line by line)."""
        self.wait_quiet()
        self._tmux("set-buffer", "--", text)
        self._tmux("paste-buffer", "-p", "-d")

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-x", str(width), "-y", str(height))

    def screen(self, *, history: bool = False, escapes: bool = False) -> str:
        """What the window shows (with ``history``, the scrollback too; with ``escapes``, the colours)."""
        args = ["capture-pane", "-p", "-J"]
        if history:
            args += ["-S", "-"]
        if escapes:
            args.append("-e")
        return self._tmux(*args)

    def wait_for(self, text: str, timeout: float = 15.0, *, history: bool = True) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen(history=history)
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared on the screen; it shows:\n{shown}")
            time.sleep(0.05)

    def wait_until(self, predicate: object, timeout: float = 15.0, *, history: bool = True) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen(history=history)
            if predicate(shown):  # type: ignore[operator]
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never got there; it shows:\n{shown}")
            time.sleep(0.05)

    def wait_quiet(self, quiet: float = 0.3, timeout: float = 15.0) -> str:
        """The screen, once it has not changed for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        shown, since = self.screen(), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never settled; it shows:\n{shown}")
            time.sleep(0.05)
            now = self.screen()
            if now != shown:
                shown, since = now, time.monotonic()
        return shown

    def exit_status(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status_file.exists() and self.status_file.read_text().strip():
                return int(self.status_file.read_text())
            time.sleep(0.05)
        raise AssertionError(f"the program did not exit; the screen shows:\n{self.screen(history=True)}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)
        self.status_file.unlink(missing_ok=True)
