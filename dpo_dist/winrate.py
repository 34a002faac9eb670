"""Win-rate of a trained policy against its reference (``dpo-eval winrate``).

The policy (``eval.policy_path``: a Hugging Face directory or a checkpoint, resolved like
``dpo-eval``) and the reference (``DPOConfig.reference_model_path``, with ``model.tokenizer_path``'s tokenizer when
that is set, as in training) each answer the held-out prompts of
``data.eval_path``, or those ``data.eval_split`` holds out of ``data.train_path`` (the first
``eval.max_prompts``; greedy by default). The prompts, ordered by
length, are cut into batches of ``eval.batch_size`` and rank ``r`` of ``W`` generates batches
``r, r+W, ...`` (so the answers do not depend on ``W``); rank 0 gathers everything
(``torch.distributed.gather_object``), puts it back in file order, asks the judge
(``eval.judge``) to compare policy (``a``) and reference (``b``) on each prompt, and writes to
``eval.output`` (default ``output_dir``):

- ``winrate.json``: counts and rates of win / tie / loss, the win score ``(wins + ties/2) / n``,
  95% Wilson score intervals on the win rate and on the win score, generation and judge settings,
  the judge's usage (requests, retries, tokens, estimated cost; the preflight probe included) and
  the policy as given (``policy_source``, with ``policy_step`` for a checkpoint: ``policy`` is
  then its temporary export);
- ``winrate_samples.jsonl``: per prompt, both responses, the winner and the judge's details.

Resuming. Before judging, rank 0 saves the gathered answers to ``generations.json`` in the ranks'
work directory (``output_dir``, i.e. ``RUN/winrate/``) with a fingerprint of what made them: both
models (weights, tokenizer, generation config), the prompts and the generation settings. A rerun
with the same fingerprint judges those answers instead of generating again; a different one
generates again and logs what changed. Verdicts are appended to ``verdicts.jsonl`` there as they
come, keyed by the judge (``judges.judge_identity``), the prompt and both answers, so a judge that
fails half-way (an API outage) costs a rerun of the missing verdicts only.

Intervals: Wilson's score interval for a binomial proportion (z = 1.96). For the win score, ties
count as half a success; since a tie has less variance than a coin flip, the interval is slightly
conservative there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_dist import distributed as D
from dpo_dist.config import DPOConfig
from dpo_dist.data.tokenize import use_chat_template
from dpo_dist.evaluation import rank_config as evaluation_rank_config
from dpo_dist.generation import (
    Completion,
    PromptItem,
    SamplingParams,
    generate_texts,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    plain_prompt,
    trained_prompt,
)

log = logging.getLogger("dpo_dist.winrate")

Z_95 = 1.959963984540054
WORK_SUBDIR = "winrate"
"""Ranks of ``dpo-eval winrate`` run from ``output_dir/winrate/`` (their config.yaml, exports)."""
GENERATIONS_FILE = "generations.json"
"""The gathered answers and their fingerprint, in the ranks' work directory."""
GENERATIONS_FORMAT = 1
VERDICTS_FILE = "verdicts.jsonl"
"""Verdicts as they come, in the ranks' work directory: one ``{"key", "example_id", "winner",
"details"}`` line each."""
JUDGE_CHUNK = 16
"""Prompts judged per request slot (``eval.judge.concurrency``) between two appends to
``verdicts.jsonl``: enough to keep every slot busy, few enough that a failure loses little."""
OUTCOMES = {"a": "win", "b": "loss", "tie": "tie"}
WINNER_NAMES = {"a": "policy", "b": "reference", "tie": "tie"}


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``successes / n`` (``successes`` may be fractional)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Rounded: the bounds at 0 and 1 come out as +-1e-17 in floating point.
    return (round(max(0.0, center - half), 6), round(min(1.0, center + half), 6))


def summarize(outcomes: Sequence[str]) -> dict[str, Any]:
    """Counts, rates and 95% intervals of a list of ``win`` / ``tie`` / ``loss``."""
    n = len(outcomes)
    wins, ties, losses = (sum(o == name for o in outcomes) for name in ("win", "tie", "loss"))
    rate = (lambda k: k / n) if n else (lambda k: 0.0)
    return {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": rate(wins),
        "tie_rate": rate(ties),
        "loss_rate": rate(losses),
        "score": rate(wins + ties / 2),
        "score_ci95": list(wilson_interval(wins + ties / 2, n)),
        "win_rate_ci95": list(wilson_interval(wins, n)),
        "ci_method": "wilson score interval, z=1.96; score = (wins + ties/2) / n",
    }


