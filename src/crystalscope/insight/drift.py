"""Drift (``crystalscope drift``): how far new images are from a reference set.

Per image: the mean cosine distance of its L2-normalised features to its ``k`` (10) nearest
reference images. The flag threshold comes from held-out reference images: each reference image
is scored against the other ones (leave-one-out; the other views of the same crystal left out too
when the reference's groups are known), and the threshold is the conformal ``(1 - rate)``
quantile of those held-out distances, so an image drawn like the reference is flagged with
probability at most ``rate`` (1 %). Per folder: the flagged fraction with a Wilson
95 % interval and a kernel two-sample test (MMD with a Gaussian kernel, p-value by permutation).

Features: a trained model's penultimate features (``--model``, through the
:class:`~crystalscope.inference.predictor.Predictor`, so ONNX Runtime works without torch) or,
by default, ImageNet ``efficientnet_lite0`` features at 224 px
(:class:`~crystalscope.insight.features.ImageNetFeatures`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from crystalscope.data.layout import real_path
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.metrics import wilson_interval
from crystalscope.insight.embedding import read_groups
from crystalscope.insight.features import IMAGENET_IMAGE_SIZE, extract_features, l2_normalise
from crystalscope.io import write_json, write_text
from crystalscope.runtime import counter
from crystalscope.safety import report_folder

logger = logging.getLogger(__name__)

DRIFT_COLUMNS = ("path", "set", "distance", "threshold", "flagged", "nearest_reference")
REFERENCE_SET = "reference (held out)"
#: what a drift report folder holds (an earlier one is replaced only with --force)
DRIFT_FILES = ("drift.csv", "drift.json", "drift.png", "drift_foreign.png")
COMMAND = "drift"  # named in the report's manifest: --force replaces only what a drift wrote
MIN_REFERENCE = 10
MAX_MMD_PER_SET = 1000  # the kernel matrix is (n_ref + n_new)^2; a seeded sample beyond this
SIGNIFICANCE = 0.05


@dataclass
class DriftSettings:
    """How distances, flags and the two-sample test are computed (all stored in drift.json).

    Attributes:
        false_flag_rate: share of reference-like images allowed to be flagged (sets the threshold).
        neighbours: k of the kNN distance.
        permutations: permutations of the MMD test (p-value resolution 1/(permutations+1)).
        seed: MMD sampling and permutations.
    """

    false_flag_rate: float = 0.01
    neighbours: int = 10
    permutations: int = 500
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.false_flag_rate < 1:
            raise CrystalscopeError(f"--rate {self.false_flag_rate}: must be between 0 and 1 (e.g. 0.01 for 1 %)")
        if self.neighbours < 1:
            raise CrystalscopeError(f"--neighbours {self.neighbours}: must be 1 or more")
        if self.permutations < 1:
            raise CrystalscopeError(f"--permutations {self.permutations}: must be 1 or more")


# ---- the statistics (numpy only) ----------------------------------------------------------


def knn_distance(reference: np.ndarray, queries: np.ndarray, k: int,
                 excluded: Callable[[int, int], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine distance of each query to its ``k`` nearest reference rows, and the nearest one.

    Both inputs must be L2-normalised (:func:`~crystalscope.insight.features.l2_normalise`).
    ``excluded(start, stop)``, when given, returns a boolean ``(stop - start, n_reference)`` mask
    of reference rows that do not count as neighbours of queries ``start:stop``.

    Example:
        >>> ref = l2_normalise(np.array([[1.0, 0.0], [0.0, 1.0]]))
        >>> d, nearest = knn_distance(ref, l2_normalise(np.array([[1.0, 0.1]])), k=1)
        >>> round(float(d[0]), 4), int(nearest[0])
        (0.005, 0)
    """
    k = min(k, len(reference))
    distances, nearest = np.empty(len(queries)), np.empty(len(queries), dtype=int)
    for start in range(0, len(queries), 1024):  # bounded memory: 1024 x n_reference at a time
        stop = min(start + 1024, len(queries))
        d = np.clip(1.0 - queries[start:stop] @ reference.T, 0.0, 2.0)
        if excluded is not None:
            d[excluded(start, stop)] = np.inf
        distances[start:stop] = np.partition(d, k - 1, axis=1)[:, :k].mean(axis=1)
        nearest[start:stop] = d.argmin(axis=1)
    return distances, nearest


