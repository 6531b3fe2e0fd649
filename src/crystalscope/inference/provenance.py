"""What a predictions CSV is made of, written beside it, so resume and merge never mix.

Every ``predict`` CSV gets a sidecar ``<csv>.json`` (:func:`crystalscope.formats.predictions_sidecar`):
the model's SHA-256 and classes, the resolved input roots, and the options that change rows
(rejection on or off, recursive listing, the shard). ``predict --resume`` compares the
sidecar of the CSV it appends to with the new run's and refuses, naming what changed;
``merge`` compares the shards' sidecars, checks that each row belongs to its shard, that no
path appears twice and that no shard of I/N is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from crystalscope.errors import CrystalscopeError
from crystalscope.formats import PREDICTIONS_FORMAT, PREDICTIONS_IDENTITY, predictions_sidecar
from crystalscope.io import write_json

#: how each identity key is named in an error line
_NAMES = {"model_sha256": "the model (its SHA-256)", "class_names": "the model's classes",
          "inputs": "the input paths", "recursive": "--recursive/--no-recursive",
          "reject": "--reject/--no-reject", "shard": "--shard"}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks.

    Example:
        >>> file_sha256("model.onnx")  # doctest: +SKIP
        '5f1c...'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(model: str | os.PathLike, class_names: Sequence[str], inputs: Sequence[str | os.PathLike], *,
               recursive: bool, reject: bool, shard: tuple[int, int] | None) -> dict:
    """The sidecar of a prediction run (before any row is written).

    Example:
        >>> provenance("m.onnx", ["cex", "pg"], ["crops"], recursive=True, reject=True, shard=None)  # doctest: +SKIP
        {'format': 'crystalscope-predictions/1', 'model_sha256': '5f1c...', ...}
    """
    from crystalscope.version import __version__

    return {"format": PREDICTIONS_FORMAT, "crystalscope": __version__, "model": str(model),
            "model_sha256": file_sha256(model), "class_names": list(class_names),
            "inputs": [os.path.realpath(p) for p in inputs], "recursive": bool(recursive), "reject": bool(reject),
            "shard": f"{shard[0]}/{shard[1]}" if shard else None}


def write_provenance(csv_path: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as the sidecar of ``csv_path`` (atomically)."""
    return write_json(predictions_sidecar(csv_path), record)


def read_provenance(csv_path: str | os.PathLike, what: str) -> dict:
    """The sidecar of ``csv_path``.

    Raises:
        CrystalscopeError: no sidecar, or one that is not ours (``what`` names the option).
    """
    sidecar = predictions_sidecar(csv_path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CrystalscopeError(
            f"{what}: {csv_path} has no {sidecar.name} beside it, so what made its rows is unknown "
            "(written by an older version, or by hand); predict again into a new --out") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CrystalscopeError(f"{what}: {sidecar} cannot be read as JSON ({exc}); predict again into a new --out") \
            from None
    if not isinstance(record, dict) or record.get("format") != PREDICTIONS_FORMAT:
        raise CrystalscopeError(f"{what}: {sidecar} is not a crystalscope predictions record "
                                f"({PREDICTIONS_FORMAT}); predict again into a new --out")
    return record


def differences(old: dict, new: dict, keys: Sequence[str] = (*PREDICTIONS_IDENTITY, "shard")) -> list[str]:
    """What differs between two sidecars, in words (empty: the rows may be mixed).

    Example:
        >>> differences({"reject": True}, {"reject": False}, ["reject"])
        ['--reject/--no-reject (was True, now False)']
    """
    found = []
    for key in keys:
        if old.get(key) != new.get(key):
            found.append(f"{_NAMES.get(key, key)} (was {_short(old.get(key))}, now {_short(new.get(key))})")
    return found


def _short(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(csv_path: str | os.PathLike, new: dict) -> None:
    """Refuse to append ``new``'s rows to ``csv_path`` when its sidecar says other rows are there.

    Raises:
        CrystalscopeError: no sidecar, or one that differs (each difference named).
    """
    old = read_provenance(csv_path, "--resume")
    changed = differences(old, new)
    if changed:
        raise CrystalscopeError(f"--resume: {csv_path} was written with other settings: {'; '.join(changed)}; "
                                "resume with the same model, inputs and options, or choose a new --out")


def check_shards(parts: Sequence[Path], records: Sequence[dict], allow_partial: bool) -> dict:
    """The shards of one campaign: same identity, one N, each I once, none missing unless allowed.

    Returns:
        ``{"count": N, "given": [I...], "missing": [I...]}``.

    Raises:
        CrystalscopeError: one line naming the part at fault and what to do.
    """
    first = records[0]
    for part, record in zip(parts[1:], records[1:]):
        changed = differences(first, record, PREDICTIONS_IDENTITY)
        if changed:
            raise CrystalscopeError(f"merge: {part} and {parts[0]} were predicted differently: {'; '.join(changed)}; "
                                    "merge only the shards of one campaign")
    shards = [_parse(part, record.get("shard")) for part, record in zip(parts, records)]
    counts = {n for _, n in shards}
    if len(counts) != 1:
        raise CrystalscopeError(f"merge: the parts are shards of different counts ({', '.join(f'{i}/{n}' for i, n in shards)}); "
                                "merge the N shards of one --shard I/N campaign")
    count = counts.pop()
    seen: dict[int, Path] = {}
    for part, (index, _) in zip(parts, shards):
        if index in seen:
            raise CrystalscopeError(f"merge: {part} and {seen[index]} are both shard {index}/{count}; give each shard once")
        seen[index] = part
    missing = [i for i in range(count) if i not in seen]
    if missing and not allow_partial:
        raise CrystalscopeError(f"merge: shard {', '.join(f'{i}/{count}' for i in missing)} missing; give every "
                                "shard, or pass --allow-partial to merge what is there")
    return {"count": count, "given": sorted(seen), "missing": missing}


def _parse(part: Path, shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1  # an unsharded CSV is the one shard of 1
    index, count = (int(x) for x in str(shard).split("/"))
    return index, count
