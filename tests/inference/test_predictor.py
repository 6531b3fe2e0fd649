"""Prediction: .ckpt and .onnx agree, any image mode works, bad files become error rows."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from crystalscope import Prediction, Predictor  # noqa: E402
from crystalscope.cli import app  # noqa: E402
from crystalscope.data.transforms import Preprocessing  # noqa: E402
from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.evaluation.calibration import softmax  # noqa: E402
from crystalscope.export.onnx import export_checkpoint  # noqa: E402
from crystalscope.inference.predictor import collect_images  # noqa: E402
from crystalscope.models.factory import HeadSpec, build_model  # noqa: E402
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402

TEMPERATURE = 1.7
COLUMNS = ["path", "predicted", "confidence", "p_cex", "p_pg", "ood_score", "ood_threshold", "status"]


def tiny_checkpoint(resize: str, temperature: float = TEMPERATURE) -> dict:
    """Untrained resnet18 (same seed for every call) with logits spread over ~1 unit."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)  # untrained logits are ~0: make comparisons bite
    return make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=temperature,
                           preprocessing=Preprocessing(image_size=48, resize=resize))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{resize: {"ckpt": path, "onnx": path}} for both resize policies."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for resize in ("stretch", "pad"):
        ckpt = save_checkpoint(tiny_checkpoint(resize), root / f"{resize}.ckpt")
        onnx_path = Path(export_checkpoint(ckpt, root / f"{resize}.onnx")["path"])
        out[resize] = {"ckpt": ckpt, "onnx": onnx_path}
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def crystal_picture(seed: int, size=(70, 50)) -> np.ndarray:
    """A grey uint8 picture with a few bright blobs (stand-in for a crystal crop)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    grey = 30 + rng.normal(0, 6, (h, w))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
        grey += 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(grey, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_ckpt_and_onnx_agree_on_real_samples(models, real_samples, tmp_path, resize):
    runner = CliRunner()
    rows = {}
    for kind in ("ckpt", "onnx"):
        out = tmp_path / f"{kind}.csv"
        result = runner.invoke(app, ["predict", str(models[resize][kind]), str(real_samples), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows[kind] = read_csv(out)
        assert list(rows[kind][0].keys()) == COLUMNS
    assert len(rows["ckpt"]) == len(rows["onnx"]) == 8  # 7 crops + the cat photo, all predicted
    assert any("not_a_crystal_cat.png" in r["path"] for r in rows["onnx"])
    for a, b in zip(rows["ckpt"], rows["onnx"]):
        assert a["path"] == b["path"] and a["status"] == b["status"] == "ok"
        assert a["predicted"] == b["predicted"]
        for column in ("p_cex", "p_pg", "confidence"):
            assert abs(float(a[column]) - float(b[column])) <= 1e-4
        assert float(a["p_cex"]) + float(a["p_pg"]) == pytest.approx(1.0, abs=2e-6)
    # the in-memory API agrees beyond the CSV's 6 decimals
    files = sorted(real_samples.glob("*.png"))
    p_ckpt = Predictor.load(models[resize]["ckpt"]).predict(files)
    p_onnx = Predictor.load(models[resize]["onnx"]).predict(files)
    diffs = [abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(p_ckpt, p_onnx) for c in ("cex", "pg")]
    assert max(diffs) <= 1e-4


def test_resize_policy_travels_with_the_model(models, real_samples):
    """Same weights, different resize: non-square crops must get different probabilities."""
    stretch = Predictor.load(models["stretch"]["onnx"])
    pad = Predictor.load(models["pad"]["onnx"])
    assert (stretch.preprocessing.resize, pad.preprocessing.resize) == ("stretch", "pad")
    non_square = [p for p in sorted(real_samples.glob("PG*.png")) if Image.open(p).size[0] != Image.open(p).size[1]]
    assert non_square, "the real samples should include a non-square PG crop"
    a, b = stretch.predict(non_square), pad.predict(non_square)
    assert max(abs(x.probabilities["pg"] - y.probabilities["pg"]) for x, y in zip(a, b)) > 1e-3


def test_temperature_scales_logits(models, real_samples, tmp_path):
    files = sorted(real_samples.glob("*.png"))
    predictor = Predictor.load(models["stretch"]["onnx"])
    assert predictor.temperature == pytest.approx(TEMPERATURE)
    logits = predictor.logits(predictor.preprocessing.prepare(files)).astype(np.float64)
    expected = np.exp(logits / TEMPERATURE) / np.exp(logits / TEMPERATURE).sum(axis=1, keepdims=True)
    got = np.array([[p.probabilities["cex"], p.probabilities["pg"]] for p in predictor.predict(files)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # a checkpoint with T = 1 gives sharper probabilities from the same logits
    plain = save_checkpoint(tiny_checkpoint("stretch", temperature=1.0), tmp_path / "t1.ckpt")
    sharp = np.array([[p.probabilities["cex"], p.probabilities["pg"]] for p in Predictor.load(plain).predict(files)])
    np.testing.assert_allclose(sharp, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), atol=1e-4)
    assert np.all(np.abs(sharp - 0.5) > np.abs(got - 0.5))  # softer with T > 1
    assert np.array_equal(sharp.argmax(axis=1), got.argmax(axis=1))  # never changes the class


def test_error_rows_and_the_batch_goes_on(models, real_samples, tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    for name in ("CEX (1).png", "PG (567).png"):
        shutil.copy(real_samples / name, folder / name)
    data = (real_samples / "PG (590).png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "x.png").write_text("this is not an image\n")
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(app, ["predict", str(models["stretch"]["onnx"]), str(folder),
                                      "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert set(rows) == {"CEX (1).png", "PG (567).png", "truncated.png", "x.png"}
    for bad in ("truncated.png", "x.png"):
        assert rows[bad]["status"].startswith("error: ")
        assert rows[bad]["predicted"] == rows[bad]["confidence"] == rows[bad]["p_pg"] == ""
    assert "not a readable image" in rows["x.png"]["status"]
    assert "truncated" in rows["truncated.png"]["status"] or "corrupt" in rows["truncated.png"]["status"]
    for good in ("CEX (1).png", "PG (567).png"):
        assert rows[good]["status"] == "ok" and rows[good]["predicted"] in ("cex", "pg")
    assert "errors: 2" in result.output


def test_exit_code_when_nothing_is_readable(models, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_text("nope")
    (folder / "b.JPG").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(models["stretch"]["onnx"]), str(folder), "--out", str(out)])
    assert result.exit_code == 1
    assert "none of the 2 files could be read" in result.output
    rows = read_csv(out)
    assert [r["status"].startswith("error:") for r in rows] == [True, True]


def test_any_mode_and_uppercase_extensions(models, tmp_path):
    grey = crystal_picture(1)
    folder = tmp_path / "modes"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(grey, "L").save(folder / "grey.PNG")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "deep16.TIF")  # 16-bit greyscale
    rgb = np.dstack([grey, grey // 2, 255 - grey])
    Image.fromarray(rgb, "RGB").save(folder / "colour.bmp")
    Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)]), "RGBA").save(folder / "opaque_rgba.Png")
    palette = Image.fromarray(rgb, "RGB").quantize(16)
    palette.save(folder / "sub" / "palette.PNG")
    Image.fromarray(grey, "L").save(folder / "sub" / "jpeg.JPEG", quality=95)
    assert Image.open(folder / "deep16.TIF").mode.startswith("I;16")

    predictor = Predictor.load(models["pad"]["onnx"])
    found = collect_images([folder], recursive=True)
    assert sorted(p.name for p in found) == ["colour.bmp", "deep16.TIF", "grey.PNG", "jpeg.JPEG",
                                             "opaque_rgba.Png", "palette.PNG"]
    assert len(collect_images([folder], recursive=False)) == 4
    preds = {Path(p.path).name: p for p in predictor.predict(found)}
    assert all(p.ok for p in preds.values()), [p.status for p in preds.values()]
    # 16-bit x257 scales back to exactly the 8-bit picture; opaque RGBA is its RGB
    assert preds["deep16.TIF"].probabilities == pytest.approx(preds["grey.PNG"].probabilities, abs=1e-6)
    assert preds["opaque_rgba.Png"].probabilities == pytest.approx(preds["colour.bmp"].probabilities, abs=1e-6)
    via_rgb = predictor.predict([palette.convert("RGB")])[0]
    assert preds["palette.PNG"].probabilities == pytest.approx(via_rgb.probabilities, abs=1e-6)


def test_pil_images_and_paths_mixed(models, real_samples):
    predictor = Predictor.load(models["stretch"]["ckpt"])
    path = real_samples / "PG (5282).png"
    preds = predictor.predict([Image.open(path), str(path), Image.open(real_samples / "CEX (2).png")], batch_size=2)
    assert [p.path for p in preds] == ["<image 0>", str(path), "<image 2>"]
    assert isinstance(preds[0], Prediction) and preds[0].ok
    assert preds[0].probabilities == pytest.approx(preds[1].probabilities, abs=1e-7)
    assert preds[0].confidence == max(preds[0].probabilities.values())
    assert predictor.positive_class == "pg" and predictor.backend_name == "torch"


def test_wrong_model_files_are_one_line_errors(models, tmp_path, real_samples):
    import onnx
    from onnx import TensorProto, helper

    text_onnx = tmp_path / "notes.onnx"
    text_onnx.write_text("hello")
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX model that crystalscope did not write
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(foreign))
    wrong_suffix = tmp_path / "model.txt"
    wrong_suffix.write_text("x")
    cases = {
        text_onnx: "not a readable ONNX model",
        foreign: "no crystalscope metadata",
        tmp_path / "missing.onnx": "model file not found",
        wrong_suffix: "unknown model type",
    }
    runner = CliRunner()
    for model, message in cases.items():
        result = runner.invoke(app, ["predict", str(model), str(real_samples), "--out", str(tmp_path / "p.csv")])
        assert result.exit_code == 2, (model, result.output)
        assert message in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()


def test_no_matching_paths_are_one_line_errors(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(models["stretch"]["onnx"]), str(empty)])
    assert result.exit_code == 2 and "no image files found" in result.output
    result = runner.invoke(app, ["predict", str(models["stretch"]["onnx"]), str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    with pytest.raises(CrystalscopeError, match="--batch-size 0"):
        Predictor.load(models["stretch"]["onnx"]).predict([empty], batch_size=0)


NO_TORCH_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"torch", "torchvision", "timm", "onnx", "scipy", "sklearn", "matplotlib"}

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    model, folder, out, ckpt = sys.argv[1:5]
    from crystalscope import Predictor
    from crystalscope.errors import MissingDependencyError
    try:
        Predictor.load(ckpt)
    except MissingDependencyError as exc:
        print("ckpt without torch:", exc)
    from crystalscope.cli import main
    sys.argv = ["crystalscope", "predict", model, folder, "--out", out]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("exit", code, "leaked", leaked)
""")


