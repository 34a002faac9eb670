"""Side-by-side DPO throughput: dpo_dist vs TRL, one process, one device, same model and data.

    python tools/bench.py --preset cpu-small|gpu-1b [--steps N] [--warmup W] --out FILE.json
    dpo-bench ...                                    (the same, as a console script)

Systems (JSON key -> what runs):
  ours_precomputed     our engine (DeepSpeed, packed rows), reference log-probs looked up
  ours_online          our engine, a frozen reference forward every micro-batch
  trl_online           TRL DPOTrainer with its defaults (padded batches, online reference)
  trl_precomputed      TRL with precompute_ref_log_probs=True (train steps only)
  ours_reference_pass  our forward-only reference pass (packed, no grad)

Every system starts from the same random-init weights (saved once), sees the same synthetic
pairs (random text with a realistic length spread) and the same pairs per optimizer step;
warm-up steps are not timed. tokens/s counts real tokens (prompt + response of both sequences,
never padding). MFU = (6 * N_non_embedding * tokens + attention FLOPs) / time / peak, with the
dense bf16 peak of the device (null on CPU, where no peak is stated). Peak memory: GPU
``max_memory_allocated``; CPU the peak RSS sampled while the system runs.

A system that fails is recorded as ``{"error": "Type: message"}`` (ours_precomputed and the
scaling points as ``{"error": "skipped: the reference pass failed: ..."}`` when the pass they
need failed, next to the pass's own record) and the others still run; the JSON keeps every number
measured, stderr has one ``dpo-bench: error: SYSTEM: ...`` line per failure, and the exit status
is 1. TRL systems skipped on purpose (--skip-trl, trl not installed) are ``"skipped (...)"``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script from a checkout: the checkout's packages, before any other installed copy.
sys.path.insert(0, str(REPO))

from launch.common import ArgumentParser  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """One benchmark setting."""

    model: dict
    dtype: str
    prompt_len: tuple[int, int]
    response_len: tuple[int, int]
    pairs: int
    pairs_per_step: int
    micro_batch_tokens: int
    max_length: int
    steps: int
    warmup: int
    scaling_tokens: list[int] = field(default_factory=list)
    peak_tflops: float | None = None
    """Dense bf16 peak of the device, for MFU (H100 SXM datasheet: 989 TFLOP/s)."""


PRESETS = {
    # Llama-3.2-1B shape, random init, bf16, lengths as in the TRL anchor measurements.
    "gpu-1b": Preset(
        model=dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256,
        ),
        dtype="bf16", prompt_len=(64, 512), response_len=(32, 512), pairs=256, pairs_per_step=8,
        micro_batch_tokens=16384, max_length=1024, steps=10, warmup=3,
        scaling_tokens=[1024, 4096, 8192, 16384], peak_tflops=989.0,
    ),
    # ~25M non-embedding parameters, fp32, lengths scaled down: the whole run fits in minutes on 2 cores.
    "cpu-small": Preset(
        model=dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, tie_word_embeddings=False,
        ),
        dtype="fp32", prompt_len=(16, 128), response_len=(8, 128), pairs=64, pairs_per_step=8,
        micro_batch_tokens=2048, max_length=256, steps=3, warmup=1, scaling_tokens=[512, 1024, 2048],
    ),
    # Seconds, for the smoke test that keeps this script from rotting (not a measurement).
    "cpu-smoke": Preset(
        model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False),
        dtype="fp32", prompt_len=(4, 24), response_len=(2, 16), pairs=16, pairs_per_step=4,
        micro_batch_tokens=256, max_length=64, steps=2, warmup=1, scaling_tokens=[128],
    ),
}


# ----------------------------------------------------------------------------- inputs


def write_pairs(path: Path, preset: Preset, seed: int = 0) -> None:
    """Random printable text: the bundled tokenizer is character-level, so chars = tokens."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?"
    with open(path, "w") as f:
        for _ in range(preset.pairs):
            prompt = "".join(rng.choices(alphabet, k=rng.randint(*preset.prompt_len)))
            chosen, rejected = ("".join(rng.choices(alphabet, k=rng.randint(*preset.response_len))) for _ in range(2))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected + "!"}) + "\n")