def held_out_distances(reference: np.ndarray, k: int, groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each reference row's kNN distance to the *other* reference rows (leave-one-out), and its nearest.

    A new image is scored against all ``n`` reference images and a held-out one against the
    other ``n - 1``: nearly the same density, so the held-out distances calibrate the flag (a
    5-fold split would score held-out rows against 80 % of the reference and set the threshold
    too high: 1.2 % flagged instead of 5 % measured on i.i.d. points). Rows sharing a non-empty
    ``groups`` label (views of one crystal) are not each other's neighbours either, as a new
    crystal has no copies in the reference.

    Example:
        >>> ref = l2_normalise(np.random.default_rng(0).normal(size=(40, 8)))
        >>> held_out_distances(ref, k=3)[0].shape
        (40,)
    """
    n = len(reference)
    labels = np.asarray(groups if groups is not None else [""] * n, dtype=object)
    largest = max(np.unique(labels[labels != ""], return_counts=True)[1], default=1)
    k = max(1, min(k, n - largest))  # every row keeps k candidates outside its own group

    def excluded(start: int, stop: int) -> np.ndarray:
        mask = (labels[start:stop, None] == labels[None, :]) & (labels[start:stop, None] != "")
        mask[np.arange(stop - start), np.arange(start, stop)] = True  # never its own neighbour
        return mask

    return knn_distance(reference, reference, k, excluded)


def flag_threshold(held_out: np.ndarray, rate: float) -> tuple[float, str | None]:
    """The conformal ``(1 - rate)`` quantile of held-out distances, and a note when ``rate`` is out of reach.

    Flagging ``distance > threshold`` then flags a new reference-like image with probability at
    most ``rate``; with ``n`` held-out images no rate below ``1 / (n + 1)`` can be promised.

    Example:
        >>> flag_threshold(np.arange(1, 200) / 100, 0.01)[0]
        1.98
    """
    scores = np.sort(np.asarray(held_out, dtype=float))
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - rate))
    if rank > n:
        return float(scores[-1]), (f"{n} reference images cannot set a {rate:.1%} false-flag rate "
                                   f"(the smallest is {1 / (n + 1):.2%}): the largest held-out distance is used")
    return float(scores[rank - 1]), None


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 500, seed: int = 0,
             max_per_set: int = MAX_MMD_PER_SET) -> dict:
    """Maximum mean discrepancy (Gaussian kernel, median-distance bandwidth) with a permutation p-value.

    All permutations are scored in one matrix product: for a set-indicator vector ``z``,
    the within-X kernel sum is ``z' K z`` and the cross sum ``z' K 1 - z' K z``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> mmd_test(rng.normal(size=(40, 3)), rng.normal(2, 1, size=(40, 3)), 200)["p_value"] < 0.05
        True
    """
    rng = np.random.default_rng(seed)
    x = x[np.sort(rng.choice(len(x), max_per_set, replace=False))] if len(x) > max_per_set else x
    y = y[np.sort(rng.choice(len(y), max_per_set, replace=False))] if len(y) > max_per_set else y
    z = np.vstack([x, y]).astype(np.float64)
    squared = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None] - 2 * z @ z.T, 0.0)
    off_diagonal = squared[~np.eye(len(z), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) or float(off_diagonal.mean()) or 1.0
    kernel = np.exp(-squared / bandwidth)
    nx, ny = len(x), len(y)
    indicator = np.zeros((len(z), permutations + 1))
    indicator[:nx, 0] = 1.0
    for column in range(1, permutations + 1):
        indicator[rng.permutation(len(z))[:nx], column] = 1.0
    within_x = (indicator * (kernel @ indicator)).sum(axis=0)
    cross = indicator.T @ kernel.sum(axis=1) - within_x
    within_y = kernel.sum() - 2 * cross - within_x
    mmd2 = within_x / nx ** 2 + within_y / ny ** 2 - 2 * cross / (nx * ny)
    p_value = (1 + int(np.sum(mmd2[1:] >= mmd2[0]))) / (permutations + 1)
    return {"mmd2": float(mmd2[0]), "p_value": float(p_value), "permutations": int(permutations),
            "bandwidth": bandwidth, "n_reference": nx, "n_new": ny}


def verdict(flagged_ci: tuple[float, float], p_value: float, rate: float) -> str:
    """``foreign`` (more images flagged than ``rate`` allows), ``shifted`` (MMD p < 0.05) or ``consistent``.

    Example:
        >>> verdict((0.4, 0.6), 0.002, 0.01), verdict((0.0, 0.05), 0.001, 0.01), verdict((0.0, 0.05), 0.4, 0.01)
        ('foreign', 'shifted', 'consistent')
    """
    if flagged_ci[0] > rate:
        return "foreign"
    return "shifted" if p_value < SIGNIFICANCE else "consistent"


# ---- the `drift` command ------------------------------------------------------------------


def image_sets(reference: str | os.PathLike, new: Sequence[str | os.PathLike]) -> tuple[list[Path], dict[str, list[Path]]]:
    """The reference files and ``{set name: files}`` for each NEW path (folder or file).

    A split folder (``train/``, ``val/``, ``test/``) as REFERENCE means its ``train/`` images.

    Example:
        >>> ref, sets = image_sets("split", ["plant/2026-11-28", "plant/2026-11-29"])  # doctest: +SKIP
        >>> list(sets)  # doctest: +SKIP
        ['2026-11-28', '2026-11-29']
    """
    from crystalscope.inference.predictor import collect_images

    reference = Path(reference)
    if not reference.is_dir():
        raise CrystalscopeError(f"REFERENCE {reference}: folder not found (give a folder of reference images)")
    if (reference / "train").is_dir() and (reference / "val").is_dir():
        reference = reference / "train"
    if not new:
        raise CrystalscopeError("drift: give at least one NEW folder of images to compare with the reference")
    sets: dict[str, list[Path]] = {}
    for path in map(Path, new):
        name = path.name or str(path)
        while name in sets:  # two folders called "images": keep both, told apart
            name = f"{name}'"
        sets[name] = collect_images([path])
    return collect_images([reference]), sets


GROUP_FILES = ("split.csv", "synth_manifest.csv")


def reference_groups(reference: str | os.PathLike) -> Path | None:
    """The groups CSV that belongs to REFERENCE, if any: a split's ``split.csv`` (its near-duplicate
    groups) or a generated set's ``synth_manifest.csv`` (crystal ids), in the folder or three above."""
    folder = Path(reference).resolve()
    for candidate in (folder, *list(folder.parents)[:3]):
        for name in GROUP_FILES:
            if (candidate / name).is_file():
                return candidate / name
    return None


