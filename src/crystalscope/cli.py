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
    """Turn expected mistakes into a one-line message and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CrystalscopeError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

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

# ---- training commands (train, evaluate, demo) ---------------------------------------------

# ---- deployment commands (export, predict) -------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