def build_model_dir(path: Path, preset: Preset) -> int:
    """Save a random-init Llama with the bundled tokenizer; returns its non-embedding parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "dpo_dist" / "assets" / "tokenizer")
    settings = {"vocab_size": len(tok), **preset.model}
    cfg = LlamaConfig(
        **settings, max_position_embeddings=2 * preset.max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    # On a GPU: initialise there (a 1B init is slow on host cores) and save in the run's dtype.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    if preset.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embeddings
    del model
    return non_embedding


class PeakMemory:
    """Peak device memory (GPU) or peak process RSS sampled every 20 ms (CPU), in GB."""

    def __init__(self, device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        import psutil
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            proc = psutil.Process()

            def sample():
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self.peak = proc.memory_info().rss
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 1e9


def flops(tokens: float, seq_sq_sum: float, n_params: int, layers: int, hidden: int, train: bool) -> float:
    """6N (train) or 2N (forward) per token, plus causal attention: 4 * L * d * sum(len^2)/2 per forward."""
    factor = 3 if train else 1
    return factor * (2 * n_params * tokens + 2 * layers * hidden * seq_sq_sum)


@dataclass
class Timing:
    tokens: float = 0.0
    seq_sq: float = 0.0
    seconds: float = 0.0
    step0_loss: float | None = None


def result(t: Timing, mem: PeakMemory, preset: Preset, n_params: int, train: bool) -> dict:
    tps = t.tokens / t.seconds if t.seconds else 0.0
    mfu = None
    if preset.peak_tflops and t.seconds:
        f = flops(t.tokens, t.seq_sq, n_params, preset.model["num_hidden_layers"], preset.model["hidden_size"], train)
        mfu = f / t.seconds / (preset.peak_tflops * 1e12)
    return {"tokens_per_s": tps, "mfu": mfu, "peak_mem_gb": mem.gb, "step0_loss": t.step0_loss}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- ours


def our_config(preset: Preset, model_dir: Path, data: Path, out: Path, micro_batch_tokens: int, stage: int,
               overrides: dict | None = None):
    from dpo_dist.config import config_from_dict

    values = {
        "output_dir": str(out),
        "model": {"path": str(model_dir), "dtype": preset.dtype},
        "data": {"train_path": str(data), "eval_path": None, "max_length": preset.max_length,
                 "cache_dir": str(out / "tok")},
        "train": {"pairs_per_step": preset.pairs_per_step, "micro_batch_tokens": micro_batch_tokens,
                  "max_steps": preset.steps + preset.warmup},
        "optim": {"lr": 1e-6, "warmup_steps": 0},
        "deepspeed": {"stage": stage},
        "wandb": {"mode": "disabled"},
    }
    return config_from_dict(_merge(values, overrides or {}))


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def parse_overrides(items: list[str]) -> dict:
    """``["deepspeed.param_persistence_threshold=1000000000", ...]`` -> nested dict (values parsed as
    YAML, where ``1e9`` is a string)."""
    import yaml

    from dpo_dist.config import nest_dotted

    flat = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"dpo-bench: error: --set expects KEY=VALUE, got {item!r}")
        flat[key] = yaml.safe_load(raw)
    return nest_dotted(flat)


class TensorReference:
    """Precomputed reference log-probs held on device, looked up by example id (what the Arrow
    store's lookup amounts to once loaded)."""

    def __init__(self, table):
        self.table = table

    def logps(self, batch):
        rows = self.table[batch.example_ids]
        return rows[:, 0], rows[:, 1]


def reference_pass(cfg, dataset, device, backend, preset, n_params):
    """(e) forward-only over every pair; returns the timing and the [pairs, 2] log-prob table
    (summed, LD-DPO's with loss.ld_alpha, as the Arrow store's lookup gives them)."""
    import numpy as np
    import torch

    from dpo_dist.data import collate_packed, pack_pairs
    from dpo_dist.engine import build_inference_engine
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.model import release_engine, run_packed

    engine = build_inference_engine(cfg, cfg.model.path, device, backend)
    table = torch.zeros(len(dataset), 2, device=device)
    groups = pack_pairs(dataset.lengths(), cfg.train.micro_batch_tokens)
    timing = Timing()
    with PeakMemory(device) as mem, torch.no_grad():
        for i, group in enumerate(groups[:2] + groups):  # the first two repeat as warm-up
            batch = collate_packed([dataset[p] for p in group]).to(device)
            _sync(device)
            t0 = time.perf_counter()
            chosen, rejected = split_pairs(run_packed(engine, batch).desensitized_sums(cfg.loss.ld_alpha))
            table[batch.example_ids] = torch.stack([chosen, rejected], 1)
            _sync(device)
            if i >= 2:
                timing.seconds += time.perf_counter() - t0
                lens = np.diff(batch.cu_seqlens.cpu().numpy())
                timing.tokens += batch.num_tokens
                timing.seq_sq += float((lens.astype(np.float64) ** 2).sum())
    release_engine(engine)
    return result(timing, mem, preset, n_params, train=False), table


def ours_train(cfg, dataset, device, backend, reference, preset, n_params):
    """(a)/(b): our engine's train steps; reference is a TensorReference or None (online)."""
    import numpy as np

    from dpo_dist import engine as E
    from dpo_dist import model as M

    engine = M.build_engine(cfg, device, backend)
    if reference is None:
        reference = E.OnlineReference(cfg, device, backend)
        reference.attach_policy(engine)  # with LoRA: the policy, adapters disabled
    ctx = E.StepContext(engine, reference, cfg, device, 1)
    sampler = E.PairSampler(len(dataset), cfg.train.pairs_per_step, cfg.train.seed)
    lengths = dataset.lengths()
    timing = Timing()
    with PeakMemory(device) as mem:
        for step in range(preset.warmup + preset.steps):
            positions = sampler.pairs_for_step(step)
            plans = E.plan_micro_batches(positions, lengths, 0, 1, cfg.train.micro_batch_tokens)
            _sync(device)
            t0 = time.perf_counter()
            totals = dict(zip(E._SUMS, E.train_step(ctx, dataset, plans).tolist()))  # the one sync per step
            elapsed = time.perf_counter() - t0
            if step == 0:
                timing.step0_loss = totals["loss"] / totals["pairs"]
            if step >= preset.warmup:
                timing.seconds += elapsed
                timing.tokens += totals["tokens"]
                seq = [dataset[p] for p in positions]
                timing.seq_sq += float(sum(np.float64(p.chosen_seq_len) ** 2 + np.float64(p.rejected_seq_len) ** 2 for p in seq))
    M.release_engine(engine)
    if isinstance(reference, E.OnlineReference) and not reference.uses_policy:
        M.release_engine(reference.engine)
    return result(timing, mem, preset, n_params, train=True)


@dataclass
class OurSetup:
    """What every one of our systems shares: config, tokenized pairs, device, attention backend."""

    cfg: object
    dataset: object
    device: object
    backend: str
    n_params: int


def setup_ours(preset: Preset, model_dir: Path, data: Path, work: Path, stage: int, attn_backend: str,
               overrides: dict) -> OurSetup:
    from transformers import AutoTokenizer

    from dpo_dist import distributed as D
    from dpo_dist.attention import resolve_attn_backend
    from dpo_dist.data import load_tokenized
    from dpo_dist.model import training_dtype

    env = D.DistEnv(0, 0, 1, "127.0.0.1", D.free_port(), None)
    D.init_distributed(env, 30)
    device = D.device_for(env)
    cfg = our_config(preset, model_dir, data, work / "ours", preset.micro_batch_tokens, stage, overrides)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_tokenized(data, tok, preset.max_length, cfg.data.truncation, "error", cfg.data.resolved_cache_dir())
    backend = resolve_attn_backend(attn_backend, device, training_dtype(cfg, device))
    return OurSetup(cfg, dataset, device, backend, _non_embedding_params(model_dir))


def _non_embedding_params(model_dir: Path) -> int:
    return json.loads((model_dir / "bench_params.json").read_text())["non_embedding"]


# ----------------------------------------------------------------------------- TRL


def run_trl(
    preset: Preset, model_dir: Path, data: Path, work: Path, precompute: bool, overrides: dict, fp32_weights: bool = False
) -> dict:
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.integrations import unset_hf_deepspeed_config
    from trl import DPOConfig, DPOTrainer

    # Our engines registered a ZeRO-3 config with transformers; TRL must load a plain model.
    unset_hf_deepspeed_config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in open(data)]
    train_ds = datasets.Dataset.from_list(records)
    timing = Timing()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    state = {"t0": 0.0, "step": 0, "tokens": zero.clone(), "seq_sq": zero.clone()}

    class Counting(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            # Real (non-pad) tokens, counted on device: no extra host sync in TRL's step.
            mask = inputs["attention_mask"]
            state["tokens"] += mask.sum().to(torch.float64)
            state["seq_sq"] += (mask.sum(1).to(torch.float64) ** 2).sum()
            return super()._compute_loss(model, inputs, return_outputs)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            _sync(device)
            if state["step"] == preset.warmup:  # count only timed steps
                state["tokens"].zero_()
                state["seq_sq"].zero_()
            state["t0"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(device)
            if state["step"] >= preset.warmup:
                timing.seconds += time.perf_counter() - state["t0"]
            state["step"] += 1

        def on_log(self, args, st, control, logs=None, **kw):
            if timing.step0_loss is None and logs and "loss" in logs:
                timing.step0_loss = float(logs["loss"])

    args = DPOConfig(
        output_dir=str(work / ("trl_pre" if precompute else "trl_online")),
        per_device_train_batch_size=preset.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=preset.warmup + preset.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=preset.dtype == "bf16",
        beta=0.1,
        max_length=2 * preset.max_length,
        precompute_ref_log_probs=precompute,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=device.type == "cpu",
        **overrides,
    )
    # A bf16 checkpoint loads as bf16 weights, and TRL then trains in pure bf16 (AdamW states in bf16,
    # no fp32 master copy); fp32_weights gives it our engine's precision (bf16 autocast over fp32).
    dtype = torch.bfloat16 if preset.dtype == "bf16" and not fp32_weights else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    trainer = Counting(model=model, args=args, train_dataset=train_ds, processing_class=tok, callbacks=[Timer()])
    with PeakMemory(device) as mem:
        trainer.train()
    timing.tokens, timing.seq_sq = float(state["tokens"]), float(state["seq_sq"])
    setup = {"distributed_type": str(trainer.accelerator.distributed_type), "padding_free": bool(args.padding_free),
             "gradient_checkpointing": bool(args.gradient_checkpointing), "weights_dtype": str(dtype).removeprefix("torch.")}
    del trainer, model
    n_params = _non_embedding_params(model_dir)
    np.random.seed(0)
    return {**result(timing, mem, preset, n_params, train=True), **setup}


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
           "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    with contextlib.suppress(ImportError):
        import trl

        out["trl"] = trl.__version__
    # flash-attn-4 installs flash_attn as a namespace package (no __init__, no __version__).
    for distribution in ("flash-attn", "flash-attn-4"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[distribution.replace("-", "_")] = importlib.metadata.version(distribution)
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


SYSTEMS = ("ours_reference_pass", "ours_precomputed", "ours_online", "trl_online", "trl_precomputed")


def error_record(error: BaseException) -> dict:
    """A system that raised: ``{"error": "Type: first line of the message"}``."""
    lines = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__}


def failed(record: object) -> bool:
    """An error record (the system raised, or could not run because something it needs did)."""
    return isinstance(record, dict) and "error" in record


def measured(record: object) -> bool:
    """A successful system's numbers (not an error record, not a legitimate "skipped (...)" string)."""
    return isinstance(record, dict) and "error" not in record


def failures(report: dict) -> dict[str, str]:
    """Every failed system and scaling point of a report, name -> error text."""
    records = {**report["systems"],
               **{f"scaling {k}": v for k, v in report.get("scaling_micro_batch_tokens", {}).items()}}
    return {name: record["error"] for name, record in records.items() if failed(record)}


def run(args: argparse.Namespace) -> dict:
    """Every selected system in turn; the report is rewritten to ``args.out`` after each one, so a
    run cut short (or one system failing) still leaves every number measured so far."""
    from dpo_dist.model import free_memory

    preset = PRESETS[args.preset]
    preset = replace(preset, steps=preset.steps if args.steps is None else args.steps,
                     warmup=preset.warmup if args.warmup is None else args.warmup)
    scaling_tokens = preset.scaling_tokens if args.scaling is None else args.scaling
    overrides = parse_overrides(args.set)
    trl_overrides = parse_overrides(args.trl_set)
    report: dict = {"device": device_name(), "preset": args.preset, "versions": versions(), "config": {},
                    "systems": {}, "scaling_micro_batch_tokens": {}, "ratios": {}}

    def measure(section: dict, name: str, fn) -> object:
        """Run one system; a failure is recorded as its result instead of ending the bench."""
        value = None
        try:
            value = fn()
        except Exception as error:  # noqa: BLE001 - reported in the JSON and on stderr
            traceback.print_exc()
            section[name] = error_record(error)
        free_memory()
        if name not in section:
            section[name] = value[0] if isinstance(value, tuple) else value
        report["ratios"] = ratios(report["systems"])
        write_report(args.out, report)
        return value

    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        work = Path(tmp)
        model_dir, data = work / "model", work / "pairs.jsonl"
        n_params = build_model_dir(model_dir, preset)
        (model_dir / "bench_params.json").write_text(json.dumps({"non_embedding": n_params}))
        write_pairs(data, preset)
        ours = setup_ours(preset, model_dir, data, work, args.zero_stage, args.attn_backend, overrides)
        report["config"] = {
            "model": preset.model, "non_embedding_params": n_params, "dtype": preset.dtype,
            "prompt_len": preset.prompt_len, "response_len": preset.response_len, "pairs": preset.pairs,
            "pairs_per_step": preset.pairs_per_step, "micro_batch_tokens": ours.cfg.train.micro_batch_tokens,
            "steps_timed": preset.steps, "warmup_steps": preset.warmup, "zero_stage": args.zero_stage,
            "attention_backend": ours.backend, "peak_tflops": preset.peak_tflops, "overrides": overrides,
            "trl_overrides": trl_overrides,
            "trl_fp32_weights": args.trl_fp32_weights,
        }
        common = (ours.dataset, ours.device, ours.backend, preset, ours.n_params)
        systems, selected = report["systems"], set(args.systems)
        table, no_table = None, None
        if selected & {"ours_reference_pass", "ours_precomputed"} or scaling_tokens:
            value = measure(systems, "ours_reference_pass", lambda: reference_pass(ours.cfg, *common))
            table = value[1] if isinstance(value, tuple) else None
            if table is None:
                # What needs its log-probs is recorded as skipped (an error: it was asked for and did
                # not run); the pass's own error record stays, asked for or not: it is the cause.
                cause = systems["ours_reference_pass"]
                reason = cause["error"] if failed(cause) else "no log-prob table"
                no_table = {"error": f"skipped: the reference pass failed: {reason}"}
            elif "ours_reference_pass" not in selected:
                del systems["ours_reference_pass"]  # run only for the systems below: untimed, unreported
        if "ours_precomputed" in selected:
            if table is None:
                systems["ours_precomputed"] = dict(no_table)
                write_report(args.out, report)
            else:
                measure(systems, "ours_precomputed", lambda: ours_train(ours.cfg, ours.dataset, ours.device, ours.backend,
                                                                        TensorReference(table), preset, ours.n_params))
        if "ours_online" in selected:
            measure(systems, "ours_online", lambda: ours_train(ours.cfg, ours.dataset, ours.device, ours.backend,
                                                               None, preset, ours.n_params))
        for name, precompute in (("trl_online", False), ("trl_precomputed", True)):
            if name not in selected:
                continue
            if args.skip_trl or not _has_trl():
                reason = "skipped (--skip-trl)" if args.skip_trl else "skipped (trl not installed: pip install -e .[bench])"
                systems[name] = reason
                write_report(args.out, report)
                continue
            with without_torchrun_variables():
                measure(systems, name, lambda precompute=precompute: run_trl(preset, model_dir, data, work, precompute, trl_overrides, args.trl_fp32_weights))
        # Scaling last: a run cut short by a time limit still has every system above.
        for tokens in scaling_tokens:
            if table is None:
                report["scaling_micro_batch_tokens"][str(tokens)] = dict(no_table)
                write_report(args.out, report)
                continue
            scaled = replace(ours.cfg, train=replace(ours.cfg.train, micro_batch_tokens=tokens))
            measure(report["scaling_micro_batch_tokens"], str(tokens),
                    lambda scaled=scaled: ours_train(scaled, ours.dataset, ours.device, ours.backend,
                                                     TensorReference(table), preset, ours.n_params))
    return report


@contextlib.contextmanager
def without_torchrun_variables():
    """TRL runs as a user starts it, as one plain process: without the torchrun variables our
    engines set, accelerate would treat it as a distributed run and wrap the model in DDP over
    one rank. Our process group stays up for the scaling runs after it."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.pop(key) for key in keys if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def out_problem(path: str) -> str | None:
    """Why the report cannot be written to ``path`` (a folder, a folder of it that cannot be
    created, one where no file can be made), or None. Creates the folder; leaves no file behind."""
    out = Path(path)
    if out.is_dir():
        return "is a directory"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # it, or a folder above it, is a file
        return f"cannot create the directory {out.parent}: a file is in the way"
    except OSError as e:
        return f"cannot create the directory {out.parent}: {e.strerror or e}"
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:  # EACCES, EROFS, ...
        return f"cannot write in {out.parent}: {e.strerror or e}"
    return None


def write_report(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def ratios(systems: dict) -> dict:
    def tps(name):
        s = systems.get(name)
        return s["tokens_per_s"] if measured(s) and s["tokens_per_s"] else None

    out = {}
    for ours, theirs in (("ours_online", "trl_online"), ("ours_precomputed", "trl_precomputed")):
        if tps(ours) and tps(theirs):
            out[f"{ours}/{theirs}"] = tps(ours) / tps(theirs)
    return out


def _has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _csv_systems(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="dpo-bench", description="dpo_dist vs TRL DPO throughput")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--steps", type=_at_least(1), help="timed optimizer steps per system (>= 1; default: the preset's)")
    parser.add_argument("--warmup", type=_at_least(0), help="untimed steps before timing (>= 0; default: the preset's)")
    parser.add_argument("--out", required=True, help="JSON file to write (rewritten after every system)")
    parser.add_argument("--systems", type=_csv_systems, default=list(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--scaling", type=_csv_ints, help="micro-batch token budgets to sweep (default: the preset's; '' for none)")
    parser.add_argument("--attn-backend", default="auto", choices=("auto", "flash", "varlen", "sdpa"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of our run config, e.g. deepspeed.param_persistence_threshold=1000000000")
    parser.add_argument("--trl-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of TRL's DPOConfig, e.g. gradient_checkpointing=false")
    parser.add_argument("--trl-fp32-weights", action="store_true",
                        help="load TRL's model in fp32 (bf16 autocast, fp32 AdamW: our engine's precision) "
                             "instead of the preset's dtype (bf16: pure-bf16 training)")
    parser.add_argument("--skip-trl", action="store_true", help="only our systems (smoke tests)")
    parser.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3))
    args = parser.parse_args(argv)
    problem = out_problem(args.out)
    if problem:  # before measuring: the report is first written after the first system ran
        print(f"dpo-bench: error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    from dpo_dist.attention import AttentionBackendError
    from dpo_dist.config import ConfigError

    try:
        report = run(args)
    except (ConfigError, AttentionBackendError) as error:  # a bad --set or --attn-backend for this machine
        print(f"dpo-bench: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    for name, s in {**report["systems"], **{f"scaling {k}": v for k, v in report["scaling_micro_batch_tokens"].items()}}.items():
        if measured(s):
            line = f"{s['tokens_per_s']:10.1f} tok/s  mfu {s['mfu']}  peak {s['peak_mem_gb']:.2f} GB  step0 loss {s['step0_loss']}"
        else:
            line = f"error: {s['error']}" if failed(s) else str(s)
        print(f"{name:22s} {line}")
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.2f}x")
    # The JSON (rewritten after every system) already holds what did run; a failed system still
    # fails the command, so a script or CI job running the bench cannot take a partial table for a whole one.
    failed_systems = failures(report)
    for name, error in failed_systems.items():
        print(f"dpo-bench: error: {name}: {error}", file=sys.stderr)
    return 1 if failed_systems else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
