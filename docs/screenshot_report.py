"""Screenshot a run's report.html in headless Chromium (for the README).

    .venv/bin/python docs/screenshot_report.py RUN docs/report.png [--no-examples]

The picture stacks three parts of the page: the top (headline, which rows the figures are of,
the warning banner, training curves, per-class bars), the precision-recall small multiples, and
the first row of example cards. Take it from a run on the synthetic data (`mmtag demo`): the
cards show the run's images, and a real dataset's images do not belong in this repository
(`--no-examples` leaves the cards out).
"""
from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, sync_playwright

WIDTH = 1200
GAP = 16  # white pixels between the stacked parts


def _top(page: Page, selector: str) -> float:
    return float(page.locator(selector).bounding_box()["y"])  # type: ignore[index]


def _parts(page: Page, examples: bool) -> list[tuple[float, float]]:
    """(top, bottom) page offsets of the parts to keep."""
    parts = [(0.0, _top(page, "#per-class-confusion-counts")),
             (_top(page, "#precision-recall-curves"), _top(page, "#threshold-vs-f1"))]
    if examples:
        cards = page.locator("#validation-examples ~ .grid .card")
        first_row = [cards.nth(i).bounding_box() for i in range(min(4, cards.count()))]
        bottom = max(b["y"] + b["height"] for b in first_row if b) if first_row else 0.0
        parts.append((_top(page, "#validation-examples"), bottom + 8))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-examples", action="store_true", help="leave the example cards out")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
        page.goto((args.run.resolve() / "report.html").as_uri())
        print("sections:", ", ".join(page.locator("h2").all_inner_texts()))
        parts = _parts(page, not args.no_examples)
        full = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        browser.close()
    crops = [full.crop((0, int(top), WIDTH, int(bottom))) for top, bottom in parts]
    sheet = Image.new("RGB", (WIDTH, sum(c.height for c in crops) + GAP * (len(crops) - 1)), "white")
    y = 0
    for crop in crops:
        sheet.paste(crop, (0, y))
        y += crop.height + GAP
    # 256 colours: the page is flat colours and text, and the PNG a third of the size.
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        args.out, optimize=True)
    print(f"{args.out}: {sheet.width}x{sheet.height}")


if __name__ == "__main__":
    main()
