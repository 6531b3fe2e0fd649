"""Insight commands: embed, drift and explain."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from crystalscope.cli.common import IMAGE_PATHS_HELP, app, console as cli_console, user_errors


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
    from crystalscope.runtime import progress_bar

    with progress_bar("features") as on_progress:
        summary = embed_folder(model, folder, out, clusters=clusters, projection=projection, groups_csv=groups,
                               per_cluster=per_cluster, batch_size=batch_size, device=device, seed=seed,
                               on_progress=on_progress, force=force)
    _print_embedding(summary, out)


def _print_embedding(summary: dict, out: Path) -> None:
    from rich.table import Table

    clusters = summary["clusters"]
    table = Table(title=f"{summary['n_images']} images, k-means k={clusters['k']} ({clusters['chosen_by']})",
                  title_justify="left")
    for column in ("cluster", "images", "true", "predicted"):
        table.add_column(column)
    for row in clusters["composition"]:
        table.add_row(str(row["cluster"]), str(row["n"]), ", ".join(f"{k} {v}" for k, v in row["true"].items()),
                      ", ".join(f"{k} {v}" for k, v in row["predicted"].items()))
    console = cli_console()
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
    from crystalscope.runtime import progress_bar

    settings = DriftSettings(false_flag_rate=rate, neighbours=neighbours, permutations=permutations, seed=seed)
    with progress_bar("features") as on_progress:
        summary = drift_report(reference, new, out, model=model, settings=settings, groups_csv=groups,
                               image_size=image_size,
                               batch_size=batch_size, device=device, on_progress=on_progress, force=force)
    _print_drift(summary, out)


def _print_drift(summary: dict, out: Path) -> None:
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
    console = cli_console()
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
    images: List[Path] = typer.Argument(..., help=IMAGE_PATHS_HELP),
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
