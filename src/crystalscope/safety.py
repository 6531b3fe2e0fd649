"""The one output-safety rule every command that writes follows.

A plant tool must never lose a user's file. Every command that writes (``synth``, ``split``,
``audit``, ``train``, ``evaluate``, ``export``, ``predict``, and any command added later) asks
:func:`claim_output` before it writes, and writes through :mod:`crystalscope.io`:

1. **Never onto an input.** An output that is, contains or is inside any input (a model, a
   data folder, an image) is refused with one line (exit 2): ``predict m.onnx imgs --out
   m.onnx`` cannot turn the model into a CSV.
2. **Never delete what we did not write.** A folder is ours only if we wrote it: every folder
   output (run folder, report folder, dataset, split) holds a manifest
   (``crystalscope-manifest.json``, :mod:`crystalscope.io`) listing each file the command
   wrote with its size and SHA-256. A folder output is either new/empty, or it is replaced
   only when its manifest was written by the same command and vouches for every file in it,
   nested ones included, *and* the user passed ``--force``; a folder holding anything else
   (a file not listed, a listed file since edited, or no manifest at all, e.g. an output of
   a version before manifests) is refused with one line naming it, whatever ``--force`` says.
   Replacing deletes only the listed files. The current folder and its parents are never an
   output folder.
3. **Only plain files are replaced.** A file output may replace an earlier file of the same
   name; one that exists and is not a regular file (a device such as ``/dev/null``, a FIFO, a
   socket, or a link to one) is refused, so the atomic rename never lands on it.
4. **Leftovers are cleaned.** :func:`crystalscope.io.atomic_path` and
   :func:`crystalscope.io.atomic_dir` stage under hidden names that carry the writer's process
   id (``.NAME.<pid>.<random>.tmp`` / ``.partial``); a later claim removes those of processes
   that no longer run (e.g. after ``kill -9``).
5. **One writer per output.** A lock file ``.NAME.lock`` (holding the pid) beside the output
   makes a second process writing the same output fail at once with one line, instead of
   one result set silently replacing the other. A lock left by a dead process is taken over.

Adopting it in a new command (monitor, serve, explain, ...)::

    from crystalscope.safety import claim_output

    with claim_output(out, inputs=[model, data_dir], kind="folder", force=force,
                      command="evaluate") as out:
        with atomic_dir(out, force=True, command="evaluate") as staging:  # writes the manifest
            ...write into staging...

(or :func:`report_folder`, which does both). A command that writes a folder in place records
what it wrote with :func:`crystalscope.io.record_files`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Iterable, Iterator

from crystalscope.errors import OutputError
from crystalscope.io import STAGING_NAME, foreign_entry, holds_output, remove_recorded


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(Path(path).expanduser())))  # resolve() raises on a link loop


def _overlap(out: Path, inp: Path) -> str | None:
    """How ``out`` collides with ``inp`` (resolved paths), or None."""
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "is inside"
    return None


def check_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 kind: str = "file", force: bool = False, command: str | None = None,
                 option: str = "--out", resume: bool = False) -> Path:
    """Refuse an output path that would destroy an input or a user's files (see module doc).

    Args:
        out: the output file or folder.
        inputs: every file or folder the command reads (None entries are ignored).
        kind: ``"file"`` (one file, replaced atomically) or ``"folder"`` (a run/report/data folder).
        force: for folders, allow replacing an earlier output of this command.
        command: for folders, the command writing it (``"split"``): a folder whose manifest
            another command wrote is refused (``None``: any crystalscope manifest will do).
        option: the option name used in the error message.
        resume: for folders, the command continues its own earlier output in place
            (``train --resume``): the content is not checked.

    Returns:
        ``out`` as a Path.

    Raises:
        OutputError: one line naming the option, the path and what to do.

    Example:
        >>> check_output("preds.csv", inputs=["model.onnx", "imgs"])  # doctest: +SKIP
        PosixPath('preds.csv')
    """
    path = Path(out)
    target = _resolved(path)
    for item in inputs:
        if item is None:
            continue
        how = _overlap(target, _resolved(item))
        if how:
            raise OutputError(f"{option} {path} {how} the input {item}: the command would overwrite what it "
                              "reads; choose an output path outside every input")
    if kind == "file":
        _check_file(path, target, option)
    elif kind == "folder":
        _check_folder(path, target, force, command, option, resume)
    else:  # pragma: no cover - programming error
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    return path


def _check_file(path: Path, target: Path, option: str) -> None:
    if target.is_dir():
        raise OutputError(f"{option} {path} is a folder: give a file name")
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a device is a device
    except OSError:  # missing (a new file), or unreadable: the write itself reports that
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{option} {path} exists and is not a regular file ({_file_type(mode)}): "
                          "crystalscope replaces only plain files; give a file name")
    _check_parent(path, target, option)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def _check_parent(path: Path, target: Path, option: str) -> None:
    """The nearest existing ancestor of the output must be a folder (``a.txt/out`` is not)."""
    parent = _existing_parent(target)
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder; choose another path")


def _check_folder(path: Path, target: Path, force: bool, command: str | None, option: str,
                  resume: bool = False) -> None:
    cwd = _resolved(Path.cwd())
    if cwd.is_relative_to(target):
        raise OutputError(f"{option} {path} is the current folder or one above it: give a new sub-folder "
                          f"name, e.g. {option} out")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{option} {path} is a file: give a folder path")
    _check_parent(path, target, option)
    if resume or not target.is_dir():
        return
    problem = foreign_entry(target, command)
    if problem:  # --force never overrides this: it replaces our files, not the user's
        raise OutputError(f"{option} {path} {problem}: choose a new folder; nothing was changed")
    if not holds_output(target):
        return  # no file and no manifest: nothing to lose
    if not force:
        raise OutputError(f"{option} {path} holds an earlier output: pass --force to replace it "
                          "(swapped in only once the new one is complete)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove staging leftovers (``.tmp``/``.partial``/``.old-``) of crystalscope processes that
    no longer run; returns what was removed. Files of other programs are never touched.

    Example:
        >>> clean_stale("runs/train/weights")  # doctest: +SKIP
        [PosixPath('runs/train/weights/.last.ckpt.4242.k3j2.tmp')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in list(folder.iterdir()):
        match = STAGING_NAME.match(entry.name)
        if match:
            pid = int(match.group("pid") or match.group("oldpid"))
            if not _alive(pid):
                if match.group("old") and entry.is_dir() and not entry.is_symlink():
                    remove_recorded(entry)  # an earlier output being replaced: only its recorded files
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)  # a staging folder: all ours
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
            removed += clean_stale(entry, recursive=False)
    return removed


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it."""
    target = Path(out)
    return target.parent / f".{target.name or 'out'}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` while the body writes it.

    Raises:
        OutputError: another running crystalscope process holds the lock.

    Example:
        >>> with output_lock("predictions.csv"):  # doctest: +SKIP
        ...     write_text("predictions.csv", csv_text)
    """
    lock = lock_path(out)
    for _ in range(2):
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and _alive(holder):
                raise OutputError(f"{option} {out} is being written by another crystalscope process (pid {holder}): "
                                  "wait for it, or choose another output") from None
            lock.unlink(missing_ok=True)  # a dead writer's lock
            continue
        except OSError as exc:  # read-only, permission, full: name the output, not our lock file
            raise OSError(exc.errno, exc.strerror, str(out)) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:  # pragma: no cover - a race lost twice
        raise OutputError(f"{option} {out}: could not take the lock {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 kind: str = "file", force: bool = False, command: str | None = None,
                 option: str = "--out", resume: bool = False) -> Iterator[Path]:
    """:func:`check_output`, then clean stale leftovers and hold :func:`output_lock` while writing.

    Example:
        >>> with claim_output("preds.csv", inputs=["model.onnx", "imgs"]) as out:  # doctest: +SKIP
        ...     write_text(out, csv_text)
    """
    path = check_output(out, inputs=inputs, kind=kind, force=force, command=command, option=option, resume=resume)
    with output_lock(path, option):
        clean_stale(_existing_parent(path))
        if kind == "folder":
            clean_stale(path, recursive=True)
        yield path


def _existing_parent(path: Path) -> Path:
    parent = _resolved(path).parent
    while not parent.exists():
        parent = parent.parent
    return parent


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system fault: the cause in words and the path.

    Example:
        >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/a/x.png"))
        'no space left on device while writing runs/a/x.png: free some space or choose another --out'
    """
    where = exc.filename or "a file"
    causes = {
        errno.ENOSPC: f"no space left on device while writing {where}: free some space or choose another --out",
        errno.EDQUOT: f"disk quota exceeded while writing {where}: free some space or choose another --out",
        errno.EROFS: f"read-only file system: cannot write {where}; choose a writable --out",
        errno.EACCES: f"permission denied: {where}; choose a folder you can write to (or fix its permissions)",
        errno.EPERM: f"operation not permitted: {where}; choose a folder you can write to",
        errno.ENOTDIR: f"{where}: a path component is a file, not a folder",
        errno.EISDIR: f"{where} is a folder where a file was expected",
        errno.ENOENT: f"{where}: no such file or folder",
        errno.EEXIST: f"{where} already exists",
        errno.EMFILE: f"too many open files while reading {where}: lower --workers",
    }
    return causes.get(exc.errno, f"{where}: {exc.strerror or exc}")


