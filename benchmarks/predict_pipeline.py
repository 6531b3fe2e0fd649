"""Benchmark the predict pipeline against the graph alone, with and without rejection, in one run.

Rows (images per second, median of ``--repeats`` timed passes after one warm-up, with min-max):

- ``graph``: the ONNX graph alone on pre-decoded, pre-normalised batches of ``--batch-size``
  (``Predictor.forward``: the whole decision, ``ood_score`` included);
- ``graph_no_reject``: the same, asking the graph for the logits only;
- ``end_to_end``: ``predict_stream`` (the ``crystalscope predict`` path) from PNG files to a CSV,
  rejection on;
- ``end_to_end_no_reject``: the same with ``--no-reject``.

and the two ratios the pipeline is judged by: ``end_to_end / graph`` (how busy the pipeline
keeps the graph) and ``end_to_end_no_reject time / end_to_end time`` (what rejection adds).

Example:
    PYTHONPATH=src .venv/bin/python benchmarks/predict_pipeline.py /tmp/demo/run/model.onnx \\
        /tmp/demo/split/test --repeats 3 --name predict-pipeline
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, peak_rss_mib, write_result  # noqa: E402


def _rates(fn, n_images: int, repeats: int) -> dict:
    """``{"median", "min", "max"}`` images per second of ``fn()`` over ``repeats`` passes after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    rates = sorted(n_images / t for t in times)
    return {"median": rates[len(rates) // 2], "min": rates[0], "max": rates[-1],
            "median_s": sorted(times)[len(times) // 2]}


def graph_rates(model: Path, files: list[Path], batch_size: int, repeats: int) -> dict:
    """The graph alone on batches decoded and normalised beforehand, rejection on and off."""
    from crystalscope.inference.predictor import Predictor

    rejecting = Predictor.load(model)
    plain = Predictor.load(model, reject=False)
    pre = rejecting.preprocessing
    batches = [pre.normalize(np.stack([pre.resize_uint8(f) for f in files[s:s + batch_size]]))
               for s in range(0, len(files), batch_size)]
    return {"graph": _rates(lambda: [rejecting.forward(b) for b in batches], len(files), repeats),
            "graph_no_reject": _rates(lambda: [plain.forward(b) for b in batches], len(files), repeats),
            "rejection_fitted": rejecting.rejection is not None}


def end_to_end_rates(model: Path, images: Path, n_images: int, batch_size: int | None, repeats: int) -> dict:
    """``predict_stream`` from the PNG files to a CSV, rejection on and off."""
    from crystalscope.inference.stream import predict_stream

    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        for key, reject in (("end_to_end", True), ("end_to_end_no_reject", False)):
            csv = Path(scratch) / f"{key}.csv"

            def run(reject=reject, csv=csv):
                csv.unlink(missing_ok=True)
                predict_stream(model, [images], csv, batch_size=batch_size, reject=reject, keep=0)

            out[key] = _rates(run, n_images, repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="an .onnx model (with a fitted rejection for the rejection rows)")
    parser.add_argument("images", type=Path, help="a folder of image files (searched recursively)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the Predictor's for ONNX")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--name", default="predict-pipeline")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    from crystalscope.inference.predictor import DEFAULT_BATCH_SIZE, collect_images

    files = collect_images([args.images])[:args.limit]
    images = args.images
    if args.limit is not None:  # predict_stream takes folders: link the chosen files into one
        images = Path(tempfile.mkdtemp(prefix="predict-pipeline-"))
        for i, f in enumerate(files):
            (images / f"{i:06d}{f.suffix}").symlink_to(f.resolve())
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE["onnx"]
    rows = {**graph_rates(args.model, files, batch_size, args.repeats),
            **end_to_end_rates(args.model, images, len(files), args.batch_size, args.repeats)}
    record = {
        "command": "benchmarks/predict_pipeline.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model), "images": str(args.images), "n_images": len(files), "batch_size": batch_size,
        "repeats": args.repeats, "rows": rows,
        "end_to_end_over_graph": rows["end_to_end"]["median"] / rows["graph"]["median"],
        "rejection_adds": rows["end_to_end"]["median_s"] / rows["end_to_end_no_reject"]["median_s"] - 1.0,
        "peak_rss_mib": peak_rss_mib(), "machine": machine_info(),
    }
    path = write_result(args.results, args.name, record)
    for key in ("graph", "graph_no_reject", "end_to_end", "end_to_end_no_reject"):
        r = rows[key]
        print(f"{key:22s} {r['median']:8.1f} img/s ({r['min']:.1f}-{r['max']:.1f})")
    print(f"end to end / graph: {record['end_to_end_over_graph']:.1%}; rejection adds "
          f"{record['rejection_adds']:+.1%} to end-to-end time -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
