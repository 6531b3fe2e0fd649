"""The `crystalscope` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function, renders the result with rich and
sets the exit code. Commands live in one module per group (``data``, ``train``, ``demo``,
``infer``, ``insight``, ``monitor``, ``serve``), all registered on the one ``app`` of
:mod:`crystalscope.cli.common`. Heavy libraries (torch, timm, onnxruntime) are imported inside
the commands, so ``crystalscope predict model.onnx ...`` works where PyTorch is not installed.
"""

# importing a group registers its commands; --help lists them in this order
from crystalscope.cli import data  # noqa: F401, I001
from crystalscope.cli import train  # noqa: F401
from crystalscope.cli import demo  # noqa: F401
from crystalscope.cli import infer  # noqa: F401
from crystalscope.cli import insight  # noqa: F401
from crystalscope.cli import monitor  # noqa: F401
from crystalscope.cli import serve  # noqa: F401
from crystalscope.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
