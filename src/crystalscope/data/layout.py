"""How a dataset sits on disk: the one rule every command asks (audit, split, train, predict).

Two rules for one question become two datasets, so each question has one answer here:

- **image file**: a name ending in one of :data:`IMAGE_EXTENSIONS` (any case);
- **hidden**: a file or folder whose name starts with ``.`` is skipped everywhere, at any depth
  (the staging folders of an interrupted run start with ``.``, and so do ``.DS_Store`` and
  ``.ipynb_checkpoints``), so it never becomes a class, a split or an image;
- **walking**: a folder is listed depth first, each folder's names in natural order;
  symbolic links to folders are followed, but each real folder is walked once, so a link
  loop (``sub/up -> ..``) or a second link to a folder already walked adds nothing. An entry
  with an image name that is not a folder is an image *candidate* even when it is a FIFO, a
  device or a dangling or looping link: the decoder (:func:`crystalscope.data.images.load_rgb`)
  refuses it with its reason, so it becomes an error row or a skipped file, never a hang;
- **class folder**: a visible sub-folder of the class root; its name in lower case is the
  class; every image below it (nested sub-folders included) belongs to that class;
- **split folder**: a folder holding *all three* of ``train/``, ``val/`` and ``test/``
  (:data:`crystalscope.formats.SPLITS`), in any case. One or two of them alone is an error that
  names the missing ones: a half split is a mistake, never a set of classes;
- **Kaggle root**: the download keeps its crops in ``cropped/cropped/<class>/``; a user may pass
  the archive root, the first ``cropped`` or the class-folder parent itself.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from crystalscope.errors import CrystalscopeError
from crystalscope.formats import SPLITS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
KAGGLE_NESTING = "cropped"  # the archive's crops are in cropped/cropped/<class>/


def natural_key(path: str | os.PathLike):
    """Sort key that orders ``CEX (2).png`` before ``CEX (10).png``.

    Example:
        >>> sorted(["CEX (10).png", "CEX (2).png"], key=natural_key)
        ['CEX (2).png', 'CEX (10).png']
    """
    parts = re.split(r"(\d+)", str(path))
    return [int(p) if p.isdigit() else p.lower() for p in parts]


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (any case).

    Example:
        >>> is_image_file("CEX (1).PNG"), is_image_file("notes.txt")
        (True, False)
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def real_path(path: str | os.PathLike) -> Path:
    """The file a path names, links resolved: the key that tells two spellings of one file apart.

    Unlike ``Path.resolve`` it never raises: a symbolic link loop stays as written (its
    decoding then fails with the reason, naming the file).

    Example:
        >>> real_path("/tmp/../tmp") == Path("/tmp").resolve()
        True
    """
    return Path(os.path.realpath(path))


def is_hidden(path: str | os.PathLike, base: str | os.PathLike | None = None) -> bool:
    """True when ``path`` (or any folder between ``base`` and it) starts with ``.``.

    Example:
        >>> is_hidden("data/cex/.tmp/a.png", base="data"), is_hidden("data/cex/a.png", base="data")
        (True, False)
    """
    path = Path(path)
    parts = path.relative_to(base).parts if base is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


def visible_subfolders(folder: str | os.PathLike) -> list[Path]:
    """Non-hidden sub-folders of ``folder`` in natural order.

    Example:
        >>> visible_subfolders("split")  # doctest: +SKIP
        [PosixPath('split/test'), PosixPath('split/train'), PosixPath('split/val')]
    """
    return sorted((p for p in Path(folder).iterdir() if p.is_dir() and not is_hidden(p)), key=natural_key)


def _by_lower_name(root: Path, folders: list[Path], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for sub in folders:
        name = sub.name.lower()
        if name in found:
            raise CrystalscopeError(f"{root}: {what} folders {found[name].name!r} and {sub.name!r} differ "
                                    "only in case: rename one of them")
        found[name] = sub
    return found


def class_folders(root: str | os.PathLike) -> dict[str, Path]:
    """``{lower-cased name: folder}`` of the class folders in ``root``, sorted by name.

    Raises:
        CrystalscopeError: ``root`` is missing, or two folders differ only in case.

    Example:
        >>> class_folders("split/train")  # doctest: +SKIP
        {'cex': PosixPath('split/train/cex'), 'pg': PosixPath('split/train/pg')}
    """
    root = Path(root)
    if not root.is_dir():
        raise CrystalscopeError(f"{root}: folder not found")
    return dict(sorted(_by_lower_name(root, visible_subfolders(root), "class").items()))


def walk_files(folder: str | os.PathLike, recursive: bool = True) -> Iterator[Path]:
    """Yield every visible entry under ``folder`` that is not a folder, lazily, depth first.

    Each folder's names are sorted in natural order and only one folder's names are held at a
    time. Symbolic links to folders are followed, each real folder (device, inode) once: a
    link loop ends the walk of that branch. A sub-folder that cannot be listed is skipped
    with a warning; ``folder`` itself raises.

    Raises:
        CrystalscopeError: ``folder`` cannot be listed.

    Example:
        >>> next(walk_files("crops/"))  # doctest: +SKIP
        PosixPath('crops/CEX (1).png')
    """
    yield from _walk(Path(folder), recursive, set(), top=True)


def _walk(folder: Path, recursive: bool, walked: set[tuple[int, int]], top: bool = False) -> Iterator[Path]:
    try:
        info = os.stat(folder)
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                         key=lambda e: natural_key(e.name))
    except OSError as exc:
        if top:
            raise CrystalscopeError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
        log.warning("%s: cannot list the folder (%s): skipped", folder, exc.strerror or exc)
        return
    if (info.st_dev, info.st_ino) in walked:
        log.warning("%s: a folder already walked (a symbolic link loop or a second link): skipped", folder)
        return
    walked.add((info.st_dev, info.st_ino))
    for entry in entries:
        if _is_folder(entry):
            if recursive:
                yield from _walk(folder / entry.name, recursive, walked)
        else:
            yield folder / entry.name


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link; a looping link raises ELOOP: not a folder
    except OSError:
        return False


def list_files(folder: str | os.PathLike, recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """``(images, other files)`` under ``folder`` (:func:`walk_files`), both in natural order.

    An image-named FIFO, device or broken link is in ``images``: decoding it fails with its
    reason, so every command reports it as it reports a corrupt image.
    """
    images: list[Path] = []
    others: list[Path] = []
    for path in walk_files(folder, recursive):
        (images if is_image_file(path) else others).append(path)
    return sorted(images, key=natural_key), sorted(others, key=natural_key)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files under ``folder`` in natural order (hidden files and folders skipped).

    Example:
        >>> list_images("split/train/cex")  # doctest: +SKIP
        [PosixPath('split/train/cex/CEX (1).png'), ...]
    """
    return list_files(folder, recursive)[0]


