"""Atomic file writes: a crash never leaves a half-written file under its final name.

Staging names carry the writer's pid (``.NAME.<pid>.<random>.tmp`` / ``.partial``) so that
:func:`crystalscope.safety.clean_stale` can remove what a killed process left behind. An
``OSError`` raised while writing names the final path, not the hidden staging one, so the
CLI's one-line message ("no space left on device while writing runs/a/x.png") points at the
file the user asked for. Decide *whether* a path may be written with
:func:`crystalscope.safety.claim_output` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is renamed onto ``final``.

    Example:
        >>> with atomic_path("report.txt") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("hello")
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name lets crystalscope.safety.clean_stale remove it after a kill -9
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise _named(exc, final) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the result the permissions a plain open() would (umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
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


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a whole output folder beside ``final`` and swap it in only when complete.

    If the body raises, the partial folder is removed and ``final`` is untouched. With
    ``force`` an existing ``final`` is replaced (only after the new one is complete).
    """
    final = Path(final)
    if not final.name or final.name in (".", ".."):
        final = final.resolve()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    except OSError as exc:
        raise _named(exc, final) from None
    try:
        try:
            yield staging
        except OSError as exc:
            # a fault while building: name the final folder (the staging one is removed below)
            raise _named_in(exc, staging, final) from None
        if final.exists():
            if not force and any(final.iterdir()):
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
