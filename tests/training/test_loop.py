"""The GPU code path (bf16 autocast, channels_last, no_grad evaluation, compile options) run on the CPU.

CI has no GPU, so ``--precision bf16`` on the CPU is how the steps that the H200 runs get
exercised here: the same functions, only the device differs. """

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.config import load_config
from crystalscope.errors import CrystalscopeError
from crystalscope.models.factory import build_model
from crystalscope.training import loop
from crystalscope.training.steps import GraphedTrainStep
from lines_and_discs import make_split

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("data") / "split",
                      counts={"train": (12, 12), "val": (6, 6), "test": (6, 6)})


def _record_forward_inputs(model: torch.nn.Module, seen: list) -> None:
    def hook(_module, args):
        x = args[0]
        seen.append((torch.is_autocast_enabled("cpu"), x.is_contiguous(memory_format=torch.channels_last),
                     torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    model.register_forward_pre_hook(hook)


def test_bf16_steps_use_autocast_channels_last_and_no_grad_eval():
    model = build_model("resnet18", 2)
    seen: list = []
    _record_forward_inputs(model, seen)
    x = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    to_float = lambda b: b.permute(0, 3, 1, 2).contiguous().float() / 255  # noqa: E731
    stats = loop.train_one_epoch(model, x, y, opt, transform=to_float, batch_size=4, device=torch.device("cpu"),
                                 bf16=True)
    out = loop.evaluate(model, x, y, transform=to_float, batch_size=4, device=torch.device("cpu"), bf16=True)
    assert stats["samples"] == 8 and out["logits"].dtype.name == "float32" and out["logits"].shape == (8, 2)
    # two training steps under autocast with grad, then two evaluation steps under no_grad
    # (not inference_mode: CUDA graphs of a compiled model break on that switch)
    assert seen == [(True, True, True, False)] * 2 + [(True, True, False, False)] * 2
    seen.clear()
    loop.evaluate(model, x, y, transform=to_float, batch_size=8, device=torch.device("cpu"))
    assert seen == [(False, True, False, False)]  # CPU default: fp32, still channels_last


def test_evaluate_returns_copies_of_the_model_output():
    # a model that returns the same float32 buffer on every call (as a CUDA-graph replay does)
    class SameBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.zeros(2, 2)

        def forward(self, x):
            self.out.copy_(x[:, :2])
            return self.out

    x = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    out = loop.evaluate(SameBuffer(), x, None, transform=lambda b: b, batch_size=2, device=torch.device("cpu"))
    assert out["logits"].tolist() == x.tolist()


def test_train_with_precision_bf16_on_cpu_writes_a_float32_checkpoint_that_exports(small_split, tmp_path):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", str(small_split), "--backbone", "resnet18", "--weights", "none",
                                 "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                                 "--precision", "bf16", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "(bf16 autocast)" in result.output and "matches PyTorch" in result.output
    best = torch.load(out / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in best["model_state"].values() if v.is_floating_point()} == {torch.float32}
    assert best["training"]["config"]["precision"] == "bf16"
    assert json.loads((out / "test_results.json").read_text())["n_images"] == 12


def test_precision_and_compile_mode_are_checked():
    with pytest.raises(CrystalscopeError, match="--precision: 'fp16' is not known; use auto, fp32 or bf16"):
        load_config(None, {"precision": "fp16"})
    with pytest.raises(CrystalscopeError, match="--compile-mode: 'fast' is not known; use default, reduce-overhead"):
        load_config(None, {"compile_mode": "fast"})
    result = RUNNER.invoke(app, ["train", "x", "--precision", "half"])
    assert result.exit_code == 2 and "--precision: 'half' is not known" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_on_cpu_runs_evaluates_and_exports(small_split, tmp_path, monkeypatch):
    # the compiled path's own logic: static batch shapes (drop_last), train <-> no_grad eval switches,
    # and the uncompiled module for the report and export; CUDA graphs themselves need the GPU
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", str(small_split), "--backbone", "resnet18", "--weights", "none",
                                 "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--f1-threshold", "1.1",
                                 "--compile", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "torch.compile mode default" in result.output and "matches PyTorch" in result.output
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs
    assert json.loads((out / "test_results.json").read_text())["n_images"] == 12


# ---- the loop with a kept CUDA-graph step (the step itself: tests/training/test_steps.py) ----

def test_train_one_epoch_with_a_kept_step_drops_the_partial_batch_and_resets_the_sums():
    model = build_model("resnet18", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cpu = torch.device("cpu")
    step = GraphedTrainStep(model, opt, cpu, bf16=False)
    x = torch.randint(0, 255, (22, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 2, (22,))
    to_float = lambda b: b.permute(0, 3, 1, 2).contiguous().float() / 255  # noqa: E731
    first = loop.train_one_epoch(model, x, y, opt, transform=to_float, batch_size=4, device=cpu, drop_last=True,
                                 step=step)
    step.loss_sum += 1e6  # left over from the last epoch: must not count in the next
    second = loop.train_one_epoch(model, x, y, opt, transform=to_float, batch_size=4, device=cpu, drop_last=True,
                                  step=step)
    assert first["samples"] == second["samples"] == 20 and step.calls == 10
    assert 0 < first["loss"] < 100 and 0 < second["loss"] < 100 and 0 <= second["accuracy"] <= 1


def test_cuda_graphs_needs_a_gpu_and_excludes_compile(small_split, tmp_path):
    with pytest.raises(CrystalscopeError, match="--cuda-graphs: and --compile both replace the training step"):
        load_config(None, {"cuda_graphs": True, "compile": True})
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", str(small_split), "--backbone", "resnet18", "--weights", "none",
                                 "--cuda-graphs", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--cuda-graphs: needs a CUDA GPU, and this run's device is cpu" in " ".join(result.output.split())
    assert not out.exists()
