"""Prediction at campaign scale: stream any number of files into one CSV, resumable and sharded.

:func:`predict_stream` is what ``crystalscope predict`` runs, and :func:`predict_paths` (the
Python API that also returns every row) is it with all rows kept. Three properties, each
needed once a campaign has millions of frames:

* **Bounded memory.** Files are listed lazily (:func:`iter_files`: one folder's names at a
  time, never the whole tree) and results are appended to the CSV every ``chunk`` files;
  only the counts and the first ``keep`` rows stay in memory.
* **Resumable.** With ``resume=True`` the CSV is appended to: rows already there are
  skipped, a last row cut short by a kill is dropped first, and a CSV with another header
  (another model's classes) is refused. Without ``resume`` the CSV appears under its name only
  when complete (the output-safety rule of :mod:`crystalscope.safety`).
* **Sharded.** ``shard=(i, n)`` keeps the files whose path hashes to ``i`` modulo ``n``
  (:func:`in_shard`): each file belongs to exactly one shard whatever the listing order, so
  N machines (a SLURM array, a Kubernetes Job) each run one shard and :func:`merge_csvs`
  joins their CSVs.

The rows come from :func:`~crystalscope.inference.predictor.prediction_columns` and
:func:`~crystalscope.inference.predictor.prediction_row`, so the streamed CSV has exactly
the columns of the in-memory one.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from crystalscope.data.layout import IMAGE_EXTENSIONS, is_image_file
from crystalscope.data.layout import is_hidden, real_path, walk_files
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.sheets import sheet_urgency
from crystalscope.inference.predictor import Prediction, Predictor, prediction_columns, predictions_csv
from crystalscope.formats import predictions_sidecar
from crystalscope.inference.provenance import check_resume, check_shards, provenance, write_provenance
from crystalscope.io import atomic_path
from crystalscope.runtime import ProgressCallback, progress_bar

logger = logging.getLogger(__name__)

#: ``--out -``: the CSV on standard output
STDOUT = "-"
#: Files per appended block: big enough that the write is cheap, small enough that a kill loses little.
DEFAULT_CHUNK = 512
#: fsync the CSV at most this often (one disk round trip per block is not needed: a killed
#: process loses nothing flushed; this bounds what a power cut loses)
SYNC_EVERY_S = 30.0


# ---- listing and sharding ------------------------------------------------------------------

def iter_files(paths: Sequence[str | os.PathLike], recursive: bool = True) -> Iterator[Path]:
    """Yield the files to label, lazily, in a fixed order (per folder, natural name order).

    A folder contributes its image files and (with ``recursive``) those of its sub-folders,
    depth first; only one folder's names are held at a time. A file given by name is yielded
    whatever its name. Hidden files and folders are skipped, as in
    :func:`~crystalscope.data.layout.list_images`. No file is yielded twice: a folder given
    twice or inside another given (recursive) folder is walked once, and a file given by name
    that a given folder's walk yields anyway comes from the walk.

    Raises:
        CrystalscopeError: a given path does not exist.

    Example:
        >>> next(iter_files(["crops/"]))  # doctest: +SKIP
        PosixPath('crops/CEX (1).png')
    """
    given = [Path(p) for p in paths]
    for path in given:
        if not os.path.lexists(path):  # a dangling or looping link given by name gets its error row
            raise CrystalscopeError(f"{path}: no such file or folder")
    folders = [real_path(p) for p in given if p.is_dir()]
    walked: set[Path] = set()
    named: set[Path] = set()  # files given by name: a handful, not the listing
    for path in given:
        key = real_path(path)
        if path.is_dir():
            # walked already, or inside a folder walked whole: no file gets two rows
            if key in walked or (recursive and any(f in key.parents for f in folders)):
                continue
            walked.add(key)
            yield from (p for p in walk_files(path, recursive) if is_image_file(p.name))
        elif key not in named and not _walked_anyway(key, folders, recursive):
            named.add(key)
            yield path


def _walked_anyway(file: Path, folders: list[Path], recursive: bool) -> bool:
    """Whether the walk of one of ``folders`` (resolved) yields the resolved ``file`` too."""
    if not is_image_file(file.name):
        return False
    return any((file.parent == f or (recursive and f in file.parents)) and not is_hidden(file, base=f)
               for f in folders)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/4"`` -> ``(1, 4)``; None stays None.

    Raises:
        CrystalscopeError: not ``I/N`` with ``0 <= I < N``.

    Example:
        >>> parse_shard("0/2")
        (0, 2)
    """
    if text is None:
        return None
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise CrystalscopeError(f"--shard {text}: expected I/N, e.g. 0/4 for the first of 4 shards") from None
    if count < 1 or not 0 <= index < count:
        raise CrystalscopeError(f"--shard {text}: I must be between 0 and N-1 (shards are numbered from 0)")
    return index, count


