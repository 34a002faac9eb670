"""Write a run's resolved ``OUTPUT_DIR/config.yaml`` without running anything, for plain sbatch.

    python -m slurm.write_config output_dir=/shared/runs/exp1 model.path=/models/llama loss.beta=0.1

prints the config's path, then the command that submits it (add resource flags to it as needed):

    sbatch --signal=USR2@120 --export=ALL,RUN_DIR=/shared/runs/exp1,SIGNAL_DELAY_S=120 .../slurm/dpo_train.sbatch

The overrides are checked exactly as ``dpo-train`` checks them (one line and exit 2 on error), and
the file is the one ``dpo-train`` itself writes for its ranks: ``srun python -m dpo_dist.worker
OUTPUT_DIR/config.yaml train`` then runs the same training. ``output_dir=`` is required (there is no
Hydra run directory here) and sweeps are refused (one file is one run).

The command carries ``cluster.signal_delay_s``: an ``#SBATCH`` line cannot read config.yaml, so
the warning time goes on the command line as ``--signal=USR2@N`` (to the job steps, where the
ranks catch it; not ``B:``, the batch shell, which does not), and as ``SIGNAL_DELAY_S=N``, which
the script checks against the config. ``cluster.max_requeues`` the script reads from config.yaml.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

PROG = "python -m slurm.write_config"
SBATCH_SCRIPT = Path(__file__).resolve().parent / "dpo_train.sbatch"


def sbatch_command(output_dir: str | Path, signal_delay_s: int) -> str:
    """The ``sbatch`` command that runs ``output_dir/config.yaml`` with the config's warning time."""
    export = f"ALL,RUN_DIR={Path(output_dir).absolute()},SIGNAL_DELAY_S={signal_delay_s}"
    return shlex.join(["sbatch", f"--signal=USR2@{signal_delay_s}", f"--export={export}", str(SBATCH_SCRIPT)])


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dpo_dist.config import ConfigError
    from dpo_dist.runinfo import check_same_run, write_config
    from launch.common import CONF_DIR, UserError, check_overrides, fail, register_schema, to_config

    overrides = sys.argv[1:] if argv is None else argv
    if not overrides or any(a in ("-h", "--help") for a in overrides):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: " + PROG + " output_dir=DIR [KEY=VALUE ...]")
        return 0 if overrides else 2
    if not any(o.startswith("output_dir=") for o in overrides):
        fail(PROG, "output_dir=DIR is required: it is where config.yaml is written and where the run goes")
    # The job may start in another directory: pin the run directory to an absolute path.
    overrides = [f"output_dir={Path(o.split('=', 1)[1]).absolute()}" if o.startswith("output_dir=") else o for o in overrides]
    if any("," in o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")):
        # sbatch --export splits its list at commas: RUN_DIR would arrive cut short.
        fail(PROG, "output_dir: a directory whose path has a comma cannot pass through sbatch --export=RUN_DIR=...")
    register_schema()
    clusters = check_overrides(PROG, overrides)
    if len(clusters) != 1:
        fail(PROG, "a sweep (a,b values) is not one run: write one config per point")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    try:
        config = to_config(cfg)
        check_same_run(config)
        path = write_config(config)
    except (UserError, ConfigError) as exc:
        fail(PROG, str(exc))
    print(path.resolve())
    print(sbatch_command(path.parent.resolve(), config.cluster.signal_delay_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
