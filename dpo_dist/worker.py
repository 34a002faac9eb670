"""The per-rank entry point: ``python -m dpo_dist.worker OUTPUT_DIR/config.yaml TASK``.

Local launches, Slurm tasks (submitit) and hand-written ``srun`` scripts all end here with
torchrun-style rank variables set. Exit status: 0 done, 2 a user error (one line on stderr),
75 preempted after a checkpoint (requeue me), anything else a bug (with its traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

TASKS = ("train", "precompute", "eval", "winrate")


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[1] not in TASKS:
        print(f"usage: python -m dpo_dist.worker CONFIG_YAML {{{'|'.join(TASKS)}}}", file=sys.stderr)
        return 2
    from dpo_dist import distributed as D

    # An srun task of a hand-written sbatch script has Slurm's variables, not torchrun's.
    setup_rank_logging(os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if D.in_slurm_step() else None) or "0")
    from dpo_dist.engine import PREEMPTED_EXIT_CODE, Preempted
    from dpo_dist.runinfo import read_config

    try:
        cfg = read_config(argv[0])
        D.export_slurm_env(cfg.cluster.master_port)
        run_task(cfg, argv[1])
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except user_error_types() as exc:
        report_user_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
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
