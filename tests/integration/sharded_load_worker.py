"""One process of the sharded-load test (``test_sharded_load.py``): load a model, measure memory.

    python sharded_load_worker.py zero3 MODEL_DIR WARMUP_DIR OUT_DIR   (with RANK/WORLD_SIZE/MASTER_*)
    python sharded_load_worker.py plain MODEL_DIR WARMUP_DIR OUT_DIR   (one process, no ZeRO)

``zero3`` loads through ``dpo_dist.model.load_causal_lm`` (transformers under ZeRO-3), ``plain``
through a plain ``from_pretrained``. Each first loads the small WARMUP_DIR model the same way, so
lazy imports and one-time allocations are not counted, then measures the load of MODEL_DIR plus
one read of every local parameter (as training does; a plain load otherwise leaves the weights
as untouched memory-mapped pages). A thread samples the process's anonymous and file-backed
resident memory (``/proc/self/status``) every millisecond. Writes ``OUT_DIR/rank<r>.json`` and,
from rank 0, the gathered weights as ``OUT_DIR/gathered.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

import torch  # noqa: E402

ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": False},
}


def resident() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) * 1024 for key in ("RssAnon", "RssFile"))


class PeakSampler:
    """Peak anonymous and total resident memory above the level at start, sampled every millisecond."""

    def __init__(self) -> None:
        self.base_anon, self.base_file = resident()
        self.anon = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        anon, file = resident()
        self.anon = max(self.anon, anon - self.base_anon)
        self.total = max(self.total, anon + file - self.base_anon - self.base_file)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def load(mode: str, path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from dpo_dist.model import load_causal_lm

    if mode == "zero3":
        return load_causal_lm(path, torch.float32, ZERO3)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def local_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What this process holds of each parameter: its ZeRO-3 partition, or the whole tensor."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in model.parameters()]


def gather_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on rank 0, one parameter gathered at a time."""
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if torch.distributed.get_rank() == 0:
                state[name] = param.detach().clone()
    return state


def main(mode: str, model_dir: str, warmup_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = 0
    if mode == "zero3":
        from dpo_dist import distributed as D

        env = D.detect_env()
        D.init_distributed(env, 5)
        rank = env.rank
    warm = load(mode, warmup_dir)
    sum(t.sum() for t in local_tensors(warm))
    del warm
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakSampler() as peaks:
        model = load(mode, model_dir)
        sum(float(t.sum()) for t in local_tensors(model))  # touch every local byte
    result = {
        "rank": rank,
        "local_bytes": sum(t.numel() * t.element_size() for t in local_tensors(model)),
        "anon_peak": peaks.anon,
        "total_peak": peaks.total,
        "ru_maxrss_before": peak_before,
        "ru_maxrss_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out = Path(out_dir)
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(result))
    if mode == "zero3":
        state = gather_state(model)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(out / "gathered.safetensors"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown with gloo threads alive (see dpo_dist.worker)
