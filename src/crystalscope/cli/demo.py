"""The demo command: the whole pipeline on a small synthetic set."""

from __future__ import annotations

from pathlib import Path

import typer

from crystalscope.cli.common import app, console as cli_console, user_errors


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

    from crystalscope.demo import run_demo

    console = cli_console()
    result = run_demo(out, per_class=per_class, backbone=backbone, image_size=image_size, epochs=epochs,
                      seed=seed, on_step=lambda name, step: _print_step(name, step, console))
    _print_demo(result, console)


def _print_step(name: str, result, console) -> None:
    """The split and audit summaries, shown while the next step runs (as `split` and `audit` show them)."""
    from crystalscope.cli.data import render_audit, render_split

    if name == "split":
        render_split(result, console)
    elif name == "audit":
        render_audit(result, console)


def _print_demo(result, console) -> None:
    test = result.test
    console.rule("done")
    console.print(f"test macro F1 {test.get('macro', {}).get('f1', float('nan')):.4f}, "
                  f"accuracy {test.get('accuracy', float('nan')):.4f} on {test.get('n_images', '?')} images; "
                  f"whole demo {result.seconds:.0f} s")
    names = ", ".join(str(path.relative_to(result.run_dir)) for path in result.deliverables())
    console.print(f"deliverables in {result.run_dir}/: {names}")
    console.print(f"dataset audit in {result.audit_dir}/audit.md")
