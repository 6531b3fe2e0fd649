"""Grad-CAM heat maps: which parts of an image drove a checkpoint's decision.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional feature map by the
mean gradient of one class's logit with respect to it, sums the channels and keeps the
positive part: a coarse map of where the evidence *for that class* sits. It is written here
in a few lines of torch (hooks plus ``torch.autograd.grad``) instead of depending on the
``grad-cam`` package, which would pull in OpenCV, SciPy and ttach for the same arithmetic.

Images go through the model's own :class:`~crystalscope.data.transforms.Preprocessing` and
the model comes from the :class:`~crystalscope.inference.predictor.Predictor`'s PyTorch back
end, so the explained forward pass is the one ``predict`` runs. The heat map is computed on
the square model input and mapped back onto the original image with
:meth:`Preprocessing.content_box` (for ``pad`` the letterbox bars are cut away first), so an
overlay has the size of the file it explains.

Example:
    >>> from crystalscope import Predictor
    >>> from crystalscope.insight.explain import explain_batch
    >>> predictor = Predictor.load("runs/exp1/weights/best.ckpt", device="cpu")  # doctest: +SKIP
    >>> result = explain_batch(predictor, ["CEX (1).png"])[0]  # doctest: +SKIP
    >>> result.predicted, round(result.confidence, 3), result.heatmap.shape  # doctest: +SKIP
    ('cex', 0.998, (151, 151))
    >>> result.overlay.save("cex1-cam.png")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crystalscope.data.images import load_rgb
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.calibration import softmax
from crystalscope.evaluation.sheets import Tile, contact_sheet
from crystalscope.inference.predictor import Predictor, collect_images
from crystalscope.io import atomic_dir, write_text
from crystalscope.runtime import first_line
from crystalscope.safety import claim_output

logger = logging.getLogger(__name__)

#: file names inside the ``--out`` folder (the overlays are ``<image stem>.cam.png``)
SHEET_PNG = "explain.png"
EXPLAIN_CSV = "explain.csv"
OVERLAY_SUFFIX = ".cam.png"
#: what an explain folder holds, so a rerun with --force may replace it and nothing else
COMMAND = "explain"  # named in the output's manifest: --force replaces only what an explain wrote
CSV_COLUMNS = ["path", "predicted", "confidence", "target", "target_probability", "overlay", "status"]


@dataclass
class Explanation:
    """The Grad-CAM result for one image.

    Attributes:
        path: the file as given, or ``<image i>`` for an in-memory PIL image.
        predicted, confidence: the most probable class and its calibrated probability.
        target: the class the heat map explains (``predicted`` unless one was chosen).
        target_probability: the calibrated probability of ``target``.
        heatmap: float32 ``(height, width)`` in 0..1 on the original image (``None`` on error).
        overlay: the image with the heat map blended in and a caption (``None`` on error).
        overlay_file: its file name in the ``--out`` folder (set by :func:`explain_images`,
            which then drops ``heatmap`` and ``overlay`` to keep memory flat).
        status: ``"ok"`` or ``"error: <reason>"``.
    """

    path: str
    predicted: str | None = None
    confidence: float | None = None
    target: str | None = None
    target_probability: float | None = None
    heatmap: np.ndarray | None = None
    overlay: Image.Image | None = None
    overlay_file: str = ""
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---- the arithmetic: layer choice, Grad-CAM, mapping back, blending ------------------------


def default_target_layer(model, image_size: int = 64) -> str:
    """Name of the backbone's last spatial feature map: where Grad-CAM looks by default.

    Runs timm's ``forward_features`` (everything before global pooling) once with hooks and
    returns the last module to finish with a 4-D ``(N, C, H, W)`` output: ``backbone.layer4``
    for ResNets, ``backbone.bn2`` (after ``conv_head``) for EfficientNets. Any timm CNN works
    without a per-architecture table.

    Raises:
        CrystalscopeError: the backbone has no spatial feature map (e.g. a vision transformer).

    Example:
        >>> from crystalscope.models.factory import build_model
        >>> default_target_layer(build_model("resnet18", 2), image_size=32)
        'backbone.layer4'
    """
    import torch

    finished: list[tuple[str, int]] = []
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: finished.append((name, out.dim() if torch.is_tensor(out) else 0)))
        for name, module in model.backbone.named_modules() if name]
    device, was_training = next(model.parameters()).device, model.training
    model.eval()  # the probe must not move batch-norm statistics
    try:
        with torch.no_grad():
            model.backbone.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    spatial = [name for name, dim in finished if dim == 4]
    if not spatial:
        raise CrystalscopeError(f"{type(model.backbone).__name__}: no 4-D feature map before global "
                                "pooling; Grad-CAM needs a convolutional backbone (or pass --layer)")
    return f"backbone.{spatial[-1]}"


def grad_cam(model, batch, targets: Sequence[int] | None, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps on the square model input, and the logits of the same forward pass.

    Args:
        model: a :class:`~crystalscope.models.factory.CrystalClassifier` in eval mode.
        batch: normalised float ``(N, 3, S, S)`` tensor on the model's device.
        targets: class index to explain, per image; ``None`` = each image's predicted class.
        layer: a module name of ``model`` (see :func:`default_target_layer`).

    Returns:
        ``(maps, logits)``: float32 ``(N, S, S)`` each scaled to 0..1 by its own maximum (all
        zero when no location speaks for the class), and float ``(N, C)`` logits.

    Example:
        >>> import torch
        >>> from crystalscope.models.factory import build_model
        >>> maps, logits = grad_cam(build_model("resnet18", 2).eval(), torch.rand(2, 3, 64, 64),
        ...                         [0, 1], "backbone.layer4")
        >>> maps.shape, logits.shape
        ((2, 64, 64), (2, 2))
    """
    import torch
    import torch.nn.functional as F

    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise CrystalscopeError(f"--layer {layer!r} is not a module of this model: try "
                                f"{default_target_layer(model, batch.shape[-1])!r} or another name "
                                "from `model.named_modules()`")
    captured = {}
    handle = module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("maps", out))
    try:
        # the input asks for gradients so a frozen backbone (no trainable weights) still has a graph
        with torch.enable_grad():
            logits = model(batch.detach().requires_grad_(True))
    finally:
        handle.remove()
    activations = captured.get("maps")
    if not torch.is_tensor(activations) or activations.dim() != 4:
        raise CrystalscopeError(f"--layer {layer!r} does not output a 4-D feature map; "
                                "choose a convolutional block such as the default")
    index = (logits.argmax(dim=1) if targets is None
             else torch.as_tensor(list(targets), device=logits.device)).view(-1, 1)
    try:
        # images are independent in eval mode, so one backward pass serves the whole batch
        (gradients,) = torch.autograd.grad(logits.gather(1, index).sum(), activations)
    except RuntimeError as exc:  # e.g. an in-place activation right after the chosen layer
        first = first_line(exc, limit=120)
        raise CrystalscopeError(f"--layer {layer!r}: no gradient at this layer ({first}); "
                                "choose a block output such as the default") from None
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.detach().cpu().numpy().astype(np.float32), logits.detach().float().cpu().numpy()


