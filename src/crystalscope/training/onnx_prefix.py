"""The frozen backbone prefix of ``--cache-frozen`` / ``--cache-features``, run by ONNX Runtime.

On a 2-core CPU the frozen prefix is most of a cached run's cost, and ONNX Runtime runs the
same convolutions 2-4x faster than eager PyTorch (fused Conv+BN+activation, its own
threading). The prefix is exported once per run, and used only after its output has been
checked against the PyTorch prefix on the run's own images (``max |diff| <= 1e-4`` of the
maps' largest value by default); otherwise, or without ``onnxruntime`` installed, the run keeps the PyTorch prefix
and logs why. Only the cached maps come from ONNX Runtime: the trained tail, the checkpoint,
the test report and ``model.onnx`` are those of the PyTorch model, as in end-to-end training.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from crystalscope.config import choices
from crystalscope.runtime import first_line


#: what ``prefix_runtime`` accepts (named once, in the config): ``auto`` = ONNX Runtime on the
#: CPU when installed and numerically equal, else PyTorch
PREFIX_RUNTIMES = choices("prefix_runtime")
PARITY_ATOL = 1e-4


class OrtPrefix:
    """A module-like callable: float32 ``(N, 3, H, W)`` tensor in, the prefix's maps out.

    Example:
        >>> runner, reason = onnx_runtime_prefix(prefix, check_batch)  # doctest: +SKIP
        >>> runner(check_batch).shape  # doctest: +SKIP
        torch.Size([16, 112, 10, 10])
    """

    def __init__(self, session, max_abs_diff: float):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.max_abs_diff = max_abs_diff
        self.training = False

    def eval(self) -> "OrtPrefix":  # the feature loop calls .eval() on whatever it runs
        return self

    def train(self, mode: bool = True) -> "OrtPrefix":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # ORT wants a plain NCHW buffer; channels_last batches are copied once here
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0])


def _export_prefix(prefix: nn.Module, image_size: int, opset: int = 17) -> bytes:
    """The prefix as ONNX bytes, dynamic batch axis, TorchScript exporter (as ``export/onnx.py``)."""
    example = torch.zeros(2, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/tracer chatter
        torch.onnx.export(prefix, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["maps"],
                          dynamic_axes={"images": {0: "batch"}, "maps": {0: "batch"}},
                          do_constant_folding=True)
    return buffer.getvalue()


def onnx_runtime_prefix(prefix: nn.Module, check_batch: torch.Tensor, *, atol: float = PARITY_ATOL,
                        threads: int | None = None) -> tuple[OrtPrefix | None, str]:
    """Export ``prefix`` to ONNX Runtime and check it on ``check_batch``; ``(runner, why)``.

    ``runner`` is None when ONNX Runtime is not installed, the export fails, or the largest
    absolute difference to the PyTorch prefix on ``check_batch`` (real, normalised images)
    exceeds ``atol`` times the largest absolute value of the PyTorch maps (at least 1); ``why``
    says which, or the measured difference on success.

    Example:
        >>> runner, why = onnx_runtime_prefix(prefix, normalised_images[:16])  # doctest: +SKIP
        >>> why  # doctest: +SKIP
        'ONNX Runtime prefix matches PyTorch on 16 images (max |diff| 1.5e-04, 4e-06 of the largest value 37.8)'
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install 'crystalscope[onnx]')"
    from crystalscope.inference.predictor import onnx_session_options

    was_training = prefix.training
    prefix.eval()
    try:
        model_bytes = _export_prefix(prefix.cpu(), int(check_batch.shape[-1]))
        # predict's session options (no spin-waiting: torch normalises the next batch in between),
        # and as many intra-op threads as torch uses
        options = onnx_session_options(ort, threads or torch.get_num_threads())
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            expected = prefix(check_batch).float()
        runner = OrtPrefix(session, 0.0)
        got = runner(check_batch)
        diff = float((got - expected).abs().max())
        # relative to the maps' scale: they reach ~40 on real crops, where float32 summation
        # order alone moves single values by ~1e-4 (a 4e-6 fraction of the range)
        scale = max(1.0, float(expected.abs().max()))
        same = diff <= atol * scale
    except Exception as exc:  # any export/runtime failure only costs speed, never the run
        return None, f"the ONNX export of the frozen prefix failed ({first_line(exc, 160)})"
    finally:
        prefix.train(was_training)
    if not same:  # also catches NaN
        return None, (f"the ONNX Runtime prefix differs from PyTorch by up to {diff:.1e}, more than {atol:.0e} of "
                      f"the maps' largest value {scale:.1f}, on {check_batch.shape[0]} images")
    runner.max_abs_diff = diff
    return runner, (f"ONNX Runtime prefix matches PyTorch on {check_batch.shape[0]} images (max |diff| {diff:.1e}, "
                    f"{diff / scale:.0e} of the largest value {scale:.1f})")


def choose_prefix(prefix: nn.Module, check_batch: torch.Tensor, runtime: str, device: torch.device,
                  bf16: bool) -> tuple[nn.Module | OrtPrefix, str]:
    """The prefix a run caches features with, and a line saying which and why.

    ``runtime``: ``torch`` keeps PyTorch; ``auto``/``onnxruntime`` try ONNX Runtime on a CPU
    fp32 run (on CUDA or under bf16, PyTorch is the fast path) and fall back to PyTorch with
    the reason logged.

    Example:
        >>> runner, line = choose_prefix(prefix, images, "auto", torch.device("cpu"), False)  # doctest: +SKIP
    """
    if runtime == "torch":
        return prefix, "frozen prefix: PyTorch (prefix_runtime torch)"
    if device.type != "cpu" or bf16:
        return prefix, f"frozen prefix: PyTorch ({device.type}{', bf16' if bf16 else ''}: ONNX Runtime is for the CPU)"
    runner, why = onnx_runtime_prefix(prefix, check_batch)
    if runner is None:
        return prefix, f"frozen prefix: PyTorch ({why})"
    return runner, f"frozen prefix: {why}"
