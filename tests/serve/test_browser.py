"""End to end in a real browser: Debian's chromium driven by Playwright opens the page of a real
`crystalscope serve` process, picks the real sample crops, and checks the rows and the CSV.

The browser is Debian's ``chromium`` package (Playwright's own download cannot reach the
network here). When it is missing the test skips and says so loudly; CI installs it first and
sets CRYSTALSCOPE_REQUIRE_BROWSER=1, which turns any such skip into a failure.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from crystalscope import Predictor
from crystalscope.inference.predictor import predictions_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_common import CHROMIUM_ARGS, LOOPBACK, free_loopback_port, start_server, stop_server  # noqa: E402


def _browser_or_skip() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    problem = None
    if chromium is None:
        problem = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem is None:
        return chromium
    if os.environ.get("CRYSTALSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"BROWSER TEST CANNOT RUN: {problem}")
    message = f"BROWSER TEST SKIPPED: {problem}"
    warnings.warn(message)
    print(f"\n!!! {message} !!!", file=sys.stderr)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's chromium; skips loudly (or fails in CI) before any server starts."""
    return _browser_or_skip()


@pytest.fixture(scope="module")
def served(onnx_model):
    model = onnx_model  # the serve tests' one tiny export (tests/serve/conftest.py)
    port = free_loopback_port()
    proc = start_server(model, port)
    yield model, f"http://{LOOPBACK}:{port}"
    stop_server(proc)


