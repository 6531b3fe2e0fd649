"""The README picture of the page: serve MODEL on loopback, pick IMAGES in Debian's chromium, save a PNG.

    python benchmarks/serve_screenshot.py /tmp/serve-demo/run/model.onnx --images ../shared/real_samples \
        --out docs/img/serve.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import CHROMIUM_ARGS, LOOPBACK, free_loopback_port, start_server, stop_server  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", required=True, help="Folder of images to pick on the page.")
    parser.add_argument("--out", default="docs/img/serve.png")
    parser.add_argument("--width", type=int, default=760)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    port = free_loopback_port()
    server = start_server(args.model, port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": 600})
            page.goto(f"http://{LOOPBACK}:{port}/")
            page.wait_for_function("document.getElementById('model').dataset.classes", timeout=30_000)
            page.set_input_files("#files", [str(p) for p in images])
            page.wait_for_function(f"document.querySelectorAll('.row').length === {len(images)} && "
                                   "!document.querySelector('.row.pending')", timeout=60_000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        stop_server(server)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
