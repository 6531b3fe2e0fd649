"""Atomic file writes: a crash never leaves a half-written file under its final name.

Staging names carry the writer's pid (``.NAME.<pid>.<random>.tmp`` / ``.partial``) so that
:func:`crystalscope.safety.clean_stale` can remove what a killed process left behind. An
``OSError`` raised while writing names the final path, not the hidden staging one, so the
CLI's one-line message ("no space left on device while writing runs/a/x.png") points at the
file the user asked for. Decide *whether* a path may be written with
:func:`crystalscope.safety.claim_output` first.

A folder is ours only if we wrote it (like pip's ``RECORD``): every folder a command writes
holds a manifest (:data:`crystalscope.formats.MANIFEST_FILE`) listing each file it wrote with
its size and SHA-256. :func:`atomic_dir` writes it when the staged folder is committed;
commands that write in place (a training run, the monitor) add their files with
:func:`record_files`. :func:`foreign_entry` names the first file a folder holds that its
manifest does not vouch for, and :func:`remove_recorded` deletes only the files it does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from crystalscope.errors import OutputError
from crystalscope.formats import MANIFEST_FILE, MANIFEST_FORMAT
from crystalscope.version import __version__

log = logging.getLogger(__name__)

# the staging names below: .NAME.<pid>.<random>.tmp|.partial and .NAME.old-<pid>
STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?:tmp|partial)$|^\.(?P<old>.+)\.old-(?P<oldpid>\d+)$")


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is one of our staging names (a write in progress or a killed one's leftover).

    Example:
        >>> is_staging_name(".last.ckpt.4242.k3j2.tmp"), is_staging_name("last.ckpt")
        (True, False)
    """
    return STAGING_NAME.match(name) is not None


def current_umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is renamed onto ``final``.

    Example:
        >>> with atomic_path("report.txt") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("hello")
    """
    final = Path(final)
    if final.is_symlink():  # replace the file the link points to and keep the link (never /dev's links)
        final = Path(os.path.realpath(final))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name lets crystalscope.safety.clean_stale remove it after a kill -9
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise _named(exc, final) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the result the permissions a plain open() would (umask)
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        # name the file the user asked for, not our hidden staging file
        raise _named(exc, final) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _named_in(exc: OSError, staging: Path, final: Path) -> OSError:
    """The OSError with the staging folder in its path replaced by ``final``."""
    name = str(exc.filename or final)
    if name.startswith(str(staging)):
        name = str(final) + name[len(str(staging)):]
    return OSError(exc.errno, exc.strerror or str(exc), name)


def _named(exc: OSError, final: Path) -> OSError:
    """The same OSError, naming ``final`` instead of a staging path."""
    named = OSError(exc.errno, exc.strerror or str(exc), str(final))
    return named


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---- the manifest: what a folder's command wrote ---------------------------------------------------

def file_record(path: str | os.PathLike) -> dict:
    """What a manifest says about one file: its size and SHA-256, or a link's target.

    Example:
        >>> file_record("runs/train/config.yaml")  # doctest: +SKIP
        {'size': 812, 'sha256': '5f1c...'}
    """
    path = Path(path)
    if path.is_symlink():
        return {"symlink": os.readlink(path)}
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _matches(path: Path, entry: dict) -> bool:
    """Whether ``path`` is still the file (or link) ``entry`` recorded."""
    info = path.lstat()
    if "symlink" in entry:
        return stat.S_ISLNK(info.st_mode) and os.readlink(path) == entry["symlink"]
    # a device or FIFO is never ours, and opening one could block
    if not stat.S_ISREG(info.st_mode) or info.st_size != entry.get("size"):
        return False
    return file_record(path).get("sha256") == entry.get("sha256")


def folder_entries(folder: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """Every entry below ``folder`` that is not a folder (files, links, devices), nested ones
    too, sorted, as ``(relative POSIX path, path)``; the manifest and staging names are left out.

    Example:
        >>> [rel for rel, _ in folder_entries("synth")][:1]  # doctest: +SKIP
        ['cropped/cropped/cex/cex_0000.png']
    """
    def walk(directory: str, prefix: str) -> Iterator[tuple[str, Path]]:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if is_staging_name(entry.name) or (not prefix and entry.name == MANIFEST_FILE):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from walk(entry.path, f"{prefix}{entry.name}/")
            else:
                yield f"{prefix}{entry.name}", Path(entry.path)

    yield from walk(os.fspath(folder), "")


def holds_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a manifest or any file (nested ones too); empty sub-folders and
    staging names do not count.

    Example:
        >>> holds_output("runs/new")  # doctest: +SKIP
        False
    """
    return (Path(folder) / MANIFEST_FILE).exists() or next(iter(folder_entries(folder)), None) is not None


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of ``folder``, or None when it has none (or an unreadable one).

    Example:
        >>> read_manifest("synth")["command"]  # doctest: +SKIP
        'synth'
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def write_manifest(folder: str | os.PathLike, command: str, files: dict) -> Path:
    """Write ``folder``'s manifest (atomically): ``files`` maps relative paths to :func:`file_record`."""
    return write_json(Path(folder) / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "command": command,
                                                     "version": __version__, "files": dict(sorted(files.items()))})


