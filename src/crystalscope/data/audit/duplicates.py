"""Duplicates: hash candidates, then a pixel-by-pixel check under all 8 rotations/mirrors.

Images of the same size (up to a transpose) whose dihedral hashes are within a few bits of each
other under some rotation/mirror are *candidates*; every candidate pair is compared pixel by
pixel (inside the scanning worker while a chunk's pixels are in memory; pairs from different
chunks are decoded again here), so a hash collision or a near-miss (a few pixels changed) is
never reported as a duplicate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from crystalscope.data.audit import parallel
from crystalscope.data.audit.fingerprint import ImageRecord, dihedral_views
from crystalscope.data.images import ImageReadError, load_rgb
from crystalscope.data.layout import natural_key
from crystalscope.runtime import run_chunks

#: Candidate pairs differ in at most this many of the 64 hash bits (under the best rotation).
PHASH_MAX_DISTANCE = 6
#: ``(same up to rotation/mirror, identical)`` per index pair.
Verdicts = dict[tuple[int, int], tuple[bool, bool]]


@dataclass
class DuplicateReport:
    """Verified duplicate groups plus what the hash proposed but the pixels refused."""

    groups: list[list[Path]] = field(default_factory=list)  # dihedral (incl. exact), size >= 2
    exact_groups: list[list[Path]] = field(default_factory=list)  # identical as stored
    near_misses: list[tuple[Path, Path, int]] = field(default_factory=list)  # (a, b, hash bits)
    n_candidate_pairs: int = 0
    n_near_miss_pairs: int = 0
    n_decoded_again: int = 0  # images decoded a second time to check cross-chunk candidates

    def group_key(self) -> Callable[[Path], str]:
        """``path -> group id``: ``dup:<i>`` for a member of ``groups[i]``, else ``file:<path>``.

        The one grouping ``split --group-by near-duplicates`` and the audit's baseline folds use.

        Example:
            >>> key = DuplicateReport(groups=[[Path("a.png"), Path("b.png")]]).group_key()
            >>> key(Path("b.png")), key(Path("c.png"))
            ('dup:0', 'file:c.png')
        """
        group_of = {p: f"dup:{i}" for i, group in enumerate(self.groups) for p in group}
        return lambda path: group_of.get(path, f"file:{path}")


class UnionFind:
    """Disjoint sets of indices (path halving); the smaller index is a set's root."""

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


def pixel_verdicts(images: Sequence[np.ndarray | None], pairs: Sequence[tuple[int, int]]) -> Verdicts:
    """``(same up to rotation/mirror, identical)`` for each index pair, by comparing pixels."""
    union = UnionFind(len(images))
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


def verify_pairs(job: tuple[list[Path], list[tuple[int, int]]]) -> Verdicts:
    """Worker: decode the images of some candidate pairs again and compare their pixels."""
    paths, pairs = job
    images = []
    for path in paths:
        try:
            images.append(np.asarray(load_rgb(path)))
        except ImageReadError:
            images.append(None)  # changed since the scan: it cannot be verified, so no duplicate
    return pixel_verdicts(images, pairs)


def _verify_again(records: Sequence[ImageRecord], pairs: list[tuple[int, int]], progress: bool,
                  workers: int | None) -> tuple[Verdicts, int]:
    """Pixel verdicts for candidate pairs the scan could not check (different chunks)."""
    union = UnionFind(len(records))
    for a, b in pairs:
        union.union(a, b)
    by_component: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for a, b in pairs:
        by_component[union.find(a)].append((a, b))
    jobs: list[list[tuple[int, int]]] = []
    for component_pairs in by_component.values():  # a component never straddles two jobs
        if not jobs or len({i for pair in jobs[-1] for i in pair}) >= parallel.CHUNK:
            jobs.append([])
        jobs[-1].extend(component_pairs)
    payload, sizes = [], []
    for job in jobs:
        indices = sorted({i for pair in job for i in pair})
        local = {i: k for k, i in enumerate(indices)}
        payload.append(([records[i].path for i in indices], [(local[a], local[b]) for a, b in job]))
        sizes.append(len(indices))
    results = run_chunks(verify_pairs, payload, sizes, "verifying duplicates", progress, workers,
                         serial_below=parallel.SERIAL_BELOW)
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
    verdicts: Verdicts = {}
    for a, b, _ in pairs:
        if records[b].path in records[a].verified:
            verdicts[(a, b)] = records[a].verified[records[b].path]
    unchecked = [(a, b) for a, b, _ in pairs if (a, b) not in verdicts]
    checked_again, n_decoded = _verify_again(records, unchecked, progress, workers) if unchecked else ({}, 0)
    verdicts.update(checked_again)
    report = DuplicateReport(n_candidate_pairs=len(pairs), n_decoded_again=n_decoded)
    dihedral, exact = UnionFind(len(records)), UnionFind(len(records))
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
    in_pairs = {i for a, b, _ in pairs for i in (a, b)}
    report.groups = _components(records, dihedral, in_pairs)
    report.exact_groups = _components(records, exact, in_pairs)
    return report


def _components(records: Sequence[ImageRecord], union: UnionFind, indices: set[int]) -> list[list[Path]]:
    members: dict[int, list[Path]] = defaultdict(list)
    for i in indices:
        members[union.find(i)].append(records[i].path)
    return _sorted_groups(g for g in members.values() if len(g) > 1)