def feature_source(model: str | os.PathLike | None, image_size: int = IMAGENET_IMAGE_SIZE, device: str = "auto"):
    """A :class:`Predictor` for ``model``, else the ImageNet ``efficientnet_lite0`` features."""
    if model is not None:
        from crystalscope.inference.predictor import Predictor

        return Predictor.load(model, device=device)
    from crystalscope.insight.features import ImageNetFeatures

    return ImageNetFeatures(image_size=image_size, device="cpu" if device == "auto" else device)


def _features_by_file(source, files: list[Path], batch_size: int, on_progress) -> tuple[dict[str, np.ndarray], dict, str]:
    """L2-normalised features per resolved path (each file computed once), unreadable files, source name."""
    # decoded under the first name given (errors name the user's file, not a link's target)
    first: dict[str, str] = {}
    for f in files:
        first.setdefault(str(real_path(f)), str(f))
    key_of = {given: key for key, given in first.items()}
    fs = extract_features(source, list(first.values()), batch_size=batch_size,
                          on_batch=counter(on_progress, len(first)))
    return {key_of[p]: v for p, v in zip(fs.paths, l2_normalise(fs.features))}, fs.errors, fs.source


def _set_rows(files: list[Path], by_file: dict, ref_unit, ref_paths, held: dict, k: int):
    """(paths, distances, nearest reference paths, features) of one NEW set.

    A file that is also in the reference keeps its held-out distance (to the other reference
    images), so a folder compared with itself is flagged at the stated rate, not never.
    """
    keys = [str(real_path(f)) for f in files]
    paths = [str(f) for f, key in zip(files, keys) if key in by_file]
    keys = [key for key in keys if key in by_file]
    if not keys:
        return paths, np.empty(0), [], np.empty((0, ref_unit.shape[1]))
    unit = np.stack([by_file[key] for key in keys])
    distances, nearest = knn_distance(ref_unit, unit, k)
    for i, key in enumerate(keys):
        if key in held:  # the image is in the reference: its distance to the *other* images counts
            distances[i], nearest[i] = held[key]
    return paths, distances, [ref_paths[j] for j in nearest], unit


