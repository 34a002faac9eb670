"""Host memory of consolidating a ZeRO-3 checkpoint (dpo-export, dpo-eval of a checkpoint).

Trains one step of a random-init Llama (2 gloo ranks, ZeRO-3, CPU) to get a real checkpoint, then
exports it twice, each in a fresh process whose anonymous memory (``RssAnon``: what the process
itself allocated, not the page cache behind memory-mapped files) is sampled every 5 ms:

- ``streaming``: ``dpo_dist.export.export_checkpoint`` (memory-mapped partitions, one shard at a time);
- ``whole_model``: zero_to_fp32's eager state dict loaded into the model, then ``save_pretrained``
  (dpo_dist's export before it streamed, and the usual recipe).

The two exports must hold identical tensors. Then it measures the end-of-training export
(``training_end`` in the report) the same way, on rank 0 of 2 gloo ranks that build the policy
engine of the same model as ``dpo-train`` does (``setup_job`` + ``build_engine``, ``model.dtype``
bf16, SimPO) and train one step, each kind in fresh rank processes:

- ``streaming``: ``dpo_dist.checkpoint._export_partitioned`` (one parameter gathered at a time, rank 0
  holds one shard), what ``export_hf`` writes ``final/`` with;
- ``whole_model``: DeepSpeed's ``engine._zero3_consolidated_16bit_state_dict()`` (collective; rank 0
  keeps every gathered parameter), then ``save_pretrained(state_dict=...)`` on rank 0.

Training's export cuts 5GB shards (``dpo_dist.export.DEFAULT_MAX_SHARD_SIZE``, not a config key);
the bench sets that constant to the same 200MB in its rank processes so the model spans several
shards. Each export runs ``--repeats`` times (its peak depends on the allocator's state), under
glibc's default allocator and, for the bench model, with its mmap threshold fixed at 128KB
(``MALLOC_MMAP_THRESHOLD_``): glibc keeps freed blocks under its dynamic threshold (up to 32MB) in
its heap, which this model's tensors (1-13MB) are, unlike those of a multi-billion-parameter model.
A second, wide model (``--end-wide``, default 2 layers of hidden 4096: 34-89MB tensors, as in a
7B model) is measured under the default allocator. Usage:

    python tools/bench_export.py --out benchmarks/export-memory.json [--layers 12 --hidden 1536]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import platform
import shutil
import statistics
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


# ----------------------------------------------------------------------------- end of training


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc ``malloc_trim``), so the
    export cannot reuse memory that the engine build or the training step freed but glibc kept
    resident: that would hide part of its peak from ``RssAnon``."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def training_end_config(model: Path, tmp: Path):
    """The run config of the bench's policy: the bundled data, SimPO (no reference pass), bf16."""
    from dpo_dist.config import config_from_dict

    return config_from_dict({
        "model": {"path": str(model), "dtype": "bf16"},
        "loss": {"name": "simpo", "beta": 2.0, "gamma": 0.5, "logp_normalization": "mean"},  # conf/loss/simpo.yaml
        "data": {"max_length": 64, "eval_path": None, "cache_dir": str(tmp / "tokenized")},
        "train": {"micro_batch_tokens": 256, "pairs_per_step": 4, "max_steps": 1},
        "cluster": {"nproc_per_node": 2},
        "wandb": {"mode": "disabled"},
        "output_dir": str(tmp / "train_run"),
    })


def export_streaming_at_end(engine, job, out: Path) -> None:
    from dpo_dist.checkpoint import _export_partitioned

    _export_partitioned(engine, job.tokenizer, out, job.env)


def export_whole_model_at_end(engine, job, out: Path) -> None:
    from dpo_dist import distributed as D
    from dpo_dist.attention import unwrap_model

    state = engine._zero3_consolidated_16bit_state_dict()  # every rank: its gathers are collectives
    if job.env.is_main:
        weights = {k.removeprefix("model."): v for k, v in state.items()}  # PackedPolicy's prefix
        unwrap_model(engine.module.model).save_pretrained(out, state_dict=weights, max_shard_size=SHARD)
        job.tokenizer.save_pretrained(out)
    del state
    D.barrier()


def rank_child(kind: str, spec_path: str) -> None:
    """One rank of an end-of-training export (launched by ``run_ranks``): build the policy engine as
    ``dpo-train`` does, train one step, then export; rank 0 writes its measurement to ``SPEC.KIND.json``."""
    import numpy as np
    import torch

    import dpo_dist.export
    from dpo_dist import checkpoint as C
    from dpo_dist import distributed as D
    from dpo_dist import engine as E
    from dpo_dist import model as M
    from dpo_dist.attention import unwrap_model

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    # Training's export cuts DEFAULT_MAX_SHARD_SIZE (5GB) shards, read when it runs: the bench's size instead.
    dpo_dist.export.DEFAULT_MAX_SHARD_SIZE = SHARD
    cfg = training_end_config(Path(spec["model"]), Path(spec["tmp"]))
    job = E.setup_job(cfg)
    C.seed_everything(cfg.train.seed)
    engine = M.build_engine(cfg, job.device, job.backend)
    ctx = E.StepContext(engine, None, cfg, job.device, job.env.world_size)
    positions = np.arange(cfg.train.pairs_per_step)
    plans = E.plan_micro_batches(positions, job.train_data.lengths(), job.env.rank, job.env.world_size, cfg.train.micro_batch_tokens)
    E.train_step(ctx, job.train_data, plans)
    trim_heap()
    D.barrier()
    fn = {"streaming": export_streaming_at_end, "whole_model": export_whole_model_at_end}[kind]
    result = measure(lambda: fn(engine, job, Path(spec["out"])))
    if job.env.is_main:
        dtype = next(unwrap_model(engine.module.model).parameters()).dtype
        result.update(dtype=str(dtype).removeprefix("torch."), world_size=job.env.world_size)
        Path(f"{spec_path}.{kind}.json").write_text(json.dumps(result))
    D.barrier()


