"""Score a monitored run against the ground truth of ``synth-process`` (docs/monitor.md).

Detection: a detected box matches a true box at IoU >= 0.5 (greedy, best pairs first, one to
one). Classification accuracy is over matched particles the model classified (status ``ok``).
The fraction error compares each frame's measured fraction with the true share of PG among the
frame's visible particles. An alarm at or after the true onset is a detection (its delay is
counted from the onset); any alarm before it, or on a run without PG, is a false alarm.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from crystalscope.errors import CrystalscopeError
from crystalscope.monitor.frames import box_iou, read_truth

IOU_MATCH = 0.5


def match_boxes(detected: list[tuple], true: list[tuple], threshold: float = IOU_MATCH) -> list[tuple[int, int]]:
    """One-to-one ``(detected index, true index)`` pairs with IoU >= ``threshold``, best pairs first.

    Example:
        >>> match_boxes([(0, 0, 10, 10), (50, 50, 60, 60)], [(1, 1, 10, 10)])
        [(0, 0)]
    """
    pairs = sorted(((box_iou(d, t), i, j) for i, d in enumerate(detected) for j, t in enumerate(true)), reverse=True)
    used_d, used_t, matched = set(), set(), []
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_d and j not in used_t:
            used_d.add(i), used_t.add(j)
            matched.append((i, j))
    return matched


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _box(row: dict) -> tuple[int, int, int, int]:
    return tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))


def score_run(monitor_dir: str | os.PathLike, frames_dir: str | os.PathLike, watched: str = "pg") -> dict:
    """Detection precision/recall, accuracy, fraction MAE, onset delay and false alarms of one run.

    Example:
        >>> score_run("runs/a/monitor", "runs/a/frames")["recall"]  # doctest: +SKIP
        0.93
    """
    monitor_dir = Path(monitor_dir)
    truth = read_truth(frames_dir)
    if truth is None:
        raise CrystalscopeError(f"{frames_dir}: no ground truth next to it (truth/run.json from synth-process)")
    by_name = {Path(row["file"]).name: index for index, row in truth["frames"].items()}
    particles: dict[str, list[dict]] = {}
    for row in _read_csv(monitor_dir / "particles.csv"):
        particles.setdefault(row["file"], []).append(row)
    tp = fp = fn = correct = classified = 0
    rejected = {"cex": 0, "pg": 0}  # matched particles the model's rejection set aside, by true class
    errors = []
    for row in _read_csv(monitor_dir / "timeline.csv"):
        index = by_name.get(row["file"])
        if index is None or not row["status"] == "ok":
            continue
        found = particles.get(row["file"], [])
        true = truth["particles"].get(index, [])
        matched = match_boxes([_box(p) for p in found], [_box(t) for t in true])
        tp, fp, fn = tp + len(matched), fp + len(found) - len(matched), fn + len(true) - len(matched)
        for i, j in matched:
            if found[i]["status"] == "ok":
                classified += 1
                correct += found[i]["class"] == true[j]["class"]
            elif found[i]["status"] == "rejected":
                rejected[true[j]["class"]] = rejected.get(true[j]["class"], 0) + 1
        if row[f"{watched}_fraction"] and true:
            errors.append(abs(float(row[f"{watched}_fraction"]) - float(truth["frames"][index]["pg_fraction"])))
    alarms = json.loads((monitor_dir / "alarms.json").read_text(encoding="utf-8"))
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "true_particles": tp + fn,
            "accuracy": correct / max(classified, 1), "classified_matched": classified,
            **{f"rejected_true_{c}": n for c, n in rejected.items()},
            "fraction_mae": float(np.mean(errors)) if errors else None, **alarm_scores(alarms, truth)}


def alarm_scores(alarms: list[dict], truth: dict) -> dict:
    """Onset delay (first alarm at or after the onset) and false alarms (before it, or with no PG).

    Public so a benchmark can score the alarms another rule would have raised (replayed counts).

    Example:
        >>> truth = {"onset_s": 60.0, "frames": {0: {"time_s": "0"}, 1: {"time_s": "90"}}}
        >>> alarm_scores([{"time_s": 90.0}], truth)["onset_delay_s"]
        30.0
    """
    times = sorted(float(row["time_s"]) for row in truth["frames"].values())
    onset = truth["onset_s"]
    start = times[0]
    false = [a for a in alarms if onset is None or a["time_s"] + start < onset]
    in_control_s = (times[-1] if onset is None else onset) - start
    hits = [a["time_s"] + start - onset for a in alarms if onset is not None and a["time_s"] + start >= onset]
    return {"onset_s": onset, "onset_delay_s": hits[0] if hits else None, "false_alarms": len(false),
            "in_control_hours": in_control_s / 3600.0}
