"""One epoch of the reference recipe in plain PyTorch + timm, for the side-by-side figure.

The reference study's recipe as its users run it, written the ordinary way and deliberately
using none of crystalscope's fast paths (no uint8 cache, no feature caching, no ONNX
Runtime): ResNet-101 at 224 px, the last 10 % of its layers trainable, the dropout head
(Linear 512, ReLU, BatchNorm, Dropout 0.4, Linear 256, ReLU, Dropout 0.3, Linear 2), SGD lr
0.1 momentum 0.9, batch 64, images decoded and augmented from the PNG files every epoch by a
torchvision ``ImageFolder`` + ``DataLoader``, then validation over the val split. Random
initial weights (they do not change the speed).

The epoch is bounded: ``--train-images`` training images and ``--val-images`` validation
images (drawn evenly from the class folders), then each part's time is scaled to the full
split (``--full-train`` / ``--full-val``, default 9,565 / 3,417): the scaled epoch is
``train_s * full_train / n_train + val_s * full_val / n_val``; both measured parts and the
scaling are in the JSON.

Example:
    python benchmarks/reference_epoch.py /tmp/speed/split --train-images 256 --val-images 512 \\
        --out benchmarks/results/reference-epoch.json
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import timm  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402


def reference_model() -> nn.Module:
    """timm ResNet-101 (random weights), last 10 % of its parameter layers trainable, dropout head."""
    backbone = timm.create_model("resnet101", pretrained=False, num_classes=0)
    layers = [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]
    first_trainable = len(layers) - round(0.1 * len(layers))
    for i, layer in enumerate(layers):
        for p in layer.parameters(recurse=False):
            p.requires_grad = i >= first_trainable
    head = nn.Sequential(nn.Linear(backbone.num_features, 512), nn.ReLU(), nn.BatchNorm1d(512), nn.Dropout(0.4),
                         nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 2))
    return nn.Sequential(backbone, head)


def _even_subset(folder: datasets.ImageFolder, n: int) -> Subset:
    """``n`` images, every k-th one, so both classes are in it."""
    step = max(1, len(folder) // n)
    return Subset(folder, list(range(0, len(folder), step))[:n])


def loaders(split: Path, n_train: int, n_val: int, batch: int, workers: int) -> tuple[DataLoader, DataLoader]:
    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.Resize((224, 224)), transforms.RandomAffine(20, (0.1, 0.1), (0.9, 1.1)),
                                   transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
                                   transforms.ToTensor(), normalise])
    val_tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(), normalise])
    train = _even_subset(datasets.ImageFolder(split / "train", train_tf), n_train)
    val = _even_subset(datasets.ImageFolder(split / "val", val_tf), n_val)
    return (DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers),
            DataLoader(val, batch_size=batch, shuffle=False, num_workers=workers))


def one_epoch(model: nn.Module, train: DataLoader, val: DataLoader) -> dict:
    """Train over ``train`` then evaluate ``val``; seconds of each part."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    model.train()
    for x, y in train:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((model(x).argmax(1) == y).sum())
    return {"train_s": train_s, "val_s": time.perf_counter() - t1, "val_correct": correct}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("split", type=Path, help="split folder with train/ and val/ class folders")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--val-images", type=int, default=512)
    parser.add_argument("--full-train", type=int, default=9565, help="training images the epoch is scaled to")
    parser.add_argument("--full-val", type=int, default=3417, help="validation images the epoch is scaled to")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = reference_model()
    train, val = loaders(args.split, args.train_images, args.val_images, 64, args.workers)
    n_train, n_val = len(train.dataset), len(val.dataset)
    times = one_epoch(model, train, val)
    scaled = times["train_s"] * args.full_train / n_train + times["val_s"] * args.full_val / n_val
    record = {"kind": "reference-epoch", "n_train": n_train, "n_val": n_val, **times,
              "train_img_s": n_train / times["train_s"], "val_img_s": n_val / times["val_s"],
              "full_train": args.full_train, "full_val": args.full_val, "scaled_epoch_s": scaled,
              "process_s": time.perf_counter() - PROCESS_START, "threads": torch.get_num_threads(),
              "load": os.getloadavg()[0], "command": " ".join(["python", "benchmarks/reference_epoch.py", *sys.argv[1:]])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"reference epoch: train {n_train} images in {times['train_s']:.1f} s ({record['train_img_s']:.1f} img/s), "
          f"val {n_val} in {times['val_s']:.1f} s ({record['val_img_s']:.1f} img/s); scaled to "
          f"{args.full_train:,} + {args.full_val:,}: {scaled:.0f} s per epoch (load {record['load']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
