"""The `crystalscope` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function, renders the result with rich and
sets the exit code. Commands live in one module per group (``data``, ``train``, ``demo``,
``infer``, ``insight``, ``monitor``, ``serve``), all registered on the one ``app`` of
:mod:`crystalscope.cli.common`. Heavy libraries (torch, timm, onnxruntime) are imported inside
the commands, so ``crystalscope predict model.onnx ...`` works where PyTorch is not installed.
"""

import sys

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

#: options that may be given without a value: ``--opcua`` alone serves on the default endpoint
OPTIONAL_VALUES = {"--opcua": "opc.tcp://127.0.0.1:4840/crystalscope/"}


def main() -> None:
    """Console-script entry point."""
    app(args=fill_optional_values(sys.argv[1:]))


def fill_optional_values(args: list[str]) -> list[str]:
    """Give an option whose value may be left out its default (Typer options always take one).

    Example:
        >>> fill_optional_values(["monitor", "m.onnx", "frames", "--opcua", "--watch"])[3:5]
        ['--opcua', 'opc.tcp://127.0.0.1:4840/crystalscope/']
    """
    filled = []
    for i, arg in enumerate(args):
        filled.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            filled.append(OPTIONAL_VALUES[arg])
    return filled
