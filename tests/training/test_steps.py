"""training/steps.py: one optimisation step, eager (TrainStep) or with static buffers for a CUDA
graph (GraphedTrainStep; its capture needs a GPU, the rest runs here on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crystalscope.models.factory import build_model, set_trainable_fraction
from crystalscope.training import loop
from crystalscope.training.steps import GraphedTrainStep, TrainStep

CPU = torch.device("cpu")


def _batches(n: int, size: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 2, (size,), generator=gen))
            for _ in range(n)]


def test_a_step_moves_the_trainable_weights_and_leaves_the_frozen_ones():
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    set_trainable_fraction(model.backbone, 0.1)
    loop.train_mode(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # every parameter handed to the optimiser: the frozen ones must still not move (no gradient)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), CPU, bf16=False)
    x, y = _batches(1)[0]
    step(x, y)
    moved = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not moved & frozen
    # (timm zero-initialises the last BatchNorm scale of a block, so its conv moves from the second step on)
    assert {"head.7.weight", "backbone.layer4.1.bn2.weight", "backbone.layer4.1.bn2.bias"} <= moved


def test_the_sums_are_the_loss_and_hits_of_every_batch_and_reset_in_place():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)  # deterministic (no dropout); lr 0 keeps it fixed
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), CPU, bf16=False)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (4, 6)]
    for x, y in batches:
        step(x, y)
    with torch.no_grad():
        loss = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in batches)
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    assert float(step.loss_sum) == pytest.approx(loss, rel=1e-6) and int(step.correct) == hits
    loss_sum, correct = step.loss_sum, step.correct
    step.reset()
    # the same tensors, zeroed: a captured graph keeps adding into them
    assert step.loss_sum is loss_sum and step.correct is correct
    assert float(loss_sum) == 0.0 and int(correct) == 0


def test_a_bf16_step_on_the_cpu_keeps_float32_weights_and_sums():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2)
    loop.train_mode(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), CPU, bf16=True)
    head_before = model.head[-1].weight.detach().clone()
    x, y = _batches(1)[0]
    step(x.contiguous(memory_format=torch.channels_last), y)
    assert model.head[-1].weight.dtype == torch.float32 and not torch.equal(head_before, model.head[-1].weight)
    assert step.loss_sum.dtype == torch.float32 and torch.isfinite(step.loss_sum)
    assert 0 <= int(step.correct) <= 4


# ---- the CUDA-graph training step (its static-buffer logic; the capture itself needs a GPU) ----
# (moved from tests/training/test_loop.py)

def _two_runs_of(step_factory_a, step_factory_b, batches):
    results = []
    for factory in (step_factory_a, step_factory_b):
        torch.manual_seed(0)
        model = build_model("resnet18", 2)
        set_trainable_fraction(model.backbone, 0.1)
        loop.train_mode(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        step = factory(model, opt)
        torch.manual_seed(1)  # the head's dropout draws the same numbers in both runs
        for x, y in batches:
            step(x, y)
        results.append((model.state_dict(), float(step.loss_sum), int(step.correct), step))
    return results


def test_graphed_step_without_capture_trains_exactly_like_the_eager_step():
    batches = _batches(6)
    (eager_state, eager_loss, eager_correct, _), (graph_state, graph_loss, graph_correct, graphed) = _two_runs_of(
        lambda m, o: TrainStep(m, o, CPU, bf16=False),
        lambda m, o: GraphedTrainStep(m, o, CPU, bf16=False, capture=True),  # capture is a no-op off CUDA
        batches)
    assert graphed.graph is None and graphed.calls == 6 and graphed.x is not None  # 3 warm-up + static buffers
    assert graph_loss == pytest.approx(eager_loss, rel=1e-6) and graph_correct == eager_correct
    assert all(torch.equal(eager_state[k], graph_state[k]) for k in eager_state)
    with pytest.raises(ValueError, match=r"batch of shape \(3, 3, 32, 32\) after capturing \(4, 3, 32, 32\)"):
        graphed(batches[0][0][:3], batches[0][1][:3])


def test_graphed_step_copies_each_batch_into_its_static_buffers():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    step = GraphedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU, bf16=False)
    assert not step.capture  # capture is for CUDA only
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, generator=gen), torch.randint(0, 2, (4,), generator=gen)) for _ in range(6)]
    for x, y in batches[:GraphedTrainStep.WARMUP]:
        step(x, y)
    assert step.x is None  # warm-up batches run eagerly, no buffers yet
    step(*batches[3])
    buffer = step.x
    for x, y in batches[4:]:
        step(x, y)
        assert step.x is buffer and torch.equal(step.x, x) and torch.equal(step.y, y)
    assert step.calls == 6
