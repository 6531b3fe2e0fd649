"""The embedding map (``crystalscope embed``): where a model puts each image.

Penultimate features of every image (:func:`~crystalscope.insight.features.extract_features`)
-> PCA to 2-D (UMAP when asked and installed) -> k-means clusters (K given, or the K with the
best silhouette) -> ``embedding.png`` (points coloured by cluster, shaped by true class, a few
thumbnails per cluster, explained variance on the axes), ``embedding.csv``
(``path,true,predicted,cluster,x,y``) and ``embedding.json`` (the numbers).

With a groups CSV (``synth_manifest.csv``'s ``crystal_id`` or ``split.csv``'s ``group``) it also
measures whether the views of one crystal (rotated / mirrored copies) sit together.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from crystalscope.data.layout import collect_class_files, list_images
from crystalscope.errors import CrystalscopeError, require
from crystalscope.insight.features import FeatureSet, extract_features, l2_normalise
from crystalscope.io import write_json, write_text
from crystalscope.runtime import counter
from crystalscope.safety import report_folder

logger = logging.getLogger(__name__)

EMBEDDING_COLUMNS = ("path", "true", "predicted", "cluster", "x", "y")
PROJECTIONS = ("pca", "umap")
MAX_AUTO_CLUSTERS = 8
SILHOUETTE_SAMPLE = 2000  # silhouette is O(N^2): score a seeded sample of a large set
MAX_PAIRWISE = 4000  # view cohesion builds an N x N distance matrix
#: what an embed report folder holds (an earlier one is replaced only with --force)
EMBED_FILES = ("embedding.csv", "embedding.png", "embedding.json")
COMMAND = "embed"  # named in the report's manifest: --force replaces only what an embed wrote


@dataclass
class Projection:
    """2-D map positions and how they were made.

    Attributes:
        coords: ``(N, 2)``.
        method: ``pca`` or ``umap``.
        explained: share of the variance on each PCA axis (None for UMAP).
    """

    coords: np.ndarray
    method: str
    explained: tuple[float, float] | None = None

    def axis_labels(self) -> tuple[str, str]:
        if self.explained is None:
            return f"{self.method.upper()} 1", f"{self.method.upper()} 2"
        return tuple(f"PC{i + 1} ({100 * v:.1f} % of variance)" for i, v in enumerate(self.explained))


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> Projection:
    """Project ``(N, D)`` features to 2-D by PCA (numpy SVD), or UMAP when installed.

    Each PCA axis is signed so its largest loading is positive, so reruns draw the same map.

    Example:
        >>> p = project_2d(np.array([[0.0, 0.0], [2.0, 0.1], [4.0, -0.1]]))
        >>> p.coords.shape, round(p.explained[0], 3)
        ((3, 2), 0.998)
    """
    if method not in PROJECTIONS:
        raise CrystalscopeError(f"--projection {method!r} is not known: use {' or '.join(PROJECTIONS)}")
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 3:
        raise CrystalscopeError(f"a map needs at least 3 images, got {len(x)}")
    if method == "umap":
        umap = require("umap", "insight")  # optional: `pip install umap-learn`
        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
        return Projection(np.asarray(coords, dtype=np.float64), "umap")
    centred = x - x.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:2]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    coords = centred @ components.T
    if coords.shape[1] < 2:  # a single feature: put everything on the x axis
        coords = np.column_stack([coords, np.zeros(len(coords))])
    variance = singular ** 2
    total = float(variance.sum()) or 1.0
    explained = tuple(float(v / total) for v in np.concatenate([variance[:2], np.zeros(2)])[:2])
    return Projection(coords, "pca", explained)


def cluster_features(features: np.ndarray, k: int | None = None, seed: int = 0) -> dict:
    """k-means clusters; with ``k=None`` the K in 2..8 with the best silhouette score.

    Returns:
        ``{"labels": (N,) int, "k": int, "silhouette": {K: score}}`` (scores of the tried K).

    Example:
        >>> x = np.r_[np.zeros((5, 2)), np.ones((5, 2)) * 10] + np.random.default_rng(0).normal(0, .1, (10, 2))
        >>> cluster_features(x)["k"]
        2
    """
    require("sklearn", "insight")
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if k is not None and not 1 <= k <= n:
        raise CrystalscopeError(f"--clusters {k}: must be between 1 and the number of images ({n})")
    candidates = [k] if k is not None else list(range(2, min(MAX_AUTO_CLUSTERS, n - 1) + 1)) or [1]
    scores, labels = {}, {}
    for candidate in candidates:
        labels[candidate] = KMeans(n_clusters=candidate, n_init=10, random_state=seed).fit_predict(x)
        if 1 < len(set(labels[candidate])) < n:
            scores[candidate] = float(silhouette_score(x, labels[candidate], sample_size=min(n, SILHOUETTE_SAMPLE),
                                                       random_state=seed))
    best = k if k is not None else (max(scores, key=scores.get) if scores else candidates[0])
    return {"labels": np.asarray(labels[best], dtype=int), "k": int(best), "silhouette": scores}


def labelled_images(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Image files under ``folder`` and their true class ('' when the folder has no class folders).

    A folder whose images all sit in sub-folders is read as class folders (the lower-cased
    sub-folder name is the true class, as in training); otherwise no file has a true class.

    Example:
        >>> files, truth = labelled_images("split/test")  # doctest: +SKIP
        >>> sorted(set(truth))  # doctest: +SKIP
        ['cex', 'pg']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CrystalscopeError(f"{folder}: folder not found")
    files = list_images(folder)
    if not files:
        raise CrystalscopeError(f"{folder}: no image files found (png, jpg, jpeg, tif, tiff, bmp)")
    per_class = collect_class_files(folder).files
    if per_class and sum(len(v) for v in per_class.values()) == len(files):
        pairs = [(f, name) for name, found in per_class.items() for f in found]
        return [f for f, _ in pairs], [name for _, name in pairs]
    return files, [""] * len(files)


def read_groups(groups_csv: str | os.PathLike, paths: Sequence[str]) -> list[str]:
    """The group of each path from a CSV with ``path`` and ``crystal_id`` or ``group`` columns.

    Rows are matched by file name (``PG (12).png``), which is unique within the synthetic
    set and the Kaggle folders; a path without a row gets ``''`` (no group).

    Example:
        >>> read_groups("data/synth_manifest.csv", ["split/test/pg/PG (7).png"])  # doctest: +SKIP
        ['pg-0001']
    """
    path = Path(groups_csv)
    if not path.is_file():
        raise CrystalscopeError(f"--groups {path}: file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        column = next((c for c in ("crystal_id", "group") if c in columns), None)
        if "path" not in columns or column is None:
            raise CrystalscopeError(f"--groups {path}: needs a 'path' column and a 'crystal_id' or 'group' column "
                                    f"(found {', '.join(columns) or 'none'})")
        by_name = {Path(row["path"]).name: row[column] or "" for row in reader}
    return [by_name.get(Path(p).name, "") for p in paths]


def view_cohesion(points: np.ndarray, groups: Sequence[str], metric: str = "cosine") -> dict | None:
    """Do members of one group (views of one crystal) sit closer together than random pairs?

    Returns ``None`` when no group has two members; else the mean distance within groups and
    between all pairs, their ratio, and how often an image's nearest neighbour is in its own
    group (with the rate chance alone would give).

    Example:
        >>> pts = np.array([[0, 0], [0, .1], [5, 5], [5, 5.1]])
        >>> view_cohesion(pts, ["a", "a", "b", "b"], metric="euclidean")["nearest_same_group"]
        1.0
    """
    groups = np.asarray(groups, dtype=object)
    if len(groups) > MAX_PAIRWISE:  # seeded sample, drawn whole groups at a time would be nicer but slower
        keep = np.sort(np.random.default_rng(0).choice(len(groups), MAX_PAIRWISE, replace=False))
        points, groups = np.asarray(points)[keep], groups[keep]
    if metric == "cosine":
        unit = l2_normalise(points)
        distance = 1.0 - unit @ unit.T
    else:
        diff = np.asarray(points, dtype=np.float64)[:, None, :] - np.asarray(points, dtype=np.float64)[None]
        distance = np.sqrt((diff ** 2).sum(-1))
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] != "")
    np.fill_diagonal(same, False)
    if not same.any():
        return None
    upper = np.triu(np.ones_like(same), k=1)
    within = float(distance[same & upper].mean())
    overall = float(distance[upper].mean())
    grouped = same.any(axis=1)
    np.fill_diagonal(distance, np.inf)
    nearest = distance.argmin(axis=1)
    return {"metric": metric, "n_groups": int(len({g for g, s in zip(groups, grouped) if s})),
            "n_images_in_groups": int(grouped.sum()), "within_group_mean": within, "all_pairs_mean": overall,
            "ratio": within / overall if overall else float("nan"),
            "nearest_same_group": float(same[np.arange(len(groups)), nearest][grouped].mean()),
            "nearest_same_group_chance": float((same.sum(axis=1)[grouped] / (len(groups) - 1)).mean())}


# ---- the `embed` command ------------------------------------------------------------------


def _embedding_csv(fs: FeatureSet, truth: Sequence[str], labels: np.ndarray, coords: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EMBEDDING_COLUMNS)
    for path, true, predicted, cluster, (x, y) in zip(fs.paths, truth, fs.predicted, labels, coords):
        writer.writerow([path, true, predicted, int(cluster), f"{x:.6f}", f"{y:.6f}"])
    return buffer.getvalue()


def _counts(values: Sequence[str]) -> dict[str, int]:
    return {v: int(n) for v, n in zip(*np.unique(np.asarray(values, dtype=str), return_counts=True)) if v}


def _representatives(features: np.ndarray, labels: np.ndarray, per_cluster: int) -> dict[int, list[int]]:
    """Per cluster, ``per_cluster`` members from the nearest its centre to the farthest.

    Evenly spaced along the distance ranking rather than the nearest few: those are often views
    of one crystal, while the spread shows what the cluster holds at its edge too.
    """
    chosen = {}
    for cluster in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == cluster)
        centre = features[members].mean(axis=0)
        order = np.argsort(((features[members] - centre) ** 2).sum(axis=1), kind="stable")
        picks = np.unique(np.linspace(0, len(order) - 1, min(per_cluster, len(order))).round().astype(int))
        chosen[cluster] = members[order[picks]].tolist()
    return chosen


def _cluster_sheet(fs: FeatureSet, truth: Sequence[str], chosen: dict[int, list[int]], per_cluster: int):
    """One contact sheet: a row of typical images per cluster, framed in the cluster's colour."""
    from crystalscope.evaluation.sheets import Tile, contact_sheet, load_thumbnail
    from crystalscope.insight.plots import colour_of

    tiles = []
    for cluster, indices in chosen.items():
        for i in range(per_cluster):
            if i >= len(indices):
                tiles.append(Tile(None, "", colour=(255, 255, 255)))  # keeps one row per cluster
                continue
            index = indices[i]
            what = f"pred {fs.predicted[index]}" + (f" / true {truth[index]}" if truth[index] else "")
            tiles.append(Tile(load_thumbnail(fs.paths[index], 96), f"cluster {cluster}\n{what}",
                              colour=colour_of(cluster)))
    return contact_sheet(tiles, columns=per_cluster, cell=112)


