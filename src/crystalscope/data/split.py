"""A reproducible, stratified, leakage-aware train/val/test split that never touches the source.

The reference study's split *moves* files out of the download, destroying its layout, and
splits file by file, so rotated and mirrored views of one PG crystal land in both train and
test. :func:`split_dataset` copies (or links) files into ``OUT_DIR/{train,val,test}/<class>/``,
keeps every *group* of files in one split, and writes ``split.csv`` so the assignment can be
inspected and reproduced.

A group key is any function ``path -> group id``: the default groups pixel-exact duplicates
and their rotations/mirror images (found by :mod:`crystalscope.data.audit.duplicates`),
``regex:<pattern>`` groups by a part of the file name, ``none`` splits file by file. Which folders
are classes and which files are images is :mod:`crystalscope.data.layout`'s rule.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import random
import re
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from crystalscope.data.audit.duplicates import find_duplicates
from crystalscope.data.audit.fingerprint import ImageRecord
from crystalscope.data.audit.scan import scan_images
from crystalscope.data.layout import (ClassFiles, collect_class_files, find_split_folders, natural_key,
                                      resolve_source_root)
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import SPLITS
from crystalscope.io import atomic_dir, write_json, write_text
from crystalscope.runtime import progress_bar
from crystalscope.safety import check_output, claim_output

DEFAULT_RATIOS = (0.70, 0.25, 0.05)
SPLIT_MODES = ("copy", "hardlink", "symlink")
GROUP_BY_CHOICES = "near-duplicates|none|regex:<pattern>"

#: A group key maps a source file to the id of the group it must share a split with.
GroupKey = Callable[[Path], str]


# ---- options -----------------------------------------------------------------------------


def parse_ratios(ratios: str | Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test ratios given as ``"0.7,0.25,0.05"`` or a sequence of 3 numbers.

    Example:
        >>> parse_ratios("0.7,0.25,0.05")
        (0.7, 0.25, 0.05)
    """
    text = ratios if isinstance(ratios, str) else ",".join(str(r) for r in ratios)
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise CrystalscopeError(
            f"--ratios '{text}' is not a list of numbers: use e.g. 0.70,0.25,0.05") from None
    if len(values) != 3:
        raise CrystalscopeError(
            f"--ratios '{text}' needs three numbers (train,val,test), e.g. 0.70,0.25,0.05")
    if any(not math.isfinite(v) for v in values):
        raise CrystalscopeError(f"--ratios '{text}' has a value that is not a finite number: use e.g. 0.70,0.25,0.05")
    if any(v < 0 for v in values):
        raise CrystalscopeError(f"--ratios '{text}' has a negative value: every ratio must be >= 0")
    if abs(sum(values) - 1.0) > 1e-6:
        raise CrystalscopeError(f"--ratios '{text}' sum to {sum(values):g}, not 1: e.g. 0.70,0.25,0.05")
    if values[0] == 0:
        raise CrystalscopeError(f"--ratios '{text}' gives the train split nothing: its ratio must be > 0")
    return values  # type: ignore[return-value]


def split_targets(n_files: int, ratios: Sequence[float]) -> list[int]:
    """File counts per split for ``n_files`` by the largest-remainder rule (each within one file).

    Example:
        >>> split_targets(200, (0.7, 0.25, 0.05))
        [140, 50, 10]
    """
    exact = [n_files * r for r in ratios]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n_files - sum(counts)]:
        counts[i] += 1
    return counts


def regex_group_key(pattern: str, class_of: dict[Path, str] | None = None) -> GroupKey:
    r"""Group files by the first capture group (or the whole match) of ``pattern`` on the name.

    Files whose name does not match form a group of their own. With ``class_of``, groups
    stay within a class, so ``CEX (5)`` and ``PG (5)`` never share a key by accident.

    Example:
        >>> key = regex_group_key(r"^(\w+)_view\d")
        >>> key(Path("crystal12_view3.png"))
        're::crystal12'
    """
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise CrystalscopeError(
            f"--group-by regex '{pattern}' is not a valid regular expression ({exc})") from None
    class_of = class_of or {}

    def key(path: Path) -> str:
        match = compiled.search(path.name)
        if match is None:
            return f"file:{path}"
        value = match.group(1) if compiled.groups and match.group(1) is not None else match.group(0)
        return f"re:{class_of.get(path, '')}:{value}"

    return key


def _validate_group_by(group_by: str | GroupKey) -> None:
    """Fail on a bad ``--group-by`` before any slow work."""
    if callable(group_by) or group_by in ("none", "near-duplicates"):
        return
    make_group_key(group_by, [], {})


