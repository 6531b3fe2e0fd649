"""The `crystalscope` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function, prints a summary and sets the
exit code. Heavy libraries (torch, timm, onnxruntime) are imported inside the commands, so
`crystalscope predict model.onnx ...` works where PyTorch is not installed.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from crystalscope import __version__
from crystalscope.errors import CrystalscopeError

app = typer.Typer(
    name="crystalscope",
    help="Trustworthy image classifiers for crystallization microscopy: synthesize or split a "
    "dataset, audit it, train, evaluate, export to ONNX and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a one-line error to stderr and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def user_errors(func):
    """The CLI's one error boundary: expected mistakes and faults become one line and an exit code.

    ``CrystalscopeError`` (bad input; exit 2, or its own code) and file-system faults (disk full,
    read-only, permission denied: exit 1, described by :func:`crystalscope.safety.describe_os_error`)
    never show a traceback. Every command decorates itself with it.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from crystalscope.safety import describe_os_error

        try:
            return func(*args, **kwargs)
        except CrystalscopeError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as exc:
            raise fail(describe_os_error(exc), 1) from None
        except MemoryError:
            raise fail("out of memory: lower --batch-size or --workers, or use smaller images", 1) from None

    return wrapper


def _version_callback(value: bool):
    if value:
        typer.echo(f"crystalscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
):
    """crystalscope: split, audit, train, evaluate, export and predict."""


# ---- data commands (synth, split, audit) --------------------------------------------------


