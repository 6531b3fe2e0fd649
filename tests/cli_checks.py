"""Checks shared by the CLI group tests (tests/cli/test_<group>.py): run a command in-process and
look at what a user would see."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from crystalscope.cli import app

WIDE = {"COLUMNS": "200"}  # rich wraps help and tables to the terminal width


def invoke(*args: str) -> Result:
    """``crystalscope ARGS...`` through the real app (stdout and stderr together in ``.output``)."""
    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def error_line(result: Result, code: int = 2) -> str:
    """The one ``error:`` line of a refused command, after checking the exit code and that no traceback shows."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def help_text(command: str) -> str:
    """``crystalscope COMMAND --help`` (exit 0)."""
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    return result.output


def tiny_checkpoint(folder: Path) -> Path:
    """``folder/tiny.ckpt``: an untrained efficientnet_lite0 at 32 px (commands run it with torch, no export)."""
    import torch

    from crystalscope.data.transforms import Preprocessing
    from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint
    from crystalscope.models.factory import HeadSpec, build_model

    torch.manual_seed(0)
    head = HeadSpec(hidden=[8], dropout=[0.0])
    model = build_model("efficientnet_lite0", 2, head).eval()
    ckpt = make_checkpoint(model, backbone="efficientnet_lite0", head=head, class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=Preprocessing(image_size=32))
    return save_checkpoint(ckpt, Path(folder) / "tiny.ckpt")