def in_shard(path: str | os.PathLike, shard: tuple[int, int] | None) -> bool:
    """Whether ``path`` (as written in the CSV) belongs to ``shard = (i, n)``.

    CRC-32 of the path text, not Python's ``hash`` (salted per process): every machine
    computes the same answer, whatever order its file system lists the files in.

    Example:
        >>> sum(in_shard("a.png", (i, 3)) for i in range(3))
        1
    """
    if shard is None or shard[1] == 1:
        return True
    return zlib.crc32(str(path).encode("utf-8", "surrogateescape")) % shard[1] == shard[0]


# ---- resuming ------------------------------------------------------------------------------

def existing_rows(csv_path: Path, header: list[str]) -> tuple[int, str | None]:
    """(complete rows, path of the last one) of a CSV to resume; a cut-off last row is removed.

    Raises:
        CrystalscopeError: the CSV's header is not ``header`` (another model or version).
    """
    _drop_partial_last_line(csv_path)
    rows, last = 0, None
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        found = next(reader, None)
        if found is None:
            return 0, None
        if found != header:
            raise CrystalscopeError(
                f"--resume: {csv_path} has the columns {','.join(found)[:120]}, not this model's "
                f"{','.join(header)[:120]}; use another --out (or the model that wrote it)")
        for row in reader:
            rows += 1
            last = row[0] if row else None
    return rows, last


