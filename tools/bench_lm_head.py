"""LM head at scored positions only vs at every position: forward + backward of ``sequence_logps``.

The engine runs the LM head (vocabulary projection, fp32 log-softmax) only where a response token
is scored (``PackedBatch.scored_positions``). This measures what that saves against running it at
every position, on the same packed rows of the cpu-small length spread (prompts 16-128 tokens,
responses 8-128): "all positions" gives the same batch every position as a scored one (unscored
targets are ignored by the loss, so the work is the old path's). Real-vocabulary models only: the
bench presets' bundled tokenizer is character-level, where the head costs next to nothing.

    python tools/bench_lm_head.py --out benchmarks/lm-head-cpu.json
    python tools/bench_lm_head.py --device cuda --out benchmarks/lm-head-h100.json   # bf16 on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's dpo_dist, not another installed copy

from dpo_dist.attention import enable_packed_attention  # noqa: E402
from dpo_dist.data import TokenizedPair, collate_packed  # noqa: E402
from dpo_dist.logprobs import sequence_logps  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
"""cpu-small's model shape (tools/bench.py), with a real vocabulary instead of the bundled one."""


def packed_rows(vocab: int, tokens: int, rows: int, seed: int = 0):
    """``rows`` packed micro-batches of about ``tokens`` tokens each, cpu-small's length spread."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(rows):
        pairs, used = [], 0
        while True:
            prompt, chosen, rejected = (int(rng.integers(lo, hi + 1)) for lo, hi in ((16, 128), (8, 128), (8, 128)))
            if used + 2 * prompt + chosen + rejected > tokens:
                break
            used += 2 * prompt + chosen + rejected
            ids = [rng.integers(3, vocab, n) for n in (prompt, chosen, rejected)]
            pairs.append(TokenizedPair(len(pairs), *ids))
        batches.append(collate_packed(pairs))
    return batches


def timed(model, batches, chunk_tokens: int, steps: int, device: torch.device) -> float:
    """Seconds per row of forward + backward (after one untimed row)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, batch in enumerate([batches[0], *batches[:steps]]):
        if i == 1:
            sync()
            start = time.perf_counter()
        sequence_logps(model, batch.to(device), chunk_tokens=chunk_tokens).logps.sum().backward()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    results = []
    for vocab in args.vocab:
        shape = SHAPE | {"num_hidden_layers": args.layers}
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **shape)).to(device, dtype)
        enable_packed_attention(model, "auto")
        scored = packed_rows(vocab, args.tokens, args.steps)
        every = [dataclasses.replace(b, scored_positions=torch.arange(b.num_tokens - 1)) for b in scored]
        tokens = sum(b.num_tokens for b in scored) / len(scored)
        fraction = sum(len(b.scored_positions) for b in scored) / sum(b.num_tokens - 1 for b in scored)
        all_s = timed(model, every, args.chunk_tokens, args.steps, device)
        scored_s = timed(model, scored, args.chunk_tokens, args.steps, device)
        results.append(
            {
                "vocab_size": vocab,
                "tokens_per_row": tokens,
                "scored_fraction": round(fraction, 3),
                "all_positions_tokens_per_s": tokens / all_s,
                "scored_positions_tokens_per_s": tokens / scored_s,
                "speedup": all_s / scored_s,
            }
        )
        print(json.dumps(results[-1]))
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": {"model": SHAPE | {"num_hidden_layers": args.layers}, "dtype": str(dtype).removeprefix("torch."), "chunk_tokens": args.chunk_tokens, "steps": args.steps},
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
