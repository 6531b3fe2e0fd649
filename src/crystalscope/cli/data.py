"""Data commands: synth, split, audit and synth-ood (the library returns results; this renders them)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from crystalscope.cli.common import app, console as cli_console, user_errors

if TYPE_CHECKING:
    from rich.console import Console

    from crystalscope.data.audit import AuditResult
    from crystalscope.data.split import SplitSummary


def render_split(summary: "SplitSummary", console: "Console | None" = None) -> None:
    """The class x split counts table, then what was grouped, skipped or warned about."""
    from rich.table import Table

    from crystalscope.data.split import summary_lines
    from crystalscope.formats import SPLITS

    console = console or cli_console()
    table = Table(title=f"split of {summary.source} -> {summary.out_dir} (seed {summary.seed})")
    table.add_column("class")
    for split_name in SPLITS:
        table.add_column(split_name, justify="right")
    table.add_column("total", justify="right")
    totals: Counter = Counter()
    for class_name, counts in summary.counts.items():
        n = sum(counts.values())
        totals.update(counts)
        table.add_row(class_name, *(f"{counts[s]} ({counts[s] / n:.1%})" for s in SPLITS), str(n))
    table.add_row("all", *(str(totals[s]) for s in SPLITS), str(sum(totals.values())), style="bold")
    console.print(table)
    for line in summary_lines(summary):
        console.print(line, markup=False, style="yellow" if line.startswith("warning:") else None)


def render_audit(result: "AuditResult", console: "Console | None" = None) -> None:
    """The counts table and the audit's findings; warnings in bold red."""
    from rich.table import Table

    from crystalscope.data.audit import summary_lines

    console = console or cli_console()
    table = Table(title=f"audit of {result.data_dir}")
    table.add_column("split")
    for class_name in result.classes:
        table.add_column(class_name, justify="right")
    for split_name, counts in result.counts.items():
        table.add_row(split_name, *(str(counts.get(c, 0)) for c in result.classes))
    console.print(table)
    for line in summary_lines(result):
        style = "bold red" if "WARNING" in line else None
        console.print(line, style=style, markup=False, highlight=False)
    console.print(f"report: {result.out_dir}/audit.md, audit.json, sizes.png, intensity.png "
                  f"({result.run_time_s:.1f} s, {result.workers} workers)", markup=False)


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
    from crystalscope.data.synth import KAGGLE_SUBDIR, generate

    summary = generate(out_dir, per_class=per_class, seed=seed, difficulty=difficulty,
                       workers=workers, force=force, progress=not quiet)
    counts, crystals = summary["counts"], summary["crystals"]
    typer.echo(f"wrote {counts['cex']} CEX + {counts['pg']} PG crops ({crystals['pg']} PG crystals, "
               f"3-5 views each) to {Path(out_dir) / KAGGLE_SUBDIR} in {summary['seconds']:.1f} s "
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
    from crystalscope.data.split import split_dataset

    summary = split_dataset(source, out_dir, ratios=ratios, seed=seed, mode=mode, force=force,
                            group_by=group_by, progress=not quiet, workers=workers)
    render_split(summary)


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
    from crystalscope.data.audit import audit_dataset

    result = audit_dataset(data_dir, out_dir=out, progress=not quiet, workers=workers)
    render_audit(result)


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
