"""A reproducible, stratified, leakage-aware train/val/test split that never touches the source.

The reference study's split *moves* files out of the download, destroying its layout, and
splits file by file, so rotated and mirrored views of one PG crystal land in both train and
test. :func:`split_dataset` copies (or links) files into ``OUT_DIR/{train,val,test}/<class>/``,
keeps every *group* of files in one split, and writes ``split.csv`` so the assignment can be
inspected and reproduced.

A group key is any function ``path -> group id``: the default groups pixel-exact duplicates
and their rotations/mirror images (found by :mod:`crystalscope.data.audit`), ``regex:<pattern>``
groups by a part of the file name, ``none`` splits file by file.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from crystalscope.data.images import class_folders, is_image_file, natural_key, visible_subfolders
from crystalscope.errors import CrystalscopeError
from crystalscope.io import atomic_dir, write_json, write_text
from crystalscope.safety import check_output, claim_output

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_RATIOS = (0.70, 0.25, 0.05)
SPLIT_MODES = ("copy", "hardlink", "symlink")
GROUP_BY_CHOICES = "near-duplicates|none|regex:<pattern>"

#: A group key maps a source file to the id of the group it must share a split with.
GroupKey = Callable[[Path], str]


@dataclass
class ClassFiles:
    """Image files found per class, plus what was skipped and why."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    non_images: list[Path] = field(default_factory=list)


# ---- finding the data -------------------------------------------------------------------


def resolve_source_root(source: str | os.PathLike) -> Path:
    """The folder that holds the class folders, looking inside a Kaggle download by itself.

    The Kaggle archive keeps its crops in ``cropped/cropped/{cex,pg}``; a user may pass the
    archive root, the first ``cropped`` or the class-folder parent itself.

    Example:
        >>> resolve_source_root("archive")  # doctest: +SKIP
        PosixPath('archive/cropped/cropped')
    """
    root = Path(source)
    if not root.exists():
        raise CrystalscopeError(f"source folder '{root}' does not exist: pass the folder of class folders")
    if not root.is_dir():
        raise CrystalscopeError(f"source '{root}' is not a folder: pass the folder of class folders")
    for _ in range(2):
        nested = root / "cropped"
        if nested.is_dir() and not _has_images_directly(root):
            root = nested
    return root


def _has_images_directly(folder: Path) -> bool:
    return any(p.is_file() and is_image_file(p) for p in folder.iterdir())


def find_split_folders(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "val": ..., "test": ...}`` when ``root`` is a split folder, else None.

    A folder counts as a split folder when at least two of its sub-folders are named
    train/val/test (any case), so a two-way split is recognised too.
    """
    found = {p.name.lower(): p for p in visible_subfolders(root) if p.name.lower() in SPLIT_NAMES}
    return found if len(found) >= 2 else None


def collect_class_files(root: Path) -> ClassFiles:
    """Image files per class folder (class = folder name in lower case), naturally sorted.

    Files inside nested sub-folders of a class folder belong to that class. Files that are not
    images are listed in ``non_images``; loose files beside the class folders are ignored.

    Example:
        >>> collect_class_files(Path("data")).files.keys()  # doctest: +SKIP
        dict_keys(['cex', 'pg'])
    """
    found = ClassFiles(root=root)
    for name, class_dir in class_folders(root).items():
        images: list[Path] = []
        for path in class_dir.rglob("*"):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                continue
            (images if is_image_file(path) else found.non_images).append(path)
        found.files[name] = sorted(images, key=natural_key)
        found.dirs[name] = class_dir
    found.non_images.sort(key=natural_key)
    return found


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


def _near_duplicate_key(records, progress: bool, workers: int | None) -> GroupKey:
    from crystalscope.data.audit import find_duplicates

    groups = find_duplicates(records, progress=progress, workers=workers).groups
    group_of = {p: f"dup:{i}" for i, group in enumerate(groups) for p in group}
    return lambda path: group_of.get(path, f"file:{path}")


def _validate_group_by(group_by: str | GroupKey) -> None:
    """Fail on a bad ``--group-by`` before any slow work."""
    if callable(group_by) or group_by in ("none", "near-duplicates"):
        return
    make_group_key(group_by, [], {})


def make_group_key(group_by: str | GroupKey, records, class_of: dict[Path, str],
                   progress: bool = False, workers: int | None = None) -> GroupKey:
    """Turn the ``--group-by`` option (or a callable) into a :data:`GroupKey`.

    Args:
        group_by: ``near-duplicates``, ``none``, ``regex:<pattern>`` or a callable.
        records: the readable images' :class:`~crystalscope.data.audit.ImageRecord` (used by
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
        return _near_duplicate_key(records, progress, workers)
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
        counts = [0] * len(SPLIT_NAMES)
        placed: list[list[str]] = [[] for _ in SPLIT_NAMES]
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
                assignment[path] = SPLIT_NAMES[fixed[gid]]
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
                                f"{SPLIT_NAMES[index]} split any image: it has 0 there")
            continue
        donor = max(donors, key=lambda i: len(placed[i]))
        gid = min(reversed(placed[donor]), key=lambda g: len(groups[g]))  # smallest, last placed on ties
        placed[donor].remove(gid)
        placed[index].append(gid)
        fixed[gid] = index


# ---- writing the split -------------------------------------------------------------------


OWNED = (*SPLIT_NAMES, "split.csv", "split.json")  # what a split writes: --force may replace only these