def record_folder(folder: str | os.PathLike, command: str) -> Path:
    """Record every file now below ``folder`` as written by ``command`` (a folder it built alone).

    Example:
        >>> record_folder(staging, "split")  # doctest: +SKIP
    """
    return write_manifest(folder, command, {rel: file_record(path) for rel, path in folder_entries(folder)})


def record_files(folder: str | os.PathLike, paths: Iterable[str | os.PathLike], command: str) -> Path:
    """Add files just written in place below ``folder`` to its manifest (earlier entries kept;
    a path that no longer exists is dropped).

    Example:
        >>> record_files("runs/train", ["runs/train/metrics.csv"], "train")  # doctest: +SKIP
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = dict(manifest["files"]) if manifest else {}
    root = os.path.abspath(folder)
    for path in paths:
        rel = Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
        if rel.startswith("../"):  # pragma: no cover - programming error
            raise ValueError(f"{path} is not inside {folder}")
        if os.path.islink(path) or os.path.isfile(path):
            files[rel] = file_record(path)
        else:
            files.pop(rel, None)
    return write_manifest(folder, command, files)


def foreign_entry(folder: str | os.PathLike, command: str | None = None) -> str | None:
    """Why ``folder`` is not wholly an output crystalscope wrote, or None when it is (or is empty).

    Ours means: the folder holds our manifest (written by ``command``, when given) and every
    file below it, nested ones too, is listed there with the same size and SHA-256.

    Example:
        >>> foreign_entry("my-data")  # doctest: +SKIP
        'is not empty: it holds cex/a.png and no crystalscope manifest (crystalscope-manifest.json), ...'
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        for rel, path in folder_entries(folder):
            if manifest is None:
                return (f"is not empty: it holds {rel} and no crystalscope manifest ({MANIFEST_FILE}), so crystalscope "
                        "did not write it (or wrote it before it kept manifests)")
            if command and manifest.get("command") != command:
                return f"holds the output of `crystalscope {manifest.get('command')}`, not of `{command}`"
            entry = manifest["files"].get(rel)
            if not isinstance(entry, dict):
                return f"holds {rel}, which crystalscope did not write there"
            if not _matches(path, entry):
                return f"holds {rel}, which was changed after crystalscope wrote it"
    except OSError as exc:
        return f"holds {exc.filename or folder}, which cannot be read"
    return None


def remove_recorded(folder: str | os.PathLike, keep_folder: bool = False) -> list[str]:
    """Delete the files ``folder``'s manifest lists (only while still the same size and hash),
    then the manifest and the folders left empty, ``folder`` itself too unless ``keep_folder``.

    Returns:
        What was left because it is not ours (relative paths); nothing else is ever deleted.

    Example:
        >>> remove_recorded("demo/run")  # doctest: +SKIP
        []
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    manifest = read_manifest(folder)
    recorded = manifest["files"] if manifest else {}
    left = []
    for rel, path in list(folder_entries(folder)):
        entry = recorded.get(rel)
        if isinstance(entry, dict) and _matches(path, entry):
            path.unlink()
        else:
            left.append(rel)
    if not left:
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
    for directory, _, _ in sorted(os.walk(folder), key=lambda item: -len(item[0])):
        if keep_folder and directory == os.fspath(folder):
            continue
        with contextlib.suppress(OSError):  # not empty: it holds what is not ours
            os.rmdir(directory)
    return left


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False, command: str = "crystalscope") -> Iterator[Path]:
    """Build a whole output folder beside ``final`` and swap it in only when complete.

    If the body raises, the partial folder is removed and ``final`` is untouched. On success
    the folder's manifest (every file in it, as written by ``command``) is written and the
    folder gets the permissions a plain ``mkdir`` would (umask). With ``force`` an existing
    ``final`` is replaced, only after the new one is complete and only if ``final`` is wholly
    ours (:func:`foreign_entry`); of the old folder only its recorded files are deleted.

    Example:
        >>> with atomic_dir("split", force=True, command="split") as staging:  # doctest: +SKIP
        ...     write_text(staging / "split.csv", text)
    """
    final = Path(final)
    if not final.name or final.name in (".", ".."):
        final = final.resolve()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
        # mkdtemp makes 0700: others the umask lets read must be able to read the output
        os.chmod(staging, 0o777 & ~current_umask())
    except OSError as exc:
        raise _named(exc, final) from None
    try:
        try:
            yield staging
            record_folder(staging, command)
        except OSError as exc:
            # a fault while building: name the final folder (the staging one is removed below)
            raise _named_in(exc, staging, final) from None
        if final.exists():
            _swap_in(final, staging, force)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(final: Path, staging: Path, force: bool) -> None:
    """Replace the existing ``final`` by ``staging``; of the old folder delete only what is ours."""
    if holds_output(final):
        if not force:
            raise FileExistsError(final)
        problem = foreign_entry(final)
        if problem:  # the caller's claim_output refuses this first; this is the last line of defence
            raise OutputError(f"{final} {problem}: choose a new folder; nothing was changed")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(staging, final)
    left = remove_recorded(old)
    if left:  # changed between the check and the swap: keep it, never delete it
        log.warning("%s: kept %s, which crystalscope did not write (in %s)", final, left[0], old)
