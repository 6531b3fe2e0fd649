"""Multi-process training on PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc-per-node N -m crystalscope train SPLIT ...`` (or ``crystalscope train
--nproc N``, which launches the same through :func:`launch`) starts N ranks. Each rank:

* decodes and caches only its **shard** of every split (:func:`shard_indices`: rank r takes
  rows r, r+N, r+2N, ...; the training shard is padded by wrapping around so every rank runs
  the same number of steps, as ``DistributedSampler`` does);
* shuffles its training shard with a generator seeded from (seed, epoch, rank)
  (:func:`reseed_epoch`): the order differs per epoch and a resumed run repeats it;
* trains one DDP replica (gradients averaged over ranks; ``--sync-bn`` for synchronised
  BatchNorm statistics, CUDA only);
* evaluates its shard of val/test with rank 0's BatchNorm buffers (:func:`sync_buffers`), and
  :func:`gather_logits` puts every row back in split order: each image is evaluated exactly
  once and the metrics are those of a single-process evaluation of the same weights.

Only rank 0 writes (run folder, metrics.csv, checkpoints, report, ONNX). The batch size is per
rank, so the effective batch is ``batch_size x N``; ``lr_scaling: linear`` multiplies the
learning rate by N (Goyal et al. 2017), ``none`` keeps it. A dead rank or a stop signal ends
every rank with one line (:func:`running`). docs/scaling.md has the multi-node command.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from crystalscope.data.dataset import ImageFolder
from crystalscope.errors import CrystalscopeError
from crystalscope.runtime import first_line

logger = logging.getLogger(__name__)

#: How long a rank waits in a collective before giving up (a hung peer, not a dead one:
#: a dead peer's closed socket fails the collective at once).
COLLECTIVE_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one rank, rank 0, when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and prints."""
        return self.rank == 0


class RankStopped(CrystalscopeError):
    """The run stopped because a rank failed or was stopped."""

    exit_code = 1


class StoppedByPeer(RankStopped):
    """This rank stopped because another one did (SIGTERM from the launcher, or a peer's socket
    closed). Its own exit code lets the launcher name the rank that failed first, not this one:
    both can end within the same second, the resolution of torch's failure timestamps."""

    exit_code = 3


def world_from_env() -> World:
    """The :class:`World` torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Example:
        >>> world_from_env().size  # doctest: +SKIP
        1
    """
    return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not world.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    logger.info("rank %d of %d joined (%s, %s)", world.rank, world.size, backend, device)
    return device