def drift_report(reference: str | os.PathLike, new: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 model: str | os.PathLike | None = None, settings: DriftSettings | None = None,
                 groups_csv: str | os.PathLike | None = None, image_size: int = IMAGENET_IMAGE_SIZE,
                 batch_size: int = 32, device: str = "auto",
                 on_progress: Callable[[int, int], None] | None = None, force: bool = False) -> dict:
    """Compare each NEW folder with REFERENCE; write ``drift.csv``, ``drift.json`` and ``drift.png``.

    Args:
        reference: folder of reference images (a split folder means its ``train/``).
        new: folders (or files) to judge, one set each.
        out_dir: report folder, built beside and swapped in when complete; an earlier drift
            report there is replaced only with ``force`` (:func:`crystalscope.safety.report_folder`).
        model: ``.ckpt`` / ``.onnx`` whose penultimate features to use (None: ImageNet features).
        settings: rate, k, permutations, seed (:class:`DriftSettings`).
        groups_csv: which reference images are views of one crystal (``path`` plus ``crystal_id``
            or ``group`` columns); default: :func:`reference_groups`. Views of an image's own
            crystal are not its neighbours when its held-out distance is measured.
        image_size: input side of the ImageNet features (ignored with ``model``).
        on_progress: called with ``(done, total)`` images after each batch.

    Returns:
        The summary written to ``drift.json`` (``sets``: one entry per NEW folder with
        ``n_images``, ``n_flagged``, ``flagged_fraction``, ``flagged_ci95``, ``mmd``, ``verdict``).

    Example:
        >>> r = drift_report("data/generated", ["real_samples"], "drift")  # doctest: +SKIP
        >>> r["sets"]["real_samples"]["n_flagged"], r["sets"]["real_samples"]["verdict"]  # doctest: +SKIP
        (15, 'foreign')
    """
    settings = settings or DriftSettings()
    settings.validate()
    # claimed before the work: a refused --out costs nothing, and no second writer starts
    with report_folder(out_dir, inputs=[reference, *new, model, groups_csv], command=COMMAND,
                       force=force) as staging:
        return _drift_into(staging, reference, new, model, settings, groups_csv, image_size, batch_size,
                           device, on_progress)


