"""dpo_dist on Slurm: submitit submission, the sweep launcher, and what runs inside a job.

- ``slurm.submit``: ``cluster=slurm`` submission and waiting (the design is in its docstring)
- ``slurm.runtime``: what every Slurm task runs (rank setup, status.json, requeue on preemption)
- sweeps: ``dpo-train -m ... cluster=slurm`` is one job array through hydra-submitit-launcher
  (``conf/hydra/launcher/dpo_slurm.yaml``; resources from ``slurm.submit.launcher_overrides``)
- ``slurm.scheduler``: job state and requeue through scontrol/sacct
- ``slurm.write_config``: ``OUTPUT_DIR/config.yaml`` for the plain-sbatch template ``dpo_train.sbatch``,
  and the sbatch command that submits it with the config's warning time
- ``local_cluster.sh``: a real two-node Slurm on one machine, for tests
"""
