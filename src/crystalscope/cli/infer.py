"""Commands that run a trained model: evaluate, export, predict, merge and ood-eval."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from crystalscope.cli.common import IMAGE_PATHS_HELP, app, console as cli_console, fail, user_errors

if TYPE_CHECKING:  # the CLI imports the library inside each command (a plant PC may lack torch)
    from crystalscope.inference.stream import PredictSummary


@app.command("evaluate")
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
    from crystalscope.inference.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data_dir, out, batch_size=batch_size, device=device, workers=workers,
                                 force=force)
    if result.get("meta", {}).get("warning"):
        typer.secho(f"warning: {result['meta']['warning']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"accuracy {result['accuracy']:.4f}, macro F1 {result['macro']['f1']:.4f}, "
               f"{result['n_missed']} of {result['n_images']} missed")
    for name, s in result["per_class"].items():
        typer.echo(f"{name} - Precision: {s['precision']:.4f}, Recall: {s['recall']:.4f}, F1-Score: {s['f1']:.4f}")


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
    paths: List[Path] = typer.Argument(..., help=IMAGE_PATHS_HELP),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o",
                             help="CSV to write: path,predicted,confidence,p_<class>...,ood_score,ood_threshold,status; "
                             "beside it <csv>.json records the model, inputs and options (resume and merge check "
                             "it). '-' writes the CSV to standard output (no .json; logs stay on stderr)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Images per forward pass "
                                             "(default: 8 for an .onnx model, the fastest on a CPU; 32 for a .ckpt)."),
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
    from crystalscope.runtime import progress_bar

    # on stderr so stdout stays clean when redirected; no total: files are listed lazily
    with progress_bar("predicting", total=None) as on_progress:
        summary = predict_stream(model, paths, out, batch_size=batch_size, recursive=recursive, device=device,
                                 resume=resume, shard=parse_shard(shard), keep=show, on_progress=on_progress,
                                 reject=reject, sheet=sheet, sheet_max=sheet_max)
    if summary.n_skipped:
        typer.echo(f"resumed: {summary.n_skipped} files already in {out} were skipped", err=True)
    _print_predictions(summary, show, stderr=str(out) == "-")  # stdout carries the CSV then
    if summary.n_images and summary.n_ok + summary.n_rejected == 0:  # (a resume may have nothing left)
        raise fail(f"none of the {summary.n_images} files could be read as an image (reasons in {out})", 1)


def _print_predictions(summary: "PredictSummary", show: int, stderr: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text  # plain Text: file names like "PG [1].png" are not markup

    table = Table(title=Text(f"{summary.model} ({summary.backend})"), title_justify="left")
    for column in ("path", "predicted", "confidence", "status"):
        table.add_column(column, overflow="fold", justify="right" if column == "confidence" else "left")
    predictions = summary.predictions  # only the first rows when streamed
    for p in predictions[:show]:
        table.add_row(Text(p.path), Text(p.predicted or ""), f"{p.confidence:.4f}" if p.classified else "",
                      Text(p.status, style="" if p.ok else "yellow" if p.rejected else "red"))
    console = cli_console(stderr=stderr)
    if show:
        console.print(table)
        if summary.n_images > show:
            console.print(f"... {summary.n_images - show} more rows in {summary.out_csv}", markup=False)
    counts = ", ".join(f"{c}: {n}" for c, n in summary.counts.items())
    rejection = summary.rejection
    rejected = (f"; rejected as foreign: {summary.n_rejected} ({rejection['method']} score > "
                f"{rejection['threshold']:.4g})" if rejection else "; rejection: off (not fitted or --no-reject)")
    console.print(f"{summary.n_images} images: {counts}{rejected}; errors: {summary.n_errors} "
                  f"-> {summary.out_csv}", highlight=False, markup=False)
    if summary.sheet:
        console.print(f"contact sheet -> {summary.sheet}", highlight=False, markup=False)


# ---- rejection of foreign images ------------------------------------------------------------


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
    from rich.table import Table
    from rich.text import Text

    from crystalscope.inference.ood_eval import evaluate_ood

    result = evaluate_ood(model, in_dir, out_dirs, report_dir=report, batch_size=batch_size, device=device)
    ind = result.in_distribution
    table = Table(title=Text(f"{result.model} ({result.backend}): {result.method} score, threshold "
                             f"{result.threshold:.4g}"), title_justify="left")
    for column in ("set", "kind", "images", "AUROC", "FPR@95%TPR", "rejected"):
        table.add_column(column, justify="left" if column in ("set", "kind") else "right")
    table.add_row(Text(f"in: {ind.folder}"), "in", str(ind.n_images), "", "", _percent(ind.rejection_rate))
    for s in result.sets:
        table.add_row(Text(s.name), s.kind, str(s.n_images), "-" if s.auroc is None else f"{s.auroc:.4f}",
                      _percent(s.fpr_at_95_tpr), _percent(s.rejection_rate))
    cli_console().print(table)
    if report is not None:
        typer.echo(f"report: {report / 'ood_eval.md'}, {report / 'ood_eval.json'}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


@app.command("merge")
@user_errors
def merge_cmd(
    parts: List[Path] = typer.Argument(..., help="The CSVs of `predict --shard I/N`, one per shard."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="The joined CSV (written atomically, "
                             "with its <csv>.json)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Merge even when a shard of I/N is "
                                       "missing (the summary and the .json name the missing ones)."),
):
    """Join the prediction CSVs of the shards of one campaign (same model, inputs and options) into one.

    Refuses a shard given twice, shards of different models or options, a path in two shards
    and, without --allow-partial, a missing shard.
    """
    from crystalscope.inference.stream import merge_csvs

    result = merge_csvs(parts, out, allow_partial=allow_partial)
    missing = result["missing_shards"]
    note = f" (partial: shard {', '.join(missing)} missing)" if missing else ""
    typer.echo(f"{result['rows']} rows from {result['parts']} shard CSVs -> {result['out_csv']}{note}")
