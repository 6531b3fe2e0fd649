"""What is audited: every image of a dataset folder with its class and (in a split) split."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from crystalscope.data.layout import discover
from crystalscope.errors import CrystalscopeError


@dataclass
class AuditSource:
    """The images of a dataset folder with their class and (for a split folder) split."""

    data_dir: Path
    layout: str  # "kaggle", "class-folders" or "split" (crystalscope.data.layout.DatasetLayout.kind)
    class_root: Path
    paths: list[Path] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    non_images: list[Path] = field(default_factory=list)


def discover_source(data_dir: str | os.PathLike) -> AuditSource:
    """Find the images of a class-folder source, a Kaggle download or a split folder.

    The folder rules are :mod:`crystalscope.data.layout`'s, the same as ``split`` and ``train``.

    Example:
        >>> src = discover_source("split")  # doctest: +SKIP
        >>> src.layout, sorted(set(src.splits))  # doctest: +SKIP
        ('split', ['test', 'train', 'val'])
    """
    layout = discover(data_dir)
    source = AuditSource(data_dir=layout.data_dir, layout=layout.kind, class_root=layout.class_root)
    # splits in name order (test, train, val): the order of the records, so of the baseline's folds
    for split_name, found in sorted(layout.splits.items(), key=lambda kv: str(kv[0])):
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
