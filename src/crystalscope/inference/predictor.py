"""Prediction with a checkpoint (PyTorch) or an exported ONNX model (ONNX Runtime).

:class:`Predictor` is the one forward pass of the project: ``predict``, ``evaluate``
(:mod:`crystalscope.inference.evaluate`), the export parity check
(:mod:`crystalscope.export.onnx`), the training's final test report and temperature fit, the
monitor and the web service all turn images into probabilities through it.

Both back ends share everything but the forward pass: images are decoded by
:func:`crystalscope.data.images.load_rgb`, resized and normalised by the model's own
:class:`~crystalscope.data.transforms.Preprocessing` (stored in the checkpoint or in the ONNX
metadata), and logits become probabilities through the calibrated
:func:`crystalscope.evaluation.calibration.softmax`. So a ``.ckpt`` and its ``.onnx`` give
the same answer, image by image. A model fitted with rejection (``ood`` in the checkpoint and
the ONNX metadata) also marks foreign images ``rejected``: the score is computed by the
model's decision graph from the input tensor (:class:`crystalscope.models.rejection.DecisionModel`,
the ONNX file's ``ood_score`` output, or the same module in PyTorch for a checkpoint).

Precision policy: every number a user reads (predictions, the test report of ``train`` and
``evaluate``, the temperature fit, the export check) comes from an fp32 forward pass, with
TF32 convolutions off on a GPU. bf16 is for training steps only; it may serve a reported
number only where it has been measured to agree with this fp32 path.

The ONNX back end imports no torch (and not the ``onnx`` package either): a plant PC with
``pip install crystalscope[onnx]`` can run it. Torch is imported only inside
:class:`_TorchBackend`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from crystalscope.data.layout import IMAGE_EXTENSIONS, list_images, real_path
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError, require
from crystalscope.evaluation.calibration import softmax
from crystalscope.models.description import validate_metadata
# the ONNX metadata contract lives in crystalscope.formats; the names stay importable from here
from crystalscope.formats import ONNX_FORMAT, ONNX_METADATA_KEY as METADATA_KEY  # noqa: F401  (re-exported)
from crystalscope.formats import ONNX_OOD_SCORE_NAME as OOD_SCORE_NAME
from crystalscope.runtime import cpu_count, default_workers, first_line, resolve_device

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        path: the file as given, or ``<image i>`` for an in-memory PIL image.
        predicted: the most probable class name (``None`` when the image could not be read).
        confidence: its calibrated probability (``None`` on error).
        probabilities: class name -> calibrated probability (empty on error).
        status: ``"ok"``, ``"rejected"`` (a foreign image: OOD score above the threshold; the
            class and probabilities are still filled) or ``"error: <reason>"``.
        ood_score: the rejection score (higher = more foreign); ``None`` when the model has no
            fitted rejection or it is turned off.
        ood_threshold: scores above it are rejected (``None`` as for ``ood_score``).
    """

    path: str
    predicted: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    ood_score: float | None = None
    ood_threshold: float | None = None

    @property
    def ok(self) -> bool:
        """Read, classified and accepted."""
        return self.status == "ok"

    @property
    def rejected(self) -> bool:
        return self.status == "rejected"

    @property
    def classified(self) -> bool:
        """Read and classified (accepted or rejected): the probabilities are filled."""
        return self.predicted is not None


