"""Dispatch a validated config to the ranks: this machine (cluster=local) or Slurm (cluster=slurm)."""

from __future__ import annotations

import logging
from pathlib import Path

from launch.common import UserError, fail


def launch(prog: str, cfg, task: str) -> None:
    """Run ``task`` for ``cfg`` on the configured cluster; exits non-zero if any rank failed."""
    logging.getLogger("dpo_dist").info("%s %s: run directory %s", prog, task, Path(cfg.output_dir).resolve())
    if task in ("train", "precompute"):  # both write output_dir/config.yaml, which later jobs trust
        check_run_dir(cfg)
    check_paths(cfg)
    warn_unused_lora_settings(cfg)
    warn_high_learning_rate(cfg)
    if cfg.cluster.name == "slurm":
        from slurm.submit import SlurmJobFailed, SlurmSubmitFailed, inside_allocation, submit_and_wait

        if not inside_allocation():  # inside, this is a rank: the ranks check the data themselves
            check_data(cfg)
        try:
            submit_and_wait(cfg, task)
        except (SlurmJobFailed, SlurmSubmitFailed) as exc:  # sbatch refused it, or it ran and failed:
            fail(prog, str(exc), status=1)  # status 1, not the usage-error 2
        return
    from dpo_dist.launcher import LaunchError, run_local

    try:
        run_local(cfg, task)
    except LaunchError as exc:
        if exc.status == 2:
            raise UserError(str(exc)) from None  # the ranks' own line
        if task == "train":
            record_local_failure(cfg, exc)
        # Otherwise which rank died how, with its status: a crash (1) is not a usage error, and
        # a preemption (75) must stay 75 for whatever requeues the command.
        fail(prog, str(exc), status=exit_status(exc.status))


def record_local_failure(cfg, exc) -> None:
    """``status.json`` for a local training run that crashed or was preempted, as a Slurm run's
    ranks write it, so that ``dpo-report`` says ``failed``/``preempted`` (with why) instead of
    ``incomplete``. Not for refusals (status 2): the directory may be another job's."""
    from dpo_dist.worker import PREEMPTED_EXIT_CODE
    from slurm.runtime import RunStatus

    state = "preempted" if exc.status == PREEMPTED_EXIT_CODE else "failed"
    RunStatus(cfg.output_dir, rank=0, job_id=None).write(state, str(exc))


def check_run_dir(cfg) -> None:
    """``runinfo.check_same_run`` as a ``UserError``."""
    from dpo_dist.runinfo import check_same_run

    _as_user_error(check_same_run, cfg)


def check_run_dirs(stages) -> None:
    """Every stage's run directory (``check_run_dir``) and, for an sft_first chain [sft, dpo], that
    the SFT stage does not grow under a DPO stage already trained from it."""
    from dpo_dist.runinfo import check_sft_chain

    for config in stages:
        check_run_dir(config)
    if len(stages) == 2:
        _as_user_error(check_sft_chain, *stages)


def _as_user_error(check, *args) -> None:
    from dpo_dist.config import ConfigError

    try:
        check(*args)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def check_paths(cfg) -> None:
    """One line, before any rank starts, for a ``model.path`` that is not there (transformers
    would answer with a Hub repo-id message) or is an adapter whose base model is not, a
    ``reference.model_path`` that cannot score the policy's tokens, and a reference cache
    directory that cannot be made (the ranks would fail with tracebacks)."""
    from dpo_dist.adapters import adapter_base
    from dpo_dist.fingerprint import cache_root

    paths = [("model.path", cfg.model.path), ("model.tokenizer_path", cfg.model.tokenizer_path)]
    for key, path in [*paths, ("reference.model_path", cfg.reference.model_path if cfg.stage == "dpo" else None)]:
        if path and not Path(path).expanduser().exists():
            raise UserError(f"{key}={path}: no model/tokenizer there (no such directory; models are read from local directories, nothing is downloaded)")
        if key != "model.tokenizer_path":
            _as_user_error(adapter_base, path)  # an adapter directory whose base model is not here
    if cfg.stage == "dpo" and cfg.reference.model_path:
        check_reference_model(cfg)
    if cfg.data.chat_template:
        from dpo_dist.data import DataError
        from dpo_dist.data.tokenize import chat_template_text

        try:
            chat_template_text(cfg.data.chat_template)
        except DataError as exc:
            raise UserError(str(exc)) from None
    if cfg.stage == "sft" or cfg.reference.mode != "precompute" or not cfg.loss.uses_reference():
        return
    cache = Path(cfg.reference.cache_dir).expanduser() if cfg.reference.cache_dir else cache_root() / "reference"
    why = uncreatable(cache)
    if why:
        key = "reference.cache_dir" if cfg.reference.cache_dir else "the reference cache root ($DPO_DIST_CACHE or ~/.cache/dpo_dist)"
        raise UserError(f"{key}={cache}: cannot create it ({why})")