def test_onnx_prediction_imports_no_torch(models, real_samples, tmp_path):
    out = tmp_path / "p.csv"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(models["stretch"]["onnx"]), str(real_samples), str(out),
         str(models["stretch"]["ckpt"])],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "exit 0 leaked []" in proc.stdout, proc.stdout + proc.stderr
    assert "ckpt without torch: torch is not installed: run `pip install 'crystalscope[train]'`" in proc.stdout
    rows = read_csv(out)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    # and the same numbers as the in-process ONNX run
    expected = Predictor.load(models["stretch"]["onnx"]).predict([Path(r["path"]) for r in rows])
    for row, pred in zip(rows, expected):
        assert float(row["p_pg"]) == pytest.approx(pred.probabilities["pg"], abs=1e-6)


def test_bad_output_and_device_options_are_one_line_errors(models, real_samples, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(models["stretch"]["onnx"]), str(real_samples), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output
    result = runner.invoke(app, ["predict", str(models["stretch"]["ckpt"]), str(real_samples),
                                 "--out", str(tmp_path / "p.csv"), "--device", "gpu"])
    assert result.exit_code == 2 and "--device 'gpu' is not a device" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_ckpt_and_onnx_give_the_same_features(models, real_samples):
    """The ONNX file's second output is the checkpoint's penultimate features (model.embed)."""
    ckpt, onnx_model = Predictor.load(models["pad"]["ckpt"]), Predictor.load(models["pad"]["onnx"])
    batch = ckpt.preprocessing.prepare(sorted(real_samples.glob("*.png")))
    logits_t, feats_t = ckpt.logits_and_features(batch)
    logits_o, feats_o = onnx_model.logits_and_features(batch)
    assert feats_t.shape == feats_o.shape == (8, HeadSpec().hidden[-1])
    assert np.abs(feats_t - feats_o).max() <= 1e-4 * max(1.0, np.abs(feats_t).max())
    assert np.abs(logits_t - logits_o).max() <= 1e-4 * max(1.0, np.abs(logits_t).max())
    assert np.allclose(ckpt.logits(batch), logits_t)
    assert feats_t.std() > 0  # real, varying activations, not a constant


# ---- the decoding pipeline of Predictor.predict ---------------------------------------------

def _pipeline_predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)  # spread the untrained logits so a mix-up would show
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=Preprocessing(image_size=32))
    return Predictor.from_checkpoint(ckpt, device="cpu")