def _drop_partial_last_line(csv_path: Path) -> None:
    """Truncate after the last newline: a kill during an append can cut the last row short."""
    with open(csv_path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            block = handle.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = position - step + newline + 1
                if end != size:
                    logger.warning("%s: dropped a last row cut short by an interruption", csv_path)
                    handle.truncate(end)
                return
            position -= step
        handle.truncate(0)


def _done_paths(csv_path: Path) -> set[str]:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return {row[0] for row in reader if row}


def _skip_done(files: Iterator[Path], csv_path: Path, n_done: int, last: str | None) -> Iterator[Path]:
    """``files`` without those already in the CSV.

    The CSV's rows are the listing's first ``n_done`` files when nothing changed on disk, so
    skipping by count keeps memory flat; if the ``n_done``-th file is not the CSV's last row
    (files added or removed meanwhile) the set of done paths is read instead.
    """
    head = list(itertools.islice(files, n_done))
    if not head or str(head[-1]) == last:
        return files
    logger.warning("%s: the files changed since the interrupted run; skipping by name", csv_path)
    done = _done_paths(csv_path)
    return (f for f in itertools.chain(head, files) if str(f) not in done)


# ---- the streamed prediction ---------------------------------------------------------------

@dataclass
class PredictSummary:
    """What a streamed prediction did (the rows themselves are in ``out_csv``).

    Attributes:
        model, backend, out_csv: the model file, ``torch`` or ``onnx``, the CSV written.
        class_names, temperature: the model's classes and calibration.
        n_images: rows written by this call; ``n_ok`` (accepted), ``n_rejected`` and
            ``n_errors`` (unreadable) add up to it.
        counts: accepted images per class.
        rejection: ``{"method", "threshold"}`` of the model's rejection, or None (not fitted or off).
        predictions: the first ``keep`` new rows (all of them with ``keep=None``).
        n_skipped: rows already in the CSV (``resume``); ``shard``: ``"I/N"`` or None.
        sheet: the contact sheet written, or None.
    """

    model: str
    backend: str
    out_csv: str
    class_names: list[str]
    temperature: float
    n_images: int = 0
    n_ok: int = 0
    n_rejected: int = 0
    n_errors: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    rejection: dict | None = None
    predictions: list[Prediction] = field(default_factory=list)
    n_skipped: int = 0
    shard: str | None = None
    sheet: str | None = None


@dataclass
class _Rows:
    """Where the rows go and how many are shown: the fixed settings of one streamed prediction."""

    predictor: Predictor
    batch_size: int | None
    chunk: int
    keep: int | None
    on_progress: ProgressCallback | None
    sheet_rows: "SheetRows | None"


def predict_stream(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike],
                   out_csv: str | os.PathLike = "predictions.csv", *, batch_size: int | None = None,
                   recursive: bool = True, device: str = "auto", resume: bool = False,
                   shard: tuple[int, int] | None = None, chunk: int = DEFAULT_CHUNK, keep: int | None = 20,
                   on_progress: ProgressCallback | None = None, reject: bool = True,
                   sheet: str | os.PathLike | None = None, sheet_max: int = 96) -> PredictSummary:
    """Label every image under ``paths`` into ``out_csv``, ``chunk`` files at a time.

    The one prediction path of the ``predict`` command and of :func:`predict_paths`.

    Args:
        resume: append to ``out_csv`` (created if absent), skipping rows it already holds.
        shard: ``(i, n)``: only the files :func:`in_shard` gives to shard ``i`` of ``n``.
        keep: how many rows the summary keeps (for the terminal table; ``None``: all); the rest
            are only in the CSV.
        on_progress: called as ``on_progress(rows done, None)`` after each appended chunk (the
            total is unknown: files are listed lazily).
        reject: ``False`` is ``--no-reject``: every readable image ``ok``.
        sheet: also write a PNG contact sheet (at most ``sheet_max`` images; beyond that the
            rejected, unreadable and least confident, kept in bounded memory while streaming).

    Example:
        >>> s = predict_stream("model.onnx", ["campaign/"], "part0.csv", shard=(0, 4), resume=True)  # doctest: +SKIP
        >>> s.n_images + s.n_skipped  # doctest: +SKIP
        250123
    """
    if (batch_size is not None and batch_size < 1) or chunk < 1:
        raise CrystalscopeError(f"--batch-size {batch_size} must be 1 or more")
    _check_sheet_options(sheet, sheet_max)
    if str(out_csv) == STDOUT:
        if resume:
            raise CrystalscopeError("--out -: --resume appends to a CSV file; give a file name to resume into")
        return _predict_to_stdout(model_path, paths, batch_size=batch_size, recursive=recursive, device=device,
                                  shard=shard, chunk=chunk, keep=keep, on_progress=on_progress, reject=reject,
                                  sheet=sheet, sheet_max=sheet_max)
    return _predict_to_file(model_path, paths, Path(out_csv), batch_size=batch_size, recursive=recursive,
                            device=device, resume=resume, shard=shard, chunk=chunk, keep=keep,
                            on_progress=on_progress, reject=reject, sheet=sheet, sheet_max=sheet_max)


def _predict_to_file(model_path, paths, out_csv: Path, *, recursive: bool, resume: bool, shard, reject: bool,
                     sheet, **options) -> PredictSummary:
    """The CSV written atomically (or appended to with ``resume``) and its provenance beside it."""
    from crystalscope.safety import check_output, claim_output

    sidecar = predictions_sidecar(out_csv)
    with claim_output(out_csv, inputs=[model_path, *paths], kind="file", resume=resume):
        check_output(sidecar, inputs=[model_path, *paths], kind="file")
        if sheet is not None:
            check_output(sheet, inputs=[model_path, out_csv, *paths], kind="file", option="--sheet")
        rows, predictor = _rows(model_path, reject=reject, sheet=sheet, **options)
        record = provenance(model_path, predictor.class_names, paths, recursive=recursive, reject=reject,
                            shard=shard)
        files = (f for f in iter_files(paths, recursive) if in_shard(f, shard))
        summary = _summary(model_path, out_csv, predictor, shard, sheet)
        if resume:
            _resume_into(out_csv, files, rows, summary, record)
        else:
            # the old sidecar goes first: a kill before the new one is written leaves a CSV
            # without provenance (refused by resume and merge), never one with another's
            sidecar.unlink(missing_ok=True)
            # not resumable: the CSV appears under its name only once complete
            with atomic_path(out_csv) as staging:
                _append_all(files, staging, rows, summary, header=True)
                _require_some(summary, paths, recursive, shard)
            write_provenance(out_csv, record)
        if sheet is not None:
            _write_sheet(rows.sheet_rows, sheet, model_path, predictor)
    if resume and summary.n_images + summary.n_skipped == 0:
        _require_some(summary, paths, recursive, shard)
    return summary


