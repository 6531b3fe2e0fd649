"""The `crystalscope` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function, prints a summary and sets the
exit code. Heavy libraries (torch, timm, onnxruntime) are imported inside the commands, so
`crystalscope predict model.onnx ...` works where PyTorch is not installed.
"""

from __future__ import annotations

import contextlib
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
    reject_fpr: Optional[float] = typer.Option(None, help="Fit the rejection of foreign images so this fraction of valid (val) crops is rejected; 0 turns it off (default: 0.01)."),
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
        cache_dir=cache_dir, onnx=onnx, reject_fpr=reject_fpr, nproc=nproc, lr_scaling=lr_scaling,
        sync_bn=sync_bn).items() if v is not None}
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
    """Write the test report (txt, json, plots, misclassified.csv/.png) of a saved model on a folder."""
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
                  "metrics_plot.png, confusion_matrix.png, roc_auc.png, calibration.png, misclassified.csv, misclassified.png, "
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
                             help="CSV to write: path,predicted,confidence,p_<class>...,ood_score,ood_threshold,status."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Look for images in subfolders too."),
    device: str = typer.Option("auto", "--device", help="For .ckpt models: auto, cpu or cuda (ONNX runs on the CPU)."),
    show: int = typer.Option(20, "--show", min=0, help="Rows to print in the terminal table."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also write a PNG contact sheet of the images "
                                         "with predicted class, confidence and status (e.g. predictions.png)."),
    sheet_max: int = typer.Option(96, "--sheet-max", min=1, help="Most images on the sheet; beyond it the "
                                  "rejected, unreadable and least confident come first."),
    reject: bool = typer.Option(True, "--reject/--no-reject",
                                help="Mark foreign images (not a crystal) status=rejected when the model has a fitted rejection."),
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
                                 resume=resume, shard=parse_shard(shard), keep=show, on_rows=advance,
                                 reject=reject, sheet=sheet, sheet_max=sheet_max)
    if summary.get("n_skipped"):
        typer.echo(f"resumed: {summary['n_skipped']} files already in {out} were skipped", err=True)
    _print_predictions(summary, show)
    if summary["n_images"] and summary["n_ok"] + summary["n_rejected"] == 0:  # (a resume may have nothing left)
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
        table.add_row(Text(p.path), Text(p.predicted or ""), f"{p.confidence:.4f}" if p.classified else "",
                      Text(p.status, style="" if p.ok else "yellow" if p.rejected else "red"))
    console = Console()
    if show:
        console.print(table)
        if summary["n_images"] > show:
            console.print(f"... {summary['n_images'] - show} more rows in {summary['out_csv']}", markup=False)
    counts = ", ".join(f"{c}: {n}" for c, n in summary["counts"].items())
    rejection = summary.get("rejection")
    rejected = (f"; rejected as foreign: {summary['n_rejected']} ({rejection['method']} score > "
                f"{rejection['threshold']:.4g})" if rejection else "; rejection: off (not fitted or --no-reject)")
    console.print(f"{summary['n_images']} images: {counts}{rejected}; errors: {summary['n_errors']} "
                  f"-> {summary['out_csv']}", highlight=False, markup=False)
    if summary.get("sheet"):
        console.print(f"contact sheet -> {summary['sheet']}", highlight=False, markup=False)


# ---- insight commands (embed, drift) -------------------------------------------------------