def rank_config(cfg: DPOConfig) -> DPOConfig:
    """The config the ranks get (see ``evaluation.rank_config``), working in ``<output_dir>/winrate``."""
    return evaluation_rank_config(cfg, WORK_SUBDIR)


def eval_prompts(cfg: DPOConfig) -> list[PromptItem]:
    """The held-out prompts: records of ``data.eval_path``, or those ``data.eval_split`` holds
    out (bad ones per ``data.on_invalid``)."""
    from dpo_dist.data import load_preferences
    from dpo_dist.evaluation import held_out_source

    source = held_out_source(cfg, "for the win-rate's prompts")
    records = load_preferences(source.path, cfg.data.on_invalid, log, cfg.data.columns(), source.selection)
    if cfg.eval.max_prompts:
        records = records[: cfg.eval.max_prompts]
    with_tools = sum(r.tools is not None for r in records)
    if with_tools:  # a tool call would need the tool's answer to go on, and the judge to read it
        log.warning("%d of %d prompts have tools: the win-rate asks them without their tool definitions", with_tools, len(records))
    return [
        PromptItem(r.example_id, trained_prompt(r.prompt, r.is_chat), template_kwargs=r.chat_template_kwargs or {})
        for r in records
    ]


def rank_share(items: Sequence[PromptItem], rank: int, world_size: int, batch_size: int) -> list[PromptItem]:
    """The prompts rank ``rank`` answers: whole batches ``rank, rank + world_size, ...`` of all
    prompts, batched ``batch_size`` at a time in order of length. Every batch (its padding, its
    sampling seed) is then the same on any number of ranks, and so is every answer; and prompts
    of similar length share a batch, so little of it is left padding (characters stand in for
    tokens: policy and reference may tokenize differently)."""
    ordered = sorted(items, key=lambda item: len(plain_prompt(item.prompt)))
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    return [item for batch in batches[rank::world_size] for item in batch]


def sampling_params(cfg: DPOConfig) -> SamplingParams:
    """Generation settings of ``eval.*`` (the same for policy and reference)."""
    e = cfg.eval
    return SamplingParams(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature, top_p=e.top_p)


def generation_settings(cfg: DPOConfig) -> dict[str, Any]:
    """The ``eval.*`` settings that decide the answers (on any number of ranks)."""
    sampling = {k: v for k, v in dataclasses.asdict(sampling_params(cfg)).items() if k != "stop"}
    return {**sampling, "seed": cfg.eval.seed, "batch_size": cfg.eval.batch_size}


def generation_fingerprint(cfg: DPOConfig, policy_dir: str, items: Sequence[PromptItem], device) -> dict[str, Any]:
    """What made the answers, one entry per thing that can change (so a mismatch can say which).
    Not the number of ranks nor ``eval.shard_generation``: answers do not depend on them."""
    from dpo_dist.fingerprint import json_sha256

    return {
        "format": GENERATIONS_FORMAT,
        "policy": model_identity(policy_dir),
        # model.tokenizer_path, not resolved_tokenizer_path(): None keeps load_tokenizer's own
        # choice for model.path (an adapter directory without a tokenizer uses its base's).
        "reference": model_identity(cfg.reference_model_path(), cfg.model.tokenizer_path),
        "prompts": json_sha256([[item.example_id, item.prompt, *([item.template_kwargs] if item.template_kwargs else [])] for item in items]),
        **generation_settings(cfg),
        **({"chat_template": cfg.data.chat_template} if cfg.data.chat_template else {}),
        "dtype": cfg.model.dtype,
        "device": device.type,
    }


def save_generations(path: Path, fingerprint: dict[str, Any], rows) -> None:
    """Write the gathered ``(item, policy, reference)`` rows and their fingerprint, atomically."""
    from dpo_dist.reference_store import write_json_atomic

    saved = [
        {"example_id": item.example_id, "prompt": item.prompt, "policy": dataclasses.asdict(pol),
         "reference": dataclasses.asdict(ref)}
        for item, pol, ref in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"fingerprint": fingerprint, "rows": saved})
    log.info("saved %d answers of policy and reference to %s", len(rows), path)