END_ALLOCATORS = {
    "glibc_default": {},
    # glibc's initial threshold, made fixed (no dynamic raise): a freed tensor over 128KB is unmapped.
    "mmap_threshold_128KB": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}
END_KINDS = ("streaming", "whole_model")


def export_in_ranks(kind: str, model: Path, tmp: Path, out: Path, env: dict) -> dict:
    """One end-of-training export in 2 fresh rank processes; rank 0's measurement and its shards."""
    from tests.helpers import run_ranks

    spec = tmp / f"training_end_{kind}.json"
    spec.write_text(json.dumps({"model": str(model), "tmp": str(tmp), "out": str(out)}))
    run_ranks([__file__, "--out", "-", "--rank-child", kind, str(spec)], 2, env=env, timeout=3600, label=f"{kind}: ")
    result = json.loads(Path(f"{spec}.{kind}.json").read_text())
    return {**result, "shards": len(list(out.glob("*.safetensors")))}


def tensors_digest(directory: Path) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of a safetensors export."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    tensors = {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def measure_training_end(model: Path, tmp: Path, allocators: list[str], repeats: int) -> tuple[dict, set]:
    """Both end-of-training exports of ``model``, ``repeats`` times under each allocator setting,
    each in 2 fresh rank processes: a rank that ran one export may keep its freed memory (glibc)
    for the next, which would then look smaller. Returns the report and the exports' digests."""
    report, digests, meta = {}, set(), set()
    for allocator in allocators:
        report[allocator] = {}
        for kind in END_KINDS:
            runs = []
            for _ in range(repeats):
                out = tmp / "final"
                runs.append(export_in_ranks(kind, model, tmp, out, END_ALLOCATORS[allocator]))
                digests.add(tensors_digest(out))
                shutil.rmtree(out)
            meta |= {(run["dtype"], run["world_size"]) for run in runs}
            report[allocator][kind] = {
                "peak_anon_gb": max(run["peak_anon_gb"] for run in runs),
                "peak_anon_gb_runs": [run["peak_anon_gb"] for run in runs],
                "seconds": round(statistics.median(run["seconds"] for run in runs), 2),
                "shards": runs[0]["shards"],
            }
    (dtype, world_size), = meta  # the same in every run
    return {"dtype": dtype, "world_size": world_size, **report}, digests


def model_summary(path: Path, dtype: str) -> dict:
    """Parameters, size in the export dtype and largest tensor of the saved model at ``path``."""
    from safetensors import safe_open

    sizes = []
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            sizes += [math.prod(handle.get_slice(k).get_shape()) for k in handle.keys()]
    nbytes = {"bfloat16": 2, "float16": 2}.get(dtype, 4)
    return {
        "parameters": sum(sizes),
        "model_gb": round(sum(sizes) * nbytes / 1e9, 3),
        "largest_tensor_mb": round(max(sizes) * nbytes / 1e6, 1),
    }


def training_end(models: dict[str, Path], tmp: Path, repeats: int) -> dict:
    """The report's ``training_end`` section: the bench model under both allocator settings, any
    other (the wide one) under glibc's default."""
    sections, identical, meta = {}, True, set()
    for i, (name, path) in enumerate(models.items()):
        allocators = list(END_ALLOCATORS) if i == 0 else ["glibc_default"]
        result, digests = measure_training_end(path, tmp, allocators, repeats)
        identical &= len(digests) == 1  # every run of every kind wrote the same tensors
        dtype, world_size = result.pop("dtype"), result.pop("world_size")
        meta.add((dtype, world_size))
        sections[name] = {**model_summary(path, dtype), **result}
    (dtype, world_size), = meta
    return {
        "config": {
            "dtype": dtype,
            "world_size": world_size,
            "max_shard_size": SHARD,
            "max_shard_size_patched": f"dpo_dist.export.DEFAULT_MAX_SHARD_SIZE (5GB in training) set to {SHARD} in the rank processes",
            "training": "setup_job + build_engine (ZeRO-3, model.dtype=bf16, loss=simpo), one train_step, malloc_trim, then the export",
            "repeats": repeats,
            "peak_anon_gb": "rank 0's, the largest of the repeats (peak_anon_gb_runs: each)",
            "allocators": END_ALLOCATORS,
        },
        "models": sections,
        "identical_tensors": identical,
    }


# ----------------------------------------------------------------------------- main


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
    parser.add_argument("--repeats", type=int, default=3, help="runs of each end-of-training export")
    parser.add_argument("--end-wide", default="2x4096", help="LAYERSxHIDDEN of the wide model of the "
                        "end-of-training measurement, or none")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--rank-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.rank_child:
        rank_child(*args.rank_child)
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
        end_models = {f"{args.layers}x{args.hidden}": tmp / "model"}
        if args.end_wide != "none":
            layers, hidden = map(int, args.end_wide.split("x"))
            make_model(tmp / "wide", layers, hidden)
            end_models[args.end_wide] = tmp / "wide"
        end = training_end(end_models, tmp, args.repeats)
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
            "training_end": end,
        }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if identical and end["identical_tensors"] else 1


if __name__ == "__main__":
    sys.exit(main())
