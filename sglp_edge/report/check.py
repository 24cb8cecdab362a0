"""Check a report.html the way a person sees it: load it in headless Chromium (Debian's
``chromium``, driven by Playwright; no browser is downloaded) and verify that the constraint
table has rows and that every plot image decoded to a non-empty picture.

    python -m sglp_edge.report.check runs/default/report.html [--screenshot shot.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.board.errors import UserError

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    raise UserError("no Chromium found: apt-get install chromium (Debian) to check reports in a browser")


def check_report(html: str | Path, screenshot: str | Path | None = None) -> dict[str, Any]:
    html = Path(html).resolve()
    if not html.is_file():
        raise UserError(f"report {html} does not exist")
    try:
        from playwright.sync_api import sync_playwright  # heavy: optional, only for the check
    except ImportError:
        raise UserError("the report check needs Playwright: pip install playwright (no browser download needed)") from None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(html.as_uri(), wait_until="load")
            info = page.evaluate("""() => {
                const rows = t => { const e = document.querySelector(t); return e ? e.querySelectorAll('tr').length - 1 : -1; };
                const imgs = [...document.querySelectorAll('img.plot')].map(i => ({id: i.id, w: i.naturalWidth, h: i.naturalHeight, complete: i.complete}));
                return {title: document.title, verdict: (document.querySelector('#verdict') || {}).innerText || null,
                        constraint_rows: rows('#constraints'), result_rows: rows('#results'), plots: imgs};
            }""")
            if screenshot:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    info["ok"] = (info["constraint_rows"] > 0 and info["result_rows"] > 0 and len(info["plots"]) >= 3
                  and all(p["complete"] and p["w"] > 100 and p["h"] > 100 for p in info["plots"]))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="check a sglp-edge report.html in headless Chromium")
    ap.add_argument("html")
    ap.add_argument("--screenshot", default=None)
    a = ap.parse_args(argv)
    try:
        info = check_report(a.html, a.screenshot)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{info['title']}: {info['constraint_rows']} constraint rows, {info['result_rows']} result rows, "
          f"plots {[(p['id'], p['w'], p['h']) for p in info['plots']]}; verdict: {info['verdict']}")
    print("report check: " + ("ok" if info["ok"] else "FAILED"))
    return 0 if info["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