def test_pipelined_batches_give_the_rows_of_one_big_batch(tmp_path: Path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    items: list = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(path)
        items.append(path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items.insert(3, tmp_path / "broken.png")
    items.append(Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)))  # in-memory image
    predictor = _pipeline_predictor()
    done: list[int] = []
    small = predictor.predict(items, batch_size=2, on_batch=done.append)
    whole = predictor.predict(items, batch_size=64)
    assert done == [2, 2, 2, 2, 1]
    assert [p.path for p in small] == [p.path for p in whole] == [str(i) for i in items[:-1]] + ["<image 8>"]
    assert small[3].status.startswith("error") and sum(not p.ok for p in small) == 1
    for a, b in zip(small, whole):
        assert a.predicted == b.predicted and a.status == b.status
        if a.ok:
            assert np.allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-6)


# ---- Predictor.from_checkpoint: the forward training, evaluate and export call ---------------

def test_from_checkpoint_runs_an_in_memory_dict_like_the_saved_file(tmp_path, real_samples):
    from crystalscope.models.checkpoint import model_from_checkpoint

    ckpt = tiny_checkpoint("pad")
    in_memory = Predictor.from_checkpoint(ckpt, torch.device("cpu"))  # training passes a torch.device
    saved = Predictor.load(save_checkpoint(ckpt, tmp_path / "m.ckpt"), device="cpu")
    assert in_memory.backend_name == "torch" and in_memory.source == "<checkpoint>"
    assert in_memory.class_names == saved.class_names and in_memory.temperature == TEMPERATURE
    batch = in_memory.preprocessing.prepare(sorted(real_samples.glob("*.png")))
    logits = in_memory.logits(batch)
    assert logits.dtype == np.float32 and logits.shape == (8, 2)
    assert np.array_equal(logits, saved.logits(batch))
    # a tensor batch (a split already on the device) gives the numpy batch's logits
    assert np.array_equal(in_memory.logits(torch.from_numpy(batch)), logits)
    # fp32: the plain eager forward of the same weights, to float32 rounding
    with torch.no_grad():
        reference = model_from_checkpoint(ckpt).eval()(torch.from_numpy(batch)).numpy()
    assert np.abs(logits - reference).max() < 1e-4 and np.ptp(logits[:, 1]) > 0.1
    probs = in_memory.probabilities(batch)
    assert np.allclose(probs.sum(axis=1), 1.0) and not np.allclose(probs, softmax_plain(logits))


