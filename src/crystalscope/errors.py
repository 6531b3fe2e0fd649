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


def check_number(option: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, what: str = "") -> None:
    """Refuse a numeric option that is not finite or outside ``[low, high]`` (``low_open``: ``(low``).

    The one check of every float option (``nan`` passes every ``<``/``>`` test, so a plain
    comparison lets it through into the outputs).

    Raises:
        CrystalscopeError: one line naming the option, its value and the allowed range.

    Example:
        >>> check_number("--poll-s", 0.5, 0, low_open=True)
        >>> check_number("--pg-onset-s", float("nan"), 0)
        Traceback (most recent call last):
        crystalscope.errors.CrystalscopeError: --pg-onset-s nan: must be a finite number of at least 0
    """
    import math

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CrystalscopeError(f"{option} {value}: must be a number") from None
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"above {low:g}" if low_open else f"of at least {low:g}"
    elif high is not None:
        bounds = f"below {high:g}" if high_open else f"of at most {high:g}"
    else:
        bounds = ""
    inside = (math.isfinite(number)
              and (low is None or (number > low if low_open else number >= low))
              and (high is None or (number < high if high_open else number <= high)))
    if not inside:
        raise CrystalscopeError(f"{option} {value}: must be a finite number {bounds}".rstrip() + what)