def _predict_to_stdout(model_path, paths, *, recursive: bool, shard, sheet, reject: bool,
                       **options) -> PredictSummary:
    """``--out -``: the CSV on standard output as it is predicted (no provenance file)."""
    import sys

    from crystalscope.safety import check_output

    if sheet is not None:
        check_output(sheet, inputs=[model_path, *paths], kind="file", option="--sheet")
    rows, predictor = _rows(model_path, reject=reject, sheet=sheet, **options)
    summary = _summary(model_path, Path(STDOUT), predictor, shard, sheet)
    summary.out_csv = "standard output"
    files = (f for f in iter_files(paths, recursive) if in_shard(f, shard))
    _write_rows(files, sys.stdout, rows, summary, header=True, sync=False)
    _require_some(summary, paths, recursive, shard)
    if sheet is not None:
        _write_sheet(rows.sheet_rows, sheet, model_path, predictor)
    return summary


def _rows(model_path, *, device: str, reject: bool, batch_size, chunk: int, keep, on_progress, sheet,
          sheet_max: int) -> tuple["_Rows", Predictor]:
    predictor = Predictor.load(model_path, device=device, reject=reject)
    return _Rows(predictor, batch_size, chunk, keep, on_progress,
                 SheetRows(sheet_max) if sheet is not None else None), predictor


def _summary(model_path, out_csv: Path, predictor: Predictor, shard, sheet) -> PredictSummary:
    """The summary before any row: the model's facts and zero counts."""
    rejection = predictor.rejection
    return PredictSummary(
        model=str(model_path), backend=predictor.backend_name, out_csv=str(out_csv),
        class_names=predictor.class_names, temperature=predictor.temperature,
        counts={c: 0 for c in predictor.class_names}, shard=f"{shard[0]}/{shard[1]}" if shard else None,
        rejection=None if rejection is None else {"method": rejection.method, "threshold": rejection.threshold},
        sheet=str(sheet) if sheet is not None else None)


def _resume_into(out_csv: Path, files: Iterator[Path], rows: _Rows, summary: PredictSummary, record: dict) -> None:
    """Append to ``out_csv`` the files it has no row for (a new CSV gets the header first).

    A CSV with rows is continued only when its provenance is this run's (:func:`check_resume`).
    """
    if out_csv.is_file() and out_csv.stat().st_size > 0:
        check_resume(out_csv, record)
        summary.n_skipped, last = existing_rows(out_csv, prediction_columns(rows.predictor.class_names))
        files = _skip_done(files, out_csv, summary.n_skipped, last)
    else:
        write_provenance(out_csv, record)  # first, so even a CSV cut short knows what made it
    header = not out_csv.is_file() or out_csv.stat().st_size == 0
    _append_all(files, out_csv, rows, summary, header=header)


def predict_paths(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike],
                  out_csv: str | os.PathLike = "predictions.csv", batch_size: int | None = None,
                  recursive: bool = True, progress: bool = True, device: str = "auto",
                  sheet: str | os.PathLike | None = None, sheet_max: int = 96, reject: bool = True) -> PredictSummary:
    """Label every image under ``paths``, write the CSV atomically and return every row.

    :func:`predict_stream` keeping all results (``predictions``) in memory: for the Python API,
    the demo and tests; the ``predict`` command streams. Unreadable files are rows with
    ``status = error: <reason>``; the caller decides the exit code (non-zero when no file could
    be read). ``reject=False`` is ``predict --no-reject``; ``progress`` shows the project's
    progress bar (:func:`crystalscope.runtime.progress_bar`) on stderr.

    Example:
        >>> s = predict_paths("model.onnx", ["crops/"], "predictions.csv")  # doctest: +SKIP
        >>> s.counts, s.n_rejected  # doctest: +SKIP
        ({'cex': 3, 'pg': 4}, 1)
    """
    with progress_bar("predicting", total=None, enabled=progress) as on_progress:
        return predict_stream(model_path, paths, out_csv, batch_size=batch_size, recursive=recursive,
                              device=device, keep=None, on_progress=on_progress, reject=reject, sheet=sheet,
                              sheet_max=sheet_max)


