"""Dataset audit: duplicates and their rotations/mirror images, leakage, size shortcuts.

In the real CEX/PG dataset, PG files come as pixel-exact rotated and mirrored views of one
crystal, and the image size alone tells the classes apart. :func:`audit_dataset` finds both:

1. every image is decoded once (in worker processes, in chunks of consecutive file names)
   into a small record: size, intensity statistics and a *dihedral perceptual hash* (a 64-bit
   DCT hash of each of the 8 rotations/mirror images of an exactly-equivariant 32 x 32
   thumbnail);
2. images of the same size (up to a transpose) whose hashes are within a few bits of each
   other under some rotation/mirror are *candidates*; every candidate pair is then compared
   pixel by pixel under all 8 rotations/mirrors (inside the worker while the chunk's pixels
   are in memory; pairs from different chunks are decoded again), so a hash collision or a
   near-miss (a few pixels changed) is never reported as a duplicate;
3. verified groups whose members sit in different splits are leakage;
4. a cross-validated classifier that sees only width, height, aspect and intensity statistics
   measures how much a model could learn without looking at the crystal (a shortcut).

Nothing here imports torch; scikit-learn and matplotlib are imported when needed.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from crystalscope.data.images import ImageReadError, load_rgb, natural_key
from crystalscope.errors import CrystalscopeError, require

THUMB_SIZE = 32
HASH_SIDE = 8  # 8 x 8 lowest DCT frequencies -> 64 bits
#: Candidate pairs differ in at most this many of the 64 hash bits (under the best rotation).
PHASH_MAX_DISTANCE = 6
HISTOGRAM_BINS = 64
#: Images per worker task: large enough to hide process overhead, small for a smooth bar.
CHUNK = 64
#: Below this many images the work runs in-process (worker start-up would dominate).
SERIAL_BELOW = 2 * CHUNK


@dataclass
class ImageRecord:
    """What the audit keeps of one decoded image (the pixels themselves are not kept)."""

    path: Path
    width: int = 0
    height: int = 0
    mean_intensity: float = 0.0
    std_intensity: float = 0.0
    #: (8,) uint64: the perceptual hash of each dihedral view; [0] is the image as stored.
    phash: np.ndarray | None = None
    #: (HISTOGRAM_BINS,) counts of grey levels.
    histogram: np.ndarray | None = None
    error: str | None = None
    #: Pixel-checked verdicts ``(same up to rotation/mirror, identical)`` for hash candidates
    #: decoded in the same worker chunk, so most pairs need no second decode.
    verified: dict[Path, tuple[bool, bool]] = field(default_factory=dict)

    @property
    def readable(self) -> bool:
        return self.error is None


@dataclass
class DuplicateReport:
    """Verified duplicate groups plus what the hash proposed but the pixels refused."""

    groups: list[list[Path]] = field(default_factory=list)  # dihedral (incl. exact), size >= 2
    exact_groups: list[list[Path]] = field(default_factory=list)  # identical as stored
    near_misses: list[tuple[Path, Path, int]] = field(default_factory=list)  # (a, b, hash bits)
    n_candidate_pairs: int = 0
    n_near_miss_pairs: int = 0
    n_decoded_again: int = 0  # images decoded a second time to check cross-chunk candidates


# ---- the dihedral group and the perceptual hash ----------------------------------------


def dihedral_views(array: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 rotations / mirror images of an ``(H, W[, C])`` array (identity first).

    Example:
        >>> len(list(dihedral_views(np.zeros((3, 5)))))
        8
    """
    for k in range(4):
        yield np.rot90(array, k)
    mirrored = array[:, ::-1]
    for k in range(4):
        yield np.rot90(mirrored, k)


def _box_reduce(values: np.ndarray, axis: int, size: int = THUMB_SIZE) -> np.ndarray:
    """Area-average ``axis`` (length n) down to ``size`` bins, exactly, in integer units.

    Positions are scaled by ``size`` so every bin edge ``a * n / size`` falls on an integer;
    the integral up to an edge is ``size * cumsum + remainder * pixel``. Integer arithmetic
    makes the result *exactly* equivariant: the thumbnail of a rotated or mirrored image is
    the rotated or mirrored thumbnail, bit for bit, so true dihedral copies get identical
    hashes. (No BLAS matmul either: on a busy 2-core machine its threads cost 20 ms a call.)
    """
    values = np.moveaxis(values, axis, 0)
    n = values.shape[0]
    # int64 only once the sums can outgrow int32 (the second pass of large images)
    dtype = np.int32 if values.dtype == np.uint8 else np.int64
    cumulative = np.zeros((n + 1,) + values.shape[1:], dtype=dtype)
    np.cumsum(values, axis=0, dtype=dtype, out=cumulative[1:])
    pixel, remainder = np.divmod(np.arange(size + 1) * n, size)
    partial = values[np.minimum(pixel, n - 1)].astype(dtype)  # remainder is 0 where pixel == n
    integral = size * cumulative[pixel] + remainder.reshape((-1,) + (1,) * (values.ndim - 1)) * partial
    return np.moveaxis(np.diff(integral, axis=0), 0, axis)


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    x = np.arange(THUMB_SIZE)
    u = np.arange(HASH_SIDE)[:, None]
    return np.cos(np.pi * (2 * x[None, :] + 1) * u / (2 * THUMB_SIZE))


