"""Render benchmark JSON results into markdown tables (and into docs/benchmarks.md).

Every row carries the exact command that produced it. ``docs/benchmarks.md`` holds hand-written
text plus generated blocks between ``<!-- BEGIN <group> -->`` and ``<!-- END <group> -->``
markers; ``--doc`` replaces each block whose group has results and leaves the rest alone.

The ratio column (GPU rows only) is the measured training throughput (median over the epochs
after the first, data pipeline included) divided by PERF.md's pure-compute ceiling for the same
backbone, batch size and compile mode on the H200 (:data:`CEILING`).

Example:
    .venv/bin/python benchmarks/report.py benchmarks/results --doc docs/benchmarks.md
    .venv/bin/python benchmarks/report.py /tmp/gpu_bench/results --gpu-table $OUT/gpu_table.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: PERF.md, one H200, bf16 + channels_last, random tensors on the GPU, 224 px: training img/s
#: keyed by (backbone, batch size, mode: None = eager, "reduce-overhead" = CUDA graphs).
CEILING = {
    ("resnet101", 64, None): 1400, ("resnet101", 64, "default"): 1561, ("resnet101", 64, "reduce-overhead"): 3517,
    ("resnet101", 128, None): 2668, ("resnet101", 256, None): 3126, ("resnet101", 256, "default"): 4390,
    ("resnet18", 256, None): 13034, ("resnet50", 256, None): 4711, ("efficientnet_lite0", 256, None): 6688,
}


#: TrainConfig keys that ``crystalscope train`` takes only from a ``--config`` YAML file.
YAML_ONLY = {"head_hidden", "head_dropout", "momentum", "rotation", "shift", "zoom", "hflip",
             "vflip"}


def _mode(cfg: dict) -> str | None:
    if cfg.get("cuda_graphs"):
        return "reduce-overhead"  # a captured graph of the eager step: PERF.md's CUDA-graph figure
    return cfg.get("compile_mode", "default") if cfg.get("compile") else None


def ceiling_for(cfg: dict, same_mode: bool = False) -> int | None:
    """PERF.md's ceiling for a run's config, or None (CPU, other sizes, no measured ceiling).

    PERF.md: "80 % of the ceiling" means 80 % of the BEST figure for the batch size trained
    with, whatever the mode; ``same_mode=True`` gives the figure for the run's own mode instead.
    """
    if cfg.get("device") == "cpu" or int(cfg.get("image_size", 0)) != 224:
        return None
    key = (cfg.get("backbone"), int(cfg.get("batch_size", 0)))
    if same_mode:
        return CEILING.get((*key, _mode(cfg)))
    figures = [v for (backbone, batch, _), v in CEILING.items() if (backbone, batch) == key]
    return max(figures) if figures else None


def _fmt(value, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _targets(record: dict) -> dict:
    found = record.get("time_to_target_s")
    if isinstance(found, (int, float)):  # older single-target records
        return {str(record.get("f1_target", 0.99)): found}
    return found or {}


def _recipe(cfg: dict) -> str:
    if cfg.get("cache_frozen"):
        part = f"cached frozen part, last {cfg['trainable_fraction']:g} trained"
    elif cfg.get("cache_features"):
        part = "cached features, head only"
    else:
        part = f"end to end, last {cfg['trainable_fraction']:g} trained"
    if cfg.get("feature_passes", 1) > 1 and (cfg.get("cache_frozen") or cfg.get("cache_features")):
        part += f", {cfg['feature_passes']} passes"
    if cfg.get("compile"):
        part += f", compile {cfg.get('compile_mode', 'default')}"
    if cfg.get("cuda_graphs"):
        part += ", CUDA graph step"
    if cfg.get("precision", "auto") != "auto":
        part += f", {cfg['precision']}"
    return f"{cfg['backbone']} {cfg['image_size']} px {cfg.get('resize', 'stretch')}, {cfg.get('weights')}, {part}, " \
           f"lr {cfg['lr']:g}, batch {cfg['batch_size']}"


def cli_equivalent(record: dict) -> str | None:
    """The ``crystalscope train`` command a user would type for a bench_train row."""
    import shlex

    command = record.get("command")
    if not command or "bench_train.py" not in command:
        return None
    words = shlex.split(command)
    data = words[2] if len(words) > 2 else "SPLIT"
    parts, yaml_only = ["crystalscope", "train", data], []
    for i, word in enumerate(words):
        if word == "--set" and i + 1 < len(words):
            key, _, value = words[i + 1].partition("=")
            flag = "--" + key.replace("_", "-")
            if key == "out":
                continue
            if key in YAML_ONLY:  # no CLI option: it goes into a --config file
                yaml_only.append(f"{key}: {value}")
                continue
            if value.lower() in ("true", "false"):
                parts.append(flag if value.lower() == "true" else "--no-" + key.replace("_", "-"))
            else:
                parts += [flag, value]
    return shlex.join(parts) + (f" --config C.yaml  (C.yaml: {'; '.join(yaml_only)})" if yaml_only else "")


def train_table(records: list[dict]) -> str:
    """One row per training benchmark."""
    lines = ["| run | recipe | epochs | train img/s (median) | ratio to ceiling | time to val F1 0.99 | "
             "whole run | test macro F1 | peak RSS | peak CUDA | load | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cfg = r["config"]
        epochs = r.get("epochs", [])
        rate = r.get("train_img_s_after_first") or r.get("train_img_s_median")
        if r.get("partial"):  # stopped before the end: rate over the epochs it finished
            rates = sorted(e["train_img_s"] for e in epochs[1:] or epochs if "train_img_s" in e)
            rate = rates[len(rates) // 2] if rates else None
        ceiling, own = ceiling_for(cfg), ceiling_for(cfg, same_mode=True)
        ratio = f"{rate / ceiling:.0%} of {ceiling:,}" if ceiling and rate else "-"
        if own and rate and own != ceiling:
            ratio += f" ({rate / own:.0%} of this mode's {own:,})"
        to99 = _targets(r).get("0.99")
        reached = f"{to99:.0f} s (epoch {r.get('epochs_to_target', {}).get('0.99', '?')})" if to99 is not None \
            else "not reached"
        name = f"{r['name']} (stopped: partial)" if r.get("partial") else r["name"]
        whole = f"{_fmt(r.get('whole_run_s'))} s" if not r.get("partial") else f"> {_fmt(r.get('elapsed_s'))} s"
        lines.append(
            f"| {name} | {_recipe(cfg)} | {r.get('epochs_run', len(epochs))} | {_fmt(rate)} | {ratio} | {reached} | "
            f"{whole} | {_fmt(r.get('test_macro_f1'), 4)} | {_fmt(r.get('peak_rss_mib'))} MiB | "
            f"{_fmt(r.get('peak_cuda_mib'), suffix=' MiB')} | {_fmt((r.get('machine') or {}).get('load_1min'), 1)} | "
            f"`{r.get('command') or '-'}` |")
    lines.append("")
    lines.append("The same runs as `crystalscope train` commands:")
    lines.append("")
    lines += [f"- {r['name']}: `{cli_equivalent(r)}`" for r in records if cli_equivalent(r)]
    return "\n".join(lines) + "\n"


def phases_table(records: list[dict]) -> str:
    """Where the wall time of each run went (seconds)."""
    keys = ["model", "decode", "features", "epochs", "finalize"]
    lines = ["| run | import | " + " | ".join(keys) + " | feature img/s | per epoch (s) |",
             "|---" * (len(keys) + 4) + "|"]
    for r in records:
        phases = r.get("phases_s", {})
        times = [f"{e.get('epoch_s', 0):.1f}" for e in r.get("epochs", [])]
        per_epoch = ", ".join(times if len(times) <= 8 else times[:6] + ["...", times[-1]])
        lines.append(f"| {r['name']} | {_fmt(r.get('import_s'), 1)} | "
                     + " | ".join(_fmt(phases.get(k), 1) for k in keys)
                     + f" | {_fmt(r.get('feature_img_s'))} | {per_epoch} |")
    return "\n".join(lines) + "\n"


def infer_table(records: list[dict]) -> str:
    """One row per (model, back end, mode, batch size)."""
    lines = ["| model | back end | mode | batch | img/s | peak RSS | command |", "|---|---|---|---|---|---|---|"]
    for r in records:
        model = f"{r.get('backbone') or r.get('checkpoint')} {r['image_size']} px"
        for i, row in enumerate(r["rows"]):
            command = f"`{r.get('command') or '-'}`" if i == 0 else "same"
            lines.append(f"| {model} | {row['backend']} | {row['mode']} | {row['batch_size']} | "
                         f"{_fmt(row['img_s'], 1)} | {_fmt(r['peak_rss_mib'])} MiB | {command} |")
    return "\n".join(lines) + "\n"


def render(records: list[dict]) -> dict[str, str]:
    """Markdown per group: ``{group: text}``; training groups get a phases table too."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get("group", r.get("kind", "other")), []).append(r)
    blocks = {}
    for group, rows in groups.items():
        if rows[0].get("kind") == "infer":
            blocks[group] = infer_table(rows)
        else:
            blocks[group] = train_table(rows) + "\nWall time by phase (s):\n\n" + phases_table(rows)
    return blocks


