"""Small builders shared by tests: a tiny random Llama saved as a HF directory, pair files, CLI runs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "dpo_dist" / "assets" / "tokenizer"


def bundled_llama_config(**shape):
    """``(tokenizer, LlamaConfig)``: the bundled tokenizer and a Llama config of ``shape`` whose
    vocabulary and special token ids are that tokenizer's."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return tok, LlamaConfig(vocab_size=len(tok), **ids, **shape)


def make_tiny_model_dir(path: Path, *, seed: int = 0, layers: int = 2, shards: str | None = None) -> Path:
    """A random-init tiny Llama (GQA) + the bundled tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    tok, cfg = bundled_llama_config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    kwargs = {"max_shard_size": shards} if shards else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tok.save_pretrained(path)
    return path


def make_pairs_jsonl(path: Path, n: int, *, seed: int = 0) -> Path:
    """``n`` arithmetic pairs (chosen correct, rejected off by one) of varied lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 10 ** rng.randint(1, 4)), rng.randint(0, 999)
            pad = " " * rng.randint(0, 12)
            f.write(json.dumps({"prompt": f"{pad}{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return path


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repo root and capture its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_tiny_assets(root: Path, *, eval_pairs: int = 16) -> dict[str, Path]:
    """A tiny random model plus train (64) and eval pairs under ``root``."""
    return {
        "model": make_tiny_model_dir(root / "model"),
        "train": make_pairs_jsonl(root / "train.jsonl", 64, seed=1),
        "eval": make_pairs_jsonl(root / "eval.jsonl", eval_pairs, seed=2),
    }


# A training run that takes seconds on CPU: a pair fits one 128-token micro-batch, 8 pairs a step.
TINY_RUN = {
    "data.max_length": 64,
    "train.micro_batch_tokens": 128,
    "train.pairs_per_step": 8,
    "train.max_steps": 3,
    "train.checkpoint_every": 0,
    "train.eval_every": 0,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 0,
    "wandb.mode": "disabled",
}


def tiny_run_overrides(assets: dict, settings: dict) -> list[str]:
    """``key=value`` overrides for ``assets`` with ``TINY_RUN`` defaults, ``settings`` winning."""
    values = {
        "model.path": assets["model"],
        "data.train_path": assets["train"],
        "data.eval_path": assets["eval"],
        **TINY_RUN,
        **settings,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_ranks(argv: list[str], world: int, *, env: dict | None = None, timeout: float = 240, label: str = "") -> None:
    """Run ``python argv...`` as ``world`` gloo ranks on 127.0.0.1 and assert every rank exits 0.

    A rank that fails leaves the others waiting in a collective, so the first failure (or the
    timeout) stops them all; the failing rank's output is in the assertion message.
    """
    import time

    from dpo_dist.distributed import free_port

    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        # The ranks that were still running are the ones killed here: the culprit is another one.
        killed = [p.poll() is None for p in procs]
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate()[0] for p in procs]
    failed = [r for r, p in enumerate(procs) if p.returncode != 0 and not killed[r]]
    why = f"timed out after {timeout:g} s" if timed_out else f"rank {failed[0]} failed first" if failed else ""
    for rank in failed + [r for r in range(world) if r not in failed]:
        p, output = procs[rank], outputs[rank]
        assert p.returncode == 0, f"{label}rank {rank} exited with {p.returncode} ({why}):\n{output[-4000:]}"


def live_tensor_bytes() -> int:
    """Bytes held by every live (non-meta) torch tensor of this process, after a full collection;
    the CPU stand-in for ``torch.cuda.memory_allocated`` in the engine-release checks."""
    import gc
    import warnings

    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
    return sum(t.untyped_storage().nbytes() for t in tensors)
