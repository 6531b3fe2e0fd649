"""Attacks a new user or a plant fault can make: outputs, training, images, kills, resume.

Every attack runs a real command on tiny data (32 px) and asserts: the exit code, no
traceback, the error line's key words, and that every file that existed before is
byte-identical afterwards. Disk-full and read-only attacks mount a small tmpfs (root only,
as in CI) and are skipped otherwise.

``CRYSTALSCOPE_RELIABILITY_TABLE=docs/reliability.md pytest tests/test_reliability*.py``
also writes the attack table of docs/reliability.md (``tests/attacks.py``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crystalscope.cli import app
from crystalscope.data.split import assign_splits
from crystalscope.data.transforms import Preprocessing
from crystalscope.models.factory import HeadSpec, build_model
from crystalscope.safety import output_lock
from crystalscope.training import run as run_module
from crystalscope.models.checkpoint import make_checkpoint
from attacks import FIXES, RUNNER, check_attack, dead_pid

pytest.importorskip("onnxruntime")

SMALL = {"train": (8, 8), "val": (4, 4), "test": (4, 4)}

FIXES.extend([
    ("output = input", "each command checked only its own cases",
     "`crystalscope.safety.check_output(out, inputs=...)` in every command that writes"),
    ("rerun deletes files, `--out .`", "`atomic_dir(force=True)` replaced any folder",
     "folder outputs are replaced only when the command wrote them and `--force` is given; cwd refused"),
    ("silent non-training", "batch 1 skipped, `nan` passed `lr <= 0`, NaN loss ignored",
     "`TrainConfig.validate` (finite options, batch >= 2), trailing single image joins the previous batch, "
     "`check_finite` stops the run before saving"),
    ("tracebacks", "OSError/DecompressionBombError escaped; torch.save hid ENOSPC",
     "CLI boundary `user_errors` + `safety.describe_os_error`; checkpoints serialised in memory and written by "
     "Python; decoder limit"),
    ("half-written report", "evaluate wrote into the final folder", "`atomic_dir` staging in `evaluate_checkpoint`"),
    ("0 test images", "greedy placement by deficit", "`split._fill_empty_splits` (+ warning when impossible)"),
    ("leftovers", "staging names carried no owner", "`.NAME.<pid>.<rand>.tmp/.partial`; `safety.clean_stale`"),
    ("concurrent writers", "no lock", "`safety.output_lock` (`.NAME.lock` with the pid; a dead pid's lock is taken over)"),
    ("huge images", "full decode before any check", "`images.check_pixels` from the header (25 Mpx default)"),
    ("resume differs", "global RNG (dropout) not saved; feature-cache stream restored late",
     "`training.record.rng_states` in last.ckpt, restored when the resumed epochs start"),
    ("ONNX metadata", "resampling rules unstated", "`Preprocessing.spec()` as `preprocessing_spec`; "
     "`tests/preprocessing_reference.py` (numpy) matches Pillow bit for bit on the real samples"),
])


# ---- 1. an output equal to an input --------------------------------------------------------

@pytest.mark.parametrize("target", ["onnx", "ckpt", "image"])
def test_predict_never_writes_onto_its_model_or_an_image(assets, target):
    out = assets["images"] / "CEX (1).png" if target == "image" else assets[target]
    model = assets["onnx"] if target != "ckpt" else assets["ckpt"]
    check_attack(f"predict --out = its {target}", ["predict", model, assets["images"], "--out", out],
           code=2, words=("the input", "choose an output path"), roots=(assets["root"],))


def test_export_never_writes_onto_its_checkpoint(assets):
    check_attack("export --out = its checkpoint", ["export", assets["ckpt"], "--out", assets["ckpt"]],
           code=2, words=("is the input",), roots=(assets["root"],))


def test_outputs_inside_or_around_an_input_are_refused(assets, tmp_path):
    check_attack("split OUT_DIR inside the source", ["split", assets["split"] / "train", assets["split"] / "train" / "x"],
           code=2, words=("inside the input",), roots=(assets["root"],))
    check_attack("evaluate --out inside the data", ["evaluate", assets["ckpt"], assets["split"] / "test", "--out",
                                              assets["split"] / "test" / "report"],
           code=2, words=("inside the input",), roots=(assets["root"],))
    check_attack("train --out = the data folder", ["train", assets["split"], "--out", assets["split"] / "test",
                                             "--weights", "none", "--backbone", "resnet18"],
           code=2, words=("not empty",), roots=(assets["root"],))


# ---- 2. never delete what we did not write -------------------------------------------------

def test_audit_rerun_keeps_a_users_files(assets, tmp_path):
    out = tmp_path / "report"
    check_attack("audit into a fresh folder", ["audit", assets["split"], "--out", out, "-q"], code=0, roots=(assets["root"],))
    (out / "mywork").mkdir()
    (out / "mywork" / "notes.txt").write_text("mine")
    check_attack("audit rerun into a folder holding mywork/", ["audit", assets["split"], "--out", out, "-q"], code=2,
           words=("did not write", "mywork"), roots=(assets["root"], tmp_path))


def test_current_folder_is_never_an_output_folder(assets, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path)):
        check_attack(f"audit --out {'.' if out == '.' else '$PWD'}", ["audit", assets["split"], "--out", out, "-q"],
               code=2, words=("current folder",), roots=(tmp_path,))
    check_attack("synth OUT_DIR .", ["synth", ".", "--per-class", "2", "-q"], code=2, words=("current folder",),
           roots=(tmp_path,))


def test_force_replaces_only_our_own_earlier_output(assets, tmp_path):
    out = tmp_path / "synth"
    check_attack("synth into a new folder", ["synth", out, "--per-class", "2", "--workers", "1", "-q"], code=0)
    (out / "thesis.docx").write_text("mine")
    check_attack("synth --force into a folder holding a user's file",
           ["synth", out, "--per-class", "2", "--workers", "1", "--force", "-q"],
           code=2, words=("did not write", "thesis.docx"), roots=(tmp_path,))


# ---- 3. training that cannot learn ---------------------------------------------------------

def _train_args(split: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(split), "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1",
            "--out", str(out), "--no-onnx", "--f1-threshold", "1.1", *extra]


@pytest.mark.parametrize("option,value,words", [("--batch-size", "1", ("BatchNorm",)),
                                                ("--lr", "nan", ("--lr", "finite")),
                                                ("--lr", "inf", ("--lr", "finite"))])
def test_training_that_cannot_learn_is_refused_before_anything_is_written(assets, tmp_path, option, value, words):
    out = tmp_path / "run"
    check_attack(f"train {option} {value}", _train_args(assets["split"], out, option, value), code=2, words=words,
           roots=(assets["root"],))
    assert not out.exists()


def test_a_non_finite_loss_stops_the_run(assets, tmp_path):
    out = tmp_path / "run"
    check_attack("train --lr 1e30 (loss becomes NaN)", _train_args(assets["split"], out, "--lr", "1e30", "--epochs", "3"),
           code=1, words=("diverged in epoch 1", "lower --lr"), roots=(assets["root"],))
    assert not (out / "weights" / "best.ckpt").exists() and not (out / "test_results.json").exists()


def test_a_trailing_single_image_is_trained_not_skipped():
    from crystalscope.training.loop import batches

    slices = list(batches(17, 4, min_rows=2))
    assert [s.stop - s.start for s in slices] == [4, 4, 4, 5]
    assert sum(s.stop - s.start for s in slices) == 17


# ---- 4, 5. faults: read-only, file in the way, disk full -----------------------------------

def test_an_existing_file_as_output_folder_is_one_line(assets, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    for name, args in [("synth", ["synth", blocker, "--per-class", "2", "-q"]),
                       ("split", ["split", assets["split"] / "train", blocker, "-q"]),
                       ("audit", ["audit", assets["split"], "--out", blocker, "-q"]),
                       ("train", _train_args(assets["split"], blocker)),
                       ("evaluate", ["evaluate", assets["ckpt"], assets["split"] / "test", "--out", blocker])]:
        check_attack(f"{name}: output folder is an existing file", args, code=2, words=("is a file",),
               roots=(assets["root"], tmp_path))


def test_read_only_output_is_one_line(assets, tmp_path, tmpfs):
    ro = tmpfs("1m", ro=True, fill=lambda p: (p / "old.txt").write_text("mine"))
    for name, args in [("synth", ["synth", ro / "s", "--per-class", "2", "-q"]),
                       ("split", ["split", assets["split"] / "train", ro / "sp", "-q"]),
                       ("audit", ["audit", assets["split"], "--out", ro / "a", "-q"]),
                       ("train", _train_args(assets["split"], ro / "run")),
                       ("evaluate", ["evaluate", assets["ckpt"], assets["split"] / "test", "--out", ro / "e"]),
                       ("predict", ["predict", assets["onnx"], assets["images"], "--out", ro / "p.csv"])]:
        check_attack(f"{name}: read-only output", args, code=1,
               words=("read-only file system",), roots=(assets["root"], ro))


def test_disk_full_is_named_and_leaves_nothing_half_written(assets, tmp_path, tmpfs):
    full = tmpfs("48k")
    check_attack("evaluate on a nearly full disk", ["evaluate", assets["ckpt"], assets["split"] / "test", "--out",
                                              full / "report"],
           code=1, words=("no space left on device",), roots=(assets["root"],))
    assert sorted(p.name for p in full.iterdir()) == []  # no report folder, no .partial, no lock
    check_attack("train on a full disk", _train_args(assets["split"], full / "run"), code=1,
           words=("no space left on device", "best.ckpt"), roots=(assets["root"],))
    assert not list(full.rglob("*.tmp")) and not (full / "run" / "weights" / "best.ckpt").exists()


def test_evaluate_batch_size_zero_is_one_line(assets, tmp_path):
    check_attack("evaluate --batch-size 0", ["evaluate", assets["ckpt"], assets["split"] / "test", "--batch-size", "0",
                                       "--out", tmp_path / "e"], code=2, words=("--batch-size",), roots=(assets["root"],))


# ---- 4, 9. huge images: refused from the header, in every command -------------------------

def huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width x height`` (no pixel data: only the header is ever read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_huge_images_are_skipped_with_their_reason(assets, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(assets["split"] / "train", source)
    huge_png(source / "PG" / "PG (99).png", 20000, 20000)
    result = check_attack("split with a 20000x20000 PNG in the source", ["split", source, tmp_path / "out", "--group-by",
                                                                    "none", "-q"], code=0, words=("unreadable",),
                    roots=(source,))
    split_json = json.loads((tmp_path / "out" / "split.json").read_text())
    assert any("above the limit" in s for s in split_json["skipped_unreadable"]), result.output
    check_attack("audit with a 20000x20000 PNG", ["audit", source, "--out", tmp_path / "audit", "-q"], code=0,
           roots=(source,))
    reasons = json.loads((tmp_path / "audit" / "audit.json").read_text())["unreadable_errors"]
    assert any("above the limit" in reason for reason in reasons.values()), reasons
    big = huge_png(tmp_path / "big.png", 12000, 12000)
    check_attack("predict a 12000x12000 PNG", ["predict", assets["onnx"], big, "--out", tmp_path / "p.csv"], code=1,
           words=("could be read",), roots=(assets["root"],))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert rows[0]["status"].startswith("error:") and "12000 x 12000" in rows[0]["status"]


def test_exif_orientation_is_applied(tmp_path):
    from crystalscope.data.images import load_rgb

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = np.asarray(load_rgb(tmp_path / "turned.jpg"))
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the white half is now on top


# ---- 6. small grouped splits ---------------------------------------------------------------

def test_a_small_grouped_class_gets_test_images():
    files = {"cex": [Path(f"cex/{i}.png") for i in range(30)],
             "pg": [Path(f"pg/g{g}-{v}.png") for g in range(9) for v in range(3 + g % 3)]}

    def key(path: Path) -> str:
        return path.stem.split("-")[0]

    for seed in range(20):
        warnings: list[str] = []
        assignment = assign_splits(files, key, (0.70, 0.25, 0.05), seed, warnings)
        for cls in files:
            splits = {assignment[p] for p in files[cls]}
            assert splits == {"train", "val", "test"}, (seed, cls)
        assert warnings == []
    warnings = []
    assign_splits({"pg": [Path("pg/a-1.png"), Path("pg/b-1.png")]}, key, (0.70, 0.25, 0.05), 0, warnings)
    assert warnings and "'pg'" in warnings[0] and "split" in warnings[0]


def test_nan_ratios_are_named_as_not_a_number(assets, tmp_path):
    check_attack("split --ratios nan,0.5,0.5", ["split", assets["split"] / "train", tmp_path / "o", "--ratios", "nan,0.5,0.5"],
           code=2, words=("not a finite number",), roots=(assets["root"],))


# ---- 7, 8. leftovers and concurrent writers ------------------------------------------------

def test_leftovers_of_a_killed_run_are_removed(assets, tmp_path):
    pid = dead_pid()
    stale_dir = tmp_path / f".synth.{pid}.abc123.partial"
    stale_dir.mkdir()
    (stale_dir / "half.png").write_bytes(b"x")
    stale_file = tmp_path / f".p.csv.{pid}.xyz.tmp"
    stale_file.write_bytes(b"half")
    foreign = tmp_path / ".other.tmp"  # not ours: never touched
    foreign.write_text("mine")
    check_attack("synth after a kill -9 left a .partial", ["synth", tmp_path / "synth", "--per-class", "2", "-q"], code=0)
    check_attack("predict after a kill -9 left a .tmp", ["predict", assets["onnx"], assets["images"], "--out",
                                                   tmp_path / "p.csv"], code=0, roots=(assets["root"],))
    assert not stale_dir.exists() and not stale_file.exists() and foreign.read_text() == "mine"


def test_a_real_kill_9_leaves_nothing_the_next_run_does_not_remove(tmp_path):
    import time

    import crystalscope

    out = tmp_path / "synth"
    env = {**os.environ, "PYTHONPATH": str(Path(crystalscope.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "crystalscope", "synth", str(out), "--per-class", "500",
                             "--workers", "1", "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob(".synth.*.partial/*/*/*/*")):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert list(tmp_path.glob(".synth.*.partial")) and (tmp_path / ".synth.lock").exists()
    check_attack("synth again after kill -9 mid-write", ["synth", out, "--per-class", "2", "--workers", "1", "-q"], code=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_leftover_checkpoint_tmp_is_removed_on_resume(tmp_path):
    from crystalscope.safety import clean_stale

    weights = tmp_path / "run" / "weights"
    weights.mkdir(parents=True)
    leftover = weights / f".last.ckpt.{dead_pid()}.q1w2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    live = weights / f".best.ckpt.{os.getpid()}.q1w2.tmp"  # a running writer's file stays
    live.write_bytes(b"being written")
    assert clean_stale(tmp_path / "run", recursive=True) == [leftover]
    assert live.exists()


def test_a_second_writer_to_the_same_output_is_refused(assets, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("first result set\n")
    with output_lock(out):  # another predict is still writing out
        check_attack("two predicts writing one --out", ["predict", assets["onnx"], assets["images"], "--out", out], code=2,
               words=("being written by another",), roots=(tmp_path,))
    assert out.read_text() == "first result set\n"


# ---- 10, 3. resume continues the identical computation; environment.json ------------------

@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    result = RUNNER.invoke(app, _train_args(assets["split"], out, "--epochs", "3", "--lr", "0.01",
                                            "--batch-size", "6", "--trainable-fraction", "0.3"))
    assert result.exit_code == 0, result.output
    return out


def _metrics_without_time(run: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in rows]


def test_resume_continues_bit_for_bit(assets, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    real = run_module.train_epoch

    def stop_before_epoch_3(cfg, learner, state, data, epoch, on_step=None):
        if epoch == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) after epoch 2's checkpoint
        return real(cfg, learner, state, data, epoch, on_step)

    monkeypatch.setattr(run_module, "train_epoch", stop_before_epoch_3)
    args = _train_args(assets["split"], out, "--epochs", "3", "--lr", "0.01", "--batch-size", "6",
                       "--trainable-fraction", "0.3")
    assert RUNNER.invoke(app, args).exit_code == 130
    monkeypatch.setattr(run_module, "train_epoch", real)
    result = RUNNER.invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert _metrics_without_time(out) == _metrics_without_time(uninterrupted)
    a = torch.load(out / "weights" / "last.ckpt", weights_only=True)["model_state"]
    b = torch.load(uninterrupted / "weights" / "last.ckpt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_cached_features_continues_bit_for_bit(assets, tmp_path, monkeypatch):
    args = ["--trainable-fraction", "0", "--cache-features", "--feature-passes", "2", "--lr", "0.01",
            "--batch-size", "6", "--epochs", "3"]
    full = tmp_path / "full"
    assert RUNNER.invoke(app, _train_args(assets["split"], full, *args)).exit_code == 0
    real = run_module.train_epoch

    def stop_before_epoch_2(cfg, learner, state, data, epoch, on_step=None):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(cfg, learner, state, data, epoch, on_step)

    monkeypatch.setattr(run_module, "train_epoch", stop_before_epoch_2)
    out = tmp_path / "stopped"
    assert RUNNER.invoke(app, _train_args(assets["split"], out, *args)).exit_code == 130
    monkeypatch.setattr(run_module, "train_epoch", real)
    assert RUNNER.invoke(app, ["train", "--resume", str(out)]).exit_code == 0
    assert _metrics_without_time(out) == _metrics_without_time(full)


def test_environment_json_records_the_run(assets, uninterrupted):
    env = json.loads((uninterrupted / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0 and env["device"] == "cpu"
    assert set(env["data_sha256"]) == {"train", "val", "test"}
    assert len({env["data_sha256"][s] for s in ("train", "val", "test")}) == 3
    assert env["initial_weights_sha256"].startswith("sha256:") and env["timm"] and env["numpy"]


def test_evaluate_warns_on_the_training_split(assets, uninterrupted, tmp_path):
    best = uninterrupted / "weights" / "best.ckpt"
    warned = check_attack("evaluate on the training split", ["evaluate", best, assets["split"] / "train", "--out",
                                                         tmp_path / "e1"], code=0, roots=(assets["root"],))
    assert "warning:" in warned.output and "trained on" in warned.output
    clean = RUNNER.invoke(app, ["evaluate", str(best), str(assets["split"] / "test"), "--out", str(tmp_path / "e2")])
    assert clean.exit_code == 0 and "warning:" not in clean.output


# ---- 11. ONNX metadata is enough for a client in another language -------------------------

@pytest.mark.parametrize("resize,interpolation", [("stretch", "bilinear"), ("pad", "bicubic")])
def test_numpy_client_reproduces_the_predictor_from_metadata_alone(real_samples, tmp_path, resize, interpolation):
    import onnxruntime as ort

    import preprocessing_reference as reference
    from crystalscope import Predictor
    from crystalscope.export.onnx import export_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)  # spread the logits so a 1-level pixel error would show
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"], positive_class="pg",
                           preprocessing=Preprocessing(image_size=48, resize=resize, interpolation=interpolation),
                           temperature=1.3)
    onnx_path = Path(export_checkpoint(ckpt, tmp_path / "m.onnx")["path"])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["crystalscope"])
    spec, size = meta["preprocessing_spec"], meta["input_shape"][2]
    files = sorted(real_samples.glob("*.png"))
    expected = Predictor.load(onnx_path).predict(files)
    for path, prediction in zip(files, expected):
        x = reference.preprocess(np.asarray(Image.open(path)), spec, size)
        logits = session.run(None, {meta["input_name"]: x})[0][0] / meta["temperature"]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = dict(zip(meta["class_names"], probs))
        assert max(abs(got[c] - prediction.probabilities[c]) for c in got) < 1e-4, path.name
