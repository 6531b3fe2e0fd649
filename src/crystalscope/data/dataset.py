"""Class-folder datasets decoded once into a uint8 array (in memory and on disk).

Training reads every image many times; decoding a PNG and resizing it costs far more than a
GPU step. So each split is decoded and resized ONCE through :meth:`Preprocessing.resize_uint8`
(the same geometry that evaluation, export and prediction use) into a ``uint8 (N, H, W, 3)``
array, by a thread pool (Pillow releases the GIL while decoding and resampling). The array is
also written to an on-disk cache keyed by the files (path, size, mtime) and the geometry, so a
second run on the same data skips decoding entirely. Which folders are splits and classes, and
which files are images, is :mod:`crystalscope.data.layout`'s rule (the same as audit and split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystalscope.data.layout import class_folders, find_split_folders, list_images
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import SPLITS
from crystalscope.io import atomic_path
from crystalscope.runtime import cpu_count, default_workers, first_line, progress_bar

log = logging.getLogger(__name__)


@dataclass
class ImageFolder:
    """Files and integer labels of one folder of class folders.

    Attributes:
        root: the folder holding one sub-folder per class.
        paths: image files, class by class, natural-sorted within a class.
        labels: class index of each file (index into ``class_names``).
        class_names: lower-cased class folder names, sorted.
    """

    root: Path
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def index_folder(root: str | os.PathLike, class_names: list[str] | None = None) -> ImageFolder:
    """Index a folder of class folders.

    Args:
        root: folder with one sub-folder of images per class.
        class_names: the classes the labels refer to (e.g. a checkpoint's). Folders must be
            among them; missing ones are allowed. Default: the folders found.

    Raises:
        CrystalscopeError: no class folders, an unknown class, or a class folder without images.

    Example:
        >>> ds = index_folder("split/test")  # doctest: +SKIP
        >>> ds.class_names, len(ds)  # doctest: +SKIP
        (['cex', 'pg'], 684)
    """
    folders = class_folders(root)
    if not folders:
        raise CrystalscopeError(f"{root}: no class folders found (expected one sub-folder of images per class)")
    names = list(class_names) if class_names is not None else list(folders)
    unknown = [n for n in folders if n not in names]
    if unknown:
        raise CrystalscopeError(
            f"{root}: class folder(s) {', '.join(unknown)} are not classes of the model ({', '.join(names)})")
    paths: list[Path] = []
    labels: list[int] = []
    for name, folder in folders.items():
        files = list_images(folder, recursive=True)
        if not files:
            raise CrystalscopeError(f"{folder}: class {name!r} has no images")
        paths += files
        labels += [names.index(name)] * len(files)
    return ImageFolder(Path(root), paths, np.asarray(labels, dtype=np.int64), names)


def index_split(data_dir: str | os.PathLike) -> dict[str, ImageFolder]:
    """Index ``train/``, ``val/`` and ``test/`` of a split folder; they must share their classes.

    The split folders are found by :func:`crystalscope.data.layout.find_split_folders` (all
    three names, any case), as ``audit`` finds them.

    Raises:
        CrystalscopeError: a split is missing, classes differ between splits, fewer than two
            classes, or a class without images.

    Example:
        >>> index_split("split")["test"].class_names  # doctest: +SKIP
        ['cex', 'pg']
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CrystalscopeError(f"{data_dir}: folder not found")
    folders = find_split_folders(data_dir)
    if folders is None:
        raise CrystalscopeError(
            f"{data_dir}: missing split folder(s) {', '.join(SPLITS)}; expected train/, val/ and test/ "
            "(any case) (make one with `crystalscope split`)")
    splits = {s: index_folder(folders[s]) for s in SPLITS}
    reference = splits["train"].class_names
    for s in ("val", "test"):
        if splits[s].class_names != reference:
            raise CrystalscopeError(
                f"{data_dir}: classes differ between splits: train has {', '.join(reference)}, "
                f"{s} has {', '.join(splits[s].class_names)}")
    if len(reference) < 2:
        raise CrystalscopeError(f"{data_dir}: only one class ({reference[0]}); a classifier needs at least two")
    return splits


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/crystalscope`` (``~/.cache/crystalscope`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crystalscope"


def cache_key(paths: list[Path], preprocessing: Preprocessing) -> str:
    """Hash of the files (absolute path, size, mtime) and the resize geometry.

    Mean and std are left out on purpose: the cache holds uint8 pixels before normalisation,
    so two backbones with different normalisation share it.
    """
    geometry = {k: v for k, v in preprocessing.to_dict().items() if k not in ("mean", "std")}
    digest = hashlib.sha256(json.dumps(geometry, sort_keys=True).encode())
    for p in paths:
        st = p.stat()
        digest.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def decode_images(paths: list[Path], preprocessing: Preprocessing, *, workers: int | None = None,
                  description: str = "decoding", progress: bool = True) -> np.ndarray:
    """Decode and resize ``paths`` in a thread pool into ``uint8 (N, size, size, 3)``.

    Raises:
        ImageReadError: naming the first file that cannot be decoded.
    """
    size = preprocessing.image_size
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    # threads, not processes: Pillow releases the GIL while decoding and resampling
    workers = default_workers(workers or None, cap=cpu_count())  # 0 or None: every CPU

    def decode_one(i: int) -> None:
        out[i] = preprocessing.resize_uint8(paths[i])

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with progress_bar(description, len(paths), enabled=progress) as advance:
            for done, _ in enumerate(pool.map(decode_one, range(len(paths))), start=1):
                advance(done)
    finally:
        # on an error or Ctrl-C, drop the queued files instead of decoding them all first
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def load_images(paths: list[Path], preprocessing: Preprocessing, *, workers: int | None = None,
                cache_dir: str | os.PathLike | None = None, description: str = "decoding",
                progress: bool = True) -> np.ndarray:
    """Like :func:`decode_images`, through the on-disk cache (``cache_dir="off"`` disables it).

    Example:
        >>> ds = index_folder("split/train")  # doctest: +SKIP
        >>> load_images(ds.paths, Preprocessing(image_size=64)).shape  # doctest: +SKIP
        (9564, 64, 64, 3)
    """
    if str(cache_dir) == "off":
        return decode_images(paths, preprocessing, workers=workers, description=description, progress=progress)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = folder / f"images-{cache_key(paths, preprocessing)}.npy"
    if cache_file.is_file():
        try:
            cached = np.load(cache_file)
            if cached.shape == (len(paths), preprocessing.image_size, preprocessing.image_size, 3):
                log.debug("%s: %d images from the decode cache %s", description, len(paths), cache_file)
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is simply rebuilt
    images = decode_images(paths, preprocessing, workers=workers, description=description, progress=progress)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, images)
    except OSError as exc:  # a read-only cache location must not stop training
        log.debug("decode cache not written (%s): %s", cache_file, first_line(exc))
    return images


def data_hash(root: str | os.PathLike, paths: list[Path]) -> str:
    """SHA-256 of a folder's images: each file's path relative to ``root`` and its bytes.

    Relative names make ``split/train`` and a copy of it elsewhere hash the same.

    Example:
        >>> data_hash("split/train", index_folder("split/train").paths)  # doctest: +SKIP
        'sha256:3f0c...'
    """
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: Path(p).relative_to(root).as_posix().lower()):
        digest.update(Path(path).relative_to(root).as_posix().lower().encode() + b"\0")
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"
