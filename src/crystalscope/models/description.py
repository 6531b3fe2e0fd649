"""The one check of a loaded model's description, before any work starts.

A checkpoint (``.ckpt``) and an ONNX export carry the same description of the model: class
names, positive class, preprocessing and calibration temperature. :func:`validate_description`
checks those values for both, and :func:`validate_metadata` checks an ONNX file's metadata
against its graph (format version known, image size = the input's static shape, class count =
the width of the class outputs). A bad value is one line naming the key and the allowed range,
so ``predict`` never labels with NaN probabilities and ``serve`` never starts a model that
answers 500. Imports neither torch nor onnx: the ONNX back end runs without them.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import KNOWN_ONNX_FORMATS

#: graph outputs whose last axis is one value per class (validated by name, not position)
CLASS_OUTPUTS = ("logits", "probabilities")


def _bad(source: str, key: str, got, allowed: str) -> CrystalscopeError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CrystalscopeError(f"{source}: {key} = {shown} is not valid: {allowed}; re-export or retrain the model")


def _real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def validate_description(meta, source: str) -> None:
    """Check the model description shared by checkpoints and ONNX metadata.

    Args:
        meta: the checkpoint dict or the parsed ONNX metadata.
        source: the file, for the message.

    Raises:
        CrystalscopeError: one line naming the key and its allowed values: ``class_names`` not a
            list of 2 or more distinct non-empty strings, ``positive_class`` not one of them,
            ``temperature`` not a finite number > 0, ``preprocessing`` not a valid mapping
            (image size >= 8, 3 finite means, 3 finite stds > 0, a known resize).

    Example:
        >>> validate_description({"class_names": ["cex", "cex"]}, "m.onnx")
        Traceback (most recent call last):
        ...
        crystalscope.errors.CrystalscopeError: m.onnx: class_names = ['cex', 'cex'] is not valid: ...
    """
    if not isinstance(meta, dict):
        raise _bad(source, "model description", type(meta).__name__, "expected a mapping of key: value")
    names = meta.get("class_names")
    if (not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, str) and c.strip() for c in names)
            or len(set(names)) != len(names)):
        raise _bad(source, "class_names", names, "a list of 2 or more distinct, non-empty names")
    positive = meta.get("positive_class")
    if positive is not None and positive not in names:
        raise _bad(source, "positive_class", positive, f"one of {', '.join(names)} (or null)")
    temperature = meta.get("temperature")
    if temperature is not None and not (_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise _bad(source, "temperature", temperature, "a finite number > 0 (1 = uncalibrated)")
    backbone = meta.get("backbone")
    if backbone is not None and not isinstance(backbone, str):
        raise _bad(source, "backbone", backbone, "a model name such as resnet18")
    preprocessing_from(meta, source)


def preprocessing_from(meta: dict, source: str) -> Preprocessing:
    """The description's :class:`Preprocessing`, or a one-line error naming the bad key.

    Example:
        >>> preprocessing_from({"preprocessing": {"image_size": 32}}, "m.ckpt").image_size
        32
    """
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        raise _bad(source, "preprocessing", pre, "a mapping with image_size, mean, std, resize, interpolation")
    size = pre.get("image_size", 224)
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 8):
        raise _bad(source, "preprocessing.image_size", size, "a whole number >= 8 (pixels)")
    for key in ("mean", "std"):
        values = pre.get(key, (0.0, 0.0, 0.0) if key == "mean" else (1.0, 1.0, 1.0))
        if (not isinstance(values, (list, tuple)) or len(values) != 3
                or not all(_real(v) and math.isfinite(v) for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            allowed = "3 finite numbers (R, G, B)" + (", each > 0" if key == "std" else "")
            raise _bad(source, f"preprocessing.{key}", values, allowed)
    pad = pre.get("pad_value", 0)
    if not (isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad <= 255):
        raise _bad(source, "preprocessing.pad_value", pad, "a whole number in 0..255")
    try:
        return Preprocessing.from_dict(pre)
    except (CrystalscopeError, TypeError, ValueError) as exc:
        raise CrystalscopeError(f"{source}: preprocessing is not valid ({exc}); re-export or retrain the model") from None


def validate_metadata(meta, graph_inputs: Sequence[tuple[str, Sequence]],
                      graph_outputs: Sequence[tuple[str, Sequence]], source: str = "model") -> None:
    """Check an ONNX file's crystalscope metadata against its graph; the one check of every ONNX load.

    Args:
        meta: the parsed JSON of ``metadata_props['crystalscope']``.
        graph_inputs: ``(name, shape)`` per graph input; a shape lists ints (static) or names/None.
        graph_outputs: ``(name, shape)`` per graph output.
        source: the file, for the message.

    Raises:
        CrystalscopeError: an unknown ``format``, a bad description (:func:`validate_description`),
            an image size that is not the input's static side, or a class output (``logits``,
            ``probabilities``) whose width is not the number of classes.

    Example:
        >>> meta = {"format": "crystalscope-onnx/0", "class_names": ["cex", "pg"]}
        >>> validate_metadata(meta, [("input", ["batch", 3, 32, 32])], [("logits", ["batch", 2])])
        Traceback (most recent call last):
        ...
        crystalscope.errors.CrystalscopeError: model: format = 'crystalscope-onnx/0' is not valid: ...
    """
    if not isinstance(meta, dict):
        raise _bad(source, "crystalscope metadata", type(meta).__name__, "a JSON object of key: value")
    if meta.get("format") not in KNOWN_ONNX_FORMATS:
        raise _bad(source, "format", meta.get("format"), f"one of {', '.join(KNOWN_ONNX_FORMATS)} "
                   "(written by another crystalscope version)")
    validate_description(meta, source)
    if not graph_inputs or not graph_outputs:
        raise CrystalscopeError(f"{source}: the ONNX graph has no input or no output; re-export the model")
    size = meta["preprocessing"].get("image_size", 224)
    shape = list(graph_inputs[0][1] or [])
    static = [d for d in shape[2:4] if isinstance(d, int)]
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3) or any(d != size for d in static):
        raise _bad(source, "preprocessing.image_size", size, f"the side of the graph's input {shape} "
                   "(N, 3, H, W)")
    _check_class_outputs(meta, graph_outputs, source)


def _check_class_outputs(meta: dict, graph_outputs, source: str) -> None:
    n_classes = len(meta["class_names"])
    names = {meta.get("output_name") if isinstance(meta.get("output_name"), str) else None, *CLASS_OUTPUTS}
    checked = [(n, list(s or [])) for n, s in graph_outputs if n in names] or [
        (graph_outputs[0][0], list(graph_outputs[0][1] or []))]
    for name, shape in checked:
        width = shape[-1] if shape else None
        if isinstance(width, int) and width != n_classes:
            raise _bad(source, "class_names", meta["class_names"], f"{width} names, one per column of the "
                       f"graph's '{name}' output")
