"""Process-monitoring commands: synth-process and monitor."""

from __future__ import annotations

from pathlib import Path

import typer

from crystalscope.cli.common import app, user_errors


@app.command("synth-process")
@user_errors
def synth_process_command(
    out_dir: Path = typer.Argument(..., help="Output folder: OUT_DIR/frames/frame_<i>_t<seconds>s.png "
                                   "and the ground truth in OUT_DIR/truth/ (run.json, frames.csv, particles.csv)."),
    frames: int = typer.Option(120, "--frames", help="Number of frames."),
    interval_s: float = typer.Option(30.0, "--interval-s", help="Seconds between frames."),
    pg_onset_s: float = typer.Option(1800.0, "--pg-onset-s", help="Time PG appears; later than the last "
                                     "frame gives a run without PG."),
    pg_max: float = typer.Option(0.4, "--pg-max", help="PG share of the particles long after the onset."),
    pg_rise_s: float = typer.Option(600.0, "--pg-rise-s", help="Time constant of the PG share's rise."),
    width: int = typer.Option(1024, "--width", help="Frame width in px (particles are drawn at crop scale)."),
    height: int = typer.Option(768, "--height", help="Frame height in px."),
    difficulty: str = typer.Option("realistic", "--difficulty", help="Crop generator difficulty: easy | realistic | hard."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives byte-identical frames."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR (once the new run is complete)."),
):
    """Generate a batch crystallization as probe frames (CEX, then PG from an onset) with ground truth."""
    from crystalscope.monitor.frames import TRUTH_SUBDIR, ProcessSpec, generate_process

    spec = ProcessSpec(frames=frames, interval_s=interval_s, pg_onset_s=pg_onset_s, pg_max=pg_max,
                       pg_rise_s=pg_rise_s, width=width, height=height, difficulty=difficulty, seed=seed)
    s = generate_process(out_dir, spec, force=force)
    onset = "no PG (onset after the last frame)" if s["onset_s"] is None else f"PG onset at {s['onset_s']:g} s"
    typer.echo(f"wrote {s['n_frames']} frames ({width}x{height}) with {s['n_particles']} particles "
               f"({s['n_pg']} PG) to {s['frames_dir']}; {onset}; ground truth in {Path(out_dir) / TRUTH_SUBDIR} "
               f"({s['seconds']:.1f} s)")


@app.command("monitor")
@user_errors
def monitor_command(
    model: Path = typer.Argument(..., help="Trained model: .onnx (ONNX Runtime, no PyTorch needed) or .ckpt."),
    frames_dir: Path = typer.Argument(..., help="Folder of probe frames (times from ..._t<seconds>s.png names, "
                                      "else file times)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for particles.csv, timeline.csv, timeline.png, alarms.json."),
    watch: bool = typer.Option(False, "--watch", help="Keep processing frames as they appear; Ctrl-C stops "
                               "with every output written."),
    alarm_fraction: float = typer.Option(0.32, "--alarm-fraction", help="Alarm limit on the smoothed PG fraction."),
    alarm_frames: int = typer.Option(2, "--alarm-frames", help="Consecutive frames above the limit before the alarm."),
    smoothing: float = typer.Option(0.1, "--smoothing", help="EWMA weight of the newest frame (0..1]."),
    detector: str = typer.Option("segment", "--detector", help="segment (particles) | tiles (crop-sized grid)."),
    min_confidence: float = typer.Option(0.9, "--min-confidence", help="Classifications below this are "
                                         "written as 'uncertain' and not counted."),
    min_sharpness: float = typer.Option(1.9, "--min-sharpness", help="Focus limit (Laplacian std, grey levels); "
                                        "blurrier regions are 'out of focus'. 0 classifies all."),
    max_side: int = typer.Option(260, "--max-side", help="Regions with a longer side (px) are 'cluster' "
                                 "(overlapping particles), not classified."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write overlay/<frame>.jpg with boxes coloured by class (rejected/out of focus hatched)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Crops per forward pass."),
    settle_s: float = typer.Option(3.0, "--settle-s", help="With --watch: a frame that does not decode is "
                                   "retried until its size has not changed for this many seconds, then an error row."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier monitor output at --out "
                               "(a folder holding anything else is never replaced)."),
):
    """Watch a crystallization: particles per frame -> PG fraction over time -> alarm."""
    from rich.console import Console

    from crystalscope.monitor.run import MonitorSettings, run_monitor
    from crystalscope.monitor.timeline import AlarmRule

    console = Console(stderr=True)
    settings = MonitorSettings(rule=AlarmRule(alarm_fraction, alarm_frames, smoothing), detector=detector,
                               batch_size=batch_size, overlay=overlay, min_sharpness=min_sharpness,
                               max_side=max_side, min_confidence=min_confidence, settle_s=settle_s)

    def show(record) -> None:
        fraction = "-" if record.fraction is None else f"{record.fraction:.2f}"
        console.print(f"frame {record.frame} {record.file}: {sum(record.counts.values())} classified, "
                      f"{record.rejected} rejected, {record.out_of_focus + record.clusters + record.uncertain} "
                      f"not counted, fraction {fraction}, EWMA "
                      f"{'-' if record.ewma is None else f'{record.ewma:.3f}'} {record.status}",
                      markup=False, highlight=False)

    s = run_monitor(model, frames_dir, out, settings, watch=watch, on_frame=show if watch else None, force=force)
    alarms = "; ".join(f"frame {a['frame']} at {a['time_s']:g} s" for a in s["alarms"]) or "none"
    typer.echo(f"{s['n_frames']} frames ({s['n_frame_errors']} unreadable), {s['n_particles']} particles, "
               f"{s['backend']} back end, {s['seconds']:.1f} s{' (interrupted)' if s['interrupted'] else ''}")
    typer.echo(f"alarms ({s['rule']}): {alarms}")
    typer.echo(f"outputs: {', '.join(s['outputs'])}")
