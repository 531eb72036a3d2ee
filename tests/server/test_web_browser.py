"""The browser client in a real browser: headless Chromium (Debian's), a real ``securechat serve``, real peers.

Each test starts the real server command (it mints its certificates as on a user's first run) and a
Chromium that trusts that CA through an NSS database, as a person's browser would after the onboarding
page. The peers are ``ncat --ssl`` and the terminal client (``securechat connect``, line mode). Slow: a
browser start is a second or two.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import (
    DESKTOP,
    PHONE,
    browser,
    close,
    resize,
    rows,
    skip_without_browser,
    wait_for,
)
from tests.conftest import LOOPBACK
from tests.relay import Relay
from tests.serving import Server, env

pytestmark = [pytest.mark.slow, skip_without_browser]

# SECURECHAT_SCREENSHOTS=docs/screenshots pytest ... -k screenshots: refresh the README's pictures.
SCREENSHOTS = os.environ.get("SECURECHAT_SCREENSHOTS")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "server")
    yield s
    s.stop()


class Peer:
    """A line client subprocess (ncat, or securechat connect in line mode) read by a thread."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env(), bufsize=1)
        self.lines: list[str] = []
        import threading

        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def expect(self, text: str, timeout: float = 10) -> str:
        return wait_for(lambda: next((line for line in self.lines if text in line), None), timeout,
                        f"{text!r} in {self.lines!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _ncat(server: Server, nick: str) -> Peer:
    peer = Peer(["ncat", "--ssl", "--ssl-verify", "--ssl-trustfile", str(server.ca), "localhost", str(server.port)],
                server.home)
    peer.expect("* securechat: send your nickname")
    peer.say(nick)
    peer.expect(f"* welcome, {nick}!")
    return peer


def _terminal(server: Server, nick: str) -> Peer:
    peer = Peer([sys.executable, "-m", "securechat", "connect", "localhost", "--port", str(server.port), "--ca",
                 str(server.ca), "--nick", nick], server.home)
    peer.expect(f"* welcome, {nick}!")
    return peer


def _join(driver: Any, url: str, nick: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    field = driver.find_element(By.ID, "nick")
    if nick:
        field.clear()
        field.send_keys(nick)
    field.send_keys(Keys.ENTER)  # Enter joins
    wait_for(lambda: driver.find_element(By.ID, "chat").is_displayed(), 10, "the chat screen")


def _type(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)  # Enter sends


def _shown(driver: Any, text: str, timeout: float = 10) -> str:
    return wait_for(lambda: next((r for r in rows(driver) if text in r), None), timeout,
                    f"{text!r} on the page; rows: {rows(driver)!r}")


def test_the_browser_chats_with_ncat_and_the_terminal_client(server: Server, tmp_path: Path) -> None:
    if shutil.which("ncat") is None:
        pytest.skip("ncat not installed (Debian package ncat)")
    driver = browser(server.ca, PHONE)
    peers: list[Peer] = []
    try:
        _join(driver, f"https://localhost:{server.port}/", "alice")
        # A hidden tab notifies mentions (the permission granted, as after the "Notify me" button).
        driver.execute_script("""
            window.__notes = [];
            window.Notification = class { static permission = 'granted';
                constructor(title, options) { window.__notes.push([title, options.body]); } };""")
        bob = _ncat(server, "bob")
        carol = _terminal(server, "carol")
        peers += [bob, carol]
        _type(driver, "hello from the browser")
        assert bob.expect("[alice] hello from the browser") == "[alice] hello from the browser"
        carol.expect("[alice] hello from the browser")

        hostile = "<img src=x onerror=\"document.title='pwned';window.__pwned=1\"><script>window.__pwned=2</script>"
        bob.say(hostile)
        _shown(driver, "<img src=x")
        driver.execute_script("Object.defineProperty(document, 'hidden', {configurable: true, get: () => true})")
        carol.say("alice: can you look at my PR?")
        mention = _shown(driver, "can you look at my PR")
        assert driver.execute_script("return window.__pwned") is None  # ran nothing
        assert driver.title != "pwned"
        assert driver.execute_script("return document.querySelectorAll('#logs img, #logs script').length") == 0
        assert f"bob{hostile}" in rows(driver)[-2].replace(" ", " ")  # shown as the very text sent
        assert driver.execute_script(
            "return [...document.querySelectorAll('.log li.mention')].map(li => li.textContent)") == [mention]
        assert driver.execute_script("return window.__notes") == [
            ["carol in #lobby", "alice: can you look at my PR?"]]
        driver.execute_script("delete document.hidden")

        # Who is online, /msg both ways, rooms.
        wait_for(lambda: {"alice", "bob", "carol"} <= set(driver.execute_script(
            "return [...document.querySelectorAll('#people li')].map(li => li.textContent)")), 10, "people list")
        _type(driver, "/msg bob psst")
        bob.expect("[alice -> bob] psst")
        bob.say("/msg alice back at you")
        _shown(driver, "back at you")
        _type(driver, "/join dev")
        wait_for(lambda: driver.find_element("id", "room-title").text == "#dev", 10, "#dev")
        bob.say("/join dev")
        bob.say("in dev now")
        _shown(driver, "in dev now")
        carol.say("still in the lobby")  # another room: counted as unread there, not shown here
        wait_for(lambda: driver.execute_script(
            "return document.querySelector('#rooms li:not(.current) .unread')?.textContent") == "1", 10, "unread")
        assert not any("still in the lobby" in r for r in rows(driver))

        _screenshots(driver, tmp_path, bob, carol)
    finally:
        for peer in peers:
            peer.stop()
        close(driver)


def _screenshots(driver: Any, tmp_path: Path, bob: Peer, carol: Peer) -> None:
    """Phone and desktop pictures of the session above (the README's), checked to be the sizes asked."""
    _type(driver, "/join lobby")
    wait_for(lambda: driver.find_element("id", "room-title").text == "#lobby", 10, "#lobby")
    bob.say("/join lobby")
    for who, line in ((carol, "lunch at 12:30? the usual place"), (bob, "/me is in"),
                      (carol, "bob: 🍜 or 🍕?")):
        who.say(line)
    _shown(driver, "or 🍕?")
    _type(driver, "count me in 👍")
    _shown(driver, "count me in")
    out = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    for name, size in (("web-phone.png", PHONE), ("web-desktop.png", DESKTOP)):
        resize(driver, size)
        time.sleep(0.3)
        driver.save_screenshot(str(out / name))
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(png[16:20], "big") == size[0] and int.from_bytes(png[20:24], "big") == size[1]


def test_an_upgrade_from_another_origin_is_refused(server: Server) -> None:
    driver = browser(server.ca, DESKTOP)
    try:
        # The plain-HTTP onboarding page is another origin (http://, not https://) on the very same port.
        driver.get(f"http://localhost:{server.port}/")
        assert "CA SHA-256 fingerprint" in driver.page_source
        fingerprint = server.cli("fingerprint", "certs/ca.pem").stdout.split()[-1]
        assert fingerprint in driver.page_source
        outcome = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const ws = new WebSocket('wss://localhost:' + arguments[0] + '/ws');
            ws.onopen = () => done('opened');
            ws.onclose = (e) => done('closed ' + e.code);""", server.port)
        assert outcome == "closed 1006"  # the handshake failed: never opened
        server.wait_log("refused a WebSocket from another origin ('http://localhost:")
        # The page's own origin is let in.
        driver.get(f"https://localhost:{server.port}/")
        assert driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const ws = new WebSocket('wss://' + location.host + '/ws');
            ws.onmessage = (e) => { done(e.data); ws.close(); };
            ws.onclose = (e) => done('closed ' + e.code);""") == "* securechat: send your nickname"
    finally:
        close(driver)


def test_a_tab_resumes_after_its_connection_is_cut_and_shows_the_missed_lines_once(server: Server) -> None:
    if shutil.which("ncat") is None:
        pytest.skip("ncat not installed (Debian package ncat)")
    relay = Relay((LOOPBACK, server.port))
    driver = browser(server.ca, PHONE)
    bob = None
    try:
        _join(driver, f"https://localhost:{relay.port}/", "alice")
        bob = _ncat(server, "bob")
        bob.say("before the cut")
        _shown(driver, "before the cut")
        time.sleep(0.3)  # the browser's /session is in (its answer is the resume token)
        relay.cut()
        server.wait_log("alice disconnected")
        relay.restore()  # the network is back; the page reconnects on its own (after 1 s)
        for i in range(3):
            bob.say(f"missed {i}")
        _shown(driver, "missed 2", timeout=15)
        server.wait_log("resumed alice")
        bob.say("after the resume")
        _shown(driver, "after the resume")
        texts = rows(driver)
        for line in ("before the cut", "missed 0", "missed 1", "missed 2", "after the resume"):
            assert sum(r.endswith(line) for r in texts) == 1, (line, texts)
        for i in range(3):  # shown as missed lines (the replay's label in place of the time)
            assert next(r for r in texts if r.endswith(f"missed {i}")).startswith("missed "), texts
        assert not any("left" in r for r in texts)  # nobody saw alice leave
    finally:
        if bob is not None:
            bob.stop()
        close(driver)
        relay.close()


def test_a_revoked_browser_device_is_closed_within_two_seconds(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", "--require-client-cert")
    driver = browser(server.ca, PHONE)
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        # Without a device, the browser is told what it needs.
        driver.get(f"https://localhost:{server.port}/")
        driver.find_element(By.ID, "nick").send_keys("mallory", Keys.ENTER)
        wait_for(lambda: "one-time link" in driver.find_element(By.ID, "login-error").text, 10, "refusal")

        done = server.cli("invite", "alice", "--web", "--host", "localhost", "--port", str(server.port))
        assert done.returncode == 0, done.stderr
        link = done.stdout.splitlines()[1].strip()
        _join(driver, link, "")
        assert "#invite=" not in driver.current_url  # the token left the address bar
        wait_for(lambda: driver.find_element(By.ID, "room-title").text == "#lobby", 10, "#lobby")
        assert "alice (browser)" in server.cli("certs").stdout
        _type(driver, "/nick mallory")
        _shown(driver, "nickname refused: your nickname is bound")

        # The link worked once: a second browser with it gets nothing.
        other = browser(server.ca, PHONE)
        try:
            other.get(link)
            other.find_element(By.ID, "join").click()
            wait_for(lambda: "already been used" in other.find_element(By.ID, "login-error").text, 10, "used link")
        finally:
            close(other)

        revoked = server.cli("revoke", "alice")
        assert revoked.returncode == 0, revoked.stderr
        since = time.monotonic()
        wait_for(lambda: "revoked" in driver.find_element(By.ID, "status").text, 5, "the revocation")
        assert time.monotonic() - since < 2.0
        driver.refresh()  # and the browser cannot come back
        driver.find_element(By.ID, "join").click()
        wait_for(lambda: "revoked" in driver.find_element(By.ID, "login-error").text, 10, "refused device")
    finally:
        close(driver)
        server.stop()
