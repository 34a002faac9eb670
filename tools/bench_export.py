"""Host memory of consolidating a ZeRO-3 checkpoint (dpo-export, dpo-eval of a checkpoint).

Trains one step of a random-init Llama (2 gloo ranks, ZeRO-3, CPU) to get a real checkpoint, then
exports it twice, each in a fresh process whose anonymous memory (``RssAnon``: what the process
itself allocated, not the page cache behind memory-mapped files) is sampled every 5 ms:

- ``streaming``: ``dpo_dist.export.export_checkpoint`` (memory-mapped partitions, one shard at a time);
- ``whole_model``: zero_to_fp32's eager state dict loaded into the model, then ``save_pretrained``
  (dpo_dist's export before it streamed, and the usual recipe).

The two exports must hold identical tensors. Usage:

    python tools/bench_export.py --out benchmarks/export-memory.json [--layers 12 --hidden 1536]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARD = "200MB"


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def measure(fn) -> dict:
    """Run ``fn()``; its wall time and the peak anonymous memory above the start."""
    base, peak, done = rss_anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return {"seconds": round(seconds, 2), "peak_anon_gb": round(max(peak[0], rss_anon_bytes()) / 1e9 - base / 1e9, 3)}


def export_streaming(run: Path, out: Path) -> None:
    from dpo_dist.export import export_checkpoint

    export_checkpoint(run, out, max_shard_size=SHARD)


def export_whole_model(run: Path, out: Path) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_dist.export import resolve_checkpoint
    from dpo_dist.runinfo import read_config

    root, tag, _ = resolve_checkpoint(run)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(read_config(run / "config.yaml").model.path))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True, assign=True)
    model.save_pretrained(out, max_shard_size=SHARD)


def child(kind: str, run: str, out: str) -> None:
    """One export in this (fresh) process; prints its measurement as JSON."""
    import deepspeed  # noqa: F401
    import torch  # imported before the baseline: its own memory is not the export's
    import transformers  # noqa: F401

    torch.set_num_threads(2)
    fn = {"streaming": export_streaming, "whole_model": export_whole_model}[kind]
    print(json.dumps(measure(lambda: fn(Path(run), Path(out)))))


def make_model(path: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import LlamaForCausalLM

    from tests.helpers import bundled_llama_config

    tok, config = bundled_llama_config(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 128 * 128,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def train_one_step(model: Path, run: Path) -> None:
    overrides = {
        "model.path": model,
        "loss": "simpo",  # reference-free: no reference pass to wait for
        "data.max_length": 64,
        "data.eval_path": "null",
        "train.micro_batch_tokens": 256,
        "train.pairs_per_step": 4,
        "train.max_steps": 1,
        "train.checkpoint_every": 1,
        "cluster.nproc_per_node": 2,
        "wandb.mode": "disabled",
        "output_dir": run,
    }
    cmd = [sys.executable, "-m", "launch.train", *(f"{k}={v}" for k, v in overrides.items())]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    left, right = load(a), load(b)
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    import deepspeed
    import torch
    import transformers

    from dpo_dist.export import resolve_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = make_model(tmp / "model", args.layers, args.hidden)
        train_one_step(tmp / "model", tmp / "run")
        root, tag, _ = resolve_checkpoint(tmp / "run")
        checkpoint = root / tag
        systems = {}
        for kind in ("streaming", "whole_model"):
            cmd = [sys.executable, __file__, "--out", args.out, "--child", kind, str(tmp / "run"), str(tmp / kind)]
            result = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
            systems[kind] = json.loads(result.stdout.strip().splitlines()[-1])
            systems[kind]["shards"] = len(list((tmp / kind).glob("*.safetensors")))
        identical = same_tensors(tmp / "streaming", tmp / "whole_model")
        report = {
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
            "config": {
                "layers": args.layers,
                "hidden": args.hidden,
                "parameters": params,
                "fp32_model_gb": round(params * 4 / 1e9, 3),
                "checkpoint_gb": round(sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 1e9, 3),
                "world_size": 2,
                "max_shard_size": SHARD,
            },
            "systems": systems,
            "identical_tensors": identical,
        }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
