"""What every command shares: the Typer app, the one error boundary and logging.

Each command parses its options, calls one library function, prints a summary and sets the
exit code. Heavy libraries (torch, timm, onnxruntime) are imported inside the commands, so
`crystalscope predict model.onnx ...` works where PyTorch is not installed.
"""

from __future__ import annotations

import functools
import sys

import typer

from crystalscope.version import __version__
from crystalscope.data.layout import IMAGE_EXTENSIONS
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

#: Help of an IMAGES argument, from the one rule of what an image file is (data/layout.py).
IMAGE_PATHS_HELP = f"Image files and/or folders ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}; any case)."


def console(stderr: bool = False):
    """The CLI's one rich Console: every string it prints is literal text, never markup.

    File names, class folders and messages are user text: a path such as ``runs/[/b]x`` or
    ``PG [red].png`` must print as it is (rich would read it as a closing tag and raise).
    Styles are given as ``style=`` or ``rich.text.Text`` spans, never inline ``[tags]``.

    Example:
        >>> console().print("split [/b] -> out")  # doctest: +SKIP
        split [/b] -> out
    """
    from rich.console import Console

    return Console(stderr=stderr, markup=False, highlight=False, emoji=False)


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


def log_to_terminal(verbose: bool = False) -> None:
    """Show the library's log records (``logging.getLogger("crystalscope")``) on stderr, message only.

    The library logs and returns results; this is the one place that decides how its log lines
    look to a user. INFO (progress notes such as one line per epoch) by default, DEBUG with -v.
    """
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("crystalscope")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show debugging log lines."),
):
    """crystalscope: split, audit, train, evaluate, export and predict."""
    log_to_terminal(verbose)

