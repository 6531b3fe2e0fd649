"""Start `crystalscope serve` as a child process on loopback, for the load test, the screenshot
and the browser test. Only 127.0.0.1 is ever used: nothing here can listen beyond this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
SRC = Path(__file__).resolve().parents[1] / "src"
#: Chromium flags: headless, no sandbox (root in CI), and no traffic of its own (updates, sync, QUIC).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_server(model: str | os.PathLike, port: int, *extra: str, timeout_s: float = 90.0) -> subprocess.Popen:
    """Run `crystalscope serve MODEL --host 127.0.0.1 --port PORT` and wait until /api/health answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    # the log goes to a file: an unread pipe fills up (64 KiB of access log) and stalls the server
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "crystalscope", "serve", str(model), "--host", LOOPBACK,
                             "--port", str(port), *extra], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.monotonic() + timeout_s
    url = f"http://{LOOPBACK}:{port}/api/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {stop_server(proc)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except urllib.error.HTTPError as refused:
            if refused.code == 401:  # started with --token: it answers, and refuses us
                return proc
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"the server did not answer {url} within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> str:
    """Stop the child (SIGTERM, then SIGKILL after 10 s) and return what it printed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    proc.log.seek(0)
    text = proc.log.read()
    proc.log.close()
    return text


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
