"""A real browser for tests: Debian's chromium, headless, driven by Selenium through chromedriver.

The browser trusts the test server's CA the way a person's would: the CA certificate is added to an NSS
database (``certutil``, Debian's libnss3-tools) under a throwaway ``HOME``, where Chromium on Linux looks
for the user's trusted authorities. Certificate verification stays on; nothing is ignored.

Also here: ``securechat serve`` as a subprocess (the browser tests use the real command, certificates
minted on first run as a user's would be).
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LOOPBACK

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# What the browser needs to run headless here (no sandbox as root, no network but loopback: the
# background services would only try to reach Google and fail).
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-features=Translate,MediaRouter,OptimizationHints"]

PHONE = (390, 844)
DESKTOP = (1280, 800)


def missing() -> str | None:
    """Why browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not installed (Debian packages chromium, chromium-driver)"
    if shutil.which("certutil") is None:
        return "certutil not installed (Debian package libnss3-tools)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[test]')"
    return None


def browser(ca_pem: Path, size: tuple[int, int] = DESKTOP) -> Any:
    """A headless Chromium that trusts ``ca_pem`` (and nothing was switched off); ``quit()`` it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    home = Path(tempfile.mkdtemp(prefix="securechat-browser-"))
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, capture_output=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "securechat test CA", "-i",
                    str(ca_pem)], check=True, capture_output=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}", f"--window-size={size[0]},{size[1]}"]:
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.securechat_home = home
    resize(driver, size)
    return driver


def resize(driver: Any, size: tuple[int, int]) -> None:
    """Lay the page out at exactly ``size`` CSS pixels (a phone's is narrower than any window)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600})


def close(driver: Any) -> None:
    home = getattr(driver, "securechat_home", None)
    try:
        driver.quit()
    finally:
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def rows(driver: Any) -> list[str]:
    """The text of every row of the room shown, in order."""
    return list(driver.execute_script(
        "return [...document.querySelectorAll('.log:not([hidden]) li')].map(li => li.textContent)"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Server:
    """``securechat serve`` in ``home`` (certificates minted there on first run); stderr is its log file."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = home / "serve.log"
        self._log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "serve", "--listen", LOOPBACK, "--port", str(self.port),
             "--data", str(home / "data"), "-v", *args],
            cwd=home, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env())
        self.out: queue.Queue[str] = queue.Queue()
        self.printed: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_out("[SERVER] Waiting for connections")

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "ca.pem"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))

    def wait_out(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.1)
            except queue.Empty:
                continue
            self.printed.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"{prefix!r} never printed; got {self.printed!r}")

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never logged; log: {self.log_path.read_text()[-3000:]!r}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "securechat", *args], cwd=self.home, capture_output=True,
                              text=True, timeout=30, env=env())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


skip_without_browser = pytest.mark.skipif(missing() is not None, reason=missing() or "")