def check_reference_model(cfg) -> None:
    """``reference.model_path`` must score the policy's token ids (the same vocabulary) and, for
    TR-DPO, which mixes its weights with the policy's, have the policy's architecture."""
    from dpo_dist.adapters import model_dir

    # An adapter directory scores with its base's vocabulary and architecture.
    policy, reference = _hf_config(model_dir(cfg.model.path)), _hf_config(model_dir(cfg.reference.model_path))
    if policy is None or reference is None:
        return  # e.g. a planning-only shape file: the ranks' loading says what is missing
    keys = ["vocab_size"] + (list(_ARCHITECTURE_KEYS) if cfg.reference.syncs() else [])
    for key in keys:
        if policy.get(key) != reference.get(key):
            why = "it scores the policy's token ids" if key == "vocab_size" else "TR-DPO (reference.sync_every) mixes its weights with the policy's"
            raise UserError(
                f"reference.model_path={cfg.reference.model_path}: {key} {reference.get(key)} differs from model.path's "
                f"{policy.get(key)}, but {why}"
            )


_ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def _hf_config(path: str) -> dict | None:
    import json

    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None


def uncreatable(path: Path) -> str | None:
    """Why directory ``path`` could not be created (or used) here, or None; creates nothing (a
    refused run leaves no empty cache directory behind)."""
    import os
    import tempfile

    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if existing != path.absolute():
        try:  # a probe, removed at once: permissions alone do not tell (root, read-only mounts, /proc)
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".dpo_dist_probe"))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def warn_unused_lora_settings(cfg) -> None:
    """``model.lora.*`` given without ``model.lora.r`` trains the full weights: say so (a sweep over
    r=0,16 legitimately shares the other settings, so it is not refused)."""
    import dataclasses

    from dpo_dist.config import LoraConfig

    lora = cfg.model.lora
    if lora.enabled:
        return
    default = LoraConfig()
    changed = [f.name for f in dataclasses.fields(lora) if f.name != "r" and getattr(lora, f.name) != getattr(default, f.name)]
    if changed:
        logging.getLogger("dpo_dist").warning(
            "model.lora.%s set but model.lora.r=0: this run trains the full weights and ignores %s",
            ", model.lora.".join(changed), "it" if len(changed) == 1 else "them",
        )


HIGH_LR = 1e-4
"""A full-weight learning rate from which a model of ``LARGE_MODEL_PARAMS`` or more is warned about."""
LARGE_MODEL_PARAMS = 1e9


def warn_high_learning_rate(cfg) -> None:
    """Full-weight training of a large model at a tiny-model learning rate wrecks it: warn, naming
    the usual values (model=tiny's 2e-4 stays in force when model.path is pointed at a real model
    without a model preset). Not refused: an lr is the user's call."""
    from dpo_dist.memory import ModelShape, PlanError

    if cfg.model.lora.enabled or cfg.optim.lr < HIGH_LR:
        return
    try:
        params = ModelShape.from_path(cfg.model.path).num_params()
    except (PlanError, OSError, ValueError, KeyError):
        return  # a model the planner cannot describe: the ranks' loading reports what is wrong
    if params < LARGE_MODEL_PARAMS:
        return
    preset = " (model=tiny's: choose a model preset, e.g. model=llama3_8b, or set optim.lr)" if cfg.model.name == "tiny" else ""
    logging.getLogger("dpo_dist").warning(
        "optim.lr=%g%s for full-weight %s of a %.1fB-parameter model: TRL's DPO default is 1e-6, Llama DPO "
        "recipes use 5e-7 to 5e-6 and SFT 1e-5 to 2e-5; this rate is likely to wreck the model",
        cfg.optim.lr, preset, cfg.stage.upper(), params / 1e9,
    )


def check_data(cfg) -> None:
    """Read the data here before a Slurm job is queued: with ``data.on_invalid=error`` a bad record
    then stops the submission, not a job that waited for its GPUs (the ranks check it again, with
    the tokenizer)."""
    if cfg.data.on_invalid != "error":
        return
    from dpo_dist.data import DataError, load_preferences

    # data.eval_split's held-out side is read, checked and split with the training side.
    for source in dict.fromkeys(s for s in cfg.data.sources() if s and s.selection.side != "eval"):
        try:
            load_preferences(source.path, "error", columns=cfg.data.columns(), selection=source.selection)
        except DataError as exc:
            raise UserError(str(exc)) from None


def exit_status(status: int) -> int:
    """A rank's status as a process exit status: killed by signal N (negative) is 128 + N, as in a shell."""
    return 128 - status if status < 0 else status