def grey_thumbnail(grey: np.ndarray) -> np.ndarray:
    """A ``32 x 32`` area-averaged (unnormalised, integer-valued) thumbnail of a grey image."""
    return _box_reduce(_box_reduce(grey, 0).astype(np.int64), 1).astype(np.float64)


def dihedral_phash(image: np.ndarray) -> np.ndarray:
    """The 64-bit DCT perceptual hash of each of the 8 dihedral views, as ``(8,) uint64``.

    ``dihedral_phash(view)[0]`` equals one entry of ``dihedral_phash(image)`` for every
    rotation/mirror ``view`` of ``image``, so comparing one hash against all 8 finds
    rotated and mirrored copies.

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` grey array.

    Example:
        >>> img = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
        >>> int(dihedral_phash(np.rot90(img))[0]) in set(dihedral_phash(img).tolist())
        True
    """
    grey = image.sum(axis=2, dtype=np.int64) if image.ndim == 3 else image
    thumb = grey_thumbnail(grey)
    dct = _dct_matrix()
    views = np.stack([np.ascontiguousarray(v) for v in dihedral_views(thumb)])
    coeffs = (dct @ views @ dct.T).reshape(8, -1)
    median = np.median(coeffs[:, 1:], axis=1, keepdims=True)
    # a tolerance keeps flat images (all AC coefficients ~1e-12) from hashing float noise
    tolerance = 1e-9 * (np.abs(coeffs[:, :1]) + 1.0)
    bits = coeffs > median + tolerance
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def _scan_one(path: Path) -> tuple[ImageRecord, np.ndarray | None]:
    """Decode one image into its record; the RGB pixels come back too (None if unreadable)."""
    try:
        image = load_rgb(path)
    except ImageReadError as exc:
        return ImageRecord(path=path, error=str(exc)), None
    # intensity = ITU-R 601 luma (PIL "L"); per-pixel, so rotations and mirrors commute with it
    grey = np.asarray(image.convert("L"))
    counts = np.bincount(grey.ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64)
    mean = float(levels @ counts) / grey.size
    variance = float((levels**2) @ counts) / grey.size - mean**2
    record = ImageRecord(
        path=path, width=image.width, height=image.height,
        mean_intensity=mean, std_intensity=math.sqrt(max(0.0, variance)),
        phash=dihedral_phash(grey),
        histogram=counts.reshape(HISTOGRAM_BINS, -1).sum(axis=1),
    )
    return record, np.asarray(image)


def _scan_chunk(paths: Sequence[Path]) -> list[ImageRecord]:
    """Worker: decode a chunk and pixel-check its hash candidates while the pixels are here.

    Copies of one crystal usually have consecutive file numbers, so they mostly fall in one
    chunk: the check then costs no second decode.
    """
    scanned = [_scan_one(p) for p in paths]
    records = [record for record, _ in scanned]
    pairs = candidate_pairs(records)
    if pairs:
        verdicts = _pixel_verdicts([rgb for _, rgb in scanned], [(a, b) for a, b, _ in pairs])
        for (a, b), verdict in verdicts.items():
            records[a].verified[records[b].path] = verdict
            records[b].verified[records[a].path] = verdict
    return records


# ---- parallel work with a progress bar --------------------------------------------------


def default_workers() -> int:
    """Worker processes to use: every core, capped at 8 (decoding small PNGs scales well)."""
    return max(1, min(8, os.cpu_count() or 1))