def _check_sheet_options(sheet, sheet_max: int) -> None:
    if sheet is not None and Path(sheet).suffix.lower() != ".png":
        raise CrystalscopeError(f"--sheet {sheet}: give a .png file name such as predictions.png")
    if sheet_max < 1:
        raise CrystalscopeError(f"--sheet-max {sheet_max}: must be 1 or more")


class SheetRows:
    """The rows a contact sheet shows, in bounded memory: all of them while at most ``limit``,
    then the rejected, unreadable and least confident (the same order the sheet uses)."""

    def __init__(self, limit: int):
        self.limit, self.rows, self.total = limit, [], 0

    def add(self, predictions: Sequence[Prediction]) -> None:
        self.total += len(predictions)
        self.rows += predictions
        if len(self.rows) > self.limit:
            self.rows = sorted(self.rows, key=sheet_urgency)[:self.limit]


def _write_sheet(rows: SheetRows, sheet, model_path, predictor: Predictor) -> None:
    from crystalscope.evaluation.sheets import prediction_sheet

    try:
        prediction_sheet(rows.rows, sheet, limit=rows.limit, n_total=rows.total,
                         title=f"{Path(model_path).name} ({predictor.backend_name})")
    except OSError as exc:
        raise CrystalscopeError(f"--sheet {sheet}: cannot write the PNG ({exc.strerror or exc})") from None


def _append_all(files: Iterator[Path], csv_path: Path, rows: _Rows, summary: PredictSummary,
                header: bool) -> None:
    """Predict ``files`` in chunks, append each chunk's rows (flushed, synced now and then) to
    ``csv_path`` and count them into ``summary``."""
    with open(csv_path, "a", newline="", encoding="utf-8") as handle:
        _write_rows(files, handle, rows, summary, header)
        os.fsync(handle.fileno())


def _write_rows(files: Iterator[Path], handle, rows: _Rows, summary: PredictSummary, header: bool,
                sync: bool = True) -> None:
    """Predict ``files`` in chunks and write each chunk's rows to the open ``handle`` at once
    (``sync``: fsync a file now and then; a pipe cannot be synced)."""
    class_names = rows.predictor.class_names
    synced = time.monotonic()
    if header:
        handle.write(predictions_csv([], class_names))
    while block := list(itertools.islice(files, rows.chunk)):
        predictions = rows.predictor.predict(block, batch_size=rows.batch_size)
        handle.write(predictions_csv(predictions, class_names, header=False))
        handle.flush()  # a killed process loses at most the block being predicted
        if time.monotonic() - synced > SYNC_EVERY_S and sync:  # a power cut, at most this much more
            os.fsync(handle.fileno())
            synced = time.monotonic()
        _count(predictions, rows, summary)
        if rows.on_progress is not None:
            rows.on_progress(summary.n_images, None)


def _count(predictions: Sequence[Prediction], rows: _Rows, summary: PredictSummary) -> None:
    """Add one chunk's rows to the counts, the rows kept for the table and the sheet."""
    for p in predictions:
        if p.ok:
            summary.counts[p.predicted] += 1
        summary.n_rejected += p.rejected
    shown = summary.predictions
    shown += predictions if rows.keep is None else predictions[:max(0, rows.keep - len(shown))]
    if rows.sheet_rows is not None:
        rows.sheet_rows.add(predictions)
    summary.n_images += len(predictions)
    summary.n_ok = sum(summary.counts.values())
    summary.n_errors = summary.n_images - summary.n_ok - summary.n_rejected


def _require_some(summary: PredictSummary, paths, recursive: bool, shard) -> None:
    if summary.n_images:
        return
    where = ", ".join(str(p) for p in paths) or "(no paths given)"
    hint = f" in shard {shard[0]}/{shard[1]}" if shard and shard[1] > 1 else ""
    hint += "" if recursive else " (add --recursive to look in subfolders)"
    raise CrystalscopeError(f"no image files found in {where}{hint}: expected {', '.join(IMAGE_EXTENSIONS)}")


