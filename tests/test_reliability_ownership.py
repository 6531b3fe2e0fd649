"""Attacks on ownership: a folder is ours only if its manifest says we wrote every file in it.

Each attack is a real command on tiny data (tests/attacks.py); ``roots`` are the user's files,
so a command that deletes or rewrites one fails the attack. Also: file outputs that are not
plain files (devices, FIFOs, links to them) and the permissions of what we write (umask).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from attacks import FIXES, check_attack
from crystalscope.formats import MANIFEST_FILE

FIXES.extend([
    ("`--force` deletes a user's folder shaped like ours", "the ownership check compared top-level names "
     "(`cropped/`, `train/ val/ test/`) with a list, so nested user files went with them",
     "every folder output holds `crystalscope-manifest.json` (size + SHA-256 of each file it wrote, written "
     "atomically on commit, or by `record_files` for in-place writers); `--force` replaces a folder only if "
     "the manifest, of the same command, vouches for every file, nested ones too, and deletes only those "
     "(`crystalscope.io.foreign_entry` / `remove_recorded`)"),
    ("`demo --out X` deletes `X/data/`", "demo forced synth, split and audit over its sub-folders",
     "demo checks every sub-folder's manifest before any work and removes only recorded files of `run/`"),
    ("outputs that are not plain files", "the atomic rename landed on `/dev/null`, a FIFO or a link to one",
     "`check_output` refuses an existing file output that is not a regular file (stat through links); "
     "writing through a link to a plain file replaces its target and keeps the link"),
    ("outputs others cannot read", "staging folders made 0700 by `mkdtemp` became the final output",
     "`atomic_dir` gives the staged folder `0o777 & ~umask` (files `0o666 & ~umask`)"),
])

SYNTH = ["--per-class", "2", "--workers", "1", "-q"]


def _synth(out: Path, *extra) -> Path:
    check_attack("synth into a new folder", ["synth", out, *SYNTH, *extra], code=0)
    return out


def _user_file(path: Path, text: str = "mine") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _first_png(folder: Path) -> Path:
    return sorted(folder.rglob("*.png"))[0]


# ---- synth and split over a user's folder shaped like ours ---------------------------------------------

def test_synth_force_over_a_users_kaggle_shaped_dataset_is_refused(tmp_path):
    data = tmp_path / "data"
    for name in ("CEX_1.png", "CEX_2.png"):
        _user_file(data / "cropped" / "cropped" / "cex" / name, "user crop")
    _user_file(data / "synth_manifest.csv", "path,class\n")
    check_attack("synth --force over a user's cropped/cropped/cex/*.png", ["synth", data, *SYNTH, "--force"],
                 code=2, words=("no crystalscope manifest", "choose a new folder"), roots=(tmp_path,))
    assert len(list(data.rglob("*.png"))) == 2


def test_split_force_over_a_hand_made_split_is_refused(assets, tmp_path):
    mine = tmp_path / "mysplit"
    for split in ("train", "val", "test"):
        _user_file(mine / split / "cex" / f"{split}_hand_picked.png", "curated")
    _user_file(mine / "split.csv", "path,class,split\n")
    check_attack("split --force over a hand-made train/val/test split",
                 ["split", assets["split"] / "train", mine, "--force", "-q"],
                 code=2, words=("no crystalscope manifest",), roots=(assets["root"], tmp_path))


def test_synth_force_rerun_over_our_untouched_output_succeeds(tmp_path):
    out = _synth(tmp_path / "set")
    first = (out / MANIFEST_FILE).read_text()
    check_attack("synth --force rerun over its own untouched output", ["synth", out, *SYNTH, "--force", "--seed", "3"],
                 code=0)
    assert (out / MANIFEST_FILE).read_text() != first  # the new set, recorded anew


def test_synth_force_rerun_after_the_user_edited_a_deep_file_is_refused(tmp_path):
    out = _synth(tmp_path / "set")
    edited = _first_png(out / "cropped")
    edited.write_bytes(edited.read_bytes() + b"annotated")
    rel = edited.relative_to(out).as_posix()
    check_attack("synth --force after the user edited cropped/cropped/cex/<file>.png",
                 ["synth", out, *SYNTH, "--force"], code=2, words=(rel, "was changed"), roots=(tmp_path,))


def test_synth_force_rerun_after_the_user_added_a_deep_file_is_refused(tmp_path):
    out = _synth(tmp_path / "set")
    _user_file(out / "cropped" / "cropped" / "cex" / "labelled_by_hand.png")
    check_attack("synth --force after the user added cropped/cropped/cex/labelled_by_hand.png",
                 ["synth", out, *SYNTH, "--force"], code=2,
                 words=("cropped/cropped/cex/labelled_by_hand.png", "did not write"), roots=(tmp_path,))


def test_an_output_without_a_manifest_is_refused_as_not_ours(tmp_path):
    out = _synth(tmp_path / "set")
    (out / MANIFEST_FILE).unlink()  # what an output of a version before manifests looks like
    check_attack("synth --force over an output without a manifest (an older version's)",
                 ["synth", out, *SYNTH, "--force"], code=2,
                 words=("no crystalscope manifest", "before it kept manifests", "choose a new folder"),
                 roots=(tmp_path,))


def test_split_reruns_replace_only_their_own_files(assets, tmp_path):
    out = tmp_path / "split"
    source = assets["split"] / "train"
    check_attack("split into a new folder", ["split", source, out, "-q"], code=0, roots=(assets["root"],))
    check_attack("split --force rerun over its own untouched split", ["split", source, out, "--force", "-q"],
                 code=0, roots=(assets["root"],))
    _user_file(out / "train" / "cex" / "extra.png")
    check_attack("split --force after the user added train/cex/extra.png",
                 ["split", assets["split"] / "train", out, "--force", "-q"], code=2, words=("train/cex/extra.png",),
                 roots=(assets["root"], tmp_path))


@pytest.mark.parametrize("mode", ["symlink", "hardlink"])
def test_split_links_are_recorded_and_replacing_them_keeps_the_sources(assets, tmp_path, mode):
    out = tmp_path / "split"
    args = ["split", assets["split"] / "train", out, "--mode", mode, "-q"]
    check_attack(f"split --mode {mode} into a new folder", args, code=0, roots=(assets["root"],))
    check_attack(f"split --mode {mode} --force rerun", [*args, "--force"], code=0, roots=(assets["root"],))
    assert (out / MANIFEST_FILE).is_file()


# ---- every other folder-writing command: a rerun with a user's file inside -------------------------------

def check_rerun_refused(name: str, args: list, out: Path, foreign: str, roots: tuple):
    """Run ``args`` (writing ``out``), put a user's file at ``out/foreign``, rerun: refused, naming it."""
    check_attack(f"{name} into a new folder", args, code=0, roots=roots)
    _user_file(out / foreign)
    check_attack(f"{name} --force rerun with the user's {foreign} inside", [*args, "--force"], code=2,
                 words=(foreign, "did not write"), roots=(*roots, out))


