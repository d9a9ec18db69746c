"""Time the app as a user meets it: launch, first diagnostics, merges, diagnostics refreshes and reports.

``python tools/app_timing.py [--merges 3] [--refreshes 5] [--reports 2] [--suite SOURCE]`` launches ``app.py`` in a
subprocess on a free port (``HF_HUB_OFFLINE=1``), times its first HTTP 200, then drives the page in Debian's Chromium
through Playwright: the first diagnostics, ``--merges`` clicks of "Merge & evaluate" (the merge and evaluation seconds
as the page reports them, and the wall time from the click to the run's status), and ``--refreshes`` diagnostics
refreshes after a slider moved by one keyboard step (the "updated in" the page reports, and the wall time from the
key to the new status), and ``--reports`` clicks of "Whole-model report" (the "made in" the page reports, and the
wall time from the click to the report's line). It prints a table and the machine's load average, and stops the app.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
UPDATED = re.compile(r"updated in ([\d.]+) s")
RUN = re.compile(r"merge ([\d.]+) s \+ evaluation ([\d.]+) s")
MADE = re.compile(r"made in ([\d.]+) s")
# the status line's own text (the element also holds Gradio's progress text while a refresh runs)
STATUS_JS = """() => { const el = document.querySelector('#diag-status');
    return ((el && (el.querySelector('.prose') || el)) || {}).innerText?.trim() || ''; }"""
# the report's line, without Gradio's progress text beside it while a report runs
REPORT_JS = STATUS_JS.replace("#diag-status", "#report-status")
REPORTED_JS = f"prev => {{ const t = ({REPORT_JS})(); return t !== prev && t.includes(' made in '); }}"
CHANGED_JS = f"prev => {{ const t = ({STATUS_JS})(); return t !== prev && t.includes('updated in'); }}"
# the first slider of the method's controls that one step right can move (TSV-M's rank fraction starts at its end)
SLIDER_JS = """() => [...document.querySelectorAll('input[type=range]')]
    .findIndex(s => Number(s.value) + Number(s.step || 0) <= Number(s.max) + 1e-12)"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_200(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with status {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no HTTP 200 from {url} within {timeout:.0f} s")


def drive(url: str, merges: int, refreshes: int, reports: int, timeout_ms: int) -> dict:
    from playwright.sync_api import sync_playwright

    out: dict = {"merges": [], "refreshes": [], "reports": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
        page.set_default_timeout(timeout_ms)
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function(f"() => ({STATUS_JS})().includes('updated in')")
        out["first_diag_s"] = time.perf_counter() - t0
        status = page.evaluate(STATUS_JS)
        out["first_diag_reported_s"] = float(UPDATED.search(status).group(1))
        out["first_status"] = status
        for run in range(1, merges + 1):
            t = time.perf_counter()
            page.get_by_role("button", name="Merge & evaluate").click()
            page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{run}')")
            wall = time.perf_counter() - t
            merge_s, eval_s = map(float, RUN.search(page.inner_text("#run-status")).groups())
            out["merges"].append((merge_s, eval_s, wall))
        index = page.evaluate(SLIDER_JS)
        if index < 0:
            raise SystemExit("no slider that one step right can move")
        slider = page.locator("input[type=range]").nth(index)
        for i in range(refreshes):
            before = page.evaluate(STATUS_JS)
            slider.focus()
            t = time.perf_counter()
            page.keyboard.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
            page.wait_for_function(CHANGED_JS, arg=before)
            wall = time.perf_counter() - t
            status = page.evaluate(STATUS_JS)
            out["refreshes"].append((float(UPDATED.search(status).group(1)), wall, status.split(" · ")[0]))
        if reports:
            page.get_by_role("tab", name="Diagnostics").click()   # a merge shows its results' tab
        for i in range(reports):
            if i:   # another merge to report on (the slider one step), so that the report's line changes
                before = page.evaluate(STATUS_JS)
                slider.focus()
                page.keyboard.press("ArrowRight" if i % 2 else "ArrowLeft")
                page.wait_for_function(CHANGED_JS, arg=before)
            before = page.evaluate(REPORT_JS)
            t = time.perf_counter()
            page.get_by_role("button", name="Whole-model report").click()
            page.wait_for_function(REPORTED_JS, arg=before)
            wall = time.perf_counter() - t
            said = page.evaluate(REPORT_JS)
            out["reports"].append((float(MADE.search(said).group(1)), wall, said.split(" on ")[0]))
        browser.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=3)
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--reports", type=int, default=2)
    parser.add_argument("--suite", default=None, help="passed to app.py (default: MiniSuite)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for each wait (default 300)")
    args = parser.parse_args(argv)

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port)] + (["--suite", args.suite] if args.suite else [])
    with tempfile.NamedTemporaryFile(prefix="app_timing_", suffix=".log", delete=False) as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_http_200(url, proc, args.timeout)
            http_s = time.perf_counter() - t0
            res = drive(url, args.merges, args.refreshes, args.reports, int(args.timeout * 1000))
        except BaseException:
            print(f"app log: {log.name}", file=sys.stderr)   # kept for a look
            raise
        finally:
            if proc.poll() is None:   # the app we started, by its own process
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout
    print(f"python tools/app_timing.py --merges {args.merges} --refreshes {args.refreshes} --reports {args.reports} "
          f"at {rev.strip() or '?'}"
          f" (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end, {os.cpu_count()} cores)")
    print(f"first diagnostics: {res['first_status']}")
    print("| step | page reports s | wall s |")
    print("|---|---|---|")
    print(f"| launch to HTTP 200 | - | {http_s:.2f} |")
    print(f"| page load to first diagnostics | {res['first_diag_reported_s']:.2f} | {res['first_diag_s']:.2f} |")
    for i, (m, e, wall) in enumerate(res["merges"], 1):
        print(f"| merge #{i}: merge + evaluation | {m:.2f} + {e:.2f} | {wall:.2f} |")
    for i, (upd, wall, shown) in enumerate(res["refreshes"], 1):
        print(f"| refresh #{i} ({shown}) | {upd:.2f} | {wall:.2f} |")
    for i, (made, wall, what) in enumerate(res["reports"], 1):
        print(f"| whole-model report #{i} ({what}) | {made:.2f} | {wall:.2f} |")
    os.unlink(log.name)


if __name__ == "__main__":
    main()