def _check_pattern_matches(group_by: str | GroupKey, class_of: dict[Path, str]) -> None:
    """Refuse ``regex:PAT`` that matches no file name: every file alone is not what was asked for."""
    if callable(group_by) or not group_by.startswith("regex:"):
        return
    compiled = re.compile(group_by[len("regex:"):])
    if not any(compiled.search(path.name) for path in class_of):
        example = next(iter(class_of), Path("?")).name
        raise CrystalscopeError(f"--group-by {group_by}: the pattern matches none of the {len(class_of)} file "
                                f"names (e.g. {example!r}); fix the pattern or use --group-by none")


def make_group_key(group_by: str | GroupKey, records: Sequence[ImageRecord], class_of: dict[Path, str],
                   progress: bool = False, workers: int | None = None) -> GroupKey:
    """Turn the ``--group-by`` option (or a callable) into a :data:`GroupKey`.

    Args:
        group_by: ``near-duplicates``, ``none``, ``regex:<pattern>`` or a callable.
        records: the readable images' :class:`~crystalscope.data.audit.fingerprint.ImageRecord` (used by
            ``near-duplicates``).
        class_of: class name per path (keeps regex groups within a class).
        progress: show a progress bar while duplicates are verified.
        workers: processes for the duplicate verification.
    """
    if callable(group_by):
        return group_by
    if group_by == "none":
        return lambda path: f"file:{path}"
    if group_by == "near-duplicates":
        return find_duplicates(records, progress=progress, workers=workers).group_key()
    if group_by.startswith("regex:") and len(group_by) > len("regex:"):
        return regex_group_key(group_by[len("regex:"):], class_of)
    raise CrystalscopeError(f"--group-by '{group_by}' is unknown: use {GROUP_BY_CHOICES}")


# ---- assignment --------------------------------------------------------------------------


def assign_splits(files_by_class: dict[str, list[Path]], group_key: GroupKey,
                  ratios: Sequence[float], seed: int, warnings: list[str] | None = None) -> dict[Path, str]:
    """Assign every file to a split, whole groups at a time, stratified per class.

    Per class, groups are shuffled with a seed derived from ``seed`` and the class name (so
    adding a class never reshuffles another), then placed largest first into the split that
    is furthest below its target; singletons fill the gaps, so a split by file hits the
    targets exactly and a grouped split within about one group. A group that spans classes
    (a duplicate filed under two labels) follows the split its first class gave it. A class
    with at least one group per non-zero split gets a group in each (a small class must not
    end with 0 test images); otherwise a line naming the class and the split goes to ``warnings``.

    Example:
        >>> assign_splits({"a": [Path("1"), Path("2")], "b": [Path("3"), Path("4")]},
        ...               lambda p: str(p), (0.5, 0.5, 0.0), seed=0)  # doctest: +SKIP
    """
    assignment: dict[Path, str] = {}
    fixed: dict[str, int] = {}
    for class_name in sorted(files_by_class):
        groups: dict[str, list[Path]] = {}
        for path in sorted(files_by_class[class_name], key=natural_key):
            groups.setdefault(group_key(path), []).append(path)
        order = list(groups.items())
        random.Random(f"{seed}:{class_name}").shuffle(order)
        order.sort(key=lambda item: -len(item[1]))  # stable: the shuffle breaks ties
        targets = split_targets(len(files_by_class[class_name]), ratios)
        counts = [0] * len(SPLITS)
        placed: list[list[str]] = [[] for _ in SPLITS]
        for gid, members in order:
            if gid in fixed:
                index = fixed[gid]
            else:
                deficits = [t - c if r > 0 else float("-inf") for t, c, r in zip(targets, counts, ratios)]
                index = deficits.index(max(deficits))
                fixed[gid] = index
                placed[index].append(gid)
            counts[index] += len(members)
        _fill_empty_splits(class_name, groups, placed, ratios, fixed, warnings)
        for gid, members in groups.items():
            for path in members:
                assignment[path] = SPLITS[fixed[gid]]
    return assignment


def _fill_empty_splits(class_name: str, groups: dict[str, list[Path]], placed: list[list[str]],
                       ratios: Sequence[float], fixed: dict[str, int], warnings: list[str] | None) -> None:
    """Move the smallest group of the fullest split into each non-zero split left empty."""
    for index, ratio in enumerate(ratios):
        if ratio <= 0 or placed[index]:
            continue
        donors = [i for i in range(len(placed)) if len(placed[i]) > 1]
        if not donors:
            if warnings is not None:
                warnings.append(f"class {class_name!r} has too few groups ({len(groups)}) to give the "
                                f"{SPLITS[index]} split any image: it has 0 there")
            continue
        donor = max(donors, key=lambda i: len(placed[i]))
        gid = min(reversed(placed[donor]), key=lambda g: len(groups[g]))  # smallest, last placed on ties
        placed[donor].remove(gid)
        placed[index].append(gid)
        fixed[gid] = index


# ---- writing the split -------------------------------------------------------------------


