"""The training engine on one device, in one process: what ``tools/bench.py`` does per system.

    python tests/gpu/engine_smoke.py cuda|cpu OUT.json [auto|bf16|fp32]

Builds the policy engine and an online reference (DeepSpeed ZeRO-3, packed attention picked by
``auto``, bf16 on CUDA), runs two optimizer steps on a tiny random Llama, releases both engines
and writes: the attention backend, the dtype DeepSpeed sums gradients in over the micro-batches,
the step losses, and the device memory in use before, while and after (CUDA:
``torch.cuda.memory_allocated``; CPU: bytes of live tensors). Run in its own process by ``test_cuda_engine.py`` (GPU machines) and by a CPU twin in
``tests/integration/test_engine.py``, so DeepSpeed's state never enters the test process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout


def allocated(device) -> int:
    import torch

    from tests.helpers import live_tensor_bytes

    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        # cuBLAS(Lt) takes its workspaces from the caching allocator at the first matmul and keeps
        # them for the process: not the engines' memory, so they are left out of every reading.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        return torch.cuda.memory_allocated()
    return live_tensor_bytes()


def main(device_name: str, out: str, dtype_name: str = "auto") -> None:
    os.environ.setdefault("DS_ACCELERATOR", device_name)
    from transformers import AutoTokenizer

    from dpo_dist import distributed as D
    from dpo_dist import engine as E
    from dpo_dist import model as M
    from dpo_dist.attention import resolve_attn_backend
    from dpo_dist.config import config_from_dict
    from dpo_dist.data import load_tokenized
    from tests.helpers import make_pairs_jsonl, make_tiny_model_dir

    work = Path(tempfile.mkdtemp(prefix="engine_smoke_"))
    model_dir = make_tiny_model_dir(work / "model")
    data = make_pairs_jsonl(work / "pairs.jsonl", 16)
    cfg = config_from_dict({
        "output_dir": str(work / "run"),
        "model": {"path": str(model_dir), "dtype": dtype_name},
        "data": {"train_path": str(data), "eval_path": None, "max_length": 64, "cache_dir": str(work / "tok")},
        "train": {"pairs_per_step": 8, "micro_batch_tokens": 256, "max_steps": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "wandb": {"mode": "disabled"},
    })
    env = D.DistEnv(0, 0, 1, "127.0.0.1", D.free_port(), None)
    D.init_distributed(env, 5)
    device = D.device_for(env)
    assert device.type == device_name, (device, device_name)
    dataset = load_tokenized(data, AutoTokenizer.from_pretrained(model_dir), 64, cfg.data.truncation, "error", None)
    dtype = M.training_dtype(cfg, device)
    backend = resolve_attn_backend("auto", device, dtype)
    before = allocated(device)
    policy = M.build_engine(cfg, device, backend)
    reference = E.OnlineReference(cfg, device, backend)
    ctx = E.StepContext(policy, reference, cfg, device, 1)
    sampler = E.PairSampler(len(dataset), cfg.train.pairs_per_step, cfg.train.seed)
    losses = []
    for step in range(2):
        plans = E.plan_micro_batches(sampler.pairs_for_step(step), dataset.lengths(), 0, 1, cfg.train.micro_batch_tokens)
        totals = dict(zip(E._SUMS, E.train_step(ctx, dataset, plans).tolist()))
        losses.append(totals["loss"] / totals["pairs"])
    during = allocated(device)
    grad_accum_dtype = policy.optimizer.grad_partitions_flat_buffer.dtype  # ZeRO-3's gradient sums
    M.release_engine(policy)
    M.release_engine(reference.engine)
    del policy, reference, ctx
    M.free_memory()
    after = allocated(device)
    Path(out).write_text(json.dumps({
        "backend": backend, "dtype": str(dtype), "grad_accum_dtype": str(grad_accum_dtype), "losses": losses,
        "allocated": {"before": before, "during": during, "after": after},
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
