"""Files in the browser page, in a real headless Chromium against a real ``securechat serve``.

The attach button's file picker, a drop on the chat, the camera input (``accept=image/*`` + ``capture``):
each sends over the page's own upload socket; images come back as thumbnails, other files as links that
download. The terminal client and ``securechat send`` are the other side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.browser import DESKTOP, PHONE, browser, close, resize, rows, skip_without_browser, wait_for
from tests.server.test_web_browser import Peer, _join, _ncat, _shown, _terminal
from tests.serving import Server, env

pytestmark = [pytest.mark.slow, skip_without_browser]

SCREENSHOTS = os.environ.get("SECURECHAT_SCREENSHOTS")


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG, ``rgb`` fading to dark from top to bottom (a browser decodes it; nothing random in it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    raw = b"".join(b"\x00" + bytes(c * (height - y // 2) // height for c in rgb) * width for y in range(height))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _pick(driver: Any, input_id: str, path: Path) -> None:
    """Choose ``path`` in a file input, as the picker (or the phone's camera) would hand it over."""
    from selenium.webdriver.common.by import By

    driver.execute_script(f"document.getElementById('{input_id}').hidden = false")  # Selenium types into shown ones
    driver.find_element(By.ID, input_id).send_keys(str(path))
    driver.execute_script(f"document.getElementById('{input_id}').hidden = true")


def _thumbnail_shown(driver: Any, name: str) -> bool:
    return bool(driver.execute_script(
        "const img = [...document.querySelectorAll('.log:not([hidden]) img.thumb')].find(i => i.alt === arguments[0]);"
        "return Boolean(img && !img.hidden && img.complete && img.naturalWidth > 0)", name))


def test_attach_drop_and_camera_send_files_and_images_come_back_inline(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    driver = browser(server.ca, DESKTOP)
    peers: list[Peer] = []
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        _join(driver, f"https://localhost:{server.port}/", "alice")
        bob = _terminal(server, "bob")
        peers.append(bob)
        # The attach button's picker: an image, shown inline once it is shared.
        photo = tmp_path / "sunset.png"
        photo.write_bytes(png(320, 180, (250, 120, 40)))
        assert driver.find_element("id", "attach").is_displayed()
        _pick(driver, "file-pick", photo)
        line = bob.expect("* alice shared sunset.png")
        file_id = line.rsplit(" ", 1)[1]
        wait_for(lambda: _thumbnail_shown(driver, "sunset.png"), 15, "the thumbnail")
        saved = subprocess.run([sys.executable, "-m", "securechat", "get", f"localhost:{server.port}", file_id,
                                "--ca", str(server.ca), "--nick", "checker", "--out", str(tmp_path)],
                               capture_output=True, text=True, env=env(), timeout=60)
        assert saved.returncode == 0, saved.stderr
        assert Path(saved.stdout.strip()).read_bytes() == photo.read_bytes()  # what the browser sent, whole
        # The phone's camera: an input taking images, asking for the camera.
        camera = driver.find_element("id", "camera-pick")
        assert camera.get_attribute("accept") == "image/*" and camera.get_attribute("capture") == "environment"
        snap = tmp_path / "IMG_0001.png"
        snap.write_bytes(png(30, 30, (40, 90, 200)))
        _pick(driver, "camera-pick", snap)
        bob.expect("* alice shared IMG_0001.png")
        wait_for(lambda: _thumbnail_shown(driver, "IMG_0001.png"), 15, "the camera's thumbnail")
        # A drop on the chat.
        driver.execute_script("""
            const dt = new DataTransfer();
            dt.items.add(new File(["dropped on the chat\\n"], "notes.txt", {type: "text/plain"}));
            document.getElementById('logs').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));""")
        bob.expect("* alice shared notes.txt (20 bytes)")
        # Another's file: a link, which downloads it (a file that is no image is never shown).
        trap = tmp_path / "trap.png"
        trap.write_bytes(b"<html><script>parent.__pwned = 1</script></html>")
        sent = subprocess.run([sys.executable, "-m", "securechat", "send", f"localhost:{server.port}", str(trap),
                               "--ca", str(server.ca), "--nick", "mallory"], capture_output=True, text=True,
                              env=env(), timeout=60)
        assert sent.returncode == 0, sent.stderr
        _shown(driver, "malloryshared trap.png")  # the nick and the text are spans side by side
        driver.execute_script(
            "[...document.querySelectorAll('.log:not([hidden]) a.file-name')].find(a => a.textContent === "
            "'trap.png').click()")
        wait_for(lambda: (downloads / "trap.png").exists() and (downloads / "trap.png").read_bytes() ==
                 trap.read_bytes(), 15, "the download")
        assert driver.execute_script("return window.__pwned") is None
        assert not _thumbnail_shown(driver, "trap.png")  # not an image by its bytes: no picture
        assert any("aliceshared sunset.png" in r for r in rows(driver))
        if SCREENSHOTS:
            for name, size in (("web-files-phone.png", PHONE), ("web-files-desktop.png", DESKTOP)):
                resize(driver, size)
                wait_for(lambda: _thumbnail_shown(driver, "sunset.png"), 5, "the thumbnail")
                Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(Path(SCREENSHOTS) / name))
    finally:
        for peer in peers:
            peer.stop()
        close(driver)
        server.stop()


def test_a_refusal_stays_on_the_status_line_while_the_page_talks_to_the_server(tmp_path: Path) -> None:
    """The page's paced sender cleared the status line whenever its queue emptied, so the "/who" it sends
    on its own when someone joins wiped a refusal the person had not read yet (a flaky test showed it)."""
    if shutil.which("ncat") is None:
        pytest.skip("needs ncat")
    server = Server(tmp_path / "server", "--max-file-size", "1M")
    driver = browser(server.ca, PHONE)
    bob = None
    try:
        _join(driver, f"https://localhost:{server.port}/", "alice")
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(2 << 20))
        _pick(driver, "file-pick", big)
        refusal = "big.bin was not sent: too large"
        wait_for(lambda: refusal in driver.find_element("id", "status").text, 15, "the refusal")
        bob = _ncat(server, "bob")  # the page refreshes its list of people: a "/who" of its own
        _shown(driver, "bob joined")
        time.sleep(1.0)  # the refresh waits 300 ms, then goes through the paced sender
        assert refusal in driver.find_element("id", "status").text
    finally:
        if bob is not None:
            bob.stop()
        close(driver)
        server.stop()


def test_a_big_upload_shows_its_progress_and_a_refusal_is_said(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", "--max-file-size", "2M")
    driver = browser(server.ca, PHONE)
    try:
        _join(driver, f"https://localhost:{server.port}/", "alice")
        big = tmp_path / "video.mp4"
        big.write_bytes(os.urandom(3 << 20))
        _pick(driver, "file-pick", big)
        wait_for(lambda: "video.mp4 was not sent: too large: 3.0 MiB, this server takes files up to 2.0 MiB"
                 in driver.find_element("id", "status").text, 15, "the refusal on the status line")
        ok = tmp_path / "clip.mp4"
        ok.write_bytes(os.urandom(3 << 19))
        seen: list[str] = []
        driver.execute_script("""
            window.__status = [];
            new MutationObserver(() => window.__status.push(document.getElementById('status').textContent))
              .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});""")
        _pick(driver, "file-pick", ok)
        _shown(driver, "aliceshared clip.mp4 (1.5 MiB)")
        seen = driver.execute_script("return window.__status")
        assert any(s.startswith("sending clip.mp4: ") and s.endswith("%") or "%, " in s for s in seen), seen
    finally:
        close(driver)
        server.stop()