def softmax_plain(logits: np.ndarray) -> np.ndarray:
    """softmax at T = 1 (the calibrated one divides by the temperature first)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_logits_and_scores_is_the_forward_of_predict(real_samples):
    predictor = Predictor.from_checkpoint(tiny_checkpoint("stretch"), "cpu")
    files = sorted(real_samples.glob("*.png"))
    resized = np.stack([predictor.preprocessing.resize_uint8(f) for f in files])
    logits, scores = predictor.logits_and_scores(resized)
    assert scores is None  # no fitted rejection in this checkpoint
    predicted = predictor.predict(files)
    expected = np.array([[p.probabilities[c] for c in predictor.class_names] for p in predicted])
    # its logits, calibrated, are predict's probabilities (not merely the same argmax)
    assert np.abs(softmax(logits, predictor.temperature) - expected).max() < 1e-6
    assert np.argmax(logits, axis=1).tolist() == [predictor.class_names.index(p.predicted) for p in predicted]


def test_from_checkpoint_refuses_an_unusable_device():
    with pytest.raises(CrystalscopeError, match="--device"):
        Predictor.from_checkpoint(tiny_checkpoint("pad"), "cuda:7" if not torch.cuda.is_available() else "nonsense")


def test_every_onnx_load_checks_the_metadata_against_the_graph(models, tmp_path):
    import json

    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(models["stretch"]["onnx"]))
    entry = next(p for p in proto.metadata_props if p.key == "crystalscope")
    meta = json.loads(entry.value)
    meta["format"] = "crystalscope-onnx/99"
    entry.value = json.dumps(meta)
    bad = tmp_path / "future.onnx"
    onnx.save(proto, str(bad))
    for load in (Predictor.load, Predictor.from_onnx):
        with pytest.raises(CrystalscopeError, match=r"future\.onnx: format = 'crystalscope-onnx/99'"):
            load(bad)
    assert Predictor.load(models["stretch"]["onnx"]).class_names == ["cex", "pg"]
