"""Generated process runs (monitor/frames.py): seeded frames, consistent truth, one-line errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("scipy")

from crystalscope.cli import app  # noqa: E402
from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.monitor.frames import ProcessSpec, generate_process, read_truth  # noqa: E402
from monitor_runs import SMALL  # noqa: E402

RUNNER = CliRunner()


def test_synth_process_is_seeded_and_its_truth_is_consistent(tmp_path):
    spec = ProcessSpec(frames=4, pg_onset_s=20.0, pg_max=1.0, pg_rise_s=1e-6, seed=3, **SMALL)
    first = generate_process(tmp_path / "a", spec)
    generate_process(tmp_path / "b", spec)
    names = sorted(p.name for p in (tmp_path / "a" / "frames").iterdir())
    assert names[1] == "frame_00001_t000010.00s.png"
    for name in names:
        assert (tmp_path / "a" / "frames" / name).read_bytes() == (tmp_path / "b" / "frames" / name).read_bytes()
    truth = read_truth(tmp_path / "a" / "frames")
    assert truth["onset_s"] == 20.0 and first["onset_s"] == 20.0
    classes = {f: {p["class"] for p in ps} for f, ps in truth["particles"].items()}
    assert classes[0] == {"cex"} and classes[1] == {"cex"}  # before the onset: no PG
    assert classes[3] == {"pg"}  # pg_max 1.0 after the onset: only PG
    assert float(truth["frames"][3]["pg_fraction"]) == 1.0
    for ps in truth["particles"].values():
        for p in ps:
            assert 0 <= int(p["x0"]) < int(p["x1"]) <= 320 and 0 <= int(p["y0"]) < int(p["y1"]) <= 240


def test_onset_after_the_last_frame_gives_a_run_without_pg(tmp_path):
    summary = generate_process(tmp_path / "run", ProcessSpec(frames=3, pg_onset_s=1e6, seed=1, **SMALL))
    assert summary["onset_s"] is None and summary["n_pg"] == 0


def test_synth_process_errors_are_one_line(tmp_path):
    result = RUNNER.invoke(app, ["synth-process", str(tmp_path / "x"), "--frames", "0"])
    assert result.exit_code == 2 and "--frames 0" in result.output


def test_truth_records_sizes_scale_and_density(tmp_path):
    import math

    sparse = generate_process(tmp_path / "a", ProcessSpec(frames=4, seed=4, **SMALL))
    dense = generate_process(tmp_path / "b", ProcessSpec(frames=4, seed=4, density=6.0, um_per_px=0.8, **SMALL))
    assert dense["n_particles"] > 2 * sparse["n_particles"]
    truth = read_truth(tmp_path / "b" / "frames")
    assert truth["um_per_px"] == 0.8
    for ps in truth["particles"].values():
        for p in ps:
            area, ecd = float(p["area_px2"]), float(p["ecd_px"])
            assert abs(ecd - math.sqrt(4 * area / math.pi)) < 0.01
            side = max(int(p["x1"]) - int(p["x0"]), int(p["y1"]) - int(p["y0"]))
            assert float(p["width_px"]) <= float(p["length_px"]) <= side * math.sqrt(2) + 1
            assert 0 <= float(p["visible_area_px2"]) <= area + 0.5
    assert any(float(p["visible_area_px2"]) < float(p["area_px2"]) for ps in truth["particles"].values() for p in ps)
    result = RUNNER.invoke(app, ["synth-process", str(tmp_path / "x"), "--density", "0"])
    assert result.exit_code == 2 and "--density 0" in result.output


def test_frames_are_ordered_by_name_time_else_mtime_ties_by_name(tmp_path):
    import os

    from crystalscope.monitor.frames import frame_sort_key

    for name, mtime in (("z.png", 100.0), ("a.png", 200.0), ("m.png", 100.0)):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (mtime, mtime))
    assert [p.name for p in sorted(tmp_path.iterdir(), key=frame_sort_key)] == ["m.png", "z.png", "a.png"]
    assert sorted(["b_t000010.00s.png", "a_t000020.00s.png"], key=frame_sort_key)[0] == "b_t000010.00s.png"


@pytest.mark.parametrize("option", ["pg_onset_s", "interval_s", "pg_rise_s", "pg_max", "defocus"])
def test_non_finite_options_are_refused_before_any_file(tmp_path, option):
    spec = ProcessSpec(frames=2, width=160, height=160, **{option: float("nan")})
    with pytest.raises(CrystalscopeError, match="finite"):
        generate_process(tmp_path / "run", spec)
    assert not (tmp_path / "run").exists()