def heatmap_on_image(square_map: np.ndarray, preprocessing: Preprocessing,
                     original_size: tuple[int, int]) -> np.ndarray:
    """Map a heat map on the square model input back onto the original ``(width, height)`` image.

    ``stretch``: the whole square is resized to the original shape. ``pad``: the letterbox
    bars are cut away (:meth:`Preprocessing.content_box`) and only the image area is resized,
    so the bars can never colour the overlay.

    Example:
        >>> pre = Preprocessing(image_size=8, resize="pad")
        >>> heatmap_on_image(np.ones((8, 8), np.float32), pre, (30, 15)).shape
        (15, 30)
    """
    left, top, width, height = preprocessing.content_box(original_size)
    content = np.ascontiguousarray(square_map[top:top + height, left:left + width], dtype=np.float32)
    resized = Image.fromarray(content, mode="F").resize(tuple(original_size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def blend(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """The image with the heat map in the ``jet`` colours blended in where the map is high.

    The blend weight grows with the heat (``alpha * heat``), so where the model does not look
    the crystal stays as it is, instead of under a uniform blue veil.

    Example:
        >>> blend(Image.new("RGB", (4, 3)), np.ones((3, 4), np.float32)).size
        (4, 3)
    """
    from matplotlib import colormaps

    colour = colormaps["jet"](heatmap)[..., :3].astype(np.float32) * 255.0
    weight = alpha * heatmap[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(base * (1 - weight) + colour * weight, 0, 255).astype(np.uint8))


def _caption(overlay: Image.Image, text: str) -> Image.Image:
    """Write ``text`` in a dark band across the top, inside the picture (its size stays)."""
    size = max(10, overlay.width // 14)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(overlay, "RGBA")
    draw.rectangle([0, 0, overlay.width, size + 4], fill=(0, 0, 0, 160))
    draw.text((3, 1), text, fill=(255, 255, 255), font=font)
    return overlay


# ---- images in, explanations out ----------------------------------------------------------


def require_checkpoint(model_path: str | os.PathLike) -> None:
    """Refuse an ONNX file in one line that says where the run folder keeps the checkpoint.

    Example:
        >>> require_checkpoint("runs/exp1/model.onnx")  # doctest: +SKIP
        Traceback (most recent call last):
        CrystalscopeError: runs/exp1/model.onnx: explain needs the PyTorch checkpoint (.ckpt), ...
    """
    path = Path(model_path)
    if path.suffix.lower() != ".onnx":
        return
    beside = path.parent / "weights" / "best.ckpt"
    where = (f"use {beside}" if beside.is_file()
             else "use weights/best.ckpt of the run folder it was exported from")
    raise CrystalscopeError(f"{path}: explain needs the PyTorch checkpoint (.ckpt), not an ONNX export "
                            f"(Grad-CAM needs gradients); {where}")


def explain_batch(predictor: Predictor, items: Sequence, target_class: str | None = None,
                  layer: str | None = None, alpha: float = 0.6, offset: int = 0) -> list[Explanation]:
    """Grad-CAM for file paths and/or PIL images; an unreadable file gets an error result.

    Args:
        predictor: a :class:`Predictor` loaded from a ``.ckpt`` (PyTorch back end).
        items: paths or PIL images, explained in one forward and one backward pass.
        target_class: class to explain for every image (default: each image's prediction).
        layer: module name to take the feature map from (default: :func:`default_target_layer`).
        alpha: strongest blend weight of the heat colours.
        offset: index of the first item, for the ``<image i>`` names of PIL images.

    Example:
        >>> explain_batch(Predictor.load("best.ckpt"), ["PG (567).png"], "cex")[0].target  # doctest: +SKIP
        'cex'
    """
    import torch

    from crystalscope.models.precision import model_input

    if predictor.backend_name != "torch":
        require_checkpoint(predictor.source)
        raise CrystalscopeError(f"{predictor.source}: explain needs a PyTorch checkpoint (.ckpt)")
    pre = predictor.preprocessing
    chosen = None if target_class is None else _class_index(predictor, target_class)
    results, originals, arrays = [], [], []
    for i, item in enumerate(items):
        name = f"<image {offset + i}>" if isinstance(item, Image.Image) else str(item)
        results.append(Explanation(path=name))
        try:
            original = load_rgb(item)
        except (CrystalscopeError, OSError, ValueError, Image.DecompressionBombError) as exc:
            # one bad file must not stop the others
            results[-1].status = f"error: {first_line(exc, limit=None, without=name)}"
            continue
        originals.append(original)
        arrays.append(np.asarray(pre.resize_image(original), dtype=np.uint8))
    good = [r for r in results if r.ok]
    if not good:
        return results
    model, device = predictor.backend.model, predictor.backend.device
    batch = model_input(torch.from_numpy(pre.normalize(np.stack(arrays))).to(device))
    maps, logits = grad_cam(model, batch, None if chosen is None else [chosen] * len(good),
                            layer or default_target_layer(model, pre.image_size))
    probs = softmax(logits.astype(np.float64), predictor.temperature)
    for row, original, square, p in zip(good, originals, maps, probs):
        best = int(np.argmax(p))
        explained = best if chosen is None else chosen
        row.predicted, row.confidence = predictor.class_names[best], float(p[best])
        row.target, row.target_probability = predictor.class_names[explained], float(p[explained])
        row.heatmap = heatmap_on_image(square, pre, original.size)
        caption = f"{row.target} {row.target_probability:.3f}"
        if row.target != row.predicted:
            caption += f" (predicted {row.predicted})"
        row.overlay = _caption(blend(original, row.heatmap, alpha), caption)
    return results


def _class_index(predictor: Predictor, name: str) -> int:
    if name not in predictor.class_names:
        raise CrystalscopeError(f"--class {name!r} is not a class of {predictor.source}: use one of "
                                f"{', '.join(predictor.class_names)}")
    return predictor.class_names.index(name)


def explain_images(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike = "explain", *, target_class: str | None = None,
                   layer: str | None = None, batch_size: int = 16, device: str = "auto",
                   recursive: bool = True, sheet_limit: int = 64, force: bool = False) -> dict:
    """Write a Grad-CAM overlay per image, ``explain.csv`` and the contact sheet ``explain.png``.

    The folder is built beside ``out_dir`` and swapped in only when complete; an existing
    ``out_dir`` is replaced only when it holds nothing but an earlier explain's files and
    ``force`` is given (:func:`crystalscope.safety.claim_output`). Unreadable images
    become CSV rows with ``status = error: <reason>`` and grey tiles; the others go on.

    Returns:
        ``model``, ``layer``, ``out_dir``, ``sheet``, ``csv``, ``n_images``, ``n_ok``,
        ``n_errors`` and ``explanations`` (without heat maps, to keep memory flat).

    Example:
        >>> s = explain_images("runs/exp1/weights/best.ckpt", ["crops/"], "explain")  # doctest: +SKIP
        >>> s["layer"], s["n_ok"]  # doctest: +SKIP
        ('backbone.bn2', 7)
    """
    if batch_size < 1:
        raise CrystalscopeError(f"--batch-size {batch_size} must be 1 or more")
    require_checkpoint(model_path)
    with claim_output(out_dir, inputs=[model_path, *paths], kind="folder", force=force,
                      command=COMMAND) as out_dir:
        predictor = Predictor.load(model_path, device=device)
        files = collect_images(paths, recursive=recursive)
        return _explain_files(predictor, model_path, files, out_dir, target_class, layer, batch_size, sheet_limit)


def _explain_files(predictor, model_path, files, out_dir: Path, target_class, layer, batch_size: int,
                   sheet_limit: int) -> dict:
    if target_class is not None:
        _class_index(predictor, target_class)  # fail before any work
    layer = layer or default_target_layer(predictor.backend.model, predictor.preprocessing.image_size)
    explanations, tiles, used = [], [], set()
    with atomic_dir(out_dir, force=True, command=COMMAND) as staging:
        for start in range(0, len(files), batch_size):
            for row in explain_batch(predictor, files[start:start + batch_size], target_class, layer):
                tile = _tile(row, predictor.class_names)
                if row.ok:
                    name = _overlay_name(Path(row.path), used)
                    row.overlay.save(staging / name, format="PNG", optimize=True)
                    tile.image = row.overlay.copy()
                    tile.image.thumbnail((320, 320))
                    row.overlay_file, row.overlay, row.heatmap = name, None, None  # the file holds it
                if len(tiles) < sheet_limit:
                    tiles.append(tile)
                explanations.append(row)
            logger.info("explained %d of %d images", len(explanations), len(files))
        if not any(r.ok for r in explanations):  # nothing explained: no folder that claims otherwise
            for row in explanations:
                logger.warning("%s: %s", row.path, row.status)
            first = next((f" (first: {r.path}: {r.status})" for r in explanations), "")
            raise CrystalscopeError(f"none of the {len(files)} files could be read as an image{first}")
        title = f"Grad-CAM at {layer} of {predictor.backbone}"
        if len(files) > sheet_limit:
            title += f" (first {sheet_limit} of {len(files)} images)"
        rows = -(-len(tiles) // 6)  # at most 6 columns, rows filled evenly (8 tiles: 2 x 4)
        contact_sheet(tiles, staging / SHEET_PNG, columns=-(-len(tiles) // rows), title=title)
        write_text(staging / EXPLAIN_CSV, _explain_csv(explanations))
    n_ok = sum(r.ok for r in explanations)
    return {"model": str(model_path), "layer": layer, "out_dir": str(out_dir),
            "sheet": str(out_dir / SHEET_PNG), "csv": str(out_dir / EXPLAIN_CSV),
            "n_images": len(explanations), "n_ok": n_ok, "n_errors": len(explanations) - n_ok,
            "explanations": explanations}


def _overlay_name(path: Path, used: set[str]) -> str:
    """``<stem>.cam.png``, numbered when two inputs share a stem (``a/x.png``, ``b/x.png``)."""
    stem = path.stem if path.suffix else path.name
    stem = stem.strip("<>").replace(" ", "-") if stem.startswith("<") else stem
    name, n = f"{stem}{OVERLAY_SUFFIX}", 1
    while name.lower() in used:
        n += 1
        name = f"{stem}-{n}{OVERLAY_SUFFIX}"
    used.add(name.lower())
    return name


def _tile(row: Explanation, class_names: Sequence[str]) -> Tile:
    """A sheet cell; green/red frame when the parent folder names the true class."""
    label = Path(row.path).name[:24]
    if not row.ok:
        return Tile(None, f"{label}\n{row.status[:28]}", "error")
    truth = Path(row.path).parent.name
    kind = ("ok" if truth == row.predicted else "wrong") if truth in class_names else "neutral"
    lines = [label, f"{row.target} {row.target_probability:.3f}"]
    if row.target != row.predicted:
        lines.append(f"predicted {row.predicted} {row.confidence:.3f}")
    return Tile(None, "\n".join(lines), kind)


def _explain_csv(rows: Sequence[Explanation]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        number = (lambda v: f"{v:.6f}") if r.ok else (lambda v: "")
        writer.writerow([r.path, r.predicted or "", number(r.confidence), r.target or "",
                         number(r.target_probability), r.overlay_file, r.status])
    return buffer.getvalue()