def load_generations(path: Path, fingerprint: dict[str, Any], items: Sequence[PromptItem]) -> list | None:
    """The rows saved in ``path`` if they were made as ``fingerprint`` says (else None), in
    ``items``' order; logs whether they are reused or why not."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        old = saved["fingerprint"]
        changed = [key for key in sorted(fingerprint.keys() | old.keys()) if old.get(key) != fingerprint.get(key)]
        if changed:
            log.info("%s was generated with a different %s: generating again", path, ", ".join(changed))
            return None
        answers = {row["example_id"]: (Completion(**row["policy"]), Completion(**row["reference"])) for row in saved["rows"]}
        rows = [(item, *answers[item.example_id]) for item in items]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is unreadable (%s: %s): generating again", path, type(e).__name__, e)
        return None
    log.info("reusing the %d answers in %s (same models, prompts and settings): skipping generation", len(rows), path)
    return rows


def generate_with(model_dir: str, items: Sequence[PromptItem], cfg: DPOConfig, device, env: D.DistEnv,
                  total: int, tokenizer_path: str | None = None) -> list[Completion]:
    """Load ``model_dir``, answer this rank's ``items`` (of ``total`` over all ranks) and free the
    model again (policy and reference take turns): a full copy per rank, or with
    ``eval.shard_generation`` on several ranks one model partitioned over them.
    ``tokenizer_path``: the model's tokenizer when it is not in ``model_dir`` (the reference's
    ``model.tokenizer_path``)."""
    import torch

    prompts = [item.prompt for item in items]
    options = {"batch_size": cfg.eval.batch_size, "seed": cfg.eval.seed, "seed_offsets": [i.example_id for i in items],
               "template_kwargs": [i.template_kwargs for i in items]}
    if cfg.eval.shard_generation and env.world_size > 1:
        return _generate_sharded(model_dir, prompts, cfg, device, env, total, options, tokenizer_path)
    if not items:
        return []
    log.info("generating %d answers with %s", len(items), model_dir)
    model, tokenizer = load_causal_lm(model_dir, device, cfg.model.dtype, tokenizer_path=tokenizer_path)
    use_chat_template(tokenizer, cfg.data.chat_template)  # as training rendered the prompts
    completions = generate_texts(model, tokenizer, prompts, sampling_params(cfg), **options)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return completions


def _generate_sharded(model_dir, prompts, cfg: DPOConfig, device, env: D.DistEnv, total: int, options: dict,
                      tokenizer_path: str | None = None):
    """ZeRO-3 generation: every forward is a collective, so every rank makes as many ``generate``
    calls as the rank with the most prompts (``synced_batches``), each with ``synced_gpus``."""
    from dpo_dist.engine import build_generation_engine
    from dpo_dist.model import free_memory, release_engine

    tokenizer = use_chat_template(load_tokenizer(model_dir, tokenizer_path), cfg.data.chat_template)
    engine = build_generation_engine(cfg, model_dir, device)
    params = list(engine.module.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    log.info("generating %d answers with %s, partitioned over %d ranks (this rank holds %d of %d parameters)",
             total, model_dir, env.world_size, held, full)
    batches = -(-total // cfg.eval.batch_size)
    completions = generate_texts(engine.module, tokenizer, prompts, sampling_params(cfg), **options,
                                 synced_batches=-(-batches // env.world_size))
    release_engine(engine)
    del engine, params
    free_memory()
    return completions


def gather_to_main(local: list, env: D.DistEnv) -> list | None:
    """Every rank's list, concatenated on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    if env.world_size == 1 or not dist.is_initialized():
        return local
    parts = [None] * env.world_size if env.is_main else None
    dist.gather_object(local, parts, dst=0)
    # Until rank 0 has read every part: a rank that leaves (closing its gloo connections) while
    # rank 0 still reads aborts rank 0. A barrier now is short; after the judging it would not be.
    dist.barrier()
    return [x for part in parts for x in part] if env.is_main else None


