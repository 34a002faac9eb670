"""Measure peak GPU memory of real dpo_dist training steps and compare it with the planner.

    python tools/plan_check.py [--cases 1b_ckpt,1b_no_ckpt,8b_lora] [--steps 3] \
                               [--out benchmarks/planner_check.json] [--workdir /tmp/plan_check]

Needs one CUDA GPU (one rank: ZeRO-3 on a single GPU partitions nothing, which is the planner's
N = 1 case). For each case it saves a random-init bf16 model of a preset shape
(``dpo_dist/assets/model_shapes``) to ``--workdir``, builds the real training engine
(``dpo_dist.model.build_engine``: DeepSpeed ZeRO-3, packed attention, chunked logits, LoRA when
asked), resets the peak counters, runs ``--steps`` optimizer steps on synthetic pairs that fill
``train.micro_batch_tokens`` exactly, and records

- ``torch.cuda.max_memory_allocated`` (live tensors) against the planner's peak without the
  fragmentation margin and the non-PyTorch allowance, and
- ``torch.cuda.max_memory_reserved`` (what the caching allocator took) against the planner's peak
  with the fragmentation margin,

per case, with ratios measured / planned, into ``--out`` (JSON). Nothing is written without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dpo_dist.memory import GIB, ModelShape, PlanAssumptions, PlanSettings, plan_memory, preset_shape_path  # noqa: E402

CASES = {
    # name: (preset shape, overrides of the run config); every case fits one 80 GB GPU.
    "1b_ckpt": ("llama3_1b", {"model": {"activation_checkpointing": True}, "train": {"micro_batch_tokens": 8192}}),
    "1b_no_ckpt": ("llama3_1b", {"model": {"activation_checkpointing": False}, "train": {"micro_batch_tokens": 8192}}),
    "8b_lora": (
        "llama3_8b",
        {"model": {"activation_checkpointing": True, "lora": {"r": 16}}, "train": {"micro_batch_tokens": 4096}},
    ),
}
PAIR_TOKENS = 2048  # prompt 512 + response 512, twice (chosen, rejected)


def save_random_model(preset: str, directory: Path) -> Path:
    """A random-init bf16 model of ``preset``'s shape, initialised on the GPU and saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return directory
    values = json.loads(preset_shape_path(preset).read_text())
    values.pop("_comment", None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**values)).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return directory


def run_config(model_dir: Path, overrides: dict):
    from dpo_dist.config import config_from_dict

    values = {
        "model": {"path": str(model_dir), "dtype": "bf16", "logits_chunk_tokens": 2048},
        "data": {"max_length": 1024},
        "train": {"pairs_per_step": 1},
        "cluster": {"gpus_per_node": 1},
    }
    for group, changes in overrides.items():
        values[group] = {**values.get(group, {}), **changes}
    values["train"]["pairs_per_step"] = values["train"]["micro_batch_tokens"] // PAIR_TOKENS
    return config_from_dict(values)


def synthetic_pairs(count: int, vocab: int):
    from dpo_dist.data.tokenize import TokenizedPair

    rng = np.random.default_rng(0)
    return [
        TokenizedPair(i, rng.integers(0, vocab, 512), rng.integers(0, vocab, 512), rng.integers(0, vocab, 512))
        for i in range(count)
    ]


def measure(cfg, steps: int, backend: str, device: torch.device | None = None) -> dict:
    """Peak allocated/reserved GiB over ``steps`` optimizer steps of one micro-batch each (on CUDA;
    elsewhere, as in the CPU test that keeps this script working, only the step time)."""
    from dpo_dist.engine import MicroBatchPlan, StepContext, train_step
    from dpo_dist.model import build_engine, free_memory, release_engine

    device = device or torch.device("cuda", 0)
    cuda = device.type == "cuda"
    engine = build_engine(cfg, device, backend)
    pairs = synthetic_pairs(cfg.train.pairs_per_step, ModelShape.from_path(cfg.model.path).vocab)
    ctx = StepContext(engine, None, cfg, device, 1)  # reference log-probs as if precomputed (zeros)
    plans = [MicroBatchPlan(list(range(len(pairs))))]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(ctx, pairs, plans)
    if cuda:
        torch.cuda.synchronize()
    result = {
        "allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "step_s": (time.perf_counter() - start) / steps,
    }
    release_engine(engine)
    del engine, ctx
    free_memory()
    return result


def planned(cfg, backend: str) -> dict:
    settings = replace(PlanSettings.from_config(cfg, gpus=1), sdpa_backend=backend == "sdpa")
    shape = ModelShape.from_path(cfg.model.path)
    bare = plan_memory(shape, settings, PlanAssumptions(fragmentation=0.0, non_torch_gib=0.0))
    margin = plan_memory(shape, settings, PlanAssumptions(non_torch_gib=0.0))
    return {
        "allocated_gib": bare.peak / GIB,
        "reserved_gib": margin.peak / GIB,
        "items_gib": {item.name: round(item.bytes / GIB, 3) for item in bare.items},
    }


def write_report(args, backend: str, results: list[dict]) -> None:
    import deepspeed
    import transformers

    report = {
        "device": torch.cuda.get_device_name(0),
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB,
        "attention_backend": backend,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "steps": args.steps,
        "cases": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "planner_check.json"))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dpo_dist_plan_check"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_check: error: needs a CUDA GPU (nothing measured, nothing written)", file=sys.stderr)
        return 2
    from dpo_dist import distributed as D
    from dpo_dist.attention import resolve_attn_backend

    D.init_distributed(D.detect_env(), 30)
    backend = resolve_attn_backend("auto", torch.device("cuda", 0), torch.bfloat16)
    results = []
    for name in args.cases.split(","):
        preset, overrides = CASES[name]
        model_dir = save_random_model(preset, Path(args.workdir) / preset)
        cfg = run_config(model_dir, overrides)
        measured, plan = measure(cfg, args.steps, backend), planned(cfg, backend)
        row = {
            "case": name,
            "shape": preset,
            "micro_batch_tokens": cfg.train.micro_batch_tokens,
            "activation_checkpointing": cfg.model.activation_checkpointing,
            "lora_r": cfg.model.lora.r,
            "measured": measured,
            "planned": plan,
            "ratio_allocated": measured["allocated_gib"] / plan["allocated_gib"],
            "ratio_reserved": measured["reserved_gib"] / plan["reserved_gib"],
        }
        results.append(row)
        print(f"{name}: allocated {measured['allocated_gib']:.2f} GiB (planned {plan['allocated_gib']:.2f}), "
              f"reserved {measured['reserved_gib']:.2f} GiB (planned {plan['reserved_gib']:.2f})")
        # After every case: a time limit that stops a later (bigger) case keeps the earlier ones.
        write_report(args, backend, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
