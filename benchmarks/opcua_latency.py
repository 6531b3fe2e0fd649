"""Latency from a frame file written into a watched folder to its OPC UA value at a client (docs/plant.md).

Runs ``crystalscope monitor MODEL INCOMING --out OUT --watch --opcua ENDPOINT`` as a subprocess
(the real command), subscribes to ``FramesProcessed`` with asyncua's client (publishing
interval 10 ms), then writes the frames of a generated run into the watched folder one at a
time (each appears at once: written beside it, then renamed in), ``--gap-s`` apart. A frame's
latency is the time from its rename to the data-change notification carrying its number.
It includes ``--watch``'s rule that a file is taken once its size has not changed for one poll
(0.5 s by default), so it is at least one poll interval. Writes
``benchmarks/results/opcua_latency.json`` with p50/p99/min/max.

Example (2 cores, as in docs/plant.md):
    PYTHONPATH=src taskset -c 0,1 .venv/bin/python benchmarks/opcua_latency.py model.onnx \\
        --work /tmp/opcua-latency --frames 40
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_result  # noqa: E402

from crystalscope.monitor.frames import ProcessSpec, generate_process  # noqa: E402
from crystalscope.monitor.opcua import NAMESPACE_URI, node_id_text  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(endpoint: str, run_name: str, sources: list[Path], incoming: Path, gap_s: float) -> list[float]:
    """Write each frame, wait for its notification; the seconds between, per frame."""
    from asyncua import Client

    arrived: dict[int, float] = {}

    class Handler:
        def datachange_notification(self, node, value, data):
            arrived.setdefault(int(value), time.time())

    client = Client(endpoint, timeout=30)
    for _ in range(120):  # the monitor loads its model and starts the server first
        try:
            await client.connect()
            break
        except OSError:
            await asyncio.sleep(0.5)
    else:
        raise SystemExit(f"no OPC UA server at {endpoint}")
    try:
        idx = await client.get_namespace_index(NAMESPACE_URI)
        sub = await client.create_subscription(10, Handler())
        await sub.subscribe_data_change(client.get_node(node_id_text(idx, run_name, "FramesProcessed")))
        written = []
        for i, path in enumerate(sources):
            staged = incoming.parent / f".{path.name}"
            shutil.copy(path, staged)
            written.append(time.time())
            os.replace(staged, incoming / path.name)  # the frame appears whole, at once
            deadline = time.monotonic() + 60
            while i + 1 not in arrived and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(gap_s)
        return [arrived[i + 1] - t for i, t in enumerate(written) if i + 1 in arrived]
    finally:
        await client.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/opcua-latency"))
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--gap-s", type=float, default=0.5, help="pause after each notification")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    generate_process(args.work / "run", ProcessSpec(frames=args.frames, interval_s=10.0, pg_onset_s=args.frames * 5.0,
                                                    width=args.width, height=args.height, seed=3))
    incoming = args.work / "incoming"
    incoming.mkdir()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/crystalscope/"
    command = [sys.executable, "-m", "crystalscope", "monitor", str(args.model), str(incoming),
               "--out", str(args.work / "out"), "--watch", "--opcua", endpoint]
    log = (args.work / "monitor.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        sources = sorted((args.work / "run" / "frames").iterdir())
        latencies = asyncio.run(measure(endpoint, incoming.name, sources, incoming, args.gap_s))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    ms = np.array(latencies) * 1000.0
    record = {"command": " ".join(sys.argv), "monitor_command": " ".join(command[1:]), "frames": len(sources),
              "received": len(latencies), "frame_size": [args.width, args.height],
              "cpus": len(os.sched_getaffinity(0)), "latency_ms": {
                  "p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
                  "min": round(float(ms.min()), 1), "max": round(float(ms.max()), 1)},
              "machine": machine_info()}
    print(record["latency_ms"], f"{len(latencies)}/{len(sources)} frames")
    print(write_result(args.results, "opcua_latency", record))


if __name__ == "__main__":
    main()