@contextlib.contextmanager
def report_folder(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                  command: str, force: bool = False, option: str = "--out") -> Iterator[Path]:
    """A report folder written by the rule: claimed, built in staging, swapped in when complete.

    Yields the staging folder to write into; its manifest is written when it is swapped in.
    ``out`` must be new or empty, or hold an earlier output of ``command`` that its manifest
    vouches for, and ``force`` be given.

    Example:
        >>> with report_folder("embed-test", inputs=["model.onnx", "crops"],
        ...                    command="embed") as staging:  # doctest: +SKIP
        ...     write_text(staging / "embedding.csv", text)
    """
    from crystalscope.io import atomic_dir

    with claim_output(out, inputs=inputs, kind="folder", force=force, command=command, option=option) as path:
        with atomic_dir(path, force=True, command=command) as staging:  # claim_output already decided
            yield staging


def next_run_dir(base: str | os.PathLike = "runs", name: str = "train") -> Path:
    """The default output folder of a command: ``runs/train``, then ``runs/train2``, ``runs/train3``, ...

    Never an existing folder, so a default output can never replace an earlier one.

    Example:
        >>> next_run_dir("runs", "evaluate")  # doctest: +SKIP
        PosixPath('runs/evaluate2')
    """
    base = Path(base)
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}{n}"
    return candidate