def _check_out_dir(out_dir: Path, source: Path, root: Path, force: bool) -> None:
    check_output(out_dir, inputs=[source, root], kind="folder", force=force, owned=OWNED, option="OUT_DIR")


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
    from crystalscope.data.audit import progress_bar

    with progress_bar(progress) as bar, ThreadPoolExecutor(max_workers=4) as pool:
        task = bar.add_task("writing split", total=len(jobs))
        for _ in pool.map(_place, jobs):  # pool.map re-raises a worker's error here
            bar.advance(task)


def _write_csv(path: Path, rows: Iterable[Sequence[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "split", "source", "group"])
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _scan_source(root: Path, progress: bool, workers: int | None):
    """Class files with unreadable images removed; raises when fewer than two classes remain."""
    from crystalscope.data.audit import scan_images

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
                  progress: bool = True, workers: int | None = None) -> dict:
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
        A summary: ``counts`` (class -> split -> files), ``groups_kept_together``,
        ``files_in_groups``, ``skipped_non_images``, ``skipped_unreadable``, ``split_csv``...

    Example:
        >>> summary = split_dataset("synth", "split", seed=42, progress=False)  # doctest: +SKIP
        >>> summary["counts"]["pg"], summary["groups_kept_together"]  # doctest: +SKIP
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
    _check_out_dir(out_dir, source, root, force)
    found, files, records = _scan_source(root, progress, workers)
    readable_records = [r for r in records if r.readable]
    class_of = {p: c for c, paths in files.items() for p in paths}
    group_key = make_group_key(group_by, readable_records, class_of, progress, workers)
    warnings: list[str] = []
    assignment = assign_splits(files, group_key, ratios, seed, warnings)
    return _write_split(out_dir, root, files, found, records, assignment, group_key,
                        dict(ratios=list(ratios), seed=seed, mode=mode, force=force, warnings=warnings,
                             group_by=group_by if isinstance(group_by, str) else "custom"), progress)


def _write_split(out_dir: Path, root: Path, files: dict[str, list[Path]], found: ClassFiles,
                 records, assignment: dict[Path, str], group_key: GroupKey, options: dict,
                 progress: bool) -> dict:
    group_sizes = Counter(group_key(p) for paths in files.values() for p in paths)
    jobs, rows = [], []
    counts = {c: {s: 0 for s in SPLIT_NAMES} for c in sorted(files)}
    for class_name in sorted(files):
        names = _destination_names(found.dirs[class_name], files[class_name])
        for path in files[class_name]:
            split_name = assignment[path]
            target = Path(split_name) / class_name / names[path]
            gid = group_key(path)
            rows.append([target.as_posix(), class_name, split_name, str(path.resolve()),
                         gid if group_sizes[gid] > 1 else ""])
            jobs.append((path, target, options["mode"]))
            counts[class_name][split_name] += 1
    summary = {
        "source": str(root), "out_dir": str(out_dir), **options,
        "n_files": len(rows), "counts": counts,
        "groups_kept_together": sum(1 for n in group_sizes.values() if n > 1),
        "files_in_groups": sum(n for n in group_sizes.values() if n > 1),
        "skipped_non_images": [str(p) for p in found.non_images],
        "skipped_unreadable": [f"{r.path}: {r.error}" for r in records if not r.readable],
        "split_csv": str(out_dir / "split.csv"),
    }
    with claim_output(out_dir, inputs=[root], kind="folder", force=options["force"], owned=OWNED,
                      option="OUT_DIR"), atomic_dir(out_dir, force=options["force"]) as staging:
        for split_name in SPLIT_NAMES:
            for class_name in counts:
                (staging / split_name / class_name).mkdir(parents=True, exist_ok=True)
        _place_all([(src, staging / target, mode) for src, target, mode in jobs], progress)
        _write_csv(staging / "split.csv", rows)
        write_json(staging / "split.json", summary)
    return summary


def _first_few(items: Sequence[str], n: int = 5) -> str:
    names = ", ".join(Path(item.split(": ")[0]).name for item in items[:n])
    return names + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def print_split_summary(summary: dict, console=None) -> None:
    """Print the class x split counts table and what was grouped or skipped (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"split of {summary['source']} -> {summary['out_dir']} (seed {summary['seed']})")
    table.add_column("class")
    for split_name in SPLIT_NAMES:
        table.add_column(split_name, justify="right")
    table.add_column("total", justify="right")
    totals = Counter()
    for class_name, counts in summary["counts"].items():
        n = sum(counts.values())
        totals.update(counts)
        table.add_row(class_name, *(f"{counts[s]} ({counts[s] / n:.1%})" for s in SPLIT_NAMES), str(n))
    table.add_row("all", *(str(totals[s]) for s in SPLIT_NAMES), str(sum(totals.values())), style="bold")
    console.print(table)
    if summary["group_by"] != "none":
        console.print(f"group-by {summary['group_by']}: {summary['groups_kept_together']} groups "
                      f"({summary['files_in_groups']} files) kept together in one split each")
    for label, key in (("non-image files", "skipped_non_images"),
                       ("unreadable images", "skipped_unreadable")):
        if summary[key]:
            console.print(f"skipped {len(summary[key])} {label}: {_first_few(summary[key])}", markup=False)
    for warning in summary.get("warnings", []):
        console.print(f"warning: {warning}", markup=False, style="yellow")
    console.print(f"wrote {summary['split_csv']}", markup=False)