@contextlib.contextmanager
def _progress_callback(description: str):
    """A transient rich bar on stderr, driven by a library's ``on_progress(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command("embed")
@user_errors
def embed_cmd(
    model: Path = typer.Argument(..., help="Trained model: a .ckpt checkpoint or an exported .onnx."),
    folder: Path = typer.Argument(..., help="Folder of images, or of class folders (then the true class is shown)."),
    out: Path = typer.Option(Path("embedding"), "--out", "-o", help="Report folder: embedding.png, "
                             "embedding.csv (path,true,predicted,cluster,x,y), embedding.json."),
    clusters: Optional[int] = typer.Option(None, "--clusters", "-k", min=1, help="k-means clusters "
                                           "(default: the K in 2..8 with the best silhouette)."),
    projection: str = typer.Option("pca", "--projection", help="pca, or umap (needs `pip install umap-learn`)."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="CSV with path and crystal_id or group columns "
                                          "(synth_manifest.csv, split.csv): measure whether views of one crystal "
                                          "sit together."),
    per_cluster: int = typer.Option(4, "--per-cluster", min=1, max=8, help="Thumbnails per cluster on the map."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="For .ckpt models: auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of k-means (and UMAP)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier embed report at --out."),
):
    """Map a model's penultimate features of every image in 2-D, with k-means clusters and thumbnails."""
    from crystalscope.insight.embedding import embed_folder

    with _progress_callback("features") as on_progress:
        summary = embed_folder(model, folder, out, clusters=clusters, projection=projection, groups_csv=groups,
                               per_cluster=per_cluster, batch_size=batch_size, device=device, seed=seed,
                               on_progress=on_progress, force=force)
    _print_embedding(summary, out)


