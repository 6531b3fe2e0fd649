"""Helpers shared by the benchmark scripts: machine description, results files, options."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children, in MiB (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info() -> dict:
    """CPU count, load, Python/torch versions and the GPU (when there is one)."""
    info = {"cpus": os.cpu_count(), "load_1min": load_average(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def parse_sets(items: list[str]) -> dict:
    """``["backbone=resnet18", "epochs=3"]`` -> dict; values parsed as YAML (numbers, bools, lists)."""
    import yaml

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set backbone=resnet18")
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return values


def write_result(folder: str | os.PathLike, name: str, record: dict) -> Path:
    """Write ``<folder>/<name>.json`` atomically (a crashed benchmark leaves no half file)."""
    from crystalscope.io import write_json

    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return path
