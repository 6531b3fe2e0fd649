"""The reproducibility record of a run (``environment.json``) and the RNG states a resume restores.

``environment.json`` answers "could I get this number again?": the crystalscope version and git
commit, the versions of Python, torch, timm, numpy and onnxruntime, the device and thread
count, the seed, a content hash of each split (file names and bytes) and of the initial
weights. The split hashes also travel in the checkpoint, so ``evaluate`` can warn when it is
handed the very images the model was trained on.
"""

from __future__ import annotations

import hashlib
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes and values): the initial weights, whatever their source."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


def git_commit() -> str | None:
    """The commit of the crystalscope source checkout, when it is one (None for an installed wheel)."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment_record(*, seed: int, device: torch.device, data_hashes: dict[str, str],
                       initial_weights: str, weights_source: str) -> dict:
    """The dict written to ``environment.json``.

    Example:
        >>> environment_record(seed=0, device=torch.device("cpu"), data_hashes={},
        ...                    initial_weights="sha256:..", weights_source="none")["seed"]
        0
    """
    from crystalscope.version import __version__

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "crystalscope": __version__, "git_commit": git_commit(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "timm": _version("timm"), "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
        "device": str(device), "device_name": device_name, "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "seed": int(seed), "data_sha256": dict(data_hashes),
        "initial_weights_sha256": initial_weights, "weights_source": weights_source,
    }


# ---- random number generators (resume continues the identical computation) ---------------

def rng_states() -> dict:
    """The global generators' states (torch CPU and CUDA, numpy, Python), checkpoint-safe types.

    Dropout draws from torch's global generator, so without it a resumed epoch differs.
    """
    np_state = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]),
                        float(np_state[4])],
              "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict | None) -> None:
    """Put back what :func:`rng_states` saved (missing entries are left alone)."""
    if not states:
        return
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
