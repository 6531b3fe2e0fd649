"""User-facing errors.

Anything a user can cause (a missing folder, a single class, a corrupt image, a wrong model
file) raises :class:`CrystalscopeError` with a one-line message that names the file or option
and says what to do. The CLI prints that line and exits non-zero, never a traceback.
"""


class CrystalscopeError(Exception):
    """An expected, user-caused problem with a one-line, actionable message."""

    exit_code = 2


class OutputError(CrystalscopeError):
    """An output path that would overwrite an input or delete a user's files."""


class MissingDependencyError(CrystalscopeError):
    """An optional dependency (PyTorch, ONNX Runtime, ...) is not installed."""


def require(module: str, extra: str):
    """Import ``module`` or raise a one-line error naming the pip extra that provides it.

    Example:
        >>> torch = require("torch", "train")  # doctest: +SKIP
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed: run `pip install 'crystalscope[{extra}]'` ({exc})"
        ) from None