@contextlib.contextmanager
def running(world: World) -> Iterator[None]:
    """Run the ranks' work; a stop signal or a lost peer becomes one :class:`RankStopped` line.

    torchrun sends SIGTERM to the other ranks when one dies; a rank blocked in a collective
    sees the dead peer's socket close instead. Both end here, with the process group torn down.
    """
    if not world.enabled:
        yield
        return
    import torch.distributed as dist

    def stop(signum, frame):
        raise StoppedByPeer(f"rank {world.rank}: stopped by {signal.Signals(signum).name} (another rank failed or "
                          "the run was stopped); the run folder keeps its last completed epoch (--resume)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if not isinstance(exc, dist.DistError) and not _is_peer_failure(exc):
            raise
        # gloo's "[.../pair.cc:545] Read error ...": the location prefix and the detail after it go
        first = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc, None)).split(". ")[0]
        raise StoppedByPeer(f"rank {world.rank}: lost contact with another rank, which died or was stopped "
                          f"({first[:120]}); the run folder keeps its last completed epoch (--resume)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _is_peer_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "peer", "socket", "timed out"))


# ---- sharding and gathering ----------------------------------------------------------------

def shard_indices(n: int, world: World, pad: bool = False) -> np.ndarray:
    """Rows of a split that this rank owns: ``rank, rank + size, ...``.

    ``pad=True`` (training) wraps around so every rank gets ``ceil(n / size)`` rows and runs
    the same number of steps (DDP needs it: a rank with one step fewer would wait forever).

    Example:
        >>> shard_indices(5, World(rank=1, size=2)).tolist(), shard_indices(5, World(1, 2), pad=True).tolist()
        ([1, 3], [1, 3, 0])
    """
    if not world.enabled:
        return np.arange(n)
    if not pad:
        return np.arange(world.rank, n, world.size)
    per_rank = -(-n // world.size)
    return (world.rank + world.size * np.arange(per_rank)) % max(n, 1)


def shard_folder(folder: ImageFolder, indices: np.ndarray) -> ImageFolder:
    """The rows ``indices`` of ``folder`` (same root and classes): what this rank decodes."""
    return ImageFolder(root=folder.root, paths=[folder.paths[i] for i in indices],
                       labels=np.asarray(folder.labels)[indices], class_names=list(folder.class_names))


def gather_logits(local: np.ndarray, indices: np.ndarray, n: int, world: World) -> np.ndarray:
    """Every rank's logits for its shard, put back in split order ``(n, C)`` on every rank."""
    if not world.enabled:
        return local
    import torch.distributed as dist

    parts: list = [None] * world.size
    dist.all_gather_object(parts, (np.asarray(indices), np.asarray(local, dtype=np.float32)))
    classes = max(p[1].shape[1] for p in parts if p[1].size) if any(p[1].size for p in parts) else 0
    full = np.full((n, classes), np.nan, dtype=np.float32)
    for rows, logits in parts:
        if len(rows):
            full[rows] = logits
    if np.isnan(full).any():
        raise CrystalscopeError("distributed evaluation: some images got no logits; this is a bug, please report it")
    return full


def reduce_train_stats(stats: dict, world: World) -> dict:
    """Loss and accuracy over all ranks' training steps (each rank's are over its shard only)."""
    if not world.enabled:
        return stats
    import torch.distributed as dist

    totals = torch.tensor([stats["loss"] * stats["samples"], stats["accuracy"] * stats["samples"], stats["samples"]],
                          dtype=torch.float64)
    dist.all_reduce(totals)
    seen = float(totals[2])
    return {"loss": float(totals[0]) / seen, "accuracy": float(totals[1]) / seen, "samples": int(seen)}


def from_main(make: Callable[[], object], world: World):
    """``make()`` run on rank 0 only, its result sent to every rank (e.g. a checkpoint only
    rank 0's disk holds)."""
    if not world.enabled:
        return make()
    import torch.distributed as dist

    box = [make() if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.enabled:
        import torch.distributed as dist

        dist.barrier()


# ---- the model -----------------------------------------------------------------------------

def wrap_model(module: torch.nn.Module, world: World, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """``module`` as a DistributedDataParallel replica (itself with one rank).

    Raises:
        CrystalscopeError: ``--sync-bn`` on the CPU (PyTorch's SyncBatchNorm is GPU-only).
    """
    if sync_bn and device.type != "cuda":
        raise CrystalscopeError("--sync-bn: PyTorch synchronises BatchNorm only on GPUs; leave it out on the CPU")
    if not world.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        # replaces the BatchNorm layers in place: the same parameters and buffers, now synchronised
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def sync_buffers(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Each rank updates its running statistics from its own batches; evaluating every shard with
    rank 0's (the ones its checkpoint holds) makes the gathered metrics those of that checkpoint.
    """
    if not world.enabled:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def reseed_epoch(generators: list[torch.Generator], seed: int, epoch: int, world: World) -> None:
    """Seed each generator, and the global RNG, from (seed, epoch, rank): a new order every
    epoch, per rank, that a resumed run reproduces without the other ranks' saved RNG states."""
    if not world.enabled:
        return
    base = int(seed) * 1_000_003 + epoch * 10_007 + world.rank * 101
    for which, generator in enumerate(generators):
        generator.manual_seed(base + which)
    # the global stream (dropout): its own per rank, so ranks do not drop the same units
    torch.manual_seed(base + len(generators))


def scaled_lr(lr: float, rule: str, world: World) -> float:
    """The learning rate each rank's optimizer uses: ``linear`` x ranks, ``none`` unchanged.

    Example:
        >>> scaled_lr(0.1, "linear", World(0, 4))
        0.4
    """
    return lr * world.size if rule == "linear" else lr


# ---- the launcher (``crystalscope train --nproc N``) ----------------------------------------

def launch(config_yaml: str, nproc: int, run_dir: str = "RUN_FOLDER") -> None:
    """Start ``nproc`` ranks of ``python -m crystalscope train --config CONFIG_YAML`` on this
    machine through torch's elastic launcher (what torchrun runs), and wait for them.

    Raises:
        CrystalscopeError: a rank failed (its own message is printed above by that rank).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # one machine: every rank talks over loopback, and shares the cores instead of oversubscribing
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"crystalscope-{os.getpid()}",
                                 rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                                 monitor_interval=0.2)
    try:
        elastic_launch(launch_config, sys.executable)("-m", "crystalscope", "train", "--config", config_yaml)
    except ChildFailedError as exc:
        raise RankStopped(_failure_line(exc, nproc, run_dir)) from None
    except SignalException as exc:  # Ctrl-C or a kill of the launcher: it has stopped every rank
        stopped = RankStopped(f"train --nproc {nproc}: stopped by {signal.Signals(exc.sigval).name}; every rank was "
                              f"stopped; continue with --resume {run_dir}")
        stopped.exit_code = 130 if exc.sigval == signal.SIGINT else 1
        raise stopped from None


def first_failure(failures: dict) -> tuple[int, object]:
    """The rank (and its ``ProcessFailure``) that caused the others to stop: the earliest failure
    that is not a consequence (a rank that exited with :class:`StoppedByPeer`'s code, or died of
    SIGTERM); ties in torch's one-second timestamps go to the lower rank."""
    def key(item):
        rank, failure = item
        consequence = failure.exitcode in (StoppedByPeer.exit_code, -signal.SIGTERM)
        return consequence, failure.timestamp, rank

    return min(failures.items(), key=key)


def _failure_line(exc, nproc: int, run_dir: str) -> str:
    rank, failure = first_failure(exc.failures)
    code = failure.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
        else f"exited with code {code}"
    return (f"train --nproc {nproc}: rank {rank} {how}; every rank was stopped (messages above); "
            f"continue with --resume {run_dir}")
