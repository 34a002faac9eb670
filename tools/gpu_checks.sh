#!/usr/bin/env bash
# The GPU measurements the CPU test suite cannot make, in one command for a lent GPU machine
# (the `device` tool runs it in the repository root; $OUT comes back):
#   1. tests/gpu (flash / varlen packed attention in bf16 vs masked SDPA),
#   2. dpo-bench --preset gpu-1b (ours vs TRL)              -> $OUT/h100-1b.json,
#   3. tools/plan_check.py (planner vs measured peak memory) -> $OUT/planner_check.json.
# Prepare on the CPU machine first: ../shared/device/wheels.sh trl==1.16.0 flash-attn-4 (into .whl/),
# then call the device with carry: [".whl"] and command: bash tools/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.:${PYTHONPATH:-}
else
    export PYTHONPATH=.:${PYTHONPATH:-}
fi
export DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"
python3 tools/bench.py --preset gpu-1b --out "$OUT/h100-1b.json" 2>&1 | tail -20 | tee "$OUT/bench.txt"
python3 tools/plan_check.py --out "$OUT/planner_check.json" 2>&1 | tail -20 | tee "$OUT/plan_check.txt"
