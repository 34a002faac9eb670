"""The per-rank entry point: ``python -m dpo_dist.worker OUTPUT_DIR/config.yaml TASK``.

Local launches, Slurm tasks (submitit) and hand-written ``srun`` scripts all end here with
torchrun-style rank variables set. Exit status: 0 done, 2 a user error (one line on stderr),
75 preempted (after a checkpoint once training has started: requeue me), anything else a bug.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

TASKS = ("train", "precompute", "eval", "winrate")
PREEMPTED_EXIT_CODE = 75
"""A rank's exit status after its preemption checkpoint: EX_TEMPFAIL, "try again", which is what
requeueing does."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to fix; shown as one line, no traceback."""
    from dpo_dist.attention import AttentionBackendError
    from dpo_dist.config import ConfigError
    from dpo_dist.data import DataError
    from dpo_dist.evaluation import EvalError
    from dpo_dist.export import ExportError
    from dpo_dist.generation import GenerationError
    from dpo_dist.judges import JudgeError
    from dpo_dist.reference import ReferenceCacheError

    return (
        AttentionBackendError, ConfigError, DataError, EvalError, ExportError, GenerationError, JudgeError,
        ReferenceCacheError, FileNotFoundError,
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


_LOADER_PACKAGES = (f"{os.sep}transformers{os.sep}", f"{os.sep}peft{os.sep}")


def pretrained_load_path(exc: BaseException) -> str | None:
    """The path (or hub id) a ``from_pretrained`` of transformers or PEFT was loading when it
    raised ``exc``, read from the outermost such call in the traceback; None if ``exc`` did not
    come from one (an OSError from anywhere else is not a model that failed to load).

    transformers raises OSError for a missing folder, a folder without ``config.json`` or an
    unknown hub id; for a folder with no model or tokenizer file at all it may instead raise
    ValueError (it cannot build a tokenizer from nothing), which counts too."""
    if not isinstance(exc, (OSError, ValueError)):
        return None
    path = _from_pretrained_argument(exc)
    if path is None or isinstance(exc, OSError):
        return path
    return path if os.path.isdir(path) and not any(Path(path, n).exists() for n in _MODEL_FILES) else None


# A folder with none of these holds no model or tokenizer.
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json")


def _from_pretrained_argument(exc: BaseException) -> str | None:
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        if code.co_name == "from_pretrained" and any(p in code.co_filename for p in _LOADER_PACKAGES):
            names = code.co_varnames[: code.co_argcount]
            for name in ("pretrained_model_name_or_path", "model_id"):  # transformers, PEFT
                if name in frame.f_locals:
                    return str(frame.f_locals[name])
            positional = [n for n in names if n not in ("cls", "self", "model")]
            return str(frame.f_locals[positional[0]]) if positional else None
        tb = tb.tb_next
    return None


def _config_keys_of(cfg, value: str) -> list[str]:
    """Dotted keys of ``cfg`` (a DPOConfig) whose value is ``value``, in declaration order."""
    import dataclasses

    def walk(node, prefix: str):
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                yield from walk(getattr(node, f.name), f"{prefix}{f.name}.")
        elif isinstance(node, (str, os.PathLike)):
            yield prefix[:-1], os.fspath(node)

    wanted = {value, os.path.abspath(value)}
    return [key for key, v in walk(cfg, "") if v in wanted or os.path.abspath(v) in wanted]


def user_error_message(exc: BaseException, cfg=None) -> str | None:
    """The one line to show for ``exc`` if it is a user error, else None (a bug: keep the traceback).

    A model or tokenizer that ``from_pretrained`` cannot load (a missing folder, one without
    ``config.json``, an unknown hub id) is named by its config key, e.g.
    ``model.path=/tmp/nomodel: no model/tokenizer there (<transformers' first line>)``. The
    launcher refuses a path that does not exist (``launch.run.check_paths``); this reports a
    directory that holds no loadable model, or a rank started without the launcher."""
    path = pretrained_load_path(exc)
    if path is not None:
        keys = _config_keys_of(cfg, path) if cfg is not None else []
        return f"{keys[0] if keys else 'path'}={path}: no model/tokenizer there ({first_line(exc)})"
    if isinstance(exc, user_error_types()):
        return first_line(exc)
    return None


ERROR_DIR_ENV = "DPO_DIST_ERROR_DIR"


def report_user_error(message: str) -> None:
    """One line for the user: to the launcher's error folder when it gave one (it prints each
    distinct message once, however many ranks hit it), else to stderr."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        Path(folder, f"rank{os.environ.get('RANK', '0')}.txt").write_text(message + "\n")
    else:
        print(f"dpo_dist: error: {message}", file=sys.stderr)


def run_task(cfg, task: str):
    """Run ``task`` on this rank with an already-validated config."""
    if task == "train":
        from dpo_dist.engine import train

        return train(cfg)
    if task == "precompute":
        from dpo_dist.reference import precompute_for_run

        return precompute_for_run(cfg)
    if task == "eval":
        from dpo_dist.evaluation import evaluate_run

        return evaluate_run(cfg)
    if task == "winrate":
        from dpo_dist.winrate import winrate_run

        return winrate_run(cfg)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def setup_rank_logging(rank: str) -> None:
    """INFO from rank 0, warnings and errors from the others, each line tagged with its rank."""
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s %(message)s",
    )
    # torch's collectives warn on every call that DeepSpeed uses their old names.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def install_early_stop_handler() -> None:
    """Until training installs its preemption flag (before its first step: after loading the model,
    the reference pass and a resume's pending eval), a stop signal finds nothing to checkpoint:
    exit ``PREEMPTED_EXIT_CODE`` at once, so that whatever requeues on it runs the job again (the
    reference cache keeps its finished shards). Without this the signal killed the rank (143)."""
    import signal

    def stop(signum, _frame) -> None:
        logging.getLogger("dpo_dist").warning(
            "received %s with nothing to checkpoint yet; exiting %d (run again to go on)", signal.Signals(signum).name, PREEMPTED_EXIT_CODE
        )
        raise SystemExit(PREEMPTED_EXIT_CODE)

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[1] not in TASKS:
        print(f"usage: python -m dpo_dist.worker CONFIG_YAML {{{'|'.join(TASKS)}}}", file=sys.stderr)
        return 2
    from dpo_dist import distributed as D

    # An srun task of a hand-written sbatch script has Slurm's variables, not torchrun's.
    setup_rank_logging(os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if D.in_slurm_step() else None) or "0")
    from dpo_dist.checkpoint import Preempted
    from dpo_dist.runinfo import read_config

    cfg = None
    install_early_stop_handler()
    try:
        cfg = read_config(argv[0])
        D.export_slurm_env(cfg.cluster.master_port)
        run_task(cfg, argv[1])
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except SystemExit as exc:
        if exc.code == PREEMPTED_EXIT_CODE:
            return PREEMPTED_EXIT_CODE
        raise
    except Exception as exc:
        message = user_error_message(exc, cfg)
        if message is None:
            raise
        report_user_error(message)
        return 2
    finally:
        from dpo_dist.distributed import destroy

        destroy()
    return 0


if __name__ == "__main__":
    status = main()
    # Leave without interpreter teardown: under load, gloo/DeepSpeed C++ threads still alive at
    # shutdown can abort ("terminate called without an active exception") after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)