def embed_folder(model: str | os.PathLike, folder: str | os.PathLike, out_dir: str | os.PathLike, *,
                 clusters: int | None = None, projection: str = "pca", groups_csv: str | os.PathLike | None = None,
                 per_cluster: int = 4, batch_size: int = 32, device: str = "auto", seed: int = 0,
                 on_progress: Callable[[int, int], None] | None = None, force: bool = False) -> dict:
    """Write ``embedding.png``, ``embedding.csv`` and ``embedding.json`` for every image in ``folder``.

    Args:
        model: a ``.ckpt`` or ``.onnx`` crystalscope model (its penultimate features are mapped).
        folder: images, or class folders of images (then the true class is known).
        out_dir: report folder, built beside and swapped in when complete; an earlier embed
            report there is replaced only with ``force`` (:func:`crystalscope.safety.report_folder`).
        clusters: k-means K (None: the K in 2..8 with the best silhouette).
        projection: ``pca`` or ``umap`` (needs ``umap-learn``).
        groups_csv: optional ``synth_manifest.csv`` / ``split.csv``: measure whether the views of
            one crystal sit together (``view_cohesion`` in the summary).
        per_cluster: thumbnails per cluster on the map.
        on_progress: called with ``(done, total)`` images after each batch.

    Returns:
        The summary written to ``embedding.json``.

    Example:
        >>> s = embed_folder("run/model.onnx", "split/test", "embed-test")  # doctest: +SKIP
        >>> s["clusters"]["k"], s["projection"]["explained"]  # doctest: +SKIP
        (2, [0.81, 0.06])
    """
    from crystalscope.inference.predictor import Predictor

    # claimed before the work: a refused --out costs nothing, and no second writer starts
    with report_folder(out_dir, inputs=[model, folder, groups_csv], command=COMMAND, force=force) as staging:
        files, truth_of = labelled_images(folder)
        truth_by_path = dict(zip(map(str, files), truth_of))
        predictor = Predictor.load(model, device=device)
        fs = extract_features(predictor, files, batch_size=batch_size, on_batch=counter(on_progress, len(files)))
        truth = [truth_by_path[p] for p in fs.paths]
        mapped = project_2d(fs.features, projection, seed)
        clustering = cluster_features(fs.features, clusters, seed)
        chosen = _representatives(fs.features, clustering["labels"], per_cluster)
        return _write_embedding(staging, model, folder, fs, truth, mapped, clustering, chosen,
                                clusters, groups_csv, per_cluster)