def _drift_into(out_dir: Path, reference, new, model, settings: DriftSettings, groups_csv, image_size: int,
                batch_size: int, device: str, on_progress) -> dict:
    ref_files, sets = image_sets(reference, new)
    source = feature_source(model, image_size, device)
    all_files = ref_files + [f for files in sets.values() for f in files]
    by_file, errors, source_name = _features_by_file(source, all_files, batch_size, on_progress)
    ref_keys = [key for key in dict.fromkeys(str(real_path(f)) for f in ref_files) if key in by_file]
    if len(ref_keys) < MIN_REFERENCE:
        raise CrystalscopeError(f"REFERENCE {reference}: {len(ref_keys)} readable images; a reference needs "
                                f"at least {MIN_REFERENCE} (hundreds for a 1 % false-flag rate)")
    _check_sets_readable(sets, by_file, errors)
    ref_unit = np.stack([by_file[key] for key in ref_keys])
    ref_paths = [str(Path(key)) for key in ref_keys]
    groups_csv = groups_csv if groups_csv is not None else reference_groups(reference)
    groups = read_groups(groups_csv, ref_paths) if groups_csv is not None else None
    held_d, held_j = held_out_distances(ref_unit, settings.neighbours, groups)
    threshold, note = flag_threshold(held_d, settings.false_flag_rate)
    held = {key: (d, j) for key, d, j in zip(ref_keys, held_d, held_j)}
    rows = [(p, REFERENCE_SET, d, bool(d > threshold), ref_paths[j]) for p, d, j in zip(ref_paths, held_d, held_j)]
    results, units = {}, {}
    ref_independent = ref_unit[one_per_group(groups, len(ref_unit))]  # one view per crystal, for every set
    for name, files in sets.items():
        paths, distances, nearest, unit = _set_rows(files, by_file, ref_unit, ref_paths, held, settings.neighbours)
        rows += [(p, name, d, bool(d > threshold), n) for p, d, n in zip(paths, distances, nearest)]
        results[name] = _set_summary(files, paths, distances, unit, threshold, ref_independent, settings)
        units[name] = (paths, unit, distances)
    write_text(out_dir / "drift.csv", _drift_csv(rows, threshold))
    _drift_figures(out_dir, ref_unit, units, threshold, settings, source_name)
    summary = {"reference": str(reference), "n_reference": len(ref_keys), "features": source_name,
               "settings": vars(settings), "threshold": threshold, "threshold_note": note,
               "reference_groups": {"csv": str(groups_csv), "n_grouped": sum(1 for g in groups if g),
                                    "n_groups": len({g for g in groups if g})} if groups is not None else None,
               "reference_held_out": {"flagged": int((held_d > threshold).sum()),
                                      "distance_quantiles": _quantiles(held_d)},
               "sets": results, "unreadable": errors,
               "files": list(DRIFT_FILES)}
    write_json(out_dir / "drift.json", summary)
    return summary


def _check_sets_readable(sets: dict[str, list[Path]], by_file: dict, errors: dict) -> None:
    """Refuse a NEW set without one readable image: a verdict on nothing would claim no drift."""
    for name, files in sets.items():
        if not any(str(real_path(f)) in by_file for f in files):
            first = next((f"first: {f}: {errors[str(f)]}" for f in files if str(f) in errors), "no image files")
            raise CrystalscopeError(f"NEW {name}: none of its {len(files)} files could be read as an image "
                                    f"({first}); nothing to compare with the reference")


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    return {f"p{q}": float(np.percentile(values, q)) for q in (5, 50, 95, 99)} | {"max": float(np.max(values))}


def one_per_group(groups: Sequence[str] | None, n: int) -> np.ndarray:
    """Indices keeping the first member of each non-empty group and every ungrouped row.

    The permutation test assumes independent images; four rotated views of one crystal are one
    observation, not four (counted four times they make a p-value far too small).

    Example:
        >>> one_per_group(["a", "a", "", "b", "b"], 5).tolist()
        [0, 2, 3]
    """
    if groups is None:
        return np.arange(n)
    seen: set[str] = set()
    keep = []
    for i, group in enumerate(groups):
        if not group or group not in seen:
            keep.append(i)
            seen.add(group)
    return np.asarray(keep, dtype=int)


