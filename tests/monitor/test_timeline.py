"""The PG-fraction timeline and its EWMA alarm (monitor/timeline.py)."""

from __future__ import annotations

from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline


def test_default_rule_stays_quiet_at_the_in_control_level_and_fires_on_pg():
    # the calibration runs called 11.6 % of counted CEX particles PG; the default must not fire on
    # that level however long it lasts, and must fire once PG calls reach 40 % (the runs' pg_max)
    quiet, rising = Timeline(["cex", "pg"], "pg", AlarmRule()), Timeline(["cex", "pg"], "pg", AlarmRule())
    for i in range(240):
        quiet.add(FrameRecord(i, f"q{i}.png", 30.0 * i, {"cex": 88, "pg": 12}))
        rising.add(FrameRecord(i, f"r{i}.png", 30.0 * i, {"cex": 88, "pg": 12} if i < 60 else {"cex": 60, "pg": 40}))
    assert quiet.alarms == []
    assert rising.alarms and 60 < rising.alarms[0]["frame"] <= 60 + 30
    # the CLI repeats these defaults (it imports the monitor lazily): they must stay the same
    import inspect
    from crystalscope.cli.monitor import monitor_command
    options = inspect.signature(monitor_command).parameters
    assert (options["alarm_fraction"].default.default, options["alarm_frames"].default.default,
            options["smoothing"].default.default) == (AlarmRule().fraction, AlarmRule().frames, AlarmRule().smoothing)


def test_ewma_alarm_needs_k_frames_and_rearms():
    timeline = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.3, frames=2, smoothing=1.0))
    pg_counts = [0, 5, 0, 5, 5, 5, 0, 5, 5]
    for i, pg in enumerate(pg_counts):
        timeline.add(FrameRecord(i, f"f{i}", 10.0 * i, {"cex": 5, "pg": pg}))
    assert [a["frame"] for a in timeline.alarms] == [4, 8]


def test_size_distributions_per_group_with_intervals_and_classes():
    from crystalscope.monitor.timeline import SizeClasses

    timeline = Timeline(["cex", "pg"], "pg", AlarmRule(), unit="um", size_classes=SizeClasses(10, 1000, 4), um_per_px=1.5)
    rng = __import__("numpy").random.default_rng(0)
    small = [(float(d), 3.0 * float(d), 3.0) for d in rng.uniform(40, 60, 40)]
    large = [(float(d), float(d), 1.0) for d in rng.uniform(180, 220, 3)]
    record = timeline.add(FrameRecord(0, "f0.png", 0.0, {"cex": 40, "pg": 3}, touching=4,
                                      particle_sizes={"all": small + large, "cex": small, "pg": large}))
    cex, pg, every = record.sizes["cex"], record.sizes["pg"], record.sizes["all"]
    assert 45 < cex.ecd[1] < 55 and cex.length[1] == __import__("pytest").approx(3 * cex.ecd[1], rel=0.05)
    assert cex.ecd_d50_ci[0] <= cex.ecd[1] <= cex.ecd_d50_ci[1] and cex.aspect_median == 3.0
    assert pg.ecd_d50_ci is None  # 3 particles: no interval
    assert sum(every.class_counts) == 43 and every.class_counts[1] == 40
    assert record.agglomeration == 4 / 43
    header = timeline.columns()
    assert "pg_ecd_d50_um" in header and "all_n_ecd_31.62-100um" in header
    row = timeline.csv_text().splitlines()[1].split(",")
    assert float(row[header.index("cex_ecd_d50_um")]) == __import__("pytest").approx(cex.ecd[1], abs=1e-5)
    again = Timeline(["cex", "pg"], "pg", AlarmRule(), unit="um", size_classes=SizeClasses(10, 1000, 4))
    again.add(FrameRecord(0, "f0.png", 0.0, {"cex": 40, "pg": 3}, particle_sizes={"cex": small}))
    assert again.records[0].sizes["cex"].ecd_d50_ci == cex.ecd_d50_ci  # seeded: reruns are identical


def test_size_classes_option_errors_name_the_option():
    import pytest

    from crystalscope.errors import CrystalscopeError
    from crystalscope.monitor.timeline import SizeClasses

    for text in ("10,5,3", "a,b,c", "10,100"):
        with pytest.raises(CrystalscopeError, match="--size-classes"):
            SizeClasses.parse(text)
