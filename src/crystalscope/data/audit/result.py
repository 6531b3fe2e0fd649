"""The audit's result as typed dataclasses; ``to_json`` gives the content of ``audit.json``.

Paths are strings relative to the audited folder (as in ``audit.json``). The JSON keys and their
order are a contract with users' scripts: change them only with a note in docs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from crystalscope.data.audit.duplicates import DuplicateReport
from crystalscope.data.audit.fingerprint import ImageRecord
from crystalscope.data.audit.source import AuditSource
from crystalscope.data.audit.statistics import ClassStats, MetadataBaseline, class_statistics


@dataclass
class DuplicateSummary:
    """Counts of the verified duplicate groups (``duplicate_summary`` in audit.json)."""

    groups: int
    files_in_groups: int
    group_sizes: dict[str, int]  # group size (as text) -> number of groups
    per_class: dict[str, dict[str, int]]  # class -> groups, files_in_groups, independent_images
    candidate_pairs: int
    near_miss_pairs: int
    decoded_again_for_verification: int


@dataclass
class LeakageSummary:
    """How many files of each split share a duplicate group with another split."""

    groups: int
    files_by_split: dict[str, int]
    test_files_with_a_copy_in_train: int


@dataclass
class AuditResult:
    """Everything an audit found; :meth:`to_json` is the content of ``audit.json``.

    Example:
        >>> result = audit_dataset("split", out_dir="audit-split", progress=False)  # doctest: +SKIP
        >>> result.metadata_baseline.accuracy, len(result.cross_split_groups)  # doctest: +SKIP
        (0.9995, 0)
    """

    data_dir: str
    layout: str  # "kaggle", "class-folders" or "split"
    n_images: int
    n_readable: int
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split ("all" when not a split) -> class -> files
    unreadable: list[str]
    unreadable_errors: dict[str, str]
    non_image_files: list[str]
    duplicate_groups: list[list[str]]  # identical, rotated or mirrored; pixel-verified
    exact_duplicate_groups: list[list[str]]  # identical as stored
    duplicate_summary: DuplicateSummary
    near_miss_examples: list[list]  # [path a, path b, differing hash bits]
    cross_split_groups: list[list[str]]
    cross_split_summary: LeakageSummary
    cross_split_examples: list[dict[str, str]]  # path -> split, first 10 groups
    mixed_class_groups: list[list[str]]
    class_stats: ClassStats
    metadata_baseline: MetadataBaseline
    out_dir: str = ""
    workers: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    run_time_s: float = 0.0

    @property
    def shortcut_warning(self) -> bool:
        return self.metadata_baseline.shortcut_warning

    def to_json(self) -> dict:
        """The ``audit.json`` content, keys in their documented order."""
        data = {}
        for name, value in self.__dict__.items():
            if name == "metadata_baseline":
                data["metadata_baseline_accuracy"] = value.accuracy
                data["metadata_baseline"] = value.to_json()
                data["shortcut_warning"] = value.shortcut_warning
            else:
                data[name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return data


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _per_class(source: AuditSource, groups: Sequence[Sequence[Path]]) -> dict[str, dict[str, int]]:
    class_of = dict(zip(source.paths, source.classes))
    per_class = {}
    for class_name in sorted(set(source.classes)):
        in_class = [g for g in groups if class_of[g[0]] == class_name]
        n_files = source.classes.count(class_name)
        n_grouped = sum(len(g) for g in in_class)
        per_class[class_name] = {"groups": len(in_class), "files_in_groups": n_grouped,
                                 "independent_images": n_files - n_grouped + len(in_class)}
    return per_class


def _duplicate_summary(source: AuditSource, duplicates: DuplicateReport) -> DuplicateSummary:
    return DuplicateSummary(
        groups=len(duplicates.groups),
        files_in_groups=len({p for g in duplicates.groups for p in g}),
        group_sizes={str(k): v for k, v in sorted(Counter(map(len, duplicates.groups)).items())},
        per_class=_per_class(source, duplicates.groups),
        candidate_pairs=duplicates.n_candidate_pairs,
        near_miss_pairs=duplicates.n_near_miss_pairs,
        decoded_again_for_verification=duplicates.n_decoded_again)


def _leakage_summary(cross: Sequence[Sequence[Path]], split_of: dict[Path, str | None]) -> LeakageSummary:
    files_by_split: Counter = Counter(split_of[p] for g in cross for p in g)
    test_with_train_copy = sum(1 for g in cross for p in g if split_of[p] == "test"
                               and any(split_of[q] == "train" for q in g))
    return LeakageSummary(groups=len(cross), files_by_split=dict(sorted(files_by_split.items())),
                          test_files_with_a_copy_in_train=test_with_train_copy)


def assemble(source: AuditSource, records: Sequence[ImageRecord], duplicates: DuplicateReport,
             baseline: MetadataBaseline) -> AuditResult:
    """The audit's findings, paths relative to the audited folder (run details left at defaults)."""
    def rel(path: Path) -> str:
        return _relative(path, source.data_dir)

    split_of = dict(zip(source.paths, source.splits))
    class_of = dict(zip(source.paths, source.classes))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for class_name, split_name in zip(source.classes, source.splits):
        counts[split_name or "all"][class_name] += 1
    cross = [g for g in duplicates.groups if len({split_of[p] for p in g}) > 1]
    return AuditResult(
        data_dir=str(source.data_dir.resolve()), layout=source.layout,
        n_images=len(records), n_readable=sum(r.readable for r in records),
        classes=sorted(set(source.classes)),
        counts={split: dict(sorted(c.items())) for split, c in sorted(counts.items())},
        unreadable=[rel(r.path) for r in records if not r.readable],
        unreadable_errors={rel(r.path): r.error for r in records if not r.readable},
        non_image_files=[rel(p) for p in source.non_images],
        duplicate_groups=[[rel(p) for p in g] for g in duplicates.groups],
        exact_duplicate_groups=[[rel(p) for p in g] for g in duplicates.exact_groups],
        duplicate_summary=_duplicate_summary(source, duplicates),
        near_miss_examples=[[rel(a), rel(b), bits] for a, b, bits in duplicates.near_misses],
        cross_split_groups=[[rel(p) for p in g] for g in cross],
        cross_split_summary=_leakage_summary(cross, split_of),
        cross_split_examples=[{rel(p): split_of[p] for p in g} for g in cross[:10]],
        mixed_class_groups=[[rel(p) for p in g] for g in duplicates.groups
                            if len({class_of[p] for p in g}) > 1],
        class_stats=class_statistics(records, source.classes),
        metadata_baseline=baseline)