def winrate_run(cfg: DPOConfig) -> dict[str, Any] | None:
    """The ``winrate`` task, on every rank; rank 0 judges, writes the results and returns them."""
    from dpo_dist.evaluation import policy_model_dir, policy_source
    from dpo_dist.judges import preflight

    env = D.detect_env()
    if env.world_size > 1:
        D.init_distributed(env, cfg.deepspeed.comm_timeout_minutes)
    device = D.device_for(env)
    items = eval_prompts(cfg)
    # Rank 0 alone: the openai check is a paid request, one is enough; its error reaches every rank.
    probe: dict[str, Any] = {}
    D.rank0_then_wait(lambda: probe.update(preflight(cfg.eval.judge, [item.prompt for item in items])))
    # Before the export: the step of the checkpoint it is made from, should training save another.
    source = D.on_rank0(lambda: policy_source(cfg))
    policy_dir = str(policy_model_dir(cfg))
    generations = Path(cfg.output_dir) / GENERATIONS_FILE
    saved: dict[str, Any] = {}

    def look_up() -> bool:
        log.info("fingerprinting policy, reference and prompts (a model's weights are hashed once, then memoized)")
        saved["fingerprint"] = generation_fingerprint(cfg, policy_dir, items, device)
        saved["rows"] = load_generations(generations, saved["fingerprint"], items)
        return saved["rows"] is not None

    # Rank 0 alone hashes the models (minutes for a 70B checkpoint hashed for the first time, which
    # the others wait out past the collective timeout) and decides; every rank takes its decision
    # (not the answers: only rank 0 judges).
    reuse = D.on_rank0(look_up)
    started = time.perf_counter()
    if reuse:
        if not env.is_main:
            return None
        rows = saved["rows"]
    else:
        mine = rank_share(items, env.rank, env.world_size, cfg.eval.batch_size)
        policy = generate_with(policy_dir, mine, cfg, device, env, len(items))
        reference = generate_with(cfg.reference_model_path(), mine, cfg, device, env, len(items), cfg.model.tokenizer_path)
        gathered = gather_to_main(list(zip(mine, policy, reference)), env)
        # No barrier after the judging: rank 0 may judge for longer than the collective timeout
        # (thousands of API requests with backoff), and the other ranks' work is done.
        if not env.is_main:
            return None
        rows = sorted(gathered, key=lambda row: row[0].example_id)
        # Before judging: a judge that fails (hours into a 70B run) must not cost the answers.
        save_generations(generations, saved["fingerprint"], rows)
    generation_s = time.perf_counter() - started
    return judge_and_write(cfg, policy_dir, rows, env.world_size, generation_s, reused_generations=reuse,
                           source=source, probe_usage=probe)


def judge_rows(cfg: DPOConfig, rows) -> tuple[list, dict[str, Any], int]:
    """Verdicts on every ``(item, policy, reference)`` row, the judge's usage and how many verdicts
    were reused from ``verdicts.jsonl``. New verdicts are appended there a chunk at a time, so a
    judge that fails keeps what it has judged."""
    from dpo_dist.fingerprint import json_sha256
    from dpo_dist.judges import Comparison, build_judge, judge_identity

    path = Path(cfg.output_dir) / VERDICTS_FILE
    identity = json_sha256(judge_identity(cfg.eval.judge))
    keys = [json_sha256([identity, item.prompt, pol.text, ref.text]) for item, pol, ref in rows]
    verdicts = read_verdicts(path, set(keys))
    todo = [i for i, key in enumerate(keys) if key not in verdicts]
    reused = len(rows) - len(todo)
    if reused:
        log.info("reusing %d verdicts saved in %s; %d prompts left to judge", reused, path, len(todo))
    if not todo:
        return [verdicts[key] for key in keys], {}, reused
    chunk = JUDGE_CHUNK * cfg.eval.judge.concurrency
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_judge(cfg.eval.judge) as judge, open(path, "a", encoding="utf-8") as out:
        try:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                answers = judge.compare([Comparison(rows[i][0].prompt, rows[i][1].text, rows[i][2].text) for i in part])
                for i, verdict in zip(part, answers):
                    verdicts[keys[i]] = verdict
                    line = {"key": keys[i], "example_id": rows[i][0].example_id, "winner": verdict.winner,
                            "details": verdict.details}
                    out.write(json.dumps(line) + "\n")
                out.flush()
        except BaseException:  # an endpoint that keeps failing, an interrupt: say what is kept
            done = sum(key in verdicts for key in keys)
            log.warning("judging stopped with %d of %d verdicts saved in %s; the same command resumes from there "
                        "(the answers are kept in %s)", done, len(rows), path, path.with_name(GENERATIONS_FILE))
            raise
        usage = judge.usage()
    return [verdicts[key] for key in keys], usage, reused