def progress_bar(enabled: bool):
    """A rich progress bar on stderr (disabled -> silent), usable as a context manager."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    transient=True, disable=not enabled)


def _run_chunks(func: Callable, chunks: list, sizes: list[int], description: str,
                progress: bool, workers: int | None) -> list:
    """``[func(c) for c in chunks]`` in worker processes, in order, with a progress bar."""
    workers = default_workers() if workers is None else workers
    results = []
    if workers <= 1 or sum(sizes) < SERIAL_BELOW:
        with progress_bar(progress) as bar:
            task = bar.add_task(description, total=sum(sizes))
            for chunk, size in zip(chunks, sizes):
                results.append(func(chunk))
                bar.advance(task, size)
        return results
    # the pool is created before the bar so no rich refresh thread exists when workers fork
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(func, chunk) for chunk in chunks]
        with progress_bar(progress) as bar:
            task = bar.add_task(description, total=sum(sizes))
            for future, size in zip(futures, sizes):
                results.append(future.result())
                bar.advance(task, size)
    return results


def scan_images(paths: Iterable[str | os.PathLike], progress: bool = False,
                workers: int | None = None) -> list[ImageRecord]:
    """Decode every image once (in parallel) and return one :class:`ImageRecord` per path.

    Unreadable files get a record with ``error`` set instead of raising.

    Example:
        >>> records = scan_images(["a.png", "b.png"])  # doctest: +SKIP
        >>> [r.path for r in records if not r.readable]  # doctest: +SKIP
    """
    paths = [Path(p) for p in paths]
    # chunk in file-name order within each class folder, so the views of one crystal (consecutive
    # numbers) share a chunk and get pixel-checked there, even when a split scattered them
    order = sorted(range(len(paths)),
                   key=lambda i: (paths[i].parent.name.lower(), natural_key(paths[i].name)))
    chunks = [[paths[i] for i in order[k:k + CHUNK]] for k in range(0, len(order), CHUNK)]
    results = _run_chunks(_scan_chunk, chunks, [len(c) for c in chunks], "decoding images",
                          progress, workers)
    records: list[ImageRecord] = [None] * len(paths)  # type: ignore[list-item]
    for i, record in zip(order, (r for chunk in results for r in chunk)):
        records[i] = record
    return records


# ---- duplicates: hash candidates, pixel verification ------------------------------------


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def candidate_pairs(records: Sequence[ImageRecord],
                    max_distance: int = PHASH_MAX_DISTANCE) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, bits)`` (i < j) whose hashes match under some rotation/mirror.

    Only images of the same size up to a transpose can be pixel-exact dihedral copies, so
    the (vectorised) all-pairs comparison runs inside each size bucket.
    """
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        if record.readable:
            buckets[(min(record.width, record.height), max(record.width, record.height))].append(i)
    pairs: list[tuple[int, int, int]] = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        index = np.asarray(members)
        views = np.stack([records[i].phash for i in members])  # (n, 8)
        stored = views[:, 0]
        block = max(1, 2_000_000 // (8 * len(members)))  # bounds the (block, 8, n) temporary
        for start in range(0, len(members), block):
            stop = min(start + block, len(members))
            bits = np.bitwise_count(views[start:stop, :, None] ^ stored[None, None, :]).min(axis=1)
            rows, cols = np.nonzero(bits <= max_distance)
            rows += start
            keep = rows != cols
            for r, c in zip(rows[keep], cols[keep]):
                a, b = (index[r], index[c]) if index[r] < index[c] else (index[c], index[r])
                pairs.append((int(a), int(b), int(bits[r - start, c])))
    best: dict[tuple[int, int], int] = {}
    for a, b, d in pairs:  # (a, b) may be found from both sides
        best[(a, b)] = min(d, best.get((a, b), d))
    return sorted((a, b, d) for (a, b), d in best.items())


def pixel_identical_groups(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Partition images into groups that are identical up to a rotation/mirror, pixel by pixel.

    Each group's first image contributes its 8 views as ``(shape, raw bytes)`` keys; another
    image joins when its own ``(shape, bytes)`` is one of them. Set membership compares the
    full bytes after the hash lookup, so this is a true pixel comparison, not another hash.

    Example:
        >>> a = np.arange(6, dtype=np.uint8).reshape(2, 3)
        >>> pixel_identical_groups([a, np.rot90(a), a + 1])
        [[0, 1], [2]]
    """
    stored = [(im.shape, np.ascontiguousarray(im).tobytes()) for im in images]
    remaining = list(range(len(images)))
    groups = []
    while remaining:
        views = {(v.shape, np.ascontiguousarray(v).tobytes()) for v in dihedral_views(images[remaining[0]])}
        same = [i for i in remaining if stored[i] in views]
        groups.append(same)
        remaining = [i for i in remaining if stored[i] not in views]
    return groups


def _pixel_verdicts(images: Sequence[np.ndarray | None],
                    pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], tuple[bool, bool]]:
    """``(same up to rotation/mirror, identical)`` for each index pair, by comparing pixels."""
    union = _UnionFind(len(images))
    for a, b in pairs:
        union.union(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for i in sorted({i for pair in pairs for i in pair}):
        if images[i] is not None:
            members[union.find(i)].append(i)
    label: dict[int, tuple[int, int]] = {}
    for root, component in members.items():
        for g, group in enumerate(pixel_identical_groups([images[i] for i in component])):
            for j in group:
                label[component[j]] = (root, g)
    verdicts = {}
    for a, b in pairs:
        same = a in label and label.get(a) == label.get(b)
        verdicts[(a, b)] = (same, same and images[a].tobytes() == images[b].tobytes()
                            and images[a].shape == images[b].shape)
    return verdicts


def _verify_pairs(job: tuple[list[Path], list[tuple[int, int]]]) -> dict[tuple[int, int], tuple[bool, bool]]:
    """Worker: decode the images of some candidate pairs again and compare their pixels."""
    paths, pairs = job
    images = []
    for path in paths:
        try:
            images.append(np.asarray(load_rgb(path)))
        except ImageReadError:
            images.append(None)  # changed since the scan: it cannot be verified, so no duplicate
    return _pixel_verdicts(images, pairs)


def _verify_again(records: Sequence[ImageRecord], pairs: list[tuple[int, int]], progress: bool,
                  workers: int | None) -> tuple[dict[tuple[int, int], tuple[bool, bool]], int]:
    """Pixel verdicts for candidate pairs the scan could not check (different chunks)."""
    union = _UnionFind(len(records))
    for a, b in pairs:
        union.union(a, b)
    by_component: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for a, b in pairs:
        by_component[union.find(a)].append((a, b))
    jobs: list[list[tuple[int, int]]] = []
    for component_pairs in by_component.values():  # a component never straddles two jobs
        if not jobs or len({i for pair in jobs[-1] for i in pair}) >= CHUNK:
            jobs.append([])
        jobs[-1].extend(component_pairs)
    payload, sizes = [], []
    for job in jobs:
        indices = sorted({i for pair in job for i in pair})
        local = {i: k for k, i in enumerate(indices)}
        payload.append(([records[i].path for i in indices], [(local[a], local[b]) for a, b in job]))
        sizes.append(len(indices))
    results = _run_chunks(_verify_pairs, payload, sizes, "verifying duplicates", progress, workers)
    verdicts = {}
    for job, (_, local_pairs), result in zip(jobs, payload, results):
        for (a, b), local_pair in zip(job, local_pairs):
            verdicts[(a, b)] = result[local_pair]
    return verdicts, sum(sizes)


def _sorted_groups(groups: Iterable[list[Path]]) -> list[list[Path]]:
    ordered = [sorted(g, key=natural_key) for g in groups]
    return sorted(ordered, key=lambda g: natural_key(g[0]))


def find_duplicates(records: Sequence[ImageRecord], progress: bool = False,
                    max_distance: int = PHASH_MAX_DISTANCE, workers: int | None = None,
                    max_examples: int = 50) -> DuplicateReport:
    """Verified duplicate groups (exact copies, rotations by 90 degrees, mirror images).

    Candidates come from the dihedral perceptual hash; every group reported has been checked
    pixel by pixel. Candidate pairs that fail the check are counted as near-misses.

    Example:
        >>> report = find_duplicates(scan_images(paths))  # doctest: +SKIP
        >>> report.groups[0]  # doctest: +SKIP
        [PosixPath('pg/PG (1).png'), PosixPath('pg/PG (2).png'), PosixPath('pg/PG (3).png')]
    """
    pairs = candidate_pairs(records, max_distance)
    verdicts: dict[tuple[int, int], tuple[bool, bool]] = {}
    for a, b, _ in pairs:
        if records[b].path in records[a].verified:
            verdicts[(a, b)] = records[a].verified[records[b].path]
    unchecked = [(a, b) for a, b, _ in pairs if (a, b) not in verdicts]
    checked_again, n_decoded = _verify_again(records, unchecked, progress, workers) if unchecked else ({}, 0)
    verdicts.update(checked_again)
    report = DuplicateReport(n_candidate_pairs=len(pairs), n_decoded_again=n_decoded)
    dihedral, exact = _UnionFind(len(records)), _UnionFind(len(records))
    for a, b, bits in pairs:
        same, identical = verdicts[(a, b)]
        if same:
            dihedral.union(a, b)
        else:
            report.n_near_miss_pairs += 1
            if len(report.near_misses) < max_examples:
                report.near_misses.append((records[a].path, records[b].path, bits))
        if identical:
            exact.union(a, b)
    report.groups = _components(records, dihedral, {i for a, b, _ in pairs for i in (a, b)})
    report.exact_groups = _components(records, exact, {i for a, b, _ in pairs for i in (a, b)})
    return report


def _components(records: Sequence[ImageRecord], union: _UnionFind, indices: set[int]) -> list[list[Path]]:
    members: dict[int, list[Path]] = defaultdict(list)
    for i in indices:
        members[union.find(i)].append(records[i].path)
    return _sorted_groups(g for g in members.values() if len(g) > 1)


def find_duplicate_groups(paths: Iterable[str | os.PathLike], progress: bool = False) -> list[list[Path]]:
    """Groups (size >= 2) of images that are pixel-exact copies, rotations or mirror images.

    Example:
        >>> find_duplicate_groups(sorted(Path("pg").glob("*.png")))  # doctest: +SKIP
        [[PosixPath('pg/PG (1).png'), PosixPath('pg/PG (2).png')], ...]
    """
    return find_duplicates(scan_images(paths, progress=progress), progress=progress).groups


# ---- what is audited ---------------------------------------------------------------------


@dataclass
class AuditSource:
    """The images of a dataset folder with their class and (for a split folder) split."""

    data_dir: Path
    layout: str  # "kaggle", "class-folders" or "split"
    class_root: Path
    paths: list[Path] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    non_images: list[Path] = field(default_factory=list)


def discover_source(data_dir: str | os.PathLike) -> AuditSource:
    """Find the images of a class-folder source, a Kaggle download or a split folder.

    Example:
        >>> src = discover_source("split")  # doctest: +SKIP
        >>> src.layout, sorted(set(src.splits))  # doctest: +SKIP
        ('split', ['test', 'train', 'val'])
    """
    from crystalscope.data.split import collect_class_files, find_split_folders, resolve_source_root

    data_dir = Path(data_dir)
    root = resolve_source_root(data_dir)
    split_folders = find_split_folders(root)
    layout = "split" if split_folders else ("kaggle" if root != data_dir else "class-folders")
    source = AuditSource(data_dir=data_dir, layout=layout, class_root=root)
    folders = split_folders or {None: root}
    for split_name, folder in sorted(folders.items(), key=lambda kv: str(kv[0])):
        found = collect_class_files(folder)
        source.non_images.extend(found.non_images)
        for class_name, files in found.files.items():
            source.paths.extend(files)
            source.classes.extend([class_name] * len(files))
            source.splits.extend([split_name] * len(files))
    if not source.paths:
        raise CrystalscopeError(
            f"no images found in '{data_dir}': expected class folders (e.g. cex/, pg/), the Kaggle "
            "root (cropped/cropped/...) or a split folder (train/val/test/<class>/)")
    return source


# ---- statistics and the metadata-only baseline -------------------------------------------


def _describe(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "max": float(array.max()),
            "mean": round(float(array.mean()), 3), "std": round(float(array.std()), 3)}


def class_statistics(records: Sequence[ImageRecord], classes: Sequence[str]) -> dict[str, dict]:
    """Per class: width, height, aspect (w/h), mean and std intensity, most common sizes."""
    stats: dict[str, dict] = {}
    for class_name in sorted(set(classes)):
        rows = [r for r, c in zip(records, classes) if c == class_name and r.readable]
        if not rows:
            continue
        sizes = Counter(f"{r.width}x{r.height}" for r in rows)
        stats[class_name] = {
            "n": len(rows),
            "width": _describe([r.width for r in rows]),
            "height": _describe([r.height for r in rows]),
            "aspect": _describe([r.width / r.height for r in rows]),
            "mean_intensity": _describe([r.mean_intensity for r in rows]),
            "std_intensity": _describe([r.std_intensity for r in rows]),
            "most_common_sizes": [{"size": s, "fraction": round(n / len(rows), 4)}
                                  for s, n in sizes.most_common(3)],
        }
    return stats


METADATA_FEATURES = ("width", "height", "aspect", "mean_intensity", "std_intensity")


def metadata_baseline(records: Sequence[ImageRecord], classes: Sequence[str],
                      groups: Sequence[str], seed: int = 0) -> dict:
    """Cross-validated accuracy of a depth-4 decision tree that sees only image metadata.

    Folds never split a duplicate group (``groups``), so a crystal's views cannot help each
    other. A score far above chance means size or brightness alone reveals the class: a
    shortcut a CNN can learn instead of the crystal's shape. "Far above" is defined as more
    than halfway from chance to perfect (0.75 for two balanced classes).

    Example:
        >>> metadata_baseline(records, classes, groups)["accuracy"]  # doctest: +SKIP
        0.998
    """
    require("sklearn", "train")
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    rows = [(r, c, g) for r, c, g in zip(records, classes, groups) if r.readable]
    labels = sorted({c for _, c, _ in rows})
    result = {"model": "decision tree (max_depth=4)", "features": list(METADATA_FEATURES),
              "accuracy": None, "accuracy_std": None, "chance_accuracy": None, "cv_folds": 0,
              "shortcut_warning": False, "message": ""}
    groups_per_class = [len({g for _, c, g in rows if c == label}) for label in labels]
    folds = min([5] + groups_per_class)
    if len(labels) < 2 or folds < 2:
        result["message"] = "not computed: needs two classes with at least two independent images each"
        return result
    x = np.array([[r.width, r.height, r.width / r.height, r.mean_intensity, r.std_intensity]
                  for r, _, _ in rows])
    y = np.array([labels.index(c) for _, c, _ in rows])
    model = DecisionTreeClassifier(max_depth=4, random_state=seed)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, x, y, groups=[g for _, _, g in rows], cv=cv)
    chance = float(np.bincount(y).max() / len(y))
    accuracy = float(scores.mean())
    importances = model.fit(x, y).feature_importances_
    threshold = chance + 0.5 * (1.0 - chance)
    result.update(accuracy=round(accuracy, 4), accuracy_std=round(float(scores.std()), 4),
                  chance_accuracy=round(chance, 4), cv_folds=folds, warning_threshold=round(threshold, 4),
                  feature_importance={f: round(float(v), 4) for f, v in zip(METADATA_FEATURES, importances)})
    top = max(result["feature_importance"], key=result["feature_importance"].get)
    if accuracy >= threshold:
        result["shortcut_warning"] = True
        result["message"] = (f"SHORTCUT WARNING: image metadata alone (mostly {top}) predicts the class "
                             f"with {accuracy:.2%} accuracy (chance {chance:.1%}): a model may learn "
                             "this instead of the crystal's shape, and test metrics will not show it.")
    else:
        result["message"] = (f"metadata alone predicts the class with {accuracy:.1%} accuracy "
                             f"(chance {chance:.1%}): no strong shortcut")
    return result


# ---- plots -------------------------------------------------------------------------------


def plot_sizes(records: Sequence[ImageRecord], classes: Sequence[str], out_png: Path) -> None:
    """Width x height per class; marker area grows with the number of images of that size."""
    matplotlib = require("matplotlib", "train")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    per_class = {name: Counter((r.width, r.height) for r, c in zip(records, classes)
                               if c == name and r.readable) for name in sorted(set(classes))}
    largest = max((n for sizes in per_class.values() for n in sizes.values()), default=1)
    colour = {name: f"C{i}" for i, name in enumerate(per_class)}  # same colours as plot_intensity
    # classes with few distinct sizes (e.g. every CEX crop 151 x 151) are drawn last, on top
    for class_name, sizes in sorted(per_class.items(), key=lambda kv: -len(kv[1])):
        if not sizes:
            continue
        xy = np.array(list(sizes))
        counts = np.array(list(sizes.values()), dtype=float)
        ax.scatter(xy[:, 0], xy[:, 1], s=10 + 250 * np.sqrt(counts / largest), alpha=0.5,
                   color=colour[class_name],
                   label=f"{class_name}: {int(counts.sum())} images, {len(sizes)} distinct sizes")
        (w, h), n = sizes.most_common(1)[0]
        if n / counts.sum() >= 0.2:
            ax.annotate(f"{w}x{h}: {n}", (w, h), textcoords="offset points", xytext=(8, -12), fontsize=8)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image size per class")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_intensity(records: Sequence[ImageRecord], classes: Sequence[str], out_png: Path) -> None:
    """Grey-level distribution per class (all pixels of the class pooled, normalised)."""
    matplotlib = require("matplotlib", "train")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    centres = (np.arange(HISTOGRAM_BINS) + 0.5) * 256 / HISTOGRAM_BINS
    for i, class_name in enumerate(sorted(set(classes))):
        hists = [r.histogram for r, c in zip(records, classes) if c == class_name and r.readable]
        if not hists:
            continue
        pooled = np.sum(hists, axis=0).astype(float)
        ax.plot(centres, pooled / pooled.sum(), label=class_name, color=f"C{i}")
    ax.set_xlabel("grey level (luma)")
    ax.set_ylabel("fraction of pixels")
    ax.set_yscale("log")
    ax.set_title("Intensity histogram per class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ---- the audit ---------------------------------------------------------------------------


AUDIT_FILES = ("audit.json", "audit.md", "sizes.png", "intensity.png")


def default_audit_dir(data_dir: str | os.PathLike) -> Path:
    """``./audit-<name of DATA_DIR>``: outside the data, so a report never becomes a class folder."""
    return Path.cwd() / f"audit-{Path(data_dir).resolve().name}"


def _check_out_dir(out_dir: Path, source: AuditSource) -> None:
    from crystalscope.safety import check_output

    out = out_dir.resolve()
    if source.layout != "split" and out.is_relative_to(source.class_root.resolve()):
        raise CrystalscopeError(
            f"--out '{out_dir}' is inside the class folders of '{source.data_dir}', where it would be "
            "read as a class next time: choose a folder outside it")
    # an earlier audit (nothing but the files an audit writes) is replaced, as documented;
    # a folder holding anything else is refused, never emptied
    check_output(out_dir, inputs=[source.data_dir], kind="folder", force=True, owned=AUDIT_FILES)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _group_ids(paths: Sequence[Path], groups: Sequence[Sequence[Path]]) -> list[str]:
    group_of = {p: f"dup:{i}" for i, g in enumerate(groups) for p in g}
    return [group_of.get(p, f"file:{p}") for p in paths]


def audit_dataset(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  progress: bool = True, workers: int | None = None) -> dict:
    """Audit a dataset folder and write ``audit.json``, ``audit.md`` and two plots.

    Args:
        data_dir: class folders, the Kaggle root or a split folder (train/val/test/<class>).
        out_dir: report folder; default ``./audit-<name of data_dir>``. An earlier audit there
            is replaced (atomically); any other non-empty folder is refused.
        progress: show progress bars.
        workers: decoding processes (default: all cores, at most 8).

    Returns:
        The dict written to ``audit.json`` (paths relative to ``data_dir``).

    Example:
        >>> result = audit_dataset("split", out_dir="audit-split", progress=False)  # doctest: +SKIP
        >>> result["metadata_baseline_accuracy"], len(result["cross_split_groups"])  # doctest: +SKIP
        (0.9995, 0)
    """
    from crystalscope.io import atomic_dir, write_json, write_text
    from crystalscope.safety import claim_output

    started = time.perf_counter()
    source = discover_source(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_audit_dir(data_dir)
    _check_out_dir(out_dir, source)
    workers = default_workers() if workers is None else workers
    timings: dict[str, float] = {}
    records = scan_images(source.paths, progress=progress, workers=workers)
    timings["decode_and_hash_s"] = time.perf_counter() - started
    duplicates = find_duplicates(records, progress=progress, workers=workers)
    timings["duplicates_s"] = time.perf_counter() - started - timings["decode_and_hash_s"]
    group_ids = _group_ids(source.paths, duplicates.groups)
    baseline = metadata_baseline(records, source.classes, group_ids)
    timings["metadata_baseline_s"] = time.perf_counter() - started - sum(timings.values())
    result = _assemble(source, records, duplicates, baseline)
    result["out_dir"] = str(out_dir)
    result["workers"] = workers
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    with claim_output(out_dir, inputs=[source.data_dir], kind="folder", force=True, owned=AUDIT_FILES), \
            atomic_dir(out_dir, force=True) as staging:
        plot_sizes(records, source.classes, staging / "sizes.png")
        plot_intensity(records, source.classes, staging / "intensity.png")
        result["run_time_s"] = round(time.perf_counter() - started, 2)
        write_json(staging / "audit.json", result)
        write_text(staging / "audit.md", audit_markdown(result))
    return result


def _assemble(source: AuditSource, records: Sequence[ImageRecord], duplicates: DuplicateReport,
              baseline: dict) -> dict:
    """The audit.json content, paths relative to the audited folder."""
    def rel(path: Path) -> str:
        return _relative(path, source.data_dir)

    split_of = dict(zip(source.paths, source.splits))
    class_of = dict(zip(source.paths, source.classes))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for class_name, split_name in zip(source.classes, source.splits):
        counts[split_name or "all"][class_name] += 1
    cross = [g for g in duplicates.groups if len({split_of[p] for p in g}) > 1]
    in_groups = {p for g in duplicates.groups for p in g}
    per_class = {}
    for class_name in sorted(set(source.classes)):
        groups = [g for g in duplicates.groups if class_of[g[0]] == class_name]
        n_files = source.classes.count(class_name)
        n_grouped = sum(len(g) for g in groups)
        per_class[class_name] = {"groups": len(groups), "files_in_groups": n_grouped,
                                 "independent_images": n_files - n_grouped + len(groups)}
    return {
        "data_dir": str(source.data_dir.resolve()),
        "layout": source.layout,
        "n_images": len(records),
        "n_readable": sum(r.readable for r in records),
        "classes": sorted(set(source.classes)),
        "counts": {split: dict(sorted(c.items())) for split, c in sorted(counts.items())},
        "unreadable": [rel(r.path) for r in records if not r.readable],
        "unreadable_errors": {rel(r.path): r.error for r in records if not r.readable},
        "non_image_files": [rel(p) for p in source.non_images],
        "duplicate_groups": [[rel(p) for p in g] for g in duplicates.groups],
        "exact_duplicate_groups": [[rel(p) for p in g] for g in duplicates.exact_groups],
        "duplicate_summary": {
            "groups": len(duplicates.groups),
            "files_in_groups": len(in_groups),
            "group_sizes": {str(k): v for k, v in sorted(Counter(map(len, duplicates.groups)).items())},
            "per_class": per_class,
            "candidate_pairs": duplicates.n_candidate_pairs,
            "near_miss_pairs": duplicates.n_near_miss_pairs,
            "decoded_again_for_verification": duplicates.n_decoded_again,
        },
        "near_miss_examples": [[rel(a), rel(b), bits] for a, b, bits in duplicates.near_misses],
        "cross_split_groups": [[rel(p) for p in g] for g in cross],
        "cross_split_summary": _leakage_summary(cross, split_of),
        "cross_split_examples": [{rel(p): split_of[p] for p in g} for g in cross[:10]],
        "mixed_class_groups": [[rel(p) for p in g] for g in duplicates.groups
                               if len({class_of[p] for p in g}) > 1],
        "class_stats": class_statistics(records, source.classes),
        "metadata_baseline_accuracy": baseline["accuracy"],
        "metadata_baseline": baseline,
        "shortcut_warning": baseline["shortcut_warning"],
    }


def _leakage_summary(cross: Sequence[Sequence[Path]], split_of: dict[Path, str | None]) -> dict:
    """How many files of each split share a duplicate group with another split."""
    files_by_split: Counter = Counter(split_of[p] for g in cross for p in g)
    test_with_train_copy = sum(1 for g in cross for p in g if split_of[p] == "test"
                               and any(split_of[q] == "train" for q in g))
    return {"groups": len(cross), "files_by_split": dict(sorted(files_by_split.items())),
            "test_files_with_a_copy_in_train": test_with_train_copy}


def summary_lines(result: dict) -> list[str]:
    """The audit's findings as short plain-text lines (terminal and audit.md share them)."""
    dup = result["duplicate_summary"]
    lines = [f"{result['n_images']} images ({result['layout']} layout), "
             f"{len(result['unreadable'])} unreadable, {len(result['non_image_files'])} non-image files"]
    lines.append(f"duplicate groups (exact, rotated or mirrored; pixel-verified): {dup['groups']} "
                 f"holding {dup['files_in_groups']} files; {len(result['exact_duplicate_groups'])} "
                 "groups of identical copies")
    for class_name, c in dup["per_class"].items():
        lines.append(f"  {class_name}: {c['groups']} groups, {c['files_in_groups']} files in groups, "
                     f"{c['independent_images']} independent images")
    if dup["near_miss_pairs"]:
        lines.append(f"{dup['near_miss_pairs']} look-alike pairs differ in pixels: not counted as duplicates")
    if result["layout"] == "split":
        n_cross = len(result["cross_split_groups"])
        leaked = result["cross_split_summary"]["test_files_with_a_copy_in_train"]
        lines.append(f"LEAKAGE WARNING: {n_cross} duplicate groups span more than one split; "
                     f"{leaked} test files have a rotated/mirrored/identical copy in train" if n_cross
                     else "no duplicate group spans more than one split (no leakage found)")
    if result["mixed_class_groups"]:
        lines.append(f"LABEL WARNING: {len(result['mixed_class_groups'])} duplicate groups carry "
                     "more than one class label")
    lines.append(result["metadata_baseline"]["message"])
    return lines


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def audit_markdown(result: dict) -> str:
    """A human-readable report of an audit result (the content of ``audit.md``)."""
    classes = result["classes"]
    lines = [f"# Dataset audit: `{result['data_dir']}`", ""]
    lines += [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}"
              for line in summary_lines(result)]
    lines += ["", "## Counts", ""]
    lines += _markdown_table(["split"] + classes + ["total"],
                             ([split] + [c.get(k, 0) for k in classes] + [sum(c.values())]
                              for split, c in result["counts"].items()))
    lines += ["", "## Duplicates", "",
              "Candidates come from a dihedral perceptual hash; every group below was verified pixel "
              "by pixel (identical, rotated by 90/180/270 degrees, or mirrored).", ""]
    if len(result["duplicate_groups"]) > 10:
        lines.append(f"The first 10 of {len(result['duplicate_groups'])} groups (all are in audit.json):")
        lines.append("")
    for group in result["duplicate_groups"][:10]:
        lines.append("- " + ", ".join(f"`{p}`" for p in group))
    if not result["duplicate_groups"]:
        lines.append("None found.")
    if result["layout"] == "split":
        lines += ["", "## Leakage: duplicate groups across splits", ""]
        for example in result["cross_split_examples"]:
            lines.append("- " + ", ".join(f"`{p}` ({s})" for p, s in example.items()))
        if not result["cross_split_examples"]:
            lines.append("None found.")
    if result["unreadable"]:
        lines += ["", "## Unreadable files", ""]
        lines += [f"- `{p}`: {e}" for p, e in list(result["unreadable_errors"].items())[:50]]
    lines += ["", "## Per-class statistics", ""]
    rows = []
    for name, s in result["class_stats"].items():
        sizes = ", ".join(f"{m['size']} ({m['fraction']:.1%})" for m in s["most_common_sizes"])
        rows.append([name, s["n"], f"{s['width']['min']:g}-{s['width']['max']:g}",
                     f"{s['height']['min']:g}-{s['height']['max']:g}",
                     f"{s['aspect']['mean']:.3f} ± {s['aspect']['std']:.3f}",
                     f"{s['mean_intensity']['mean']:.1f} ± {s['mean_intensity']['std']:.1f}",
                     f"{s['std_intensity']['mean']:.1f} ± {s['std_intensity']['std']:.1f}", sizes])
    lines += _markdown_table(["class", "n", "width", "height", "aspect w/h", "mean intensity",
                              "std intensity", "most common sizes"], rows)
    base = result["metadata_baseline"]
    lines += ["", "## Metadata-only baseline", "",
              f"{base['model']} on {', '.join(base['features'])}; {base['cv_folds']}-fold cross-validation "
              "that keeps duplicate groups within one fold.", "", base["message"], "",
              "![sizes](sizes.png) ![intensity](intensity.png)", "",
              f"Run time: {result.get('run_time_s', 0):.1f} s with {result['workers']} worker processes."]
    return "\n".join(lines) + "\n"


def print_audit_summary(result: dict, console=None) -> None:
    """Print the counts table and the audit's findings (rich); warnings in bold red."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    classes = result["classes"]
    table = Table(title=f"audit of {result['data_dir']}")
    table.add_column("split")
    for class_name in classes:
        table.add_column(class_name, justify="right")
    for split_name, counts in result["counts"].items():
        table.add_row(split_name, *(str(counts.get(c, 0)) for c in classes))
    console.print(table)
    for line in summary_lines(result):
        style = "bold red" if "WARNING" in line else None
        console.print(line, style=style, markup=False, highlight=False)
    console.print(f"report: {result['out_dir']}/audit.md, audit.json, sizes.png, intensity.png "
                  f"({result['run_time_s']:.1f} s, {result['workers']} workers)", markup=False)
