"""Open a run's report.html in headless Chromium and check what a reader would see.

Used by tests/test_pipeline.py on the tiny run, and by hand on any run:

    .venv/bin/python tests/browser.py runs/demo-...    # prints the findings, writes report.png beside it
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """The system Chromium (Debian's package), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def check_report(run_dir: Path, filter_source: str | None = None) -> dict:
    """Load report.html, filter the sample table, save report.png; return what was found."""
    from playwright.sync_api import sync_playwright

    page_path = Path(run_dir) / "report.html"
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=chromium(), headless=True,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        sections = page.eval_on_selector_all("section[id]", "els => els.map(e => e.id)")
        plots = page.eval_on_selector_all("figure.plot", """figs => figs.map(f => {
            const svg = f.querySelector('svg'), box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
            const data = [...f.querySelectorAll('[id^="data-"] path')].filter(p => (p.getAttribute('d') || '').length > 10);
            return {plot: f.dataset.plot, width: box.width, height: box.height, data_paths: data.length};
        })""")
        rows = page.eval_on_selector_all("#samples-table tbody tr", "rs => rs.map(r => r.dataset.source)")
        headings = page.eval_on_selector_all("h3", "hs => hs.map(h => h.textContent)")
        filtered = None
        if filter_source:
            page.select_option("#f-source", filter_source)
            visible = page.eval_on_selector_all("#samples-table tbody tr:not([hidden])",
                                                "rs => rs.map(r => r.dataset.source)")
            filtered = {"source": filter_source, "visible": len(visible), "all_match": all(v == filter_source for v in visible),
                        "count_text": page.text_content("#f-count")}
            page.select_option("#f-source", "")
        shot = Path(run_dir) / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        context.close()
    return {"sections": sections, "headings": headings, "plots": plots, "rows": len(rows), "sources": sorted(set(rows)),
            "filtered": filtered, "console_errors": errors, "screenshot": str(shot)}


if __name__ == "__main__":
    print(json.dumps(check_report(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None), indent=1))
