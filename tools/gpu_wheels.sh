#!/usr/bin/env bash
# Downloads, on the CPU machine, the wheels that the lent GPU machine lacks (its image has Python
# 3.12, torch 2.11+cu130, transformers 5.17, peft, pyarrow, triton, cuda-bindings, but no deepspeed,
# hydra, datasets, submitit, trl or flash-attn), into two folders that each fit one device call
# (a call carries at most 64 MiB, the repository included):
#
#   .whl/      deepspeed, hydra, datasets, submitit, trl, ... (~7 MB)
#              + cutlass-cu13.part-aa, the first 44 MiB of nvidia-cutlass-dsl-libs-cu13 (92 MB)
#   .whl_fa4/  flash-attn-4 (FA4, CuTe DSL) and its small dependencies
#              + cutlass-cu13.part-ab, the rest of that wheel
#
# flash-attn-4 is published only as pre-releases (a bare `flash-attn-4` finds nothing), and its
# CUDA 13 library wheel is too big for one call: tools/gpu_checks.sh stashes the first part on the
# machine in the first call (stage `core`) and joins it with the second in the next (stage `fa4`).
# Both folders are git-ignored. Usage: bash tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .whl_fa4
mkdir -p .whl .whl_fa4
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() {
    local dir=$1
    shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$dir" "$@"
}

# deepspeed and antlr4 ship only source archives; their wheels are pure Python (ops JIT-build there).
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
get .whl hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 \
    hydra-core==1.3.2 omegaconf==2.3.0 submitit==1.5.4 hydra-submitit-launcher==1.2.0 \
    datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 fsspec==2026.9.0 trl==1.16.0

# FA4: every piece but the big library wheel. libs-core holds the `cutlass` Python package; all of
# them must be installed by one pip call (they share the nvidia_cutlass_dsl/ folder).
get .whl_fa4 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
tmp=$(mktemp -d)
get "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
big=$(ls "$tmp"/*.whl)
basename "$big" > .whl_fa4/cutlass-cu13.name
split -b 44m "$big" "$tmp/cutlass-cu13.part-"
mv "$tmp/cutlass-cu13.part-aa" .whl/
mv "$tmp"/cutlass-cu13.part-a[b-z] .whl_fa4/
rm -rf "$tmp"
du -sh .whl .whl_fa4