@dataclass
class SplitSummary:
    """What :func:`split_dataset` did; :meth:`to_json` is the content of ``split.json``.

    Attributes:
        counts: class -> split -> files.
        groups_kept_together: groups of two or more files placed in one split.
        skipped_non_images: files in class folders that are not images.
        skipped_unreadable: ``"path: reason"`` of images that could not be decoded.
    """

    source: str
    out_dir: str
    ratios: list[float]
    seed: int
    mode: str
    force: bool
    warnings: list[str]
    group_by: str
    n_files: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    groups_kept_together: int = 0
    files_in_groups: int = 0
    skipped_non_images: list[str] = field(default_factory=list)
    skipped_unreadable: list[str] = field(default_factory=list)
    split_csv: str = ""

    def to_json(self) -> dict:
        """The ``split.json`` content (keys in this order)."""
        return asdict(self)


COMMAND = "split"  # named in the output's manifest: --force replaces only what a split wrote


def _destination_names(class_dir: Path, files: Sequence[Path]) -> dict[Path, str]:
    """File name in the split; a file from a nested sub-folder gets its sub-path joined by '__'."""
    names = {}
    for path in files:
        relative = path.relative_to(class_dir)
        names[path] = relative.as_posix().replace("/", "__")
    return names


def _place(job: tuple[Path, Path, str]) -> None:
    source, target, mode = job
    try:
        if mode == "copy":
            shutil.copy2(source, target)
        elif mode == "hardlink":
            os.link(source, target)
        else:
            os.symlink(source.resolve(), target)
    except OSError as exc:
        hint = (" (hard links cannot cross file systems: use --mode copy or symlink)"
                if exc.errno == errno.EXDEV else "")
        raise CrystalscopeError(
            f"cannot {mode} '{source}' to '{target}': {exc.strerror or exc}{hint}") from None


def _place_all(jobs: list[tuple[Path, Path, str]], progress: bool) -> None:
    # threads (copying is I/O), started before the bar as everywhere (see audit.parallel)
    with ThreadPoolExecutor(max_workers=4) as pool, \
            progress_bar("writing split", len(jobs), enabled=progress) as advance:
        for done, _ in enumerate(pool.map(_place, jobs), start=1):  # re-raises a worker's error here
            advance(done)