def _print_embedding(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    clusters = summary["clusters"]
    table = Table(title=f"{summary['n_images']} images, k-means k={clusters['k']} ({clusters['chosen_by']})",
                  title_justify="left")
    for column in ("cluster", "images", "true", "predicted"):
        table.add_column(column)
    for row in clusters["composition"]:
        table.add_row(str(row["cluster"]), str(row["n"]), ", ".join(f"{k} {v}" for k, v in row["true"].items()),
                      ", ".join(f"{k} {v}" for k, v in row["predicted"].items()))
    console = Console()
    console.print(table)
    explained = summary["projection"]["explained"]
    if explained:
        console.print(f"PCA: {100 * explained[0]:.1f} % + {100 * explained[1]:.1f} % of the variance on the map")
    cohesion = (summary.get("view_cohesion") or {}).get("features")
    if cohesion:
        console.print(f"views of one crystal: mean cosine distance {cohesion['within_group_mean']:.3f} vs "
                      f"{cohesion['all_pairs_mean']:.3f} for all pairs; nearest neighbour is a view of the same "
                      f"crystal for {100 * cohesion['nearest_same_group']:.0f} % ({cohesion['n_groups']} crystals)")
    console.print(f"-> {out}/embedding.png, embedding.csv, embedding.json", highlight=False, markup=False)


@app.command("drift")
@user_errors
def drift_cmd(
    reference: Path = typer.Argument(..., help="Folder of reference images (e.g. the training data; a split "
                                     "folder means its train/)."),
    new: List[Path] = typer.Argument(..., help="Folders (or files) of new images; each is judged as one set."),
    model: Optional[Path] = typer.Option(None, "--model", help="Use this .ckpt/.onnx model's penultimate features "
                                         "(default: ImageNet efficientnet_lite0 features, offline)."),
    out: Path = typer.Option(Path("drift"), "--out", "-o", help="Report folder: drift.csv, drift.json, drift.png, "
                             "drift_foreign.png."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="CSV with path and crystal_id or group columns: "
                                          "views of one crystal in the reference (default: the split.csv or "
                                          "synth_manifest.csv next to REFERENCE, if any)."),
    rate: float = typer.Option(0.01, "--rate", help="False-flag rate: share of reference-like images flagged."),
    neighbours: int = typer.Option(10, "--neighbours", min=1, help="k of the k-nearest-neighbour distance."),
    permutations: int = typer.Option(500, "--permutations", min=1, help="Permutations of the MMD test."),
    image_size: int = typer.Option(224, "--image-size", min=8, help="Input side of the ImageNet features "
                                   "(not used with --model)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (an .onnx model runs on the CPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the MMD test's sampling and permutations."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier drift report at --out."),
):
    """How far are new images from the reference? Per-image flags, per-folder MMD test, a map.

    Exits 0 whenever the report is complete; the verdict is in the report.
    """
    from crystalscope.insight.drift import DriftSettings, drift_report

    settings = DriftSettings(false_flag_rate=rate, neighbours=neighbours, permutations=permutations, seed=seed)
    with _progress_callback("features") as on_progress:
        summary = drift_report(reference, new, out, model=model, settings=settings, groups_csv=groups,
                               image_size=image_size,
                               batch_size=batch_size, device=device, on_progress=on_progress, force=force)
    _print_drift(summary, out)


def _print_drift(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"drift against {summary['reference']} ({summary['n_reference']} images; "
                             f"{summary['features']})"), title_justify="left")
    for column in ("set", "images", "flagged", "95 % interval", "MMD²", "p", "verdict"):
        table.add_column(column)
    for name, s in summary["sets"].items():
        low, high = s["flagged_ci95"]
        mmd = s["mmd"] or {}
        table.add_row(Text(name), str(s["n_images"]), f"{s['n_flagged']} ({100 * (s['flagged_fraction'] or 0):.1f} %)",
                      f"{100 * low:.1f}-{100 * high:.1f} %", f"{mmd.get('mmd2', float('nan')):.4f}",
                      f"{mmd.get('p_value', float('nan')):.3g}", s["verdict"])
    console = Console()
    console.print(table)
    console.print(f"threshold {summary['threshold']:.4f} (cosine distance, "
                  f"{100 * summary['settings']['false_flag_rate']:g} % of held-out reference images above it)",
                  highlight=False)
    if summary["threshold_note"]:
        console.print(f"note: {summary['threshold_note']}", highlight=False, markup=False)
    console.print(f"-> {out}/drift.csv, drift.json, drift.png, drift_foreign.png", highlight=False, markup=False)


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

@app.command("serve")
@user_errors
def serve_cmd(
    model: Path = typer.Argument(..., help="Trained model: an exported .onnx (or a .ckpt when PyTorch is installed)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (each loads the model)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CRYSTALSCOPE_TOKEN",
                                        help="Bearer token required on every /api request [env CRYSTALSCOPE_TOKEN]."),
    max_request_mb: float = typer.Option(32.0, "--max-request-mb", help="Largest request body (all files), MiB."),
    max_files: int = typer.Option(64, "--max-files", help="Most images in one request."),
    max_pixels: int = typer.Option(25_000_000, "--max-pixels", help="Most pixels (width x height) in one image."),
    max_request_pixels: int = typer.Option(100_000_000, "--max-request-pixels",
                                           help="Most pixels of all images in one request (bounds its memory)."),
    device: str = typer.Option("auto", "--device", help="For .ckpt models: auto, cpu or cuda (ONNX runs on the CPU)."),
):
    """Serve a web page (drop images, get labels and a CSV) and a REST API (/api/predict, /docs)."""
    import logging

    from crystalscope.serve.server import serve
    from crystalscope.serve.uploads import ServeLimits

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    limits = ServeLimits(max_request_bytes=int(max_request_mb * 1024 * 1024), max_files=max_files,
                         max_pixels=max_pixels, max_request_pixels=max_request_pixels)
    serve(model, host=host, port=port, workers=workers, token=token, limits=limits, device=device)


# ---- process monitoring (synth-process, monitor) -------------------------------------------


@app.command("synth-process")
@user_errors
def synth_process_command(
    out_dir: Path = typer.Argument(..., help="Output folder: OUT_DIR/frames/frame_<i>_t<seconds>s.png "
                                   "and the ground truth in OUT_DIR/truth/ (run.json, frames.csv, particles.csv)."),
    frames: int = typer.Option(120, "--frames", help="Number of frames."),
    interval_s: float = typer.Option(30.0, "--interval-s", help="Seconds between frames."),
    pg_onset_s: float = typer.Option(1800.0, "--pg-onset-s", help="Time PG appears; later than the last "
                                     "frame gives a run without PG."),
    pg_max: float = typer.Option(0.4, "--pg-max", help="PG share of the particles long after the onset."),
    pg_rise_s: float = typer.Option(600.0, "--pg-rise-s", help="Time constant of the PG share's rise."),
    width: int = typer.Option(1024, "--width", help="Frame width in px (particles are drawn at crop scale)."),
    height: int = typer.Option(768, "--height", help="Frame height in px."),
    difficulty: str = typer.Option("realistic", "--difficulty", help="Crop generator difficulty: easy | realistic | hard."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives byte-identical frames."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR (once the new run is complete)."),
):
    """Generate a batch crystallization as probe frames (CEX, then PG from an onset) with ground truth."""
    from crystalscope.monitor.frames import ProcessSpec, generate_process

    spec = ProcessSpec(frames=frames, interval_s=interval_s, pg_onset_s=pg_onset_s, pg_max=pg_max,
                       pg_rise_s=pg_rise_s, width=width, height=height, difficulty=difficulty, seed=seed)
    s = generate_process(out_dir, spec, force=force)
    onset = "no PG (onset after the last frame)" if s["onset_s"] is None else f"PG onset at {s['onset_s']:g} s"
    typer.echo(f"wrote {s['n_frames']} frames ({width}x{height}) with {s['n_particles']} particles "
               f"({s['n_pg']} PG) to {s['frames_dir']}; {onset}; ground truth in {Path(out_dir) / 'truth'} "
               f"({s['seconds']:.1f} s)")


@app.command("monitor")
@user_errors
def monitor_command(
    model: Path = typer.Argument(..., help="Trained model: .onnx (ONNX Runtime, no PyTorch needed) or .ckpt."),
    frames_dir: Path = typer.Argument(..., help="Folder of probe frames (times from ..._t<seconds>s.png names, "
                                      "else file times)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for particles.csv, timeline.csv, timeline.png, alarms.json."),
    watch: bool = typer.Option(False, "--watch", help="Keep processing frames as they appear; Ctrl-C stops "
                               "with every output written."),
    alarm_fraction: float = typer.Option(0.32, "--alarm-fraction", help="Alarm limit on the smoothed PG fraction."),
    alarm_frames: int = typer.Option(2, "--alarm-frames", help="Consecutive frames above the limit before the alarm."),
    smoothing: float = typer.Option(0.1, "--smoothing", help="EWMA weight of the newest frame (0..1]."),
    detector: str = typer.Option("segment", "--detector", help="segment (particles) | tiles (crop-sized grid)."),
    min_confidence: float = typer.Option(0.9, "--min-confidence", help="Classifications below this are "
                                         "written as 'uncertain' and not counted."),
    min_sharpness: float = typer.Option(1.9, "--min-sharpness", help="Focus limit (Laplacian std, grey levels); "
                                        "blurrier regions are 'out of focus'. 0 classifies all."),
    max_side: int = typer.Option(260, "--max-side", help="Regions with a longer side (px) are 'cluster' "
                                 "(overlapping particles), not classified."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write overlay/<frame>.jpg with boxes coloured by class (rejected/out of focus hatched)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Crops per forward pass."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier monitor output at --out "
                               "(a folder holding anything else is never replaced)."),
):
    """Watch a crystallization: particles per frame -> PG fraction over time -> alarm."""
    from rich.console import Console

    from crystalscope.monitor.run import MonitorSettings, run_monitor
    from crystalscope.monitor.timeline import AlarmRule

    console = Console(stderr=True)
    settings = MonitorSettings(rule=AlarmRule(alarm_fraction, alarm_frames, smoothing), detector=detector,
                               batch_size=batch_size, overlay=overlay, min_sharpness=min_sharpness,
                               max_side=max_side, min_confidence=min_confidence)

    def show(record) -> None:
        fraction = "-" if record.fraction is None else f"{record.fraction:.2f}"
        console.print(f"frame {record.frame} {record.file}: {sum(record.counts.values())} classified, "
                      f"{record.rejected} rejected, {record.out_of_focus + record.clusters + record.uncertain} "
                      f"not counted, fraction {fraction}, EWMA "
                      f"{'-' if record.ewma is None else f'{record.ewma:.3f}'} {record.status}",
                      markup=False, highlight=False)

    s = run_monitor(model, frames_dir, out, settings, watch=watch, on_frame=show if watch else None, force=force)
    alarms = "; ".join(f"frame {a['frame']} at {a['time_s']:g} s" for a in s["alarms"]) or "none"
    typer.echo(f"{s['n_frames']} frames ({s['n_frame_errors']} unreadable), {s['n_particles']} particles, "
               f"{s['backend']} back end, {s['seconds']:.1f} s{' (interrupted)' if s['interrupted'] else ''}")
    typer.echo(f"alarms ({s['rule']}): {alarms}")
    typer.echo(f"outputs: {', '.join(s['outputs'])}")


@app.command("synth-ood")
@user_errors
def synth_ood_command(
    out: Path = typer.Argument(..., help="Folder to create: one subfolder of PNGs per foreign-image set."),
    per_set: int = typer.Option(100, "--per-set", min=1, help="Images per set."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives the same images."),
    crystals: Optional[Path] = typer.Option(None, "--crystals", help="Crops for the exposure, blurred and cropped sets (default: generated)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT folder."),
):
    """Write foreign-image sets (photos, uniform, gradient, noise, exposure, text, checkerboard, blurred, cropped)."""
    from crystalscope.data.ood_sets import generate

    summary = generate(out, per_set=per_set, seed=seed, crystal_dir=crystals, force=force)
    sets = ", ".join(f"{name} ({info['kind']})" for name, info in summary["sets"].items())
    typer.echo(f"{per_set} images each in {out}: {sets}; photos from {summary['photo_source'] or '-'}")


@app.command("ood-eval")
@user_errors
def ood_eval_command(
    model: Path = typer.Argument(..., help="A .ckpt or .onnx trained with rejection (--reject-fpr > 0)."),
    in_dir: Path = typer.Argument(..., help="In-distribution crops, e.g. SPLIT/test."),
    out_dirs: List[Path] = typer.Argument(..., help="Folders of foreign images; a synth-ood folder counts as its sets."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write ood_eval.json and ood_eval.md into this folder."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="For .ckpt models: auto, cpu or cuda."),
):
    """Measure rejection of foreign images: AUROC, FPR at 95 % TPR and rejection rate per folder."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from crystalscope.inference.ood_eval import evaluate_ood

    result = evaluate_ood(model, in_dir, out_dirs, report_dir=report, batch_size=batch_size, device=device)
    ind = result["in_distribution"]
    table = Table(title=Text(f"{result['model']} ({result['backend']}): {result['method']} score, threshold "
                             f"{result['threshold']:.4g}"), title_justify="left")
    for column in ("set", "kind", "images", "AUROC", "FPR@95%TPR", "rejected"):
        table.add_column(column, justify="left" if column in ("set", "kind") else "right")
    table.add_row(Text(f"in: {ind['folder']}"), "in", str(ind['n_images']), "", "", f"{ind['rejection_rate']:.1%}")
    for s in result["sets"]:
        table.add_row(Text(s["name"]), s["kind"], str(s["n_images"]), f"{s['auroc']:.4f}",
                      f"{s['fpr_at_95_tpr']:.1%}", f"{s['rejection_rate']:.1%}")
    Console().print(table)
    if report is not None:
        typer.echo(f"report: {report / 'ood_eval.md'}, {report / 'ood_eval.json'}")


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