def _set_summary(files: list[Path], paths: list[str], distances: np.ndarray, unit: np.ndarray, threshold: float,
                 ref_independent: np.ndarray, settings: DriftSettings) -> dict:
    """Flag count over all images; the interval and the MMD test (against ``ref_independent``)
    over one view per crystal when the folder's own groups file is found."""
    own_groups = reference_groups(files[0].parent) if files else None
    independent = one_per_group(read_groups(own_groups, paths) if own_groups else None, len(paths))
    n, flagged = len(distances), int((distances > threshold).sum())
    ci = wilson_interval(int((distances[independent] > threshold).sum()), len(independent))
    mmd = mmd_test(ref_independent, unit[independent], settings.permutations, settings.seed) if len(independent) >= 2 else None
    return {"n_images": n, "n_flagged": flagged, "flagged_fraction": flagged / n if n else None,
            "n_independent": int(len(independent)), "groups_csv": str(own_groups) if own_groups else None,
            "flagged_ci95": list(ci), "distance_quantiles": _quantiles(distances), "mmd": mmd,
            "verdict": verdict(ci, mmd["p_value"] if mmd else 1.0, settings.false_flag_rate) if n else "no images"}


def _drift_csv(rows: list[tuple], threshold: float) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DRIFT_COLUMNS)
    for path, name, distance, flagged, nearest in rows:
        writer.writerow([path, name, f"{distance:.6f}", f"{threshold:.6f}", int(flagged), nearest])
    return buffer.getvalue()


def _drift_figures(out_dir: Path, ref_unit: np.ndarray, sets: dict, threshold: float, settings: DriftSettings,
                   source_name: str, shown: int = 12) -> None:
    """``drift.png`` (reference and NEW sets on one PCA map, flagged ringed, plus the most foreign
    images) and ``drift_foreign.png`` (that sheet at full size)."""
    from crystalscope.evaluation.sheets import Tile, contact_sheet, load_thumbnail
    from crystalscope.insight.embedding import project_2d
    from crystalscope.insight.plots import Panel, colour_of, map_figure

    colours = {"reference": (150, 150, 150)}
    colours |= {name: colour_of(i if i < 7 else i + 1) for i, name in enumerate(sets)}  # tab10's grey is the reference's
    stacked = np.vstack([ref_unit] + [unit for _, unit, _ in sets.values()])
    keys = ["reference"] * len(ref_unit) + [name for name, (paths, _, _) in sets.items() for _ in paths]
    distances = np.concatenate([np.zeros(len(ref_unit))] + [d for _, _, d in sets.values()])
    candidates = [(d, name, p) for name, (paths, _, ds) in sets.items() for p, d in zip(paths, ds)]
    candidates.sort(key=lambda c: -c[0])
    tiles = [Tile(load_thumbnail(p, 140), f"{name}\nd = {d:.3f}" + (" flagged" if d > threshold else ""),
                  colour=colours[name])
             for d, name, p in candidates[:shown]]
    sheet = contact_sheet(tiles, out_dir / "drift_foreign.png", columns=4, cell=150,
                          title=f"most foreign images (threshold {threshold:.3f})")
    mapped = project_2d(stacked, "pca", settings.seed)
    xlabel, ylabel = mapped.axis_labels()
    map_figure(mapped.coords, keys, out_dir / "drift.png", colours=colours, ring=distances > threshold,
               ring_label=f"flagged (distance > {threshold:.3f})", xlabel=xlabel, ylabel=ylabel,
               panels=[Panel("", sheet)],
               title=f"{source_name}: reference and new images\n"
                     f"{settings.neighbours}-NN cosine distance, flagged at a {settings.false_flag_rate:.1%} false-flag rate")
