"""Attacks on what a command reads: inputs that block or loop, killed parents, empty work, monitor time.

Every attack runs a real command on tiny data. Anything that could hang (a FIFO, ``/dev/zero``,
a symbolic link loop, a killed parent, ``--watch``) runs in a subprocess with a time limit
(:func:`attacks.check_attack_process`), so a hang is a failure, not a stuck test session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from attacks import FIXES, check_attack, check_attack_process, record
from monitor_runs import read_csv

pytest.importorskip("onnxruntime")

FIXES.extend([
    ("inputs that block or loop", "`Image.open` on a FIFO waits for a writer, `/dev/zero` never ends; "
     "`Path.resolve` raised on a link loop; a loop's OSError was reported against the output",
     "`images.open_regular` (non-blocking open + `fstat`: a FIFO, device, socket, folder, link loop or dangling "
     "link is an unreadable image with its reason); `layout.walk_files` walks each real folder once; "
     "`layout.real_path` never raises"),
    ("orphan workers", "a killed synth/split/audit left its pool workers running and writing",
     "`runtime.die_with_parent` (PR_SET_PDEATHSIG + a getppid watch) as the pool initializer; SIGTERM and "
     "errors stop the pool (`runtime.stop_pool`)"),
    ("nothing done, nothing claimed", "a folder of unreadable files gave a drift verdict or an empty report; "
     "a regex matching nothing split file by file; a 0 size limit ran",
     "drift `_check_sets_readable`, explain and ood-eval refuse a set without a readable image; "
     "`split._check_pattern_matches`; `errors.check_number` for every float option"),
    ("monitor time", "frames without a time were taken in name order; a frame back in time or unreadable "
     "shifted the timeline; --watch took a half-copied frame as an error; a nan onset reached run.json",
     "`frames.frame_sort_key` (name time, else mtime, ties by name); `Monitor.frame_time` after decoding, "
     "error row when it goes back; `_FolderWatch` retries until the size settled `--settle-s`; "
     "`check_number` in `_check_spec`"),
])

BAD_KINDS = ("fifo.png", "zero.png", "loop.png", "dangling.png")
REASONS = ("FIFO", "character device", "symbolic link loop", "dangling symbolic link")


def add_bad_inputs(folder: Path) -> None:
    """A FIFO, a link to /dev/zero, a link loop and a dangling link with image names, plus a folder loop."""
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "dangling.png").symlink_to("missing.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..", target_is_directory=True)


@pytest.fixture
def bad_source(assets, tmp_path) -> Path:
    """Class folders cex/ and pg/ of readable crops; cex/ also holds the four bad inputs and a folder loop."""
    source = tmp_path / "source"
    for name, folder in (("cex", "CEX"), ("pg", "PG")):
        shutil.copytree(assets["split"] / "train" / folder, source / name)
    add_bad_inputs(source / "cex")
    return source


def good_count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.png") if p.is_file() and not p.is_symlink())


# ---- 5. inputs that block or loop ----------------------------------------------------------------

def test_predict_gives_each_blocking_or_looping_input_an_error_row(assets, bad_source, tmp_path):
    out = tmp_path / "p.csv"
    check_attack_process("predict: FIFO, /dev/zero, link loops among the images",
                         ["predict", assets["onnx"], bad_source, "--out", out], code=0, timeout=120,
                         roots=(assets["root"],))
    rows = {Path(r["path"]).name: r["status"] for r in read_csv(out)}
    for name, reason in zip(BAD_KINDS, REASONS):
        assert rows[name].startswith("error") and reason in rows[name], rows[name]
    assert sum(s in ("ok", "rejected") for s in rows.values()) == good_count(bad_source)


def test_predict_names_each_bad_file_given_by_name(assets, bad_source, tmp_path):
    out = tmp_path / "p.csv"
    check_attack_process("predict FIFO/device/loop/dangling given by name",
                         ["predict", assets["onnx"], *[bad_source / "cex" / n for n in BAD_KINDS],
                          bad_source / "cex" / "CEX (1).png", "--out", out], code=0, timeout=120)
    statuses = [r["status"] for r in read_csv(out)]
    assert sum(s.startswith("error") for s in statuses) == 4 and statuses.count("ok") + statuses.count("rejected") == 1


@pytest.mark.parametrize("command", ["split", "audit", "drift", "embed"])
def test_folder_commands_skip_blocking_inputs_with_their_reason(assets, bad_source, tmp_path, command):
    out = tmp_path / "out"
    args = {"split": ["split", bad_source, out, "--group-by", "none"],
            "audit": ["audit", bad_source, "--out", out],
            "drift": ["drift", "--model", assets["onnx"], assets["split"], bad_source, "--out", out],
            "embed": ["embed", assets["onnx"], bad_source, "--out", out]}[command]
    proc = check_attack_process(f"{command}: FIFO, /dev/zero, link loops among the images", args, code=0,
                                timeout=180, roots=(assets["root"],))
    text = proc.stdout + proc.stderr
    if command == "split":
        summary = json.loads((out / "split.json").read_text())
        skipped = summary["skipped_unreadable"]  # "path: reason"
        assert len(skipped) == 4
        assert all(any(f"{n}: " in line and r in line for line in skipped) for n, r in zip(BAD_KINDS, REASONS))
        assert sum(sum(c.values()) for c in summary["counts"].values()) == good_count(bad_source)
    elif command == "audit":
        report = json.loads((out / "audit.json").read_text())
        assert "4 unreadable" in text, text
        assert all(name in json.dumps(report) for name in BAD_KINDS)
    else:
        for name, reason in zip(BAD_KINDS, REASONS):
            assert any(name in line and reason in line for line in text.splitlines()), text


def test_monitor_makes_each_blocking_frame_an_error_row(assets, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, crop in enumerate(sorted((assets["split"] / "test" / "PG").glob("*.png"))[:2]):
        shutil.copy(crop, frames / f"frame_{i:05d}_t{10.0 * (i + 1):09.2f}s.png")
    add_bad_inputs(frames)
    check_attack_process("monitor: FIFO, /dev/zero, link loops among the frames",
                         ["monitor", assets["onnx"], frames, "--out", tmp_path / "out"], code=0, timeout=120)
    rows = {r["file"]: r for r in read_csv(tmp_path / "out" / "timeline.csv")}
    for name, reason in zip(BAD_KINDS, REASONS):
        assert rows[name]["status"].startswith("error") and reason in rows[name]["status"]
        assert rows[name]["time_s"] == ""
    assert [r["time_s"] for r in rows.values() if r["status"] == "ok"] == ["0.000", "10.000"]


# ---- 7. no orphans -------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc; psutil is not a dependency)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """600 generated crops: enough that audit and split decode for a few seconds in 2 workers."""
    from crystalscope.data.synth import generate

    root = tmp_path_factory.mktemp("big") / "synth"
    generate(root, per_class=300, seed=1, progress=False, workers=2)
    return root


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
@pytest.mark.parametrize("command", ["synth", "audit", "split"])
def test_killing_the_parent_leaves_no_worker_and_a_rerun_succeeds(big_source, tmp_path, command, sig):
    out = tmp_path / "out"
    args = {"synth": ["synth", out, "--per-class", "3000", "--workers", "2"],
            "audit": ["audit", big_source, "--out", out, "--workers", "2"],
            "split": ["split", big_source, out, "--workers", "2", "--group-by", "none"]}[command]
    with open(tmp_path / "log.txt", "w") as log:  # a pipe would be held open by a survivor
        proc = subprocess.Popen([sys.executable, "-m", "crystalscope", *map(str, args)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    workers, deadline = [], time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        workers = children(proc.pid)
    assert len(workers) >= 2, "the pool never started: " + (tmp_path / "log.txt").read_text()
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 5
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [w for w in workers if alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    record(f"kill -{sig.name[3:]} {command} mid-run: workers", f"kill -{sig.name[3:]} <crystalscope {command}>",
           exit_code=0 if not survivors else 1, expected=0,
           output="" if not survivors else f"error: {len(survivors)} workers survived", changed=0,
           traceback=False)
    assert not survivors, f"{len(survivors)} pool workers outlived their parent"
    # a smaller synth: the rerun's point is the lock and the leftovers, not the size
    rerun = ["synth", out, "--per-class", "50", "--workers", "2"] if command == "synth" else args
    check_attack_process(f"rerun after kill -{sig.name[3:]} of {command}", rerun, code=0, timeout=240)


# ---- 8. nothing done, nothing claimed ------------------------------------------------------------

@pytest.fixture
def junk(tmp_path) -> Path:
    """A folder of files with image names, none of them readable."""
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    os.mkfifo(folder / "c.png")
    return folder


def one_error_line(text: str) -> None:
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text


@pytest.mark.parametrize("command", ["drift-new", "drift-reference", "embed", "explain"])
def test_a_folder_without_a_readable_image_is_refused(assets, junk, tmp_path, command):
    out = tmp_path / "out"
    args = {"drift-new": ["drift", "--model", assets["onnx"], assets["split"], junk, "--out", out],
            "drift-reference": ["drift", "--model", assets["onnx"], junk, assets["images"], "--out", out],
            "embed": ["embed", assets["onnx"], junk, "--out", out],
            "explain": ["explain", assets["ckpt"], junk, "--out", out]}[command]
    proc = check_attack_process(f"{command.split('-')[0]}: a folder of unreadable files only"
                                + (f" ({command.split('-')[1]})" if "-" in command else ""), args, code=2,
                                words=("junk",), timeout=180, roots=(assets["root"],))
    one_error_line(proc.stdout + proc.stderr)
    assert not out.exists()


@pytest.fixture(scope="module")
def fitted_onnx(tmp_path_factory) -> Path:
    """An untrained 32-px resnet18 with a fitted rejection, exported to ONNX."""
    import numpy as np
    import torch

    from crystalscope.data.synth import DIFFICULTIES, render_cex
    from crystalscope.data.transforms import Preprocessing
    from crystalscope.evaluation.ood import fit_detector, image_statistics
    from crystalscope.export.onnx import export_checkpoint
    from crystalscope.inference.predictor import Predictor
    from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint
    from crystalscope.models.factory import HeadSpec, build_model

    torch.manual_seed(0)
    pre = Preprocessing(image_size=32)
    ckpt = make_checkpoint(build_model("resnet18", 2).eval(), backbone="resnet18", head=HeadSpec(),
                           class_names=["cex", "pg"], positive_class="pg", preprocessing=pre, temperature=1.0)
    rng = np.random.default_rng(0)
    resized = np.stack([pre.resize_uint8(Image.fromarray(render_cex(rng, DIFFICULTIES["easy"]))) for _ in range(24)])
    logits, features = Predictor.from_checkpoint(ckpt).logits_and_features(pre.normalize(resized))
    stats = image_statistics(resized)
    ckpt["ood"] = fit_detector(features[:16], np.arange(16) % 2, features[16:], logits[16:], 2, 0.1,
                               train_image_stats=stats[:16], val_image_stats=stats[16:]).to_dict()
    root = tmp_path_factory.mktemp("fitted")
    return Path(export_checkpoint(save_checkpoint(ckpt, root / "fitted.ckpt"), root / "fitted.onnx")["path"])


def test_ood_eval_refuses_a_foreign_folder_without_a_readable_image(assets, fitted_onnx, junk, tmp_path):
    proc = check_attack_process("ood-eval: a foreign folder of unreadable files only",
                                ["ood-eval", fitted_onnx, assets["images"], junk, "--report", tmp_path / "rep"],
                                code=2, words=("junk", "none of its 3 files"), timeout=180)
    one_error_line(proc.stdout + proc.stderr)
    assert not (tmp_path / "rep").exists()


def test_split_regex_matching_no_file_name_is_refused(assets, tmp_path):
    check_attack("split --group-by regex:PAT matching no file name",
                 ["split", assets["split"] / "train", tmp_path / "out", "--group-by", r"regex:^crystal_(\d+)"],
                 code=2, words=("matches none of the", "--group-by"), roots=(assets["root"],))
    assert not (tmp_path / "out").exists()


@pytest.fixture
def frames(assets, tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, crop in enumerate(sorted((assets["split"] / "test" / "PG").glob("*.png"))[:3]):
        shutil.copy(crop, folder / f"frame_{i:05d}_t{10.0 * i:09.2f}s.png")
    return folder


@pytest.mark.parametrize("option,value", [("--max-side", "0"), ("--min-sharpness", "-1"),
                                          ("--alarm-fraction", "nan"), ("--smoothing", "inf"),
                                          ("--min-confidence", "nan"), ("--settle-s", "nan")])
def test_monitor_refuses_options_that_do_nothing_or_are_not_finite(assets, frames, tmp_path, option, value):
    check_attack(f"monitor {option} {value}", ["monitor", assets["onnx"], frames, "--out", tmp_path / "out",
                                               option, value],
                 code=2, words=(option, value), roots=(frames,))
    assert not (tmp_path / "out").exists()


# ---- 9. monitor time -----------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [("--pg-onset-s", "nan"), ("--pg-onset-s", "inf"),
                                          ("--interval-s", "nan"), ("--pg-rise-s", "-inf"), ("--pg-max", "nan")])
def test_synth_process_refuses_non_finite_options(tmp_path, option, value):
    check_attack(f"synth-process {option} {value}", ["synth-process", tmp_path / "run", "--frames", "2",
                                                     "--width", "160", "--height", "160", option, value],
                 code=2, words=(option, "finite"))
    assert not (tmp_path / "run").exists()


def test_frames_without_times_are_ordered_by_modification_time(assets, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    crops = sorted((assets["split"] / "test" / "PG").glob("*.png"))[:3]
    # names in the reverse order of the times the probe wrote them
    for name, crop, mtime in zip(("c.png", "b.png", "a.png"), crops, (1000.0, 1010.0, 1030.0)):
        shutil.copy(crop, folder / name)
        os.utime(folder / name, (mtime, mtime))
    check_attack_process("monitor: frames without times in their names", ["monitor", assets["onnx"], folder,
                                                                          "--out", tmp_path / "out"], code=0)
    rows = read_csv(tmp_path / "out" / "timeline.csv")
    assert [(r["file"], r["time_s"]) for r in rows] == [("c.png", "0.000"), ("b.png", "10.000"), ("a.png", "30.000")]


def test_an_unreadable_first_frame_does_not_shift_the_timeline(assets, frames, tmp_path):
    (frames / "frame_00000_t000005.00s.png").unlink(missing_ok=True)
    first = sorted(frames.iterdir())[0]
    first.write_bytes(b"not a png")  # t = 0 s, unreadable
    check_attack_process("monitor: unreadable first frame", ["monitor", assets["onnx"], frames,
                                                             "--out", tmp_path / "out"], code=0)
    rows = read_csv(tmp_path / "out" / "timeline.csv")
    assert [r["time_s"] for r in rows] == ["", "0.000", "10.000"]
    assert rows[0]["status"].startswith("error")


def start_watch(assets, frames: Path, out: Path, *extra) -> subprocess.Popen:
    log = open(out.parent / "watch.log", "w")
    return subprocess.Popen([sys.executable, "-m", "crystalscope", "monitor", str(assets["onnx"]), str(frames),
                             "--out", str(out), "--watch", *extra], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)


def wait_rows(out: Path, n: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "timeline.csv"
        if path.is_file() and len(rows := read_csv(path)) >= n:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"timeline.csv did not reach {n} rows in {timeout} s")


def stop_watch(proc: subprocess.Popen, name: str, out: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    text = (out.parent / "watch.log").read_text()
    record(name, "crystalscope monitor MODEL FRAMES --out OUT --watch", exit_code=code, expected=0, output=text,
           changed=0, traceback="Traceback" in text, hang=code is None)
    assert code == 0 and "Traceback" not in text, text


def test_watch_waits_for_a_frame_written_in_two_halves(assets, tmp_path):
    frames, out = tmp_path / "frames", tmp_path / "out"
    frames.mkdir()
    crop = sorted((assets["split"] / "test" / "PG").glob("*.png"))[0]
    proc = start_watch(assets, frames, out, "--settle-s", "6")
    try:
        data = crop.read_bytes()
        target = frames / "frame_00000_t000000.00s.png"
        target.write_bytes(data[: len(data) // 2])  # the copy stalls for longer than one poll
        time.sleep(2.5)
        with open(target, "ab") as handle:
            handle.write(data[len(data) // 2:])
        rows = wait_rows(out, 1)
        assert rows[0]["status"] == "ok", rows
    finally:
        stop_watch(proc, "monitor --watch: a frame written in two halves", out)


def test_watch_makes_a_frame_back_in_time_an_error_row_and_settles_a_fifo(assets, tmp_path):
    frames, out = tmp_path / "frames", tmp_path / "out"
    frames.mkdir()
    crops = sorted((assets["split"] / "test" / "PG").glob("*.png"))
    proc = start_watch(assets, frames, out, "--settle-s", "1")
    try:
        shutil.copy(crops[0], frames / "frame_00001_t000020.00s.png")
        wait_rows(out, 1)
        shutil.copy(crops[1], frames / "frame_00000_t000010.00s.png")  # arrives late, taken earlier
        rows = wait_rows(out, 2)
        assert rows[1]["status"].startswith("error") and "before the frame before it" in rows[1]["status"]
        assert rows[1]["time_s"] == ""
        os.mkfifo(frames / "frame_00002_t000030.00s.png")
        rows = wait_rows(out, 3)
        assert "FIFO" in rows[2]["status"]
    finally:
        stop_watch(proc, "monitor --watch: a frame back in time, a FIFO", out)
