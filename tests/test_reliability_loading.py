"""Attacks on what a command loads: ONNX metadata, checkpoint values, config values, and user text.

A model or config that is wrong is refused before any work starts, with one line naming the
file, the key and the allowed values (``predict`` never labels with NaN probabilities, ``serve``
never starts a model that answers 500, ``train`` writes nothing). File and folder names are
printed literally: a ``[/b]`` in a path is text, not rich markup.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from attacks import FIXES, check_attack

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FIXES.extend([
    ("bad model description", "ONNX metadata and checkpoint values were read as given (NaN or 0 temperature, "
     "std 0, duplicate classes, unknown format, size or width not the graph's)",
     "`models.description.validate_metadata` in the one ONNX load, `validate_description` in `load_checkpoint`; "
     "known formats in `formats.KNOWN_ONNX_FORMATS`"),
    ("config out of its domain", "no ranges for seed, dropout, hidden widths, augmentation; non-UTF-8 YAML "
     "raised", "pydantic `Field` constraints; `config._type_error` names the key and the range; `_read_yaml`"),
    ("user text as markup", "rich read `[/b]` in a path or class folder as a tag and raised",
     "`cli.common.console()` (markup off) for every command; the progress bar's `TextColumn(markup=False)`"),
])


# ---- bad ONNX metadata ------------------------------------------------------------------------

def _onnx_with(assets, tmp_path: Path, edit, name: str = "bad.onnx") -> Path:
    """A copy of the tiny ONNX model whose crystalscope metadata went through ``edit`` (dict -> dict or str)."""
    model = onnx.load(str(assets["onnx"]))
    entry = next(p for p in model.metadata_props if p.key == "crystalscope")
    changed = edit(json.loads(entry.value))
    entry.value = changed if isinstance(changed, str) else json.dumps(changed)
    target = tmp_path / name
    onnx.save(model, str(target))
    return target


def _set(key, value):
    def edit(meta):
        node = meta
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        return meta
    return edit


def _drop(key):
    def edit(meta):
        meta.pop(key)
        return meta
    return edit


BAD_METADATA = [
    ("unknown format", _set("format", "crystalscope-onnx/99"), "format"),
    ("no format", _drop("format"), "format"),
    ("temperature NaN", _set("temperature", math.nan), "temperature"),
    ("temperature inf", _set("temperature", math.inf), "temperature"),
    ("temperature -1", _set("temperature", -1.0), "temperature"),
    ("temperature 0", _set("temperature", 0), "temperature"),
    ("temperature a string", _set("temperature", "hot"), "temperature"),
    ("std 0", _set("preprocessing.std", [0.2, 0.0, 0.2]), "preprocessing.std"),
    ("mean of length 2", _set("preprocessing.mean", [0.5, 0.5]), "preprocessing.mean"),
    ("duplicate class names", _set("class_names", ["cex", "cex"]), "class_names"),
    ("an empty class name", _set("class_names", ["cex", ""]), "class_names"),
    ("class_names a string", _set("class_names", "cex,pg"), "class_names"),
    ("positive_class not a class", _set("positive_class", "salt"), "positive_class"),
    ("image_size 0", _set("preprocessing.image_size", 0), "image_size"),
    ("image_size not the graph's", _set("preprocessing.image_size", 64), "image_size"),
    ("3 classes, 2 outputs", _set("class_names", ["cex", "pg", "salt"]), "class_names"),
    ("metadata a JSON list", lambda meta: "[1, 2]", "metadata"),
]


@pytest.mark.parametrize("case,edit,key", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_predict_refuses_bad_onnx_metadata_before_labelling(assets, tmp_path, case, edit, key):
    model = _onnx_with(assets, tmp_path, edit)
    out = tmp_path / "predictions.csv"
    result = check_attack(f"predict: ONNX metadata {case}", ["predict", model, assets["images"], "--out", out],
                          code=2, words=("bad.onnx", key), roots=(assets["root"], model))
    assert not out.exists()
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output


def test_serve_refuses_to_start_on_bad_onnx_metadata(assets, tmp_path):
    model = _onnx_with(assets, tmp_path, _set("temperature", math.nan))
    result = check_attack("serve: ONNX temperature NaN", ["serve", model, "--port", "0"], code=2,
                          words=("bad.onnx", "temperature"), roots=(assets["root"], model))
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("command", ["monitor", "embed"])
def test_other_onnx_commands_refuse_an_unknown_format(assets, tmp_path, command):
    model = _onnx_with(assets, tmp_path, _set("format", "crystalscope-onnx/99"))
    if command == "monitor":
        args = ["monitor", model, assets["images"], "--out", tmp_path / "out"]
    else:
        args = ["embed", model, assets["split"] / "test", "--out", tmp_path / "out"]
    check_attack(f"{command}: unknown ONNX format", args, code=2, words=("bad.onnx", "format"),
                 roots=(assets["root"], model))
    assert not (tmp_path / "out").exists()


# ---- bad checkpoint values --------------------------------------------------------------------

def _ckpt_with(assets, tmp_path: Path, key: str, value) -> Path:
    ckpt = torch.load(assets["ckpt"], map_location="cpu", weights_only=True)
    node = ckpt
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    target = tmp_path / "bad.ckpt"
    torch.save(ckpt, target)
    return target


BAD_CHECKPOINT = [
    ("predict", "temperature", math.nan),
    ("predict", "temperature", 0.0),
    ("predict", "preprocessing.std", [0.2, 0.0, 0.2]),
    ("predict", "class_names", ["cex", "cex"]),
    ("evaluate", "temperature", -2.0),
    ("evaluate", "positive_class", "salt"),
    ("export", "temperature", math.inf),
    ("export", "preprocessing.mean", [0.5]),
]


@pytest.mark.parametrize("command,key,value", BAD_CHECKPOINT, ids=[f"{c}-{k}-{v}" for c, k, v in BAD_CHECKPOINT])
def test_bad_checkpoint_values_are_refused(assets, tmp_path, command, key, value):
    ckpt = _ckpt_with(assets, tmp_path, key, value)
    out = tmp_path / "out"
    args = {"predict": ["predict", ckpt, assets["images"], "--out", out, "--device", "cpu"],
            "evaluate": ["evaluate", ckpt, assets["split"] / "test", "--out", out, "--device", "cpu"],
            "export": ["export", ckpt, "--out", out]}[command]
    check_attack(f"{command}: checkpoint {key} = {value!r}", args, code=2, words=("bad.ckpt", key.split(".")[-1]),
                 roots=(assets["root"], ckpt))
    assert not out.exists()


# ---- bad config values ------------------------------------------------------------------------

def _train_args(split: Path, out: Path, *extra) -> list:
    return ["train", split, "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1",
            "--out", out, "--no-onnx", *extra]


BAD_CONFIG = [
    ("seed -1", b"seed: -1\n", ("seed", "[0, 4294967295]")),
    ("seed 2**32", b"seed: 4294967296\n", ("seed", "[0, 4294967295]")),
    ("dropout 1", b"head_dropout: [0.5, 1.0]\n", ("head_dropout", "[0, 1)")),
    ("hidden width 0", b"head_hidden: [0, 8]\n", ("head_hidden", "[1, inf)")),
    ("rotation 720", b"rotation: 720\n", ("rotation", "[0, 180]")),
    ("zoom 1", b"augmentation: {zoom: 1.0}\n", ("zoom", "[0, 1)")),
    ("shift -0.1", b"shift: -0.1\n", ("shift", "[0, 1)")),
    ("not UTF-8", b"lr: 0.1\nbackbone: r\xe9snet\xff\n", ("UTF-8",)),
    ("a list, not a mapping", b"- lr\n- 0.1\n", ("mapping",)),
    ("a section that is not a mapping", b"optimiser: 5\n", ("optimiser", "mapping")),
    ("a string where a list is expected", b"head_hidden: wide\n", ("head_hidden", "list")),
]


@pytest.mark.parametrize("case,text,words", BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_train_refuses_bad_config_before_writing(assets, tmp_path, case, text, words):
    config = tmp_path / "config.yaml"
    config.write_bytes(text)
    out = tmp_path / "run"
    result = check_attack(f"train --config: {case}", _train_args(assets["split"], out, "--config", config), code=2,
                          words=("config.yaml", *words), roots=(assets["root"], config))
    assert not out.exists()
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_train_refuses_a_seed_option_out_of_range(assets, tmp_path):
    out = tmp_path / "run"
    check_attack("train --seed -1", _train_args(assets["split"], out, "--seed", "-1"), code=2,
                 words=("--seed", "[0, 4294967295]"), roots=(assets["root"],))
    assert not out.exists()


# ---- user text is text ------------------------------------------------------------------------

MARKUP_NAMES = ["[/b]", "[red]x", "[link=x]y", "back\\slash [/]"]


@pytest.fixture
def wide(monkeypatch):
    """A wide terminal, so tables do not fold the names the assertions look for."""
    monkeypatch.setenv("COLUMNS", "400")


def _part(name: str) -> str:
    """``name`` as one file-name component (a "/" in it splits a path: "data [/b]" is "data [" / "b]")."""
    return name.replace("/", "")


def _markup_copy(assets, tmp_path: Path, name: str) -> Path:
    """The tiny split copied under a path holding ``name``, with one class folder and one file renamed too."""
    root = tmp_path / f"data {name}"
    shutil.copytree(assets["split"], root)  # (makes the parents a "/" in name implies)
    for split in ("train", "val", "test"):
        (root / split / "PG").rename(root / split / f"PG {_part(name)}")
    first = sorted((root / "test" / "CEX").iterdir())[0]
    first.rename(first.with_name(f"CEX {_part(name)}.png"))
    return root


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_split_and_audit_print_names_literally(assets, tmp_path, name, wide):
    data = _markup_copy(assets, tmp_path, name)
    out = tmp_path / f"split {name}"
    result = check_attack(f"split: names with {name!r}", ["split", data / "train", out, "-q"], code=0, roots=(data,))
    assert name in result.output.replace("\n", ""), result.output
    result = check_attack(f"audit: names with {name!r}", ["audit", data, "--out", tmp_path / f"audit {name}", "-q"],
                          code=0, roots=(data,))
    assert f"pg {_part(name)}" in result.output.lower(), result.output


@pytest.mark.parametrize("name", ["[/b]", "[red]x"])
def test_predict_prints_file_names_literally(assets, tmp_path, name, wide):
    data = _markup_copy(assets, tmp_path, name)
    out = tmp_path / f"pred {name}.csv"
    result = check_attack(f"predict: file names with {name!r}", ["predict", assets["onnx"], data / "test", "--out", out],
                          code=0, roots=(data,))
    assert f"CEX {_part(name)}.png" in result.output, result.output
    missing = tmp_path / f"gone {_part(name)}.png"
    check_attack(f"predict: a missing file named {name!r}", ["predict", assets["onnx"], missing, "--out", out],
                 code=2, words=(f"gone {_part(name)}.png",))


def test_synth_prints_its_folder_literally(tmp_path, wide):
    out = tmp_path / "synth [/b] [red]"
    result = check_attack("synth: OUT_DIR with markup", ["synth", out, "--per-class", "2", "--workers", "1", "-q"],
                          code=0)
    assert "[/b] [red]" in result.output.replace("\n", "")


def test_monitor_prints_frame_names_literally(assets, tmp_path, wide):
    frames = tmp_path / "frames [/b]"
    frames.mkdir(parents=True)
    Image.new("RGB", (96, 64), (20, 20, 20)).save(frames / "frame [red] 1.png")
    out = tmp_path / "monitor [link=x]y"
    result = check_attack("monitor: frames and --out with markup", ["monitor", assets["onnx"], frames, "--out", out],
                          code=0, roots=(frames,))
    assert "[link=x]y" in result.output.replace("\n", "")


def test_progress_bar_description_is_literal(monkeypatch):
    """The one progress bar: a description holding a file name renders as text."""
    import io
    import sys

    from crystalscope.runtime import progress_bar

    stream = io.StringIO()
    stream.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar("decoding [/b] data", total=2, transient=False) as advance:
        advance(2, 2)
    assert "[/b]" in stream.getvalue()


def test_embed_prints_class_folder_names_literally(assets, tmp_path, wide):
    data = _markup_copy(assets, tmp_path, "[red]x")
    result = check_attack("embed: class folders with markup", ["embed", assets["onnx"], data / "test", "--out",
                                                               tmp_path / "embed [/b]", "--clusters", "2"],
                          code=0, roots=(data,))
    assert "[red]x" in result.output and "embed [/b]" in result.output, result.output
