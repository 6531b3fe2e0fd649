"""The measurements of docs/scaling.md: 1 vs 2 gloo training processes, and predict over 1k-100k files.

    python benchmarks/scale_bench.py train   WORK   # synth + split + 3 training set-ups
    python benchmarks/scale_bench.py predict WORK --counts 1000 10000 100000 --repeats 3 1 ...

Writes benchmarks/results/scale-train.json and scale-predict.json and prints markdown tables.
Every run is a real `python -m crystalscope ...` subprocess; peak RSS is the child's ru_maxrss
(for --nproc 2: the largest single process, the launcher or one rank).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(args: list[str], threads: int) -> tuple[str, float, float]:
    """(output, wall seconds, peak RSS MiB of the largest child) of ``python -m crystalscope ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "crystalscope", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        sys.exit(f"failed: crystalscope {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    # ru_maxrss of children is the max over all waited-for children so far: only a new maximum is exact
    return proc.stdout + proc.stderr, wall, max(peak, before) / 1024


def train_bench(work: Path) -> list[dict]:
    split = work / "split"
    if not (split / "split.csv").is_file():
        run(["synth", str(work / "synth"), "--per-class", "300", "-q", "--force"], 2)
        run(["split", str(work / "synth"), str(split), "--ratios", "0.6,0.2,0.2", "-q", "--force"], 2)
    common = ["train", str(split), "--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "64",
              "--resize", "pad", "--lr", "0.01", "--batch-size", "32", "--epochs", "4", "--f1-threshold", "1.1",
              "--device", "cpu", "--no-onnx", "--cache-dir", "off", "--seed", "0"]
    rows = []
    setups = (("1 process, 1 thread, batch 32", 1, 1, []),
              ("1 process, 2 threads, batch 32", 1, 2, []),
              ("2 gloo processes x 1 thread, batch 16 each (effective 32, same lr)", 2, 1, ["--batch-size", "16"]),
              ("2 gloo processes x 1 thread, batch 32 each (effective 64, same lr)", 2, 1, []),
              ("2 gloo processes x 1 thread, batch 32 each (effective 64), --lr-scaling linear", 2, 1,
               ["--lr-scaling", "linear"]))
    for index, (name, nproc, threads, extra) in enumerate(setups):
        out = work / f"run-{index}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        log, wall, _ = run([*common, *extra, "--out", str(out), "--nproc", str(nproc)], threads)
        rates = [float(r) for r in re.findall(r"training (\d+) img/s", log)]
        result = json.loads((out / "test_results.json").read_text())
        later = rates[1:]  # epoch 1 includes one-off warm-up
        rows.append({"setup": name, "nproc": nproc, "threads": threads, "epoch_img_s": rates,
                     "img_s_median": statistics.median(later), "img_s_min": min(later), "img_s_max": max(later),
                     "test_macro_f1": result["macro"]["f1"], "test_macro_f1_ci95": result["macro_f1_ci95"],
                     "n_test": result["n_images"], "wall_s": wall})
    return rows


def make_files(folder: Path, count: int, side: int) -> None:
    """``count`` random ``side`` px PNGs, 1,000 per sub-folder (a campaign's plate/day layout)."""
    import numpy as np
    from PIL import Image

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == count:
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"batch{i // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(sub / f"frame ({i}).png")


def make_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from crystalscope.data.transforms import Preprocessing
    from crystalscope.export.onnx import export_checkpoint
    from crystalscope.models.factory import HeadSpec, build_model
    from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint

    onnx_path = work / "resnet18-32.onnx"
    if not onnx_path.is_file():
        torch.manual_seed(0)
        ckpt = make_checkpoint(build_model("resnet18", 2).eval(), backbone="resnet18", head=HeadSpec(),
                               class_names=["cex", "pg"], positive_class="pg", temperature=1.0,
                               preprocessing=Preprocessing(image_size=32))
        export_checkpoint(save_checkpoint(ckpt, work / "resnet18-32.ckpt"), onnx_path)
    return onnx_path


def predict_bench(work: Path, counts: list[int], repeats: list[int], side: int) -> list[dict]:
    model = make_model(work)
    rows = []
    for count, times in zip(counts, repeats):
        folder = work / f"files-{count}"
        make_files(folder, count, side)
        walls, peaks = [], []
        for _ in range(times):
            out = work / f"pred-{count}.csv"
            out.unlink(missing_ok=True)
            # a fresh interpreter per measurement, so ru_maxrss is this run's own peak
            probe = [sys.executable, "-c", _PROBE, str(ROOT / "src"), str(model), str(folder), str(out)]
            proc = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if proc.returncode != 0:
                sys.exit(proc.stdout + proc.stderr)
            wall, peak, rows_written = json.loads(proc.stdout.strip().splitlines()[-1])
            assert rows_written == count, (rows_written, count)
            walls.append(wall)
            peaks.append(peak)
        rows.append({"files": count, "side_px": side, "repeats": times, "wall_s": walls,
                     "img_s_median": count / statistics.median(walls), "img_s_min": count / max(walls),
                     "img_s_max": count / min(walls), "peak_rss_mib_median": statistics.median(peaks),
                     "peak_rss_mib_max": max(peaks)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# runs `crystalscope predict` in a child and reports (wall, that child's peak RSS MiB, rows)
_PROBE = """
import json, os, resource, subprocess, sys, time
src, model, folder, out = sys.argv[1:]
env = {**os.environ, "PYTHONPATH": src}
t = time.perf_counter()
subprocess.run([sys.executable, "-m", "crystalscope", "predict", model, folder, "--out", out, "--show", "0",
                "--batch-size", "64"], env=env, check=True, capture_output=True)
wall = time.perf_counter() - t
rows = sum(1 for _ in open(out)) - 1
print(json.dumps([wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rows]))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["train", "predict"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 1])
    parser.add_argument("--side", type=int, default=24)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "train":
        rows = train_bench(args.work)
        (RESULTS / "scale-train.json").write_text(json.dumps(rows, indent=1) + "\n")
        for r in rows:
            lo, hi = r["test_macro_f1_ci95"]
            print(f"| {r['setup']} | {r['img_s_median']:.0f} ({r['img_s_min']:.0f}-{r['img_s_max']:.0f}) | "
                  f"{r['test_macro_f1']:.4f} [{lo:.4f}, {hi:.4f}] | {r['wall_s']:.0f} |")
    else:
        rows = predict_bench(args.work, args.counts, args.repeats, args.side)
        (RESULTS / "scale-predict.json").write_text(json.dumps(rows, indent=1) + "\n")
        for r in rows:
            print(f"| {r['files']:,} | {r['repeats']} | {r['img_s_median']:.0f} ({r['img_s_min']:.0f}-"
                  f"{r['img_s_max']:.0f}) | {r['peak_rss_mib_median']:.0f} (max {r['peak_rss_mib_max']:.0f}) |")


if __name__ == "__main__":
    main()
