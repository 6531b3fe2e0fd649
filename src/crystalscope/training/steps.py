"""One optimisation step (forward, loss, backward, SGD update), eager or as a replayed CUDA graph.

At the reference batch size of 64, resnet101 on a large GPU is bound by the CPU launching its
~1,000 kernels per step, not by the GPU (figures: ``../shared/PERF.md``, docs/benchmarks.md).
A CUDA graph records the step's kernels once and replays them with a
single launch. ``torch.compile(mode="reduce-overhead")`` does that too, but pays a compile of
a minute or more per process; :class:`GraphedTrainStep` captures the eager kernels directly
(``torch.cuda.graph``), which costs about one step.

What a graph needs, and how it is met here:

- Static shapes and addresses: every batch is copied into the same input/label buffers (the
  caller drops a trailing partial batch), the parameters, gradients and SGD momentum buffers
  keep their storage (updated in place), and the loss/accuracy sums live in device tensors.
- Lazy state created before capture: the first ``WARMUP`` batches run eagerly on the side
  stream the capture uses (SGD allocates its momentum buffers, cuBLAS/cuDNN pick their kernels
  and workspaces); the next batch is captured and then replayed, so every batch is trained on
  exactly once, as in eager mode.
- No autocast weight cache across the capture boundary (:func:`~crystalscope.models.precision.autocast`).
- Random numbers in the graph (dropout) come from the default CUDA generator, which graphs
  support; augmentation runs outside the graph with its own seeded generator.

On the CPU the same class runs the step eagerly on its static buffers (``capture=False``), which
is how the tests check everything but the capture itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crystalscope.models.precision import autocast


class TrainStep:
    """Eager step; keeps running loss and correct-prediction sums on the device.

    Example:
        >>> step = TrainStep(model, optimizer, torch.device("cpu"), bf16=False)  # doctest: +SKIP
        >>> step(x, y); step.loss_sum, step.correct  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, bf16: bool):
        self.model, self.optimizer, self.device, self.bf16 = model, optimizer, device, bf16
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def reset(self) -> None:
        """Zero the sums in place (a captured graph keeps adding into the same tensors)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.bf16):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * y.shape[0]
        self.correct += (logits.detach().argmax(1) == y).sum()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._run(x, y)


class GraphedTrainStep(TrainStep):
    """The step captured once as a CUDA graph and replayed for every later batch of the same shape.

    Args:
        capture: record a CUDA graph (CUDA only); False runs the same static-buffer logic
            eagerly (the CPU, tests).

    Raises:
        ValueError: a batch whose shape differs from the captured one (drop the last partial batch).
    """

    WARMUP = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, bf16: bool,
                 capture: bool = True):
        super().__init__(model, optimizer, device, bf16)
        self.capture = capture and device.type == "cuda"
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.calls += 1
        if self.calls <= self.WARMUP:
            self._warmup(x, y)
            return
        if self.x is None:
            # the static buffers: same shape, dtype and memory format as the batches
            self.x, self.y = x.clone(), y.clone()
            if self.capture:
                self._capture()
        elif x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"batch of shape {tuple(x.shape)} after capturing {tuple(self.x.shape)}")
        else:
            self.x.copy_(x)
            self.y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run(self.x, self.y)

    def _warmup(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.capture:
            self._run(x, y)
            return
        # the stream the capture will use: per-stream library state (cuBLAS workspaces) is made here,
        # not during the capture
        self.stream = self.stream or torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._run(x, y)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _capture(self) -> None:
        # recording runs nothing: the captured batch is trained on by the replay that follows
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self._run(self.x, self.y)