def _write_embedding(out_dir: Path, model, folder, fs: FeatureSet, truth, mapped: Projection, clustering: dict,
                     chosen: dict, clusters, groups_csv, per_cluster: int) -> dict:
    from crystalscope.insight.plots import Panel, colour_of, map_figure

    labels = clustering["labels"]
    write_text(out_dir / "embedding.csv", _embedding_csv(fs, truth, labels, mapped.coords))
    names = {c: f"cluster {c} (n={int((labels == c).sum())})" for c in sorted(set(labels.tolist()))}
    ring = np.zeros(len(labels), dtype=bool)
    ring[[i for indices in chosen.values() for i in indices]] = True
    xlabel, ylabel = mapped.axis_labels()
    map_figure(mapped.coords, [names[c] for c in labels], out_dir / "embedding.png",
               colours={names[c]: colour_of(c) for c in names}, marker_keys=truth if any(truth) else None,
               ring=ring, ring_label="shown on the right", xlabel=xlabel, ylabel=ylabel,
               panels=[Panel("images of each cluster, from nearest to farthest from its centre",
                             _cluster_sheet(fs, truth, chosen, per_cluster))],
               title=f"{Path(model).name}: penultimate features of {len(fs.paths)} images in {folder}, "
                     f"{mapped.method.upper()}, k-means k={clustering['k']}", height=max(7.5, 1.3 * len(names)))
    summary = _embed_summary(model, folder, fs, truth, mapped, clustering, clusters, groups_csv)
    write_json(out_dir / "embedding.json", summary)
    return summary


