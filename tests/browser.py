"""A real browser for tests: Debian's chromium, headless, driven by Selenium through chromedriver.

The browser trusts the test server's CA the way a person's would: the CA certificate is added to an NSS
database (``certutil``, Debian's libnss3-tools) under a throwaway ``HOME``, where Chromium on Linux looks
for the user's trusted authorities. Certificate verification stays on; nothing is ignored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


skip_without_browser = pytest.mark.skipif(missing() is not None, reason=missing() or "")
