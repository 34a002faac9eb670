#!/usr/bin/env bash
# The GPU measurements the CPU test suite cannot make, for a lent GPU machine (the `device` tool
# runs this in the repository root; what is written under $OUT comes back). Two calls, back to
# back (a machine stays warm ~30 s between calls; what the first installs, the second reuses):
#
#   bash tools/gpu_wheels.sh                     # on the CPU machine, once: .whl/ and .whl_fa4/
#   call A, carry [".whl"]:      bash tools/gpu_checks.sh core
#       CUDA tests (packed attention in bf16 vs masked SDPA, engine smoke)  -> $OUT/gpu_tests.txt
#       dpo-bench --preset gpu-1b (auto attention: torch varlen)           -> $OUT/h100-1b.json
#   call B, carry [".whl_fa4"]:  bash tools/gpu_checks.sh fa4
#       FA4 installed: CUDA tests again, our systems with attn_backend=flash -> $OUT/h100-1b-fa4.json
#       tools/plan_check.py (planner vs measured peak memory, last: it
#       writes its JSON after every case, so a time limit keeps the earlier) -> $OUT/planner_check.json
#   call C (optional):           bash tools/gpu_checks.sh equal
#       stage 0 at world size 1 vs TRL without activation checkpointing  -> $OUT/h100-1b-equal.json
#       and stage 1 (ours only)                                          -> $OUT/h100-1b-zero1.json
#   call D (optional):           bash tools/gpu_checks.sh precision
#       TRL with fp32 master weights (our engine's precision)            -> $OUT/h100-1b-trl-fp32.json
#   call E (optional):           bash tools/gpu_checks.sh head
#       LM head at scored positions vs every position, bf16              -> $OUT/lm-head-h100.json
#
# Every step has its own time limit and writes its whole log under $OUT, so one that fails or
# runs long leaves the others' results; the bench rewrites its JSON after every system.
set -uo pipefail
stage=${1:?usage: gpu_checks.sh core|fa4|equal|precision|head}
OUT=${OUT:-/tmp/gpu_checks_out}
SITE=/tmp/site
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:.:${PYTHONPATH:-}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }
step() {  # step SECONDS NAME COMMAND...: run with a limit, whole output to $OUT/NAME.txt
    local limit=$1 name=$2
    shift 2
    log "$name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    log "$name exit $?"
    tail -5 "$OUT/$name.txt"
}
cuda_tests=(tests/gpu tests/unit/test_attention.py tests/unit/test_logprobs.py)

case $stage in
core)
    # One pip call for everything (pip --target replaces shared top-level folders between calls).
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
    mkdir -p /tmp/fa4_parts && cp .whl/cutlass-cu13.part-* /tmp/fa4_parts/ 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, transformers, deepspeed, trl; print(torch.__version__, transformers.__version__, deepspeed.__version__, trl.__version__)" | tee -a "$OUT/gpu.txt"
    step 150 gpu_tests python3 -m pytest -q -p no:cacheprovider -rs "${cuda_tests[@]}"
    # 370 s keeps the call (install + tests + bench) under the device's 600 s; the scaling points
    # run last, so a time limit costs only those (the JSON is rewritten after every system).
    step 370 bench python3 tools/bench.py --preset gpu-1b --out "$OUT/h100-1b.json"  # auto: varlen (no FA yet)
    ;;
fa4)
    [ -d "$SITE/deepspeed" ] || { echo "no $SITE/deepspeed: the machine was not warm from stage core; run core first"; exit 1; }
    # FA4 compiles its kernels at first use; keep them on disk so the bench reuses the tests' build.
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
    if [ -f /tmp/fa4_parts/cutlass-cu13.part-aa ]; then
        wheel=/tmp/fa4_parts/$(cat .whl_fa4/cutlass-cu13.name)
        cat /tmp/fa4_parts/cutlass-cu13.part-aa .whl_fa4/cutlass-cu13.part-a[b-z] > "$wheel"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_fa4 .whl_fa4/*.whl "$wheel" \
            && cp -r /tmp/site_fa4/* "$SITE"/
        python3 -c "from dpo_dist.attention import _flash_kernel; print(_flash_kernel())" 2>&1 | tee "$OUT/fa4_import.txt"
        step 120 gpu_tests_fa4 python3 -m pytest -q -p no:cacheprovider -rs "${cuda_tests[@]}"
        step 180 bench_fa4 python3 tools/bench.py --preset gpu-1b --attn-backend flash \
            --systems ours_precomputed,ours_online --scaling "" --out "$OUT/h100-1b-fa4.json"
    else
        log "no /tmp/fa4_parts (stage core did not run on this machine): FA4 skipped"
    fi
    step 220 plan_check python3 tools/plan_check.py --out "$OUT/planner_check.json"
    ;;
equal)
    # Optional call C (no carry needed on a warm machine): the equal-footing comparison of
    # benchmarks/README.md, ZeRO stage 0 at world size 1 against TRL without activation checkpointing.
    # DeepSpeed's stage 0 sums bf16 gradients only in bf16; gpu-1b has one micro-batch per step, so
    # nothing is summed and the updates are those of fp32 sums.
    [ -d "$SITE/deepspeed" ] || { echo "no $SITE/deepspeed: run stage core first on this machine"; exit 1; }
    step 400 bench_equal python3 tools/bench.py --preset gpu-1b --scaling "" --zero-stage 0 \
        --set deepspeed.grad_accum_dtype=bf16 \
        --trl-set gradient_checkpointing=false --out "$OUT/h100-1b-equal.json"
    # Stage 1 keeps fp32 gradient sums (BF16_Optimizer) and partitions nothing else: the other
    # single-device candidate (benchmarks/README.md, "Equal footing"). TRL's numbers are above.
    step 170 bench_zero1 python3 tools/bench.py --preset gpu-1b --scaling "" --zero-stage 1 --skip-trl \
        --systems ours_precomputed,ours_online --out "$OUT/h100-1b-zero1.json"
    ;;
precision)
    # Optional call D: TRL given a bf16 checkpoint trains in pure bf16 (AdamW states in bf16, no fp32
    # master weights: at DPO learning rates most updates round away); this runs TRL at our precision
    # (fp32 weights, bf16 autocast), so speed and memory compare like with like.
    [ -d "$SITE/deepspeed" ] || { echo "no $SITE/deepspeed: run stage core first on this machine"; exit 1; }
    step 500 bench_trl_fp32 python3 tools/bench.py --preset gpu-1b --scaling "" --trl-fp32-weights \
        --systems trl_online,trl_precomputed --out "$OUT/h100-1b-trl-fp32.json"
    ;;
head)
    # Optional call E: what running the LM head only at scored positions saves on a GPU (bf16,
    # 8k-token rows of cpu-small's length spread, 32k and 128k vocabularies).
    [ -d "$SITE/deepspeed" ] || { echo "no $SITE/deepspeed: run stage core first on this machine"; exit 1; }
    step 240 lm_head python3 tools/bench_lm_head.py --device cuda --tokens 8192 --steps 8 --out "$OUT/lm-head-h100.json"
    ;;
*)
    echo "unknown stage $stage (core|fa4|equal|precision|head)"
    exit 2
    ;;
esac
log done
