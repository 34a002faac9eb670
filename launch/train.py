"""``dpo-train``: DPO (or SFT with stage=sft, or SFT then DPO with sft_first.max_steps=N) with
Hydra overrides; ``-m`` runs sweeps."""

from __future__ import annotations

from pathlib import Path

from launch.common import check_not_held, hydra_main, to_config
from launch.plan import check_memory_plan
from launch.run import check_data, check_run_dirs, launch


def _task(cfg) -> None:
    stages = to_config(cfg).stages()  # [run] or, with sft_first.max_steps > 0, [sft run, dpo run]
    check_memory_plans(stages)  # a GPU plan that cannot fit is refused before anything starts
    check_run_dirs(stages)  # and a stage's run directory holding a run trained otherwise
    for config in stages:
        launch("dpo-train", config, "train")


def _sweep_preflight(cfg) -> None:
    """Every point of a sweep, before any runs: its run directory, where the command fixes it
    (``launch.common.sweep_point_dir``), must not hold a run trained otherwise (the same sweep
    directory re-run with new values) or be held by a job still training there. A Slurm sweep's
    points check their plan and data inside their array jobs, after waiting for GPUs: those are
    checked here first too, as a single job is checked before it is submitted (a local sweep's
    points are checked by ``_task`` as they start, one after another)."""
    from dpo_dist.runinfo import RUN_LOCK

    stages = cfg.stages()
    check_run_dirs(stages)
    for config in stages:
        if (Path(config.output_dir) / RUN_LOCK).exists():
            check_not_held("dpo-train", config.output_dir)
    if cfg.cluster.name == "slurm":
        check_memory_plans(stages)
        check_data(cfg)


def check_memory_plans(stages) -> None:
    """Every stage's plan, all with the first stage's model shape: the DPO stage of sft_first trains
    sft/final, which does not exist yet and has model.path's shape."""
    for config in stages:
        check_memory_plan(config, shape_path=stages[0].model.path)


def main() -> None:
    hydra_main("dpo-train", _task, sweep_preflight=_sweep_preflight, trains=True)


if __name__ == "__main__":
    main()
