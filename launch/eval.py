"""``dpo-eval``: evaluate a trained policy on held-out data.

    dpo-eval output_dir=outputs/RUN [eval.policy_path=outputs/RUN/checkpoints/step_N]
    dpo-eval eval.policy_path=/some/final [the model/data overrides it was trained with]
    dpo-eval winrate output_dir=outputs/RUN [judge=rule|reward_model|openai] [eval.max_prompts=200]

With ``output_dir=RUN`` of a finished run, its ``config.yaml`` supplies the model (the reference),
data, loss, reference and train settings; overrides given here win (``runinfo.inherit_run_settings``).
Without a mode: reward accuracy and margins against the reference ``model.path`` (its cached
log-probs are reused); results land in ``eval.output`` (default ``output_dir``) as ``eval.json``,
while the ranks work in ``OUTPUT_DIR/eval`` (so ``output_dir=RUN`` never touches the run's files).

``winrate`` (the first argument; it is removed before Hydra reads the overrides): generations of
the policy and of the reference on the held-out prompts (``data.eval_path``, or ``data.eval_split``
of the training file), compared by a judge; results land in
``eval.output`` (default ``output_dir``) as ``winrate.json`` and ``winrate_samples.jsonl``. The
policy defaults to ``output_dir/final``, so ``output_dir=RUN`` evaluates a finished run in place:
the ranks, their config.yaml and Hydra's ``.hydra/`` live in ``RUN/winrate/`` and never overwrite
the run's own files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch.common import hydra_main, to_config
from launch.run import launch

WINRATE = "winrate"
EVAL_SUBDIR = "eval"


def _task(cfg) -> None:
    from dpo_dist.evaluation import rank_config

    launch("dpo-eval", rank_config(to_config(_with_run_settings(cfg)), EVAL_SUBDIR), "eval")


def _winrate_task(cfg) -> None:
    from dpo_dist.winrate import rank_config

    launch("dpo-eval", rank_config(to_config(_with_run_settings(cfg))), "winrate")


def _with_run_settings(cfg):
    """``output_dir=RUN`` of a finished run: its model (the reference), data, loss and tokenization
    settings, so an SFT->DPO chain or a custom model is judged against its own base without the
    user repeating the training overrides; those the user does give still win."""
    import logging

    import yaml
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dpo_dist.runinfo import INHERITED_SECTIONS, inherit_run_settings

    run_file = Path(cfg.output_dir) / "config.yaml"
    if not run_file.is_file():
        return cfg
    overridden = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    values = OmegaConf.to_container(cfg, resolve=True)
    merged = inherit_run_settings(values, yaml.safe_load(run_file.read_text()) or {}, overridden)
    logging.getLogger("dpo_dist").info(
        "dpo-eval: %s settings from %s (overrides given here win)", "/".join(INHERITED_SECTIONS), run_file
    )
    return OmegaConf.create(merged)


def _work_dir_argv(argv: list[str], subdir: str) -> list[str]:
    """Hydra's own files (``.hydra/``, the job log) go to ``OUTPUT_DIR/<subdir>`` rather than the run dir."""
    explicit = [a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")]
    if explicit and not any(a in ("-m", "--multirun") for a in argv):
        # A later override of the same key wins, so this replaces hydra_main's hydra.run.dir=OUTPUT_DIR.
        return [*argv, f"hydra.run.dir={Path(explicit[-1]) / subdir}"]
    return argv


def main() -> None:
    from dpo_dist.winrate import WORK_SUBDIR

    if sys.argv[1:2] == [WINRATE]:
        sys.argv[1:] = _work_dir_argv(sys.argv[2:], WORK_SUBDIR)
        hydra_main("dpo-eval", _winrate_task)
    else:
        sys.argv[1:] = _work_dir_argv(sys.argv[1:], EVAL_SUBDIR)
        hydra_main("dpo-eval", _task)


if __name__ == "__main__":
    main()
