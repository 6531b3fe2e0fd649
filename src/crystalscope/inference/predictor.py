"""Prediction with a checkpoint (PyTorch) or an exported ONNX model (ONNX Runtime).

Both back ends share everything but the forward pass: images are decoded by
:func:`crystalscope.data.images.load_rgb`, resized and normalised by the model's own
:class:`~crystalscope.data.transforms.Preprocessing` (stored in the checkpoint or in the ONNX
metadata), and logits become probabilities through the calibrated
:func:`crystalscope.evaluation.calibration.softmax`. So a ``.ckpt`` and its ``.onnx`` give
the same answer, image by image.

The ONNX back end imports no torch (and not the ``onnx`` package either): a plant PC with
``pip install crystalscope[onnx]`` can run it. Torch is imported only inside
:class:`_TorchBackend`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from crystalscope.data.images import IMAGE_EXTENSIONS, list_images
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError, require
from crystalscope.io import write_text

#: Metadata key (ONNX ``metadata_props``) holding the model description as JSON.
METADATA_KEY = "crystalscope"
ONNX_FORMAT = "crystalscope-onnx/1"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        path: the file as given, or ``<image i>`` for an in-memory PIL image.
        predicted: the most probable class name (``None`` when the image could not be read).
        confidence: its calibrated probability (``None`` on error).
        probabilities: class name -> calibrated probability (empty on error).
        status: ``"ok"`` or ``"error: <reason>"``.
    """

    path: str
    predicted: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities, via the one softmax the evaluation report also uses."""
    from crystalscope.evaluation.calibration import softmax

    return softmax(np.asarray(logits, dtype=np.float64), temperature)


# ---- back ends: float32 (N, 3, H, W) in, logits (N, C) out ------------------------------


class _OnnxBackend:
    """ONNX Runtime on the CPU; reads the model description from the ONNX metadata."""

    name = "onnx"

    def __init__(self, path: Path):
        ort = require("onnxruntime", "onnx")
        options = onnx_session_options(ort)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CrystalscopeError(f"{path}: not a readable ONNX model ({reason})") from None
        meta_map = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta_map:
            raise CrystalscopeError(
                f"{path}: this ONNX model has no crystalscope metadata (class names, "
                "preprocessing); export it with `crystalscope export CHECKPOINT`"
            )
        try:
            self.meta = json.loads(meta_map[METADATA_KEY])
        except json.JSONDecodeError:
            raise CrystalscopeError(f"{path}: the crystalscope metadata is not valid JSON; re-export the model") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.source = path

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(self.output_names[:1], {self.input_name: batch})[0])

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        name = self.meta.get("features_name", "features")
        if name not in self.output_names:
            raise CrystalscopeError(f"{self.source}: this ONNX model has no '{name}' output (exported by an "
                                    "older crystalscope); re-export it with `crystalscope export CHECKPOINT`")
        logits, features = self.session.run([self.output_names[0], name], {self.input_name: batch})
        return np.asarray(logits), np.asarray(features)


def onnx_session_options(ort, threads: int | None = None):
    """ONNX Runtime CPU options, set explicitly rather than left to the library's defaults.

    All graph optimisations (Conv+BN+activation fusion, constant folding); ``threads`` intra-op
    threads (default: the CPU count); one inter-op thread and sequential execution (a CNN is a
    chain of operators, so parallel branches gain nothing); no spin-waiting between runs, so the
    decoding threads that :meth:`Predictor.predict` overlaps with inference get the cores while
    the model waits for its next batch.

    Example:
        >>> import onnxruntime as ort  # doctest: +SKIP
        >>> onnx_session_options(ort, threads=2).intra_op_num_threads  # doctest: +SKIP
        2
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # keep ORT's own warnings off the user's terminal
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class _TorchBackend:
    """PyTorch from a crystalscope checkpoint (imports torch only here)."""

    name = "torch"

    def __init__(self, path: Path | None, device: str = "auto", checkpoint: dict | None = None):
        torch = require("torch", "train")
        from crystalscope.training.checkpoint import load_checkpoint, model_from_checkpoint
        from crystalscope.training.precision import model_input, place_model

        ckpt = checkpoint if checkpoint is not None else load_checkpoint(path)
        self.torch, self.model_input = torch, model_input
        self.device = _torch_device(torch, device)
        try:
            self.model = place_model(model_from_checkpoint(ckpt), self.device).eval()
        except (RuntimeError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CrystalscopeError(f"{path or 'checkpoint'}: weights do not match the model it describes ({first})") from None
        self.meta = {k: ckpt.get(k) for k in
                     ("backbone", "class_names", "positive_class", "preprocessing", "temperature")}

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.logits_and_features(batch)[0]

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        # TF32 convolutions on a GPU drift by ~1e-3: keep full fp32 so a .ckpt on CUDA still
        # agrees with its .onnx export within 1e-4
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            features = self.model.embed(self.model_input(torch.from_numpy(batch).to(self.device)))
            logits = self.model.head[-1](features)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()


def _torch_device(torch, device: str):
    """``auto`` -> cuda when available else cpu; a clear error for an unusable device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CrystalscopeError(f"--device {device!r} is not a device: use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CrystalscopeError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return resolved


class Predictor:
    """A trained classifier ready to label images.

    Load with :meth:`load` (a ``.ckpt`` runs in PyTorch, an ``.onnx`` in ONNX Runtime),
    then call :meth:`predict` with file paths and/or PIL images.

    Example:
        >>> from crystalscope import Predictor
        >>> model = Predictor.load("runs/exp1/model.onnx")  # doctest: +SKIP
        >>> [p.predicted for p in model.predict(["CEX (1).png", "PG (567).png"])]  # doctest: +SKIP
        ['cex', 'pg']
    """

    def __init__(self, backend, source: str):
        meta = backend.meta
        try:
            self.class_names: list[str] = [str(c) for c in meta["class_names"]]
            self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
            self.temperature = float(meta.get("temperature") or 1.0)
        except (KeyError, TypeError, ValueError) as exc:
            raise CrystalscopeError(f"{source}: incomplete model description ({exc}); re-export the model") from None
        if self.temperature <= 0:
            raise CrystalscopeError(f"{source}: calibration temperature {self.temperature} must be positive")
        self.positive_class: str | None = meta.get("positive_class")
        self.backbone: str | None = meta.get("backbone")
        self.backend = backend
        self.source = source
        self._pool = None  # decoding threads, started on first use

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> "Predictor":
        """Load a ``.ckpt`` (PyTorch; ``device`` auto/cpu/cuda) or an ``.onnx`` model.

        Raises:
            CrystalscopeError: missing file, unknown suffix, not a crystalscope model, or
                the back end's library is not installed.

        Example:
            >>> Predictor.load("model.onnx").class_names  # doctest: +SKIP
            ['cex', 'pg']
        """
        path = Path(path)
        if not path.exists():
            raise CrystalscopeError(f"{path}: model file not found")
        if not path.is_file():
            raise CrystalscopeError(f"{path}: is a folder; give a .ckpt or .onnx model file")
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return cls(_OnnxBackend(path), str(path))
        if suffix in CHECKPOINT_SUFFIXES:
            return cls(_TorchBackend(path, device=device), str(path))
        raise CrystalscopeError(f"{path}: unknown model type {suffix or '(no suffix)'!r}; give a .ckpt checkpoint or an .onnx export")

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, device: str = "cpu") -> "Predictor":
        """Wrap an in-memory checkpoint dict (used by export checks and tests)."""
        return cls(_TorchBackend(None, device=device, checkpoint=checkpoint), "<checkpoint>")

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a normalised float32 ``(N, 3, H, W)`` batch."""
        return self.backend.logits(np.ascontiguousarray(batch, dtype=np.float32))

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(N, C)`` and penultimate features ``(N, D)`` for a normalised batch.

        The features are ``CrystalClassifier.embed`` (PyTorch) or the ONNX file's ``features``
        output; an ONNX file exported before that output existed raises a re-export hint.
        """
        return self.backend.logits_and_features(np.ascontiguousarray(batch, dtype=np.float32))

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Penultimate features ``(N, D)`` for a normalised float32 batch."""
        return self.logits_and_features(batch)[1]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature)`` for a normalised batch."""
        return _softmax(self.logits(batch), self.temperature)

    def predict(self, items: Sequence, batch_size: int = 32,
                on_batch: Callable[[int], None] | None = None) -> list[Prediction]:
        """Label file paths and/or PIL images; a bad file gets an error row, never an exception.

        Args:
            items: paths (str/Path) or ``PIL.Image`` objects, in any mix.
            batch_size: images per forward pass.
            on_batch: called with the number of items done after each batch (progress bars).

        Example:
            >>> preds = Predictor.load("model.onnx").predict(["a.png", "broken.png"])  # doctest: +SKIP
            >>> preds[1].status  # doctest: +SKIP
            'error: not a readable image file'
        """
        if batch_size < 1:
            raise CrystalscopeError(f"--batch-size {batch_size} must be 1 or more")
        items = list(items)
        results: list[Prediction] = []
        # a pipeline one batch deep: the pool decodes batch k + 1 while the model runs batch k
        pending = self._submit(items[:batch_size])
        for start in range(0, len(items), batch_size):
            chunk, decoded = items[start:start + batch_size], [job.result() for job in pending]
            pending = self._submit(items[start + batch_size:start + 2 * batch_size])
            results += self._predict_chunk(chunk, start, decoded)
            if on_batch is not None:
                on_batch(len(chunk))
        return results

    def _submit(self, chunk: Sequence) -> list:
        """Start decoding ``chunk`` in the pool; futures of uint8 arrays or exceptions."""
        pool = self._decoder()
        return [pool.submit(self._decode, item) for item in chunk]

    def _predict_chunk(self, chunk: Sequence, offset: int, ready: Sequence | None = None) -> list[Prediction]:
        rows: list[Prediction] = []
        arrays: list[np.ndarray] = []
        # Pillow releases the GIL while decoding and resizing, so threads give real speed-up
        if ready is None:  # not decoded ahead by predict's pipeline
            ready = [job.result() for job in self._submit(chunk)]
        for i, (item, decoded) in enumerate(zip(chunk, ready)):
            name = f"<image {offset + i}>" if isinstance(item, Image.Image) else str(item)
            rows.append(Prediction(path=name))
            if isinstance(decoded, Exception):  # one bad file must not stop the batch
                rows[-1].status = f"error: {_reason(decoded, name)}"
            else:
                arrays.append(decoded)
        good = [r for r in rows if r.ok]
        if not good:
            return rows
        probs = self.probabilities(self.preprocessing.normalize(np.stack(arrays)))
        for row, p in zip(good, probs):
            best = int(np.argmax(p))
            row.predicted = self.class_names[best]
            row.confidence = float(p[best])
            row.probabilities = {c: float(v) for c, v in zip(self.class_names, p)}
        return rows

    def _decode(self, item) -> np.ndarray | Exception:
        try:
            return self.preprocessing.resize_uint8(item)
        except Exception as exc:  # returned, not raised: the caller turns it into a row
            return exc

    def _decoder(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        return self._pool


def _reason(exc: Exception, name: str) -> str:
    """A one-line error reason without the path (the CSV row already names the file)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    prefix = f"{name}: "
    return text[len(prefix):] if text.startswith(prefix) else text


