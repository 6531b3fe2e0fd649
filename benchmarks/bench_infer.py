"""Benchmark inference: PyTorch vs ONNX Runtime, model-only and end to end from PNG files.

Uses the deployment code as a user would: :class:`crystalscope.inference.predictor.Predictor`
(``.ckpt`` in PyTorch, ``.onnx`` in ONNX Runtime) and
:func:`crystalscope.export.onnx.export_checkpoint` (the export with its parity check). Rows:

- ``model``: ``Predictor.logits`` on an already normalised float32 batch (what the back end
  itself costs, fp32; on CUDA the PyTorch copy to the device is included);
- ``files``: ``Predictor.predict`` on image files (decode + resize + normalise + model +
  calibrated softmax), the ``crystalscope predict`` path;
- ``training-eval`` (PyTorch only): the training loop's evaluation on uint8 images already
  on the device, channels_last, bf16 autocast on CUDA; comparable to PERF.md's inference
  ceiling.

Each figure is the median of ``--repeats`` timed passes after one warm-up pass.

Example:
    .venv/bin/python benchmarks/bench_infer.py --backbone efficientnet_lite0 --image-size 160 \\
        --images /tmp/bench/split/test --batch-sizes 1,32,128 --name infer-lite0-160
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, peak_rss_mib, write_result  # noqa: E402


def _median_rate(fn, n_images: int, repeats: int) -> float:
    """Images per second of ``fn()`` (which processes ``n_images``), median of ``repeats``."""
    fn()  # warm-up: lazy init, allocator, ORT graph optimisation, cuDNN autotune
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / sorted(times)[len(times) // 2]


def make_checkpoint_file(backbone: str, image_size: int, out: Path, resize: str = "stretch") -> Path:
    """An untrained two-class checkpoint (throughput does not depend on the weights)."""
    import torch

    from crystalscope.models.factory import HeadSpec, build_model, default_preprocessing
    from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    head = HeadSpec()
    model = build_model(backbone, 2, head).eval()
    ckpt = make_checkpoint(model, backbone=backbone, head=head, class_names=["cex", "pg"], positive_class="pg",
                           preprocessing=default_preprocessing(backbone, image_size, resize))
    return save_checkpoint(ckpt, out)


def bench_infer(checkpoint: Path, onnx_path: Path, images: list[Path], batch_sizes: list[int], *,
                device: str = "cpu", n_model: int = 256, repeats: int = 3,
                backends: tuple[str, ...] = ("pytorch", "onnxruntime"),
                files_batch_sizes: tuple[int, ...] = (32,)) -> dict:
    """Measure every row described in the module docstring; returns a dict of rows and facts.

    Example:
        >>> bench_infer(Path("m.ckpt"), Path("m.onnx"), [], [1, 32])["rows"][0]["img_s"]  # doctest: +SKIP
    """
    import torch

    from crystalscope.export.onnx import export_checkpoint
    from crystalscope.inference.predictor import Predictor

    t0 = time.perf_counter()
    export = export_checkpoint(checkpoint, onnx_path, check_images=images[:8] or None)
    export_s = time.perf_counter() - t0
    loaders = {"pytorch": lambda: Predictor.load(checkpoint, device=device), "onnxruntime": lambda: Predictor.load(onnx_path)}
    predictors = {name: loaders[name]() for name in backends}
    pre = next(iter(predictors.values())).preprocessing
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, size=(n_model, pre.image_size, pre.image_size, 3), dtype=np.uint8)
    normalised = pre.normalize(uint8)
    rows = []
    for backend, predictor in predictors.items():
        for bs in batch_sizes:
            def model_pass(p=predictor, bs=bs):
                for start in range(0, n_model, bs):
                    p.logits(normalised[start:start + bs])
            rows.append({"backend": backend, "mode": "model", "batch_size": bs,
                         "img_s": _median_rate(model_pass, n_model, repeats)})
        for bs in files_batch_sizes if images else ():
            rows.append({"backend": backend, "mode": "files", "batch_size": bs,
                         "img_s": _median_rate(lambda p=predictor, bs=bs: p.predict(images, batch_size=bs),
                                               len(images), repeats)})
    if "pytorch" in predictors:
        rows += _training_eval_rows(predictors["pytorch"].backend.model, pre, uint8, batch_sizes, device, repeats)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return {"rows": rows, "files_to_model": files_to_model(rows), "export_s": export_s,
            "onnx_max_abs_diff": export["max_abs_diff"],
            "image_size": pre.image_size, "n_model_images": n_model, "n_files": len(images),
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def files_to_model(rows: list[dict]) -> dict:
    """Per back end: end to end from files / the model alone on pre-decoded batches (the ceiling,
    its best batch size), both from the same run; the best files batch size and its ratio.

    Example:
        >>> files_to_model([{"backend": "onnxruntime", "mode": "model", "batch_size": 32, "img_s": 500.0},
        ...                 {"backend": "onnxruntime", "mode": "files", "batch_size": 32, "img_s": 420.0}])
        {'onnxruntime': {'ceiling_img_s': 500.0, 'ceiling_batch_size': 32, 'files_img_s': 420.0, 'files_batch_size': 32, 'ratio': 0.84}}
    """
    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        model = [r for r in rows if r["backend"] == backend and r["mode"] == "model"]
        files = [r for r in rows if r["backend"] == backend and r["mode"] == "files"]
        if not model or not files:
            continue
        ceiling, best = max(model, key=lambda r: r["img_s"]), max(files, key=lambda r: r["img_s"])
        out[backend] = {"ceiling_img_s": ceiling["img_s"], "ceiling_batch_size": ceiling["batch_size"],
                        "files_img_s": best["img_s"], "files_batch_size": best["batch_size"],
                        "ratio": round(best["img_s"] / ceiling["img_s"], 3)}
    return out


def _training_eval_rows(model, pre, uint8: np.ndarray, batch_sizes: list[int], device: str, repeats: int) -> list:
    """The training loop's own evaluation (channels_last; bf16 autocast on CUDA) on device-resident uint8."""
    import torch

    from crystalscope.training import loop
    from crystalscope.models.precision import place_model
    from crystalscope.runtime import resolve_device

    dev = resolve_device(device)
    model = place_model(model, dev)
    if dev.type == "cuda":
        # PERF.md's inference ceiling is at batch 1024: tile the images to have enough of them
        uint8 = np.concatenate([uint8] * max(1, -(-2048 // len(uint8))))
    images = torch.from_numpy(uint8).to(dev)
    rows = []
    sizes = sorted(set(batch_sizes) | ({1024} if dev.type == "cuda" else set()))
    for bs in sizes:
        subset = images[:min(images.shape[0], max(256, 2 * bs))]  # small batches: fewer calls suffice

        def run(bs=bs, subset=subset):
            loop.evaluate(model, subset, None, transform=pre.normalize_torch,
                          batch_size=bs, device=dev)  # returns numpy: synchronised
        rows.append({"backend": "pytorch", "mode": "training-eval", "batch_size": bs,
                     "img_s": _median_rate(run, subset.shape[0], repeats)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained .ckpt (default: an untrained one is built)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone when no --checkpoint")
    parser.add_argument("--image-size", type=int, default=160, help="input side when no --checkpoint")
    parser.add_argument("--images", type=Path, help="folder of images for the end-to-end rows (recursive)")
    parser.add_argument("--max-images", type=int, default=256, help="at most this many files")
    parser.add_argument("--batch-sizes", default="1,32,128", help="comma-separated batch sizes")
    parser.add_argument("--n-model", type=int, default=256, help="images per model-only pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    parser.add_argument("--backends", default="pytorch,onnxruntime", help="comma-separated: pytorch, onnxruntime")
    parser.add_argument("--files-batch-sizes", default="32", help="comma-separated batch sizes of the files rows")
    parser.add_argument("--device", default="cpu", help="PyTorch device: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--name", required=True, help="row name in the results")
    parser.add_argument("--group", default="infer", help="table the rows belong to")
    parser.add_argument("--results", default="benchmarks/results", help="folder for <name>.json")
    args = parser.parse_args(argv)

    import torch

    from crystalscope.data.layout import list_images

    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    work = results / "models"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or make_checkpoint_file(args.backbone, args.image_size,
                                                         work / f"{args.name}.ckpt")
    images = list_images(args.images, recursive=True)[:args.max_images] if args.images else []
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    record = bench_infer(Path(checkpoint), work / f"{args.name}.onnx", images, batch_sizes, device=args.device,
                         n_model=args.n_model, repeats=args.repeats,
                         backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                         files_batch_sizes=tuple(int(b) for b in args.files_batch_sizes.split(",") if b.strip()))
    record.update(kind="infer", name=args.name, group=args.group, checkpoint=str(checkpoint),
                  backbone=args.backbone if not args.checkpoint else None, peak_rss_mib=peak_rss_mib(),
                  threads=torch.get_num_threads(), machine=machine_info(),
                  command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_infer.py", *sys.argv[1:]]))
    path = write_result(results, args.name, record)
    for row in record["rows"]:
        print(f"{args.name}: {row['backend']:<11} {row['mode']:<13} batch {row['batch_size']:>4}: "
              f"{row['img_s']:8.1f} img/s")
    for backend, ratio in record["files_to_model"].items():
        print(f"{args.name}: {backend} from files {ratio['files_img_s']:.1f} img/s (batch {ratio['files_batch_size']}) = "
              f"{100 * ratio['ratio']:.0f} % of the model alone, {ratio['ceiling_img_s']:.1f} img/s "
              f"(batch {ratio['ceiling_batch_size']})")
    print(f"export {record['export_s']:.1f} s (max |dp| {record['onnx_max_abs_diff']:.1e}); peak RSS "
          f"{record['peak_rss_mib']:.0f} MiB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