def test_audit_rerun_with_a_nested_user_file_is_refused(assets, tmp_path):
    out = tmp_path / "audit"
    check_attack("audit into a new folder", ["audit", assets["split"], "--out", out, "-q"], code=0,
                 roots=(assets["root"],))
    _user_file(out / "notes" / "review.md")
    check_attack("audit rerun with the user's notes/review.md inside", ["audit", assets["split"], "--out", out, "-q"],
                 code=2, words=("notes/review.md",), roots=(assets["root"], out))


def test_evaluate_rerun_with_a_user_file_is_refused(assets, tmp_path):
    out = tmp_path / "eval"
    check_rerun_refused("evaluate", ["evaluate", assets["ckpt"], assets["split"] / "test", "--out", out], out,
                   "plots/annotated.png", (assets["root"],))


def test_evaluate_force_over_another_commands_output_is_refused(assets, tmp_path):
    data = _synth(tmp_path / "set")
    check_attack("evaluate --out <a synth output> --force",
                 ["evaluate", assets["ckpt"], assets["split"] / "test", "--out", data, "--force"], code=2,
                 words=("output of `crystalscope synth`",), roots=(assets["root"], tmp_path))


def test_explain_rerun_with_a_user_file_is_refused(assets, tmp_path):
    out = tmp_path / "explain"
    check_rerun_refused("explain", ["explain", assets["ckpt"], assets["images"], "--out", out], out,
                   "mine/thesis_figure.cam.png", (assets["root"],))


def test_embed_rerun_with_a_user_file_is_refused(assets, tmp_path):
    out = tmp_path / "embed"
    check_rerun_refused("embed", ["embed", assets["onnx"], assets["split"] / "test", "--out", out, "-k", "2"], out,
                   "embedding_notes.txt", (assets["root"],))


def test_drift_rerun_with_a_user_file_is_refused(assets, tmp_path):
    out = tmp_path / "drift"
    check_rerun_refused("drift", ["drift", assets["split"] / "train", assets["split"] / "test", "--model", assets["onnx"],
                             "--out", out, "--permutations", "20", "--neighbours", "2"], out,
                   "old/drift.csv", (assets["root"],))