# ---- files in, CSV out (the `predict` command) --------------------------------------------


def collect_images(paths: Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand files and folders into the list of files to label (order kept, no repeats).

    Folders contribute every image file (png, jpg/jpeg, tif/tiff, bmp; any case); a file
    given by name is always included, even with another extension, so it gets a row.

    Raises:
        CrystalscopeError: a path does not exist, or nothing to label was found.

    Example:
        >>> collect_images(["crops/", "extra/PG (1).PNG"])  # doctest: +SKIP
        [PosixPath('crops/CEX (1).png'), ..., PosixPath('extra/PG (1).PNG')]
    """
    found: list[Path] = []
    seen: set[Path] = set()
    given = [Path(p) for p in paths]
    for path in given:
        if path.is_dir():
            candidates = list_images(path, recursive=recursive)
        elif path.exists():
            candidates = [path]
        else:
            raise CrystalscopeError(f"{path}: no such file or folder")
        for c in candidates:
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                found.append(c)
    if not found:
        where = ", ".join(str(p) for p in given) or "(no paths given)"
        hint = "" if recursive else " (add --recursive to look in subfolders)"
        raise CrystalscopeError(
            f"no image files found in {where}: expected {', '.join(IMAGE_EXTENSIONS)}{hint}"
        )
    return found


def predictions_csv(predictions: Sequence[Prediction], class_names: Sequence[str]) -> str:
    """CSV text with columns ``path,predicted,confidence,p_<class>...,status``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", "confidence", *[f"p_{c}" for c in class_names], "status"])
    for p in predictions:
        probs = [f"{p.probabilities[c]:.6f}" if p.ok else "" for c in class_names]
        confidence = f"{p.confidence:.6f}" if p.ok else ""
        writer.writerow([p.path, p.predicted or "", confidence, *probs, p.status])
    return buffer.getvalue()


def predict_paths(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike],
                  out_csv: str | os.PathLike = "predictions.csv", batch_size: int = 32,
                  recursive: bool = True, progress: bool = True, device: str = "auto",
                  sheet: str | os.PathLike | None = None, sheet_max: int = 96) -> dict:
    """Label every image under ``paths`` with ``model_path`` and write the CSV atomically.

    With ``sheet``, also a PNG contact sheet of the images with their predicted class,
    confidence and status (:func:`crystalscope.evaluation.sheets.prediction_sheet`); beyond
    ``sheet_max`` images it shows the rejected, unreadable and least confident ones.

    Returns a summary: ``model``, ``backend``, ``out_csv``, ``class_names``, ``n_images``,
    ``n_ok``, ``n_errors``, ``counts`` (predicted class -> count) and ``predictions``.
    Unreadable files are rows with ``status = error: <reason>``; the caller decides the exit
    code (non-zero when ``n_ok == 0``).

    Example:
        >>> s = predict_paths("model.onnx", ["crops/"], "predictions.csv")  # doctest: +SKIP
        >>> s["counts"]  # doctest: +SKIP
        {'cex': 3, 'pg': 4}
    """
    from crystalscope.safety import check_output, claim_output

    if sheet is not None and Path(sheet).suffix.lower() != ".png":
        raise CrystalscopeError(f"--sheet {sheet}: give a .png file name such as predictions.png")
    if sheet_max < 1:
        raise CrystalscopeError(f"--sheet-max {sheet_max}: must be 1 or more")
    # the one output rule: never onto the model or an input image; one writer at a time
    with claim_output(out_csv, inputs=[model_path, *paths], kind="file"):
        if sheet is not None:
            check_output(sheet, inputs=[model_path, out_csv, *paths], kind="file", option="--sheet")
        predictor = Predictor.load(model_path, device=device)
        files = collect_images(paths, recursive=recursive)
        if progress and len(files) > batch_size:
            predictions = _predict_with_progress(predictor, files, batch_size)
        else:
            predictions = predictor.predict(files, batch_size=batch_size)
        _write_prediction_outputs(predictions, predictor, out_csv, sheet, sheet_max, model_path)
    counts = {c: 0 for c in predictor.class_names}
    for p in predictions:
        if p.ok:
            counts[p.predicted] += 1
    n_ok = sum(counts.values())
    return {
        "model": str(model_path), "backend": predictor.backend_name, "out_csv": str(out_csv),
        "class_names": predictor.class_names, "temperature": predictor.temperature,
        "n_images": len(predictions), "n_ok": n_ok, "n_errors": len(predictions) - n_ok,
        "counts": counts, "predictions": predictions, "sheet": str(sheet) if sheet is not None else None,
    }


def _write_prediction_outputs(predictions, predictor: Predictor, out_csv, sheet, sheet_max: int,
                              model_path) -> None:
    """The CSV, then the optional contact sheet; a file-system fault is one line naming the file."""
    try:
        write_text(out_csv, predictions_csv(predictions, predictor.class_names))
    except OSError as exc:
        raise CrystalscopeError(f"--out {out_csv}: cannot write the CSV ({exc.strerror or exc})") from None
    if sheet is not None:
        from crystalscope.evaluation.sheets import prediction_sheet

        try:
            prediction_sheet(predictions, sheet, limit=sheet_max,
                             title=f"{Path(model_path).name} ({predictor.backend_name})")
        except OSError as exc:
            raise CrystalscopeError(f"--sheet {sheet}: cannot write the PNG ({exc.strerror or exc})") from None


def _predict_with_progress(predictor: Predictor, files: list[Path], batch_size: int) -> list[Prediction]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # the bar goes to stderr so stdout (the table) stays clean when redirected
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("predict", total=len(files))
        return predictor.predict(files, batch_size=batch_size,
                                 on_batch=lambda n: bar.advance(task, n))
