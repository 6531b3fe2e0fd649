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