SMALL_RUN = ["--frames", "2", "--width", "192", "--height", "160", "--interval-s", "10"]


def test_synth_process_reruns(tmp_path):
    out = tmp_path / "run"
    args = ["synth-process", out, *SMALL_RUN]
    check_attack("synth-process into a new folder", args, code=0)
    check_attack("synth-process --force rerun over its own untouched run", [*args, "--force"], code=0)
    _user_file(out / "frames" / "frame_by_hand.png")
    check_attack("synth-process --force with the user's frames/frame_by_hand.png inside", [*args, "--force"],
                 code=2, words=("frames/frame_by_hand.png",), roots=(tmp_path,))


def test_synth_ood_rerun_with_a_user_file_is_refused(tmp_path):
    out = tmp_path / "ood"
    check_rerun_refused("synth-ood", ["synth-ood", out, "--per-set", "2"], out, "uniform/my_foreign.png", ())


def test_ood_eval_report_into_a_users_folder_is_refused(assets, tmp_path):
    report = tmp_path / "report"
    _user_file(report / "ood_eval.md", "my own write-up")
    check_attack("ood-eval --report into a folder holding the user's ood_eval.md",
                 ["ood-eval", assets["onnx"], assets["split"] / "test", assets["split"] / "val", "--report", report],
                 code=2, words=("ood_eval.md", "no crystalscope manifest"), roots=(assets["root"], tmp_path))


def test_monitor_reruns(assets, tmp_path):
    frames = tmp_path / "process"
    check_attack("synth-process frames for the monitor", ["synth-process", frames, *SMALL_RUN], code=0)
    out = tmp_path / "monitor"
    args = ["monitor", assets["onnx"], frames / "frames", "--out", out, "--overlay"]
    check_attack("monitor into a new folder", args, code=0, roots=(assets["root"],))
    check_attack("monitor --force rerun over its own untouched output", [*args, "--force"], code=0,
                 roots=(assets["root"],))
    _user_file(out / "overlay" / "circled_by_hand.jpg")
    check_attack("monitor --force with the user's overlay/circled_by_hand.jpg inside", [*args, "--force"], code=2,
                 words=("overlay/circled_by_hand.jpg",), roots=(assets["root"], out))


# ---- demo never deletes what it did not write --------------------------------------------------------

@pytest.mark.parametrize("sub", ["data/cropped/cropped/cex/CEX_1.png", "run/weights/best.ckpt"])
def test_demo_out_over_a_users_files_is_refused(tmp_path, sub):
    out = tmp_path / "demo"
    _user_file(out / sub, "the user's")
    check_attack(f"demo --out X with the user's X/{sub}", ["demo", "--out", out, "--per-class", "10", "--epochs", "1"],
                 code=2, words=(sub.split("/")[0], "no crystalscope manifest"), roots=(tmp_path,))


# ---- file outputs that are not plain files ----------------------------------------------------------

def _device(tmp_path: Path) -> Path:
    """A character device like /dev/null, made in tmp_path (never risk the real one)."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        pytest.skip("cannot make a device node here")
    return node


def _special(tmp_path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe")
        return tmp_path / "pipe"
    device = _device(tmp_path)
    if kind == "link to a device":
        (tmp_path / "out.csv").symlink_to(device)
        return tmp_path / "out.csv"
    return device


@pytest.mark.parametrize("kind", ["device", "fifo", "link to a device"])
def test_predict_out_onto_a_special_file_is_refused(assets, tmp_path, kind):
    target = _special(tmp_path, kind)
    check_attack(f"predict --out <a {kind}>", ["predict", assets["onnx"], assets["images"], "--out", target],
                 code=2, words=("not a regular file",), roots=(assets["root"],))
    mode = os.stat(target).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_export_out_onto_a_special_file_is_refused(assets, tmp_path, kind):
    target = _special(tmp_path, kind)
    check_attack(f"export --out <a {kind}>", ["export", assets["ckpt"], "--out", target], code=2,
                 words=("not a regular file",), roots=(assets["root"],))
    assert not target.is_file() and target.exists()


# ---- permissions follow the umask --------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(assets, tmp_path, umask):
    old = os.umask(umask)
    try:
        data = _synth(tmp_path / "set")
        check_attack(f"audit under umask {umask:03o}", ["audit", assets["split"], "--out", tmp_path / "audit", "-q"],
                     code=0, roots=(assets["root"],))
    finally:
        os.umask(old)
    for folder in (data, data / "cropped" / "cropped" / "cex", tmp_path / "audit"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    for path in (_first_png(data), data / MANIFEST_FILE, tmp_path / "audit" / "audit.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
