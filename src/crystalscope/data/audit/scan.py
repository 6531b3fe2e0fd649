"""The fingerprinting pass: every image decoded once, in worker processes, in chunks.

Chunks hold consecutive file names of one class folder, so the views of one crystal usually
share a chunk and are pixel-checked there while their pixels are in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from crystalscope.data.audit import parallel
from crystalscope.data.audit.duplicates import candidate_pairs, find_duplicates, pixel_verdicts
from crystalscope.data.audit.fingerprint import ImageRecord, fingerprint
from crystalscope.data.layout import natural_key
from crystalscope.runtime import run_chunks


def scan_chunk(paths: Sequence[Path]) -> list[ImageRecord]:
    """Worker: decode a chunk and pixel-check its hash candidates while the pixels are here.

    Copies of one crystal usually have consecutive file numbers, so they mostly fall in one
    chunk: the check then costs no second decode.
    """
    scanned = [fingerprint(p) for p in paths]
    records = [record for record, _ in scanned]
    pairs = candidate_pairs(records)
    if pairs:
        verdicts = pixel_verdicts([rgb for _, rgb in scanned], [(a, b) for a, b, _ in pairs])
        for (a, b), verdict in verdicts.items():
            records[a].verified[records[b].path] = verdict
            records[b].verified[records[a].path] = verdict
    return records


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
    chunks = [[paths[i] for i in order[k:k + parallel.CHUNK]]
              for k in range(0, len(order), parallel.CHUNK)]
    results = run_chunks(scan_chunk, chunks, [len(c) for c in chunks], "decoding images", progress, workers,
                         serial_below=parallel.SERIAL_BELOW)
    records: list[ImageRecord] = [None] * len(paths)  # type: ignore[list-item]
    for i, record in zip(order, (r for chunk in results for r in chunk)):
        records[i] = record
    return records


def find_duplicate_groups(paths: Iterable[str | os.PathLike], progress: bool = False) -> list[list[Path]]:
    """Groups (size >= 2) of images that are pixel-exact copies, rotations or mirror images.

    Example:
        >>> find_duplicate_groups(sorted(Path("pg").glob("*.png")))  # doctest: +SKIP
        [[PosixPath('pg/PG (1).png'), PosixPath('pg/PG (2).png')], ...]
    """
    return find_duplicates(scan_images(paths, progress=progress), progress=progress).groups