def test_page_labels_dropped_crops_and_downloads_predicts_csv(chromium, served, real_samples, tmp_path):
    from playwright.sync_api import sync_playwright

    model, base = served
    crops = sorted(real_samples.glob("*.png"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("lab notes, not a picture")
    requested: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-width screen
            page.on("request", lambda request: requested.append(request.url))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').dataset.classes === 'cex,pg'", timeout=20_000)
            assert page.is_hidden("#token-form") and page.is_hidden("#notice")  # no token needed here
            page.set_input_files("#files", [str(p) for p in crops] + [str(not_an_image)])
            page.wait_for_selector(".row", timeout=5_000)
            page.wait_for_function("document.querySelectorAll('.row').length === 9 && "
                                   "!document.querySelector('.row.pending')", timeout=30_000)
            names = page.eval_on_selector_all(".row .name", "els => els.map(e => e.textContent)")
            predicted = page.eval_on_selector_all(".row .predicted", "els => els.map(e => e.textContent)")
            failed = page.eval_on_selector_all(".row.failed .status", "els => els.map(e => e.textContent)")
            thumbnails = page.eval_on_selector_all(".row img", "els => els.filter(e => e.naturalWidth > 0).length")
            assert not page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
            # how a rejected row looks (the model here has no rejection: feed the page's own renderer)
            page.evaluate("showResult(addRow(new File(['x'], 'cat.png')), {status: 'rejected: far from the "
                          "training images', predicted: 'cex', confidence: 0.9, probabilities: {cex: 0.9, pg: 0.1}})")
            assert page.inner_text(".row.rejected .flag") == "rejected"
            assert "far from the training images" in page.inner_text(".row.rejected .status")
            page.evaluate("document.querySelector('.row.rejected').remove()")
            with page.expect_download(timeout=10_000) as download:
                page.click("#download")
            downloaded = Path(download.value.path()).read_text()
        finally:
            browser.close()
    assert names == [p.name for p in crops] + ["notes.png"]
    assert thumbnails == len(crops)  # the browser cannot draw the text file
    expected = Predictor.load(model).predict(crops)
    assert predicted == [p.predicted for p in expected]
    assert len(failed) == 1 and failed[0].startswith("error: not a PNG")
    # the page's CSV is predict's CSV for these files (file names as uploaded), plus the error row
    for p in expected:
        p.path = Path(p.path).name
    rows = list(csv.reader(io.StringIO(downloaded)))
    assert downloaded.startswith(predictions_csv(expected, ["cex", "pg"]))
    assert rows[-1][0] == "notes.png" and rows[-1][-1].startswith("error: not a PNG")
    assert requested and all(url.startswith(base + "/") or url.startswith("blob:") or url.startswith("data:")
                             for url in requested), requested


def test_load_script_reports_zero_errors_on_loopback(served, real_samples, tmp_path):
    import serve_load  # benchmarks/ is on sys.path (above)

    model, _ = served
    out = tmp_path / "load.json"
    code = serve_load.main([str(model), "--images", str(real_samples), "--clients", "3", "--requests", "12",
                            "--images-per-request", "2", "--rounds", "1", "--timeout", "20", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["errors_total"] == 0
    assert result["rounds"][0]["requests_ok"] == 12
    assert result["images_per_s"]["median"] == pytest.approx(2 * result["req_per_s"]["median"])
    assert result["p99_ms"]["median"] >= result["p50_ms"]["median"] > 0
    assert result["rss_before_mib"] > 0


DROP_FILES = """(files) => {
  const transfer = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], f.name, { type: "image/png" }));
  }
  const zone = document.getElementById("drop");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""


def test_page_asks_for_the_token_then_labels_dropped_files(chromium, onnx_model, real_samples):
    from playwright.sync_api import sync_playwright

    port = free_loopback_port()
    proc = start_server(onnx_model, port, "--token", "t0ken-for-test")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(f"http://{LOOPBACK}:{port}/")
            page.wait_for_selector("#token-form", state="visible", timeout=20_000)
            assert "token" in page.inner_text("#model")
            page.fill("#token", "t0ken-for-test")
            page.click("#token-form button")
            page.wait_for_function("document.getElementById('model').dataset.classes === 'cex,pg'", timeout=20_000)
            # this time a real drop event on the drop zone, with the crops' bytes in its DataTransfer
            crops = [real_samples / "PG (567).png", real_samples / "CEX (2).png"]
            page.evaluate(DROP_FILES, [{"name": p.name, "b64": base64.b64encode(p.read_bytes()).decode()}
                                       for p in crops])
            page.wait_for_function("document.querySelectorAll('.row').length === 2 && "
                                   "!document.querySelector('.row.pending')", timeout=20_000)
            predicted = page.eval_on_selector_all(".row .predicted", "els => els.map(e => e.textContent)")
            assert predicted == [p.predicted for p in Predictor.load(onnx_model).predict(crops)]
            browser.close()
    finally:
        stop_server(proc)


def test_live_page_chart_gains_points_while_a_monitor_writes_frames(chromium, onnx_model, tmp_path):
    """`serve --monitor OUT` while `monitor --watch --out OUT` takes frames: the chart grows."""
    import signal
    import subprocess
    import time

    from playwright.sync_api import sync_playwright

    from crystalscope.monitor.frames import ProcessSpec, generate_process
    from monitor_runs import SMALL, SRC

    generate_process(tmp_path / "run", ProcessSpec(frames=6, seed=5, **SMALL))
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    # every region classified (the serve tests' model is untrained but confident)
    monitor = subprocess.Popen([sys.executable, "-m", "crystalscope", "monitor", str(onnx_model), str(incoming),
                                "--out", str(out), "--watch", "--overlay", "--min-confidence", "0",
                                "--min-sharpness", "0", "--force"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    port = free_loopback_port()
    server = start_server(onnx_model, port, "--monitor", str(out))
    requested: list[str] = []
    frames = sorted((tmp_path / "run" / "frames").iterdir())
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"http://{LOOPBACK}:{port}/live")
            counts = []
            for batch in (frames[:2], frames[2:]):
                for path in batch:
                    shutil.copy(path, incoming / path.name)
                done = frames.index(batch[-1]) + 1
                page.wait_for_function(f"Number(document.getElementById('chart').dataset.frames) >= {done}",
                                       timeout=60_000)
                counts.append(int(page.get_attribute("#chart", "data-points")))
            page.wait_for_selector("#overlay", state="visible", timeout=20_000)
            browser.close()
    finally:
        stop_server(server)
        monitor.send_signal(signal.SIGINT)
        monitor.wait(timeout=60)
    assert 0 < counts[0] < counts[1] <= len(frames)
    assert all(url.startswith(f"http://{LOOPBACK}:{port}/") for url in requested)  # nothing from elsewhere
