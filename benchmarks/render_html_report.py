"""Render the compile HTML report in headless Chromium and save a screenshot (issue 5 §6).

    python benchmarks/render_html_report.py      # needs Debian's chromium (apt-get install chromium)

Runs ``mpcompile demo --model digits_vit`` into benchmarks/_work/render/, screenshots the
HTML page, and writes benchmarks/results/report_screenshot.png plus a JSON record of the
run (command, date, Chromium version, page size). Exits 6 when Chromium is not installed.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "render"
RESULTS = HERE / "results"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found (apt-get install chromium); nothing rendered", file=sys.stderr)
        return 6
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "mpcompile", "-q", "demo", "--model", "digits_vit", "--out-dir", str(WORK)],
                   check=True, stdout=subprocess.DEVNULL)
    page = WORK / "digits_vit.sparse.report.html"
    shot = RESULTS / "report_screenshot.png"
    subprocess.run([browser, *FLAGS, f"--user-data-dir={WORK / 'profile'}", "--window-size=1300,2600",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip()
    record = {"command": "python benchmarks/render_html_report.py", "date": dt.date.today().isoformat(),
              "browser": version, "page_bytes": page.stat().st_size, "screenshot": shot.name,
              "screenshot_bytes": shot.stat().st_size}
    (RESULTS / "report_render.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