def _calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities, via the one softmax the evaluation report also uses (float64)."""
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
            raise CrystalscopeError(f"{path}: not a readable ONNX model ({first_line(exc, 160)})") from None
        meta_map = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta_map:
            raise CrystalscopeError(
                f"{path}: this ONNX model has no crystalscope metadata (class names, "
                "preprocessing); export it with `crystalscope export CHECKPOINT`"
            )
        try:
            self.meta = json.loads(meta_map[METADATA_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise CrystalscopeError(f"{path}: the crystalscope metadata is not valid JSON; re-export the model") from None
        validate_metadata(self.meta, [(i.name, i.shape) for i in self.session.get_inputs()],
                          [(o.name, o.shape) for o in self.session.get_outputs()], str(path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.source = path

    def logits(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)  # (a CPU torch tensor too)
        return np.asarray(self.session.run(self.output_names[:1], {self.input_name: batch})[0])

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        name = self.meta.get("features_name", "features")
        if name not in self.output_names:
            raise CrystalscopeError(f"{self.source}: this ONNX model has no '{name}' output (exported by an "
                                    "older crystalscope); re-export it with `crystalscope export CHECKPOINT`")
        logits, features = self.session.run([self.output_names[0], name], {self.input_name: batch})
        return np.asarray(logits), np.asarray(features)

    def logits_and_scores(self, batch: np.ndarray, rejection=None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the graph's own OOD score (``ood_score``, computed from the input tensor)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        logits, scores = self.session.run([self.output_names[0], OOD_SCORE_NAME], {self.input_name: batch})
        return np.asarray(logits), np.asarray(scores, dtype=np.float64)

    def check_rejection(self) -> None:
        """Refuse a model whose rejection is not inside its graph (a format-1 export)."""
        if OOD_SCORE_NAME not in self.output_names:
            raise CrystalscopeError(f"{self.source}: this ONNX model computes its rejection outside the graph "
                                    f"(format {self.meta.get('format')}); re-export it with `crystalscope export "
                                    "CHECKPOINT`, or predict with --no-reject")


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
    options.intra_op_num_threads = int(threads or cpu_count())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class _TorchBackend:
    """PyTorch from a crystalscope checkpoint (imports torch only here), fp32 on any device."""

    name = "torch"

    def __init__(self, path: Path | None, device="auto", checkpoint: dict | None = None):
        torch = require("torch", "train")
        from crystalscope.models.checkpoint import load_checkpoint, model_from_checkpoint
        from crystalscope.models.precision import model_input, place_model

        ckpt = checkpoint if checkpoint is not None else load_checkpoint(path)
        self.torch, self.model_input = torch, model_input
        # str(): a torch.device from the training code is accepted as well as "auto"/"cpu"/"cuda:1"
        self.device = resolve_device(str(device))
        try:
            self.model = place_model(model_from_checkpoint(ckpt), self.device).eval()
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CrystalscopeError(f"{path or 'checkpoint'}: weights do not match the model it describes "
                                    f"({first_line(exc, 160)})") from None
        self.meta = {k: ckpt.get(k) for k in
                     ("backbone", "class_names", "positive_class", "preprocessing", "temperature", "ood")}
        self.decision = None  # the DecisionModel, built on the first scored batch

    def logits(self, batch) -> np.ndarray:
        return self.logits_and_features(batch)[0]

    def logits_and_features(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """``batch``: a float32 numpy array, or a torch tensor already on any device (training's test split)."""
        torch = self.torch
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        # fp32, TF32 off: TF32 convolutions on a GPU drift by ~1e-3, and a .ckpt on CUDA must
        # still agree with its .onnx export within 1e-4 (the precision policy of the module)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            features = self.model.embed(self.model_input(x.to(self.device, torch.float32)))
            logits = self.model.head[-1](features)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def logits_and_scores(self, batch, rejection) -> tuple[np.ndarray, np.ndarray]:
        """Logits and OOD scores by the same :class:`DecisionModel` the export traces into ONNX."""
        torch = self.torch
        if self.decision is None:
            from crystalscope.models.rejection import decision_model

            self.decision = decision_model(self.model, Preprocessing.from_dict(self.meta["preprocessing"]),
                                           float(self.meta.get("temperature") or 1.0), rejection)
            self.decision = self.decision.to(self.device).eval()
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            logits, _, _, scores, _ = self.decision(self.model_input(x.to(self.device, torch.float32)))
        return logits.float().cpu().numpy(), scores.double().cpu().numpy()

    def check_rejection(self) -> None:
        """A checkpoint always scores in PyTorch: nothing to refuse."""


PIPELINE_DEPTH = 2  # batches prepared ahead of the model (two keep two cores busy)
# predict's batch when none is given. ONNX Runtime on a 2-core CPU, efficientnet_lite0 at 160 px,
# from PNG files: 353 img/s at 8 against 302 at 32 and 292 at 64 (docs/benchmarks.md, "CPU speed");
# PyTorch keeps 32 (a GPU wants larger batches; its `predict` is not what a plant PC runs).
DEFAULT_BATCH_SIZE = {"onnx": 8, "torch": 32}


@dataclass
class _Prepared:
    """One batch ready for the model: its rows (errors filled in), model input and image statistics."""

    rows: list
    batch: np.ndarray | None = None
    statistics: np.ndarray | None = None


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

    def __init__(self, backend, source: str, reject: bool = True):
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
        #: the fitted rejection, or None (older model, or turned off with ``reject=False``)
        self.rejection = _rejection(meta, source) if reject else None
        if self.rejection is not None:
            backend.check_rejection()
        self._pool = None  # decoding threads, started on first use

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", reject: bool = True) -> "Predictor":
        """Load a ``.ckpt`` (PyTorch; ``device`` auto/cpu/cuda) or an ``.onnx`` model.

        ``reject=False`` turns the rejection of foreign images off (every readable image is
        ``ok``); a model without fitted rejection predicts as if it were off.

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
            return cls(_OnnxBackend(path), str(path), reject=reject)
        if suffix in CHECKPOINT_SUFFIXES:
            return cls(_TorchBackend(path, device=device), str(path), reject=reject)
        raise CrystalscopeError(f"{path}: unknown model type {suffix or '(no suffix)'!r}; give a .ckpt checkpoint or an .onnx export")

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, device="cpu", reject: bool = True) -> "Predictor":
        """The PyTorch back end on an in-memory checkpoint dict (``make_checkpoint``/``load_checkpoint``).

        What the export parity check, ``evaluate`` and the end of training run, so their numbers
        come from the same forward pass as ``predict``. ``device``: ``auto``/``cpu``/``cuda[:N]``
        or a ``torch.device``.

        Example:
            >>> model = Predictor.from_checkpoint(load_checkpoint("best.ckpt"), "cpu")  # doctest: +SKIP
            >>> model.logits(model.preprocessing.prepare([image])).shape  # doctest: +SKIP
            (1, 2)
        """
        return cls(_TorchBackend(None, device=device, checkpoint=checkpoint), "<checkpoint>", reject=reject)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, reject: bool = True) -> "Predictor":
        """ONNX Runtime on an ONNX file whatever its name (:meth:`load` goes by the suffix).

        The export check runs the file under its staging name with it.

        Example:
            >>> Predictor.from_onnx(".model.onnx.123.tmp").backend_name  # doctest: +SKIP
            'onnx'
        """
        return cls(_OnnxBackend(Path(path)), str(path), reject=reject)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw fp32 logits ``(N, C)`` for a normalised float32 ``(N, 3, H, W)`` batch.

        The PyTorch back end also takes a torch tensor (e.g. a split already on the GPU).

        Example:
            >>> Predictor.load("model.onnx").logits(np.zeros((2, 3, 64, 64), np.float32)).shape  # doctest: +SKIP
            (2, 2)
        """
        return self.backend.logits(_contiguous(batch))

    def logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(N, C)`` and penultimate features ``(N, D)`` for a normalised batch.

        The features are ``CrystalClassifier.embed`` (PyTorch) or the ONNX file's ``features``
        output; an ONNX file exported before that output existed raises a re-export hint.
        """
        return self.backend.logits_and_features(_contiguous(batch))

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Penultimate features ``(N, D)`` for a normalised float32 batch."""
        return self.logits_and_features(batch)[1]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature)`` for a normalised batch."""
        return _calibrated(self.logits(batch), self.temperature)

    def logits_and_scores(self, resized: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits ``(N, C)`` and OOD scores ``(N,)`` of resized uint8 images ``(N, H, W, 3)``.

        The scores are None without a fitted rejection (or with ``reject=False``). This is the
        forward that :meth:`predict` runs on each batch and ``evaluate`` on a whole folder.

        Example:
            >>> pre = model.preprocessing  # doctest: +SKIP
            >>> logits, scores = model.logits_and_scores(np.stack([pre.resize_uint8("a.png")]))  # doctest: +SKIP
        """
        return self.forward(*self.model_inputs(resized))

    def model_inputs(self, resized: np.ndarray) -> tuple[np.ndarray, None]:
        """The normalised batch of resized uint8 images (and None: the rejection needs nothing else).

        The CPU work before the model; :meth:`predict` runs it in its thread pool, ahead of the model.
        """
        return self.preprocessing.normalize(resized), None

    def forward(self, batch: np.ndarray, statistics: None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and OOD scores (None without a rejection) of a normalised batch.

        The score comes from the model's own decision graph
        (:class:`crystalscope.models.rejection.DecisionModel`): the ONNX file's ``ood_score``
        output, or the same module in PyTorch for a checkpoint. ``statistics`` is ignored.
        """
        if self.rejection is None:
            return self.logits(batch), None
        return self.backend.logits_and_scores(_contiguous(batch), self.rejection)

    @property
    def default_batch_size(self) -> int:
        """Images per forward pass when the caller gives none: the fastest measured, per back end."""
        return DEFAULT_BATCH_SIZE[self.backend.name]

    def predict(self, items: Sequence, batch_size: int | None = None,
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
        batch_size = self.default_batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise CrystalscopeError(f"--batch-size {batch_size} must be 1 or more")
        items = list(items)
        starts = range(0, len(items), batch_size)
        results: list[Prediction] = []
        # A pipeline PIPELINE_DEPTH batches deep: the pool's threads decode, resize, normalise and
        # take the image statistics of the next batches while the model runs this one, so both
        # cores stay busy (Pillow and numpy release the GIL; ONNX Runtime runs without spinning).
        pool = self._decoder()
        pending = deque(pool.submit(self._prepare, items[s:s + batch_size], s) for s in starts[:PIPELINE_DEPTH])
        for index, start in enumerate(starts):
            prepared = pending.popleft().result()
            if index + PIPELINE_DEPTH < len(starts):
                ahead = starts[index + PIPELINE_DEPTH]
                pending.append(pool.submit(self._prepare, items[ahead:ahead + batch_size], ahead))
            results += self._classify(prepared)
            if on_batch is not None:
                on_batch(len(prepared.rows))
        return results

    def _prepare(self, chunk: Sequence, offset: int) -> "_Prepared":
        """Everything before the model for one batch: rows, decoded pixels, model input, statistics."""
        rows: list[Prediction] = []
        arrays: list[np.ndarray] = []
        for i, item in enumerate(chunk):
            name = f"<image {offset + i}>" if isinstance(item, Image.Image) else str(item)
            rows.append(Prediction(path=name))
            decoded = self._decode(item)
            if isinstance(decoded, Exception):  # one bad file must not stop the batch
                rows[-1].status = f"error: {first_line(decoded, limit=None, without=name)}"
            else:
                arrays.append(decoded)
        if not arrays:
            return _Prepared(rows)
        return _Prepared(rows, *self.model_inputs(np.stack(arrays)))

    def _classify(self, prepared: "_Prepared") -> list[Prediction]:
        """The model and the rejection on a prepared batch; fills the rows that decoded."""
        rows = prepared.rows
        if prepared.batch is None:
            return rows
        logits, scores = self.forward(prepared.batch, prepared.statistics)
        probs = _calibrated(logits, self.temperature)
        for i, (row, p) in enumerate(zip([r for r in rows if r.ok], probs)):
            best = int(np.argmax(p))
            row.predicted = self.class_names[best]
            row.confidence = float(p[best])
            row.probabilities = {c: float(v) for c, v in zip(self.class_names, p)}
            if scores is not None:
                row.ood_score, row.ood_threshold = float(scores[i]), float(self.rejection.threshold)
                row.status = "rejected" if self.rejection.rejected(scores[i]) else "ok"
        return rows

    def _decode(self, item) -> np.ndarray | Exception:
        try:
            return self.preprocessing.resize_uint8(item)
        except Exception as exc:  # returned, not raised: the caller turns it into a row
            return exc

    def _decoder(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=default_workers())
        return self._pool


def _contiguous(batch):
    """A C-contiguous float32 numpy batch; a torch tensor passes as it is (the PyTorch back end takes it)."""
    if isinstance(batch, np.ndarray) or not hasattr(batch, "detach"):
        return np.ascontiguousarray(batch, dtype=np.float32)
    return batch


def _rejection(meta: dict, source: str):
    """The model's fitted :class:`OODDetector`, or None when it has none (older models)."""
    if not meta.get("ood"):
        return None
    from crystalscope.evaluation.ood import OODDetector

    try:
        return OODDetector.from_dict(meta["ood"])
    except CrystalscopeError as exc:
        raise CrystalscopeError(f"{source}: {exc}") from None


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
            key = real_path(c)
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


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """The predictions CSV header: the one list every writer and reader of the CSV uses.

    ``status`` stays the last column; ``ood_score``/``ood_threshold`` are empty when the model
    has no fitted rejection or it is turned off, and on error rows.

    Example:
        >>> prediction_columns(["cex", "pg"])
        ['path', 'predicted', 'confidence', 'p_cex', 'p_pg', 'ood_score', 'ood_threshold', 'status']
    """
    return ["path", "predicted", "confidence", *[f"p_{c}" for c in class_names], "ood_score", "ood_threshold",
            "status"]


def prediction_row(p: Prediction, class_names: Sequence[str]) -> list[str]:
    """One CSV row of ``p``, in the order of :func:`prediction_columns`."""
    probs = [f"{p.probabilities[c]:.6f}" if p.classified else "" for c in class_names]
    confidence = f"{p.confidence:.6f}" if p.classified else ""
    ood = ["" if v is None else f"{v:.6g}" for v in (p.ood_score, p.ood_threshold)]
    return [p.path, p.predicted or "", confidence, *probs, *ood, p.status]


def predictions_csv(predictions: Sequence[Prediction], class_names: Sequence[str], header: bool = True) -> str:
    """CSV text with columns :func:`prediction_columns` (``header=False``: rows only, for appending)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(prediction_columns(class_names))
    for p in predictions:
        writer.writerow(prediction_row(p, class_names))
    return buffer.getvalue()
