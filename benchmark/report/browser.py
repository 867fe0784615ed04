"""Floor 6: a headless Chromium driven from its command line — the report's screenshot, and the DOM of a page
after its scripts ran (what the browser test reads). No Python dependency: Debian's ``chromium`` package.

The browser runs without a sandbox (a container's root cannot have one; it only opens the report's own files),
with a throw-away profile, and with every host name unresolvable, so a page that reached for the network would
fail visibly instead of fetching.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MISSING = "no headless Chromium here (Debian/Ubuntu: `apt-get install chromium`)"


class BrowserError(RuntimeError):
    """Chromium ran but did not do what was asked (it crashed, or timed out)."""


def find() -> str | None:
    """The path of a Chromium executable, or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _run(page: Path, *flags: str, timeout: float = 120) -> str:
    exe = find()
    if exe is None:
        raise BrowserError(MISSING)
    with tempfile.TemporaryDirectory(prefix="tdabench-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
               f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
               "--force-device-scale-factor=1", *flags, Path(page).resolve().as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"chromium did not finish {page} within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BrowserError(f"chromium exited with {done.returncode} on {page}: {done.stderr.strip()[-800:]}")
    return done.stdout


def dump_dom(page: Path, budget_ms: int = 5000, window: tuple[int, int] | None = None) -> str:
    """The page's DOM after it loaded and its scripts ran (``budget_ms`` of virtual time for timers), laid out in a
    window of ``window`` (width, height) pixels where given."""
    size = [f"--window-size={window[0]},{window[1]}"] if window else []
    return _run(page, *size, f"--virtual-time-budget={budget_ms}", "--dump-dom")


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1600, 1500)) -> Path:
    """A PNG of the top ``size`` (width, height) of the page."""
    out = Path(out).resolve()
    _run(page, f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=3000", f"--screenshot={out}")
    if not out.is_file():
        raise BrowserError(f"chromium wrote no screenshot of {page}")
    return out
