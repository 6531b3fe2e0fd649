"""The live view of a monitored batch: ``serve MODEL --monitor MONITOR_OUT`` adds ``/live``.

The page polls ``/api/live`` (once a second) for what the monitor's output folder holds now:
the timeline rows, the alarms, the run's rule and the newest overlay frame. Everything is
read, never written: the monitor rewrites each file atomically, so a poll sees either the
previous frame's file or the next one, never half of one. No request leaves this server.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from crystalscope.errors import CrystalscopeError
from crystalscope.monitor.run import OVERLAY_SUBDIR
from crystalscope.monitor.sinks import RUN_FILE

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")


def check_monitor_dir(folder: str | Path) -> Path:
    """The monitor output folder to show, or a one-line error naming ``--monitor``.

    The folder may still be empty (a monitor about to start writes into it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CrystalscopeError(f"--monitor {folder}: folder not found; give the --out folder of "
                                "`crystalscope monitor`")
    return folder


def live_state(folder: Path, since: int = 0) -> dict:
    """What the page shows: rows from frame ``since`` on, alarms, rule, newest overlay.

    Example:
        >>> live_state(Path("run/monitor"))["rows"][-1]["ewma"]  # doctest: +SKIP
        '0.341200'
    """
    rows = _read_rows(folder / "timeline.csv")
    info = _read_json(folder / RUN_FILE, {})
    overlays = sorted((folder / OVERLAY_SUBDIR).glob("*.jpg")) if (folder / OVERLAY_SUBDIR).is_dir() else []
    return {"frames": len(rows), "rows": rows[since:], "alarms": _read_json(folder / "alarms.json", []),
            "run": info.get("run"), "watched": info.get("watched"), "class_names": info.get("class_names", []),
            "limit": (info.get("rule") or {}).get("fraction"), "rule": (info.get("rule") or {}).get("describe"),
            "overlay": overlays[-1].name if overlays else None}


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _read_json(path: Path, empty):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return empty


def add_live_routes(app: FastAPI, folder: Path) -> None:
    """``/live`` (the page), ``/api/live`` (its data) and ``/api/live/overlay/<name>.jpg``."""

    @app.get("/live", include_in_schema=False)
    def live_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "live.html")

    @app.get("/api/live", summary="The monitored batch now: timeline rows (from frame `since`), alarms, rule")
    def live(since: int = 0) -> dict:
        return live_state(folder, max(0, since))

    @app.get("/api/live/overlay/{name}", summary="One overlay frame of the monitored batch (JPEG)")
    def overlay(name: str) -> FileResponse:
        path = folder / OVERLAY_SUBDIR / name
        # only a plain file name of the overlay folder: no path can climb out of it
        if Path(name).name != name or not name.endswith(".jpg") or not path.is_file():
            raise HTTPException(404, f"no overlay frame {name!r}")
        return FileResponse(path, media_type="image/jpeg")