@app.command("synth")
@user_errors
def synth_command(
    out_dir: Path = typer.Argument(..., help="Output folder: OUT_DIR/cropped/cropped/{cex,pg}/"
                                   "{CEX,PG} (i).png (the Kaggle layout) plus OUT_DIR/synth_manifest.csv."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Crops per class (default: "
                                            "the real counts, 6,860 CEX and 6,804 PG)."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives byte-identical files, whatever "
                             "--workers is."),
    difficulty: str = typer.Option("realistic", "--difficulty", help="easy | realistic | hard: how "
                                   "much the classes overlap (CEX with granule blobs, PG with needles, "
                                   "blur, noise). realistic is calibrated in docs/synthetic.md."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes (default: "
                                          "all cores)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR (swapped in only "
                               "once the new set is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Generate the synthetic CEX/PG stand-in for the OpenCrystalData crops (Kaggle layout)."""
    from crystalscope.data.synth import generate

    summary = generate(out_dir, per_class=per_class, seed=seed, difficulty=difficulty,
                       workers=workers, force=force, progress=not quiet)
    counts, crystals = summary["counts"], summary["crystals"]
    typer.echo(f"wrote {counts['cex']} CEX + {counts['pg']} PG crops ({crystals['pg']} PG crystals, "
               f"3-5 views each) to {Path(out_dir) / 'cropped' / 'cropped'} in {summary['seconds']:.1f} s "
               f"(difficulty {difficulty}, seed {seed}); ground truth: {summary['manifest']}")


@app.command("split")
@user_errors
def split_command(
    source: Path = typer.Argument(..., help="Folder of class folders (e.g. cex/, pg/), or the Kaggle "
                                  "root: cropped/cropped/ inside it is found by itself. Never modified."),
    out_dir: Path = typer.Argument(..., help="Output folder: OUT_DIR/{train,val,test}/<class>/<file> "
                                   "plus split.csv (path,class,split,source,group) and split.json."),
    ratios: str = typer.Option("0.70,0.25,0.05", "--ratios", help="train,val,test fractions, summing to 1."),
    seed: int = typer.Option(42, "--seed", help="Shuffle seed: the same seed and files give the same split."),
    mode: str = typer.Option("copy", "--mode", help="copy | hardlink (no extra disk, same file system) "
                             "| symlink (absolute links to the source)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR (swapped in only "
                               "once the new split is complete)."),
    group_by: str = typer.Option("near-duplicates", "--group-by", help="near-duplicates: identical, "
                                 "rotated and mirrored copies share a split (pixel-verified); none: "
                                 "split by file; regex:<pattern>: files whose names give the same first "
                                 "capture group (or match) share a split."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decoding processes "
                                          "(default: all cores, at most 8)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Split a dataset into train/val/test, stratified per class, without leakage between views."""
    from crystalscope.data.split import print_split_summary, split_dataset

    summary = split_dataset(source, out_dir, ratios=ratios, seed=seed, mode=mode, force=force,
                            group_by=group_by, progress=not quiet, workers=workers)
    print_split_summary(summary)


@app.command("audit")
@user_errors
def audit_command(
    data_dir: Path = typer.Argument(..., help="Class folders, the Kaggle root, or a split folder "
                                    "(train/val/test/<class>/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default ./audit-<DATA_DIR "
                                       "name>); an earlier audit there is replaced."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decoding processes "
                                          "(default: all cores, at most 8)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Audit a dataset: duplicates incl. rotations/mirrors, leakage across splits, size shortcuts."""
    from crystalscope.data.audit import audit_dataset, print_audit_summary

    result = audit_dataset(data_dir, out_dir=out, progress=not quiet, workers=workers)
    print_audit_summary(result)

# ---- training commands (train, evaluate, demo) ---------------------------------------------


@app.command()
@user_errors
def train(
    data_dir: Optional[Path] = typer.Argument(None, help="Split folder with train/, val/ and test/ (class folders in each). Optional with --resume."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; options given here override it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/train, runs/train2, ...)."),
    backbone: Optional[str] = typer.Option(None, help="Any timm model name, e.g. resnet18, resnet50, efficientnet_lite0 (default: resnet101)."),
    weights: Optional[str] = typer.Option(None, help="Pretrained weights: imagenet or none (default: imagenet)."),
    weights_file: Optional[Path] = typer.Option(None, help="Local timm/torchvision state dict for the backbone (instead of --weights)."),
    trainable_fraction: Optional[float] = typer.Option(None, help="Last fraction of backbone layers to train: 0 frozen, 1 all (default: 0.1)."),
    lr: Optional[float] = typer.Option(None, help="SGD learning rate (momentum 0.9) (default: 0.1)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default: 64)."),
    image_size: Optional[int] = typer.Option(None, help="Square model input side in pixels (default: 224)."),
    resize: Optional[str] = typer.Option(None, help="stretch (distort to square) or pad (keep aspect, letterbox) (default: stretch)."),
    epochs: Optional[int] = typer.Option(None, help="Maximum number of epochs (default: 100)."),
    f1_threshold: Optional[float] = typer.Option(None, help="Stop when every class's val F1 reaches this (default: 0.997)."),
    f1_patience: Optional[int] = typer.Option(None, help="Consecutive epochs every class must stay at --f1-threshold before stopping (default: 1)."),
    patience: Optional[int] = typer.Option(None, help="Stop when val loss has not improved for this many epochs (default: 10)."),
    positive_class: Optional[str] = typer.Option(None, help="Positive class of a binary task (default: pg when present, else the last class)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default: auto)."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, or bf16 (default: auto)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (model init, shuffling, augmentation) (default: 0)."),
    workers: Optional[int] = typer.Option(None, help="Image decoding threads (default: CPU count)."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run folder from its weights/last.ckpt."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (pays off on a GPU) (default: off)."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode: default, reduce-overhead (CUDA graphs: fastest at batch 64 on a GPU) or max-autotune (default: default)."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="CUDA only: record the training step once as a CUDA graph and replay it (no compile time; drops each epoch's last partial batch) (default: off)."),
    cache_features: Optional[bool] = typer.Option(None, "--cache-features/--no-cache-features", help="Frozen backbone: compute its features once, train only the head (the fast CPU path; needs --trainable-fraction 0)."),
    cache_frozen: Optional[bool] = typer.Option(None, "--cache-frozen/--no-cache-frozen", help="Compute the frozen layers' output once and train only the trainable last layers (--trainable-fraction) + head on it (default: off)."),
    feature_passes: Optional[int] = typer.Option(None, help="With feature caching: passes over the training images, those after the first augmented (default: 1)."),
    cache_dir: Optional[str] = typer.Option(None, help="Where decoded images are cached; 'off' disables (default: ~/.cache/crystalscope)."),
    onnx: Optional[bool] = typer.Option(None, "--onnx/--no-onnx", help="Export model.onnx (checked against PyTorch) (default: on)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train with N processes (DistributedDataParallel, as torchrun --nproc-per-node N; gloo on CPU, NCCL on GPUs); --batch-size is per process (default: 1). docs/scaling.md."),
    lr_scaling: Optional[str] = typer.Option(None, help="With several processes: none (keep --lr) or linear (--lr x processes, for the larger effective batch) (default: none)."),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="With several GPU processes: synchronise BatchNorm statistics across them (default: off)."),
):
    """Train a classifier on a split folder and write every deliverable into the run folder."""
    from crystalscope.config import load_config
    from crystalscope.training.run import config_for_resume, train as run_training

    overrides = {k: v for k, v in dict(
        data_dir=str(data_dir) if data_dir else None, out=str(out) if out else None, backbone=backbone,
        weights=weights, weights_file=str(weights_file) if weights_file else None,
        trainable_fraction=trainable_fraction, lr=lr, batch_size=batch_size, image_size=image_size,
        resize=resize, epochs=epochs, f1_threshold=f1_threshold, f1_patience=f1_patience, patience=patience,
        positive_class=positive_class, device=device, precision=precision, seed=seed, workers=workers,
        compile=compile, compile_mode=compile_mode, cuda_graphs=cuda_graphs,
        cache_features=cache_features, cache_frozen=cache_frozen, feature_passes=feature_passes,
        cache_dir=cache_dir, onnx=onnx, nproc=nproc, lr_scaling=lr_scaling, sync_bn=sync_bn).items() if v is not None}
    if resume is not None:
        if config is not None:
            raise fail("--resume uses the run's own config.yaml; leave out --config")
        cfg = config_for_resume(resume, overrides)
    else:
        cfg = load_config(config, overrides)
    run_training(cfg, progress=sys.stderr.isatty())


@app.command()
@user_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A crystalscope checkpoint, e.g. runs/train/weights/best.ckpt."),
    data_dir: Path = typer.Argument(..., help="Folder of class folders (names must be the model's classes), e.g. SPLIT/test."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: runs/evaluate, runs/evaluate2, ...)."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: Optional[int] = typer.Option(None, help="Image decoding threads (default: CPU count)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier report in --out (only a folder "
                               "holding nothing but report files)."),
):
    """Write the test report (txt, json, plots, misclassified.csv) of a saved model on a folder."""
    from crystalscope.training.run import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data_dir, out, batch_size=batch_size, device=device, workers=workers,
                                 progress=sys.stderr.isatty(), force=force)
    if result.get("meta", {}).get("warning"):
        typer.secho(f"warning: {result['meta']['warning']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"accuracy {result['accuracy']:.4f}, macro F1 {result['macro']['f1']:.4f}, "
               f"{result['n_missed']} of {result['n_images']} missed")
    for name, s in result["per_class"].items():
        typer.echo(f"{name} - Precision: {s['precision']:.4f}, Recall: {s['recall']:.4f}, F1-Score: {s['f1']:.4f}")


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the generated data, split, audit and run."),
    per_class: int = typer.Option(1000, "--per-class", min=10, help="Generated crops per class."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone",
                                 help="timm backbone; efficientnet_lite0 has ImageNet weights offline."),
    image_size: int = typer.Option(160, "--image-size", help="Model input side in pixels (crops are ~150-230)."),
    epochs: int = typer.Option(30, "--epochs", help="Maximum epochs of head training."),
    seed: int = typer.Option(0, "--seed", help="Seed for the generator and training."),
):
    """Run the main job end to end on generated data: synth, split, audit, train, report, ONNX, predict."""
    from rich.console import Console

    from crystalscope.demo import run_demo

    console = Console()
    result = run_demo(out, per_class=per_class, backbone=backbone, image_size=image_size, epochs=epochs,
                      seed=seed, console=console)
    test = result["train"].get("test", {})
    run_dir = Path(result["run_dir"])
    console.rule("done")
    console.print(f"test macro F1 {test.get('macro', {}).get('f1', float('nan')):.4f}, "
                  f"accuracy {test.get('accuracy', float('nan')):.4f} on {test.get('n_images', '?')} images; "
                  f"whole demo {result['seconds']:.0f} s")
    console.print(f"deliverables in {run_dir}/: test_results.txt, test_results.json, metrics.csv, "
                  "metrics_plot.png, confusion_matrix.png, roc_auc.png, calibration.png, misclassified.csv, "
                  "weights/best.ckpt, model.onnx, predictions.csv")
    console.print(f"dataset audit in {Path(result['out']) / 'audit'}/audit.md")


# ---- deployment commands (export, predict) -------------------------------------------------


@app.command("export")
@user_errors
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.ckpt) written by `crystalscope train`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="ONNX file to write [default: the checkpoint's path with .onnx]."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version (11..23)."),
    check_images: Optional[List[Path]] = typer.Option(
        None, "--check-images",
        help="Image files or folders to compare PyTorch and ONNX Runtime on "
        "[default: a few generated images]. Repeat the option for several."),
    atol: float = typer.Option(1e-4, "--atol", help="Largest allowed probability difference between PyTorch and ONNX Runtime."),
):
    """Export a checkpoint to ONNX (dynamic batch, logits out, metadata inside) and verify it."""
    from crystalscope.export.onnx import export_checkpoint
    from crystalscope.inference.predictor import collect_images

    images = collect_images(check_images, recursive=True) if check_images else None
    result = export_checkpoint(checkpoint, out, opset=opset, check_images=images, atol=atol)
    meta = result["metadata"]
    pre = meta["preprocessing"]
    typer.echo(f"wrote {result['path']} (opset {result['opset']}, classes {', '.join(meta['class_names'])}, "
               f"{pre['image_size']} px {pre['resize']}, temperature {meta['temperature']:.3g})")
    typer.echo(f"check: ONNX Runtime vs PyTorch on {result['n_checked']} images, "
               f"max probability difference {result['max_abs_diff']:.2e} (limit {atol:g})")


@app.command("predict")
@user_errors
def predict_cmd(
    model: Path = typer.Argument(..., help="Trained model: a .ckpt checkpoint (needs PyTorch) or an exported .onnx."),
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (png, jpg, jpeg, tif, tiff, bmp; any case)."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o",
                             help="CSV to write: path,predicted,confidence,p_<class>...,status."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Look for images in subfolders too."),
    device: str = typer.Option("auto", "--device", help="For .ckpt models: auto, cpu or cuda (ONNX runs on the CPU)."),
    show: int = typer.Option(20, "--show", min=0, help="Rows to print in the terminal table."),
    resume: bool = typer.Option(False, "--resume", help="Append to --out, skipping the files it already "
                                "has rows for (use it from the first run of a long campaign)."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N", help="Label only shard I of N "
                                        "(0-based; a fixed 1/N of the files by path hash), e.g. one per "
                                        "machine; join the CSVs with `crystalscope merge`."),
):
    """Label images with a checkpoint or an ONNX model; unreadable files get error rows.

    Streams: files are listed lazily and rows appended in blocks, so memory stays flat for any
    number of files (docs/scaling.md).
    """
    from crystalscope.inference.stream import parse_shard, predict_stream

    with _row_progress(sys.stderr.isatty()) as advance:
        summary = predict_stream(model, paths, out, batch_size=batch_size, recursive=recursive, device=device,
                                 resume=resume, shard=parse_shard(shard), keep=show, on_rows=advance)
    if summary.get("n_skipped"):
        typer.echo(f"resumed: {summary['n_skipped']} files already in {out} were skipped", err=True)
    _print_predictions(summary, show)
    if summary["n_ok"] == 0:
        raise fail(f"none of the {summary['n_images']} files could be read as an image (reasons in {out})", 1)


def _print_predictions(summary: dict, show: int) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # plain Text: file names like "PG [1].png" are not markup

    table = Table(title=Text(f"{summary['model']} ({summary['backend']})"), title_justify="left")
    for column in ("path", "predicted", "confidence", "status"):
        table.add_column(column, overflow="fold", justify="right" if column == "confidence" else "left")
    predictions = summary["predictions"]  # only the first rows when streamed
    for p in predictions[:show]:
        table.add_row(Text(p.path), Text(p.predicted or ""), f"{p.confidence:.4f}" if p.ok else "",
                      Text(p.status, style="" if p.ok else "red"))
    console = Console()
    if show:
        console.print(table)
        if summary["n_images"] > show:
            console.print(f"... {summary['n_images'] - show} more rows in {summary['out_csv']}", markup=False)
    counts = ", ".join(f"{c}: {n}" for c, n in summary["counts"].items())
    console.print(f"{summary['n_images']} images: {counts}; errors: {summary['n_errors']} "
                  f"-> {summary['out_csv']}", highlight=False, markup=False)


@app.command("explain")
@user_errors
def explain_cmd(
    model: Path = typer.Argument(..., help="Checkpoint (.ckpt) of a run, e.g. runs/train/weights/best.ckpt (not the .onnx)."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (png, jpg, jpeg, tif, tiff, bmp; any case)."),
    out: Path = typer.Option(Path("explain"), "--out", "-o",
                             help="Folder for <image>.cam.png overlays, explain.png (contact sheet) and explain.csv."),
    target_class: Optional[str] = typer.Option(None, "--class",
                                               help="Class whose evidence to show (default: each image's predicted class)."),
    layer: Optional[str] = typer.Option(None, "--layer",
                                        help="Module to take the feature map from, e.g. backbone.layer3 "
                                        "(default: the backbone's last 4-D feature map before pooling)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Images per forward/backward pass."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Look for images in subfolders too."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier explain folder at --out "
                               "(a folder holding anything else is never replaced)."),
):
    """Grad-CAM: show where in each image the evidence for the predicted (or a chosen) class sits."""
    from crystalscope.insight.explain import explain_images

    summary = explain_images(model, images, out, target_class=target_class, layer=layer,
                             batch_size=batch_size, device=device, recursive=recursive, force=force)
    for row in summary["explanations"]:
        if not row.ok:
            typer.secho(f"{row.path}: {row.status}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"Grad-CAM at {summary['layer']}: {summary['n_ok']} overlays, {summary['n_errors']} errors "
               f"-> {summary['out_dir']}/ (explain.png, explain.csv)")
    if summary["n_ok"] == 0:
        raise fail(f"none of the {summary['n_images']} files could be read as an image (reasons in {summary['csv']})", 1)


def _row_progress(enabled: bool):
    """A context giving ``advance(n)`` for a row counter on stderr (a no-op when not a terminal)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("predicting: {task.completed} rows"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("predict", total=None)
            yield lambda n: progress.advance(task, n)

    return bar()


@app.command("merge")
@user_errors
def merge_cmd(
    parts: List[Path] = typer.Argument(..., help="The CSVs of `predict --shard I/N`, one per shard."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="The joined CSV (written atomically)."),
):
    """Join the prediction CSVs of several shards (same model, same columns) into one."""
    from crystalscope.inference.stream import merge_csvs

    result = merge_csvs(parts, out)
    typer.echo(f"{result['rows']} rows from {result['parts']} shard CSVs -> {result['out_csv']}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