@dataclass
class ClassFiles:
    """Image files found per class, plus the files that are not images."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    non_images: list[Path] = field(default_factory=list)


def collect_class_files(root: str | os.PathLike) -> ClassFiles:
    """Image files per class folder (class = folder name in lower case), naturally sorted.

    Files inside nested sub-folders of a class folder belong to that class. Files that are not
    images are listed in ``non_images``; loose files beside the class folders are ignored.

    Example:
        >>> collect_class_files(Path("data")).files.keys()  # doctest: +SKIP
        dict_keys(['cex', 'pg'])
    """
    found = ClassFiles(root=Path(root))
    for name, class_dir in class_folders(root).items():
        found.files[name], others = list_files(class_dir)
        found.dirs[name] = class_dir
        found.non_images.extend(others)
    found.non_images.sort(key=natural_key)
    return found


def resolve_source_root(source: str | os.PathLike) -> Path:
    """The folder that holds the class folders, looking inside a Kaggle download by itself.

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
        nested = root / KAGGLE_NESTING
        if nested.is_dir() and not list_images(root, recursive=False):
            root = nested
    return root


def find_split_folders(root: str | os.PathLike) -> dict[str, Path] | None:
    """``{"train": ..., "val": ..., "test": ...}`` when ``root`` is a split folder, else None.

    The rule: all three names of :data:`~crystalscope.formats.SPLITS`, any case.

    Raises:
        CrystalscopeError: one or two of them are present (naming the missing ones), or two
            differ only in case.

    Example:
        >>> find_split_folders("split")  # doctest: +SKIP
        {'train': PosixPath('split/train'), 'val': PosixPath('split/val'), 'test': PosixPath('split/Test')}
    """
    root = Path(root)
    named = [p for p in visible_subfolders(root) if p.name.lower() in SPLITS]
    found = _by_lower_name(root, named, "split")
    if not found:
        return None
    missing = [s for s in SPLITS if s not in found]
    if missing:
        raise CrystalscopeError(
            f"{root}: missing split folder(s) {', '.join(missing)}; expected train/, val/ and test/ "
            "(any case) or class folders only (make a split with `crystalscope split`)")
    return {s: found[s] for s in SPLITS}


@dataclass
class DatasetLayout:
    """What :func:`discover` found: the kind of folder and its class files per split.

    Attributes:
        data_dir: the folder the user passed.
        kind: ``"split"``, ``"kaggle"`` (``cropped/cropped`` was found inside) or ``"class-folders"``.
        class_root: the folder holding the class folders (``data_dir`` itself for a split).
        splits: ``{split name: ClassFiles}``; the single key ``None`` when not a split.
    """

    data_dir: Path
    kind: str
    class_root: Path
    splits: dict[str | None, ClassFiles]


def discover(data_dir: str | os.PathLike) -> DatasetLayout:
    """Find the class files of a class-folder source, a Kaggle download or a split folder.

    Example:
        >>> layout = discover("split")  # doctest: +SKIP
        >>> layout.kind, list(layout.splits)  # doctest: +SKIP
        ('split', ['train', 'val', 'test'])
    """
    data_dir = Path(data_dir)
    root = resolve_source_root(data_dir)
    split_folders = find_split_folders(root)
    if split_folders:
        return DatasetLayout(data_dir, "split", root,
                             {name: collect_class_files(folder) for name, folder in split_folders.items()})
    kind = "kaggle" if root != data_dir else "class-folders"
    return DatasetLayout(data_dir, kind, root, {None: collect_class_files(root)})
