"""Screenshot the top of a run's report.html in headless Chromium (for the README).

    .venv/bin/python docs/screenshot_report.py RUN docs/report.png

Only the top of the page (headline, curves, per-class bars) is captured: the example grid
further down shows dataset images, which do not belong in this repository.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    run, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1500})
        page.goto((run / "report.html").as_uri())
        sections = page.locator("h2").all_inner_texts()
        print("sections:", ", ".join(sections))
        page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1200, "height": 1500})
        browser.close()


if __name__ == "__main__":
    main()
