"""Check the grid's tree in the MLflow UI with a real browser, by hand (not part of the suite: it needs Chromium).

    apt-get install chromium && python -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python tests/ui_check.py http://127.0.0.1:PORT/#/experiments/ID/runs tree.png

Opens the experiment's runs table in headless Chromium (Debian's, no browser download), expands the newest grid
run and each stage run under it, screenshots the page, and fails unless the tree is there: a "grid …" run whose
children are the stages that had work, each with its cells' runs beneath.
"""

from __future__ import annotations

import sys

from playwright.sync_api import sync_playwright

EXPAND = "button[data-component-id*='runnamecellrenderer']"   # the +/- toggle of a run with children
NAMES = "[id^='cell-attributes.`Run Name`']"
STAGES = ("pretrain", "finetune", "scratch", "attack")


def main(url: str, out: str) -> int:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        page.goto(url)
        page.wait_for_selector("text=grid 20", timeout=60000)
        page.wait_for_timeout(1500)
        opened: set[str] = set()
        for _ in range(8):   # the grid run first, then each stage run as it appears
            buttons = page.locator(EXPAND)
            for i in range(buttons.count()):
                cell = buttons.nth(i).evaluate("b => b.closest('[id^=\"cell-attributes\"]').innerText")
                name = cell.split("\n")[-1].strip()   # the cell also shows the run's colour code
                if name in opened or not (name.startswith("grid ") or name in STAGES):
                    continue
                opened.add(name)
                buttons.nth(i).click()
                page.wait_for_timeout(700)
                break
        names = [n.split("\n")[-1].strip() for n in page.locator(NAMES).all_inner_texts()]
        page.screenshot(path=out)
        browser.close()
    grid = next(i for i, n in enumerate(names) if n.startswith("grid "))
    stages = [n for n in names[grid + 1:] if n in STAGES]
    print(f"screenshot: {out}\nrows: {len(names)}; under {names[grid]!r}: stages {stages}")
    assert stages, "no stage run under the grid run: the tree is missing"
    assert len(names) > grid + 1 + len(stages), "the stage runs show no cells beneath them"
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