def load_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        # one record per file, or gpu_bench.sh's merged gpu_results.json ({name: record})
        candidates = [data] if isinstance(data, dict) and "kind" in data else \
            (list(data.values()) if isinstance(data, dict) else [])
        records += [c for c in candidates if isinstance(c, dict) and c.get("kind") in ("train", "infer")]
    return sorted(records, key=lambda r: r.get("order", 0))


def update_doc(doc: Path, blocks: dict[str, str]) -> list[str]:
    """Replace each ``<!-- BEGIN g -->...<!-- END g -->`` block that has results; returns groups done."""
    text = doc.read_text()
    done = []
    for group, body in blocks.items():
        pattern = re.compile(rf"(<!-- BEGIN {re.escape(group)} -->\n).*?(<!-- END {re.escape(group)} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
            done.append(group)
    doc.write_text(text)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="folder(s) of <name>.json results")
    parser.add_argument("--doc", type=Path, help="markdown file with BEGIN/END group markers to update")
    parser.add_argument("--gpu-table", type=Path, help="write every group's tables into this markdown file")
    args = parser.parse_args(argv)
    records = [r for folder in args.results for r in load_records(folder)]
    if not records:
        print(f"no results in {', '.join(map(str, args.results))}", file=sys.stderr)
        return 1
    blocks = render(records)
    if args.doc:
        print(f"updated {args.doc}: {', '.join(update_doc(args.doc, blocks)) or 'no matching markers'}")
    if args.gpu_table:
        args.gpu_table.write_text("".join(f"## {g}\n\n{b}\n" for g, b in blocks.items()))
        print(f"wrote {args.gpu_table}")
    if not args.doc and not args.gpu_table:
        print("".join(f"## {g}\n\n{b}\n" for g, b in blocks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
