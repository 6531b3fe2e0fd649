#!/usr/bin/env bash
# Copy the pure-Python runtime dependencies that the bare GPU machine lacks (rich, typer and theirs)
# from this checkout's .venv into build/gpu-deps (git-ignored), to be carried with the device run:
#   bash benchmarks/gpu_deps.sh   then   run(command="bash benchmarks/gpu_bench.sh", carry=["build/gpu-deps"])
set -euo pipefail
cd "$(dirname "$0")/.."
dest=build/gpu-deps
rm -rf "$dest" && mkdir -p "$dest"
site=$(.venv/bin/python -c "import rich, os; print(os.path.dirname(os.path.dirname(rich.__file__)))")
for pkg in rich typer click markdown_it mdurl pygments shellingham; do
  cp -r "$site/$pkg" "$dest/"
done
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$dest"
