"""Bounded load test of `crystalscope serve` on loopback: N concurrent clients, M requests.

Starts `crystalscope serve MODEL` on 127.0.0.1 (only loopback, ever), measures its resident
memory, sends ``--requests`` POST /api/predict requests from ``--clients`` threads (each request
with ``--timeout`` seconds, the whole run stopped after ``--max-seconds``), ``--rounds`` times,
and writes p50/p99 latency, requests/s, images/s, errors and RSS before/after as JSON.

    python benchmarks/serve_load.py /tmp/serve-demo/run/model.onnx --images ../shared/real_samples \
        --clients 8 --requests 400 --rounds 3 --out benchmarks/results/serve-load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import LOOPBACK, free_loopback_port, rss_mib, start_server, stop_server  # noqa: E402


def multipart(files: list[Path]) -> tuple[bytes, str]:
    """A multipart/form-data body with each file in the field ``files``."""
    boundary = uuid.uuid4().hex
    parts = []
    for path in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_round(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int,
              timeout: float, max_seconds: float) -> dict:
    """``requests`` POSTs shared by ``clients`` keep-alive connections; every failure is counted."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            body, content_type = bodies[i % len(bodies)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/api/predict", body=body, headers={"Content-Type": content_type})
                answer = connection.getresponse()
                payload = answer.read()
                ok = answer.status == 200 and all(r["status"] == "ok" or r["status"].startswith("rejected")
                                                  for r in json.loads(payload)["results"])
                with lock:
                    (latencies.append(time.perf_counter() - start) if ok
                     else errors.append(f"{answer.status}: {payload[:120]!r}"))
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                with lock:
                    errors.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + timeout + 1)
    wall = time.perf_counter() - started
    done = len(latencies)
    missing = requests - done - len(errors)  # not sent before the deadline: counted as errors
    ms = sorted(1000 * x for x in latencies)
    return {"requests_ok": done, "errors": len(errors) + max(0, missing), "error_samples": errors[:3],
            "wall_s": round(wall, 3), "p50_ms": round(statistics.median(ms), 2) if ms else None,
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2) if ms else None,
            "req_per_s": round(done / wall, 2), "images_per_request": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", required=True, help="Folder of images to send (cycled).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=30.0, help="Seconds allowed for one request.")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="Seconds allowed for one round.")
    parser.add_argument("--out", help="JSON file to write the results to.")
    args = parser.parse_args(argv)
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    k = args.images_per_request
    bodies = [multipart([images[(i + j) % len(images)] for j in range(k)]) for i in range(len(images))]
    port = free_loopback_port()
    server = start_server(args.model, port)
    try:
        rss_before = rss_mib(server.pid)
        rounds = []
        for _ in range(args.rounds):
            result = run_round(port, bodies, args.clients, args.requests, args.timeout, args.max_seconds)
            result.update(images_per_request=k, images_per_s=round(result["req_per_s"] * k, 2),
                          rss_after_mib=round(rss_mib(server.pid), 1))
            rounds.append(result)
            print(json.dumps(result), flush=True)
    finally:
        stop_server(server)
    summary = {"kind": "serve-load", "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
               "model": str(args.model), "clients": args.clients, "requests": args.requests,
               "images_per_request": k, "timeout_s": args.timeout, "cpus": os.cpu_count(),
               "load_1min": round(os.getloadavg()[0], 2), "rss_before_mib": round(rss_before, 1),
               "errors_total": sum(r["errors"] for r in rounds), "rounds": rounds}
    for key in ("p50_ms", "p99_ms", "req_per_s", "images_per_s"):
        values = [r[key] for r in rounds if r[key] is not None]
        if values:
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["errors_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
