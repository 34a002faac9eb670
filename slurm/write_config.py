"""Write a run's resolved ``OUTPUT_DIR/config.yaml`` without running anything, for plain sbatch.

    python -m slurm.write_config output_dir=/shared/runs/exp1 model.path=/models/llama loss.beta=0.1
    sbatch --export=ALL,RUN_DIR=/shared/runs/exp1 slurm/dpo_train.sbatch

The overrides are checked exactly as ``dpo-train`` checks them (one line and exit 2 on error), and
the file is the one ``dpo-train`` itself writes for its ranks: ``srun python -m dpo_dist.worker
OUTPUT_DIR/config.yaml train`` then runs the same training. ``output_dir=`` is required (there is no
Hydra run directory here) and sweeps are refused (one file is one run).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROG = "python -m slurm.write_config"


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dpo_dist.runinfo import write_config
    from launch.common import CONF_DIR, UserError, check_overrides, fail, register_schema, to_config

    overrides = sys.argv[1:] if argv is None else argv
    if not overrides or any(a in ("-h", "--help") for a in overrides):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: " + PROG + " output_dir=DIR [KEY=VALUE ...]")
        return 0 if overrides else 2
    if not any(o.startswith("output_dir=") for o in overrides):
        fail(PROG, "output_dir=DIR is required: it is where config.yaml is written and where the run goes")
    # The job may start in another directory: pin the run directory to an absolute path.
    overrides = [f"output_dir={Path(o.split('=', 1)[1]).absolute()}" if o.startswith("output_dir=") else o for o in overrides]
    register_schema()
    clusters = check_overrides(PROG, overrides)
    if len(clusters) != 1:
        fail(PROG, "a sweep (a,b values) is not one run: write one config per point")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    try:
        path = write_config(to_config(cfg))
    except UserError as exc:
        fail(PROG, str(exc))
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