def _write_csv(path: Path, rows: Iterable[Sequence[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "split", "source", "group"])
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _scan_source(root: Path, progress: bool,
                 workers: int | None) -> tuple[ClassFiles, dict[str, list[Path]], list[ImageRecord]]:
    """Class files with unreadable images removed; raises when fewer than two classes remain."""
    found = collect_class_files(root)
    n_images = sum(len(f) for f in found.files.values())
    if n_images == 0:
        raise CrystalscopeError(
            f"no images found in '{root}': expected one folder per class (e.g. cex/, pg/) "
            "holding PNG/JPEG/TIFF files")
    all_paths = [p for files in found.files.values() for p in files]
    records = scan_images(all_paths, progress=progress, workers=workers)
    readable = {r.path for r in records if r.readable}
    files = {c: [p for p in paths if p in readable] for c, paths in found.files.items()}
    files = {c: paths for c, paths in files.items() if paths}
    if len(files) < 2:
        names = ", ".join(sorted(files)) or "none"
        raise CrystalscopeError(
            f"'{root}' has readable images in only one class folder ({names}): "
            "a classifier needs at least two")
    return found, files, records


def split_dataset(source: str | os.PathLike, out_dir: str | os.PathLike,
                  ratios: str | Sequence[float] = DEFAULT_RATIOS, seed: int = 42, mode: str = "copy",
                  force: bool = False, group_by: str | GroupKey = "near-duplicates",
                  progress: bool = True, workers: int | None = None) -> SplitSummary:
    """Split a class-folder dataset into ``OUT_DIR/{train,val,test}/<class>/`` without touching it.

    Args:
        source: folder of class folders, or the Kaggle root (``cropped/cropped/`` is found).
        out_dir: output folder; refused when not empty unless ``force``. Built in a staging
            folder and swapped in only when complete.
        ratios: train, val, test fractions (summing to 1).
        seed: shuffling seed; the same seed and files give the same split.
        mode: ``copy``, ``hardlink`` or ``symlink``.
        force: replace a non-empty ``out_dir``.
        group_by: ``near-duplicates`` (rotated/mirrored/identical copies share a split),
            ``none`` (by file), ``regex:<pattern>`` (first capture group of the file name)
            or any callable ``path -> group id``.
        progress: show progress bars.
        workers: decoding processes (default: all cores, at most 8).

    Returns:
        A :class:`SplitSummary` (its :meth:`~SplitSummary.to_json` is ``split.json``).

    Example:
        >>> summary = split_dataset("synth", "split", seed=42, progress=False)  # doctest: +SKIP
        >>> summary.counts["pg"], summary.groups_kept_together  # doctest: +SKIP
        ({'train': 4763, 'val': 1702, 'test': 339}, 1712)
    """
    ratios = parse_ratios(ratios)
    if mode not in SPLIT_MODES:
        raise CrystalscopeError(f"--mode '{mode}' is unknown: use one of {', '.join(SPLIT_MODES)}")
    _validate_group_by(group_by)
    source, out_dir = Path(source), Path(out_dir)
    root = resolve_source_root(source)
    if find_split_folders(root):
        raise CrystalscopeError(
            f"'{source}' already looks like a split (train/val/test folders): "
            "pass the original class-folder source")
    # fail before the slow scan; claim_output checks again (and locks) when writing
    check_output(out_dir, inputs=[source, root], kind="folder", force=force, command=COMMAND, option="OUT_DIR")
    found, files, records = _scan_source(root, progress, workers)
    readable_records = [r for r in records if r.readable]
    class_of = {p: c for c, paths in files.items() for p in paths}
    group_key = make_group_key(group_by, readable_records, class_of, progress, workers)
    _check_pattern_matches(group_by, class_of)
    warnings: list[str] = []
    assignment = assign_splits(files, group_key, ratios, seed, warnings)
    summary = SplitSummary(source=str(root), out_dir=str(out_dir), ratios=list(ratios), seed=seed, mode=mode,
                           force=force, warnings=warnings,
                           group_by=group_by if isinstance(group_by, str) else "custom")
    return _write_split(summary, files, found, records, assignment, group_key, progress)


def _write_split(summary: SplitSummary, files: dict[str, list[Path]], found: ClassFiles,
                 records: Sequence[ImageRecord], assignment: dict[Path, str], group_key: GroupKey,
                 progress: bool) -> SplitSummary:
    """Fill in the counts and write the split (files, split.csv, split.json) atomically."""
    out_dir, force = Path(summary.out_dir), summary.force
    group_sizes = Counter(group_key(p) for paths in files.values() for p in paths)
    jobs, rows = [], []
    counts = {c: {s: 0 for s in SPLITS} for c in sorted(files)}
    for class_name in sorted(files):
        names = _destination_names(found.dirs[class_name], files[class_name])
        for path in files[class_name]:
            split_name = assignment[path]
            target = Path(split_name) / class_name / names[path]
            gid = group_key(path)
            rows.append([target.as_posix(), class_name, split_name, str(path.resolve()),
                         gid if group_sizes[gid] > 1 else ""])
            jobs.append((path, target, summary.mode))
            counts[class_name][split_name] += 1
    summary.n_files, summary.counts = len(rows), counts
    summary.groups_kept_together = sum(1 for n in group_sizes.values() if n > 1)
    summary.files_in_groups = sum(n for n in group_sizes.values() if n > 1)
    summary.skipped_non_images = [str(p) for p in found.non_images]
    summary.skipped_unreadable = [f"{r.path}: {r.error}" for r in records if not r.readable]
    summary.split_csv = str(out_dir / "split.csv")
    with claim_output(out_dir, inputs=[Path(summary.source)], kind="folder", force=force, command=COMMAND,
                      option="OUT_DIR"), atomic_dir(out_dir, force=force, command=COMMAND) as staging:
        for split_name in SPLITS:
            for class_name in counts:
                (staging / split_name / class_name).mkdir(parents=True, exist_ok=True)
        _place_all([(src, staging / target, mode) for src, target, mode in jobs], progress)
        _write_csv(staging / "split.csv", rows)
        write_json(staging / "split.json", summary.to_json())
    return summary


def first_few(items: Sequence[str], n: int = 5) -> str:
    """The file names of the first ``n`` of ``"path[: reason]"`` items, and how many more.

    Example:
        >>> first_few(["a/1.png", "a/2.png: broken"], n=1)
        '1.png, ... (+1 more)'
    """
    names = ", ".join(Path(item.split(": ")[0]).name for item in items[:n])
    return names + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def summary_lines(summary: SplitSummary) -> list[str]:
    """What was grouped, skipped and warned about, as plain lines (after the counts table).

    Example:
        >>> summary_lines(split_dataset("synth", "split", progress=False))[-1]  # doctest: +SKIP
        'wrote split/split.csv'
    """
    lines = []
    if summary.group_by != "none":
        lines.append(f"group-by {summary.group_by}: {summary.groups_kept_together} groups "
                     f"({summary.files_in_groups} files) kept together in one split each")
    for label, skipped in (("non-image files", summary.skipped_non_images),
                           ("unreadable images", summary.skipped_unreadable)):
        if skipped:
            lines.append(f"skipped {len(skipped)} {label}: {first_few(skipped)}")
    lines += [f"warning: {warning}" for warning in summary.warnings]
    lines.append(f"wrote {summary.split_csv}")
    return lines
