"""Benchmark one ``crystalscope train`` run: throughput, time to the F1 threshold, memory.

Runs the library's own :func:`crystalscope.training.run.train` in this process (the same code
path as the CLI) and times its phases by wrapping the run's step functions, so nothing about
training is reimplemented here. Per epoch it records the training throughput over the whole
epoch (batches drawn from the in-memory uint8 cache, augmentation and normalisation included,
as in a real run), the epoch's wall time with validation, and the validation macro F1.

Time to threshold: seconds from the start of ``train()`` (process start for ``whole_run_s``)
to the end of the first epoch whose every per-class validation F1 reaches ``--f1-target``
(the same rule as the training's own ``--f1-threshold`` stop).

Example:
    .venv/bin/python benchmarks/bench_train.py /tmp/bench/split --name lite0-cached \\
        --set backbone=efficientnet_lite0 --set image_size=160 --set trainable_fraction=0 \\
        --set cache_features=true --set epochs=30 --results benchmarks/results
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before torch is imported: whole_run_s includes imports

import argparse  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, parse_sets, peak_rss_mib, write_result  # noqa: E402


def _instrument(run_module, loop_module, record: dict, started: float, targets: list[float], on_epoch=None):
    """Wrap the run's phases; returns a function that undoes the wrapping.

    ``on_epoch(record)`` is called after every epoch (the partial result is kept on disk).
    """
    originals = {}

    def timed(module, name, key):
        original = getattr(module, name)
        originals[(module, name)] = original

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record["phases_s"][key] = record["phases_s"].get(key, 0.0) + time.perf_counter() - t0
        setattr(module, name, wrapper)

    for name, key in (("build_learner", "model"), ("load_data", "decode"), ("cache_features", "features"),
                      ("fit", "epochs"), ("finalize", "finalize")):
        timed(run_module, name, key)

    train_one_epoch = loop_module.train_one_epoch
    originals[(loop_module, "train_one_epoch")] = train_one_epoch

    def train_wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        stats = train_one_epoch(*args, **kwargs)  # ends with .item(): the device is synchronised
        record["epochs"].append({"train_s": time.perf_counter() - t0, "train_images": stats["samples"]})
        return stats
    loop_module.train_one_epoch = train_wrapper

    log_epoch = run_module.log_epoch
    originals[(run_module, "log_epoch")] = log_epoch

    def epoch_wrapper(cfg, folder, data, result, world, improved):
        row = log_epoch(cfg, folder, data, result, world, improved)  # the epoch's metrics.csv row
        now = time.perf_counter()
        entry = record["epochs"][-1]
        epoch = result.epoch
        per_class = [float(row[f"val_f1_{c}"]) for c in data.class_names]
        entry.update(epoch=epoch, epoch_s=float(row["epoch_time_s"]), val_macro_f1=float(row["val_macro_f1"]),
                     val_min_class_f1=min(per_class), since_start_s=now - started,
                     train_img_s=entry["train_images"] / max(entry["train_s"], 1e-9))
        for target in targets:
            if str(target) not in record["time_to_target_s"] and min(per_class) >= target:
                record["time_to_target_s"][str(target)] = now - started
                record["epochs_to_target"][str(target)] = epoch
        if on_epoch:
            on_epoch(record)
        return row
    run_module.log_epoch = epoch_wrapper

    def restore():
        for (module, name), original in originals.items():
            setattr(module, name, original)
    return restore


def _median(values: list[float]) -> float | None:
    """Median (the first epoch pays warm-up and compilation, so medians, not means)."""
    values = sorted(values)
    return values[len(values) // 2] if values else None


def bench_train(data_dir: str, overrides: dict, *, f1_targets: list[float], threads: int | None = None,
                on_epoch=None) -> dict:
    """Run one training and return the measurements (see the module docstring).

    ``on_epoch(record)``: called with the measurements so far after every epoch.

    Example:
        >>> bench_train("split", {"backbone": "resnet18", "weights": "none", "image_size": 32,
        ...             "epochs": 1, "out": "/tmp/r"}, f1_targets=[0.99])["phases_s"]  # doctest: +SKIP
    """
    import torch

    from crystalscope.config import load_config
    from crystalscope.data.dataset import index_split
    from crystalscope.runtime import resolve_device
    from crystalscope.training import loop, run

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(None, {"data_dir": data_dir, **overrides})
    cuda = resolve_device(cfg.runtime.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record = {"config": cfg.to_dict(), "phases_s": {}, "epochs": [], "time_to_target_s": {}, "epochs_to_target": {}}
    started = time.perf_counter()
    restore = _instrument(run, loop, record, started, f1_targets, on_epoch)
    try:
        summary = run.train(cfg, progress=False)
    finally:
        restore()
    ended = time.perf_counter()
    epochs = record["epochs"]
    rates = [e["train_img_s"] for e in epochs if "train_img_s" in e]
    record.update(
        f1_targets=f1_targets, train_s=ended - started, whole_run_s=ended - PROCESS_START,
        import_s=started - PROCESS_START, epochs_run=len(epochs),
        train_img_s_median=_median(rates),
        train_img_s_after_first=_median([e["train_img_s"] for e in epochs[1:] if "train_img_s" in e]),
        test_macro_f1=summary["test"]["macro"]["f1"], test_accuracy=summary["test"]["accuracy"],
        best_epoch=summary["best_epoch"], run_dir=summary["run_dir"], peak_rss_mib=peak_rss_mib(),
        peak_cuda_mib=(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        threads=torch.get_num_threads(),
        n_images={split: len(folder.paths) for split, folder in index_split(data_dir).items()})
    passes = cfg.runtime.feature_passes if cfg.caches_features else 0
    if passes and record["phases_s"].get("features"):
        n = record["n_images"]
        record["feature_img_s"] = (n["train"] * passes + n["val"] + n["test"]) / record["phases_s"]["features"]
    return record


def main(argv: list[str] | None = None) -> int:
    import logging

    # the library logs its epoch lines; show them as `crystalscope train` does (message only, stderr)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="split folder (train/, val/, test/)")
    parser.add_argument("--name", required=True, help="row name in the results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig value (repeatable), e.g. --set backbone=resnet18")
    parser.add_argument("--f1-targets", default="0.99,0.997",
                        help="comma-separated val F1 levels every class must reach (time to each is recorded)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--results", default="benchmarks/results", help="folder for <name>.json")
    parser.add_argument("--group", default="train", help="table the row belongs to")
    parser.add_argument("--runs", default=str(Path(tempfile.gettempdir()) / "crystalscope-bench-runs"),
                        help="where run folders go unless --set out=... (a rerun replaces its folder)")
    args = parser.parse_args(argv)
    overrides = parse_sets(args.set)
    if "out" not in overrides:  # scratch run folder outside the repo, replaced on a rerun
        out = Path(args.runs) / args.name
        shutil.rmtree(out, ignore_errors=True)
        overrides["out"] = str(out)
    targets = [float(t) for t in args.f1_targets.split(",") if t.strip()]
    args_given = sys.argv[1:] if argv is None else argv
    about = dict(kind="train", name=args.name, group=args.group,
                 command=shlex.join(["python", "benchmarks/bench_train.py", *args_given]))

    def keep_partial(record: dict) -> None:
        # a run stopped later (time limit, crash) still leaves the epochs it finished
        write_result(args.results, args.name, {**record, **about, "partial": True,
                                               "elapsed_s": time.perf_counter() - PROCESS_START})

    record = bench_train(args.data_dir, overrides, f1_targets=targets, threads=args.threads, on_epoch=keep_partial)
    record.update(about, machine=machine_info())
    path = write_result(args.results, args.name, record)
    e = record["epochs"]
    print(f"{args.name}: {record['epochs_run']} epochs, train {record['train_s']:.1f} s "
          f"(whole run {record['whole_run_s']:.1f} s), median training {record['train_img_s_median']:.0f} img/s, "
          f"time to val F1 (s): {record['time_to_target_s']}, test macro F1 "
          f"{record['test_macro_f1']:.4f}, peak RSS {record['peak_rss_mib']:.0f} MiB -> {path}")
    for row in e:
        print(f"  epoch {row.get('epoch')}: {row.get('train_img_s', 0):.0f} img/s, {row.get('epoch_s', 0):.1f} s, "
              f"val macro F1 {row.get('val_macro_f1', 0):.4f}, at {row.get('since_start_s', 0):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