# ---- joining shard outputs -----------------------------------------------------------------

def merge_csvs(parts: Sequence[str | os.PathLike], out_csv: str | os.PathLike, *, allow_partial: bool = False) -> dict:
    """Join the CSVs of the shards of one campaign into ``out_csv``, streaming.

    Rows keep each part's order, parts in the order given. Refused (nothing written): a part
    given twice (also through another path to it), parts whose provenance differs (another
    model, classes, inputs or options), two parts of the same shard, a missing shard of I/N
    (unless ``allow_partial``), a row whose path is not of its part's shard or appears twice,
    different headers, or a cut-off last row (finish that shard with ``predict --resume``).
    The merged CSV gets its own provenance file (``shard`` None, the parts and any missing shard).

    Returns:
        ``{"out_csv", "rows", "parts", "missing_shards": ["I/N", ...]}``.

    Example:
        >>> merge_csvs(["part0.csv", "part1.csv"], "predictions.csv")["rows"]  # doctest: +SKIP
        250123
    """
    from crystalscope.safety import check_output, claim_output

    parts = [Path(p) for p in parts]
    if not parts:
        raise CrystalscopeError("merge: give the shard CSVs to join")
    records = _merge_records(parts)
    shards = check_shards(parts, records, allow_partial)
    out_csv = Path(out_csv)
    with claim_output(out_csv, inputs=parts, kind="file"):
        check_output(predictions_sidecar(out_csv), inputs=parts, kind="file")
        predictions_sidecar(out_csv).unlink(missing_ok=True)
        with atomic_path(out_csv) as staging, open(staging, "w", newline="", encoding="utf-8") as out:
            rows = _merge_rows(parts, records, out)
        missing = [f"{i}/{shards['count']}" for i in shards["missing"]]
        write_provenance(out_csv, {**records[0], "shard": None, "parts": [str(p) for p in parts],
                                   "missing_shards": missing})
    return {"out_csv": str(out_csv), "rows": rows, "parts": len(parts), "missing_shards": missing}


def _merge_records(parts: list[Path]) -> list[dict]:
    """Each part's provenance, after refusing a missing, cut-off or twice-given part."""
    from crystalscope.inference.provenance import read_provenance

    seen: dict[tuple[int, int], Path] = {}
    for part in parts:
        if not part.is_file():
            raise CrystalscopeError(f"merge: {part}: no such file")
        info = part.stat()
        key = (info.st_dev, info.st_ino)
        if key in seen:
            raise CrystalscopeError(f"merge: {part} is the same file as {seen[key]}: give each shard once")
        seen[key] = part
        with open(part, "rb") as raw:
            raw.seek(max(0, raw.seek(0, os.SEEK_END) - 1))
            if raw.tell() and raw.read(1) != b"\n":
                raise CrystalscopeError(f"merge: {part} ends in a cut-off row; finish that shard with "
                                        "`crystalscope predict ... --resume` first")
    return [read_provenance(part, "merge") for part in parts]


def _merge_rows(parts: list[Path], records: list[dict], out) -> int:
    """Copy the rows of every part into ``out``; each path once, and only in its own shard."""
    import hashlib

    header, rows, seen = None, 0, set()
    for part, record in zip(parts, records):
        shard = parse_shard(record["shard"]) if record.get("shard") else None
        with open(part, newline="", encoding="utf-8") as handle:
            first = handle.readline()
            if header is None:
                header = first
                out.write(first)
            elif first != header:
                raise CrystalscopeError(f"merge: {part} has other columns than {parts[0]}; merge only shards of one model")
            for line_number, row in enumerate(csv.reader(handle), start=2):
                path = row[0] if row else ""
                if not in_shard(path, shard):
                    raise CrystalscopeError(f"merge: {part} line {line_number}: {path} is not of shard {record['shard']}; "
                                            "was the CSV edited? predict that shard again")
                # 8 bytes a path instead of the path: flat enough for millions of rows
                key = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
                if key in seen:
                    raise CrystalscopeError(f"merge: {part} line {line_number}: {path} has a row already; "
                                            "each image must be in one shard once")
                seen.add(key)
                csv.writer(out, lineterminator="\n").writerow(row)
                rows += 1
    return rows
