#!/usr/bin/env bash
# One short GPU run: the GPU-only tests and the GPU figures, written to benchmarks/gpu-results/gpu.{json,md}.
#   bash benchmarks/gpu.sh            # on a GPU machine (planned for under 8 minutes on one H100)
#   bash benchmarks/gpu.sh --dry-run  # every step on CPU at a tiny size (the suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu.py "$@"
