"""Measure `crystalscope monitor` on generated batch runs against their ground truth (docs/monitor.md).

Steps, all through the project's own library (the same code as `synth-process` and `monitor`):

1. ``feather``: what a crop-trained model says about CEX crops faded into a dark background over
   0-20 % of their side (why synth-process blends particles in with a narrow band only);
2. ``detector``: segmentation vs crop-sized tiles on one run (detection, accuracy, fraction MAE);
3. ``calibrate``: four runs with seeds kept apart from the evaluation (101-104: one with PG,
   three without) are monitored once; for each (lambda, K) the lowest limit whose false-alarm
   rate on in-control runs resampled from their per-frame counts is at most 0.05 per hour is
   found, and of those with no false alarm on the calibration runs the one with the shortest
   onset delay on seed 101 is kept;
4. ``evaluate``: fresh runs with PG and without, monitored with that rule on ONNX Runtime
   (no overlays): detection precision/recall at IoU >= 0.5, classification accuracy, fraction
   MAE, onset delay, false alarms per hour, frames per second (median and min-max over the
   runs without PG).

5. ``--measure``: counts and sizes against the renderer's truth on the evaluation seeds 1-5 and
   five dense runs (seeds 21-25, ``--density 6``), with particles lost to ``cluster`` or missed
   on the densest quarter of frames, alarms and frames/s; with ``--baseline-src`` each run is
   also monitored by another checkout (today's code) right before, for a fair comparison.

Example:
    PYTHONPATH=src .venv/bin/python benchmarks/monitor_bench.py /tmp/monitor-demo/run/model.onnx \\
        --work /tmp/monitor-bench
    # another rule on the same monitored runs (no model pass): --reuse --skip-detector --rule 0.15,2,0.1
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crystalscope.data.synth import DIFFICULTIES, render_cex
from crystalscope.inference.predictor import Predictor
from crystalscope.monitor.frames import ProcessSpec, generate_process, read_truth
from crystalscope.monitor.run import MonitorSettings, run_monitor
from crystalscope.monitor.score import alarm_scores, score_run
from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline

RUN = dict(frames=120, interval_s=30.0, pg_onset_s=1800.0)  # one hour, PG from 30 min
NO_PG = 1e9


def feather_check(model: Path, n: int = 60) -> dict:
    """Share of CEX crops still called CEX when faded to a dark level over a band of their side."""
    predictor = Predictor.load(model)
    rng = np.random.default_rng(2024)
    crops = [render_cex(rng, DIFFICULTIES["realistic"])[:, :, 0].astype(np.float32) for _ in range(n)]
    result = {}
    for band in (0.0, 0.06, 0.1, 0.2):
        def ramp(size):
            d = np.clip(np.minimum(np.arange(size) + 0.5, size - np.arange(size) - 0.5) / max(band * size, 1e-9), 0, 1)
            return d * d * (3 - 2 * d)
        images = []
        for grey in crops:
            window = np.outer(ramp(grey.shape[0]), ramp(grey.shape[1]))
            faded = 42.0 * (1 - window) + grey * window
            images.append(Image.fromarray(np.clip(faded + 0.5, 0, 255).astype(np.uint8)).convert("RGB"))
        result[band] = float(np.mean([p.predicted == "cex" for p in predictor.predict(images)]))
    return result


def replay(timeline_csv: Path, rule: AlarmRule) -> list[dict]:
    """The alarms a rule would have raised on a monitored run's recorded counts."""
    with open(timeline_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    timeline = Timeline(["cex", "pg"], "pg", rule)
    for r in rows:
        timeline.add(FrameRecord(int(r["frame"]), r["file"], float(r["time_s"]),
                                 {"cex": int(r["n_cex"]), "pg": int(r["n_pg"])}, status=r["status"]))
    return timeline.alarms


def monitored(work: Path, name: str, model: Path, seed: int, onset: float, settings: MonitorSettings,
              frames: int = RUN["frames"], reuse: bool = False) -> dict:
    """Generate (once) and monitor one run, and score it; ``reuse`` keeps an earlier monitor pass
    (its counts do not depend on the alarm rule) and replays ``settings.rule`` on them."""
    run = work / name
    if not (run / "truth" / "run.json").exists():
        generate_process(run, ProcessSpec(seed=seed, **{**RUN, "pg_onset_s": onset, "frames": frames}), force=True)
    speed = run / "speed.json"
    if not (reuse and speed.exists() and (run / "monitor" / "timeline.csv").exists()):
        started = time.perf_counter()
        summary = run_monitor(model, run / "frames", run / "monitor", settings, force=True)
        speed.write_text(json.dumps({"fps": summary["n_frames"] / (time.perf_counter() - started)}))
    scores = score_run(run / "monitor", run / "frames")
    scores.update(alarm_scores(replay(run / "monitor" / "timeline.csv", settings.rule), read_truth(run / "frames")))
    return {"name": name, "seed": seed, **json.loads(speed.read_text()), **scores}


#: What the calibrated rule may cost on runs without PG: one false alarm in 20 in-control hours.
FALSE_ALARMS_PER_HOUR = 0.05
CAL_RUNS = {"cal-pg": (101, RUN["pg_onset_s"]), "cal-nopg": (102, NO_PG), "cal-nopg2": (103, NO_PG),
            "cal-nopg3": (104, NO_PG)}


def in_control_counts(work: Path, names: list[str]) -> list[np.ndarray]:
    """Per calibration run, ``(n_pg, n_counted)`` of every readable frame before any PG was there."""
    runs = []
    for name in names:
        with open(work / name / "monitor" / "timeline.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"
                    and ("nopg" in name or float(r["time_s"]) < RUN["pg_onset_s"])]
        runs.append(np.array([(int(r["n_pg"]), int(r["n_cex"]) + int(r["n_pg"])) for r in rows]))
    return runs


def false_alarm_rate(runs: list[np.ndarray], rule: AlarmRule, sims: int = 500, seed: int = 0) -> float:
    """False alarms per hour of ``rule`` on in-control runs resampled frame by frame from each
    calibration run (so each run's own level of PG calls is kept); the same draws for every rule.

    The recursion is the one of :class:`Timeline` (start at 0, a frame with nothing counted carries
    the EWMA, re-arm below the limit), vectorised over the simulated runs.
    """
    rng = np.random.default_rng(seed)
    alarms = 0
    for counts in runs:
        drawn = counts[rng.integers(0, len(counts), size=(sims, RUN["frames"]))]
        ewma, above = np.zeros(sims), np.zeros(sims, dtype=int)
        for t in range(RUN["frames"]):
            k, n = drawn[:, t, 0], drawn[:, t, 1]
            fraction = k / np.maximum(n, 1)
            ewma = np.where(n > 0, rule.smoothing * fraction + (1 - rule.smoothing) * ewma, ewma)
            above = np.where(ewma > rule.fraction, above + 1, 0)
            alarms += int((above == rule.frames).sum())
    return alarms / (len(runs) * sims * RUN["frames"] * RUN["interval_s"] / 3600.0)


def calibrate(work: Path, model: Path, reuse: bool = False) -> AlarmRule:
    """The quickest rule whose false-alarm rate, simulated from calibration runs, is small enough.

    Calibration runs have seeds apart from the evaluation (101-104). For each lambda and K the
    lowest limit (0.01 steps) with at most :data:`FALSE_ALARMS_PER_HOUR` on resampled in-control
    runs is taken; of those with no false alarm on the calibration runs themselves and an alarm
    after the onset of the calibration run with PG, the one with the shortest delay there is kept
    (ties: the larger K, then the lower limit). Why not the textbook mean + 3 sigma limit: frames
    hold only a few counted particles, so the per-frame fraction is far from normal (mostly 0,
    sometimes 0.5 or 1) and that limit gave false alarms on fresh runs (docs/monitor.md).
    """
    for name, (seed, onset) in CAL_RUNS.items():
        monitored(work, name, model, seed, onset, MonitorSettings(), reuse=reuse)
    runs = in_control_counts(work, list(CAL_RUNS))
    pooled = sum(int(r[:, 0].sum()) for r in runs) / max(sum(int(r[:, 1].sum()) for r in runs), 1)
    print(f"in-control: {sum(len(r) for r in runs)} frames, {pooled:.3f} of counted particles called PG")
    best = None
    for smoothing, frames in itertools.product((0.05, 0.1, 0.2, 0.3), (1, 2, 3)):
        rule = next((AlarmRule(round(limit, 2), frames, smoothing) for limit in np.arange(0.10, 0.60, 0.01)
                     if false_alarm_rate(runs, AlarmRule(round(limit, 2), frames, smoothing)) <= FALSE_ALARMS_PER_HOUR), None)
        if rule is None:
            continue
        quiet = [a for name in CAL_RUNS if "nopg" in name for a in replay(work / name / "monitor" / "timeline.csv", rule)]
        alarms = replay(work / "cal-pg" / "monitor" / "timeline.csv", rule)
        delay = alarms[0]["time_s"] - RUN["pg_onset_s"] if alarms else None
        print(f"  {rule.describe()}: calibration delay {delay} s, {len(quiet)} alarms without PG")
        if quiet or delay is None or delay < 0:
            continue
        key = (delay, -frames, rule.fraction)
        if best is None or key < best[0]:
            best = (key, rule)
    if best is None:
        raise SystemExit("no rule raised an alarm after the onset within the false-alarm budget")
    print(f"calibrated rule: {best[1].describe()} (calibration delay {best[0][0]:.0f} s)")
    return best[1]


def screening_check(work: Path, name: str = "cal-pg") -> dict:
    """Focus measure of the true particles (focused vs out of focus) and the confidence of PG calls
    on particles that are truly CEX vs truly PG (matched at IoU >= 0.5), on one monitored run."""
    from crystalscope.monitor.detect import sharpness, to_grey
    from crystalscope.monitor.frames import read_truth
    from crystalscope.monitor.score import match_boxes

    run = work / name
    truth = read_truth(run / "frames")
    sharp: dict[str, list[float]] = {"focused": [], "out of focus": []}
    for index, particles in truth["particles"].items():
        grey = to_grey(Image.open(run / truth["frames"][index]["file"]))
        for p in particles:
            box = tuple(int(p[k]) for k in ("x0", "y0", "x1", "y1"))
            sharp["out of focus" if p["defocused"] == "1" else "focused"].append(sharpness(grey, box))
    with open(run / "monitor" / "particles.csv", newline="") as handle:
        found = list(csv.DictReader(handle))
    by_file: dict[str, list[dict]] = {}
    for row in found:
        by_file.setdefault(row["file"], []).append(row)
    confidence: dict[str, list[float]] = {"cex called pg": [], "pg called pg": []}
    for index, row in truth["frames"].items():
        rows = by_file.get(Path(row["file"]).name, [])
        true = truth["particles"].get(index, [])
        for i, j in match_boxes([tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1")) for r in rows],
                                [tuple(int(t[k]) for k in ("x0", "y0", "x1", "y1")) for t in true]):
            if rows[i]["class"] == "pg" and rows[i]["confidence"]:
                confidence[f"{true[j]['class']} called pg"].append(float(rows[i]["confidence"]))
    summary = {f"sharpness {k} p5/p50/p95": np.percentile(v, [5, 50, 95]).round(2).tolist() for k, v in sharp.items()}
    summary.update({f"confidence {k} p10/p50": np.percentile(v, [10, 50]).round(2).tolist() for k, v in confidence.items() if v})
    return summary


# ---- measures: counts and sizes against the renderer's truth, today's monitor alongside ----------

#: Evaluation runs of the measures: today's density (seeds 1-5, as ``evaluate``) and dense runs
#: (seeds 21-25, ``density`` 6: 30 rising to 60 particles a frame); none is used for tuning.
MEASURE_RUNS = (("pg-1", 1, 1.0, True), ("pg-2", 2, 1.0, True), ("nopg-3", 3, 1.0, False),
                ("nopg-4", 4, 1.0, False), ("nopg-5", 5, 1.0, False),
                ("dense-21", 21, 3.0, True), ("dense-22", 22, 3.0, True), ("dense-23", 23, 3.0, False),
                ("dense-24", 24, 3.0, False), ("dense-25", 25, 3.0, False))
#: A true particle counts as visible when later ones leave at least this much of it uncovered
#: (the detector's smallest region).
VISIBLE_AREA = 1600
_BASELINE_CHILD = """
import json, sys, time
from crystalscope.monitor.run import MonitorSettings, run_monitor
started, cpu = time.perf_counter(), time.process_time()
s = run_monitor(sys.argv[1], sys.argv[2], sys.argv[3], MonitorSettings(), force=True)
print(json.dumps({"fps": s["n_frames"] / (time.perf_counter() - started),
                  "cpu_fps": s["n_frames"] / (time.process_time() - cpu), "alarms": s["alarms"]}))
"""


def _monitor_timed(model: Path, run: Path, out: str, src: Path | None, settings=None) -> dict:
    """Monitor ``run`` into ``run/out``: with this checkout, or (``src``) another checkout's source."""
    import os
    import subprocess
    import sys

    if src is None:  # frames/s of the wall clock, and of this process's CPU time (steadier on a shared machine)
        started, cpu = time.perf_counter(), time.process_time()
        s = run_monitor(model, run / "frames", run / out, settings, force=True)
        return {"fps": s["n_frames"] / (time.perf_counter() - started),
                "cpu_fps": s["n_frames"] / (time.process_time() - cpu), "alarms": s["alarms"]}
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", _BASELINE_CHILD, str(model), str(run / "frames"), str(run / out)],
                          env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _lost_on_densest(run: Path, out: str) -> dict:
    """Share of visible true particles lost to ``cluster`` or missed (no IoU >= 0.5 box), on the
    densest quarter of frames (by visible true particles), and over all frames."""
    from crystalscope.monitor.score import match_boxes

    truth = read_truth(run / "frames")
    found: dict[str, list[dict]] = {}
    for row in _rows(run / out / "particles.csv"):
        found.setdefault(row["file"], []).append(row)
    per_frame = []
    for index, frame in truth["frames"].items():
        true = [p for p in truth["particles"].get(index, []) if float(p["visible_area_px2"]) >= VISIBLE_AREA]
        rows = found.get(Path(frame["file"]).name, [])
        box = lambda r: tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1"))  # noqa: E731
        kept = [i for i, r in enumerate(rows) if r["status"] != "cluster"]
        matched = match_boxes([box(rows[i]) for i in kept], [box(t) for t in true])
        per_frame.append((len(true), len(true) - len(matched)))
    per_frame.sort(reverse=True)
    dense = per_frame[:max(1, len(per_frame) // 4)]
    return {"lost_densest_quarter": sum(l for _, l in dense) / max(sum(n for n, _ in dense), 1),
            "lost_all": sum(l for _, l in per_frame) / max(sum(n for n, _ in per_frame), 1)}


def _size_scores(run: Path, out: str) -> dict:
    """Measured vs true per frame counts, and pooled D50 (ECD, length) and median aspect per class."""
    truth = read_truth(run / "frames")
    rows = _rows(run / out / "particles.csv")
    unit = "um" if "ecd_um" in rows[0] else "px"
    scale = float(truth.get("um_per_px") or 1.0) if unit == "um" else 1.0
    measured = [r for r in rows if r["status"] != "cluster" and r.get(f"ecd_{unit}")]
    counts: dict[str, int] = {}
    for r in measured:
        counts[r["file"]] = counts.get(r["file"], 0) + 1
    errors, totals = [], [0, 0]
    for index, frame in truth["frames"].items():
        visible = sum(float(p["visible_area_px2"]) >= VISIBLE_AREA for p in truth["particles"].get(index, []))
        n = counts.get(Path(frame["file"]).name, 0)
        totals[0], totals[1] = totals[0] + n, totals[1] + visible
        if visible:
            errors.append(abs(n - visible) / visible)
    scores = {"count_ratio": totals[0] / max(totals[1], 1), "count_mape": float(np.mean(errors)),
              "true_visible_per_frame": totals[1] / len(truth["frames"])}
    true_all = [p for ps in truth["particles"].values() for p in ps if float(p["visible_area_px2"]) >= VISIBLE_AREA]
    for group in ("all", "cex", "pg"):
        mine = measured if group == "all" else [r for r in measured if r["status"] == "ok" and r["class"] == group]
        true = true_all if group == "all" else [p for p in true_all if p["class"] == group]
        if len(mine) < 10 or len(true) < 10:
            continue
        for measure, column in (("ecd", f"ecd_{unit}"), ("length", f"length_{unit}"), ("aspect", "aspect")):
            got = float(np.median([float(r[column]) for r in mine])) / (1.0 if measure == "aspect" else scale)
            want = float(np.median([float(p[f"{measure}_px" if measure != "aspect" else "aspect"]) for p in true]))
            scores[f"{group}_{measure}_median_error"] = got / want - 1.0
    scores.update(_matched_size_errors(truth, rows, unit, scale))
    return scores


def _matched_size_errors(truth: dict, rows: list[dict], unit: str, scale: float) -> dict:
    """Median ECD and aspect of the measured particles matched (IoU >= 0.5) to a true one, per
    *true* class, against those true particles: the measuring alone, without the classifier."""
    from crystalscope.monitor.score import match_boxes

    by_file: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] != "cluster" and r.get(f"ecd_{unit}"):
            by_file.setdefault(r["file"], []).append(r)
    box = lambda r: tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1"))  # noqa: E731
    pairs: dict[str, list[tuple[dict, dict]]] = {}
    for index, frame in truth["frames"].items():
        found, true = by_file.get(Path(frame["file"]).name, []), truth["particles"].get(index, [])
        for i, j in match_boxes([box(r) for r in found], [box(t) for t in true]):
            pairs.setdefault(true[j]["class"], []).append((found[i], true[j]))
    scores = {}
    for group, matched in pairs.items():
        if len(matched) < 10:
            continue
        for measure in ("ecd", "aspect"):
            got = np.median([float(r[f"ecd_{unit}"]) / scale if measure == "ecd" else float(r["aspect"]) for r, _ in matched])
            want = np.median([float(t["ecd_px" if measure == "ecd" else "aspect"]) for _, t in matched])
            scores[f"matched_true_{group}_{measure}_median_error"] = float(got / want - 1.0)
    return scores


def measure_step(work: Path, model: Path, baseline_src: Path | None, frames: int, names: list[str] | None) -> list:
    """Per run: generate (once), monitor with today's checkout (``baseline_src``) and this one in turn,
    and score counts, sizes, particles lost on the densest frames, alarms and frames/s."""
    results = []
    for name, seed, density, with_pg in MEASURE_RUNS:
        if names and name not in names:
            continue
        run = work / name
        onset = RUN["pg_onset_s"] if with_pg else NO_PG
        if not (run / "truth" / "run.json").exists():
            generate_process(run, ProcessSpec(seed=seed, density=density, **{**RUN, "pg_onset_s": onset, "frames": frames}),
                             force=True)
        truth = read_truth(run / "frames")
        r = {"name": name, "seed": seed, "density": density}
        if baseline_src is not None:
            base = _monitor_timed(model, run, "monitor-base", baseline_src)
            r["base"] = {"fps": base["fps"], "cpu_fps": base["cpu_fps"], **_lost_on_densest(run, "monitor-base"), **alarm_scores(base["alarms"], truth)}
        new = _monitor_timed(model, run, "monitor-measure", None, MonitorSettings(um_per_px=truth["um_per_px"]))
        r["new"] = {"fps": new["fps"], "cpu_fps": new["cpu_fps"], **_lost_on_densest(run, "monitor-measure"), **alarm_scores(new["alarms"], truth),
                    **_size_scores(run, "monitor-measure")}
        results.append(r)
        print(name, json.dumps({k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in d.items()}
                                for k, d in r.items() if isinstance(d, dict)}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/monitor-bench"))
    parser.add_argument("--skip-detector", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="keep earlier monitor passes in --work (same model) and replay the rule on their counts")
    parser.add_argument("--rule", metavar="LIMIT,K,LAMBDA",
                        help="evaluate this alarm rule instead of calibrating one (e.g. 0.15,2,0.1)")
    parser.add_argument("--screening", action="store_true",
                        help="only print the focus and confidence figures of a monitored calibration run")
    parser.add_argument("--measure", action="store_true",
                        help="only the measures: counts, sizes, particles lost on dense frames, alarms, frames/s")
    parser.add_argument("--baseline-src", type=Path, metavar="SRC",
                        help="with --measure: also monitor each run with another checkout's src/ (today's code)")
    parser.add_argument("--frames", type=int, default=RUN["frames"], help="with --measure: frames per run")
    parser.add_argument("--runs", nargs="*", help="with --measure: only these runs (pg-1 ... dense-25)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.measure:
        results = measure_step(args.work, args.model, args.baseline_src, args.frames, args.runs)
        out = args.work / "results-measure.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if args.screening:
        print(json.dumps(screening_check(args.work), indent=1))
        return
    results: dict = {"feather": feather_check(args.model)}
    print("CEX called CEX after fading over a band of the side:", results["feather"])
    if not args.skip_detector:
        results["detector"] = {}
        for detector in ("segment", "tiles"):
            r = monitored(args.work, "det", args.model, 201, 0.0, MonitorSettings(detector=detector), frames=30)
            (args.work / "det" / "speed.json").unlink()  # the two detectors share one run folder
            results["detector"][detector] = r
            print(detector, {k: r[k] for k in ("precision", "recall", "accuracy", "fraction_mae", "fps")})
    if args.rule:
        limit, frames, smoothing = args.rule.split(",")
        rule = AlarmRule(float(limit), int(frames), float(smoothing))
    else:
        rule = calibrate(args.work, args.model, args.reuse)
    results["rule"] = rule.__dict__
    results["evaluate"] = []
    for name, seed, onset in (("pg-1", 1, RUN["pg_onset_s"]), ("pg-2", 2, RUN["pg_onset_s"]),
                              ("nopg-3", 3, NO_PG), ("nopg-4", 4, NO_PG), ("nopg-5", 5, NO_PG)):
        r = monitored(args.work, name, args.model, seed, onset, MonitorSettings(rule=rule), reuse=args.reuse)
        results["evaluate"].append(r)
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    out = args.work / (f"results-{args.rule}.json" if args.rule else "results.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