def _embed_summary(model, folder, fs: FeatureSet, truth, mapped: Projection, clustering: dict, given_k,
                   groups_csv) -> dict:
    labels = clustering["labels"]
    predicted = fs.predicted
    composition = [{"cluster": int(c), "n": int((labels == c).sum()),
                    "true": _counts([t for t, lab in zip(truth, labels) if lab == c]),
                    "predicted": _counts([p for p, lab in zip(predicted, labels) if lab == c])}
                   for c in sorted(set(labels.tolist()))]
    cohesion = None
    if groups_csv is not None:
        groups = read_groups(groups_csv, fs.paths)
        cohesion = {"groups_csv": str(groups_csv),
                    "features": view_cohesion(fs.features, groups, "cosine"),
                    "map": view_cohesion(mapped.coords, groups, "euclidean")}
    labelled = [(t, p) for t, p in zip(truth, predicted) if t]
    return {"model": str(model), "features": fs.source, "folder": str(folder), "n_images": len(fs.paths),
            "feature_dim": int(fs.features.shape[1]), "unreadable": fs.errors,
            "accuracy": (sum(t == p for t, p in labelled) / len(labelled)) if labelled else None,
            "projection": {"method": mapped.method, "explained": list(mapped.explained) if mapped.explained else None},
            "clusters": {"k": clustering["k"], "chosen_by": "given" if given_k else "silhouette",
                         "silhouette": {str(k): v for k, v in clustering["silhouette"].items()},
                         "composition": composition},
            "view_cohesion": cohesion, "files": ["embedding.png", "embedding.csv", "embedding.json"]}
