"""The audit's words: short summary lines (terminal and audit.md share them) and ``audit.md``."""

from __future__ import annotations

from typing import Iterable, Sequence

from crystalscope.data.audit.result import AuditResult


def summary_lines(result: AuditResult) -> list[str]:
    """The audit's findings as short plain-text lines; warnings contain ``WARNING``.

    Example:
        >>> summary_lines(result)[0]  # doctest: +SKIP
        '13664 images (kaggle layout), 0 unreadable, 0 non-image files'
    """
    dup = result.duplicate_summary
    lines = [f"{result.n_images} images ({result.layout} layout), "
             f"{len(result.unreadable)} unreadable, {len(result.non_image_files)} non-image files"]
    lines.append(f"duplicate groups (exact, rotated or mirrored; pixel-verified): {dup.groups} "
                 f"holding {dup.files_in_groups} files; {len(result.exact_duplicate_groups)} "
                 "groups of identical copies")
    for class_name, c in dup.per_class.items():
        lines.append(f"  {class_name}: {c['groups']} groups, {c['files_in_groups']} files in groups, "
                     f"{c['independent_images']} independent images")
    if dup.near_miss_pairs:
        lines.append(f"{dup.near_miss_pairs} look-alike pairs differ in pixels: not counted as duplicates")
    if result.layout == "split":
        n_cross = len(result.cross_split_groups)
        leaked = result.cross_split_summary.test_files_with_a_copy_in_train
        lines.append(f"LEAKAGE WARNING: {n_cross} duplicate groups span more than one split; "
                     f"{leaked} test files have a rotated/mirrored/identical copy in train" if n_cross
                     else "no duplicate group spans more than one split (no leakage found)")
    if result.mixed_class_groups:
        lines.append(f"LABEL WARNING: {len(result.mixed_class_groups)} duplicate groups carry "
                     "more than one class label")
    lines.append(result.metadata_baseline.message)
    return lines


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def _duplicate_section(result: AuditResult) -> list[str]:
    lines = ["", "## Duplicates", "",
             "Candidates come from a dihedral perceptual hash; every group below was verified pixel "
             "by pixel (identical, rotated by 90/180/270 degrees, or mirrored).", ""]
    if len(result.duplicate_groups) > 10:
        lines.append(f"The first 10 of {len(result.duplicate_groups)} groups (all are in audit.json):")
        lines.append("")
    for group in result.duplicate_groups[:10]:
        lines.append("- " + ", ".join(f"`{p}`" for p in group))
    if not result.duplicate_groups:
        lines.append("None found.")
    if result.layout == "split":
        lines += ["", "## Leakage: duplicate groups across splits", ""]
        for example in result.cross_split_examples:
            lines.append("- " + ", ".join(f"`{p}` ({s})" for p, s in example.items()))
        if not result.cross_split_examples:
            lines.append("None found.")
    if result.unreadable:
        lines += ["", "## Unreadable files", ""]
        lines += [f"- `{p}`: {e}" for p, e in list(result.unreadable_errors.items())[:50]]
    return lines


def _statistics_section(result: AuditResult) -> list[str]:
    rows = []
    for name, s in result.class_stats.items():
        sizes = ", ".join(f"{m['size']} ({m['fraction']:.1%})" for m in s["most_common_sizes"])
        rows.append([name, s["n"], f"{s['width']['min']:g}-{s['width']['max']:g}",
                     f"{s['height']['min']:g}-{s['height']['max']:g}",
                     f"{s['aspect']['mean']:.3f} ± {s['aspect']['std']:.3f}",
                     f"{s['mean_intensity']['mean']:.1f} ± {s['mean_intensity']['std']:.1f}",
                     f"{s['std_intensity']['mean']:.1f} ± {s['std_intensity']['std']:.1f}", sizes])
    return ["", "## Per-class statistics", ""] + _markdown_table(
        ["class", "n", "width", "height", "aspect w/h", "mean intensity", "std intensity",
         "most common sizes"], rows)


def audit_markdown(result: AuditResult) -> str:
    """A human-readable report of an audit result (the content of ``audit.md``).

    Example:
        >>> audit_markdown(result).splitlines()[0]  # doctest: +SKIP
        '# Dataset audit: `/data/split`'
    """
    classes = result.classes
    lines = [f"# Dataset audit: `{result.data_dir}`", ""]
    lines += [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}"
              for line in summary_lines(result)]
    lines += ["", "## Counts", ""]
    lines += _markdown_table(["split"] + classes + ["total"],
                             ([split] + [c.get(k, 0) for k in classes] + [sum(c.values())]
                              for split, c in result.counts.items()))
    lines += _duplicate_section(result)
    lines += _statistics_section(result)
    base = result.metadata_baseline
    lines += ["", "## Metadata-only baseline", "",
              f"{base.model} on {', '.join(base.features)}; {base.cv_folds}-fold cross-validation "
              "that keeps duplicate groups within one fold.", "", base.message, "",
              "![sizes](sizes.png) ![intensity](intensity.png)", "",
              f"Run time: {result.run_time_s:.1f} s with {result.workers} worker processes."]
    return "\n".join(lines) + "\n"
