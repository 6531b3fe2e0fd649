"""Dataset audit: duplicates and their rotations/mirror images, leakage, size shortcuts.

In the real CEX/PG dataset, PG files come as pixel-exact rotated and mirrored views of one
crystal, and the image size alone tells the classes apart. :func:`audit_dataset` finds both:

1. :mod:`.scan` decodes every image once (worker processes, :mod:`.parallel`) into a
   :mod:`.fingerprint` record: size, intensity statistics and a dihedral perceptual hash;
2. :mod:`.duplicates` pairs images whose hashes match under some rotation/mirror and checks
   every pair pixel by pixel, so a hash collision or a near-miss is never a duplicate;
3. verified groups whose members sit in different splits are leakage (:mod:`.result`);
4. :mod:`.statistics` measures how much a classifier that sees only width, height, aspect and
   intensity could learn without looking at the crystal (a shortcut);
5. :mod:`.report` and :mod:`.plots` write ``audit.md``, ``sizes.png`` and ``intensity.png``.

Which folders and files are audited is :mod:`crystalscope.data.layout`'s rule (as for split and
train). Nothing here imports torch; scikit-learn and matplotlib are imported when needed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

from crystalscope.data.audit.duplicates import (PHASH_MAX_DISTANCE, DuplicateReport, candidate_pairs,
                                                find_duplicates, pixel_identical_groups)
from crystalscope.data.audit.fingerprint import ImageRecord, dihedral_phash, dihedral_views
from crystalscope.data.audit.plots import plot_intensity, plot_sizes
from crystalscope.data.audit.report import audit_markdown, summary_lines
from crystalscope.data.audit.result import AuditResult, assemble
from crystalscope.data.audit.scan import find_duplicate_groups, scan_images
from crystalscope.data.audit.source import AuditSource, discover_source
from crystalscope.data.audit.statistics import MetadataBaseline, class_statistics, metadata_baseline
from crystalscope.errors import CrystalscopeError
from crystalscope.io import write_json, write_text
from crystalscope.runtime import default_workers
from crystalscope.safety import check_output, report_folder

__all__ = ["AUDIT_FILES", "PHASH_MAX_DISTANCE", "AuditResult", "AuditSource", "DuplicateReport", "ImageRecord",
           "MetadataBaseline", "audit_dataset", "audit_markdown", "candidate_pairs", "class_statistics",
           "default_audit_dir", "dihedral_phash", "dihedral_views", "discover_source", "find_duplicate_groups",
           "find_duplicates", "metadata_baseline", "pixel_identical_groups", "plot_intensity", "plot_sizes",
           "scan_images", "summary_lines"]

log = logging.getLogger(__name__)

AUDIT_FILES = ("audit.json", "audit.md", "sizes.png", "intensity.png")
COMMAND = "audit"  # named in the report's manifest: a rerun replaces only what an audit wrote


def default_audit_dir(data_dir: str | os.PathLike) -> Path:
    """``./audit-<name of DATA_DIR>``: outside the data, so a report never becomes a class folder.

    Example:
        >>> default_audit_dir("/data/split").name
        'audit-split'
    """
    return Path.cwd() / f"audit-{Path(data_dir).resolve().name}"


def _check_out_dir(out_dir: Path, source: AuditSource) -> None:
    out = out_dir.resolve()
    if source.layout != "split" and out.is_relative_to(source.class_root.resolve()):
        raise CrystalscopeError(
            f"--out '{out_dir}' is inside the class folders of '{source.data_dir}', where it would be "
            "read as a class next time: choose a folder outside it")
    # an earlier audit (nothing but the files an audit writes) is replaced, as documented;
    # a folder holding anything else is refused, never emptied
    check_output(out_dir, inputs=[source.data_dir], kind="folder", force=True, command=COMMAND)


def audit_dataset(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  progress: bool = True, workers: int | None = None) -> AuditResult:
    """Audit a dataset folder and write ``audit.json``, ``audit.md`` and two plots.

    Args:
        data_dir: class folders, the Kaggle root or a split folder (train/val/test/<class>).
        out_dir: report folder; default ``./audit-<name of data_dir>``. An earlier audit there
            is replaced (atomically); any other non-empty folder is refused.
        progress: show progress bars.
        workers: decoding processes (default: all cores, at most 8).

    Returns:
        An :class:`AuditResult`; ``result.to_json()`` is what ``audit.json`` holds.

    Example:
        >>> result = audit_dataset("split", out_dir="audit-split", progress=False)  # doctest: +SKIP
        >>> result.metadata_baseline.accuracy, len(result.cross_split_groups)  # doctest: +SKIP
        (0.9995, 0)
    """
    started = time.perf_counter()
    source = discover_source(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_audit_dir(data_dir)
    _check_out_dir(out_dir, source)
    workers = default_workers(workers)
    timings: dict[str, float] = {}
    records = scan_images(source.paths, progress=progress, workers=workers)
    timings["decode_and_hash_s"] = time.perf_counter() - started
    duplicates = find_duplicates(records, progress=progress, workers=workers)
    timings["duplicates_s"] = time.perf_counter() - started - timings["decode_and_hash_s"]
    group_of = duplicates.group_key()
    baseline = metadata_baseline(records, source.classes, [group_of(p) for p in source.paths])
    timings["metadata_baseline_s"] = time.perf_counter() - started - sum(timings.values())
    log.debug("audit of %s: %d images in %.1f s", data_dir, len(records), time.perf_counter() - started)
    result = assemble(source, records, duplicates, baseline)
    result.out_dir, result.workers = str(out_dir), workers
    result.timings = {k: round(v, 2) for k, v in timings.items()}
    _write_report(out_dir, source, records, result, started)
    return result


def _write_report(out_dir: Path, source: AuditSource, records: Sequence[ImageRecord], result: AuditResult,
                  started: float) -> None:
    """The four report files, built in a staging folder and swapped in complete."""
    with report_folder(out_dir, inputs=[source.data_dir], command=COMMAND, force=True) as staging:
        plot_sizes(records, source.classes, staging / "sizes.png")
        plot_intensity(records, source.classes, staging / "intensity.png")
        result.run_time_s = round(time.perf_counter() - started, 2)
        write_json(staging / "audit.json", result.to_json())
        write_text(staging / "audit.md", audit_markdown(result))
