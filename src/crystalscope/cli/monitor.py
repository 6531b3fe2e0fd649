"""Process-monitoring commands: synth-process and monitor."""

from __future__ import annotations

from pathlib import Path

import typer

from crystalscope.cli.common import app, console as cli_console, user_errors


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
    density: float = typer.Option(1.0, "--density", help="Factor on the particle count: 1 gives 5 rising to 10 "
                                  "particles a 1024 x 768 frame, 6 gives 30 to 60 (overlapping)."),
    um_per_px: float = typer.Option(1.2, "--um-per-px", help="Scale written into truth/run.json (assumed: "
                                    "1024 px across about 1.2 mm, an EasyViewer-like probe's field of view)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR (once the new run is complete)."),
):
    """Generate a batch crystallization as probe frames (CEX, then PG from an onset) with ground truth."""
    from crystalscope.monitor.frames import TRUTH_SUBDIR, ProcessSpec, generate_process

    spec = ProcessSpec(frames=frames, interval_s=interval_s, pg_onset_s=pg_onset_s, pg_max=pg_max,
                       pg_rise_s=pg_rise_s, width=width, height=height, difficulty=difficulty, seed=seed,
                       density=density, um_per_px=um_per_px)
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
    out: Path = typer.Option(..., "--out", "-o", help="Folder for particles.csv, timeline.csv, timeline.png, "
                             "sizes.png, alarms.json."),
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
    um_per_px: float | None = typer.Option(None, "--um-per-px", help="The frames' scale in micrometres per pixel: "
                                           "sizes are then written in um (column names end in _um, _um2); "
                                           "without it they are in px and the columns say so."),
    size_classes: str = typer.Option("16,1024,12", "--size-classes", metavar="LOW,HIGH,N", help="N log-spaced "
                                     "classes of the equivalent diameter from LOW to HIGH, in the output unit "
                                     "(px, or um with --um-per-px): counts per class in timeline.csv, sizes.png."),
    split: bool = typer.Option(True, "--split/--no-split", help="Split touching particles (watershed) first."),
    settle_s: float = typer.Option(3.0, "--settle-s", help="With --watch: a frame that does not decode is "
                                   "retried until its size has not changed for this many seconds, then an error row."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier monitor output at --out "
                               "(a folder holding anything else is never replaced)."),
    opcua: str = typer.Option(None, "--opcua", is_flag=False, flag_value="opc.tcp://127.0.0.1:4840/crystalscope/", help="Serve the run on OPC UA while monitoring (alone: opc.tcp://127.0.0.1:4840/crystalscope/; needs the opcua extra). See docs/plant.md."),
    opcua_user: str = typer.Option(None, "--opcua-user", help="OPC UA user name (anonymous access is then off)."),
    opcua_password: str = typer.Option(None, "--opcua-password", envvar="CRYSTALSCOPE_OPCUA_PASSWORD", help="OPC UA password (or $CRYSTALSCOPE_OPCUA_PASSWORD)."),
    opcua_cert: Path = typer.Option(None, "--opcua-cert", help="Server certificate: only Basic256Sha256 Sign&Encrypt."),
    opcua_key: Path = typer.Option(None, "--opcua-key", help="Private key of --opcua-cert."),
    run_name: str = typer.Option(None, "--run-name", help="The run's name on OPC UA (default: the frames folder's name)."),
):
    """Watch a crystallization: particles per frame -> PG fraction over time -> alarm."""

    from crystalscope.monitor.measure import Scale
    from crystalscope.monitor.run import MonitorSettings, run_monitor
    from crystalscope.monitor.timeline import AlarmRule, SizeClasses

    console = cli_console(stderr=True)
    Scale(um_per_px)  # a bad scale is an option error before the output folder is claimed
    settings = MonitorSettings(rule=AlarmRule(alarm_fraction, alarm_frames, smoothing), detector=detector,
                               batch_size=batch_size, overlay=overlay, min_sharpness=min_sharpness,
                               max_side=max_side, min_confidence=min_confidence, um_per_px=um_per_px,
                               size_classes=SizeClasses.parse(size_classes), split=split, settle_s=settle_s)

    sinks = _opcua_sinks(opcua, opcua_user, opcua_password, opcua_cert, opcua_key)
    s = run_monitor(model, frames_dir, out, settings, watch=watch, on_frame=_frame_printer(console) if watch else None,
                    force=force, sinks=sinks, run_name=run_name)
    _print_summary(s)


def _frame_printer(console):
    """``--watch``'s line per frame, on stderr."""
    def show(record) -> None:
        fraction = "-" if record.fraction is None else f"{record.fraction:.2f}"
        console.print(f"frame {record.frame} {record.file}: {sum(record.counts.values())} classified, "
                      f"{record.rejected} rejected, {record.out_of_focus + record.clusters + record.uncertain} "
                      f"not counted, fraction {fraction}, EWMA "
                      f"{'-' if record.ewma is None else f'{record.ewma:.3f}'} {record.status}",
                      markup=False, highlight=False)
    return show


def _print_summary(s: dict) -> None:
    alarms = "; ".join(f"frame {a['frame']} at {a['time_s']:g} s" for a in s["alarms"]) or "none"
    typer.echo(f"{s['n_frames']} frames ({s['n_frame_errors']} unreadable), {s['n_particles']} particles, "
               f"{s['backend']} back end, {s['seconds']:.1f} s{' (interrupted)' if s['interrupted'] else ''}")
    typer.echo(f"alarms ({s['rule']}): {alarms}")
    typer.echo(f"outputs: {', '.join(s['outputs'])}")


def _opcua_sinks(endpoint: str | None, user: str | None, password: str | None, cert: Path | None,
                 key: Path | None) -> list:
    """The OPC UA sink of ``--opcua`` (checked before any frame is read), or none."""
    if endpoint is None:
        return []
    from crystalscope.monitor.opcua import OpcUaSettings, OpcUaSink

    return [OpcUaSink(OpcUaSettings(endpoint, user, password, cert, key))]