def read_verdicts(path: Path, keys: set[str]) -> dict[str, Any]:
    """The verdicts of ``path`` whose key is in ``keys`` (a line cut short by a crash is skipped)."""
    from dpo_dist.judges import Verdict

    found: dict[str, Any] = {}
    if not path.is_file():
        return found
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                if row["key"] in keys:
                    found[row["key"]] = Verdict(row["winner"], row["details"])
            except (ValueError, KeyError, TypeError):
                continue
    return found


def judge_and_write(cfg: DPOConfig, policy_dir: str, rows, world_size: int, generation_s: float, *,
                    reused_generations: bool = False, source: dict[str, Any] | None = None,
                    probe_usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge (policy, reference) on every prompt, write winrate.json + samples, print the summary.

    ``source``: ``evaluation.policy_source`` (what the user named, which ``policy_dir`` may be a
    temporary export of); ``probe_usage``: what the judge's preflight request cost."""
    from dpo_dist.evaluation import policy_source
    from dpo_dist.judges import add_usage

    started = time.perf_counter()
    verdicts, usage, reused_verdicts = judge_rows(cfg, rows)
    usage = add_usage(probe_usage or {}, usage)
    result = {
        "policy": policy_dir,
        **(source if source is not None else policy_source(cfg)),
        "reference": cfg.reference_model_path(),
        "judge": cfg.eval.judge.name,
        **({"judge_model": cfg.eval.judge.model} if cfg.eval.judge.name == "openai" else {}),
        "eval_path": cfg.data.eval_path,
        **({"eval_data": cfg.data.sources()[1].label()} if cfg.data.eval_split else {}),
        **summarize([OUTCOMES[v.winner] for v in verdicts]),
        "generation": {
            **generation_settings(cfg),
            "world_size": world_size,
            "sharded": cfg.eval.shard_generation and world_size > 1,
        },
        "judge_usage": usage,
        # What an earlier run of the same command had done (judge_usage counts this run only).
        "reused": {"generations": reused_generations, "verdicts": reused_verdicts},
        "seconds": {"generation": round(generation_s, 3), "judging": round(time.perf_counter() - started, 3)},
    }
    out = Path(cfg.eval.resolved_output(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "winrate_samples.jsonl", "w", encoding="utf-8") as f:
        for (item, pol, ref), verdict in zip(rows, verdicts):
            f.write(json.dumps(sample_row(item, pol, ref, verdict)) + "\n")
    (out / "winrate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary_line(result), flush=True)
    print(f"wrote {out / 'winrate.json'} and {out / 'winrate_samples.jsonl'}", flush=True)
    if usage:
        log.info("judge usage: %s", usage)
    return result


def sample_row(item: PromptItem, policy: Completion, reference: Completion, verdict) -> dict[str, Any]:
    """One line of ``winrate_samples.jsonl``."""
    return {
        "example_id": item.example_id,
        "prompt": item.prompt,
        "policy": policy.text,
        "reference": reference.text,
        "winner": WINNER_NAMES[verdict.winner],
        "judge": verdict.details,
        "policy_tokens": policy.completion_tokens,
        "reference_tokens": reference.completion_tokens,
        "policy_finish": policy.finish_reason,
        "reference_finish": reference.finish_reason,
    }


def summary_line(result: dict[str, Any]) -> str:
    """The one line ``dpo-eval winrate`` prints."""
    lo, hi = result["score_ci95"]
    return (
        f"winrate: policy vs reference on {result['n']} prompts (judge={result['judge']}): "
        f"win {result['win_rate']:.3f} tie {result['tie_rate']:.3f} loss {result['loss_rate']:.3f}; "
        f"score {result['score']:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    )
